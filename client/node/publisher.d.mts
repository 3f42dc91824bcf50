/** Why a publish failed. */
export class PublishError extends Error {
  readonly name: "PublishError";
  /**
   * - `rejected`: the server refused the command (`reply.error` says why); do not retry it as is
   * - `disconnected`: the connection closed before the reply; retry (with `idem`, safely)
   * - `timeout`: no reply in time; retry with `idem`
   * - `unreachable`: cannot connect (server down, wrong path or URL)
   * - `unauthorized`: the HTTP listener refused the key
   * - `unavailable`: the engine could not store it (a reply with `retry: true`, Redis
   *   unreachable), or over HTTP a 5xx answer; retry with `idem`
   * - `closed`: `close()` was called
   */
  readonly code:
    | "rejected"
    | "disconnected"
    | "timeout"
    | "unreachable"
    | "unauthorized"
    | "unavailable"
    | "closed";
  /** Whether the same publish may succeed if tried again. */
  readonly retryable: boolean;
  /** The server's reply, for `rejected`. */
  readonly reply?: { id: number | null; ok: false; error: string };
  /** The HTTP status, over HTTP. */
  readonly status?: number;
}

export interface PublisherOptions {
  /** The publish socket's path (NDJSON, one connection, many publishes in flight). */
  socket?: string;
  /** The server's `publish_listen` address, e.g. `http://127.0.0.1:3002` (one POST per publish). */
  url?: string;
  /** The publish key, for `url` (sent as `Authorization: Bearer`). */
  key?: string;
  /** How long a publish may wait for its reply (and for a connection). Default 10000. */
  timeoutMs?: number;
  /** Publishes awaiting their reply at most; further ones wait for a slot. Default 1000. */
  maxInFlight?: number;
  /** Reconnect backoff, doubled per failure with jitter. Defaults 100 and 5000. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
}

export interface PublishOptions {
  /** Idempotency key: a retry under it is answered with the first result, not published again. */
  idem?: string;
  /** Socket only: resolve once written, without waiting for a reply. */
  fireAndForget?: boolean;
  /** Overrides the publisher's timeout for this publish. */
  timeoutMs?: number;
  /**
   * The pages acknowledge the event within this many ms, and the publish resolves with the
   * `AckReport` that follows the reply (at the latest after this time; over HTTP the
   * response waits for it).
   */
  ackTimeoutMs?: number;
}

/** What became of an acknowledged event (docs/protocol.md, "Acknowledged events"). */
export interface AckReport {
  id: number;
  type: "ack_report";
  channel: string;
  seq: number;
  /** WebSockets it was queued to, on every node: acked + timedOut + disconnected + lost. */
  delivered: number;
  acked: number;
  timedOut: number;
  disconnected: number;
  /** Pages on nodes that delivered and then sent no final count (the node died). */
  lost: number;
  /** Nodes the event went to (1 with the memory engine). */
  nodes: number;
  /** Of them, nodes that sent no final count before the deadline. */
  nodesLost: number;
}

/** The server's reply (docs/protocol.md, "Publish port"). */
export interface Reply {
  id?: number | null;
  ok: true;
  /** The event's sequence number on its channel. */
  seq?: number;
  /** For a multi-channel publish: each channel's seq. */
  seqs?: Record<string, number>;
  /** WebSocket connections the event was queued to (the memory engine). */
  delivered?: number;
  /** Nodes subscribed to the channel when Redis published it (the Redis engine). */
  nodes?: number;
  /** True when `idem` was already used: nothing was published now. */
  duplicate?: boolean;
  /** For `disconnectUser`: connections closed. */
  disconnected?: number;
}

export class Publisher {
  constructor(options: PublisherOptions);
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<Reply>;
  publish(
    channel: string,
    data: unknown,
    options: PublishOptions & { ackTimeoutMs: number },
  ): Promise<AckReport>;
  publishToUser(user: string, data: unknown, options?: PublishOptions): Promise<Reply>;
  publishToUser(
    user: string,
    data: unknown,
    options: PublishOptions & { ackTimeoutMs: number },
  ): Promise<AckReport>;
  broadcast(data: unknown, options?: PublishOptions): Promise<Reply>;
  disconnectUser(user: string, options?: PublishOptions): Promise<Reply>;
  /** Any publish command (docs/protocol.md); the id is added for you. */
  send(command: object, options?: PublishOptions): Promise<Reply>;
  /** Refuses new publishes, waits for every reply (or its timeout), then disconnects. */
  close(): Promise<void>;
}
