// The hooks for history channels (offsets, epochs, `since`, `recovered`) and other frames a
// server may send, against a scripted WebSocket server: pushgate itself does not keep history
// yet, and these paths must work when it does.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { WebSocketServer } from "ws";

import { Pushgate } from "../pushgate.js";
import { Inbox, WebSocket, next, token, SDK } from "./helpers.js";

/** A server that speaks the welcome and hands every request to the test. */
class ScriptedServer {
  constructor() {
    this.requests = new Inbox();
    this.sockets = [];
  }

  async start() {
    this.wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((resolve) => this.wss.once("listening", resolve));
    this.url = `ws://127.0.0.1:${this.wss.address().port}/ws`;
    this.wss.on("connection", (ws) => {
      this.sockets.push(ws);
      ws.send(JSON.stringify({ type: "welcome", session: "s1.0", user: "u", node: "s1", ping_interval: 25 }));
      ws.on("message", (data) => {
        const frame = JSON.parse(data);
        if (frame.type === "ping") ws.send(JSON.stringify({ type: "pong", id: frame.id }));
        else this.requests.push({ ws, frame });
      });
    });
    return this;
  }

  /** The next request other than a ping. */
  async request(type) {
    const r = await this.requests.next();
    assert.equal(r.frame.type, type, JSON.stringify(r.frame));
    return r;
  }

  stop() {
    for (const ws of this.sockets) ws.terminate();
    return new Promise((resolve) => this.wss.close(resolve));
  }
}

const send = (ws, frame) => ws.send(JSON.stringify(frame));
const message = (offset, epoch, data) => ({
  type: "message", id: "m" + offset, ts: 1, channel: "chat:1", offset, epoch, data,
});

