// sidecast.js: the browser client of sidecast. One ES module, no dependencies, no build step.
// The server serves this file at GET /sidecast.js. Wire protocol: docs/protocol.md; guide and
// examples: docs/client.md.
//
// Invariants:
// - the page's wishes (which channels, which callbacks) live in `#channels` whatever the
//   connection does; each (re)connection subscribes to all of them, so nothing asked for while
//   disconnected is lost;
// - per channel, events reach the page in seq order and at most once: after a reconnect the
//   client resumes with `since` {seq, epoch} and drops any event it has already delivered;
// - exactly one transport is current: a WebSocket, or, when WebSocket opens keep failing, a
//   Server-Sent Events stream (`/sse`) naming every channel with where it resumes; events from
//   an abandoned one are ignored. A change of channels on a stream reopens it; the stream
//   tries WebSocket again every `webSocketRetryMs` and hands over once one is connected.
//   Either way the new transport resumes from the last event delivered, so a switch loses
//   and repeats nothing;
// - requests leave within the message budget the server announces in `connected`, so the
//   server's rate limit never drops one (a page may resubscribe to 100 channels at once); one
//   it drops anyway (its error names the request's id) is sent again;
// - the queue of requests waiting for the budget holds at most one per channel (the latest
//   wish wins) and one ping, so it is bounded by the page's own channels;
// - an error about a request only affects the subscription that request made: a late refusal
//   of an old subscribe never removes a newer subscription to the same channel.

const CHANNEL_NAME = /^[A-Za-z0-9_:.-]{1,128}$/;

/** Close codes after which reconnecting cannot help (4001 only without `getToken`). */
const UNAUTHORIZED = 4001;
const DISCONNECTED_BY_SERVER = 4003;
/** The user is at `max_connections_per_user`: reported, and retried with the backoff. */
const TOO_MANY_CONNECTIONS = 4008;
/** What a browser reports for a connection lost without a close: used for the watchdog's. */
const ABNORMAL_CLOSURE = 1006;
/** Consecutive attempts that never reach `connected` before the page is told (once). */
const UNREACHABLE_AFTER = 3;
/** Channels per batch `subscribe`: 10 messages of the server's budget (burst 50 by default). */
const BATCH = 100;
/** Seqs one ack message may carry (the server's limit). */
const MAX_ACK_BATCH = 100;
/** Acked seqs per channel sent again after a reconnect, in case the old connection lost them. */
const RESENT_ACKS = 20;
// Presence changes kept while a channel's snapshot is on its way (more are dropped: the
// snapshot, when it comes, has them).
const MAX_EARLY_PRESENCE = 1000;
/** setTimeout's longest delay; a longer one would fire at once. */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

/** The `exp` claim (seconds) of a JWT, or null when it has none or is not a JWT. */
function expiryOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(payload)).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

const DEFAULTS = {
  initialDelayMs: 500,
  maxDelayMs: 30_000,
  stableAfterMs: 10_000,
  connectTimeoutMs: 10_000,
  fallback: true,
  fallbackAfter: 2,
  fallbackTimeoutMs: 3_000,
  webSocketRetryMs: 60_000,
  withCredentials: false,
};

/** The stream URL beside a WebSocket URL: http(s), and `/sse` in place of a last `/ws`. */
function streamUrlOf(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = url.pathname.replace(/\/ws$/, "") + "/sse";
  url.search = "";
  return url;
}

export class Sidecast {
  #url;
  #streamUrl;
  #options;
  #token;
  #ws = null;
  /** The event stream while the transport is "sse". */
  #stream = null;
  #transport = "websocket";
  /** WebSocket attempts in a row that never reached `connected`. */
  #webSocketFailures = 0;
  /** A WebSocket reached `connected` once: a slow open is no longer taken for a blocked one. */
  #webSocketWorked = false;
  /** While on a stream: the next WebSocket attempt, and the one under way. */
  #probeTimer = null;
  #probe = null;
  /** A reopen of the stream with the page's new set of channels is queued. */
  #reopening = false;
  /** The channels the current stream was opened with. */
  #streamChannels = [];
  #status = "disconnected";
  #closed = false;
  /** channel → { seq, epoch, subs: Set<{onEvent, onGap, onError}> } */
  #channels = new Map();
  #listeners = new Map();
  #attempt = 0;
  #heartbeatMs = 30_000;
  #lastFrameAt = 0;
  #retryTimer = null;
  #watchdogTimer = null;
  #stableTimer = null;
  #refreshTimer = null;
  /** Requests waiting for the budget, by key (a channel, or the type): the latest wins. */
  #outbox = new Map();
  /** { rate, burst, tokens, at } on this connection. */
  #budget = null;
  /** Acks to send, by channel. */
  #acks = new Map();
  #outboxTimer = null;
  /** Requests sent and not answered yet, by id. */
  #inFlight = new Map();
  #nextId = 1;
  #userId = null;
  /** Attempts since the last `connected`; the page hears of it once at UNREACHABLE_AFTER. */
  #failedAttempts = 0;

