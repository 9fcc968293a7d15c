/** Where things are, computed from this package's location (clients/web in the lamplight repo). */

import { existsSync } from "node:fs";
import path from "node:path";

export const PACKAGE_DIR = path.resolve(import.meta.dirname, "../..");
export const REPO_ROOT = path.resolve(PACKAGE_DIR, "../..");
export const DEMO_DIR = path.join(PACKAGE_DIR, "demo");
/** The page the React e2e tests drive (built at test time, see `serveHarness`). */
export const HARNESS_DIR = path.join(PACKAGE_DIR, "tests", "harness");
/** A page that is one tab of an app: a browser client driven through `window.tab` (see `servePage`). */
export const TABS_DIR = path.join(PACKAGE_DIR, "tests", "tabs");
export const LAMPLIGHT_BIN = process.env.LAMPLIGHT_BIN ?? path.join(REPO_ROOT, "target", "debug", "lamplight");
export const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
export const REDIS_SERVER = process.env.REDIS_SERVER ?? "redis-server";
/** CI artifacts (the board screenshot). */
export const ARTIFACTS_DIR = path.join(REPO_ROOT, "target", "web-artifacts");

/** Fails loudly, saying how to get what is missing. */
export function requireFile(file: string, hint: string): void {
  if (!existsSync(file)) throw new Error(`missing ${file}: ${hint}`);
}

export function requireLamplight(): void {
  requireFile(LAMPLIGHT_BIN, `build it first: (cd ${REPO_ROOT} && cargo build)`);
}

export function requireChromium(): void {
  requireFile(CHROMIUM, "install Debian's Chromium: apt-get install -y chromium (never `npx playwright install`)");
}
