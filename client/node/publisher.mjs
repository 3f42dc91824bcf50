// sidecast publisher for Node workers: no dependencies, Node 18 or later.
//
//   import { Publisher } from "./publisher.mjs";
//   const sidecast = new Publisher({ socket: "/run/sidecast/sidecast.sock" });
//   await sidecast.publish("project:42", { type: "progress", progress: 40 });
//
// Over the Unix socket it speaks the NDJSON publish protocol (docs/protocol.md, "Publish
// port") on one connection: requests carry ids, replies are matched to them, so many
// publishes can be in flight. Over HTTP (`url`, the server's `publish_listen`) each publish is
// one POST /publish. Errors are PublishError with a `code` and whether a retry may succeed
// (`retryable`); pass `idem` to make a retry safe (the server answers it with the first
// result instead of publishing twice). Pass `ackTimeoutMs` to have the pages acknowledge the
// event: the publish then resolves with the server's ack_report (how many pages got it,
// acked, timed out, disconnected) instead of the plain reply.

import net from "node:net";

/** Why a publish failed. */
export class PublishError extends Error {
  /**
   * @param {string} message
   * @param {{code: string, retryable: boolean, reply?: object, status?: number}} details
   */
  constructor(message, { code, retryable, reply, status }) {
    super(message);
    this.name = "PublishError";
    this.code = code;
    this.retryable = retryable;
    this.reply = reply;
    this.status = status;
  }
}

const DEFAULTS = {
  timeoutMs: 10_000,
  maxInFlight: 1000,
  reconnectMinMs: 100,
  reconnectMaxMs: 5000,
};

export class Publisher {
  #options;
  #socket = null;
  #connecting = null;
  #input = "";
  #nextId = 1;
  /** id → {resolve, reject, timer, reply} */
  #inFlight = new Map();
  /** Callers waiting for an in-flight slot. */
  #slots = [];
  /** Serializes writes, so lines leave in call order and each waits for drain. */
  #writing = Promise.resolve();
  #failures = 0;
  #closed = false;

  /**
   * @param {{socket?: string, url?: string, key?: string, timeoutMs?: number,
   *          maxInFlight?: number, reconnectMinMs?: number, reconnectMaxMs?: number}} options
   */
  constructor(options = {}) {
    if (Boolean(options.socket) === Boolean(options.url)) {
      throw new TypeError("give exactly one of socket (a path) or url (http://host:port)");
    }
    this.#options = { ...DEFAULTS, ...options };
  }

  /** Publishes `data` to `channel`. Resolves with the reply ({seq, delivered or nodes, ...}). */
  publish(channel, data, options = {}) {
    return this.send({ channel, data }, options);
  }

  /** Publishes to every connection of `user` (the channel `user:<user>`). */
  publishToUser(user, data, options = {}) {
    return this.send({ user, data }, options);
  }

  /** Publishes to every open WebSocket. */
  broadcast(data, options = {}) {
    return this.send({ broadcast: true, data }, options);
  }

  /** Closes every connection of `user` (close code 4003). */
  disconnectUser(user, options = {}) {
    return this.send({ op: "disconnect", user }, options);
  }