  /**
   * @param {string} url the server's WebSocket URL, e.g. "ws://localhost:3001/ws"
   * @param {object} [options] see sidecast.d.ts
   */
  constructor(url, options = {}) {
    this.#url = new URL(url);
    if (this.#url.protocol !== "ws:" && this.#url.protocol !== "wss:") {
      throw new TypeError(`${JSON.stringify(url)} is not a ws:// or wss:// URL`);
    }
    this.#options = { ...DEFAULTS, ...options };
    this.#streamUrl = new URL(options.sseUrl ?? streamUrlOf(this.#url));
    this.#token = options.token;
    this.#start();
  }

  /** "connecting", "connected" or "disconnected". */
  get status() {
    return this.#status;
  }

  /** "websocket", or "sse" while WebSocket cannot be opened and events come over `/sse`. */
  get transport() {
    return this.#transport;
  }

  /** The authenticated user (`sub`) from the server's `connected`; null with auth off. */
  get userId() {
    return this.#userId;
  }

  /**
   * Listens to "status" (s), "gap" ({channel}), "error" ({code, message, ...}),
   * "broadcast" (data) or "user" ({data, channel, seq}: an event the server directed to this
   * page's user). Returns a function that stops listening.
   */
  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return () => this.#listeners.get(event)?.delete(listener);
  }

  /**
   * Calls `onEvent(data, {channel, seq})` for each event on `channel`, in order, once each,
   * across reconnections. `options.rewind` (a number of events) starts with the channel's
   * latest events, so a page renders the current state at once (and gets them again after a
   * reconnect whose resume could not be recovered). `options.onGap({channel})` is called
   * when events were lost (the server could not replay them); `options.onError(error)` when
   * the server refuses the subscription. An event published with `ack` is acknowledged once
   * `onEvent` returns without throwing (or the Promise it returns resolves); with
   * `options.manualAck`, once the page calls `meta.ack()`. Returns `{channel, unsubscribe(),
   * presence(), on(event, listener)}`: on a presence channel (the server's
   * `presence_channels`), `presence()` lists who is here (one member per user, with the
   * client ids of its tabs), and `on("join" | "leave", member => ...)` and
   * `on("presence", members => ...)` tell of changes; a reconnect replaces the list with the
   * server's and tells only what differs.
   */
  subscribe(channel, onEvent, options = {}) {
    if (typeof channel !== "string" || !CHANNEL_NAME.test(channel)) {
      throw new TypeError(`invalid channel name ${JSON.stringify(channel)}: 1 to 128 of A-Z a-z 0-9 _ : . -`);
    }
    if (typeof onEvent !== "function") throw new TypeError("onEvent must be a function");
    const rewind = options.rewind ?? 0;
    if (!Number.isInteger(rewind) || rewind < 0) throw new TypeError("rewind must be a whole number");
    const sub = {
      onEvent,
      onGap: options.onGap,
      onError: options.onError,
      manualAck: Boolean(options.manualAck),
      listeners: new Map(),
    };
    let state = this.#channels.get(channel);
    if (!state) {
      state = {
        seq: null,
        epoch: null,
        subs: new Set(),
        requestId: null,
        rewind,
        recent: [],
        acked: [],
        presence: { members: new Map(), version: -1, known: false, early: [], count: null },
      };
      this.#channels.set(channel, state);
      if (this.#status === "connected") this.#subscribeOnServer(channel, state);
    } else if (rewind > 0) {
      // The channel is live already: this subscriber starts from the latest events the
      // client kept for it, and the client keeps as many from now on.
      state.rewind = Math.max(state.rewind, rewind);
      const latest = state.recent.slice(-rewind);
      queueMicrotask(() => {
        if (!state.subs.has(sub)) return;
        for (const { data, meta } of latest) this.#call(sub.onEvent, data, meta);
      });
    }
    state.subs.add(sub);
    return {
      channel,
      presence: () => [...state.presence.members.values()],
      on: (event, listener) => {
        if (!sub.listeners.has(event)) sub.listeners.set(event, new Set());
        sub.listeners.get(event).add(listener);
        return () => sub.listeners.get(event)?.delete(listener);
      },
      unsubscribe: () => {
        if (this.#channels.get(channel) !== state || !state.subs.delete(sub)) return;
        if (state.subs.size > 0) return;
        this.#channels.delete(channel);
        if (this.#status !== "connected") return;
        if (this.#transport === "sse") this.#reopenStream();
        else this.#send({ type: "unsubscribe", channel });
      },
    };
  }

  /** Closes the connection for good: no more reconnects. */
  close() {
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    const ws = this.#ws;
    this.#abandon();
    this.#stopProbing();
    ws?.close(1000);
    this.#setStatus("disconnected");
  }

  async #start() {
    if (this.#token === undefined && this.#options.getToken) {
      if (!(await this.#fetchToken())) return;
    }
    this.#connect();
  }

  #connect() {
    if (this.#closed) return;
    if (this.#transport === "sse") return this.#openStream();
    const url = new URL(this.#url);
    if (this.#token) url.searchParams.set("token", this.#token);
    const WebSocketImpl = this.#options.WebSocket ?? globalThis.WebSocket;
    this.#setStatus("connecting");
    let ws;
    try {
      ws = new WebSocketImpl(url.href);
    } catch (error) {
      // The browser refused the URL itself (a blocked port, mixed content...): retrying the
      // same URL cannot help, so the client stops and says why.
      // (Later, so listeners added right after the constructor hear of it too.)
      this.#closed = true;
      this.#setStatus("disconnected");
      const fatal = { code: "connect_failed", message: String(error), fatal: true };
      queueMicrotask(() => this.#emit("error", fatal));
      return;
    }
    this.#ws = ws;
    this.#lastFrameAt = Date.now();
    // Until a WebSocket has worked once, an open that hangs (a proxy that swallows the
    // upgrade) is given up after `fallbackTimeoutMs`, so the fallback comes within seconds.
    const { connectTimeoutMs, fallback, fallbackTimeoutMs } = this.#options;
    const patience = fallback && !this.#webSocketWorked ? Math.min(connectTimeoutMs, fallbackTimeoutMs) : connectTimeoutMs;
    this.#armWatchdog(patience);
    ws.onmessage = (message) => this.#onMessage(message);
    ws.onclose = (close) => this.#onClose(close.code, close.reason);
  }

  /**
   * Opens the event stream: every channel, each with where it resumes (`lastEventId`, the
   * stream's own id format: `epoch:seq` per channel, in order) and its `rewind`.
   */
  #openStream() {
    const url = new URL(this.#streamUrl);
    const channels = [...this.#channels];
    url.searchParams.set(
      "channels",
      channels.map(([channel, state]) => (state.rewind > 0 ? `${channel}~${state.rewind}` : channel)).join(","),
    );
    const positions = channels.map(([, state]) => (state.epoch === null ? "" : `${state.epoch}:${state.seq}`));
    if (positions.some((p) => p !== "")) url.searchParams.set("lastEventId", positions.join(","));
    if (this.#token) url.searchParams.set("token", this.#token);
    const EventSourceImpl = this.#options.EventSource ?? globalThis.EventSource;
    if (this.#status !== "connected") this.#setStatus("connecting");
    const stream = new EventSourceImpl(url.href, { withCredentials: this.#options.withCredentials });
    this.#stream = stream;
    this.#streamChannels = channels.map(([channel]) => channel);
    // A stream that does not say `connected` in time is retried; once it has, the browser
    // reports its failures.
    clearTimeout(this.#watchdogTimer);
    this.#watchdogTimer = setTimeout(() => this.#onClose(ABNORMAL_CLOSURE), this.#options.connectTimeoutMs);
    stream.onmessage = (message) => this.#onMessage(message);
    // The client reconnects by itself, with its backoff and a fresh URL (token, positions):
    // the browser's own retry would resend the first URL.
    stream.onerror = () => this.#onClose(ABNORMAL_CLOSURE);
  }

  /** The page's channels changed while on a stream: reopen it with the new set, at once. */
  #reopenStream() {
    if (this.#reopening) return;
    this.#reopening = true;
    queueMicrotask(() => {
      this.#reopening = false;
      if (this.#closed || this.#transport !== "sse" || !this.#stream) return;
      this.#abandon();
      this.#openStream();
    });
  }

  /** While on a stream: tries a WebSocket every `webSocketRetryMs`, and hands over to it. */
  #scheduleProbe() {
    clearTimeout(this.#probeTimer);
    this.#probeTimer = setTimeout(() => this.#probeWebSocket(), this.#options.webSocketRetryMs);
  }

  #probeWebSocket() {
    if (this.#closed || this.#transport !== "sse") return;
    const url = new URL(this.#url);
    if (this.#token) url.searchParams.set("token", this.#token);
    const WebSocketImpl = this.#options.WebSocket ?? globalThis.WebSocket;
    let ws;
    try {
      ws = new WebSocketImpl(url.href);
    } catch {
      return;
    }
    this.#probe = ws;
    const giveUp = setTimeout(() => ws.close(), this.#options.connectTimeoutMs);
    ws.onclose = () => {
      clearTimeout(giveUp);
      this.#probe = null;
      this.#scheduleProbe();
    };
    ws.onmessage = (message) => {
      clearTimeout(giveUp);
      this.#probe = null;
      ws.onclose = (close) => this.#onClose(close.code, close.reason);
      ws.onmessage = (later) => this.#onMessage(later);
      // Hand over: the stream goes, and the WebSocket's `connected` resubscribes every
      // channel from the last event the stream delivered.
      this.#abandon();
      this.#transport = "websocket";
      this.#ws = ws;
      this.#onMessage(message);
    };
  }

  #stopProbing() {
    clearTimeout(this.#probeTimer);
    if (this.#probe) {
      this.#probe.onclose = null;
      this.#probe.onmessage = null;
      this.#probe.close();
      this.#probe = null;
    }
  }

  #onMessage(message) {
    this.#lastFrameAt = Date.now();
    let msg;
    try {
      msg = JSON.parse(message.data);
    } catch {
      return;
    }
    switch (msg.type) {
      case "connected":
        this.#failedAttempts = 0;
        this.#userId = msg.userId ?? null;
        this.#stableTimer = setTimeout(() => (this.#attempt = 0), this.#options.stableAfterMs);
        if (this.#transport === "sse") {
          // The stream subscribed every channel of its URL, and cannot carry requests: no
          // budget, no refresh (the token is renewed when the stream reopens), no pings.
          clearTimeout(this.#watchdogTimer);
          this.#setStatus("connected");
          // The page's channels changed while the stream was opening.
          const opened = this.#streamChannels;
          if (opened.length !== this.#channels.size || opened.some((c) => !this.#channels.has(c))) {
            this.#reopenStream();
          }
          break;
        }
        this.#webSocketFailures = 0;
        this.#webSocketWorked = true;
        this.#stopProbing();
        this.#heartbeatMs = msg.heartbeatMs || this.#heartbeatMs;
        this.#budget = {
          rate: msg.rateLimit || 20,
          burst: msg.rateBurst || 50,
          tokens: msg.rateBurst || 50,
          at: Date.now(),
        };
        this.#armWatchdog(this.#heartbeatMs / 2);
        this.#scheduleRefresh();
        this.#subscribeAll([...this.#channels.keys()]);
        this.#setStatus("connected");
        break;
      case "subscribed":
        this.#inFlight.delete(msg.id);
        this.#onSubscribed(msg);
        break;
      case "unsubscribed":
      case "pong":
        this.#inFlight.delete(msg.id);
        break;
      case "refreshed":
        this.#inFlight.delete(msg.id);
        this.#scheduleRefresh();
        break;
      case "event":
        if (msg.broadcast) {
          this.#emit("broadcast", msg.data);
        } else {
          this.#onEvent(msg);
        }
        break;
      case "gap":
        this.#onGap(msg);
        break;
      case "presence":
        this.#onPresence(msg);
        break;
      case "presence_diff":
        this.#onPresenceDiff(msg);
        break;
      case "error":
        this.#onError(msg);
        break;
      case "close":
        // A stream the server ended says why, as a WebSocket's Close frame would.
        this.#onClose(msg.code, msg.reason);
        break;
    }
  }

  /** Events up to `seq` of `epoch` are lost (a shared engine could not fill a hole): the
   * page reloads its state, and resumes from there. */
  #onGap({ channel, seq, epoch }) {
    const state = this.#channels.get(channel);
    if (!state) return;
    state.seq = seq;
    state.epoch = epoch;
    for (const sub of state.subs) this.#call(sub.onGap, { channel });
    this.#emit("gap", { channel });
  }

  /** The server's list of who is on a presence channel (after each `subscribed`): it replaces
   * the page's, telling only what differs, then the changes that came meanwhile follow. */
  #onPresence({ channel, version, members, count }) {
    const state = this.#channels.get(channel);
    if (!state) return;
    const presence = state.presence;
    const listed = new Map((members ?? []).map((member) => [member.id, member]));
    const left = [...presence.members.values()].filter((m) => !listed.has(m.id));
    const joined = [...listed.values()].filter((m) => !presence.members.has(m.id));
    presence.members = listed;
    presence.version = version;
    presence.count = count ?? null;
    presence.known = true;
    for (const member of left) this.#emitPresence(state, "leave", member);
    for (const member of joined) this.#emitPresence(state, "join", member);
    const early = presence.early;
    presence.early = [];
    for (const diff of early) this.#onPresenceDiff(diff);
    this.#emitPresence(state, "presence", [...presence.members.values()]);
  }

  /** Members joined or left: applied when newer than what the page has (a diff may repeat
   * what its snapshot already said); kept until the snapshot when it comes first. */
  #onPresenceDiff(diff) {
    const state = this.#channels.get(diff.channel);
    if (!state) return;
    const presence = state.presence;
    if (!presence.known) {
      if (presence.early.length < MAX_EARLY_PRESENCE) presence.early.push(diff);
      return;
    }
    if (diff.version <= presence.version) return;
    presence.version = diff.version;
    let changed = false;
    for (const member of diff.joins ?? []) {
      const known = presence.members.has(member.id);
      presence.members.set(member.id, member);
      if (!known) {
        changed = true;
        this.#emitPresence(state, "join", member);
      }
    }
    for (const id of diff.leaves ?? []) {
      const member = presence.members.get(id);
      if (!member) continue;
      presence.members.delete(id);
      changed = true;
      this.#emitPresence(state, "leave", member);
    }
    if (changed) this.#emitPresence(state, "presence", [...presence.members.values()]);
  }

  #emitPresence(state, event, value) {
    for (const sub of [...state.subs]) {
      for (const listener of [...(sub.listeners.get(event) ?? [])]) this.#call(listener, value);
    }
  }

  #onSubscribed({ channel, seq, epoch, recovered }) {
    const state = this.#channels.get(channel);
    if (!state) return;
    // A snapshot of the channel's presence follows, if it has any: until then, changes wait.
    state.presence.known = false;
    if (recovered === false) {
      for (const sub of state.subs) this.#call(sub.onGap, { channel });
      this.#emit("gap", { channel });
    }
    // Recovered: the missed events follow and advance `seq` themselves.
    if (recovered !== true) state.seq = seq;
    state.epoch = epoch;
    // Acks sent just before a reconnect may have been lost with the old connection: the
    // server counts them again for a page that resumed, and ignores the rest.
    for (const acked of state.acked) this.#ack(channel, acked);
  }

  #onEvent({ channel, seq, data, ack }) {
    const state = this.#channels.get(channel);
    if (this.#userId !== null && channel === `user:${this.#userId}`) {
      // Directed to this page's user: it arrives whether or not the page subscribed, once.
      this.#emit("user", { data, channel, seq });
      if (ack && !state) this.#ack(channel, seq);
    }
    if (!state || (state.seq !== null && seq <= state.seq)) return;
    state.seq = seq;
    const meta = { channel, seq };
    if (state.rewind > 0) {
      state.recent.push({ data, meta });
      if (state.recent.length > state.rewind) state.recent.shift();
    }
    if (!ack) {
      for (const sub of [...state.subs]) this.#call(sub.onEvent, data, meta);
      return;
    }
    // Acknowledged once every subscriber handled it; one that throws (or whose Promise
    // rejects) withholds the ack, and the worker's report says the page did not confirm.
    const handled = [...state.subs].map((sub) => this.#handle(sub, data, meta));
    Promise.all(handled).then((results) => {
      if (!results.every(Boolean)) return;
      state.acked.push(seq);
      if (state.acked.length > RESENT_ACKS) state.acked.shift();
      if (this.#channels.get(channel) === state) this.#ack(channel, seq);
    });
  }

  /** Runs a subscriber's callback for an event that asks for an ack: resolves true once it
   * is handled (returned, its Promise resolved, or `meta.ack()` called with `manualAck`). */
  #handle(sub, data, meta) {
    if (sub.manualAck) {
      return new Promise((resolve) => this.#call(sub.onEvent, data, { ...meta, ack: () => resolve(true) }));
    }
    const fail = (error) => {
      this.#report(error);
      return false;
    };
    try {
      const result = sub.onEvent(data, meta);
      return typeof result?.then === "function" ? Promise.resolve(result).then(() => true, fail) : true;
    } catch (error) {
      return fail(error);
    }
  }

  /** Queues an ack of `channel`'s event `seq`; the acks of one turn go out together, one
   * message per channel (up to 100 seqs each). */
  #ack(channel, seq) {
    if (this.#status !== "connected" || this.#transport !== "websocket") return;
    const seqs = this.#acks.get(channel) ?? [];
    if (!seqs.includes(seq)) seqs.push(seq);
    this.#acks.set(channel, seqs);
    this.#outboxTimer ??= setTimeout(() => this.#flush(), 0);
  }

  #onError(error) {
    const request = this.#inFlight.get(error.id);
    this.#inFlight.delete(error.id);
    if (error.code === "rate_limited" && request) {
      // Dropped by the server's limit after all (its clock runs apart from ours): wait for
      // a full refill and send it again, if it is still what the page wants.
      if (this.#budget) this.#budget.tokens = 0;
      this.#retry(request);
      return;
    }
    const state = error.channel === undefined ? undefined : this.#channels.get(error.channel);
    const refusesSubscription = ["invalid_channel", "forbidden", "too_many_subscriptions"];
    // Only the subscription this request made: a newer one to the same channel stays.
    if (state && refusesSubscription.includes(error.code) && state.requestId === error.id) {
      this.#channels.delete(error.channel);
      for (const sub of state.subs) this.#call(sub.onError, error);
    }
    this.#emit("error", error);
  }

  /** Sends a dropped request again when it still stands for what the page wants. */
  #retry(request) {
    const state = this.#channels.get(request.channel);
    switch (request.type) {
      case "subscribe":
        if (request.channels) {
          const standing = request.channels
            .map((entry) => entry.channel)
            .filter((channel) => this.#channels.get(channel)?.requestId === request.id);
          this.#subscribeAll(standing);
        } else if (state && state.requestId === request.id) {
          this.#subscribeOnServer(request.channel, state);
        }
        break;
      case "unsubscribe":
        if (!state) this.#send({ type: "unsubscribe", channel: request.channel });
        break;
      case "refresh":
        this.#send({ type: "refresh", token: this.#token });
        break;
      // A dropped ping needs no answer: any frame proves the connection alive.
    }
  }

  /**
   * What to ask the server for `channel`: a resume from the last event delivered when there
   * is one; with `rewind`, the latest events first (or after a resume that could not be
   * recovered).
   */
  #entry(channel, state) {
    const since = state.epoch === null ? undefined : { seq: state.seq, epoch: state.epoch };
    const rewind = state.rewind > 0 ? state.rewind : undefined;
    return { channel, since, rewind };
  }

  /** Subscribes one channel on the server. */
  #subscribeOnServer(channel, state) {
    if (this.#transport === "sse") return this.#reopenStream();
    state.requestId = this.#send({ type: "subscribe", ...this.#entry(channel, state) });
  }

  /**
   * Subscribes (and resumes) `channels` on the server in as few requests as possible: one per
   * BATCH channels (fewer when the server's burst is small), each charged one message per 10
   * channels, so 100 channels are one request.
   */
  #subscribeAll(channels) {
    // A batch never costs more than the server's burst, or it could never be sent.
    const size = Math.max(1, Math.min(BATCH, Math.floor(this.#budget.burst) * 10));
    for (let i = 0; i < channels.length; i += size) {
      const states = channels.slice(i, i + size).map((channel) => [channel, this.#channels.get(channel)]);
      const entries = states.map(([channel, state]) => this.#entry(channel, state));
      const id = this.#send({ type: "subscribe", channels: entries });
      for (const [, state] of states) state.requestId = id;
    }
  }

  async #onClose(code, reason) {
    const wasConnected = this.#status === "connected";
    const onStream = this.#transport === "sse";
    this.#abandon();
    if (this.#closed) return;
    this.#setStatus("disconnected");
    if (!onStream && !wasConnected && ++this.#webSocketFailures >= this.#options.fallbackAfter) {
      if (this.#options.fallback && code === ABNORMAL_CLOSURE) {
        // WebSocket does not get through (a proxy that refuses the upgrade?): events come over
        // a stream from now on, and WebSocket is tried again later.
        this.#transport = "sse";
        this.#webSocketFailures = 0;
        this.#scheduleProbe();
      }
    }
    if (!wasConnected && ++this.#failedAttempts === UNREACHABLE_AFTER) {
      // Browsers hide why a WebSocket failed to open, so say what it usually is.
      this.#emit("error", {
        code: "unreachable",
        message:
          `${UNREACHABLE_AFTER} attempts in a row failed to connect to ${this.#url.href}; still ` +
          "retrying. The server may be down, or refusing this page's origin (HTTP 403: see " +
          "allowed_origin in the server's configuration and its log).",
      });
    }
    if (code === DISCONNECTED_BY_SERVER || (code === UNAUTHORIZED && !this.#options.getToken)) {
      this.#emit("error", { code, message: reason || "closed by the server", fatal: true });
      return;
    }
    if (code === TOO_MANY_CONNECTIONS) this.#emit("error", { code, message: reason });
    if (code === UNAUTHORIZED && !(await this.#fetchToken())) return;
    this.#scheduleReconnect();
  }

  /** Asks the app for a new token; false (and no more retries) when it cannot give one. */
  async #fetchToken() {
    try {
      this.#token = await this.#options.getToken();
      return !this.#closed;
    } catch (error) {
      this.#emit("error", { code: "get_token_failed", message: String(error) });
      return false;
    }
  }

  /**
   * With `getToken`, renews the token before it expires (a quarter of its remaining life
   * ahead, between 1 s and 60 s) with a `refresh` request, so the connection is never closed
   * for expiry. If the server refuses the new token, the old one runs out and the 4001 path
   * takes over.
   */
  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    const expiresAt = expiryOf(this.#token);
    if (!this.#options.getToken || expiresAt === null) return;
    const remainingMs = expiresAt * 1000 - Date.now();
    const delayMs = remainingMs - Math.min(60_000, Math.max(1_000, remainingMs / 4));
    // A token that looks expired already (a skewed clock?) is renewed by the 4001 path.
    if (delayMs <= 0) return;
    this.#refreshTimer = setTimeout(async () => {
      const ws = this.#ws;
      if (!(await this.#fetchToken()) || this.#ws !== ws || this.#status !== "connected") return;
      this.#send({ type: "refresh", token: this.#token });
    }, Math.min(delayMs, MAX_TIMEOUT_MS));
  }

  /** Exponential backoff with full jitter: a random delay below initial × 2^attempt, capped. */
  #scheduleReconnect() {
    if (this.#closed) return;
    const { initialDelayMs, maxDelayMs } = this.#options;
    const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** this.#attempt);
    this.#attempt += 1;
    this.#retryTimer = setTimeout(() => this.#connect(), Math.random() * ceiling);
  }

  /**
   * Checks every `periodMs` that the server still talks: after `heartbeatMs` of silence it
   * sends a ping (answered by a pong); after twice that, or before `connected` arrives within
   * the connect timeout, the connection is dead and the client reconnects.
   */
  #armWatchdog(periodMs) {
    clearTimeout(this.#watchdogTimer);
    this.#watchdogTimer = setTimeout(() => {
      const silent = Date.now() - this.#lastFrameAt;
      const connected = this.#status === "connected";
      if (!connected || silent > 2 * this.#heartbeatMs) {
        const ws = this.#ws;
        this.#onClose(ABNORMAL_CLOSURE);
        ws?.close();
        return;
      }
      if (silent >= this.#heartbeatMs) this.#send({ type: "ping" });
      this.#armWatchdog(periodMs);
    }, periodMs);
  }

  /** Detaches the current socket: its later events are ignored, its unsent requests dropped. */
  #abandon() {
    if (this.#stream) {
      this.#stream.onmessage = null;
      this.#stream.onerror = null;
      this.#stream.close();
      this.#stream = null;
    }
    clearTimeout(this.#watchdogTimer);
    clearTimeout(this.#stableTimer);
    clearTimeout(this.#outboxTimer);
    this.#outboxTimer = null;
    clearTimeout(this.#refreshTimer);
    this.#outbox.clear();
    this.#acks.clear();
    this.#inFlight.clear();
    if (this.#ws) {
      this.#ws.onmessage = null;
      this.#ws.onclose = null;
      this.#ws = null;
    }
  }

  /**
   * Queues a request with a fresh id and returns the id. A request still waiting for the
   * same channel (or a ping waiting behind another) is replaced: only the latest wish leaves.
   */
  #send(request) {
    const id = this.#nextId++;
    // At most one waiting request per channel, the latest; each batch waits on its own.
    const key = request.channels ? `batch:${id}` : (request.channel ?? request.type);
    this.#outbox.delete(key);
    this.#outbox.set(key, { ...request, id });
    if (this.#outboxTimer === null) this.#flush();
    return id;
  }

  /** Sends queued requests while the budget has tokens, then waits for the next one. */
  #flush() {
    this.#outboxTimer = null;
    for (const [channel, seqs] of this.#acks) {
      for (let at = 0; at < seqs.length; at += MAX_ACK_BATCH) {
        this.#outbox.set(`ack:${this.#nextId++}`, { type: "ack", channel, seqs: seqs.slice(at, at + MAX_ACK_BATCH) });
      }
    }
    this.#acks.clear();
    const budget = this.#budget;
    const now = Date.now();
    budget.tokens = Math.min(budget.burst, budget.tokens + ((now - budget.at) / 1000) * budget.rate);
    budget.at = now;
    const costOf = (request) => (request.channels ? Math.ceil(request.channels.length / 10) : 1);
    for (const [key, request] of this.#outbox) {
      const cost = costOf(request);
      if (budget.tokens < cost) break;
      budget.tokens -= cost;
      this.#outbox.delete(key);
      // An ack is never answered: nothing waits for it.
      if (request.type !== "ack") this.#inFlight.set(request.id, request);
      this.#ws.send(JSON.stringify(request));
    }
    if (this.#outbox.size > 0) {
      // A little past the refill, so the server's bucket (on its own clock) has it too.
      const next = this.#outbox.values().next().value;
      const waitMs = ((costOf(next) - budget.tokens) / budget.rate) * 1000 + 20;
      this.#outboxTimer = setTimeout(() => this.#flush(), waitMs);
    }
  }

  #setStatus(status) {
    if (status === this.#status) return;
    this.#status = status;
    this.#emit("status", status);
  }

  #emit(event, value) {
    for (const listener of [...(this.#listeners.get(event) ?? [])]) this.#call(listener, value);
  }

  /** Runs an app callback; its exception is reported but never breaks the client. */
  #call(callback, ...args) {
    if (!callback) return;
    try {
      callback(...args);
    } catch (error) {
      this.#report(error);
    }
  }

  /** Reports an app callback's exception as an uncaught one, without breaking the client. */
  #report(error) {
    if (typeof reportError === "function") reportError(error);
    else setTimeout(() => { throw error; });
  }
}
