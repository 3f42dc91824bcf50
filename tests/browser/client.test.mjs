// sidecast.js in Chromium: loading it from the server, resume across cuts, freezes and
// restarts, and the reconnect backoff.

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { test } from "node:test";
import { Publisher, openPage, startProxy, startRedis, startServer, useBrowser, waitFor } from "./harness.mjs";

const fixture = useBrowser();

/** A server that lets the test pages' origin open WebSockets. */
function serve(options = {}) {
  return startServer({ ...options, args: ["--allowed-origin", fixture.pages.origin, ...(options.args ?? [])] });
}

function clientPage(server, { ws = server.wsUrl, channels = ["project:42"], ...options } = {}) {
  const query = new URLSearchParams({ server: server.origin, ws, ...options });
  for (const channel of channels) query.append("channel", channel);
  return openPage(fixture.browser, `${fixture.pages.origin}/client.html?${query}`);
}

const recorded = (page) => page.evaluate(() => structuredClone(window.record));

async function waitForEvents(page, count) {
  return waitFor(`the page has ${count} events`, async () => {
    const record = await recorded(page);
    return record.events.length >= count && record;
  });
}

async function publishRange(publisher, from, to, channel = "project:42") {
  for (let n = from; n <= to; n++) await publisher.publish({ channel, data: { n } });
}

/** The page is connected and the server counts its subscription. */
async function waitSubscribed(page, server, channels = 1) {
  await waitFor("the page is connected", async () => (await recorded(page)).statuses.at(-1)?.status === "connected");
  await waitFor("the subscription is active", async () => (await server.health()).channels >= channels);
}

test("a page loads /sidecast.js from the server and shows published events", async () => {
  const server = await serve();
  const page = await clientPage(server, { channels: ["project:42", "order:7"] });
  await waitSubscribed(page, server, 2);
  const publisher = await Publisher.connect(server.socket);
  await publisher.publish({ channel: "project:42", data: { progress: 10 } });
  await publisher.publish({ channels: ["project:42", "order:7"], data: { progress: 55 } });
  await publisher.publish({ channel: "unwatched", data: "not for this page" });
  await waitFor("the page lists 3 events", async () => (await page.locator("#events li").count()) === 3);
  assert.deepEqual(await page.locator("#events li").allTextContents(), [
    'project:42 #1 {"progress":10}',
    'project:42 #2 {"progress":55}',
    'order:7 #1 {"progress":55}',
  ]);
  assert.equal(await page.locator("#status").textContent(), "connected");
  assert.deepEqual(page.problems, []);
  publisher.close();
  await page.close();
  await server.stop();
});

test("Chromium agrees to permessage-deflate: events arrive compressed and intact, its compressed requests are understood", async () => {
  const server = await serve();
  // 100 channels: Chromium compresses the page's batch subscribes, which the server inflates.
  const channels = Array.from({ length: 100 }, (_, i) => `task:${i}`);
  const page = await clientPage(server, { channels, recordExtensions: "1" });
  await waitSubscribed(page, server, 100);
  assert.deepEqual((await recorded(page)).extensions, [
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
  ]);
  const publisher = await Publisher.connect(server.socket);
  const task = {
    id: "7b0e4c1e-3f9a-4d52-9c61-000000000001",
    title: "Prepare the quarterly render of the product launch video",
    description: "Export the 4K master, then the 1080p and 720p proxies; attach the captions.",
    status: "in_progress",
    subtasks: Array.from({ length: 8 }, (_, i) => ({ id: `s${i}`, title: `Export proxy ${i}`, completed: i < 3 })),
  };
  const large = { task, log: "frame rendered\n".repeat(5000) };
  await publisher.publish({ channel: "task:99", data: { type: "task_update", task } });
  await publisher.publish({ channel: "task:0", data: large });
  await publisher.publish({ channel: "task:5", data: { p: 1 } });
  const record = await waitForEvents(page, 3);
  assert.deepEqual(record.events.map((e) => [e.channel, e.data]), [
    ["task:99", { type: "task_update", task }],
    ["task:0", large],
    ["task:5", { p: 1 }],
  ]);
  const deflated = await server.metric('sidecast_event_bytes_total{encoding="deflate"}');
  const plain = await server.metric('sidecast_event_bytes_total{encoding="identity"}');
  assert.ok(deflated > 0 && deflated < 4000, `deflate bytes: ${deflated}`);
  assert.ok(plain > 0 && plain < 100, `the small event went plain: ${plain} bytes`);
  assert.deepEqual(page.problems, []);
  publisher.close();
  await page.close();
  await server.stop();
});