  /**
   * Sends one command. With `fireAndForget` (socket only) it resolves once the line is
   * written, without a reply.
   * @param {object} command
   * @param {{idem?: string, fireAndForget?: boolean, timeoutMs?: number, ackTimeoutMs?: number}} options
   */
  async send(command, { idem, fireAndForget = false, timeoutMs, ackTimeoutMs } = {}) {
    if (this.#closed) {
      throw new PublishError("the publisher is closed", { code: "closed", retryable: false });
    }
    let body = idem === undefined ? command : { ...command, idem };
    const timeout = timeoutMs ?? this.#options.timeoutMs;
    if (ackTimeoutMs !== undefined) {
      if (fireAndForget) throw new TypeError("ackTimeoutMs needs a reply (not fireAndForget)");
      body = { ...body, ack: { timeout: `${ackTimeoutMs}ms` } };
    }
    if (this.#options.url) {
      // An acknowledged publish's response waits for its report, which needs an id.
      const posted = body.ack ? { id: this.#nextId++, ...body } : body;
      return this.#post(posted, timeout + (ackTimeoutMs ?? 0));
    }
    if (fireAndForget) {
      await this.#write(JSON.stringify(body) + "\n", timeout);
      return { ok: true };
    }
    await this.#slot();
    const id = this.#nextId++;
    const entry = {};
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const error = new PublishError(`no reply within ${timeout} ms`, {
          code: "timeout",
          retryable: true,
        });
        this.#settle(id, null, error);
      }, timeout);
      Object.assign(entry, { resolve, reject, timer, timeout, ackTimeoutMs });
    });
    entry.reply = reply.catch(() => {});
    this.#inFlight.set(id, entry);
    this.#write(JSON.stringify({ id, ...body }) + "\n", timeout).catch((error) =>
      this.#settle(id, null, error),
    );
    return reply;
  }

  /** Refuses new publishes, waits for every reply (or its timeout), then disconnects. */
  async close() {
    this.#closed = true;
    await this.#writing;
    await Promise.allSettled([...this.#inFlight.values()].map((entry) => entry.reply));
    this.#socket?.end();
    this.#socket = null;
  }

  async #post(body, timeout) {
    const headers = { "content-type": "application/json" };
    if (this.#options.key) {
      headers.authorization = `Bearer ${this.#options.key}`;
    }
    let response;
    try {
      response = await fetch(new URL("/publish", this.#options.url), {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(timeout),
      });
    } catch (error) {
      const code = error.name === "TimeoutError" ? "timeout" : "unreachable";
      throw new PublishError(`cannot reach ${this.#options.url}: ${error.message}`, {
        code,
        retryable: true,
      });
    }
    const text = await response.text();
    let reply;
    let report;
    try {
      // An acknowledged publish is answered with its reply, then its ack_report.
      [reply, report] = text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
    } catch {
      reply = undefined;
    }
    if (response.ok && reply?.ok) {
      return body.ack ? report : reply;
    }
    const status = response.status;
    const message = reply?.error ?? `HTTP ${status}`;
    if (status === 401) {
      throw new PublishError(message, { code: "unauthorized", retryable: false, status });
    }
    if (status >= 500) {
      throw new PublishError(message, { code: "unavailable", retryable: true, status });
    }
    throw new PublishError(message, { code: "rejected", retryable: false, reply, status });
  }

  /** Waits until fewer than maxInFlight publishes await their reply. */
  async #slot() {
    while (this.#inFlight.size >= this.#options.maxInFlight) {
      await new Promise((resolve) => this.#slots.push(resolve));
    }
  }

  #settle(id, reply, error) {
    const entry = this.#inFlight.get(id);
    if (!entry) {
      return;
    }
    clearTimeout(entry.timer);
    if (!error && reply.ok && entry.ackTimeoutMs !== undefined && reply.type !== "ack_report") {
      // Published: the report follows, by the ack timeout at the latest.
      entry.timer = setTimeout(() => {
        const late = new PublishError("no ack_report in time", { code: "timeout", retryable: false });
        this.#settle(id, null, late);
      }, entry.ackTimeoutMs + entry.timeout);
      return;
    }
    this.#inFlight.delete(id);
    if (error) {
      entry.reject(error);
    } else if (reply.ok || reply.type === "ack_report") {
      entry.resolve(reply);
    } else {
      // `retry: true`: the engine could not store it (Redis unreachable); try again.
      const code = reply.retry === true ? "unavailable" : "rejected";
      entry.reject(new PublishError(reply.error, { code, retryable: reply.retry === true, reply }));
    }
    this.#slots.shift()?.();
  }

  /** Writes one line after the previous ones, waiting for drain: memory stays bounded. */
  #write(line, timeout) {
    const write = this.#writing.then(async () => {
      const socket = await this.#connection(timeout);
      if (!socket.write(line)) {
        await new Promise((resolve, reject) => {
          const onDrain = () => {
            socket.off("close", onClose);
            resolve();
          };
          const onClose = () => {
            socket.off("drain", onDrain);
            reject(disconnected());
          };
          socket.once("drain", onDrain);
          socket.once("close", onClose);
        });
      }
    });
    this.#writing = write.catch(() => {});
    return write;
  }

  /** The open connection, connecting with backoff (and jitter) if needed. */
  async #connection(timeout) {
    if (this.#socket) {
      return this.#socket;
    }
    this.#connecting ??= this.#connect(Date.now() + timeout).finally(() => {
      this.#connecting = null;
    });
    return this.#connecting;
  }

  async #connect(deadline) {
    for (;;) {
      try {
        const socket = await new Promise((resolve, reject) => {
          const socket = net.createConnection({ path: this.#options.socket });
          socket.once("connect", () => {
            socket.off("error", reject);
            resolve(socket);
          });
          socket.once("error", reject);
        });
        this.#failures = 0;
        this.#attach(socket);
        return socket;
      } catch (error) {
        this.#failures += 1;
        const { reconnectMinMs: min, reconnectMaxMs: max } = this.#options;
        const delay = Math.min(max, min * 2 ** (this.#failures - 1)) * (0.5 + Math.random() / 2);
        if (Date.now() + delay > deadline || this.#closed) {
          throw new PublishError(`cannot connect to ${this.#options.socket}: ${error.message}`, {
            code: "unreachable",
            retryable: true,
          });
        }
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  #attach(socket) {
    this.#socket = socket;
    this.#input = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk) => {
      this.#input += chunk;
      let newline;
      while ((newline = this.#input.indexOf("\n")) >= 0) {
        const line = this.#input.slice(0, newline);
        this.#input = this.#input.slice(newline + 1);
        this.#onReply(line);
      }
    });
    socket.on("error", () => {}); // "close" follows and says what matters
    socket.on("close", () => {
      if (this.#socket === socket) {
        this.#socket = null;
      }
      // Replies that will never come: the caller may retry (safely, with idem).
      for (const id of [...this.#inFlight.keys()]) {
        this.#settle(id, null, disconnected());
      }
    });
  }

  #onReply(line) {
    let reply;
    try {
      reply = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof reply.id === "number") {
      this.#settle(reply.id, reply, null);
    }
  }
}

function disconnected() {
  return new PublishError("the connection closed before the reply", {
    code: "disconnected",
    retryable: true,
  });
}
