// The useChannel and usePresence hooks in a React page built from npm packages.

import assert from "node:assert/strict";
import path from "node:path";
import { test } from "node:test";
import * as esbuild from "esbuild";
import { PAGES, Publisher, openPage, startServer, useBrowser, waitFor } from "./harness.mjs";

const fixture = useBrowser(async () => {
  const bundle = await esbuild.build({
    entryPoints: [path.join(PAGES, "react-app.jsx")],
    bundle: true,
    write: false,
    format: "esm",
    jsx: "automatic",
    // client/react.js imports "react", which is the app's: resolve it from here.
    nodePaths: [path.join(import.meta.dirname, "node_modules")],
    define: { "process.env.NODE_ENV": '"production"' },
    logLevel: "warning",
  });
  await esbuild.stop();
  return {
    "/react.html": {
      type: "text/html",
      body: '<!doctype html><link rel="icon" href="data:,"><div id="root"></div><script type="module" src="/react-app.js"></script>',
    },
    "/react-app.js": { type: "text/javascript", body: bundle.outputFiles[0].text },
  };
});

test("useChannel renders the last event and follows the channel prop", async () => {
  const server = await startServer({ args: ["--allowed-origin", fixture.pages.origin] });
  const page = await openPage(fixture.browser, `${fixture.pages.origin}/react.html?ws=${encodeURIComponent(server.wsUrl)}`);
  const text = (id) => page.locator(`#${id}`).textContent();
  const channels = async () => (await server.health()).channels;
  await waitFor("connected", async () => (await text("status")) === "connected");
  await waitFor("subscribed", async () => (await channels()) === 1);

  const publisher = await Publisher.connect(server.socket);
  await publisher.publish({ channel: "project:42", data: { percent: 10 } });
  await publisher.publish({ channel: "project:42", data: { percent: 40 } });
  await waitFor("the last event is rendered", async () => (await text("count")) === "2");
  assert.equal(await text("last"), 'project:42 #2 {"percent":40}');

  // A new channel prop: the old subscription ends, the new one starts empty.
  await page.click("#switch");
  await waitFor("the list restarts", async () => (await text("count")) === "0");
  await publisher.publish({ channel: "order:7", data: "shipped" });
  await waitFor("order:7 is rendered", async () => (await text("last")) === 'order:7 #1 "shipped"');
  const reply = await publisher.publish({ channel: "project:42", data: { percent: 90 } });
  assert.equal(reply.delivered, 0, "project:42 was unsubscribed");
  assert.equal(await channels(), 1);

  await page.click("#unmount");
  await waitFor("unmounting unsubscribes", async () => (await channels()) === 0);
  assert.deepEqual(page.problems, []);
  publisher.close();
  await page.close();
  await server.stop();
});

test("useChannel with rewind renders the current progress on first paint", async () => {
  const server = await startServer({ args: ["--allowed-origin", fixture.pages.origin] });
  const publisher = await Publisher.connect(server.socket);
  // The render is at 40% before the page opens; nothing is published while it loads.
  await publisher.publish({ channel: "project:42", data: { percent: 10 } });
  await publisher.publish({ channel: "project:42", data: { percent: 40 } });
  const url = `${fixture.pages.origin}/react.html?rewind=1&ws=${encodeURIComponent(server.wsUrl)}`;
  const page = await openPage(fixture.browser, url);
  const text = (id) => page.locator(`#${id}`).textContent();
  await waitFor("the current progress is rendered", async () => (await text("last")) !== "none");
  assert.equal(await text("last"), 'project:42 #2 {"percent":40}');
  assert.equal(await text("count"), "1", "only the latest, as asked");
  // Then live, with nothing repeated.
  await publisher.publish({ channel: "project:42", data: { percent: 60 } });
  await waitFor("the next event follows", async () => (await text("count")) === "2");
  assert.equal(await text("last"), 'project:42 #3 {"percent":60}');
  assert.deepEqual(page.problems, []);
  publisher.close();
  await page.close();
  await server.stop();
});

test("usePresence lists who is on the channel and follows them", async () => {
  const args = ["--allowed-origin", fixture.pages.origin, "--presence-channels", "doc:*", "--presence-linger", "0s"];
  const server = await startServer({ args });
  const url = `${fixture.pages.origin}/react.html?presence=doc:1&ws=${encodeURIComponent(server.wsUrl)}`;
  const first = await openPage(fixture.browser, url);
  const here = (page) => page.locator("#here li").count();
  await waitFor("the first page lists itself", async () => (await here(first)) === 1);
  const second = await openPage(fixture.browser, url);
  await waitFor("each page lists both", async () => (await here(first)) === 2 && (await here(second)) === 2);
  await second.close();
  await waitFor("the first page sees the second leave", async () => (await here(first)) === 1);
  assert.deepEqual(first.problems, []);
  await first.close();
  await server.stop();
});
