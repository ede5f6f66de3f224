// pushgate JavaScript SDK: one dependency-free ES module for browsers and Node.
//
//   import { Pushgate } from "/pushgate.js";
//   const client = new Pushgate("wss://push.example.com/ws", { getToken });
//   const sub = client.subscribe("room:1", (msg) => console.log(msg.from, msg.data));
//   await client.publish("room:1", { text: "hi" });
//   client.connect();
//
// It reconnects with exponential backoff and full jitter, resubscribes after every reconnect
// (with the last seen position on history channels), watches the connection with application
// pings, and refreshes the token before it expires. docs/clients.md describes the API and what
// the client does with each close code; docs/protocol.md is the wire protocol.

/** Close codes pushgate sends (docs/protocol.md, "Close codes"). */
const GOING_AWAY = 1001;
const TOKEN_EXPIRED = 4001;
const DISCONNECTED = 4003;
/** Reported for connections the client gives up on itself (watchdog, connect timeout). */
const ABNORMAL = 1006;

const DEFAULTS = {
  minDelay: 500,
  maxDelay: 20000,
  stableAfter: 10000,
  goingAwayJitter: 1000,
  pingInterval: 0,
  pingGrace: 10000,
  connectTimeout: 10000,
  requestTimeout: 10000,
  refreshLead: 60000,
  refresh: true,
  authRetries: 3,
  batch: true,
};

/** The subprotocol under which a text message carries one or more frames, one per line. */
const BATCH_PROTOCOL = "pushgate.batch";

/** A refused request, a failed connection or a client-side failure, with a `code`. */
export class PushgateError extends Error {
  constructor(code, message, extra) {
    super(message);
    this.name = "PushgateError";
    this.code = code;
    if (extra) Object.assign(this, extra);
  }
}

