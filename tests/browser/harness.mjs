// The real parts the browser tests drive: the sidecast binary, Unix-socket publishers, a page
// server on another origin, a TCP proxy that can cut or freeze connections, and Chromium.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { after, before } from "node:test";
import { chromium } from "playwright-core";

const ROOT = path.resolve(import.meta.dirname, "../..");
const BINARY = process.env.SIDECAST_BIN ?? path.join(ROOT, "target/debug/sidecast");
export const PAGES = path.join(import.meta.dirname, "pages");
/** Where screenshots go (ignored by git). */
export const OUTPUT = path.join(ROOT, "target/browser");

/** Polls `condition` (sync or async) every 20 ms until it is truthy; returns its value. */
export async function waitFor(what, condition, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Starts `sidecast serve` on 127.0.0.1 (an ephemeral port unless `port` is given) with a
 * publish socket in `dir` (a new temporary directory unless given).
 */
export async function startServer({ port = 0, dir, args = [] } = {}) {
  dir ??= fs.mkdtempSync(path.join(os.tmpdir(), "sidecast-browser-"));
  const socket = path.join(dir, "sidecast.sock");
  const child = spawn(
    BINARY,
    ["serve", "--listen", `127.0.0.1:${port}`, "--publish-socket", socket, ...args],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  // A failed test must not leave its server running, nor keep this process alive.
  const kill = () => child.kill("SIGKILL");
  process.on("exit", kill);
  child.on("exit", () => process.off("exit", kill));
  child.unref();
  child.stderr.unref();
  const lines = createInterface({ input: child.stderr });
  const log = [];
  const listening = new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      log.push(line);
      const match = line.match(/listening on ws:\/\/127\.0\.0\.1:(\d+)\/ws/);
      if (match) resolve(Number(match[1]));
    });
    child.on("exit", (code) => reject(new Error(`sidecast exited (${code}):\n${log.join("\n")}`)));
  });
  const bound = await Promise.race([
    listening,
    new Promise((_, reject) => setTimeout(() => reject(new Error("sidecast did not start")), 10_000)),
  ]);
  const exited = once(child, "exit");
  return {
    port: bound,
    dir,
    socket,
    origin: `http://127.0.0.1:${bound}`,
    wsUrl: `ws://127.0.0.1:${bound}/ws`,
    log,
    /** Graceful stop (SIGTERM); resolves once the process has exited. */
    async stop() {
      if (child.exitCode === null) child.kill("SIGTERM");
      await exited;
    },
    async health() {
      const response = await fetch(`http://127.0.0.1:${bound}/health`);
      return response.json();
    },
    /** The value of one series (exact name with labels) from /metrics. */
    async metric(series) {
      const text = await (await fetch(`http://127.0.0.1:${bound}/metrics`)).text();
      const line = text.split("\n").find((l) => l.startsWith(`${series} `));
      assert.ok(line, `no ${series} in /metrics`);
      return Number(line.slice(series.length + 1));
    },
  };
}

/** A worker on the publish port: every command gets an id and its reply is awaited. */
export class Publisher {
  #socket;
  #pending = new Map();
  #reports = new Map();
  #nextId = 1;

  static async connect(socketPath) {
    const socket = net.createConnection(socketPath);
    await once(socket, "connect");
    return new Publisher(socket);
  }

  constructor(socket) {
    this.#socket = socket;
    createInterface({ input: socket }).on("line", (line) => {
      const reply = JSON.parse(line);
      const waiting = reply.type === "ack_report" ? this.#reports : this.#pending;
      waiting.get(reply.id)?.(reply);
      waiting.delete(reply.id);
    });
  }

