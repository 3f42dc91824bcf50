// The TypeScript declarations (client/*.d.ts) type-check the documented usage.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";

test("sidecast.d.ts and react.d.ts accept the documented API and reject misuse", () => {
  const tsc = path.join(import.meta.dirname, "node_modules/typescript/bin/tsc");
  const file = path.join(import.meta.dirname, "types/usage.ts");
  const args = [tsc, "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022", "--skipLibCheck", file];
  try {
    execFileSync(process.execPath, args, { encoding: "utf8" });
  } catch (error) {
    assert.fail(`tsc found errors:\n${error.stdout}`);
  }
});