describe("history channel hooks", { timeout: 30000 }, () => {
  let server;
  let client;

  before(async () => {
    server = await new ScriptedServer().start();
  });

  after(async () => {
    client?.close();
    await server.stop();
  });

  it("tracks positions, resubscribes with `since`, drops duplicates, surfaces `recovered`", async () => {
    client = new Pushgate(server.url, { ...SDK, WebSocket, getToken: () => token("u"), minDelay: 10, maxDelay: 50 });
    const inbox = new Inbox();
    const sub = client.subscribe("chat:1", inbox.push);
    const subscribed = new Inbox();
    client.on("subscribed", subscribed.push);
    client.connect();

    // A first subscribe: no `since`; the ack's position becomes the client's.
    let { ws, frame } = await server.request("subscribe");
    assert.equal(frame.since, undefined);
    send(ws, { type: "ack", id: frame.id, position: { offset: 10, epoch: "e1" } });
    assert.deepEqual(await subscribed.next(), {
      channel: "chat:1", resubscribed: false, recovered: undefined, position: { offset: 10, epoch: "e1" },
    });
    send(ws, message(11, "e1", "a"));
    send(ws, message(12, "e1", "b"));
    send(ws, message(12, "e1", "b again"));
    assert.equal((await inbox.next()).data, "a");
    assert.equal((await inbox.next()).data, "b");
    assert.deepEqual(sub.position, { offset: 12, epoch: "e1" });

    // Dropped: the resubscribe asks for what came after offset 12; the missed messages
    // follow the ack, the one already seen is not delivered twice.
    ws.close(1011);
    ({ ws, frame } = await server.request("subscribe"));
    assert.deepEqual(frame.since, { offset: 12, epoch: "e1" });
    send(ws, { type: "ack", id: frame.id, recovered: true, position: { offset: 14, epoch: "e1" } });
    const recovered = await subscribed.next();
    assert.equal(recovered.resubscribed, true);
    assert.equal(recovered.recovered, true);
    send(ws, message(12, "e1", "b"));
    send(ws, message(13, "e1", "c"));
    send(ws, message(14, "e1", "d"));
    assert.equal((await inbox.next()).data, "c");
    assert.equal((await inbox.next()).data, "d");
    assert.deepEqual(sub.position, { offset: 14, epoch: "e1" });

    // History lost (a new epoch): `recovered: false` reaches the app with the new position.
    ws.close(1011);
    ({ ws, frame } = await server.request("subscribe"));
    assert.deepEqual(frame.since, { offset: 14, epoch: "e1" });
    send(ws, { type: "ack", id: frame.id, recovered: false, position: { offset: 3, epoch: "e2" } });
    const lost = await subscribed.next();
    assert.equal(lost.recovered, false);
    assert.deepEqual(lost.position, { offset: 3, epoch: "e2" });
    send(ws, message(4, "e2", "e"));
    assert.equal((await inbox.next()).data, "e");
    assert.deepEqual(sub.position, { offset: 4, epoch: "e2" });
    assert.equal(inbox.items.length, 0);
  });

  it("history_lost: subscribes again from the last position and reports recovered: false", async () => {
    client?.close();
    client = new Pushgate(server.url, { ...SDK, WebSocket, getToken: () => token("u") });
    const inbox = new Inbox();
    client.subscribe("chat:1", inbox.push);
    client.connect();
    let { ws, frame } = await server.request("subscribe");
    send(ws, { type: "ack", id: frame.id, position: { offset: 20, epoch: "e1" } });
    send(ws, message(21, "e1", "a"));
    assert.equal((await inbox.next()).data, "a");
    const subscribed = next(client, "subscribed");
    send(ws, { type: "unsubscribed", channel: "chat:1", code: "history_lost", reason: "gone" });
    ({ ws, frame } = await server.request("subscribe"));
    assert.deepEqual(frame.since, { offset: 21, epoch: "e1" });
    send(ws, { type: "ack", id: frame.id, recovered: false, position: { offset: 40, epoch: "e1" } });
    const info = await subscribed;
    assert.equal(info.resubscribed, true);
    assert.equal(info.recovered, false);
    assert.deepEqual(info.position, { offset: 40, epoch: "e1" });
    send(ws, message(41, "e1", "b"));
    assert.equal((await inbox.next()).data, "b");
  });

  it("a subscribe may start from a stored position", async () => {
    client?.close();
    client = new Pushgate(server.url, { ...SDK, WebSocket, getToken: () => token("u") });
    client.subscribe("chat:2", () => {}, { since: { offset: 7, epoch: "e9" } });
    client.connect();
    const { ws, frame } = await server.request("subscribe");
    assert.deepEqual(frame.since, { offset: 7, epoch: "e9" });
    const subscribed = next(client, "subscribed");
    send(ws, { type: "ack", id: frame.id, position: { offset: 9, epoch: "e9" } });
    // No word on recovery from the server: not recovered.
    assert.equal((await subscribed).recovered, false);
  });

  it("retries a subscribe the server could not do yet, forgets one the server ended", async () => {
    client?.close();
    client = new Pushgate(server.url, { ...SDK, WebSocket, getToken: () => token("u") });
    const sub = client.subscribe("chat:3", () => {});
    client.connect();
    let { ws, frame } = await server.request("subscribe");
    send(ws, { type: "error", id: frame.id, code: "unavailable", message: "broker unavailable; retry later" });
    ({ ws, frame } = await server.request("subscribe"));
    assert.equal(frame.channel, "chat:3");
    send(ws, { type: "ack", id: frame.id });
    await sub.ready;

    const ended = next(client, "unsubscribed");
    send(ws, { type: "unsubscribed", channel: "chat:3", code: "revoked", reason: "token no longer grants this channel" });
    assert.deepEqual(await ended, {
      channel: "chat:3", code: "revoked", reason: "token no longer grants this channel",
    });
    assert.deepEqual(client.channels(), []);
    // A later reconnect does not subscribe to it again: the first request is the publish.
    const again = next(client, "connected");
    ws.close(1011);
    await again;
    const published = client.publish("chat:4", 1);
    ({ ws, frame } = await server.request("publish"));
    send(ws, { type: "ack", id: frame.id });
    assert.equal((await published).id, frame.id);
  });
});
