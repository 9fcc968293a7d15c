/**
 * Membership changes on live streams (`AdminService`) against a real lamplight: a room an administrator
 * removes is reported (`removed`, `joinError` with a RoomRemovedError) and dropped while the other rooms
 * flow on the same stream; a disconnect puts the client in `error` with a DisconnectedError and no
 * reconnection, and <ConnectionStatus/> in Chromium shows the reason without a Retry; revoked tokens are
 * replaced by a fresh one from `getToken`, and a source that keeps giving revoked tokens ends in `error`.
 */

import { Code, ConnectError } from "@connectrpc/connect";
import type { BrowserContext, Page } from "playwright-core";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import {
  DisconnectedError,
  RoomRemovedError,
  createLamplight,
  type Event,
  type JoinError,
  type Lamplight,
  type LamplightOptions,
  type RemovedNotice,
  type RetryNotice,
} from "../../src/index.js";
import type { HarnessProps, SourceSpec } from "../harness/main.js";
import { launchChromium, serveHarness, type DemoServer, type TestBrowser } from "../support/browser.js";
import { Admin, Publisher, startLamplight, until, userToken, type LamplightServer } from "../support/lamplight.js";

const P1 = "tenant:t1:project:p1";
const C1 = "tenant:t1:channel:c1";
const WAIT = 10_000;

const clients: Lamplight[] = [];
function client(url: string, options: Partial<LamplightOptions> & Pick<LamplightOptions, "getToken">): Lamplight {
  const c = createLamplight({
    baseUrl: url,
    heartbeatIntervalMs: 1000,
    autoJoinUserRooms: false,
    backoff: { initialMs: 50, maxMs: 400 },
    ...options,
  });
  clients.push(c);
  return c;
}

function watch(c: Lamplight) {
  const events: Event[] = [];
  const removed: RemovedNotice[] = [];
  const joinErrors: JoinError[] = [];
  const retries: RetryNotice[] = [];
  const states: string[] = [];
  c.on("event", (e) => events.push(e));
  c.on("removed", (r) => removed.push(r));
  c.on("joinError", (e) => joinErrors.push(e));
  c.on("retry", (r) => retries.push(r));
  c.on("state", (s) => states.push(s.state));
  const waitFor = (check: () => boolean, what: string, ms = WAIT) =>
    until(check, ms, what, (notify) => {
      const offs = (["event", "state", "retry", "subscribed", "removed"] as const).map((n) => c.on(n, notify));
      return () => offs.forEach((off) => off());
    });
  const tasks = () => events.map((e) => `${e.room} ${e.payload.case === "task" ? e.payload.value.id : "?"}`);
  return { events, removed, joinErrors, retries, states, waitFor, tasks };
}

const nowSecs = () => Math.floor(Date.now() / 1000);

afterEach(() => {
  while (clients.length) clients.pop()!.close();
});

