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
    options?: { since?: Position },
  ): Subscription<T>;
  publish(channel: string, data: unknown): Promise<Ack>;
  presence(channel: string): Promise<PresenceReply>;
  /** The channels subscribed, or to be subscribed at the next connection. */
  channels(): string[];
}

/** The claims of a JWT, decoded without verification, or null. */
export function decodeToken(token: string): Record<string, unknown> | null;

export default Pushgate;
