// Type declarations for pushgate.js, the pushgate JavaScript SDK.

/** A token string, or a promise of one. */
export type TokenSource = () => string | Promise<string>;

/** A WebSocket constructor: the browser's, or one from a package such as `ws` in Node. */
export interface WebSocketConstructor {
  new (url: string): WebSocketLike;
}

/** The part of the WebSocket interface the client uses. */
export interface WebSocketLike {
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  terminate?(): void;
}

export interface PushgateOptions {
  /** Called for a token at the first connect, after 4001/4003, after a failed handshake, and before the token expires. */
  getToken?: TokenSource;
  /** A fixed token, when there is no getToken. */
  token?: string;
  /** The WebSocket implementation (default: globalThis.WebSocket). */
  WebSocket?: WebSocketConstructor;
  /** Backoff ceiling of the first retry, ms (default 500); doubles per failure. */
  minDelay?: number;
  /** Largest backoff ceiling, ms (default 20000). */
  maxDelay?: number;
  /** A connection up this long resets the backoff, ms (default 10000). */
  stableAfter?: number;
  /** Reconnect delay after 1001, 4001 or 4003 with a new token: random up to this, ms (default 1000). */
  goingAwayJitter?: number;
  /** Application ping interval, ms (default: the welcome's ping_interval). */
  pingInterval?: number;
  /** Silence allowed past the ping interval before the connection counts as dead, ms (default 10000). */
  pingGrace?: number;
  /** Longest wait for the welcome after opening a socket, ms (default 10000). */
  connectTimeout?: number;
  /** Longest wait for a reply to a request, queueing included, ms (default 10000). */
  requestTimeout?: number;
  /** Refresh the token this long before it expires (at most half its remaining life), ms (default 60000). */
  refreshLead?: number;
  /** Refresh the token before it expires (default true; needs getToken). */
  refresh?: boolean;
  /** Failed handshakes with the same token before asking the server whether it refuses the token (default 3). */
  authRetries?: number;
  /**
   * Ask the node for batches (subprotocol `pushgate.batch`, default true): deliveries queued
   * together arrive in one WebSocket message, unpacked here. Turn off for nodes that predate it.
   */
  batch?: boolean;
}

/** A position in a history channel. */
export interface Position {
  offset: number;
  epoch: string;
}

/** A delivery: `{"type":"message",...}` from the server. */
export interface Message<T = unknown> {
  type: "message";
  id: string;
  ts: number;
  from?: string;
  channel?: string;
  user?: string;
  session?: string;
  broadcast?: true;
  /** On history channels. */
  offset?: number;
  /** On history channels. */
  epoch?: string;
  data: T;
}

export interface Ack {
  type: "ack";
  id: number;
  /** On the ack of a subscribe to a history channel: the channel's current position. */
  position?: Position;
  /** On the ack of a subscribe with `since`: whether the missed messages follow. */
  recovered?: boolean;
}

/** The reply to `history`: a history channel's last messages, oldest first. */
export interface HistoryReply<T = unknown> {
  type: "history";
  id: number;
  channel: string;
  /** Where the messages run up to: `subscribe(channel, fn, { since: position })` continues from there. */
  position: Position;
  /** As deliveries of the channel look, each with its `offset` and `epoch`. */
  messages: Message<T>[];
}

/** Options of `subscribe`. */
export interface SubscribeOptions {
  /** A position on a history channel: what came after it is sent first (recovery). */
  since?: Position;
  /**
   * Start with the channel's last messages (at most the node's --history-request-limit):
   * they come first, then the live ones, none twice and none missed between them. Only the
   * first subscribe asks for them; after a reconnect the client recovers from its last
   * position. Ignored with `since`, and by another handle of a channel already subscribed.
   */
  recent?: number;
}

export interface PresenceEntry {
  user: string;
  session: string;
  node: string;
  joined_at: number;
}

export interface PresenceReply {
  type: "presence";
  id: number;
  channel: string;
  clients: PresenceEntry[];
}

/**
 * A join or leave on a channel the nodes send presence events for (`--presence-events`).
 * Per user: `join` when the user's first connection subscribes, `leave` when their last one
 * is gone (unsubscribed, disconnected, or its node died). `session` is that connection.
 */
export interface PresenceEvent {
  channel: string;
  user: string;
  session: string;
}

export type State = "offline" | "connecting" | "connected" | "reconnecting";

export interface SessionInfo {
  session: string;
  user: string;
  node: string;
  /** ms */
  pingInterval: number;
}

export interface Events {
  connecting: { attempt: number; url: string };
  connected: SessionInfo & { reconnected: boolean };
  disconnected: {
    code: number;
    reason: string;
    /** Whether the socket had been welcomed (false: a failed attempt). */
    connected: boolean;
    reconnect: boolean;
    /** ms until the next attempt, when reconnecting. */
    delay?: number;
  };
  error: PushgateError;
  state: State;
  subscribed: {
    channel: string;
    resubscribed: boolean;
    /** false: messages may have been missed (reload state); undefined: nothing to recover. */
    recovered?: boolean;
    position: Position | null;
  };
  unsubscribed: { channel: string; code?: string; reason: string };
  refreshed: { exp: number };
  /** Deliveries to the user, the session or everyone (not to a channel). */
  message: Message;
  /** A user's first connection subscribed to a subscribed channel with presence events. */
  join: PresenceEvent;
  /** A user's last connection left a subscribed channel with presence events. */
  leave: PresenceEvent;
}

/** Codes: the server's (`bad_request`, `forbidden`, `not_found`, `rate_limited`, `too_large`,
 * `unavailable`) and the client's (`disconnected`, `timeout`, `closed`, `unauthorized`,
 * `token`, `connect`, `bad_frame`). */
export class PushgateError extends Error {
  constructor(code: string, message: string, extra?: object);
  code: string;
  /** The channel of a refused subscribe. */
  channel?: string;
  /** The server's error frame, for refused requests. */
  frame?: { type: "error"; id: number | null; code: string; message: string };
}

export interface Subscription<T = unknown> {
  readonly channel: string;
  /** Resolves with the first subscribe ack; rejects if the server refuses the channel. */
  readonly ready: Promise<Ack>;
  /** The last seen position on a history channel. */
  readonly position: Position | null;
  unsubscribe(): void;
}

export class Pushgate {
  constructor(url: string | (() => string), options?: PushgateOptions);
  readonly url: string | (() => string);
  readonly state: State;
  /** The current connection's welcome, or null. */
  readonly session: SessionInfo | null;
  connect(): this;
  close(): void;
  on<E extends keyof Events>(
    event: E,
    listener: E extends "state" ? (state: State, previous: State) => void : (arg: Events[E]) => void,
  ): () => void;
  off<E extends keyof Events>(event: E, listener: (...args: any[]) => void): void;
  subscribe<T = unknown>(
    channel: string,
    onMessage: (message: Message<T>) => void,
    options?: SubscribeOptions,
  ): Subscription<T>;
  publish(channel: string, data: unknown): Promise<Ack>;
  presence(channel: string): Promise<PresenceReply>;
  /**
   * The last messages of a history channel and its position; `limit` at most (the node's
   * --history-request-limit when absent or larger). Rejects with `not_found` on a channel
   * without history, `forbidden` when the token does not grant subscribing to it.
   */
  history<T = unknown>(channel: string, options?: { limit?: number }): Promise<HistoryReply<T>>;
  /** The channels subscribed, or to be subscribed at the next connection. */
  channels(): string[];
}

/** The claims of a JWT, decoded without verification, or null. */
export function decodeToken(token: string): Record<string, unknown> | null;

export default Pushgate;