test("pages ack events by themselves; a callback that throws withholds the ack, and the report says so", async () => {
  const server = await serve();
  const fine = await clientPage(server, { channels: ["order:7"], asyncOn: "order:7" });
  const failing = await clientPage(server, { channels: ["order:7"], throwOn: "order:7" });
  await waitFor("both pages subscribed", async () => (await server.health()).connections === 2);
  await waitSubscribed(fine, server);
  await waitSubscribed(failing, server);
  const publisher = await Publisher.connect(server.socket);
  const { reply, report } = await publisher.publishAcked({ channel: "order:7", data: { status: "paid" } }, "1s");
  assert.equal(reply.delivered, 2);
  const started = Date.now();
  const counts = await report;
  assert.deepEqual(
    [counts.delivered, counts.acked, counts.timedOut, counts.disconnected],
    [2, 1, 1, 0],
    JSON.stringify(counts),
  );
  assert.ok(Date.now() - started >= 500, "the report waited for the page that did not confirm");
  for (const page of [fine, failing]) {
    assert.deepEqual((await recorded(page)).events.map((e) => e.data), [{ status: "paid" }]);
  }
  assert.equal(fine.problems.length, 0, fine.problems.join("\n"));
  assert.ok(failing.problems.some((p) => p.includes("the page fails on order:7")), failing.problems.join("\n"));

  // With every page confirming, the report comes as soon as the last one has.
  await failing.close();
  await waitFor("one page left", async () => (await server.health()).connections === 1);
  const second = await publisher.publishAcked({ channel: "order:7", data: { status: "shipped" } }, "30s");
  const quick = Date.now();
  const acked = await second.report;
  assert.deepEqual([acked.delivered, acked.acked], [1, 1]);
  assert.ok(Date.now() - quick < 5000);
  publisher.close();
  await fine.close();
  await server.stop();
});

