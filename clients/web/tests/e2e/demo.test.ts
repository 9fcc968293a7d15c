/**
 * The demo page in Debian's Chromium against a real lamplight: tasks published over gRPC by the test show
 * up on the board, typing in a second browser context shows in the first, and a refused room shows an
 * error while the other rooms keep working. Saves a screenshot of the board under target/web-artifacts.
 */

import { mkdirSync } from "node:fs";
import path from "node:path";

import type { BrowserContext, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { launchChromium, serveDemo, type DemoServer, type TestBrowser } from "../support/browser.js";
import { ARTIFACTS_DIR } from "../support/env.js";
import { Publisher, startLamplight, type LamplightServer } from "../support/lamplight.js";

const P1 = "tenant:t1:project:p1";
const UI_WAIT = 10_000;

describe("demo page", () => {
  let demo: DemoServer;
  let server: LamplightServer;
  let chromium: TestBrowser;
  let pub: Publisher;
  const contexts: BrowserContext[] = [];
  const pageErrors: string[] = [];
  /** When each page asked GetPresence (ms since the epoch), by user. */
  const presenceCalls = new Map<string, number[]>();

  const open = async (user: string): Promise<Page> => {
    const context = await chromium.browser.newContext({ viewport: { width: 1400, height: 960 } });
    contexts.push(context);
    const page = await context.newPage();
    page.on("pageerror", (err) => pageErrors.push(`${user}: ${err.message}`));
    presenceCalls.set(user, []);
    page.on("request", (r) => {
      if (r.url().endsWith("/lamplight.v1.EventService/GetPresence")) presenceCalls.get(user)!.push(Date.now());
    });
    const q = new URLSearchParams({ user, server: server.url, heartbeat: "2", backoffMax: "2000" });
    await page.goto(`${demo.url}/?${q}`);
    await page.locator('[data-testid="connection-state"][data-state="connected"]').waitFor({ timeout: UI_WAIT });
    return page;
  };

  beforeAll(async () => {
    demo = await serveDemo();
    server = await startLamplight({ heartbeatSecs: 2, corsOrigins: [demo.url] });
    chromium = await launchChromium();
    pub = new Publisher(server.url);
  });

  afterAll(async () => {
    for (const c of contexts) await c.close().catch(() => undefined);
    await chromium?.close();
    await server?.stop();
    await demo?.close();
  });

  let alice: Page;

  it("shows a task published over gRPC within 1 s, highlighted as new; moves and removes it on later events", async () => {
    alice = await open("alice");
    const card = (id: string) => alice.locator(`[data-testid="task-card"][data-task-id="${id}"]`);

    await pub.task(P1, "task.created", { id: "task-e2e-1", title: "Ship the lamplight web client", status: "todo", priority: "high", createdById: "grpc-test" });
    // The acceptance bound: visible within 1 s of the publish returning.
    await card("task-e2e-1").waitFor({ timeout: 1000 });
    await expect(card("task-e2e-1").locator(".badge").textContent()).resolves.toBe("NEW");
    await expect(card("task-e2e-1").getAttribute("data-status")).resolves.toBe("todo");

    await pub.task(P1, "task.created", { id: "task-e2e-2", title: "Write the demo README", status: "todo", priority: "medium", createdById: "grpc-test" });
    await pub.task(P1, "task.created", { id: "task-e2e-3", title: "Temporary task", status: "todo", priority: "low", createdById: "grpc-test" });
    await pub.task(P1, "task.updated", { id: "task-e2e-1", title: "Ship the lamplight web client", status: "in_progress", priority: "high", createdById: "grpc-test" });
    await alice.locator('[data-column="in_progress"] [data-task-id="task-e2e-1"]').waitFor({ timeout: UI_WAIT });
    await card("task-e2e-3").waitFor({ timeout: UI_WAIT });
    await pub.task(P1, "task.deleted", { id: "task-e2e-3" });
    await card("task-e2e-3").waitFor({ state: "detached", timeout: UI_WAIT });
    await expect(alice.locator('[data-testid="task-card"]').count()).resolves.toBe(2);
  });

  it("shows typing from a second browser context, then the message, and who is online", async () => {
    const bob = await open("bob");
    await alice.locator('[data-testid="online"] li[data-user="bob"]').waitFor({ timeout: UI_WAIT });

    await bob.locator('[data-testid="message-input"]').pressSequentially("hello al", { delay: 30 });
    await alice.locator('[data-testid="typing"]', { hasText: "bob is typing…" }).waitFor({ timeout: UI_WAIT });

    await bob.locator('[data-testid="message-input"]').pressSequentially("ice!");
    await bob.locator('[data-testid="message-input"]').press("Enter");
    await alice.locator('[data-testid="message"]', { hasText: "hello alice!" }).waitFor({ timeout: UI_WAIT });
    // The message event invalidated the query (autoInvalidateQueries) and told the typing tracker bob stopped.
    await alice.locator('[data-testid="typing"]', { hasText: /^$/ }).waitFor({ timeout: UI_WAIT });

    // A moment a person would enjoy: a fresh task, someone typing, who is online.
    await pub.task(P1, "task.created", { id: "task-e2e-4", title: "Review the grpc-web CORS list", status: "todo", priority: "low", createdById: "grpc-test" });
    await alice.locator('[data-task-id="task-e2e-4"] .badge').waitFor({ timeout: UI_WAIT });
    await bob.locator('[data-testid="message-input"]').pressSequentially("the board is live", { delay: 20 });
    await alice.locator('[data-testid="typing"]', { hasText: "bob is typing…" }).waitFor({ timeout: UI_WAIT });
    mkdirSync(ARTIFACTS_DIR, { recursive: true });
    await alice.screenshot({ path: path.join(ARTIFACTS_DIR, "board.png"), fullPage: true });
  });

  it("applies status diffs to who is online without refetching presence on each", async () => {
    const carol = await open("carol");
    await alice.locator('[data-testid="online"] li[data-user="carol"]').waitFor({ timeout: UI_WAIT });
    await carol.context().close();
    await alice.locator('[data-testid="online"] li[data-user="carol"]').waitFor({ state: "detached", timeout: UI_WAIT });
    // alice's list followed carol in and out from the `user.status` events alone: her page asked
    // GetPresence only when it mounted and then on its periodic refresh (every 15 s), never in between.
    const calls = presenceCalls.get("alice")!;
    expect(calls.length).toBeGreaterThan(0);
    for (let i = 1; i < calls.length; i++) expect(calls[i]! - calls[i - 1]!, `GetPresence calls ${calls.join(", ")}`).toBeGreaterThan(14_000);
  });

  it("shows a refused room as an error while the other rooms keep working", async () => {
    await alice.locator('[data-channel-tab="secret"]').click();
    const error = alice.locator('[data-testid="join-error"]');
    await error.waitFor({ timeout: UI_WAIT });
    await expect(error.textContent()).resolves.toContain("not allowed in room tenant:t1:channel:secret");
    await expect(alice.locator('[data-testid="connection-state"]').getAttribute("data-state")).resolves.toBe("connected");

    await pub.task(P1, "task.created", { id: "task-e2e-after-denial", title: "Still live after a refusal", status: "todo" });
    await alice.locator('[data-task-id="task-e2e-after-denial"]').waitFor({ timeout: UI_WAIT });

    await alice.locator('[data-channel-tab="general"]').click();
    await alice.locator('[data-testid="message"]', { hasText: "hello alice!" }).waitFor({ timeout: UI_WAIT });
    await expect(error.count()).resolves.toBe(0);
    expect(pageErrors).toEqual([]);
  });
});
