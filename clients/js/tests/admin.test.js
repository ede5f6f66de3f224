// The admin console (/admin) in a real browser: Debian's Chromium driven by playwright-core,
// against three nodes on one Redis with an API key. The page is opened on n1; SDK clients (in
// Node) connect to all three nodes. The console signs in with the key, lists the three nodes
// and their deliveries/s under steady traffic, shows a channel's subscribers rising as clients
// join, publishes from its form to the subscribers, and disconnects a user. Screenshots land in
// target/screenshots/ (admin-console.png is the one in docs/). Last, the same console through
// nginx, configured from deploy/nginx, over HTTPS.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { Pushgate } from "../pushgate.js";
import { API_KEY, Inbox, NO_CHROMIUM, Node, ROOT, Redis, SHOTS, WebSocket, freePort, launchChromium, next, sleep, token, SDK } from "./helpers.js";

const NGINX = ["/usr/sbin/nginx", "/usr/bin/nginx"].find((p) => existsSync(p));
const WAIT = 15000;
// Heartbeats carry each node's figures to the others; fast ones keep the test short.
const NODE_ARGS = ["--heartbeat-interval", "300ms", "--presence", "room:*", "--history", "room:*=100/10m"];


describe("admin console in Chromium", { skip: NO_CHROMIUM, timeout: 120000 }, () => {
  let redis, nodes, browser, ticker, nginx, scratch;
  const clients = [];

  before(async () => {
    redis = await Redis.start();
    nodes = await Promise.all(["n1", "n2", "n3"].map((id) => Node.start({ id, redis, args: NODE_ARGS })));
    browser = await launchChromium();
  });

  after(async () => {
    clearInterval(ticker);
    nginx?.kill("SIGKILL");
    if (scratch) rmSync(scratch, { recursive: true, force: true });
    for (const c of clients) c.close();
    await browser?.close();
    for (const n of nodes || []) await n.kill();
    await redis?.stop();
  });

  /** A client of `user` on `node`, subscribed to `channel`; resolves once subscribed. */
  async function join(node, user, channel) {
    // One fixed token: a client disconnected by the server then stays offline.
    const fixed = token(user, { channels: ["room:*"], publish: [] });
    const client = new Pushgate(node.url, { ...SDK, getToken: () => fixed, WebSocket });
    clients.push(client);
    const inbox = new Inbox();
    const sub = client.subscribe(channel, inbox.push);
    client.connect();
    await sub.ready;
    return { client, inbox, user };
  }

  async function shot(page, name, options = {}) {
    await page.screenshot({ path: path.join(SHOTS, name), ...options });
  }

  /** Waits until `selector`'s text is `expected`; says what it was when it times out. */
  async function textIs(page, selector, expected) {
    try {
      await page.waitForFunction(
        ([selector, expected]) => document.querySelector(selector)?.textContent.trim() === expected,
        [selector, expected],
      );
    } catch (err) {
      const got = await page.$eval(selector, (e) => e.textContent.trim()).catch(() => "(absent)");
      throw new Error(`${selector}: "${got}", expected "${expected}": ${err.message}`);
    }
  }

  const subscribers = (channel) => `#channels tr[data-channel="${channel}"] td.subscribers`;

  it("signs in, sees the cluster, follows a channel, publishes to it and disconnects a user", async () => {
    const [n1, n2, n3] = nodes;
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    const errors = [];
    page.on("pageerror", (err) => errors.push(err));

    await page.goto(`${n1.base}/admin`);
    await shot(page, "admin-0-login.png");

    // A wrong key is refused and nothing is shown.
    await page.fill("#api-key", "not-the-key");
    await page.click("#login-button");
    await textIs(page, "#login-error", "That API key was refused.");
    assert.equal(await page.isHidden("#console"), true);

    await page.fill("#api-key", API_KEY);
    await page.click("#login-button");
    await page.waitForSelector("#console", { state: "visible" });
    // The key is kept in memory only: not in the form, storage or cookies.
    assert.deepEqual(
      await page.evaluate(() => [
        document.getElementById("api-key").value,
        localStorage.length,
        sessionStorage.length,
        document.cookie,
      ]),
      ["", 0, 0, ""],
    );

    // Three nodes, each with Redis ready, and their charts.
    await page.waitForFunction(() => document.querySelectorAll("#nodes tbody tr[data-node]").length === 3);
    const ids = await page.$$eval("#nodes tbody tr[data-node]", (rows) => rows.map((r) => r.dataset.node));
    assert.deepEqual(ids, ["n1", "n2", "n3"]);
    for (const id of ids) await textIs(page, `#nodes tr[data-node="${id}"] td:nth-child(7)`, "ready");
    await textIs(page, "#status-text", "live");
    await page.waitForSelector('#charts .chart-card[data-node="n3"] .spark.connections polyline', { state: "attached" });
    await shot(page, "admin-1-nodes.png");

    // Steady traffic: a subscriber of room:ticker on each node, ten messages a second.
    for (const [i, node] of nodes.entries()) await join(node, `ticker${i + 1}`, "room:ticker");
    let tick = 0;
    ticker = setInterval(() => {
      n1.api("/api/publish", { channel: "room:ticker", data: { tick: tick++ } }).catch(() => {});
    }, 100);
    // Every node's deliveries/s comes from two samples of its counter (heartbeats for n2, n3).
    for (const id of ids) {
      await page.waitForFunction(
        (id) => Number(document.querySelector(`#nodes tr[data-node="${id}"] td:nth-child(5)`)?.textContent) > 0,
        id,
      );
    }

    // Subscribers rise as clients join, on every node.
    const alice = await join(n1, "alice", "room:lobby");
    await textIs(page, subscribers("room:lobby"), "1");
    const bob = await join(n2, "bob", "room:lobby");
    const carol = await join(n3, "carol", "room:lobby");
    await textIs(page, subscribers("room:lobby"), "3");
    const dave = await join(n2, "dave", "room:lobby");
    await join(n3, "erin", "room:quiet");
    await textIs(page, subscribers("room:lobby"), "4");
    await textIs(page, subscribers("room:quiet"), "1");
    await textIs(page, '#channels tr[data-channel="room:lobby"] td:nth-child(3)', "3"); // nodes
    const order = await page.$$eval("#channels tbody tr[data-channel]", (rows) => rows.map((r) => r.dataset.channel));
    assert.deepEqual(order, ["room:lobby", "room:ticker", "room:quiet"]);
    await textIs(page, '#nodes tr[data-node="n2"] td.connections', "3");

    // The channel: who is there, and its (empty) history.
    await page.click('#channels tr[data-channel="room:lobby"]');
    await textIs(page, "#channel-title", "room:lobby");
    await page.waitForFunction(() => document.querySelectorAll("#presence li").length === 4);
    const present = await page.$$eval("#presence li", (lis) => lis.map((li) => li.dataset.user));
    assert.deepEqual(present, ["alice", "bob", "carol", "dave"]);
    await textIs(page, "#history-note", "No messages in history.");

    // Publish from the form: every subscriber, on every node, receives it; history shows it.
    await page.fill("#publish-data", '{"text": "hello from the console"}');
    await page.click("#publish-button");
    await page.waitForSelector('#publish-result:has-text("Published to room:lobby at offset 1")');
    for (const { inbox, user } of [alice, bob, carol, dave]) {
      const msg = await inbox.next();
      assert.equal(msg.channel, "room:lobby", user);
      assert.deepEqual(msg.data, { text: "hello from the console" }, user);
    }
    await page.fill("#publish-data", "plain text goes out as a string");
    await page.click("#publish-button");
    await page.waitForSelector('#publish-result:has-text("at offset 2")');
    assert.equal((await carol.inbox.next()).data, "plain text goes out as a string");
    await page.waitForFunction(() => document.querySelectorAll("#history li").length === 2);
    const history = await page.$$eval("#history li code", (codes) => codes.map((c) => c.textContent));
    assert.deepEqual(history, ["plain text goes out as a string", '{"text":"hello from the console"}']);
    await shot(page, "admin-2-channel.png");

    // Disconnect bob (connected to n2) from the form on n1: his client is closed with 4003.
    const closed = next(bob.client, "disconnected");
    await page.click('#presence li[data-user="bob"] .user'); // fills in the form
    assert.equal(await page.inputValue("#disconnect-user"), "bob");
    await page.click("#disconnect-button");
    await page.waitForSelector('#disconnect-result:has-text("Disconnected bob")');
    const info = await closed;
    assert.equal(info.code, 4003);
    assert.equal(info.reconnect, false);
    await textIs(page, subscribers("room:lobby"), "3");
    await page.waitForFunction(() => !document.querySelector('#presence li[data-user="bob"]'));
    await textIs(page, '#nodes tr[data-node="n2"] td.connections', "2");
    await shot(page, "admin-3-disconnected.png");
    await shot(page, "admin-console.png", { fullPage: true });

    // An API error shows in the form, naming its cause.
    await page.fill("#disconnect-user", "has space");
    await page.click("#disconnect-button");
    await page.waitForSelector('#disconnect-error:has-text("field: user")');

    // Signing out forgets the key: the console is gone until it is typed again.
    await page.click("#sign-out");
    await page.waitForSelector("#login", { state: "visible" });
    assert.equal(await page.isHidden("#console"), true);

    assert.deepEqual(errors, []);
    await context.close();
  });
  /** Starts nginx from deploy/nginx/pushgate.conf.template in front of the nodes; its HTTPS base. */
  async function startNginx() {
    scratch = mkdtempSync(path.join(os.tmpdir(), "pushgate-admin-nginx-"));
    execFileSync("sh", [path.join(ROOT, "deploy/tls/make-certs.sh"), path.join(scratch, "certs")]);
    const https = await freePort();
    const env = {
      PATH: process.env.PATH,
      NGINX_UPSTREAMS: nodes.map((n) => `127.0.0.1:${n.port}`).join(" "),
      NGINX_HTTPS_LISTEN: `127.0.0.1:${https}`,
      NGINX_HTTP_LISTEN: `127.0.0.1:${await freePort()}`,
      NGINX_TLS_CERT: path.join(scratch, "certs/server.crt"),
      NGINX_TLS_KEY: path.join(scratch, "certs/server.key"),
      NGINX_PID: path.join(scratch, "nginx.pid"),
      NGINX_TEMP_DIR: scratch,
      NGINX_ERROR_LOG: path.join(scratch, "error.log"),
      NGINX_ACCESS_LOG: path.join(scratch, "access.log"),
      NGINX_WORKER_PROCESSES: "1",
      NGINX_WORKER_CONNECTIONS: "512",
      NGINX_WORKER_RLIMIT_NOFILE: "1024",
      NGINX_WORKER_SHUTDOWN_TIMEOUT: "5s",
    };
    const conf = path.join(scratch, "nginx.conf");
    execFileSync("bash", [path.join(ROOT, "deploy/nginx/render.sh"), conf], { env });
    nginx = spawn(NGINX, ["-c", conf, "-p", scratch, "-e", env.NGINX_ERROR_LOG, "-g", "daemon off;"], { stdio: "ignore" });
    let exited = false;
    nginx.once("exit", () => (exited = true));
    const deadline = Date.now() + WAIT;
    const listening = () =>
      new Promise((resolve) => {
        const socket = net.connect(https, "127.0.0.1", () => {
          socket.end();
          resolve(true);
        });
        socket.on("error", () => resolve(false));
      });
    while (!(await listening())) {
      if (exited || Date.now() > deadline) throw new Error("nginx did not start (see its error.log)");
      await sleep(25);
    }
    return `https://localhost:${https}`;
  }

  // After the test above: its room:ticker subscribers and traffic are still there.
  it("works through nginx", { skip: !NGINX && "no nginx" }, async () => {
    const base = await startNginx();
    // The test CA is not one the browser trusts.
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, ignoreHTTPSErrors: true });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    const errors = [];
    page.on("pageerror", (err) => errors.push(err));
    await page.goto(`${base}/admin`);
    await page.fill("#api-key", API_KEY);
    await page.click("#login-button");
    await page.waitForSelector("#console", { state: "visible" });
    // Each refresh may be answered by another node; every one sees the whole cluster.
    await page.waitForFunction(() => document.querySelectorAll("#nodes tbody tr[data-node]").length === 3);
    await page.waitForSelector('#channels tr[data-channel="room:ticker"]');
    await page.click('#channels tr[data-channel="room:ticker"]');
    await page.waitForFunction(() => document.querySelectorAll("#presence li").length === 3);
    await page.waitForSelector("#history li");
    await shot(page, "admin-4-nginx.png");
    assert.deepEqual(errors, []);
    await context.close();
  });
});
