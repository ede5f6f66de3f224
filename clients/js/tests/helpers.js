// Test kit for the SDK: real `pushgate serve` processes, a real `redis-server`, tokens, and
// waits on client events. Every wait has a timeout; nothing sleeps blindly.

import { spawn } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { existsSync, mkdirSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

export { WebSocket };

/** Options every test client gets: `PUSHGATE_SDK_BATCH=0` runs the tests without batches. */
export const SDK = { batch: process.env.PUSHGATE_SDK_BATCH !== "0" };

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.PUSHGATE_BIN || path.join(ROOT, "target/debug/pushgate");
export const SECRET = "pushgate-js-test-secret";
export const API_KEY = "pushgate-js-test-api-key";
/** How long any single expected event may take. */
export const WAIT = 10000;

// Browser tests: Debian's Chromium driven by playwright-core; screenshots in target/screenshots/.
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const SHOTS = path.join(ROOT, "target/screenshots");
/** Why the browser tests are skipped (no Chromium here), or false; in CI a missing one is an error. */
export const NO_CHROMIUM = !existsSync(CHROMIUM) && `no Chromium at ${CHROMIUM}`;
if (NO_CHROMIUM && process.env.CI) throw new Error(`${NO_CHROMIUM} (apt-get install chromium)`);

/** A headless Chromium on a new, temporary user-data-dir. */
export async function launchChromium() {
  const { chromium } = await import("playwright-core");
  mkdirSync(SHOTS, { recursive: true });
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
}

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function b64url(value) {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

/** An HS256 JWT over `claims`, signed with `secret`. */
export function sign(claims, secret = SECRET) {
  const head = b64url({ alg: "HS256", typ: "JWT" }) + "." + b64url(claims);
  return head + "." + createHmac("sha256", secret).update(head).digest("base64url");
}

/** A token for `sub`: every channel by default, valid `ttl` seconds; unique on every call. */
export function token(sub, { channels = ["*"], publish = ["*"], ttl = 3600, secret } = {}) {
  const now = Math.floor(Date.now() / 1000);
  return sign({ sub, iat: now, exp: now + ttl, channels, publish, jti: randomUUID() }, secret);
}

/** Resolves with the arguments of the next `event` of `client` that passes `check`. */
export function next(client, event, check = () => true, timeout = WAIT) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeout} ms waiting for "${event}"`));
    }, timeout);
    const off = client.on(event, (...args) => {
      if (!check(...args)) return;
      clearTimeout(timer);
      off();
      resolve(args.length > 1 ? args : args[0]);
    });
  });
}

/** Records every event of a client, for assertions after the fact. */
export function record(client, events) {
  const log = [];
  for (const event of events) client.on(event, (arg) => log.push({ event, arg, at: Date.now() }));
  return log;
}

/** A queue of deliveries, for an onMessage callback: `await inbox.next()`. */
export class Inbox {
  constructor() {
    this.items = [];
    this.waiters = [];
    this.push = (item) => {
      const waiter = this.waiters.shift();
      if (waiter) waiter(item);
      else this.items.push(item);
    };
  }

  next(timeout = WAIT) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve, reject) => {
      const waiter = (item) => {
        clearTimeout(timer);
        resolve(item);
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error(`timed out after ${timeout} ms waiting for a message`));
      }, timeout);
      this.waiters.push(waiter);
    });
  }
}

async function until(what, check, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    if (await check()) return;
    await sleep(25);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function watchExit(child) {
  child.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  children.add(child);
  child.exited.then(() => children.delete(child));
}

/** A `redis-server` of our own on a free port, with nothing on disk. */
export class Redis {
  static async start() {
    for (let i = 0; i < 10; i++) {
      const redis = new Redis(await freePort());
      if (await redis.launch()) return redis;
    }
    throw new Error("redis-server found no free port in 10 tries");
  }

  constructor(port) {
    this.port = port;
    this.url = `redis://127.0.0.1:${port}/`;
  }

  async launch() {
    const child = spawn(
      "redis-server",
      ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      { stdio: "ignore" },
    );
    watchExit(child);
    this.child = child;
    let gone = false;
    child.exited.then(() => (gone = true));
    const deadline = Date.now() + WAIT;
    while (Date.now() < deadline && !gone) {
      if (await this.ping()) return true;
      await sleep(25);
    }
    child.kill("SIGKILL");
    return false;
  }

  ping() {
    return new Promise((resolve) => {
      const socket = net.connect(this.port, "127.0.0.1");
      let reply = "";
      socket.setTimeout(1000, () => socket.destroy());
      socket.on("connect", () => socket.write("PING\r\n"));
      socket.on("data", (d) => {
        reply += d;
        if (reply.includes("\r\n")) socket.end();
      });
      socket.on("close", () => resolve(reply.startsWith("+PONG")));
      socket.on("error", () => {});
    });
  }

  async stop() {
    if (!this.child) return;
    this.child.kill("SIGKILL");
    await this.child.exited;
    this.child = null;
  }
}

/** A `pushgate serve` process. Restarts keep its port and instance ID. */
export class Node {
  static async start(options = {}) {
    const node = new Node(options.port || (await freePort()), options);
    await node.start();
    return node;
  }

  constructor(port, { id = "n" + port, redis, args = [] } = {}) {
    if (!existsSync(BIN)) throw new Error(`no pushgate binary at ${BIN}: run cargo build -p pushgate`);
    this.port = port;
    this.id = id;
    this.redis = redis;
    this.args = args;
    this.base = `http://127.0.0.1:${port}`;
    this.url = `ws://127.0.0.1:${port}/ws`;
    this.log = "";
  }

  async start() {
    const args = ["serve", "--listen", `127.0.0.1:${this.port}`, "--instance-id", this.id];
    args.push("--jwt-secret", SECRET, "--api-key", API_KEY, "--drain-period", "1s");
    if (this.redis) args.push("--redis-url", this.redis.url);
    args.push(...this.args);
    const env = { ...process.env, PUSHGATE_LOG: process.env.PUSHGATE_LOG || "warn" };
    for (const key of Object.keys(env)) {
      if (key.startsWith("PUSHGATE_") && key !== "PUSHGATE_LOG") delete env[key];
    }
    const child = spawn(BIN, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    watchExit(child);
    const keep = (d) => {
      this.log = (this.log + d).slice(-20000);
    };
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    this.child = child;
    let exited = null;
    child.exited.then((status) => (exited = status));
    await until(`node ${this.id} to be ready`, async () => {
      if (exited) throw new Error(`pushgate exited (${JSON.stringify(exited)}):\n${this.log}`);
      try {
        return (await fetch(this.base + "/readyz")).status === 200;
      } catch {
        return false;
      }
    });
    return this;
  }

  /** Sends `signal` (SIGKILL by default) and, unless it only pauses, waits for the exit. */
  async kill(signal = "SIGKILL") {
    const child = this.child;
    if (!child) return;
    child.kill(signal);
    if (signal === "SIGSTOP" || signal === "SIGCONT") return;
    await child.exited;
    this.child = null;
  }

  async restart() {
    await this.kill();
    await this.start();
  }

  /** POSTs `body` to the server API; returns the JSON reply. */
  async api(path, body) {
    const res = await fetch(this.base + path, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify(body),
    });
    if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
    return res.json();
  }
}
