// Join and leave events through the SDK: two nodes on Redis with --presence-events. The SDK
// emits `join` and `leave` for the channels it is subscribed to; events are per user.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Pushgate } from "../pushgate.js";
import { Node, Redis, WebSocket, next, record, sleep, token, SDK } from "./helpers.js";

describe("join and leave events", () => {
  let redis, n1, n2;
  const clients = [];

  before(async () => {
    redis = await Redis.start();
    const args = ["--presence-events", "room:*"];
    n1 = await Node.start({ id: "p1", redis, args });
    n2 = await Node.start({ id: "p2", redis, args });
  });

  after(async () => {
    for (const c of clients) c.close();
    await n1?.kill();
    await n2?.kill();
    await redis?.stop();
  });

  function client(node, sub) {
    const c = new Pushgate(node.url, { ...SDK, getToken: () => token(sub), WebSocket });
    clients.push(c);
    return c;
  }

  async function joined(node, sub, channel) {
    const c = client(node, sub);
    const s = c.subscribe(channel, () => {});
    c.connect();
    await s.ready;
    return c;
  }

  it("reports a user's first connection joining and their last one leaving", async () => {
    const alice = client(n1, "alice");
    const events = record(alice, ["join", "leave"]);
    const own = next(alice, "join", (e) => e.user === "alice");
    const sub = alice.subscribe("room:1", () => {});
    alice.connect();
    await sub.ready;
    const mine = await own;
    assert.deepEqual(mine, { channel: "room:1", user: "alice", session: alice.session.session });

    const bobJoined = next(alice, "join", (e) => e.user === "bob");
    const bob = await joined(n2, "bob", "room:1");
    assert.deepEqual(await bobJoined, { channel: "room:1", user: "bob", session: bob.session.session });

    // A second connection of bob's: nothing. Closing it: nothing, bob is still there.
    const again = await joined(n1, "bob", "room:1");
    const bobs = async () => (await alice.presence("room:1")).clients.filter((c) => c.user === "bob").length;
    assert.equal(await bobs(), 2);
    again.close();
    for (let i = 0; (await bobs()) !== 1; i++) {
      assert.ok(i < 200, "bob's second connection still listed");
      await sleep(25);
    }
    const bobLeft = next(alice, "leave", (e) => e.user === "bob");
    const last = bob.session.session;
    bob.close();
    assert.deepEqual(await bobLeft, { channel: "room:1", user: "bob", session: last });
    // Nothing came in between: no leave for the second connection, no join again.
    assert.deepEqual(
      events.map(({ event, arg }) => `${event} ${arg.user}`),
      ["join alice", "join bob", "leave bob"],
    );
  });

  it("says nothing about channels it is not subscribed to", async () => {
    const carol = client(n1, "carol");
    const events = record(carol, ["join", "leave"]);
    // Its own join may come before or after the ack.
    const own = next(carol, "join", (e) => e.user === "carol");
    const sub = carol.subscribe("room:2", () => {});
    carol.connect();
    await sub.ready;
    await own;
    sub.unsubscribe();
    // Dave comes and goes on room:2 and room:3: carol hears neither.
    const dave = await joined(n2, "dave", "room:3");
    const watcher = await joined(n2, "watcher", "room:2");
    const daveJoined = next(watcher, "join", (e) => e.user === "dave");
    dave.subscribe("room:2", () => {});
    await daveJoined;
    // The join reached the nodes; give carol's node a moment to have passed it on, if it would.
    await sleep(200);
    assert.deepEqual(events.map(({ event, arg }) => `${event} ${arg.user} ${arg.channel}`), ["join carol room:2"]);
  });
});