test("a cut connection resumes: every event once, in order, recovered", async () => {
  const server = await serve();
  const proxy = await startProxy(server.port);
  // project:42 comes last of 100 channels, and the page is told a budget of 2 messages a
  // second in bursts of 1: it resubscribes in batches of 10 channels, one every half second,
  // so events published in those seconds race the resume of project:42.
  const channels = [...Array.from({ length: 99 }, (_, i) => `job:${i}`), "project:42"];
  const options = { ws: proxy.wsUrl, channels, initialDelayMs: "200", slowBudget: "1" };
  const page = await clientPage(server, options);
  await waitSubscribed(page, server, 100);
  const publisher = await Publisher.connect(server.socket);
  await publishRange(publisher, 1, 5);
  await waitForEvents(page, 5);

  proxy.cut();
  await waitFor("the page sees the cut", async () => (await recorded(page)).statuses.at(-1)?.status !== "connected");
  await publishRange(publisher, 6, 10); // missed while disconnected
  proxy.restore();
  // Keep publishing until the resume of project:42 has replayed 6..10: some events are
  // published after the page is connected again but before that replay reached it.
  let n = 10;
  let duringResume = 0;
  const deadline = Date.now() + 15_000;
  for (;;) {
    const before = await recorded(page);
    if (before.events.length >= 10) break;
    assert.ok(Date.now() < deadline, "the page never resumed project:42");
    await publishRange(publisher, ++n, n);
    if (before.statuses.at(-1)?.status === "connected" && proxy.accepted >= 2) duringResume += 1;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const record = await waitForEvents(page, n);
  assert.ok(duringResume > 0, "no event was published while the resume was on its way");
  assert.deepEqual(
    record.events.map((e) => [e.seq, e.data.n]),
    Array.from({ length: n }, (_, i) => [i + 1, i + 1]),
    "each event once, in seq order",
  );
  assert.deepEqual(record.gaps, [], "the history filled the gap: recovered");
  assert.ok(proxy.accepted >= 2, "the page reconnected");
  assert.deepEqual(page.problems, []);
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("subscribe and unsubscribe while disconnected take effect on reconnect", async () => {
  const server = await serve();
  const proxy = await startProxy(server.port);
  const page = await clientPage(server, { ws: proxy.wsUrl, initialDelayMs: "100" });
  await waitSubscribed(page, server);
  proxy.cut();
  await waitFor("the page is disconnected", async () => (await recorded(page)).statuses.at(-1)?.status !== "connected");
  await page.evaluate(() => {
    window.watch("order:7");
    window.subscriptions["project:42"].unsubscribe();
  });
  proxy.restore();
  await waitFor("the page is connected again", async () => (await recorded(page)).statuses.at(-1)?.status === "connected");
  const publisher = await Publisher.connect(server.socket);
  await waitFor("order:7 is subscribed", async () => (await publisher.publish({ channel: "order:7", data: "probe" })).delivered === 1);
  const reply = await publisher.publish({ channel: "project:42", data: "unwanted" });
  assert.equal(reply.delivered, 0, "project:42 was left while disconnected");
  const record = await waitForEvents(page, 1);
  assert.equal(record.events[0].channel, "order:7");
  assert.equal((await server.health()).channels, 1);
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("a page on 100 channels resubscribes to all of them in one request", async () => {
  // The defaults: 100 subscriptions per connection, 20 messages per second in bursts of 50.
  const server = await serve();
  const proxy = await startProxy(server.port);
  const channels = Array.from({ length: 100 }, (_, i) => `job:${i}`);
  const options = { ws: proxy.wsUrl, channels, initialDelayMs: "100", timeSubscribed: "1" };
  const page = await clientPage(server, options);
  await waitSubscribed(page, server, 100);
  proxy.cut();
  await waitFor("the server sees the cut", async () => (await server.health()).channels === 0);
  proxy.restore();
  await waitFor("all 100 resubscribed", async () => (await server.health()).channels === 100);
  // One batch request, answered within a round trip: from the page's `connected` to its
  // last `subscribed`, as the page saw them.
  const answers = await waitFor("the page has every answer", async () => {
    const { statuses, subscribedAt } = await recorded(page);
    const connectedAt = statuses.filter((s) => s.status === "connected").at(-1).at;
    const after = subscribedAt.filter((at) => at >= connectedAt);
    return after.length >= 100 && { connectedAt, after };
  });
  const took = answers.after.at(-1) - answers.connectedAt;
  console.log(`all 100 resubscribed ${took.toFixed(1)} ms after the page said connected`);
  assert.ok(took < 1000, `one request, not paced by the rate limit: ${took} ms`);
  const publisher = await Publisher.connect(server.socket);
  await publisher.publish({ channels: ["job:0", "job:99"], data: "last" });
  const record = await waitForEvents(page, 2);
  assert.deepEqual(record.events.map((e) => e.channel), ["job:0", "job:99"]);
  assert.deepEqual(record.errors, [], "no request was refused");
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("a silent connection is detected by the heartbeat watchdog and resumed", async () => {
  // The server pings every 500 ms, so the page's watchdog gives up after about 1 s of silence.
  const server = await serve({ args: ["--heartbeat-interval", "500ms", "--heartbeat-timeout", "5s"] });
  const proxy = await startProxy(server.port);
  const page = await clientPage(server, { ws: proxy.wsUrl, initialDelayMs: "100" });
  await waitSubscribed(page, server);
  const publisher = await Publisher.connect(server.socket);
  await publishRange(publisher, 1, 3);
  await waitForEvents(page, 3);

  proxy.freeze(); // the TCP connection stays open; nothing passes in either direction
  const frozenAt = Date.now();
  await publishRange(publisher, 4, 6);
  await waitFor("the page reconnects through the proxy", () => proxy.accepted >= 2, 10_000);
  const detectedAfter = Date.now() - frozenAt;
  assert.ok(proxy.open >= 2, "the frozen connection was still open: the watchdog, not a close, acted");
  assert.ok(detectedAfter >= 900, `gave up after ${detectedAfter} ms, before 2 × heartbeatMs`);
  await publishRange(publisher, 7, 8);
  const record = await waitForEvents(page, 8);
  assert.deepEqual(record.events.map((e) => e.data.n), [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.deepEqual(record.gaps, []);
  const statuses = record.statuses.map((s) => s.status);
  assert.deepEqual(statuses.slice(-3), ["disconnected", "connecting", "connected"]);
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("a server restart is reported as a gap and the page carries on in the new epoch", async () => {
  const first = await serve();
  const page = await clientPage(first, { initialDelayMs: "100", maxDelayMs: "500" });
  await waitSubscribed(page, first);
  let publisher = await Publisher.connect(first.socket);
  await publishRange(publisher, 1, 3);
  await waitForEvents(page, 3);
  publisher.close();
  await first.stop();

  const second = await serve({ port: first.port, dir: first.dir });
  await waitSubscribed(page, second);
  publisher = await Publisher.connect(second.socket);
  await publishRange(publisher, 4, 6);
  const record = await waitForEvents(page, 6);
  assert.deepEqual(
    record.events.map((e) => [e.seq, e.data.n]),
    [[1, 1], [2, 2], [3, 3], [1, 4], [2, 5], [3, 6]],
    "history died with the first server: seqs restart, nothing repeats",
  );
  assert.deepEqual(record.gaps, [{ channel: "project:42", afterEvents: 3 }], "recovered: false");
  publisher.close();
  await page.close();
  await second.stop();
});

test("under the Redis engine, a Redis that lost its data is a gap the page is told of, live", async () => {
  const redis = await startRedis();
  const server = await serve({ args: ["--engine", "redis", "--redis-url", redis.url] });
  const page = await clientPage(server);
  await waitSubscribed(page, server);
  const publisher = await Publisher.connect(server.socket);
  await publishRange(publisher, 1, 2);
  await waitForEvents(page, 2);
  await redis.restartEmpty();
  await waitFor("the gap is reported", async () => (await recorded(page)).gaps.length === 1);
  await publishRange(publisher, 3, 4);
  const record = await waitForEvents(page, 4);
  assert.deepEqual(
    record.events.map((e) => [e.seq, e.data.n]),
    [[1, 1], [2, 2], [1, 3], [2, 4]],
    "a new epoch: seqs restart, nothing repeats",
  );
  assert.deepEqual(record.gaps, [{ channel: "project:42", afterEvents: 2 }], "the gap message");
  assert.equal(record.statuses.at(-1).status, "connected", "the page never disconnected");
  publisher.close();
  await page.close();
  await server.stop();
  await redis.stop();
});

test("reconnect attempts back off exponentially with full jitter, then connect", async () => {
  const server = await serve();
  const options = { initialDelayMs: "100", maxDelayMs: "1600" };
  // With Math.random pinned at 0.5 each delay is half its ceiling (100 × 2^attempt, at most
  // 1600): the first retry waits 50 ms, the ones after 100, 200, 400, 800, 800, 800.
  const pinned = await clientPage(server, { ...options, pinRandom: "0.5" });
  const jittered = await clientPage(server, options);
  await waitSubscribed(pinned, server);
  await waitSubscribed(jittered, server);
  await server.stop();

  const attempts = async (page) =>
    (await recorded(page)).statuses.filter((s) => s.status === "connecting").map((s) => s.at);
  // The first attempt plus 7 retries.
  await waitFor("7 retries", async () => (await attempts(pinned)).length >= 8, 20_000);
  await waitFor("7 jittered retries", async () => (await attempts(jittered)).length >= 8, 20_000);
  const gaps = (times) => times.slice(2).map((t, i) => t - times[i + 1]);
  const pinnedGaps = gaps(await attempts(pinned)).slice(0, 6);
  const expected = [100, 200, 400, 800, 800, 800];
  pinnedGaps.forEach((gap, i) =>
    assert.ok(Math.abs(gap - expected[i]) < 60, `gap ${i}: ${gap} ms, expected ${expected[i]}: ${pinnedGaps}`),
  );
  const ceilings = [200, 400, 800, 1600, 1600, 1600];
  const jitteredGaps = gaps(await attempts(jittered)).slice(0, 6);
  jitteredGaps.forEach((gap, i) =>
    assert.ok(gap < ceilings[i] + 60, `jittered gap ${i}: ${gap} ms above ${ceilings[i]}: ${jitteredGaps}`),
  );

  const restarted = await serve({ port: server.port, dir: server.dir });
  for (const page of [pinned, jittered]) {
    await waitFor("reconnected", async () => (await recorded(page)).statuses.at(-1)?.status === "connected", 5_000);
    const statuses = (await recorded(page)).statuses.map((s) => s.status);
    assert.deepEqual(statuses.slice(0, 3), ["connecting", "connected", "disconnected"]);
    assert.equal(statuses.at(-1), "connected");
    await page.close();
  }
  await restarted.stop();
});

const SECRET = "browser-tests-secret-of-at-least-32-bytes";

/** An HS256 JWT for user `sub` (u1), valid for `seconds`, allowed on project:* and doc:*. */
function token(seconds, sub = "u1") {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + seconds;
  const claims = { sub, exp, channels: ["project:*", "doc:*"], presence: { name: sub.toUpperCase() } };
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${unsigned}.${createHmac("sha256", SECRET).update(unsigned).digest("base64url")}`;
}

test("two pages on a presence channel see each other; one closes, the other sees it leave; a blip changes nothing", async () => {
  const args = ["--jwt-secret", SECRET, "--presence-channels", "doc:*", "--presence-linger", "300ms"];
  const server = await serve({ args });
  const proxy = await startProxy(server.port);
  const ann = await clientPage(server, { ws: proxy.wsUrl, channels: ["doc:1"], token: token(3600, "ann"), initialDelayMs: "100" });
  const bob = await clientPage(server, { channels: ["doc:1"], token: token(3600, "bob") });
  const presence = async (page) => (await recorded(page)).presence["doc:1"];
  await waitFor("Ann sees Bob", async () => (await presence(ann)).members.includes("bob"));
  await waitFor("Bob sees Ann", async () => (await presence(bob)).members.includes("ann"));
  const members = await ann.evaluate(() => window.subscriptions["doc:1"].presence());
  assert.deepEqual(members.find((m) => m.id === "bob")?.info, { name: "BOB" }, JSON.stringify(members));

  // Ann's connection is cut and comes back: her list is the server's again, with nothing to
  // tell, and Bob hears nothing of it.
  const before = await presence(ann);
  proxy.cut();
  await waitFor("Ann sees the cut", async () => (await recorded(ann)).statuses.at(-1)?.status !== "connected");
  proxy.restore();
  await waitFor("Ann has the server's list again", async () => (await presence(ann)).lists > before.lists);
  assert.deepEqual((await presence(ann)).changes, before.changes, "nothing changed for Ann");

  await bob.close();
  await waitFor("Ann sees Bob leave", async () => !(await presence(ann)).members.includes("bob"));
  const { changes, members: left } = await presence(ann);
  assert.deepEqual([changes.slice(0, -1).sort(), changes.at(-1)], [["+ann", "+bob"], "-bob"], JSON.stringify(changes));
  assert.deepEqual(left, ["ann"]);
  assert.deepEqual(ann.problems, []);
  await ann.close();
  await proxy.close();
  await server.stop();
});

test("4001 stops the reconnects unless getToken gives a fresh token", async () => {
  const server = await serve({ args: ["--jwt-secret", SECRET] });
  const renewing = await clientPage(server, { token: "not-a-jwt", freshToken: token(3600), initialDelayMs: "100" });
  const refused = await clientPage(server, { token: "not-a-jwt", initialDelayMs: "100" });
  await waitSubscribed(renewing, server);
  const publisher = await Publisher.connect(server.socket);
  await publishRange(publisher, 1, 2);
  const record = await waitForEvents(renewing, 2);
  assert.equal(record.tokenRequests, 1, JSON.stringify(record));
  assert.deepEqual(record.errors.map((e) => e.code), [], JSON.stringify(record));

  // The page without getToken is refused, and then stays down: in the time a page with the
  // same backoff, whose connections fail, retries five times, it does not retry once.
  await waitFor("the other page is refused", async () => (await recorded(refused)).errors.length > 0);
  const control = await clientPage(server, { ws: "ws://127.0.0.1:1/ws", initialDelayMs: "100", maxDelayMs: "100" });
  const attempts = async (page) => (await recorded(page)).statuses.filter((s) => s.status === "connecting").length;
  await waitFor("the control page retried five times", async () => (await attempts(control)) >= 6);
  await control.close();
  const refusedRecord = await recorded(refused);
  assert.deepEqual(refusedRecord.errors.map((e) => e.code), [4001], JSON.stringify(refusedRecord));
  assert.deepEqual(refusedRecord.statuses.map((s) => s.status), ["connecting", "disconnected"]);
  publisher.close();
  for (const page of [renewing, refused]) await page.close();
  await server.stop();
});

test("a token about to expire is renewed with refresh, without reconnecting", async () => {
  const server = await serve({ args: ["--jwt-secret", SECRET, "--jwt-leeway", "0s"] });
  const expiresAt = Date.now() + 3_000;
  const page = await clientPage(server, { token: token(3), freshToken: token(3600) });
  await waitSubscribed(page, server);
  await waitFor("the page renews its token", async () => (await recorded(page)).tokenRequests === 1, 10_000);
  // Past the first token's expiry (whole seconds, so up to 1 s later), the connection serves on.
  await waitFor("the first token has expired", () => Date.now() > expiresAt + 1_500, 10_000);
  const publisher = await Publisher.connect(server.socket);
  await publishRange(publisher, 1, 1);
  const record = await waitForEvents(page, 1);
  assert.deepEqual(record.statuses.map((s) => s.status), ["connecting", "connected"]);
  assert.deepEqual(record.errors, []);
  publisher.close();
  await page.close();
  await server.stop();
});

test("a blip on a channel that never had an event is no gap, and what came meanwhile is replayed", async () => {
  const server = await serve();
  const proxy = await startProxy(server.port);
  const page = await clientPage(server, { ws: proxy.wsUrl, initialDelayMs: "100" });
  await waitSubscribed(page, server);
  proxy.cut();
  await waitFor("the server sees the cut", async () => (await server.health()).channels === 0);
  const publisher = await Publisher.connect(server.socket);
  await publishRange(publisher, 1, 1); // while the page is away
  proxy.restore();
  const record = await waitForEvents(page, 1);
  assert.deepEqual(record.events.map((e) => [e.seq, e.data.n]), [[1, 1]]);
  assert.deepEqual(record.gaps, [], "nothing was lost: no onGap");
  publisher.close();
  await page.close();
  await proxy.close();
  await server.stop();
});

test("events directed to the user reach a page that never subscribed to user:<sub>", async () => {
  const server = await serve({ args: ["--jwt-secret", SECRET] });
  const page = await clientPage(server, { token: token(3600) });
  await waitSubscribed(page, server);
  const publisher = await Publisher.connect(server.socket);
  await publisher.publish({ user: "u1", data: { task: "done" } });
  const record = await waitFor("the user event arrives", async () => {
    const r = await recorded(page);
    return r.userEvents.length > 0 && r;
  });
  assert.deepEqual(record.userEvents, [{ data: { task: "done" }, channel: "user:u1", seq: 1, userId: "u1" }]);
  assert.equal(record.events.length, 0, "not a channel subscription's event");
  publisher.close();
  await page.close();
  await server.stop();
});

test("a request the server's rate limit drops is sent again", async () => {
  // The page is told 100 times the real budget, so most of its 10 subscribes, made one by
  // one once connected, are dropped.
  const server = await serve({ args: ["--rate-limit", "5", "--rate-burst", "2", "--rate-limit-strikes", "1000"] });
  const page = await clientPage(server, { channels: [], inflateBudget: "1" });
  await waitFor("connected", async () => (await recorded(page)).statuses.at(-1)?.status === "connected");
  await page.evaluate(() => {
    for (let i = 0; i < 10; i++) window.watch(`job:${i}`);
  });
  await waitFor("all 10 subscribed in the end", async () => (await server.health()).channels === 10);
  const record = await recorded(page);
  assert.ok(record.dropped > 0, "the server dropped some");
  assert.deepEqual(record.errors, [], "handled by the client, not the page");
  await page.close();
  await server.stop();
});

test("a late refusal of an old subscribe leaves a newer subscription to the channel alone", async () => {
  const server = await serve({ args: ["--max-subscriptions", "1"] });
  const page = await clientPage(server);
  await waitSubscribed(page, server);
  // order:7 is refused (project:42 holds the only slot); before the refusal arrives the page
  // gives up both and subscribes to order:7 again, which the server now accepts.
  await page.evaluate(() => {
    window.watch("order:7");
    window.subscriptions["order:7"].unsubscribe();
    window.subscriptions["project:42"].unsubscribe();
    window.watch("order:7");
  });
  const publisher = await Publisher.connect(server.socket);
  await waitFor("order:7 is subscribed", async () => (await publisher.publish({ channel: "order:7", data: { n: 1 } })).delivered === 1);
  const record = await waitForEvents(page, 1);
  assert.equal(record.events[0].channel, "order:7", "the newer subscription still delivers");
  assert.deepEqual(record.errors.map((e) => e.code), ["too_many_subscriptions"]);
  publisher.close();
  await page.close();
  await server.stop();
});

test("a URL the browser refuses stops the client; a server it cannot reach is reported, then retried", async () => {
  const server = await serve();
  const page = await clientPage(server, { channels: [] });
  const outcome = await page.evaluate(async (origin) => {
    const { Sidecast } = await import(`${origin}/sidecast.js`);
    let invalid = null;
    try {
      new Sidecast("ftp://example.com/ws");
    } catch (error) {
      invalid = error.name;
    }
    // A WebSocket the browser refuses to create, and one that never opens.
    let refusedCalls = 0;
    class Refused {
      constructor() {
        refusedCalls += 1;
        throw new DOMException("The port 1 is not allowed.", "SecurityError");
      }
    }
    const refusedErrors = [];
    new Sidecast("ws://127.0.0.1:1/ws", { WebSocket: Refused }).on("error", (e) => refusedErrors.push(e));
    const downErrors = [];
    let downAttempts = 0;
    const down = new Sidecast("ws://127.0.0.1:1/ws", { initialDelayMs: 20, maxDelayMs: 20 });
    down.on("error", (e) => downErrors.push(e.code));
    down.on("status", (s) => (downAttempts += s === "connecting" ? 1 : 0));
    // Wait until the unreachable client has retried 6 times: the refused one had as long.
    while (downAttempts < 6) await new Promise((resolve) => setTimeout(resolve, 10));
    down.close();
    return { invalid, refusedCalls, refusedErrors, downErrors };
  }, server.origin);
  assert.equal(outcome.invalid, "TypeError");
  assert.equal(outcome.refusedCalls, 1, "no retry after the browser refused the URL");
  assert.deepEqual(outcome.refusedErrors.map((e) => [e.code, e.fatal]), [["connect_failed", true]]);
  assert.deepEqual(outcome.downErrors, ["unreachable"], "told once, while retrying goes on");
  await page.close();
  await server.stop();
});
