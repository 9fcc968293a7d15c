/**
 * `<LamplightProvider>` in Debian's Chromium against a real lamplight, its props changed the way an app
 * changes them: another server (base URL), another token source (someone else signed in), and the Retry
 * of `<ConnectionStatus/>` while a token request hangs. The page is tests/harness, under StrictMode.
 */

import type { BrowserContext, Page } from "playwright-core";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import type { HarnessProps, Seen, SourceSpec } from "../harness/main.js";
import { launchChromium, serveHarness, type DemoServer, type TestBrowser } from "../support/browser.js";
import { freePort, Publisher, startLamplight, userToken, type LamplightServer } from "../support/lamplight.js";

const UI_WAIT = 10_000;

interface HarnessWindow {
  harness: {
    defineSource(name: string, spec: SourceSpec): void;
    setHanging(name: string, hanging: boolean): void;
    calls(name: string): number;
    render(props: HarnessProps): void;
    seen(): Seen;
    cursor(room: string): string | undefined;
  };
}

describe("LamplightProvider", () => {
  let page: Page;
  let context: BrowserContext;
  let harness: DemoServer;
  let server: LamplightServer;
  let chromium: TestBrowser;
  let pub: Publisher;
  const pageErrors: string[] = [];

  beforeAll(async () => {
    harness = await serveHarness();
    server = await startLamplight({ heartbeatSecs: 1, corsOrigins: [harness.url] });
    chromium = await launchChromium();
    pub = new Publisher(server.url);
  });
  afterAll(async () => {
    await chromium?.close();
    await server?.stop();
    await harness?.close();
  });

  const openPage = async () => {
    context = await chromium.browser.newContext();
    page = await context.newPage();
    page.on("pageerror", (err) => pageErrors.push(err.message));
    await page.goto(harness.url);
    await page.locator("body[data-ready]").waitFor({ state: "attached", timeout: UI_WAIT });
  };
  afterEach(async () => {
    await context?.close();
    expect(pageErrors).toEqual([]);
  });

  const define = (name: string, spec: SourceSpec) =>
    page.evaluate(([n, s]) => (window as unknown as HarnessWindow).harness.defineSource(n, s), [name, spec] as const);
  const render = (props: HarnessProps) => page.evaluate((p) => (window as unknown as HarnessWindow).harness.render(p), props);
  const seen = () => page.evaluate(() => (window as unknown as HarnessWindow).harness.seen());
  const calls = (name: string) => page.evaluate((n) => (window as unknown as HarnessWindow).harness.calls(n), name);
  const state = (s: string) => page.locator(`body[data-state="${s}"]`).waitFor({ state: "attached", timeout: UI_WAIT });
  const probe = (text: string) => page.locator('[data-testid="probe"]', { hasText: text }).waitFor({ timeout: UI_WAIT });

  it("follows a new base URL: the client for the old one is replaced", async () => {
    await openPage();
    await define("a", { tokens: [userToken({ sub: "pa", projects: ["p1"] })] });
    const nobody = `http://127.0.0.1:${await freePort()}`; // nothing listens there
    await render({ baseUrl: nobody, source: "a" });
    await state("reconnecting");

    await render({ baseUrl: server.url, source: "a" });
    await state("connected");
    await probe("connected pa");
    expect((await seen()).clients).toBe(2);
  });

  it("replaces the client when another option changes, resuming its rooms on the same server", async () => {
    await openPage();
    await define("d", { tokens: [userToken({ sub: "pd", projects: ["p1"] })] });
    await render({ baseUrl: server.url, source: "d" });
    await probe("connected pd");
    // The publisher's token has no tenant: it names the user's room in full (the page joined `user:pd`,
    // the shorthand in its token's tenant t1, and hears it under that name).
    const id = await pub.task("tenant:t1:user:pd", "task.created", { id: "for-pd" });
    await page.waitForFunction((want) => (window as unknown as HarnessWindow).harness.cursor("user:pd") === want, id, { timeout: UI_WAIT });

    await render({ baseUrl: server.url, source: "d", heartbeatIntervalMs: 1500 });
    await page.waitForFunction(() => (window as unknown as HarnessWindow).harness.seen().recovered.length > 0, undefined, { timeout: UI_WAIT });
    const after = await seen();
    expect(after.clients).toBe(2);
    expect(after.recovered).toContain("user:pd");
  });

  it("follows a new token source on the same client, and a re-render with equal options changes nothing", async () => {
    await openPage();
    await define("b1", { tokens: [userToken({ sub: "pb1", projects: ["p1"] })] });
    await define("b2", { tokens: [userToken({ sub: "pb2", projects: ["p1"] })] });
    await render({ baseUrl: server.url, source: "b1" });
    await probe("connected pb1");
    const before = await calls("b1");
    // New inline objects (backoff), same values: neither a new client nor a new token.
    await render({ baseUrl: server.url, source: "b1" });
    await probe("connected pb1");
    expect(await calls("b1")).toBe(before);

    await render({ baseUrl: server.url, source: "b2" });
    await probe("connected pb2");
    expect(await calls("b2")).toBeGreaterThanOrEqual(1);
    expect((await seen()).clients).toBe(1);
  });

  it("ConnectionStatus offers Retry while a token request hangs, and Retry gets through", async () => {
    await openPage();
    await define("c", { tokens: [userToken({ sub: "pc", projects: ["p1"] })], hanging: true });
    await render({ baseUrl: server.url, source: "c" });
    await state("connecting");
    // The token endpoint answers again, but the request in flight never will (default timeout: 10 s).
    await page.evaluate(() => (window as unknown as HarnessWindow).harness.setHanging("c", false));
    await page.getByRole("button", { name: "Retry" }).click({ timeout: 5000 });
    await probe("connected pc");
  });
});
