// The demo chat in a real browser: Debian's Chromium driven by playwright-core, two pages on
// the two nodes of a cluster (each page served by the node it connects to). One node is
// killed and restarted; its page shows that it is reconnecting, comes back and keeps chatting.
// Screenshots land in target/screenshots/.

import assert from "node:assert/strict";
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
    // The same secret on both nodes (passed explicitly); --dev adds /dev/token.
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

  async function open(node, name) {
    const context = await browser.newContext({ viewport: { width: 960, height: 600 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    const errors = [];
    page.on("pageerror", (err) => errors.push(err));
    await page.goto(`${node.base}/?name=${name}&room=lobby`);
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

  async function shot(page, name) {
    await page.screenshot({ path: path.join(SHOTS, name) });
  }

  it("two pages on two nodes chat, and one survives its node's restart", async () => {
    const a = await open(n1, "alice");
    const b = await open(n2, "bob");
    assert.match(await a.page.textContent("#status"), /connected · node n1/);
    assert.match(await b.page.textContent("#status"), /connected · node n2/);

    await say(a.page, "hello from alice on n1");
    await sees(b.page, "hello from alice on n1");
    await sees(a.page, "hello from alice on n1");
    await say(b.page, "hi alice, bob here on n2");
    await sees(a.page, "hi alice, bob here on n2");
    // The online list, from the room's "here" messages.
    await a.page.waitForSelector('#online li[data-name="bob"]');
    await b.page.waitForSelector('#online li[data-name="alice"]');
    await shot(a.page, "chat-1-alice-connected.png");
    await shot(b.page, "chat-1-bob-connected.png");

    await n1.kill();
    await a.page.waitForSelector('#status[data-state="reconnecting"]');
    assert.equal(await a.page.textContent("#status-text"), "reconnecting…");
    await say(b.page, "alice, are you there?");
    await sees(b.page, "alice, are you there?");
    await shot(a.page, "chat-2-alice-reconnecting.png");

    await n1.start();
    await a.page.waitForSelector('#status[data-state="connected"]', { timeout: 30000 });
    await a.page.waitForSelector('#messages li.note:has-text("reconnected to node n1")');
    await say(a.page, "back after the restart");
    await sees(b.page, "back after the restart");
    await say(b.page, "welcome back");
    await sees(a.page, "welcome back");
    await shot(a.page, "chat-3-alice-back.png");
    await shot(b.page, "chat-3-bob.png");

    assert.deepEqual(a.errors, []);
    assert.deepEqual(b.errors, []);
  });
});
