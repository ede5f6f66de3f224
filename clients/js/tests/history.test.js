// Recovery and presence against real nodes that keep history (`--history`, `--presence`):
// a client that was away gets exactly what it missed, in order, once; a client that joins
// starts with the channel's last messages (`recent`, `history()`), then gets every live one
// once. Skipped when the pushgate binary has no `--history` flag.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { after, before, describe, it } from "node:test";

import { Pushgate } from "../pushgate.js";
import { BIN, Inbox, Node, Redis, WebSocket, next, sleep, token, SDK } from "./helpers.js";

const supported = existsSync(BIN) && execFileSync(BIN, ["serve", "--help"]).toString().includes("--history");

describe("history channels", { skip: !supported && "this pushgate keeps no history", timeout: 60000 }, () => {
  let redis, n1, n2;
  const clients = [];

  before(async () => {
    redis = await Redis.start();
    const args = ["--history", "chat:*=200/10m", "--presence", "chat:*", "--history-request-limit", "80"];
    n1 = await Node.start({ id: "n1", redis, args });
    n2 = await Node.start({ id: "n2", redis, args });
  });

  after(async () => {
    for (const c of clients) c.close();
    await n1?.kill();
    await n2?.kill();
    await redis?.stop();
  });

  function client(node, sub, { sent, channels } = {}) {
    // With `sent`, every frame the client sends is recorded there.
    const WS = sent
      ? class extends WebSocket {
          send(data) {
            sent.push(JSON.parse(data));
            super.send(data);
          }
        }
      : WebSocket;
    const c = new Pushgate(node.url, { ...SDK, WebSocket: WS, getToken: () => token(sub, { channels }), minDelay: 50, maxDelay: 500 });
    clients.push(c);
    return c;
  }

  /** Publishes `from`..`to` (numbers as data) in order; on a fresh channel, data = offset. */
  async function publishRange(c, channel, from, to) {
    for (let i = from; i <= to; i++) await c.publish(channel, i);
  }

  const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

  /** Deliveries from `inbox` up to and including the one whose data is `last`. */
  async function until(inbox, last) {
    const got = [];
    for (;;) {
      const m = await inbox.next();
      got.push(m);
      if (m.data === last) return got;
    }
  }

  it("a client back from a node restart recovers what it missed, once and in order", async () => {
    const alice = client(n1, "alice");
    const bob = client(n2, "bob");
    const inbox = new Inbox();
    const sub = alice.subscribe("chat:1", inbox.push);
    alice.connect();
    bob.connect();
    const ack = await sub.ready;
    assert.equal(typeof ack.position.offset, "number");
    assert.equal(typeof ack.position.epoch, "string");

    await bob.publish("chat:1", 1);
    const first = await inbox.next();
    assert.equal(first.data, 1);
    assert.deepEqual(sub.position, { offset: first.offset, epoch: first.epoch });

    const lost = next(alice, "disconnected");
    const recovered = next(alice, "subscribed", (s) => s.resubscribed);
    await n1.kill();
    await lost;
    for (let i = 2; i <= 6; i++) await bob.publish("chat:1", i);
    await n1.start();
    const info = await recovered;
    assert.equal(info.recovered, true);
    await bob.publish("chat:1", 7);
    const got = [];
    for (let i = 2; i <= 7; i++) got.push(await inbox.next());
    assert.deepEqual(got.map((m) => m.data), [2, 3, 4, 5, 6, 7]);
    assert.deepEqual(got.map((m) => m.offset), got.map((_, i) => first.offset + 1 + i));
    assert.equal(inbox.items.length, 0);

    const presence = await alice.presence("chat:1");
    assert.equal(presence.type, "presence");
    // The killed node's entry may linger for a while; the new connection is there.
    assert.ok(presence.clients.some((c) => c.user === "alice" && c.session === alice.session.session));
  });

  it("a first join with recent gets exactly the last messages, then live ones once; a reconnect recovers instead", async () => {
    const channel = "chat:recent";
    const bob = client(n2, "bob");
    bob.connect();
    await publishRange(bob, channel, 1, 120);

    // On the other node than the publisher's.
    const sent = [];
    const alice = client(n1, "alice", { sent });
    const inbox = new Inbox();
    const sub = alice.subscribe(channel, inbox.push, { recent: 50 });
    alice.connect();
    const ack = await sub.ready;
    assert.equal(ack.position.offset, 120);
    const epoch = ack.position.epoch;
    const backlog = await until(inbox, 120);
    assert.deepEqual(backlog.map((m) => m.data), range(71, 120));
    assert.deepEqual(backlog.map((m) => m.offset), range(71, 120));
    assert.ok(backlog.every((m) => m.epoch === epoch && m.channel === channel));
    await bob.publish(channel, 121);
    assert.equal((await inbox.next()).offset, 121);
    assert.equal(inbox.items.length, 0);
    assert.deepEqual(sub.position, { offset: 121, epoch });
    const subscribes = () => sent.filter((f) => f.type === "subscribe");
    assert.equal(subscribes().length, 1);
    assert.equal(subscribes()[0].recent, 50);
    assert.equal(subscribes()[0].since, undefined);

    // After a reconnect the client recovers from its position: what it missed, not the last 50.
    const lost = next(alice, "disconnected");
    const recovered = next(alice, "subscribed", (s) => s.resubscribed);
    await n1.kill();
    await lost;
    await publishRange(bob, channel, 122, 126);
    await n1.start();
    const info = await recovered;
    assert.equal(info.recovered, true);
    assert.equal(subscribes().length, 2);
    assert.deepEqual(subscribes()[1].since, { offset: 121, epoch });
    assert.equal(subscribes()[1].recent, undefined);
    await bob.publish(channel, 127);
    const got = await until(inbox, 127);
    assert.deepEqual(got.map((m) => m.offset), range(122, 127));
    assert.equal(inbox.items.length, 0);
  });

  it("a join with recent while messages keep coming has no gap and no duplicate", async () => {
    const channel = "chat:busy";
    // Through the API of the other node: no per-connection rate limit to run into.
    const publish = (data) => n2.api("/api/publish", { channel, data });
    for (let i = 1; i <= 120; i++) await publish(i);
    let n = 120;
    let publishing = true;
    const publisher = (async () => {
      while (publishing) await publish(++n);
    })();

    const carol = client(n1, "carol");
    const inbox = new Inbox();
    const sub = carol.subscribe(channel, inbox.push, { recent: 50 });
    carol.connect();
    const top = (await sub.ready).position.offset;
    assert.ok(top >= 120, `position ${top}`);
    // Publishing goes on well past the join before it stops.
    const deadline = Date.now() + 10000;
    while (n < top + 100) {
      assert.ok(Date.now() < deadline, `publishing stalled at ${n}`);
      await sleep(10);
    }
    publishing = false;
    await publisher;
    await publish("end");
    const got = await until(inbox, "end");
    const end = got[got.length - 1].offset;
    assert.equal(end, n + 1);
    assert.deepEqual(got.map((m) => m.offset), range(top - 49, end));
    assert.deepEqual(got.slice(0, -1).map((m) => m.data), range(top - 49, n));
    assert.equal(inbox.items.length, 0);
  });

  it("history returns the last messages and the position to continue from", async () => {
    const channel = "chat:hist";
    const bob = client(n2, "bob");
    bob.connect();
    await publishRange(bob, channel, 1, 120);

    const alice = client(n1, "alice");
    alice.connect();
    const reply = await alice.history(channel, { limit: 50 });
    assert.equal(reply.type, "history");
    assert.equal(reply.channel, channel);
    assert.equal(reply.position.offset, 120);
    assert.deepEqual(reply.messages.map((m) => m.data), range(71, 120));
    assert.deepEqual(reply.messages.map((m) => m.offset), range(71, 120));
    assert.ok(reply.messages.every((m) => m.type === "message" && m.epoch === reply.position.epoch && m.from === "bob"));

    // The node's --history-request-limit (80 here) bounds what one request gets.
    assert.deepEqual((await alice.history(channel, { limit: 500 })).messages.map((m) => m.offset), range(41, 120));
    assert.equal((await alice.history(channel)).messages.length, 80);
    const none = await alice.history(channel, { limit: 0 });
    assert.deepEqual([none.messages, none.position], [[], reply.position]);

    // Continuing from the position with since: only what came after.
    await bob.publish(channel, 121);
    const inbox = new Inbox();
    const sub = alice.subscribe(channel, inbox.push, { since: reply.position });
    assert.equal((await sub.ready).recovered, true);
    assert.equal((await inbox.next()).offset, 121);
    assert.equal(inbox.items.length, 0);

    // Refused: a channel without history, one the token does not grant, a bad limit.
    await assert.rejects(alice.history("room:1"), { code: "not_found" });
    const eve = client(n1, "eve", { channels: ["chat:public"] });
    eve.connect();
    await assert.rejects(eve.history(channel), { code: "forbidden" });
    await assert.rejects(alice.history(channel, { limit: -1 }), { code: "bad_request" });
  });
});
