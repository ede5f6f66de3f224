// Reconnects: a killed and restarted node, a cluster, draining (1001), the server's
// disconnect (4003), token expiry (4001) and refresh, refused tokens, and the heartbeat
// watchdog. Real pushgate processes; Redis for the cluster cases.

import assert from "node:assert/strict";
import { after, describe, it } from "node:test";

/** Every case gets a time limit of its own. */
const test = (name, fn) => it(name, { timeout: 30000 }, fn);

import { Pushgate, decodeToken } from "../pushgate.js";
import { Inbox, Node, Redis, WebSocket, next, record, sleep, token, SDK } from "./helpers.js";

/** A WebSocket that tells as little as a browser does: no HTTP status, no network error. */
class BrowserLikeWebSocket extends WebSocket {
  set onerror(fn) {
    super.onerror = fn && (() => fn({ type: "error" }));
  }

  get onerror() {
    return super.onerror;
  }
}

const FAST = { minDelay: 50, maxDelay: 500, goingAwayJitter: 200 };
const cleanup = [];

after(async () => {
  for (const fn of cleanup.reverse()) await fn();
});

async function node(options) {
  const n = await Node.start(options);
  cleanup.push(() => n.kill());
  return n;
}

function client(url, options) {
  const c = new Pushgate(url, { ...SDK, WebSocket, ...FAST, ...options });
  cleanup.push(() => c.close());
  return c;
}

async function connected(c) {
  const welcome = next(c, "connected");
  c.connect();
  return welcome;
}

