// Pages on another origin, in a real browser: Debian's Chromium driven by playwright-core.
// Two tiny node:http servers serve the same page on two origins (http://127.0.0.1:A and
// http://127.0.0.1:B, different ports, so different origins); a gateway node on a third port
// lists only the first in --allowed-origins, and a second node keeps the default (any origin).
// An EventSource from the listed origin receives messages and resumes with Last-Event-ID after
// the server ends its stream; from the other one the browser gets a 403 without CORS headers
// and nothing arrives. withCredentials works only with a listed origin (an exact
// Access-Control-Allow-Origin), and the SDK module loads across origins like the stream.
// Screenshots land in target/screenshots/.

import assert from "node:assert/strict";

import http from "node:http";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { NO_CHROMIUM, Node, SHOTS, launchChromium, sleep, token } from "./helpers.js";

const WAIT = 15000;


// The page: a log of what each EventSource (by tag) saw, kept in `window.seen` and shown.
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>pushgate across origins</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 16px; }
  li { font-family: ui-monospace, monospace; white-space: pre-wrap; }
  li.error, li.failed { color: #b00020; }
  li.message { color: #0a6b2d; }
</style>
<h1>Page on <code id="origin"></code></h1>
<ul id="log"></ul>
<script>
  document.getElementById("origin").textContent = location.origin;
  window.seen = [];
  window.note = (tag, kind, data) => {
    seen.push({ tag, kind, data });
    const li = document.createElement("li");
    li.className = kind;
    li.textContent = tag + " · " + kind + (data === undefined ? "" : " · " + data);
    document.getElementById("log").append(li);
  };
  window.streams = {};
  window.listen = (tag, url, init) => {
    const es = new EventSource(url, init);
    streams[tag] = es;
    for (const name of ["welcome", "subscribed", "close"]) {
      es.addEventListener(name, (ev) => note(tag, name, ev.data));
    }
    es.onmessage = (ev) => note(tag, "message", JSON.stringify({ id: ev.lastEventId, frame: JSON.parse(ev.data) }));
    es.onerror = () => note(tag, "error", "readyState " + es.readyState);
  };
</script>
`;

/** A server of the page on a port of its own: an origin of its own. */
function pageServer() {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(PAGE);
  });
  return new Promise((resolve, reject) => {
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.origin = `http://127.0.0.1:${server.address().port}`;
      resolve(server);
    });
  });
}

