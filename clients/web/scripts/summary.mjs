#!/usr/bin/env node
// Prints one closing line from a Vitest JSON report: `LABEL: N passed, N failed` (and `, N skipped`).
// Exits non-zero when anything failed or was skipped, or when no test ran at all.
import { readFileSync } from "node:fs";

const [label, file] = process.argv.slice(2);
let report;
try {
  report = JSON.parse(readFileSync(file, "utf8"));
} catch (err) {
  console.log(`${label}: 0 passed, 1 failed`);
  console.error(`no Vitest report at ${file}: ${err.message}`);
  process.exit(1);
}
const passed = report.numPassedTests ?? 0;
// A file that failed outside its tests (import error, failing hook) counts as one failure too.
const brokenFiles = (report.testResults ?? []).filter(
  (r) => r.status === "failed" && !(r.assertionResults ?? []).some((a) => a.status === "failed"),
).length;
const failed = (report.numFailedTests ?? 0) + brokenFiles;
const skipped = (report.numPendingTests ?? 0) + (report.numTodoTests ?? 0);
console.log(`${label}: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
if (skipped) console.error(`${label}: skipped tests are not allowed here`);
if (passed === 0) console.error(`${label}: no test ran`);
process.exit(failed > 0 || skipped > 0 || passed === 0 || report.success === false ? 1 : 0);
