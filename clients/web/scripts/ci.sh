#!/usr/bin/env bash
# CI for the browser client (clients/web), run from anywhere:
#   npm ci -> generated code up to date with proto/ -> tsc --noEmit -> build -> Vitest unit tests -> e2e tests
#   (real lamplight from target/debug, gRPC publishers, Debian's Chromium via playwright-core, a private
#   redis-server, certificates made at run time by the openssl CLI for the HTTPS run). Prints a
#   `web-unit: N passed, N failed` and a `web-e2e: ...` line; exits non-zero on any failure. Needs:
#   `cargo build` done, `apt-get install -y chromium redis-server openssl` (never a browser download).
#   The board screenshot lands in <repo>/target/web-artifacts/board.png.
set -euo pipefail

PKG="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(cd "$PKG/../.." && pwd)"
BIN="${LAMPLIGHT_BIN:-$ROOT/target/debug/lamplight}"
CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"
cd "$PKG"

fail() { echo "web ci: $*" >&2; exit 1; }
step() { echo; echo "=== web: $* ==="; }

[[ -x "$BIN" ]] || fail "$BIN is missing: build it first (cd $ROOT && cargo build)"
[[ -x "$CHROMIUM" ]] || fail "$CHROMIUM is missing: apt-get install -y chromium (do not download a browser)"
command -v redis-server >/dev/null || fail "redis-server is missing: apt-get install -y redis-server"
command -v openssl >/dev/null || fail "openssl is missing (the HTTPS e2e makes its certificates with it): apt-get install -y openssl"
command -v node >/dev/null || fail "node is missing"
export LAMPLIGHT_BIN="$BIN" CHROMIUM_PATH="$CHROMIUM"

step "npm ci"
npm ci --no-audit --no-fund

step "generated code matches proto/"
node scripts/check-generated.mjs

step "type-check"
npx tsc --noEmit

step "build (dist/)"
npx tsc -p tsconfig.build.json

reports="$(mktemp -d)"
trap 'rm -rf "$reports"' EXIT
status=0

step "unit tests (Vitest)"
npx vitest run --config vitest.config.ts --reporter=default --reporter=json \
  --outputFile.json="$reports/unit.json" || true
node scripts/summary.mjs web-unit "$reports/unit.json" || status=1

step "end-to-end tests (lamplight + Chromium)"
mkdir -p "$ROOT/target/web-artifacts"
npx vitest run --config vitest.e2e.config.ts --reporter=default --reporter=json \
  --outputFile.json="$reports/e2e.json" || true
node scripts/summary.mjs web-e2e "$reports/e2e.json" || status=1

if [[ -f "$ROOT/target/web-artifacts/board.png" ]]; then
  echo "screenshot: $ROOT/target/web-artifacts/board.png"
fi
exit "$status"
