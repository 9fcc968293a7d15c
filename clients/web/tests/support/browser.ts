/** Debian's Chromium driven by playwright-core (no browser download), and the demo page served by Vite. */

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { chromium, type Browser } from "playwright-core";
import { build, preview, type InlineConfig } from "vite";

import { CHROMIUM, DEMO_DIR, HARNESS_DIR, requireChromium } from "./env.js";
import { freePort } from "./lamplight.js";

/**
 * Flags that keep Chromium quiet on a machine without internet (see NOTES.md). `--headless` comes from
 * `headless: true`, and playwright gives every launch a fresh, empty profile (`--user-data-dir` in a new
 * temporary directory, removed on close).
 */
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export interface TestBrowser {
  browser: Browser;
  close(): Promise<void>;
}

/** Launches Chromium with a fresh profile (each context is a separate person). */
export async function launchChromium(): Promise<TestBrowser> {
  requireChromium();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 60_000,
  });
  return {
    browser,
    async close() {
      await browser.close();
    },
  };
}

export interface DemoServer {
  /** http://127.0.0.1:PORT: also the origin to allow in lamplight's CORS list. */
  url: string;
  close(): Promise<void>;
}

/** Serves the demo built by the global setup, with its development backend (tokens, publishing). */
export async function serveDemo(): Promise<DemoServer> {
  const port = await freePort();
  const server = await preview({
    root: DEMO_DIR,
    configFile: path.join(DEMO_DIR, "vite.config.ts"),
    logLevel: "warn",
    preview: { port, host: "127.0.0.1", strictPort: true, open: false },
  });
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => server.close(),
  };
}

/**
 * Builds the React harness page (tests/harness) into a temporary directory and serves it: a page whose
 * `<LamplightProvider>` props the test changes through `window.harness`.
 */
export async function serveHarness(): Promise<DemoServer> {
  const outDir = mkdtempSync(path.join(tmpdir(), "lamplight-harness-"));
  const config: InlineConfig = {
    root: HARNESS_DIR,
    configFile: false,
    logLevel: "warn",
    build: {
      outDir,
      emptyOutDir: true,
      chunkSizeWarningLimit: 1024,
      rollupOptions: {
        // TanStack Query's "use client" markers mean nothing in a client-only bundle (as in the demo).
        onwarn(warning, warn) {
          if (warning.code !== "MODULE_LEVEL_DIRECTIVE") warn(warning);
        },
      },
    },
  };
  await build(config);
  const port = await freePort();
  const server = await preview({ ...config, preview: { port, host: "127.0.0.1", strictPort: true, open: false } });
  return {
    url: `http://127.0.0.1:${port}`,
    async close() {
      await server.close();
      rmSync(outDir, { recursive: true, force: true });
    },
  };
}