describe("reconnect", { timeout: 60000 }, () => {
  test("comes back after the node is killed and restarted on the same port, and resubscribes", async () => {
    const n = await node();
    // One token for every attempt, and a browser's view of failed handshakes: the node
    // being down must not be taken for a refused token.
    const fixed = token("alice");
    let calls = 0;
    const alice = client(n.url, {
      WebSocket: BrowserLikeWebSocket,
      getToken: () => (calls++, fixed),
    });
    const inbox = new Inbox();
    const sub = alice.subscribe("room:1", inbox.push);
    await connected(alice);
    await sub.ready;
    const log = record(alice, ["disconnected", "state", "error"]);

    const lost = next(alice, "disconnected");
    await n.kill();
    const info = await lost;
    assert.equal(info.code, 1006);
    assert.equal(info.connected, true);
    assert.equal(info.reconnect, true);
    assert.equal(alice.state, "reconnecting");

    // Several failed attempts with the same token while the node is down.
    for (let i = 0; i < 4; i++) {
      await next(alice, "disconnected", (d) => !d.connected && d.reconnect);
    }
    const back = next(alice, "connected");
    const resubscribed = next(alice, "subscribed");
    await n.start();
    assert.equal((await back).reconnected, true);
    assert.deepEqual(await resubscribed, {
      channel: "room:1",
      resubscribed: true,
      recovered: false,
      position: null,
    });
    assert.equal(alice.state, "connected");
    assert.ok(calls >= 5, `getToken was called ${calls} times`);
    assert.deepEqual(
      log.filter((e) => e.event === "state").map((e) => e.arg),
      ["reconnecting", "connected"],
    );
    assert.ok(!log.some((e) => e.event === "error"), JSON.stringify(log));

    const bob = client(n.url, { getToken: () => token("bob") });
    bob.connect();
    await bob.publish("room:1", "after restart");
    assert.equal((await inbox.next()).data, "after restart");
  });

  test("delivers across a cluster and keeps doing so after one node restarts", async () => {
    const redis = await Redis.start();
    cleanup.push(() => redis.stop());
    const n1 = await node({ id: "n1", redis });
    const n2 = await node({ id: "n2", redis });
    const alice = client(n1.url, { getToken: () => token("alice") });
    const bob = client(n2.url, { getToken: () => token("bob") });
    const toAlice = new Inbox();
    const toBob = new Inbox();
    const subscribed = [alice.subscribe("room:c", toAlice.push).ready, bob.subscribe("room:c", toBob.push).ready];
    alice.connect();
    bob.connect();
    await Promise.all(subscribed);

    await bob.publish("room:c", "from n2");
    assert.equal((await toAlice.next()).data, "from n2");
    assert.equal((await toBob.next()).data, "from n2");

    const lost = next(alice, "disconnected");
    const back = next(alice, "subscribed", (s) => s.resubscribed);
    await n1.kill();
    await lost;
    await n1.start();
    await back;
    assert.equal(alice.session.node, "n1");
    await alice.publish("room:c", "from n1 again");
    assert.equal((await toBob.next()).data, "from n1 again");
    assert.equal((await toAlice.next()).data, "from n1 again");
    await bob.publish("room:c", "from n2 again");
    assert.equal((await toAlice.next()).data, "from n2 again");
  });

  test("1001 (draining): reconnects at once, with jitter, to another node", async () => {
    const redis = await Redis.start();
    cleanup.push(() => redis.stop());
    const n1 = await node({ id: "n1", redis });
    const n2 = await node({ id: "n2", redis });
    const urls = [n1.url, n2.url];
    let attempt = 0;
    // Like a load balancer: each attempt goes to the next node.
    const alice = client(() => urls[attempt++ % 2], {
      getToken: () => token("alice"),
      minDelay: 5000,
      goingAwayJitter: 300,
    });
    const inbox = new Inbox();
    const sub = alice.subscribe("room:d", inbox.push);
    assert.equal((await connected(alice)).node, "n1");
    await sub.ready;

    // Every wait is set up before the SIGTERM: kill() returns once the node has drained and
    // exited, by which time the client may be back on n2.
    const drained = next(alice, "disconnected");
    const back = next(alice, "connected");
    const resubscribed = next(alice, "subscribed", (s) => s.resubscribed && s.channel === "room:d");
    const started = Date.now();
    await n1.kill("SIGTERM");
    const info = await drained;
    assert.equal(info.code, 1001);
    assert.equal(info.reason, "node draining, reconnect elsewhere");
    assert.equal(info.reconnect, true);
    assert.ok(info.delay >= 0 && info.delay < 300, `delay ${info.delay}`);
    assert.equal((await back).node, "n2");
    const { at } = await resubscribed.then(() => ({ at: Date.now() }));
    assert.ok(at - started < 3000, "reconnected without a backoff");

    const bob = client(n2.url, { getToken: () => token("bob") });
    bob.connect();
    await bob.publish("room:d", "on n2");
    assert.equal((await inbox.next()).data, "on n2");
  });

  test("4003 (disconnected by the server): stays offline when getToken gives the same token", async () => {
    const n = await node();
    const fixed = token("mallory");
    const mallory = client(n.url, { getToken: () => fixed });
    await connected(mallory);
    const closed = next(mallory, "disconnected");
    const error = next(mallory, "error");
    const offline = next(mallory, "state", (s) => s === "offline");
    assert.equal((await n.api("/api/disconnect", { user: "mallory" })).closed_on_this_node, 1);
    const info = await closed;
    assert.equal(info.code, 4003);
    assert.equal(info.reason, "disconnected by server");
    assert.equal(info.reconnect, false);
    assert.equal((await error).code, "disconnected");
    await offline;
    await assert.rejects(mallory.publish("room:1", 1), { code: "closed" });
    await sleep(300);
    assert.equal(mallory.state, "offline");
  });

  test("4003: reconnects when getToken yields a new token", async () => {
    const n = await node();
    const trent = client(n.url, { getToken: () => token("trent") });
    trent.subscribe("room:t", () => {});
    await connected(trent);
    const closed = next(trent, "disconnected");
    const back = next(trent, "connected");
    await n.api("/api/disconnect", { user: "trent" });
    const info = await closed;
    assert.equal(info.code, 4003);
    assert.equal(info.reconnect, true);
    assert.equal((await back).reconnected, true);
  });

  test("4001 (token expired): calls getToken and reconnects", async () => {
    const n = await node({ args: ["--jwt-leeway", "0s"] });
    const tokens = [token("peggy", { ttl: 2 }), token("peggy")];
    let calls = 0;
    const peggy = client(n.url, { getToken: () => tokens[Math.min(calls++, 1)], refresh: false });
    peggy.subscribe("room:p", () => {});
    await connected(peggy);
    const expired = next(peggy, "disconnected");
    const back = next(peggy, "connected");
    const info = await expired;
    assert.equal(info.code, 4001);
    assert.equal(info.reason, "token expired");
    assert.equal(info.reconnect, true);
    assert.equal((await back).reconnected, true);
    assert.equal(calls, 2);
    assert.equal((await peggy.publish("room:p", 1)).type, "ack");
  });

  test("refreshes the token before it expires, keeping the connection", async () => {
    const n = await node({ args: ["--jwt-leeway", "0s"] });
    const first = token("victor", { ttl: 4 });
    const firstExp = decodeToken(first).exp;
    let calls = 0;
    const victor = client(n.url, {
      getToken: () => (calls++ === 0 ? first : token("victor")),
    });
    const inbox = new Inbox();
    victor.subscribe("room:v", inbox.push);
    const log = record(victor, ["disconnected"]);
    await connected(victor);
    const refreshed = await next(victor, "refreshed");
    assert.ok(refreshed.exp > firstExp + 60);
    // Past the first token's expiry the connection is still the same one.
    await sleep(Math.max(0, firstExp * 1000 + 1500 - Date.now()));
    assert.deepEqual(log, []);
    assert.equal(victor.state, "connected");
    await victor.publish("room:v", "still here");
    assert.equal((await inbox.next()).data, "still here");
    assert.equal(calls, 2);
  });

  test("gives up on a token the server refuses (with Node's view of the 401)", async () => {
    const n = await node();
    const bad = token("eve", { secret: "another-secret" });
    let calls = 0;
    const eve = client(n.url, { getToken: () => (calls++, bad), authRetries: 3 });
    const error = next(eve, "error", (e) => e.code === "unauthorized");
    const offline = next(eve, "state", (s) => s === "offline");
    eve.connect();
    assert.match((await error).message, /refused/);
    await offline;
    assert.equal(calls, 4);
  });

  test("gives up on a refused token with a browser's view, asking the server over HTTP", async () => {
    const n = await node();
    const bad = token("eve", { secret: "another-secret" });
    const eve = client(n.url, { WebSocket: BrowserLikeWebSocket, getToken: () => bad });
    const error = next(eve, "error", (e) => e.code === "unauthorized");
    eve.connect();
    assert.match((await error).message, /invalid signature/);
    assert.equal(eve.state, "offline");
  });

  test("a refused token is replaced when getToken yields a new one", async () => {
    const n = await node();
    const tokens = [token("ivan", { secret: "another-secret" }), token("ivan")];
    let calls = 0;
    const ivan = client(n.url, { getToken: () => tokens[Math.min(calls++, 1)] });
    const failed = next(ivan, "disconnected", (d) => !d.connected);
    const welcome = next(ivan, "connected");
    ivan.connect();
    assert.equal((await failed).reconnect, true);
    assert.equal((await welcome).user, "ivan");
  });

  test("the heartbeat watchdog replaces a connection that went silent", async () => {
    const n = await node({ args: ["--ping-interval", "1s"] });
    const walter = client(n.url, {
      getToken: () => token("walter"),
      pingGrace: 1000,
      connectTimeout: 1000,
    });
    const sub = walter.subscribe("room:w", () => {});
    const welcome = await connected(walter);
    assert.equal(welcome.pingInterval, 1000);
    await sub.ready;
    const dead = next(walter, "disconnected");
    // A paused process keeps its sockets open and says nothing: a half-open connection.
    await n.kill("SIGSTOP");
    const started = Date.now();
    const info = await dead;
    assert.equal(info.code, 1006);
    assert.match(info.reason, /heartbeat timeout/);
    // Silent for ping interval + grace, and a ping unanswered for the grace.
    assert.ok(Date.now() - started < 3500, "detected within ping interval + 2 × grace");
    // Attempts to the paused node time out; once it resumes, the client is back.
    await next(walter, "disconnected", (d) => /no welcome/.test(d.reason));
    const back = next(walter, "connected");
    await n.kill("SIGCONT");
    assert.equal((await back).reconnected, true);
    await next(walter, "subscribed", (s) => s.resubscribed);
  });
});
