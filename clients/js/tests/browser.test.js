// The demo chat in a real browser: Debian's Chromium driven by playwright-core, two pages on
// the two nodes of a cluster (each page served by the node it connects to). The nodes run with
// --dev and nothing else about channels, so they keep history on chat:* and track presence
// there by default. The online list comes from presence, then from join and leave events (a
// second user joining and leaving). One node is killed and restarted: its
// page shows that it is reconnecting, comes back with the messages it missed (recovered from
// history) and keeps chatting; when the history is gone meanwhile, it says some may be missing.
// On a phone-sized touch screen nothing overflows and the online list opens from the bar.
// Screenshots land in target/screenshots/.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";

import path from "node:path";
import { after, before, describe, it } from "node:test";

import { API_KEY, NO_CHROMIUM, Node, Redis, SHOTS, launchChromium } from "./helpers.js";

const WAIT = 15000;


describe("demo chat in Chromium", { skip: NO_CHROMIUM, timeout: 120000 }, () => {
  let redis, n1, n2, browser;

  before(async () => {
    redis = await Redis.start();
    // The same secret on both nodes (passed explicitly); --dev adds /dev/token, and history
    // (chat:*=200/10m) and presence (chat:*) for the chat's channels.
    n1 = await Node.start({ id: "n1", redis, args: ["--dev"] });
    n2 = await Node.start({ id: "n2", redis, args: ["--dev"] });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await n1?.kill();
    await n2?.kill();
    await redis?.stop();
  });

  async function open(node, name, room = "lobby") {
    const context = await browser.newContext({ viewport: { width: 960, height: 600 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    const errors = [];
    page.on("pageerror", (err) => errors.push(err));
    // Keeps the page's sockets, to read what each negotiated.
    await page.addInitScript(() => {
      const Native = window.WebSocket;
      window.__sockets = [];
      window.WebSocket = class extends Native {
        constructor(...args) {
          super(...args);
          window.__sockets.push(this);
        }
      };
    });
    await page.goto(`${node.base}/?name=${name}&room=${room}`);
    await shot(page, `chat-0-${name}-join.png`);
    await page.click("#join-button");
    await page.waitForSelector('#status[data-state="connected"]');
    return { page, errors };
  }

  async function say(page, text) {
    await page.fill("#text", text);
    await page.press("#text", "Enter");
  }

  function sees(page, text) {
    return page.waitForSelector(`#messages li.msg:has-text(${JSON.stringify(text)})`);
  }

  /** Waits until the online list is exactly `expected` ({user: "their node(s)"}). */
  async function online(page, expected) {
    const want = JSON.stringify(expected, Object.keys(expected).sort());
    try {
      await page.waitForFunction(
        (want) => {
          const got = {};
          for (const li of document.querySelectorAll("#online li")) {
            got[li.dataset.name] = li.querySelector(".node").textContent;
          }
          return JSON.stringify(got, Object.keys(got).sort()) === want;
        },
        want,
      );
    } catch (err) {
      const got = await page.$$eval("#online li", (lis) => lis.map((li) => li.textContent));
      throw new Error(`online list ${JSON.stringify(got)}, expected ${want}: ${err.message}`);
    }
  }

  async function shot(page, name) {
    await page.screenshot({ path: path.join(SHOTS, name) });
  }

  it("two pages on two nodes chat, see each other online, and one recovers across its node's restart", async () => {
    const a = await open(n1, "alice");
    const b = await open(n2, "bob");
    assert.match(await a.page.textContent("#status"), /connected · node n1/);
    assert.match(await b.page.textContent("#status"), /connected · node n2/);
    // Chromium offers permessage-deflate and the SDK asks for batches: the node takes both.
    for (const { page } of [a, b]) {
      const negotiated = await page.evaluate(() => window.__sockets.map((s) => [s.extensions, s.protocol]));
      assert.deepEqual(negotiated.at(-1), [
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "pushgate.batch",
      ]);
    }

    // Nobody has said anything yet: the online list can only come from presence.
    await online(a.page, { alice: "n1", bob: "n2" });
    await online(b.page, { alice: "n1", bob: "n2" });
    assert.equal(await a.page.textContent("#online li:first-child"), "alice(you)n1");
    assert.equal(await a.page.locator("#messages li.msg").count(), 0);

    await say(a.page, "hello from alice on n1");
    await sees(b.page, "hello from alice on n1");
    await sees(a.page, "hello from alice on n1");
    await say(b.page, "hi alice, bob here on n2");
    await sees(a.page, "hi alice, bob here on n2");
    await shot(a.page, "chat-1-alice-connected.png");
    await shot(b.page, "chat-1-bob-connected.png");

    await n1.kill();
    await a.page.waitForSelector('#status[data-state="reconnecting"]');
    assert.equal(await a.page.textContent("#status-text"), "reconnecting…");
    const away = ["alice, are you there?", "we moved the meeting to 3pm"];
    for (const text of away) {
      await say(b.page, text);
      await sees(b.page, text);
    }
    await shot(a.page, "chat-2-alice-reconnecting.png");
    assert.equal(await a.page.locator("#messages li.msg").count(), 2);

    await n1.start();
    await a.page.waitForSelector('#status[data-state="connected"]', { timeout: 30000 });
    await a.page.waitForSelector('#messages li.note:has-text("reconnected to node n1")');
    // What bob said meanwhile comes back from history, once each, in order, after the note.
    for (const text of away) await sees(a.page, text);
    await a.page.waitForSelector('#messages li.note:has-text("2 messages sent while you were away")');
    const texts = await a.page.$$eval("#messages li", (lis) =>
      lis.map((li) => (li.classList.contains("msg") ? li.querySelector(".text").textContent : "note: " + li.textContent)),
    );
    const lost = texts.findIndex((t) => t.startsWith("note: connection lost"));
    assert.ok(lost > 0, JSON.stringify(texts));
    const after = texts.slice(lost).filter((t) => !t.startsWith("note: "));
    assert.deepEqual(after, away, JSON.stringify(texts));
    assert.ok(!texts.some((t) => t.includes("may be missing")), JSON.stringify(texts));

    await say(a.page, "back after the restart");
    await sees(b.page, "back after the restart");
    await say(b.page, "welcome back");
    await sees(a.page, "welcome back");
    await online(a.page, { alice: "n1", bob: "n2" });
    await shot(a.page, "chat-3-alice-back.png");
    await shot(b.page, "chat-3-bob.png");

    assert.deepEqual(a.errors, []);
    assert.deepEqual(b.errors, []);
    await a.page.context().close();
    await b.page.context().close();
  });

  it("says some messages may be missing when the history was lost meanwhile", async () => {
    const c = await open(n1, "carol", "attic");
    const d = await open(n2, "dave", "attic");
    await say(d.page, "before the loss");
    await sees(c.page, "before the loss");

    await n1.kill();
    await c.page.waitForSelector('#status[data-state="reconnecting"]');
    // The history is gone (as when it expires or Redis loses it): the next message starts a
    // new epoch, and carol's position belongs to the old one.
    const deleted = execFileSync("redis-cli", [
      "-p", String(redis.port), "DEL", "pushgate:history:chat:attic", "pushgate:meta:chat:attic",
    ]).toString().trim();
    assert.equal(deleted, "2");
    await say(d.page, "said while the history was lost");
    await sees(d.page, "said while the history was lost");

    await n1.start();
    await c.page.waitForSelector('#status[data-state="connected"]', { timeout: 30000 });
    await c.page.waitForSelector('#messages li.note.warn:has-text("some messages may be missing")');
    await say(d.page, "after the loss");
    await sees(c.page, "after the loss");
    assert.equal(await c.page.locator('#messages li.msg:has-text("said while the history was lost")').count(), 0);
    await shot(c.page, "chat-4-carol-missing.png");

    assert.deepEqual(c.errors, []);
    assert.deepEqual(d.errors, []);
  });

  it("shows the room's last messages to someone who joins after they were sent, then live ones", async () => {
    const dave = await open(n2, "dave", "backlog");
    // 60 messages before carol joins (through the API of dave's node); the page starts with the
    // room's last 50.
    const earlier = Array.from({ length: 60 }, (_, i) => `earlier ${i + 1}`);
    for (const text of earlier) {
      await n2.api("/api/publish", { channel: "chat:backlog", data: { kind: "msg", text } });
    }
    await sees(dave.page, "earlier 60");

    const carol = await open(n1, "carol", "backlog");
    await sees(carol.page, "earlier 60");
    const shown = () => carol.page.$$eval("#messages li.msg .text", (els) => els.map((el) => el.textContent));
    assert.deepEqual(await shown(), earlier.slice(10));

    // Then live messages, once each, after the backlog.
    await say(dave.page, "hi carol, you missed the first ten");
    await sees(carol.page, "hi carol, you missed the first ten");
    await say(carol.page, "I can read the last fifty");
    await sees(dave.page, "I can read the last fifty");
    await sees(carol.page, "I can read the last fifty");
    assert.deepEqual(await shown(), [
      ...earlier.slice(10),
      "hi carol, you missed the first ten",
      "I can read the last fifty",
    ]);
    await shot(carol.page, "chat-backlog-carol-joined.png");

    assert.deepEqual(carol.errors, []);
    assert.deepEqual(dave.errors, []);
    await carol.page.context().close();
    await dave.page.context().close();
  });

  it("shows a second user joining and leaving, from the nodes' join and leave events", async () => {
    // Alice's page, counting the presence requests it sends: the list follows the events, with
    // no polling.
    const context = await browser.newContext({ viewport: { width: 960, height: 600 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    const errors = [];
    page.on("pageerror", (err) => errors.push(err));
    const asked = [];
    page.on("websocket", (ws) =>
      ws.on("framesent", ({ payload }) => {
        if (String(payload).includes('"type":"presence"')) asked.push(payload);
      }),
    );
    await page.goto(`${n1.base}/?name=alice&room=porch`);
    await page.click("#join-button");
    await page.waitForSelector('#status[data-state="connected"]');
    await online(page, { alice: "n1" });

    const bob = await open(n2, "bob", "porch");
    await page.waitForSelector('#messages li.note.presence:has-text("bob joined")');
    await online(page, { alice: "n1", bob: "n2" });
    await online(bob.page, { alice: "n1", bob: "n2" });
    await shot(page, "chat-5-alice-sees-bob-join.png");

    // Bob in a second tab, on the other node, then that tab closed: per user, nobody joined or
    // left.
    const again = await open(n1, "bob", "porch");
    const entries = async () => {
      const res = await fetch(`${n1.base}/api/presence/chat:porch`, {
        headers: { authorization: `Bearer ${API_KEY}` },
      });
      return (await res.json()).clients.filter((c) => c.user === "bob").length;
    };
    await until(async () => (await entries()) === 2, "bob's second entry");
    await again.page.context().close();
    await until(async () => (await entries()) === 1, "bob's second tab to be gone");
    await online(page, { alice: "n1", bob: "n2" });

    // Bob leaves the room.
    await bob.page.click("#leave");
    await page.waitForSelector('#messages li.note.presence:has-text("bob left")');
    await online(page, { alice: "n1" });
    const notes = await page.$$eval("#messages li.note.presence", (lis) => lis.map((li) => li.textContent));
    assert.deepEqual(notes, ["bob joined", "bob left"]);
    assert.equal(asked.length, 1, `presence requests: ${JSON.stringify(asked)}`);
    await shot(page, "chat-6-alice-sees-bob-leave.png");

    assert.deepEqual(errors, []);
    assert.deepEqual(bob.errors, []);
    await context.close();
    await bob.page.context().close();
  });

  it("fits a phone-sized screen (390x780, touch): nothing overflows and the online list opens", async () => {
    // A node with an ID as long as the default (a UUID's 32 hex digits), long names.
    const long = await Node.start({ id: randomUUID().replaceAll("-", ""), redis, args: ["--dev"] });
    try {
      const context = await browser.newContext({
        viewport: { width: 390, height: 780 },
        isMobile: true,
        hasTouch: true,
        deviceScaleFactor: 2,
      });
      const page = await context.newPage();
      page.setDefaultTimeout(WAIT);
      const errors = [];
      page.on("pageerror", (err) => errors.push(err));
      const name = "m".repeat(32);
      const room = "r".repeat(32);
      await page.goto(`${long.base}/?name=${name}&room=${room}`);
      await fits(page, "the join form");
      await shot(page, "chat-7-phone-join.png");
      await page.tap("#join-button");
      await page.waitForSelector('#status[data-state="connected"]');
      assert.match(await page.textContent("#status-text"), new RegExp(`connected · node ${long.id}`));

      const other = await open(n2, "o".repeat(32), room);
      await page.waitForSelector(`#messages li.note.presence:has-text("${"o".repeat(32)} joined")`);
      const word = "x".repeat(120);
      await say(other.page, word);
      await sees(page, word);
      await page.tap("#text");
      await page.fill("#text", "from a phone");
      await page.tap('#compose button[type="submit"]');
      await sees(other.page, "from a phone");
      await fits(page, "the chat");
      await shot(page, "chat-8-phone-chat.png");

      // The online list: closed, a tap away, and on the screen once open.
      assert.equal(await page.isVisible("#online"), false);
      assert.equal(await page.textContent("#online-count"), "2");
      await page.tap("#online-toggle");
      await page.waitForSelector("#online li", { state: "visible" });
      const names = await page.$$eval("#online li", (lis) => lis.map((li) => li.dataset.name));
      assert.deepEqual(names.sort(), [name, "o".repeat(32)].sort());
      for (const li of await page.$$("#online li")) {
        const box = await li.boundingBox();
        assert.ok(box.x >= 0 && box.x + box.width <= 390 && box.y >= 0 && box.y + box.height <= 780, JSON.stringify(box));
      }
      await fits(page, "the open online list");
      await shot(page, "chat-9-phone-online.png");
      await page.tap("#online-toggle");
      await page.waitForSelector("#online", { state: "hidden" });

      assert.deepEqual(errors, []);
      assert.deepEqual(other.errors, []);
      await context.close();
      await other.page.context().close();
    } finally {
      await long.kill();
    }
  });

  async function until(check, what) {
    const deadline = Date.now() + WAIT;
    while (!(await check())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Asserts that nothing on the page sticks out sideways or spills out of its box. */
  async function fits(page, what) {
    const problems = await page.evaluate(() => {
      const width = document.documentElement.clientWidth;
      const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + (el.className ? "." + el.className : "");
      const out = [];
      if (document.documentElement.scrollWidth > width) {
        out.push(`the page is ${document.documentElement.scrollWidth}px wide in a ${width}px window`);
      }
      for (const el of document.body.querySelectorAll("*")) {
        const style = getComputedStyle(el);
        const r = el.getBoundingClientRect();
        if (style.visibility === "hidden" || (r.width === 0 && r.height === 0)) continue;
        if (r.left < -0.5 || r.right > width + 0.5) out.push(`${name(el)} spans ${r.left}..${r.right}`);
        const text = el.tagName === "INPUT" || el.tagName === "TEXTAREA";
        if (!text && style.textOverflow !== "ellipsis" && el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0) {
          out.push(`${name(el)} holds ${el.scrollWidth}px in ${el.clientWidth}px`);
        }
      }
      return out;
    });
    assert.deepEqual(problems, [], `${what} on a phone`);
  }
});
