#!/usr/bin/env node
// Fails when src/gen is not what `npm run generate` makes from ../../proto today: regenerates into a
// temporary directory with the same buf + protoc-gen-es and compares file by file.

import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

const pkg = path.resolve(import.meta.dirname, "..");
const bin = path.join(pkg, "node_modules", ".bin");
const committed = path.join(pkg, "src", "gen");
const out = mkdtempSync(path.join(tmpdir(), "lamplight-gen-"));

function files(dir, base = dir) {
  let list = [];
  for (const name of readdirSync(dir)) {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) list = list.concat(files(full, base));
    else list.push(path.relative(base, full));
  }
  return list.sort();
}

try {
  execFileSync(path.join(bin, "buf"), ["generate", "--output", out], {
    cwd: pkg,
    stdio: "inherit",
    env: { ...process.env, PATH: `${bin}${path.delimiter}${process.env.PATH ?? ""}` },
  });
  const fresh = path.join(out, "src", "gen");
  const want = files(fresh);
  const have = files(committed);
  const problems = [];
  for (const f of want) {
    if (!have.includes(f)) problems.push(`missing: src/gen/${f}`);
    else if (!readFileSync(path.join(fresh, f)).equals(readFileSync(path.join(committed, f)))) problems.push(`stale: src/gen/${f}`);
  }
  for (const f of have) if (!want.includes(f)) problems.push(`not generated from proto/: src/gen/${f}`);
  if (problems.length) {
    console.error(`generated code is out of date with proto/:\n  ${problems.join("\n  ")}\nrun \`npm run generate\` in clients/web and commit the result`);
    process.exitCode = 1;
  } else {
    console.log(`generated code is up to date (${want.length} file${want.length === 1 ? "" : "s"} in src/gen)`);
  }
} finally {
  rmSync(out, { recursive: true, force: true });
}