/** The claims of a JWT, decoded without verification (the server verifies), or null. */
export function decodeToken(token) {
  try {
    let b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    b64 += "===".slice((b64.length + 3) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

const noop = () => {};

/** Reports an exception thrown by application code without breaking the client's state. */
function report(err) {
  setTimeout(() => {
    throw err;
  });
}

/** `http(s)://` becomes `ws(s)://` and the token is added to the query string. */
function socketUrl(base, token) {
  const url = base.replace(/^http(s?):/i, "ws$1:");
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

/** The HTTP URL of the same handshake, to ask why a WebSocket handshake failed. */
function probeUrl(base, token) {
  return socketUrl(base, token).replace(/^ws(s?):/i, "http$1:");
}

/** One handle returned by `subscribe`. Several handles may share one server subscription. */
class Subscription {
  constructor(client, state, onMessage) {
    this._client = client;
    this._state = state;
    this._onMessage = onMessage;
    this.channel = state.channel;
  }

  /** Resolves with the subscribe ack; rejects if the server refuses the channel. */
  get ready() {
    return this._state.ready;
  }

  /** The last seen `{offset, epoch}` on a history channel, or null. */
  get position() {
    return this._state.position;
  }

  /** Stops this handle; the server subscription ends when its last handle does. */
  unsubscribe() {
    this._client._release(this._state, this._onMessage);
  }
}

export class Pushgate {
  /**
   * @param url WebSocket URL of `/ws` (`ws://`, `wss://`, or `http(s)://` which is converted),
   *   or a function returning one for each attempt (e.g. to rotate over nodes).
   * @param options `getToken` (or a fixed `token`), `WebSocket` (a constructor, e.g. from the
   *   `ws` package in Node), and the timings in DEFAULTS (milliseconds).
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    /** 'offline' | 'connecting' | 'connected' | 'reconnecting' */
    this.state = "offline";
    /** The welcome of the current connection: `{session, user, node, pingInterval}`, or null. */
    this.session = null;
    this._listeners = new Map();
    this._subs = new Map();
    this._pending = new Map();
    this._queue = [];
    this._timers = {};
    this._id = 0;
    this._gen = 0;
    this._conn = null;
    this._active = false;
    this._stopped = false;
    this._failures = 0;
    this._attempts = 0;
    this._strikes = 0;
    this._goingAway = false;
    this._token = undefined;
    this._claims = null;
    this._tokenAt = 0;
    this._needToken = true;
    this._welcomed = false;
  }

  // ---- events ----

  /**
   * Events: `connecting` {attempt, url}, `connected` {session, user, node, pingInterval,
   * reconnected}, `disconnected` {code, reason, connected, reconnect, delay}, `error` (a
   * PushgateError), `state` (state, previous), `subscribed` {channel, resubscribed, recovered,
   * position}, `unsubscribed` {channel, code, reason}, `refreshed` {exp}, `message` (deliveries
   * addressed to the user, the session or everyone rather than to a channel), `join` and
   * `leave` {channel, user, session} (a user's first connection subscribed to a subscribed
   * channel with presence events, or their last one left). Returns a function that removes
   * the listener.
   */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) || [])]) {
      try {
        fn(...args);
      } catch (err) {
        report(err);
      }
    }
  }

  _setState(state) {
    const previous = this.state;
    if (previous === state) return;
    this.state = state;
    this._emit("state", state, previous);
  }

  // ---- lifecycle ----

  /** Starts connecting (and keeps reconnecting until `close()`). */
  connect() {
    if (this._active) return this;
    this._active = true;
    this._stopped = false;
    this._failures = 0;
    this._attempts = 0;
    this._strikes = 0;
    this._goingAway = false;
    this._welcomed = false;
    this._setState("connecting");
    // A browser that is back online: retry now rather than after the backoff.
    if (typeof addEventListener === "function") {
      this._onOnline = () => {
        if (this._active && !this._conn && this._timers.retry) this._retry(Math.random() * 500);
      };
      addEventListener("online", this._onOnline);
    }
    this._attempt();
    return this;
  }

  /** Closes the connection and stops reconnecting. Subscriptions are kept for a later `connect()`. */
  close() {
    if (!this._active) return;
    this._active = false;
    this._stopped = true;
    this._gen++;
    clearTimeout(this._timers.retry);
    this._timers.retry = null;
    if (this._onOnline) removeEventListener("online", this._onOnline);
    const conn = this._conn;
    if (conn) this._detach(conn, 1000, "closed by the client");
    this._failAll(new PushgateError("closed", "the client was closed"));
    this._setState("offline");
    if (conn) {
      this._emit("disconnected", {
        code: 1000,
        reason: "closed by the client",
        connected: conn.welcomed,
        reconnect: false,
      });
    }
  }

  /** Calls getToken (or takes the fixed token). Resolves true when the token changed. */
  async _fetchToken() {
    const { getToken, token: fixed } = this.options;
    const token = getToken ? await getToken() : fixed;
    if (typeof token !== "string" || !token) {
      throw new PushgateError("token", "getToken must return a non-empty token string");
    }
    const changed = token !== this._token;
    this._token = token;
    this._claims = decodeToken(token);
    this._tokenAt = Date.now();
    this._needToken = false;
    return changed;
  }

  async _attempt() {
    const gen = ++this._gen;
    if (this._needToken || this._token === undefined) {
      try {
        await this._fetchToken();
      } catch (err) {
        if (gen !== this._gen) return;
        this._emit("error", tokenError(err));
        this._retry(this._backoff());
        return;
      }
      if (gen !== this._gen) return;
    }
    const base = typeof this.url === "function" ? this.url() : this.url;
    const WS = this.WebSocket;
    this._attempts++;
    this._emit("connecting", { attempt: this._attempts, url: base });
    let ws;
    try {
      if (!WS) throw new Error("no WebSocket implementation: pass options.WebSocket");
      ws = this.options.batch
        ? new WS(socketUrl(base, this._token), BATCH_PROTOCOL)
        : new WS(socketUrl(base, this._token));
    } catch (err) {
      this._emit("error", new PushgateError("connect", String(err && err.message), { cause: err }));
      this._retry(this._backoff());
      return;
    }
    const conn = { ws, base, welcomed: false, status: 0, network: false, timers: {} };
    this._conn = conn;
    conn.timers.connect = setTimeout(
      () => this._abandon(conn, "no welcome within " + this.options.connectTimeout + " ms", true),
      this.options.connectTimeout,
    );
    ws.onmessage = (ev) => {
      if (this._conn !== conn) return;
      // Under pushgate.batch a message holds one frame per line (frames hold no line feed).
      if (ws.protocol !== BATCH_PROTOCOL) return this._onFrame(conn, ev.data);
      for (const frame of String(ev.data).split("\n")) {
        if (this._conn === conn) this._onFrame(conn, frame);
      }
    };
    ws.onerror = (ev) => {
      // Browsers say nothing about why a handshake failed; Node's `ws` names the HTTP status
      // or the network error.
      const text = String((ev && (ev.message || (ev.error && ev.error.message))) || "");
      const status = /Unexpected server response: (\d{3})/.exec(text);
      if (status) conn.status = Number(status[1]);
      else if (/\bE[A-Z]{4,}\b/.test(text)) conn.network = true;
    };
    ws.onclose = (ev) => {
      if (this._conn !== conn) return;
      this._detach(conn);
      this._closed(conn, ev.code || ABNORMAL, ev.reason || "", false);
    };
  }

  /** Gives up on a connection that is silent or never said welcome. */
  _abandon(conn, reason, timedOut) {
    if (this._conn !== conn) return;
    this._detach(conn);
    this._closed(conn, ABNORMAL, reason, timedOut);
  }

  /** Stops listening to a socket, clears its timers and closes it. */
  _detach(conn, code, reason) {
    const ws = conn.ws;
    ws.onmessage = ws.onclose = null;
    ws.onerror = noop;
    for (const t of Object.values(conn.timers)) clearTimeout(t);
    clearInterval(conn.timers.ping);
    if (this._conn === conn) this._conn = null;
    this.session = null;
    try {
      if (code) ws.close(code, reason);
      else if (ws.terminate) ws.terminate();
      else ws.close();
    } catch {
      // already closed
    }
  }

  /** After a socket is gone: fail its requests, decide whether and when to reconnect. */
  async _closed(conn, code, reason, timedOut) {
    const gen = ++this._gen;
    for (const [id, req] of this._pending) {
      if (req.conn === conn) {
        this._pending.delete(id);
        clearTimeout(req.timer);
        req.reject(new PushgateError("disconnected", "the connection closed before the reply"));
      }
    }
    for (const state of this._subs.values()) state.live = false;
    if (this._welcomed) this._setState("reconnecting");
    let decision;
    try {
      decision = await this._decide(conn, code, reason, timedOut);
    } catch (err) {
      decision = { delay: this._backoff(), error: err };
    }
    if (gen !== this._gen || !this._active) return;
    const reconnect = decision.delay !== undefined;
    this._emit("disconnected", {
      code,
      reason,
      connected: conn.welcomed,
      reconnect,
      delay: decision.delay,
    });
    if (decision.error) this._emit("error", decision.error);
    if (reconnect) {
      this._retry(decision.delay);
    } else {
      this._active = false;
      this._stopped = true;
      if (this._onOnline) removeEventListener("online", this._onOnline);
      this._failAll(decision.error);
      this._setState("offline");
    }
  }

  /** `{delay}` to reconnect after delay ms, `{error}` (no delay) to stop. */
  async _decide(conn, code, reason, timedOut) {
    const jitter = () => Math.random() * this.options.goingAwayJitter;
    if (conn.welcomed) {
      if (code === GOING_AWAY) {
        // A second 1001 before a connection was stable (e.g. a rolling restart) backs off.
        if (this._goingAway) return { delay: this._backoff() };
        this._goingAway = true;
        return { delay: jitter() };
      }
      if (code === TOKEN_EXPIRED) {
        try {
          await this._fetchToken();
        } catch (err) {
          this._needToken = true;
          return { delay: this._backoff(), error: tokenError(err) };
        }
        return { delay: jitter() };
      }
      if (code === DISCONNECTED) {
        let changed = false;
        try {
          changed = await this._fetchToken();
        } catch {
          // no new token to be had: stay disconnected
        }
        if (changed) return { delay: jitter() };
        return {
          error: new PushgateError("disconnected", "disconnected by the server (" + code + ")"),
        };
      }
      return { delay: this._backoff() };
    }
    // Closed before the welcome. Timeouts, network errors and refusals other than 401 are not
    // about the token. Otherwise (browsers cannot see the HTTP status) the token may have been
    // refused: fetch a token again, and after repeated failures with the same token, ask the
    // server over HTTP whether it refuses the token.
    if (timedOut || conn.network || (conn.status && conn.status !== 401)) {
      return { delay: this._backoff() };
    }
    let changed;
    try {
      changed = await this._fetchToken();
    } catch (err) {
      this._needToken = true;
      return { delay: this._backoff(), error: tokenError(err) };
    }
    if (changed) {
      this._strikes = 0;
      return { delay: this._backoff() };
    }
    this._strikes++;
    if (this._strikes >= this.options.authRetries) {
      const refusal = conn.status === 401 ? "the token was refused" : await this._probe(conn.base);
      if (refusal) {
        return {
          error: new PushgateError("unauthorized", refusal + " (getToken returned the same token)"),
        };
      }
    }
    return { delay: this._backoff() };
  }

  /**
   * Asks the handshake URL over plain HTTP why it refuses: the 401 reason when the token is
   * refused, otherwise null (reachable but fine, unreachable, or not readable cross-origin).
   */
  async _probe(base) {
    if (typeof fetch !== "function") return null;
    try {
      const res = await fetch(probeUrl(base, this._token), { cache: "no-store" });
      if (res.status !== 401) return null;
      const body = await res.json().catch(() => ({}));
      return "the token was refused: " + (body.reason || "unauthorized");
    } catch {
      return null;
    }
  }

  /** Full-jitter exponential backoff: a random delay up to minDelay·2ⁿ, capped at maxDelay. */
  _backoff() {
    const { minDelay, maxDelay } = this.options;
    const cap = Math.min(maxDelay, minDelay * 2 ** Math.min(this._failures, 30));
    this._failures++;
    return Math.random() * cap;
  }

  _retry(delay) {
    clearTimeout(this._timers.retry);
    const gen = this._gen;
    this._timers.retry = setTimeout(() => {
      this._timers.retry = null;
      if (gen === this._gen && this._active) this._attempt();
    }, delay);
  }

  // ---- frames ----

  _send(conn, frame) {
    try {
      conn.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _onFrame(conn, data) {
    conn.lastFrame = Date.now();
    conn.unanswered = 0;
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      this._emit("error", new PushgateError("bad_frame", "the server sent a frame that is not JSON"));
      return;
    }
    if (!f || typeof f !== "object") return;
    switch (f.type) {
      case "welcome":
        this._onWelcome(conn, f);
        return;
      case "message":
        this._onMessage(f);
        return;
      case "join":
      case "leave":
        // Presence events of a channel with --presence-events: while subscribed to it.
        if (this._subs.has(f.channel)) {
          this._emit(f.type, { channel: f.channel, user: f.user, session: f.session });
        }
        return;
      case "unsubscribed": {
        const state = this._subs.get(f.channel);
        if (state && f.code === "history_lost") {
          // Messages were missed that history no longer holds: subscribe again from the last
          // position, which answers `recovered: false` (the `subscribed` event).
          state.live = false;
          this._subscribe(conn, state);
          return;
        }
        if (state) {
          this._subs.delete(f.channel);
          state.live = false;
        }
        this._emit("unsubscribed", { channel: f.channel, code: f.code, reason: f.reason });
        return;
      }
    }
    if (typeof f.id === "number" && this._pending.has(f.id)) {
      const req = this._pending.get(f.id);
      this._pending.delete(f.id);
      clearTimeout(req.timer);
      if (f.type === "error") req.reject(new PushgateError(f.code, f.message, { frame: f }));
      else req.resolve(f);
    } else if (f.type === "error" && f.id == null) {
      this._emit("error", new PushgateError(f.code, f.message, { frame: f }));
    }
  }

  _onWelcome(conn, f) {
    if (conn.welcomed) return;
    conn.welcomed = true;
    clearTimeout(conn.timers.connect);
    const reconnected = this._welcomed;
    this._welcomed = true;
    this._strikes = 0;
    this._attempts = 0;
    const pingInterval = this.options.pingInterval || (f.ping_interval || 25) * 1000;
    this.session = { session: f.session, user: f.user, node: f.node, pingInterval };
    conn.pingInterval = pingInterval;
    conn.timers.stable = setTimeout(() => {
      this._failures = 0;
      this._goingAway = false;
    }, this.options.stableAfter);
    // Browsers cannot see WebSocket pings: ping in the protocol and expect some frame in time.
    conn.timers.ping = setInterval(() => this._ping(conn), pingInterval);
    this._watch(conn);
    this._scheduleRefresh(conn);
    for (const state of this._subs.values()) this._subscribe(conn, state);
    const queued = this._queue.splice(0);
    for (const req of queued) this._transmit(conn, req);
    this._setState("connected");
    this._emit("connected", { ...this.session, reconnected });
  }

  /**
   * Arms the watchdog. After ping interval + grace without a frame, the connection is dead once
   * a ping has gone unanswered for `pingGrace` (a ping is sent then if none is outstanding: a
   * background tab's throttled timers may not have sent one).
   */
  _watch(conn) {
    const { pingGrace } = this.options;
    const limit = conn.pingInterval + pingGrace;
    const check = () => {
      const now = Date.now();
      const silent = now - conn.lastFrame;
      let wait = limit - silent;
      if (wait <= 0) {
        if (!conn.unanswered) this._ping(conn);
        wait = conn.unanswered + pingGrace - now;
        if (wait <= 0) {
          this._abandon(conn, "heartbeat timeout: nothing received for " + silent + " ms", false);
          return;
        }
      }
      conn.timers.watchdog = setTimeout(check, wait);
    };
    conn.lastFrame = Date.now();
    conn.unanswered = 0;
    conn.timers.watchdog = setTimeout(check, limit);
  }

  _ping(conn) {
    // The first ping sent since the last frame: the one the watchdog waits on.
    if (!conn.unanswered) conn.unanswered = Date.now();
    this._send(conn, { type: "ping", id: ++this._id });
  }

  _onMessage(f) {
    if (typeof f.channel !== "string") {
      this._emit("message", f);
      return;
    }
    const state = this._subs.get(f.channel);
    if (!state) return;
    if (typeof f.offset === "number") {
      // History channels: drop what was already seen (the history/live boundary of a
      // recovery), remember the position for the next resubscribe.
      const p = state.position;
      if (p && p.epoch === f.epoch && f.offset <= p.offset) return;
      state.position = { offset: f.offset, epoch: f.epoch };
    }
    for (const fn of [...state.handlers]) {
      try {
        fn(f);
      } catch (err) {
        report(err);
      }
    }
  }

  // ---- requests ----

  /** Sends a request now if connected, else when connected; settles with the reply. */
  _request(frame) {
    return new Promise((resolve, reject) => {
      this._call(frame, null, (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  /**
   * Sends a request on `conn` (or the current connection, or the next one) and calls
   * `settle(error, reply)` as the reply is read, before any frame after it.
   */
  _call(frame, conn, settle) {
    if (this._stopped) {
      settle(new PushgateError("closed", "the client is closed: call connect()"));
      return;
    }
    const req = { frame, conn: null, resolve: (r) => settle(null, r), reject: settle };
    req.timer = setTimeout(() => {
      this._pending.delete(req.frame.id);
      const i = this._queue.indexOf(req);
      if (i >= 0) this._queue.splice(i, 1);
      settle(new PushgateError("timeout", "no reply to " + frame.type + " in time"));
    }, this.options.requestTimeout);
    const current = conn || (this._conn && this._conn.welcomed ? this._conn : null);
    if (current) this._transmit(current, req);
    else this._queue.push(req);
  }

  _transmit(conn, req) {
    req.frame.id = ++this._id;
    req.conn = conn;
    this._pending.set(req.frame.id, req);
    this._send(conn, req.frame);
  }

  _failAll(err) {
    const error = err || new PushgateError("closed", "the client stopped");
    for (const req of [...this._pending.values(), ...this._queue]) {
      clearTimeout(req.timer);
      req.reject(error);
    }
    this._pending.clear();
    this._queue.length = 0;
  }

  /**
   * Publishes `data` (any JSON value) on `channel`. Resolves with the ack; rejects with a
   * PushgateError whose `code` is the server's (`forbidden`, `bad_request`, `unavailable`,
   * `rate_limited`, ...) or `disconnected` / `timeout` / `closed`. Waits for a connection if
   * there is none. A publish whose connection dropped before its ack may or may not have
   * been delivered.
   */
  publish(channel, data) {
    return this._request({ type: "publish", channel, data: data === undefined ? null : data });
  }

  /** Who is on `channel`: resolves with the server's reply frame. */
  presence(channel) {
    return this._request({ type: "presence", channel });
  }

  /**
   * The last messages of the history channel `channel`, oldest first: resolves with the
   * server's reply frame, `{channel, position: {offset, epoch}, messages}`. `options.limit`
   * asks for at most that many (the node allows at most its --history-request-limit, 100 by
   * default, which is also what no limit gets). `position` is where the messages run up to: a
   * `subscribe` with `since: position` continues from there. Needs no subscription, only a
   * token that grants subscribing to the channel; rejects with `not_found` on a channel
   * without history. Waits for a connection if there is none.
   */
  history(channel, options = {}) {
    const frame = { type: "history", channel };
    if (options.limit !== undefined && options.limit !== null) frame.limit = options.limit;
    return this._request(frame);
  }

  // ---- subscriptions ----

  /**
   * Subscribes to `channel`; `onMessage(message)` gets each delivery frame
   * (`{id, ts, from, channel, data}`, plus `offset` and `epoch` on history channels).
   * `options.since` (`{offset, epoch}`) asks a history channel for what came after it.
   * `options.recent` (a count) starts with the channel's last messages: they come first, then
   * the live ones, none twice and none missed between them (at most the node's
   * --history-request-limit). Only the first subscribe asks for them: after a reconnect the
   * client recovers from its last position as with any subscription. Both options apply when
   * the call starts the channel's subscription, not to another handle of a subscribed channel.
   */
  subscribe(channel, onMessage, options = {}) {
    let state = this._subs.get(channel);
    if (!state) {
      let resolve, reject;
      const ready = new Promise((res, rej) => {
        resolve = res;
        reject = rej;
      });
      ready.catch(noop);
      state = {
        channel,
        handlers: new Set(),
        position: options.since || null,
        // Asked for with the first subscribe only (no `since`): later ones recover instead.
        recent: options.since ? null : options.recent ?? null,
        ready,
        resolve,
        reject,
        acked: false,
        live: false,
      };
      this._subs.set(channel, state);
      const conn = this._conn;
      if (conn && conn.welcomed) this._subscribe(conn, state);
    }
    // One entry per handle, so that a function passed twice is two subscriptions.
    const handler = typeof onMessage === "function" ? (m) => onMessage(m) : noop;
    state.handlers.add(handler);
    return new Subscription(this, state, handler);
  }

  _subscribe(conn, state) {
    const frame = { type: "subscribe", channel: state.channel };
    if (state.position) frame.since = { ...state.position };
    else if (state.recent !== null && !state.acked) frame.recent = state.recent;
    const resubscribed = state.acked;
    this._call(frame, conn, (err, ack) => {
      if (this._subs.get(state.channel) !== state) return;
      if (err) {
        this._subscribeFailed(conn, state, err);
        return;
      }
      // `recovered` matters when there was something to recover: a resubscribe, or a
      // subscribe with `since`. A server without history cannot recover: false.
      let recovered = ack.recovered;
      if (recovered === undefined && (resubscribed || frame.since)) recovered = false;
      const p = ack.position;
      const seen = state.position;
      if (p && (recovered === false || (!frame.since && !(seen && seen.epoch === p.epoch && seen.offset > p.offset)))) {
        // With `recent`, the last messages up to the ack's position follow it: delivery starts
        // below them, so that they are not taken for duplicates.
        state.position =
          frame.recent !== undefined ? { offset: Math.max(0, p.offset - frame.recent), epoch: p.epoch } : p;
      }
      state.acked = true;
      state.live = true;
      state.resolve(ack);
      this._emit("subscribed", {
        channel: state.channel,
        resubscribed,
        recovered,
        position: state.position,
      });
    });
  }

  _subscribeFailed(conn, state, err) {
    if (err.code === "disconnected" || err.code === "closed") return;
    this._emit("error", err);
    if (["unavailable", "rate_limited", "timeout"].includes(err.code)) {
      // Transient: the server asks to retry later.
      setTimeout(() => {
        if (this._subs.get(state.channel) === state && this._conn === conn && !state.live) {
          this._subscribe(conn, state);
        }
      }, 500 + Math.random() * 1500);
      return;
    }
    this._subs.delete(state.channel);
    err.channel = state.channel;
    state.reject(err);
  }

  _release(state, handler) {
    if (!state.handlers.delete(handler) || state.handlers.size > 0) return;
    if (this._subs.get(state.channel) !== state) return;
    this._subs.delete(state.channel);
    const conn = this._conn;
    if (conn && conn.welcomed && state.acked) {
      this._call({ type: "unsubscribe", channel: state.channel }, conn, noop);
    }
  }

  /** The channels subscribed (or waiting to be, while disconnected). */
  channels() {
    return [...this._subs.keys()];
  }

  // ---- token refresh ----

  _scheduleRefresh(conn) {
    clearTimeout(conn.timers.refresh);
    const exp = this._claims && this._claims.exp;
    if (!this.options.refresh || !this.options.getToken || typeof exp !== "number") return;
    // Time left by the local clock, and by the token's own lifetime counted from when it was
    // received (a guard against a wrong local clock); the smaller, unless the clock says it
    // has already expired.
    const now = Date.now();
    const iat = this._claims.iat;
    const byClock = exp * 1000 - now;
    const byLifetime = typeof iat === "number" ? (exp - iat) * 1000 - (now - this._tokenAt) : byClock;
    const left = byClock > 0 ? Math.min(byClock, byLifetime) : byLifetime;
    if (left < 2000) return; // too late to refresh: the server closes with 4001, then a new token
    const delay = left - Math.min(this.options.refreshLead, left / 2);
    conn.timers.refresh = setTimeout(() => this._refresh(conn), delay);
  }

  async _refresh(conn) {
    let changed;
    try {
      changed = await this._fetchToken();
    } catch (err) {
      if (this._conn !== conn) return;
      this._emit("error", tokenError(err));
      this._scheduleRefresh(conn);
      return;
    }
    if (this._conn !== conn) return;
    if (!changed) {
      this._scheduleRefresh(conn);
      return;
    }
    const token = this._token;
    this._call({ type: "refresh", token }, conn, (err) => {
      if (this._conn !== conn) return;
      if (!err) {
        this._emit("refreshed", { exp: this._claims && this._claims.exp });
        this._scheduleRefresh(conn);
      } else if (err.code !== "disconnected" && err.code !== "closed") {
        this._emit("error", err);
      }
    });
  }
}

function tokenError(err) {
  if (err instanceof PushgateError) return err;
  return new PushgateError("token", "getToken failed: " + (err && err.message), { cause: err });
}

export default Pushgate;