describe("pages on another origin in Chromium", { skip: NO_CHROMIUM, timeout: 120000 }, () => {
  let listed, other, gw, open, browser;

  before(async () => {
    listed = await pageServer();
    other = await pageServer();
    // Only the first page origin may use gw; open allows any origin (the default). Both keep
    // history on room:*, so that a stream resumes from its Last-Event-ID.
    gw = await Node.start({ id: "gw", args: ["--allowed-origins", listed.origin, "--history", "room:*=100/10m"] });
    open = await Node.start({ id: "open", args: ["--history", "room:*=100/10m"] });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await gw?.kill();
    await open?.kill();
    listed?.close();
    other?.close();
  });

  async function visit(server) {
    const context = await browser.newContext({ viewport: { width: 900, height: 420 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    const errors = [];
    const logged = [];
    page.on("pageerror", (err) => errors.push(err));
    page.on("console", (msg) => logged.push(msg.text()));
    await page.goto(server.origin + "/");
    return { page, errors, logged };
  }

  /** The events of stream `tag` seen so far, as {kind, data} (data parsed where JSON). */
  async function seen(page, tag) {
    const all = await page.evaluate(() => window.seen);
    return all
      .filter((e) => e.tag === tag)
      .map(({ kind, data }) => {
        try {
          return { kind, data: JSON.parse(data) };
        } catch {
          return { kind, data };
        }
      });
  }

  /** Waits for the `count`-th event of `kind` on stream `tag`, and returns it. */
  async function saw(page, tag, kind, count = 1) {
    await page.waitForFunction(
      ([tag, kind, count]) => window.seen.filter((e) => e.tag === tag && e.kind === kind).length >= count,
      [tag, kind, count],
    );
    return (await seen(page, tag)).filter((e) => e.kind === kind)[count - 1].data;
  }

  function sse(node, user, channel = "room:1") {
    return `${node.base}/sse?channel=${channel}&token=${token(user)}`;
  }

  function publish(node, channel, data) {
    return node.api("/api/publish", { channel, data });
  }

  async function shot(page, name) {
    await page.screenshot({ path: path.join(SHOTS, name) });
  }

  it("an EventSource from a listed origin receives messages, and resumes across a reconnect", async () => {
    const { page, errors } = await visit(listed);
    await page.evaluate(([note]) => window.note("page", "setup", note), [`${gw.base} allows ${listed.origin}`]);
    await page.evaluate(([url]) => window.listen("es", url), [sse(gw, "alice")]);
    assert.equal((await saw(page, "es", "welcome")).user, "alice");
    assert.equal((await saw(page, "es", "subscribed")).channel, "room:1");

    await publish(gw, "room:1", { text: "hello across origins" });
    const first = await saw(page, "es", "message");
    assert.deepEqual(first.frame.data, { text: "hello across origins" });
    const [epoch, offset] = first.id.split(":");
    assert.equal(first.id, `${first.frame.epoch}:${first.frame.offset}`, "the event ID is the position");

    // The server ends the stream (4003); the EventSource reconnects on its own, across origins,
    // with Last-Event-ID (Chromium exempts EventSource from a preflight for it; a fetch-based
    // client sending it is preflighted, see crates/gateway/tests/cors.rs). What was published
    // meanwhile comes back from history.
    await gw.api("/api/disconnect", { user: "alice" });
    assert.equal((await saw(page, "es", "close")).code, 4003);
    await publish(gw, "room:1", { text: "said while reconnecting" });
    const resumed = await saw(page, "es", "subscribed", 2);
    assert.equal(resumed.recovered, true, JSON.stringify(resumed));
    const second = await saw(page, "es", "message", 2);
    assert.deepEqual(second.frame.data, { text: "said while reconnecting" });
    assert.equal(second.id, `${epoch}:${Number(offset) + 1}`);
    await shot(page, "cors-1-listed-origin.png");

    await page.evaluate(() => window.streams.es.close());
    assert.deepEqual(errors, []);
    await page.context().close();
  });

  it("an EventSource from an origin that is not listed is refused and receives nothing", async () => {
    const { page, errors, logged } = await visit(other);
    await page.evaluate(([note]) => window.note("page", "setup", note), [`${gw.base} allows only ${listed.origin}`]);
    await page.evaluate(([url]) => window.listen("es", url), [sse(gw, "bob")]);
    assert.equal(await saw(page, "es", "error"), "readyState 2", "a CORS failure closes the EventSource for good");
    await publish(gw, "room:1", { text: "not for other origins" });
    await sleep(500);
    assert.deepEqual(await seen(page, "es"), [{ kind: "error", data: "readyState 2" }]);
    assert.ok(
      logged.some((line) => /blocked by CORS policy/.test(line) && line.includes(other.origin)),
      logged.join("\n"),
    );
    // The refusal is the gateway's: 403 "origin not allowed", without CORS headers.
    const refused = await fetch(sse(gw, "bob"), { headers: { origin: other.origin } });
    assert.equal(refused.status, 403);
    assert.equal((await refused.json()).reason, "origin not allowed");
    assert.equal(refused.headers.get("access-control-allow-origin"), null);
    await shot(page, "cors-2-other-origin-refused.png");

    assert.deepEqual(errors, []);
    await page.context().close();
  });

  it("a fetch-based SSE client sends its token and Last-Event-ID as headers, after a preflight", async () => {
    // Authorization and Last-Event-ID are not CORS-safelisted: Chromium asks with OPTIONS first.
    const first = await publish(gw, "room:5", { text: "first" });
    await publish(gw, "room:5", { text: "second, via fetch" });
    const read = ([url, tok, lastId]) => {
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), 10000);
      const headers = { authorization: "Bearer " + tok, "last-event-id": lastId };
      return fetch(url, { headers, signal: abort.signal })
        .then(async (res) => {
          const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
          let text = "";
          while (!text.includes("second, via fetch")) {
            const { value, done } = await reader.read();
            if (done) break;
            text += value;
          }
          window.note("fetch", "stream", `${res.status} ${text.split("\n").filter((l) => l.startsWith("event:") || l.startsWith("id:")).join(" | ")}`);
          return { status: res.status, text };
        })
        .catch((err) => {
          window.note("fetch", "failed", String(err));
          return { failed: String(err) };
        })
        .finally(() => {
          clearTimeout(timer);
          abort.abort();
        });
    };
    const args = [`${gw.base}/sse?channel=room:5`, token("erin"), `${first.epoch}:${first.offset}`];

    const { page, errors } = await visit(listed);
    const got = await page.evaluate(read, args);
    assert.equal(got.status, 200, JSON.stringify(got));
    assert.match(got.text, /event: subscribed\ndata: \{[^\n]*"recovered":true/);
    assert.match(got.text, /second, via fetch/);
    assert.doesNotMatch(got.text, /"first"/, "resumed after the Last-Event-ID");
    await shot(page, "cors-3-fetch-preflight.png");
    await page.context().close();

    const refused = await visit(other);
    const failed = await refused.page.evaluate(read, args);
    assert.match(failed.failed || "", /Failed to fetch/, JSON.stringify(failed));
    assert.deepEqual([...errors, ...refused.errors], []);
    await refused.page.context().close();
  });

  it("withCredentials needs a listed origin: a wildcard answer is not enough", async () => {
    const { page, errors } = await visit(other);
    // open allows any origin with "*": plain streams work, credentialed ones do not.
    await page.evaluate(
      ([plain, withCredentials]) => {
        window.listen("plain", plain);
        window.listen("credentials", withCredentials, { withCredentials: true });
      },
      [sse(open, "carol", "room:2"), sse(open, "carol", "room:2")],
    );
    assert.equal((await saw(page, "plain", "subscribed")).channel, "room:2");
    assert.equal(await saw(page, "credentials", "error"), "readyState 2");
    await publish(open, "room:2", { text: "to any origin" });
    assert.deepEqual((await saw(page, "plain", "message")).frame.data, { text: "to any origin" });
    assert.ok(!(await seen(page, "credentials")).some((e) => e.kind === "message"));
    await shot(page, "cors-4-wildcard-credentials.png");
    await page.evaluate(() => window.streams.plain.close());
    await page.context().close();

    // gw echoes the listed origin and allows credentials.
    const listedPage = await visit(listed);
    await listedPage.page.evaluate(
      ([url]) => window.listen("credentials", url, { withCredentials: true }),
      [sse(gw, "carol", "room:3")],
    );
    assert.equal((await saw(listedPage.page, "credentials", "subscribed")).channel, "room:3");
    await publish(gw, "room:3", { text: "with credentials" });
    assert.deepEqual((await saw(listedPage.page, "credentials", "message")).frame.data, { text: "with credentials" });
    await listedPage.page.evaluate(() => window.streams.credentials.close());
    assert.deepEqual([...errors, ...listedPage.errors], []);
    await listedPage.page.context().close();
  });

  it("the SDK module loads from the gateway on a listed origin only", async () => {
    const { page, errors } = await visit(listed);
    await page.evaluate(
      async ([base, url, tok]) => {
        const { Pushgate } = await import(base + "/pushgate.js");
        const client = new Pushgate(url, { token: tok });
        const room = client.subscribe("room:4", (msg) => window.note("sdk", "message", JSON.stringify(msg.data)));
        client.connect();
        await room.ready;
        window.note("sdk", "subscribed", "room:4");
      },
      [gw.base, gw.url, token("dave")],
    );
    await publish(gw, "room:4", { text: "through the SDK" });
    assert.deepEqual(await saw(page, "sdk", "message"), { text: "through the SDK" });
    await shot(page, "cors-5-sdk-module.png");
    assert.deepEqual(errors, []);
    await page.context().close();

    const refused = await visit(other);
    const failure = await refused.page.evaluate(async (base) => {
      try {
        await import(base + "/pushgate.js");
        return "loaded";
      } catch (err) {
        return String(err);
      }
    }, gw.base);
    assert.match(failure, /Failed to fetch dynamically imported module/);
    await refused.page.context().close();
  });
});
