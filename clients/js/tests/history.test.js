// Recovery and presence against real nodes that keep history (`--history`, `--presence`):
// a client that was away gets exactly what it missed, in order, once. Skipped when the
// pushgate binary has no `--history` flag.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { after, before, describe, it } from "node:test";

import { Pushgate } from "../pushgate.js";
import { BIN, Inbox, Node, Redis, WebSocket, next, token } from "./helpers.js";

const supported = existsSync(BIN) && execFileSync(BIN, ["serve", "--help"]).toString().includes("--history");

describe("history channels", { skip: !supported && "this pushgate keeps no history", timeout: 60000 }, () => {
  let redis, n1, n2;
  const clients = [];

  before(async () => {
    redis = await Redis.start();
    const args = ["--history", "chat:*=200/10m", "--presence", "chat:*"];
    n1 = await Node.start({ id: "n1", redis, args });
    n2 = await Node.start({ id: "n2", redis, args });
  });

  after(async () => {
    for (const c of clients) c.close();
    await n1?.kill();
    await n2?.kill();
    await redis?.stop();
  });

  function client(node, sub) {
    const c = new Pushgate(node.url, { WebSocket, getToken: () => token(sub), minDelay: 50, maxDelay: 500 });
    clients.push(c);
    return c;
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
});
