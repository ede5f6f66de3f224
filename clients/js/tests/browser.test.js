// The demo chat in a real browser: Debian's Chromium driven by playwright-core, two pages on
// the two nodes of a cluster (each page served by the node it connects to). The nodes run with
// --dev and nothing else about channels, so they keep history on chat:* and track presence
// there by default. The online list comes from presence. One node is killed and restarted: its
// page shows that it is reconnecting, comes back with the messages it missed (recovered from
// history) and keeps chatting; when the history is gone meanwhile, it says some may be missing.
// Screenshots land in target/screenshots/.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { Node, ROOT, Redis } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = path.join(ROOT, "target/screenshots");
const WAIT = 15000;

const missing = !existsSync(CHROMIUM);
if (missing && process.env.CI) throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium)`);

describe("demo chat in Chromium", { skip: missing && `no Chromium at ${CHROMIUM}`, timeout: 120000 }, () => {
  let redis, n1, n2, browser;

  before(async () => {
    const { chromium } = await import("playwright-core");
    redis = await Redis.start();
    // The same secret on both nodes (passed explicitly); --dev adds /dev/token, and history
    // (chat:*=200/10m) and presence (chat:*) for the chat's channels.
    n1 = await Node.start({ id: "n1", redis, args: ["--dev"] });
    n2 = await Node.start({ id: "n2", redis, args: ["--dev"] });
    mkdirSync(SHOTS, { recursive: true });
    // launch() runs the browser on a new, temporary user-data-dir.
    browser = await chromium.launch({
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
});
