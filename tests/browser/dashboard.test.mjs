// The dashboard at GET /: live connection count, a moving chart, and the channel panel.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { OUTPUT, Publisher, openPage, startServer, useBrowser, waitFor } from "./harness.mjs";

const fixture = useBrowser();

test("the dashboard shows the server's life and a channel's events", async () => {
  const server = await startServer({ args: ["--allowed-origin", "*"] });
  const dashboard = await openPage(fixture.browser, `${server.origin}/`);
  await dashboard.setViewportSize({ width: 1200, height: 900 });
  const text = (id) => dashboard.locator(`#${id}`).textContent();
  await waitFor("the dashboard is connected", async () => (await text("status")) === "connected");

  // Two more pages subscribe to project:1: three connections in all.
  const query = new URLSearchParams({ server: server.origin, ws: server.wsUrl, channel: "project:1" });
  const clients = [];
  for (let i = 0; i < 2; i++) clients.push(await openPage(fixture.browser, `${fixture.pages.origin}/client.html?${query}`));
  await waitFor("the dashboard counts 3 connections", async () => (await text("connections")) === "3");

  // A stream of events for a few seconds makes the charts move.
  const publisher = await Publisher.connect(server.socket);
  const chart = dashboard.locator("#chart-out");
  const picture = () => chart.evaluate((canvas) => canvas.toDataURL());
  const points = async () => Number(await chart.getAttribute("data-points"));
  const before = { picture: await picture(), points: await points() };
  let n = 0;
  await waitFor("the chart has moved on by 3 seconds", async () => {
    for (let i = 0; i < 20; i++) await publisher.publish({ channel: "project:1", data: { n: ++n } });
    return (await points()) >= before.points + 3;
  });
  assert.notEqual(await picture(), before.picture, "the chart was redrawn");
  await waitFor("frames out per second show the traffic", async () => Number((await text("framesOutPerSec")).replace(/,/g, "")) > 0);

  // The panel subscribes to any channel and lists its events as they arrive.
  await dashboard.fill("#channel", "project:1");
  await dashboard.click("#watch button");
  await waitFor("the panel is subscribed", async () => {
    await publisher.publish({ channel: "project:1", data: { panel: true } });
    return (await dashboard.locator("#events li").count()) > 0;
  });
  assert.match(await dashboard.locator("#events li").first().textContent(), /project:1 #\d+\{"panel":true\}/);

  fs.mkdirSync(OUTPUT, { recursive: true });
  const screenshot = path.join(OUTPUT, "dashboard.png");
  await dashboard.screenshot({ path: screenshot, fullPage: true });
  assert.ok(fs.statSync(screenshot).size > 10_000, "a real screenshot");
  assert.deepEqual(dashboard.problems, []);
  publisher.close();
  for (const page of [dashboard, ...clients]) await page.close();
  await server.stop();
});
