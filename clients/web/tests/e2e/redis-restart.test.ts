/**
 * Two lamplight nodes on one private Redis. The page is connected to node A; the test publishes through
 * node B. Node A is killed (SIGKILL, like a crash) and started again on the same port: the page shows
 * `reconnecting`, then `connected`, and ends with every event exactly once.
 */

import type { Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { launchChromium, serveDemo, type DemoServer, type TestBrowser } from "../support/browser.js";
import { Publisher, lamplightHasFlag, startLamplight, startRedis, type LamplightServer, type RedisServer } from "../support/lamplight.js";

const P1 = "tenant:t1:project:p1";
const UI_WAIT = 15_000;

describe("Redis-backed nodes", () => {
  let redis: RedisServer;
  let demo: DemoServer;
  let nodeA: LamplightServer;
  let nodeB: LamplightServer;
  let chromium: TestBrowser;
  let page: Page;

  beforeAll(async () => {
    if (!(await lamplightHasFlag("--redis-url"))) {
      throw new Error("this lamplight build has no --redis-url: the Redis bus is required for this test");
    }
    redis = await startRedis();
    demo = await serveDemo();
    nodeA = await startLamplight({ heartbeatSecs: 2, redisUrl: redis.url, corsOrigins: [demo.url] });
    nodeB = await startLamplight({ heartbeatSecs: 2, redisUrl: redis.url });
    chromium = await launchChromium();
  });

  afterAll(async () => {
    await chromium?.close();
    await nodeA?.stop();
    await nodeB?.stop();
    await demo?.close();
    await redis?.stop();
  });

  it("survives its node being killed and restarted while events flow through another node", async () => {
    const context = await chromium.browser.newContext({ viewport: { width: 1400, height: 960 } });
    page = await context.newPage();
    const q = new URLSearchParams({ user: "carol", server: nodeA.url, heartbeat: "2", backoffMax: "1000" });
    await page.goto(`${demo.url}/?${q}`);
    const state = page.locator('[data-testid="connection-state"]');
    await page.locator('[data-testid="connection-state"][data-state="connected"]').waitFor({ timeout: UI_WAIT });

    const viaB = new Publisher(nodeB.url);
    const ids: string[] = [];
    const publish = async (n: string) => {
      ids.push(await viaB.task(P1, "task.created", { id: `task-${n}`, title: `Event ${n}`, status: "todo", createdById: "node-b" }));
    };
    const card = (n: string) => page.locator(`[data-task-id="task-${n}"]`);

    for (const n of ["before-1", "before-2", "before-3"]) await publish(n);
    await card("before-3").waitFor({ timeout: UI_WAIT });

    await nodeA.kill();
    await page.locator('[data-testid="connection-state"][data-state="reconnecting"]').waitFor({ timeout: UI_WAIT });
    await page.locator('[data-lamplight-state="reconnecting"]', { hasText: "Reconnecting" }).waitFor({ timeout: UI_WAIT });

    for (const n of ["down-1", "down-2", "down-3", "down-4"]) await publish(n);

    nodeA = await startLamplight({ heartbeatSecs: 2, redisUrl: redis.url, corsOrigins: [demo.url], port: nodeA.port });
    await page.locator('[data-testid="connection-state"][data-state="connected"]').waitFor({ timeout: UI_WAIT });
    await expect(page.locator("[data-lamplight-state]").count()).resolves.toBe(0); // the banner hides again

    for (const n of ["after-1", "after-2", "after-3"]) await publish(n);
    await card("after-3").waitFor({ timeout: UI_WAIT });
    for (const n of ["down-1", "down-2", "down-3", "down-4"]) await card(n).waitFor({ timeout: UI_WAIT });

    // Every event exactly once: on the board, and in the activity feed (which lists each delivery).
    await expect(page.locator('[data-testid="task-card"]').count()).resolves.toBe(10);
    for (const id of ids) {
      await expect(page.locator(`[data-testid="activity"] li[data-event-id="${id}"]`).count(), id).resolves.toBe(1);
    }
    await expect(page.locator('[data-testid="activity"] li[data-type="task.created"]').count()).resolves.toBe(10);
    await expect(page.locator('[data-testid="activity"] li[data-type="reset"]').count()).resolves.toBe(0);
    await expect(state.getAttribute("data-state")).resolves.toBe("connected");
    await context.close();
  });
});
