// Test helpers: a real sidecast server (the binary cargo built) and a minimal WebSocket
// subscriber, so the publisher is tested end to end with nothing mocked.
import { spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.SIDECAST_BIN ?? join(root, "target/debug/sidecast");
export const KEY = "node-test-publish-key-0123456789";

/** A free loopback port. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  const { port } = server.address();
  await new Promise((ok) => server.close(ok));
  return port;
}

/**
 * Starts `sidecast serve` on a temp socket, an ephemeral WebSocket port and an HTTP publish
 * port, with `args` added.
 */
export async function startServer({ socket, httpPort, args = [] } = {}) {
  socket ??= join(mkdtempSync(join(tmpdir(), "sidecast-node-")), "sidecast.sock");
  httpPort ??= await freePort();
  const child = spawn(
    BIN,
    ["serve", "--listen", "127.0.0.1:0", "--publish-socket", socket,
     "--publish-listen", `127.0.0.1:${httpPort}`, "--dashboard", "off", ...args],
    { env: { ...process.env, SIDECAST_PUBLISH_KEY: KEY, RUST_LOG: "" }, stdio: ["ignore", "ignore", "pipe"] },
  );
  const wsAddr = await new Promise((ok, fail) => {
    let log = "";
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const found = /ws:\/\/([^/]+)\/ws/.exec(log);
      if (found) ok(found[1]);
    });
    child.once("exit", (code) => fail(new Error(`sidecast exited with ${code}: ${log}`)));
  });
  child.stderr.resume();
  return {
    socket,
    httpPort,
    url: `http://127.0.0.1:${httpPort}`,
    wsAddr,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((ok) => child.once("exit", ok));
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** A WebSocket client that subscribes and reads JSON messages. */
export async function subscriber(wsAddr, channel) {
  const [host, port] = wsAddr.split(":");
  const socket = net.createConnection({ host, port: Number(port) });
  await new Promise((ok, fail) => socket.once("connect", ok).once("error", fail));
  socket.write(
    `GET /ws HTTP/1.1\r\nHost: ${wsAddr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
  );
  let buffer = Buffer.alloc(0);
  let upgraded = false;
  const messages = [];
  const waiters = [];
  socket.on("data", (chunk) => {
    buffer = Buffer.concat([buffer, chunk]);
    if (!upgraded) {
      const end = buffer.indexOf("\r\n\r\n");
      if (end < 0) return;
      upgraded = true;
      buffer = buffer.subarray(end + 4);
    }
    for (;;) {
      if (buffer.length < 2) return;
      let length = buffer[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (buffer.length < 4) return;
        length = buffer.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (buffer.length < 10) return;
        length = Number(buffer.readBigUInt64BE(2));
        offset = 10;
      }
      if (buffer.length < offset + length) return;
      const opcode = buffer[0] & 0x0f;
      const payload = buffer.subarray(offset, offset + length);
      buffer = buffer.subarray(offset + length);
      if (opcode === 1) {
        const message = JSON.parse(payload.toString("utf8"));
        const waiter = waiters.shift();
        if (waiter) waiter(message);
        else messages.push(message);
      }
    }
  });
  const next = () =>
    messages.length > 0 ? Promise.resolve(messages.shift()) : new Promise((ok) => waiters.push(ok));
  const send = (value) => {
    const payload = Buffer.from(JSON.stringify(value));
    const mask = Buffer.from([1, 2, 3, 4]);
    const masked = Buffer.from(payload.map((byte, i) => byte ^ mask[i % 4]));
    const header = payload.length < 126
      ? Buffer.from([0x81, 0x80 | payload.length])
      : Buffer.from([0x81, 0x80 | 126, payload.length >> 8, payload.length & 0xff]);
    socket.write(Buffer.concat([header, mask, masked]));
  };
  const connected = await next();
  if (connected.type !== "connected") throw new Error(JSON.stringify(connected));
  send({ type: "subscribe", channel });
  const subscribed = await next();
  if (subscribed.type !== "subscribed") throw new Error(JSON.stringify(subscribed));
  return { next, send, close: () => socket.destroy() };
}

/** A real `redis-server` without persistence on a free port; `kill()` is SIGKILL. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  return {
    url: `redis://127.0.0.1:${port}`,
    async kill() {
      if (child.exitCode !== null) return;
      const exited = new Promise((ok) => child.once("exit", ok));
      child.kill("SIGKILL");
      await exited;
    },
  };
}
