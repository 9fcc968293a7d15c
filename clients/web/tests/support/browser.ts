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

/** Options of {@link launchChromium}. */
export interface ChromiumOptions {
  /**
   * base64 SHA-256 SPKI hashes of certificates to trust (`--ignore-certificate-errors-spki-list`): a chain
   * containing one of them is accepted, any other certificate error still fails the page, as it would
   * for a user. Takes effect because playwright always passes a `--user-data-dir`.
   */
  trustSpki?: string[];
}

/** Launches Chromium with a fresh profile (each context is a separate person). */
export async function launchChromium(options: ChromiumOptions = {}): Promise<TestBrowser> {
  requireChromium();
  const trust = options.trustSpki?.length ? [`--ignore-certificate-errors-spki-list=${options.trustSpki.join(",")}`] : [];
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_ARGS, ...trust],
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
  /** http(s)://127.0.0.1:PORT: also the origin to allow in lamplight's CORS list. */
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
export function serveHarness(): Promise<DemoServer> {
  return servePage(HARNESS_DIR);
}

/** A PEM certificate chain and key: serve the page over HTTPS. */
export interface PageTls {
  cert: string;
  key: string;
}

/**
 * Builds the page in `root` (an `index.html` and its scripts) into a temporary directory and serves it
 * on a free loopback port, over HTTPS when `tls` is given.
 */
export async function servePage(root: string, tls?: PageTls): Promise<DemoServer> {
  const outDir = mkdtempSync(path.join(tmpdir(), "lamplight-page-"));
  const config: InlineConfig = {
    root,
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
  const server = await preview({
    ...config,
    preview: { port, host: "127.0.0.1", strictPort: true, open: false, ...(tls ? { https: tls } : {}) },
  });
  return {
    url: `${tls ? "https" : "http"}://127.0.0.1:${port}`,
    async close() {
      await server.close();
      rmSync(outDir, { recursive: true, force: true });
    },
  };
}
