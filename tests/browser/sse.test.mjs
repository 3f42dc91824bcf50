// Server-Sent Events in Chromium: sidecast.js behind a proxy that refuses the WebSocket
// upgrade falls back to /sse and back again with every event once; a plain EventSource page
// with no SDK resumes after its server restarts.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Publisher, openPage, startHttpProxy, startRedis, startServer, useBrowser, waitFor } from "./harness.mjs";

const fixture = useBrowser();

function serve(options = {}) {
  return startServer({ ...options, args: ["--allowed-origin", fixture.pages.origin, ...(options.args ?? [])] });
}

const recorded = (page) => page.evaluate(() => structuredClone(window.record));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Publishes `channel` events numbered from 1, one every 10 ms, until `stop()`. */
function keepPublishing(publisher, channels) {
  let running = true;
  const counts = Object.fromEntries(channels.map((c) => [c, 0]));
  const done = (async () => {
    while (running) {
      for (const channel of channels) {
        counts[channel] += 1;
        await publisher.publish({ channel, data: { n: counts[channel] } });
      }
      await sleep(10);
    }
  })();
  return {
    counts,
    async stop() {
      running = false;
      await done;
    },
  };
}

/** The seqs the page got on `channel`, in the order it got them. */
const seqsOf = (record, channel) => record.events.filter((e) => e.channel === channel).map((e) => e.seq);

test("behind a proxy that refuses the upgrade, a page falls back to SSE and back, every event once", async () => {
  const server = await serve();
  const proxy = await startHttpProxy(server.port);
  const query = new URLSearchParams({
    server: server.origin,
    ws: proxy.wsUrl,
    channel: "job:1",
    initialDelayMs: "100",
    webSocketRetryMs: "1500",
  });
  const page = await openPage(fixture.browser, `${fixture.pages.origin}/client.html?${query}`);
  const transport = () => page.evaluate(() => `${window.client?.transport} ${window.client?.status}`);
  const started = Date.now();
  await waitFor("the page is on SSE", async () => (await transport()) === "sse connected");
  const fellBackMs = Date.now() - started;
  assert.ok(proxy.refused >= 2, "the upgrades were refused");
  await waitFor("job:1 is subscribed", async () => (await server.health()).channels >= 1);

  const publisher = await Publisher.connect(server.socket);
  const publishing = keepPublishing(publisher, ["job:1", "job:2"]);
  await waitFor("events over SSE", async () => seqsOf(await recorded(page), "job:1").length >= 10);
  // A new channel while on SSE reopens the stream, resuming job:1.
  await page.evaluate(() => window.watch("job:2"));
  await waitFor("job:2 over SSE", async () => seqsOf(await recorded(page), "job:2").length >= 10);
  proxy.allowUpgrades();
  await waitFor("the page is back on WebSocket", async () => (await transport()) === "websocket connected");
  const before = (await recorded(page)).events.length;
  await waitFor("events over WebSocket", async () => (await recorded(page)).events.length >= before + 20);
  await publishing.stop();
  const total = publishing.counts["job:1"];
  const record = await waitFor("every event", async () => {
    const r = await recorded(page);
    return seqsOf(r, "job:1").length >= total && r;
  });
  assert.deepEqual(seqsOf(record, "job:1"), Array.from({ length: total }, (_, i) => i + 1), "job:1: each once, in order");
  const job2 = seqsOf(record, "job:2");
  const first = job2[0];
  assert.deepEqual(job2, Array.from({ length: publishing.counts["job:2"] - first + 1 }, (_, i) => first + i), "job:2: from its subscribe on, each once");
  assert.deepEqual(record.gaps, []);
  assert.deepEqual(page.problems, []);
  console.log(`# fell back to SSE ${fellBackMs} ms after the page opened; ${total} events on job:1 across both switches`);
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("behind a proxy that swallows the upgrade, the fallback comes within seconds", async () => {
  const server = await serve();
  const proxy = await startHttpProxy(server.port, { mode: "hang" });
  const query = new URLSearchParams({ server: server.origin, ws: proxy.wsUrl, channel: "job:3", initialDelayMs: "100" });
  const started = Date.now();
  const page = await openPage(fixture.browser, `${fixture.pages.origin}/client.html?${query}`);
  await waitFor(
    "the page is on SSE",
    async () => (await page.evaluate(() => `${window.client?.transport} ${window.client?.status}`)) === "sse connected",
    15_000,
  );
  const fellBackMs = Date.now() - started;
  assert.ok(fellBackMs < 9_000, `fell back after ${fellBackMs} ms`);
  const publisher = await Publisher.connect(server.socket);
  await waitFor("job:3 is subscribed", async () => (await server.health()).channels >= 1);
  await publisher.publish({ channel: "job:3", data: { n: 1 } });
  await waitFor("the event", async () => seqsOf(await recorded(page), "job:3").length === 1);
  console.log(`# an upgrade that hangs: fell back to SSE ${fellBackMs} ms after the page opened`);
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("a plain EventSource page with no SDK resumes through Last-Event-ID after its server restarts", async () => {
  const redis = await startRedis();
  const engine = ["--engine", "redis", "--redis-url", redis.url];
  const a = await serve({ args: engine });
  const b = await serve({ args: engine });
  const query = new URLSearchParams({ server: a.origin, channels: "job:9,job:10" });
  const page = await openPage(fixture.browser, `${fixture.pages.origin}/eventsource.html?${query}`);
  const events = (record) => record.messages.filter((m) => m.type === "event").map((m) => `${m.channel} ${m.seq}`);
  await waitFor("both channels subscribed", async () => (await a.health()).channels >= 2);
  const onB = await Publisher.connect(b.socket);
  for (let n = 1; n <= 3; n++) await onB.publish({ channel: "job:9", data: { n } });
  await onB.publish({ channel: "job:10", data: { n: 1 } });
  await waitFor("the first events", async () => events(await recorded(page)).length === 4);

  await a.stop(); // the stream ends with {"type":"close","code":1001}
  // While the page's server is down, events go on through the other node.
  for (let n = 4; n <= 6; n++) await onB.publish({ channel: "job:9", data: { n } });
  await onB.publish({ channel: "job:10", data: { n: 2 } });
  const restarted = await serve({ port: a.port, args: engine });
  const record = await waitFor(
    "the browser reconnected by itself and resumed",
    async () => {
      const r = await recorded(page);
      return events(r).length >= 8 && r;
    },
    20_000,
  );
  await onB.publish({ channel: "job:9", data: { n: 7 } });
  const final = await waitFor("a live event after the resume", async () => {
    const r = await recorded(page);
    return events(r).length >= 9 && r;
  });
  assert.deepEqual(events(final), ["job:9 1", "job:9 2", "job:9 3", "job:10 1", "job:9 4", "job:9 5", "job:9 6", "job:10 2", "job:9 7"]);
  const resumed = record.messages.filter((m) => m.type === "subscribed").slice(2);
  assert.deepEqual(resumed.map((m) => [m.channel, m.recovered]), [["job:9", true], ["job:10", true]]);
  assert.ok(record.messages.some((m) => m.type === "close" && m.code === 1001), "told why the stream ended");
  assert.ok(record.opens >= 2, "EventSource reopened the stream itself");
  assert.deepEqual(page.problems, []);
  onB.close();
  await page.close();
  await restarted.stop();
  await b.stop();
  await redis.stop();
});
