// Type declarations for sidecast.js. Wire protocol: docs/protocol.md; guide: docs/client.md.

/** The connection's state, reported through `on("status")`. */
export type Status = "connecting" | "connected" | "disconnected";

/** Any JSON value, as the publisher wrote it. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** Where an event came from. */
export interface EventMeta {
  channel: string;
  /** The channel's sequence number: grows by 1 per event within one server run. */
  seq: number;
  /**
   * With `manualAck`, for an event the worker published with `ack`: confirms the page handled
   * it. Without `manualAck` the client acks by itself once the callback returns (or the
   * Promise it returns resolves).
   */
  ack?: () => void;
}

/** An `error` reply from the server, or a client-side failure. */
export interface SidecastError {
  /**
   * A protocol error code (e.g. "forbidden"), a close code (4001, 4003, 4008), or a client
   * code: "connect_failed", "get_token_failed", "unreachable".
   */
  code: string | number;
  message: string;
  /** The channel of the refused request, when it had one. */
  channel?: string;
  /** The id of the refused request, when it had one. */
  id?: number | string;
  /** True when the client has stopped reconnecting because of it. */
  fatal?: boolean;
}

/** An event the server directed to this page's user (`{"user": ...}` on the publish port). */
export interface UserEvent<T = Json> {
  data: T;
  /** `user:<userId>`. */
  channel: string;
  seq: number;
}

export interface SidecastOptions {
  /** A JWT, sent as the `token` query parameter. */
  token?: string;
  /**
   * Called for a token when none was given, before the current token's `exp` (the new one is
   * sent with a `refresh` request), and after a close with 4001. Without it, 4001 stops the
   * reconnects.
   */
  getToken?: () => string | Promise<string>;
  /** First reconnect delay ceiling (default 500). Delays are random below initial × 2^attempt. */
  initialDelayMs?: number;
  /** Largest reconnect delay ceiling (default 30000). */
  maxDelayMs?: number;
  /** A connection open this long resets the backoff (default 10000). */
  stableAfterMs?: number;
  /** A connection not accepted within this time is retried (default 10000). */
  connectTimeoutMs?: number;
  /** A WebSocket implementation for environments without a global one. */
  WebSocket?: typeof WebSocket;
  /**
   * Fall back to Server-Sent Events when WebSocket cannot be opened (default true): after
   * `fallbackAfter` attempts in a row fail before `connected`, events come over `GET /sse`,
   * and WebSocket is tried again every `webSocketRetryMs`.
   */
  fallback?: boolean;
  /** WebSocket attempts that fail in a row before the fallback (default 2). */
  fallbackAfter?: number;
  /**
   * Until a WebSocket has connected once, an open that hangs this long counts as failed
   * (default 3000; `connectTimeoutMs` applies after).
   */
  fallbackTimeoutMs?: number;
  /** While on the fallback, how often to try WebSocket again (default 60000). */
  webSocketRetryMs?: number;
  /** The stream's URL (default: the WebSocket URL with http(s) and `/sse` for `/ws`). */
  sseUrl?: string;
  /** Send cookies with a cross-origin stream (a token in the `sidecast_token` cookie). */
  withCredentials?: boolean;
  /** An EventSource implementation for environments without a global one. */
  EventSource?: typeof EventSource;
}

/** How events reach the page. */
export type Transport = "websocket" | "sse";

export interface SubscribeOptions {
  /**
   * Start with the channel's latest events, up to this many (the server's `history_size` at
   * most), before live ones: the page renders the current state at once. After a reconnect
   * whose resume could not be recovered, they come again after `onGap`.
   */
  rewind?: number;
  /** Events were lost (the server could not replay them): reload this channel's state. */
  onGap?: (info: { channel: string }) => void;
  /** The server refused the subscription (invalid_channel, forbidden, too_many_subscriptions). */
  onError?: (error: SidecastError) => void;
  /**
   * Events published with `ack` are confirmed only when the page calls `meta.ack()`, not
   * when the callback returns: for a page that finishes its work later.
   */
  manualAck?: boolean;
}

/** One member of a presence channel: a user (all its tabs), or without authentication one
 * connection. */
export interface Member {
  /** The user (`sub`), or without authentication the connection's client id. */
  id: string;
  /** The user, when authenticated. */
  user?: string;
  /** The client ids of its connections, as of when it joined (or the last snapshot). */
  clients: string[];
  /** Public information from its token's `presence` claim. */
  info?: Json;
}

export interface PresenceEvents {
  /** A member arrived (its first tab). */
  join: Member;
  /** A member left (its last tab closed, and it did not come back within the linger). */
  leave: Member;
  /** The list changed, or was replaced by the server's after a reconnect. */
  presence: Member[];
}

export interface Subscription {
  readonly channel: string;
  /** Stops the callbacks; the channel is left once its last subscription is gone. */
  unsubscribe(): void;
  /** Who is on the channel, when it is one of the server's `presence_channels` (else empty). */
  presence(): Member[];
  /** Listens to presence changes; returns a function that stops listening. */
  on<K extends keyof PresenceEvents>(event: K, listener: (value: PresenceEvents[K]) => void): () => void;
}

export interface SidecastEvents {
  status: Status;
  gap: { channel: string };
  error: SidecastError;
  broadcast: Json;
  user: UserEvent;
}

export declare class Sidecast {
  /** Connects at once and keeps reconnecting until `close()`. */
  constructor(url: string, options?: SidecastOptions);
  readonly status: Status;
  /** "sse" while WebSocket cannot be opened and events come over Server-Sent Events. */
  readonly transport: Transport;
  /** The authenticated user (the token's `sub`) once connected; null with authentication off. */
  readonly userId: string | null;
  on<K extends keyof SidecastEvents>(event: K, listener: (value: SidecastEvents[K]) => void): () => void;
  /**
   * Calls `onEvent` for each event on `channel`, in order, once each. An event published with
   * `ack` is acknowledged once `onEvent` returns without throwing, or once the Promise it
   * returns resolves (with `manualAck`: once `meta.ack()` is called).
   */
  subscribe<T = Json>(
    channel: string,
    onEvent: (data: T, meta: EventMeta) => unknown,
    options?: SubscribeOptions,
  ): Subscription;
  close(): void;
}
