// Requests, deliveries and errors against a single pushgate node.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Pushgate, PushgateError, decodeToken } from "../pushgate.js";
import { Inbox, Node, WebSocket, next, token, SDK } from "./helpers.js";

describe("requests and deliveries", () => {
  let node;
  const clients = [];

  before(async () => {
    node = await Node.start();
  });

  after(async () => {
    for (const c of clients) c.close();
    await node?.kill();
  });

  function client(sub, grants, options = {}) {
    const c = new Pushgate(node.url, { ...SDK, getToken: () => token(sub, grants), WebSocket, ...options });
    clients.push(c);
    return c;
  }

  it("subscribes, publishes, and delivers with the sender's name", async () => {
    const alice = client("alice", { channels: ["room:*"], publish: [] });
    const bob = client("bob", { channels: [], publish: ["room:*"] });
    const inbox = new Inbox();
    const sub = alice.subscribe("room:1", inbox.push);
    assert.equal(sub.channel, "room:1");
    const welcome = next(alice, "connected");
    alice.connect();
    const info = await welcome;
    assert.equal(info.user, "alice");
    assert.equal(info.node, node.id);
    assert.equal(info.reconnected, false);
    assert.equal(alice.state, "connected");
    assert.deepEqual(await sub.ready, { type: "ack", id: (await sub.ready).id });

    bob.connect();
    const ack = await bob.publish("room:1", { text: "hi" });
    assert.equal(ack.type, "ack");
    const msg = await inbox.next();
    assert.equal(msg.channel, "room:1");
    assert.equal(msg.from, "bob");
    assert.deepEqual(msg.data, { text: "hi" });
    assert.equal(typeof msg.id, "string");
    assert.equal(typeof msg.ts, "number");
  });

  it("gets a burst whole and in order, batched by the node when asked for", async () => {
    const dave = client("dave", { channels: ["burst"], publish: [] });
    const erin = client("erin", { channels: [], publish: ["burst"] });
    const inbox = new Inbox();
    const sub = dave.subscribe("burst", inbox.push);
    dave.connect();
    await sub.ready;
    assert.equal(dave._conn.ws.protocol, SDK.batch ? "pushgate.batch" : "");
    erin.connect();
    // Within the default burst of the rate limit; pipelined, so the node queues them together.
    const count = 150;
    await Promise.all(Array.from({ length: count }, (_, i) => erin.publish("burst", i)));
    for (let i = 0; i < count; i++) assert.equal((await inbox.next()).data, i);
  });

  it("rejects refused requests with the server's code and message", async () => {
    const carol = client("carol", { channels: ["room:*"], publish: ["room:*"] });
    carol.connect();
    await assert.rejects(carol.publish("news", 1), (err) => {
      assert.ok(err instanceof PushgateError);
      assert.equal(err.code, "forbidden");
      assert.equal(err.message, "token does not grant publish on this channel");
      return true;
    });
    await assert.rejects(carol.publish("bad channel", 1), { code: "bad_request" });
    const refused = carol.subscribe("news", () => {});
    const error = next(carol, "error");
    await assert.rejects(refused.ready, { code: "forbidden", channel: "news" });
    assert.equal((await error).code, "forbidden");
    assert.deepEqual(carol.channels(), []);
  });

  it("presence is rejected cleanly while the server lacks it", async () => {
    const dave = client("dave", { publish: [] });
    dave.connect();
    await assert.rejects(dave.presence("room:1"), (err) => {
      assert.equal(err.code, "bad_request");
      assert.match(err.message, /presence/);
      return true;
    });
    // The connection is still fine.
    assert.equal((await dave.publish("x", 1).catch((e) => e)).code, "forbidden");
    assert.equal(dave.state, "connected");
  });

  it("requests wait for a connection; after close() they are refused", async () => {
    const erin = client("erin", {});
    const pending = erin.publish("room:1", 1);
    erin.connect();
    assert.equal((await pending).type, "ack");
    erin.close();
    await assert.rejects(erin.publish("room:1", 1), { code: "closed" });
  });

  it("unsubscribe ends the server subscription when its last handle does", async () => {
    const frank = client("frank", {});
    const a = new Inbox();
    const b = new Inbox();
    frank.connect();
    const first = frank.subscribe("room:u", a.push);
    const second = frank.subscribe("room:u", b.push);
    await first.ready;
    await frank.publish("room:u", 1);
    assert.equal((await a.next()).data, 1);
    assert.equal((await b.next()).data, 1);
    first.unsubscribe();
    await frank.publish("room:u", 2);
    assert.equal((await b.next()).data, 2);
    assert.equal(a.items.length, 0);
    second.unsubscribe();
    assert.deepEqual(frank.channels(), []);
    // Resubscribing works, and the channel's messages flow to the new handle only.
    const c = new Inbox();
    await frank.subscribe("room:u", c.push).ready;
    await frank.publish("room:u", 3);
    assert.equal((await c.next()).data, 3);
    assert.equal(a.items.length + b.items.length, 0);
  });

  it("deliveries to the user, the session or everyone arrive as `message` events", async () => {
    const gina = client("gina", {});
    const connected = next(gina, "connected");
    gina.connect();
    const { session } = await connected;
    const toUser = next(gina, "message", (m) => m.user === "gina");
    await node.api("/api/publish", { user: "gina", data: { n: 1 } });
    assert.deepEqual((await toUser).data, { n: 1 });
    const toSession = next(gina, "message", (m) => m.session === session);
    await node.api("/api/publish", { session, data: { n: 2 } });
    assert.deepEqual((await toSession).data, { n: 2 });
    const toAll = next(gina, "message", (m) => m.broadcast === true);
    await node.api("/api/publish", { broadcast: true, data: { n: 3 } });
    assert.deepEqual((await toAll).data, { n: 3 });
  });

  it("close() stops the client and fails what waits", async () => {
    const hank = client("hank", {});
    const connected = next(hank, "connected");
    hank.connect();
    await connected;
    const disconnected = next(hank, "disconnected");
    hank.close();
    const info = await disconnected;
    assert.equal(info.code, 1000);
    assert.equal(info.reconnect, false);
    assert.equal(hank.state, "offline");
    await assert.rejects(hank.publish("room:1", 1), { code: "closed" });
  });

  it("decodes token claims without verifying them", () => {
    const claims = decodeToken(token("ünïcode", { ttl: 60 }));
    assert.equal(claims.sub, "ünïcode");
    assert.equal(typeof claims.exp, "number");
    assert.equal(decodeToken("not a token"), null);
  });
});