  /** Publishes with `ack` (timeout e.g. "5s"); resolves with the reply, and `report`, a
   * Promise of the ack_report that follows it. */
  async publishAcked(command, timeout) {
    const id = this.#nextId;
    const report = new Promise((resolve) => this.#reports.set(id, resolve));
    const reply = await this.publish({ ...command, ack: { timeout } });
    return { reply, report };
  }

  /** Sends one command; resolves with the server's reply, throws if it is not ok. */
  async publish(command) {
    const id = this.#nextId++;
    const reply = new Promise((resolve) => this.#pending.set(id, resolve));
    this.#socket.write(`${JSON.stringify({ id, ...command })}\n`);
    const answer = await reply;
    if (!answer.ok) throw new Error(`publish refused: ${answer.error}`);
    return answer;
  }

  close() {
    this.#socket.end();
  }
}

/** A port nothing listens on right now. */
async function freePort() {
  const server = net.createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

/**
 * A real `redis-server` on an ephemeral port, without persistence: `restartEmpty()` stands
 * for a Redis that lost its data.
 */
export async function startRedis() {
  const port = await freePort();
  let child;
  const launch = async () => {
    child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    });
    const kill = () => child.kill("SIGKILL");
    process.on("exit", kill);
    child.on("exit", () => process.off("exit", kill));
    await waitFor("redis answers", async () => {
      const socket = net.createConnection(port, "127.0.0.1");
      try {
        await once(socket, "connect");
        socket.write("PING\r\n");
        const [data] = await once(socket, "data");
        return data.toString().startsWith("+PONG");
      } catch {
        return false;
      } finally {
        socket.destroy();
      }
    });
  };
  await launch();
  return {
    url: `redis://127.0.0.1:${port}`,
    async restartEmpty() {
      const exited = once(child, "exit");
      child.kill("SIGKILL");
      await exited;
      await launch();
    },
    async stop() {
      const exited = once(child, "exit");
      child.kill("SIGKILL");
      await exited;
    },
  };
}

/** Serves the files in `files` (path → {type, body}) and the directory `PAGES`. */
async function startPageServer(files = {}) {
  const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript" };
  const server = http.createServer((request, response) => {
    const { pathname } = new URL(request.url, "http://x");
    const file = files[pathname];
    if (file) {
      response.writeHead(200, { "Content-Type": file.type }).end(file.body);
      return;
    }
    const onDisk = path.join(PAGES, path.normalize(pathname));
    if (!onDisk.startsWith(PAGES) || !fs.existsSync(onDisk) || fs.statSync(onDisk).isDirectory()) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "Content-Type": types[path.extname(onDisk)] ?? "text/plain" });
    fs.createReadStream(onDisk).pipe(response);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/**
 * A TCP proxy in front of `target` (a port). `cut()` resets every connection and refuses new
 * ones until `restore()`; `freeze()` keeps the connections open but forwards nothing more.
 */
export async function startProxy(target) {
  const pairs = new Set();
  let refusing = false;
  let accepted = 0;
  const server = net.createServer((client) => {
    if (refusing) {
      client.resetAndDestroy();
      return;
    }
    accepted += 1;
    const upstream = net.createConnection(target, "127.0.0.1");
    const pair = { client, upstream, frozen: false };
    pairs.add(pair);
    const forward = (from, to) =>
      from.on("data", (chunk) => {
        if (!pair.frozen) to.write(chunk);
      });
    forward(client, upstream);
    forward(upstream, client);
    const end = () => {
      if (pair.frozen) return; // a black hole does not pass closes either
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    for (const socket of [client, upstream]) {
      socket.on("close", end);
      socket.on("error", end);
    }
  });
  const port = await listenLoopback(server);
  return {
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    get accepted() {
      return accepted;
    },
    /** Connections currently open (frozen ones included). */
    get open() {
      return [...pairs].filter((p) => !p.client.destroyed).length;
    },
    cut() {
      refusing = true;
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    restore() {
      refusing = false;
    },
    freeze() {
      for (const pair of pairs) pair.frozen = true;
    },
    close() {
      for (const { client, upstream } of pairs) {
        client.destroy();
        upstream.destroy();
      }
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Listens on an ephemeral loopback port; returns it. A failed test must not keep this
 * process alive through the server, so it does not hold the event loop. */
async function listenLoopback(server) {
  server.listen(0, "127.0.0.1");
  server.unref();
  await once(server, "listening");
  return server.address().port;
}

/**
 * An HTTP proxy in front of `target` (a port) that passes plain requests and streamed
 * responses but answers every WebSocket upgrade with 403 (or, with `mode: "hang"`, never
 * answers it), as some corporate proxies do, until `allowUpgrades()`.
 */
export async function startHttpProxy(target, { mode = "refuse" } = {}) {
  let refusing = true;
  let refused = 0;
  const sockets = new Set();
  const server = http.createServer((request, response) => {
    const upstream = http.request(
      { host: "127.0.0.1", port: target, method: request.method, path: request.url, headers: request.headers },
      (answer) => {
        response.writeHead(answer.statusCode, answer.headers);
        answer.pipe(response);
      },
    );
    upstream.on("error", () => response.destroy());
    response.on("close", () => upstream.destroy());
    request.pipe(upstream);
  });
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  server.on("upgrade", (request, socket, head) => {
    if (refusing) {
      refused += 1;
      if (mode === "hang") return; // keeps the socket open, answers nothing
      socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      return;
    }
    const upstream = net.createConnection(target, "127.0.0.1", () => {
      const lines = [`${request.method} ${request.url} HTTP/1.1`];
      for (let i = 0; i < request.rawHeaders.length; i += 2) {
        lines.push(`${request.rawHeaders[i]}: ${request.rawHeaders[i + 1]}`);
      }
      upstream.write(`${lines.join("\r\n")}\r\n\r\n`);
      upstream.write(head);
      socket.pipe(upstream);
      upstream.pipe(socket);
    });
    const end = () => {
      socket.destroy();
      upstream.destroy();
    };
    socket.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  const port = await listenLoopback(server);
  return {
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    /** Upgrades answered with 403 so far. */
    get refused() {
      return refused;
    },
    allowUpgrades() {
      refusing = false;
    },
    close() {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/**
 * For a test file: before its tests, serves `files()` (see `startPageServer`) and launches
 * Chromium; after them, closes both. Returns `{ browser, pages }`, filled in by then.
 */
export function useBrowser(files = async () => ({})) {
  const fixture = {};
  before(async () => {
    fixture.pages = await startPageServer(await files());
    fixture.browser = await launchBrowser();
  });
  after(async () => {
    await fixture.browser?.close();
    await fixture.pages?.close();
  });
  return fixture;
}

/** Debian's Chromium, headless, with nothing reaching for the network. */
function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** A new page whose console errors and uncaught exceptions fail the test when checked. */
export async function openPage(browser, url) {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" && !/WebSocket connection to .* failed/.test(message.text())) {
      problems.push(`console.error: ${message.text()}`);
    }
  });
  page.problems = problems;
  await page.goto(url);
  return page;
}