describe("AdminService and the client", () => {
  let server: LamplightServer;
  let pub: Publisher;
  let admin: Admin;

  beforeAll(async () => {
    server = await startLamplight({ heartbeatSecs: 1 });
    pub = new Publisher(server.url);
    admin = new Admin(server.url);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it("a removed room is reported and dropped while the other rooms flow on the same stream", async () => {
    const c = client(server.url, { rooms: [C1], getToken: () => userToken({ sub: "adm1", projects: ["p1"], channels: ["c1"] }) });
    const w = watch(c);
    await c.join(P1);
    await w.waitFor(() => c.state === "connected", "connected");
    const before = await pub.task(P1, "task.created", { id: "p-before" });
    await w.waitFor(() => c.cursors()[P1] === before, "the event before the removal");
    const opened = c.stats().streamsOpened;

    await admin.unsubscribe("adm1", P1, "left the project");
    await w.waitFor(() => w.removed.length === 1, "the removal");
    expect(w.removed).toEqual([{ room: P1, reason: "left the project" }]);
    expect(w.joinErrors).toHaveLength(1);
    const err = w.joinErrors[0]!;
    expect(err).toBeInstanceOf(RoomRemovedError);
    expect(err.room).toBe(P1);
    expect((err as RoomRemovedError).reason).toBe("left the project");
    expect(c.rooms()).toEqual([C1]);
    expect(Object.keys(c.cursors())).not.toContain(P1);

    await pub.task(P1, "task.created", { id: "p-after" });
    const last = await pub.task(C1, "message.created", { id: "c-after" });
    await w.waitFor(() => c.cursors()[C1] === last, "the channel's event");
    expect(w.tasks()).toEqual([`${P1} p-before`, `${C1} c-after`]);
    // The server already took the room off the stream: nothing to re-open for.
    expect(c.stats().streamsOpened).toBe(opened);
    expect(c.state).toBe("connected");

    // Joining again is the app's decision, and works while the token allows it.
    await c.join(P1);
    expect(c.rooms()).toContain(P1);
  });

  it("a disconnect ends in the error state with the reason and does not reconnect", async () => {
    const c = client(server.url, { rooms: [P1], getToken: () => userToken({ sub: "adm2", projects: ["p1"], channels: ["c1"] }) });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected", "connected");
    const opened = c.stats().streamsOpened;

    await admin.disconnect("adm2", "account closed");
    await w.waitFor(() => c.state === "error", "the error state");
    expect(c.error).toBeInstanceOf(DisconnectedError);
    const err = c.error as DisconnectedError;
    expect(err.reason).toBe("account closed");
    expect(err.status.code).toBe(Code.PermissionDenied);
    expect(w.retries).toEqual([]);
    expect(w.joinErrors).toEqual([]);
    expect(c.rooms()).toEqual([P1]);
    // Well past several backoff delays (50 ms doubling): still nothing opened, still in error.
    await new Promise((r) => setTimeout(r, 1000));
    expect(c.stats().streamsOpened).toBe(opened);
    expect(c.state).toBe("error");
    expect(w.states.filter((s) => s === "reconnecting")).toEqual([]);
  });

  it("revoked tokens: a fresh one from getToken resumes without loss", async () => {
    const asked: boolean[] = [];
    const c = client(server.url, {
      rooms: [P1],
      getToken: ({ forceRefresh }) => {
        asked.push(forceRefresh);
        // The first token was issued a minute ago; later ones now.
        const issuedAt = asked.length === 1 ? nowSecs() - 60 : undefined;
        return userToken({ sub: "adm3", projects: ["p1"], issuedAt });
      },
    });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected", "connected");
    await admin.revokeTokens("adm3", nowSecs() - 30, "password changed");
    await w.waitFor(() => w.retries.length === 1, "the stream ended");
    expect(w.retries[0]!.error.code).toBe(Code.Unauthenticated);
    const id = await pub.task(P1, "task.created", { id: "after-revocation" });
    await w.waitFor(() => c.cursors()[P1] === id, "the event after the revocation");
    expect(asked).toEqual([false, true]);
    expect(c.state).toBe("connected");
  });

  it("a source that keeps giving revoked tokens ends in the error state", async () => {
    const token = userToken({ sub: "adm4", projects: ["p1"], issuedAt: nowSecs() - 60 });
    const c = client(server.url, { rooms: [P1], maxAuthFailures: 2, getToken: () => token });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected", "connected");
    await admin.revokeTokens("adm4", nowSecs() - 30, "");
    await w.waitFor(() => c.state === "error", "the error state");
    expect(c.error).toBeInstanceOf(ConnectError);
    expect((c.error as ConnectError).code).toBe(Code.Unauthenticated);
    expect(c.error).not.toBeInstanceOf(DisconnectedError);
  });
});

interface HarnessWindow {
  harness: { defineSource(name: string, spec: SourceSpec): void; render(props: HarnessProps): void };
}

describe("<ConnectionStatus/> in Chromium", () => {
  let harness: DemoServer;
  let server: LamplightServer;
  let chromium: TestBrowser;
  let context: BrowserContext;
  let page: Page;

  beforeAll(async () => {
    harness = await serveHarness();
    server = await startLamplight({ heartbeatSecs: 1, corsOrigins: [harness.url] });
    chromium = await launchChromium();
  });
  afterAll(async () => {
    await context?.close();
    await chromium?.close();
    await server?.stop();
    await harness?.close();
  });

  it("shows an administrator's disconnect with its reason and no Retry", async () => {
    const errors: string[] = [];
    context = await chromium.browser.newContext();
    page = await context.newPage();
    page.on("pageerror", (err) => errors.push(err.message));
    await page.goto(harness.url);
    await page.locator("body[data-ready]").waitFor({ state: "attached", timeout: WAIT });
    const spec: SourceSpec = { tokens: [userToken({ sub: "adm5", projects: ["p1"] })] };
    await page.evaluate((s) => (window as unknown as HarnessWindow).harness.defineSource("s", s), spec);
    const props: HarnessProps = { baseUrl: server.url, source: "s" };
    await page.evaluate((p) => (window as unknown as HarnessWindow).harness.render(p), props);
    await page.locator('body[data-state="connected"]').waitFor({ state: "attached", timeout: WAIT });

    await new Admin(server.url).disconnect("adm5", "account closed");
    const status = page.locator('[data-lamplight-state="error"]');
    await status.waitFor({ timeout: WAIT });
    expect(await status.innerText()).toContain("Disconnected by an administrator (account closed)");
    expect(await page.getByRole("button", { name: "Retry" }).count()).toBe(0);
    expect(errors).toEqual([]);
  });
});
