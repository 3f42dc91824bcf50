import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { PublishError, Publisher } from "../publisher.mjs";
import { KEY, startRedis, startServer, subscriber } from "./helpers.mjs";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.stop();
});

test("publishes over the socket and the event reaches a subscriber", async () => {
  const watcher = await subscriber(server.wsAddr, "project:1");
  const sidecast = new Publisher({ socket: server.socket });
  const reply = await sidecast.publish("project:1", { type: "progress", progress: 40 });
  assert.deepEqual(reply, { id: 1, ok: true, seq: 1, delivered: 1 });
  const event = await watcher.next();
  assert.deepEqual(event, {
    type: "event",
    channel: "project:1",
    seq: 1,
    data: { type: "progress", progress: 40 },
  });
  await sidecast.close();
  watcher.close();
});

test("an acknowledged publish resolves with the ack_report once the page acks", async () => {
  const page = await subscriber(server.wsAddr, "order:ack");
  const silent = await subscriber(server.wsAddr, "order:ack");
  const sidecast = new Publisher({ socket: server.socket });
  const reported = sidecast.publish("order:ack", { status: "paid" }, { ackTimeoutMs: 1500 });
  const event = await page.next();
  assert.equal(event.ack, true);
  page.send({ type: "ack", channel: "order:ack", seq: event.seq });
  const report = await reported;
  assert.deepEqual(
    { ...report, id: undefined },
    { id: undefined, type: "ack_report", channel: "order:ack", seq: 1, delivered: 2, acked: 1, timedOut: 1, disconnected: 0, lost: 0, nodes: 1, nodesLost: 0 },
  );
  await assert.rejects(
    sidecast.publish("order:ack", 1, { ackTimeoutMs: 120_000 }),
    (error) => error instanceof PublishError && error.code === "rejected" && /max_ack_timeout/.test(error.message),
  );
  await sidecast.close();
  // Over HTTP the response waits for the report.
  const overHttp = new Publisher({ url: server.url, key: KEY });
  const reporting = overHttp.publish("order:ack", { status: "shipped" }, { ackTimeoutMs: 1500 });
  const shipped = await page.next();
  assert.equal(shipped.data.status, "shipped");
  page.send({ type: "ack", channel: "order:ack", seq: shipped.seq });
  const httpReport = await reporting;
  assert.deepEqual([httpReport.type, httpReport.seq, httpReport.acked, httpReport.timedOut], ["ack_report", 2, 1, 1]);
  page.close();
  silent.close();
});

test("many publishes in flight keep their order and their own replies", async () => {
  const sidecast = new Publisher({ socket: server.socket, maxInFlight: 50 });
  const replies = await Promise.all(
    Array.from({ length: 2000 }, (_, n) => sidecast.publish("order:many", { n })),
  );
  assert.deepEqual(
    replies.map((r) => r.seq),
    Array.from({ length: 2000 }, (_, n) => n + 1),
  );
  await sidecast.close();
});

test("fire-and-forget publishes are written without waiting for replies", async () => {
  const watcher = await subscriber(server.wsAddr, "job:ff");
  const sidecast = new Publisher({ socket: server.socket });
  for (let n = 0; n < 3; n++) {
    assert.deepEqual(await sidecast.publish("job:ff", n, { fireAndForget: true }), { ok: true });
  }
  for (let n = 0; n < 3; n++) {
    assert.equal((await watcher.next()).data, n);
  }
  await sidecast.close();
  watcher.close();
});

test("a retry under the same idem key is answered, not published again", async () => {
  const sidecast = new Publisher({ socket: server.socket });
  const first = await sidecast.publish("job:idem", "done", { idem: "job-7-done" });
  const retry = await sidecast.publish("job:idem", "done", { idem: "job-7-done" });
  assert.equal(retry.seq, first.seq);
  assert.equal(retry.duplicate, true);
  await sidecast.close();
});

test("a refused command is a PublishError that says why and is not retryable", async () => {
  const sidecast = new Publisher({ socket: server.socket });
  await assert.rejects(sidecast.publish("bad name", 1), (error) => {
    assert.ok(error instanceof PublishError);
    assert.equal(error.code, "rejected");
    assert.equal(error.retryable, false);
    assert.match(error.message, /invalid channel "bad name"/);
    return true;
  });
  assert.equal((await sidecast.publish("still:fine", 1)).ok, true, "the connection survives");
  await sidecast.close();
});

test("publishes over HTTP with the key, and a wrong key is unauthorized", async () => {
  const watcher = await subscriber(server.wsAddr, "project:http");
  const sidecast = new Publisher({ url: server.url, key: KEY });
  const reply = await sidecast.publish("project:http", { over: "http" }, { idem: "h-1" });
  assert.deepEqual(reply, { id: null, ok: true, seq: 1, delivered: 1 });
  assert.deepEqual((await watcher.next()).data, { over: "http" });
  const wrong = new Publisher({ url: server.url, key: "not-the-key" });
  await assert.rejects(wrong.publish("project:http", 1), { code: "unauthorized", retryable: false });
  await assert.rejects(sidecast.publish("bad name", 1), { code: "rejected", status: 400 });
  watcher.close();
});

test("a server that goes away and comes back: retryable errors, then a reconnect", async () => {
  const own = await startServer();
  const sidecast = new Publisher({ socket: own.socket, timeoutMs: 300, reconnectMinMs: 20 });
  assert.equal((await sidecast.publish("a:b", 1)).seq, 1);
  await own.stop();
  await assert.rejects(sidecast.publish("a:b", 2), (error) => {
    assert.ok(["unreachable", "disconnected"].includes(error.code), error.code);
    assert.equal(error.retryable, true);
    return true;
  });
  const back = await startServer({ socket: own.socket, httpPort: own.httpPort });
  const reply = await sidecast.publish("a:b", 3, { timeoutMs: 3000 });
  assert.equal(reply.ok, true, "reconnected to the new server");
  await sidecast.close();
  await back.stop();
});

test("a publish Redis could not store is a retryable PublishError", async () => {
  const redis = await startRedis();
  const node = await startServer({ args: ["--engine", "redis", "--redis-url", redis.url] });
  const sidecast = new Publisher({ socket: node.socket });
  let reply;
  for (let attempt = 0; !reply; attempt++) {
    // Until the node has connected to Redis.
    reply = await sidecast.publish("job:redis", 1).catch((e) => {
      assert.equal(e.code, "unavailable");
      assert.ok(attempt < 100, "the node never connected to Redis");
      return new Promise((ok) => setTimeout(() => ok(undefined), 50));
    });
  }
  assert.deepEqual([reply.seq, reply.nodes], [1, 0]);
  await redis.kill();
  await assert.rejects(sidecast.publish("job:redis", 2), (e) => {
    assert.ok(e instanceof PublishError);
    assert.deepEqual([e.code, e.retryable, e.reply.error], ["unavailable", true, "unavailable"]);
    return true;
  });
  await sidecast.close();
  await node.stop();
});

test("options are checked", () => {
  assert.throws(() => new Publisher({}), TypeError);
  assert.throws(() => new Publisher({ socket: "a", url: "http://b" }), TypeError);
});
