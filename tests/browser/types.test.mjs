// The TypeScript declarations (client/*.d.ts, client/node/publisher.d.mts) type-check the
// documented usage.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";

test("sidecast.d.ts, react.d.ts and the Node publisher's declarations accept the documented API and reject misuse", () => {
  const tsc = path.join(import.meta.dirname, "node_modules/typescript/bin/tsc");
  const files = ["types/usage.ts", "types/publisher.ts"].map((f) => path.join(import.meta.dirname, f));
  const args = [tsc, "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022", "--skipLibCheck", ...files];
  try {
    execFileSync(process.execPath, args, { encoding: "utf8" });
  } catch (error) {
    assert.fail(`tsc found errors:\n${error.stdout}`);
  }
});
