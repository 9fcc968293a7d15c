/**
 * Token sources that fail the way real ones do, against a real lamplight: a `getToken()` that rejects
 * (network down while a laptop wakes), one that never resolves, and a token refused while the previous
 * stream is still up. None of them is a refused token; each must end connected, not in `error` or stuck.
 */

import { Code } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import { createLamplight, type ConnectionState, type Lamplight, type LamplightOptions, type RetryNotice } from "../../src/index.js";
import { mintDevToken } from "../../demo/server/token.js";
import { Publisher, startLamplight, until, userToken, type LamplightServer } from "../support/lamplight.js";

const P1 = "tenant:t1:project:p1";
const P2 = "tenant:t1:project:p2";
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
  const states: ConnectionState[] = [];
  const retries: RetryNotice[] = [];
  c.on("state", (s) => states.push(s.state));
  c.on("retry", (r) => retries.push(r));
  const waitFor = (check: () => boolean, what: string, ms = WAIT) =>
    until(check, ms, what, (notify) => {
      const offs = (["event", "state", "retry", "subscribed", "identity"] as const).map((n) => c.on(n, notify));
      return () => offs.forEach((off) => off());
    });
  return { states, retries, waitFor };
}

afterEach(() => {
  while (clients.length) clients.pop()!.close();
});

describe("token sources", () => {
  let server: LamplightServer;
  let pub: Publisher;

  beforeAll(async () => {
    server = await startLamplight({ heartbeatSecs: 1 });
    pub = new Publisher(server.url);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it("a getToken() that rejects is retried with backoff, not counted as a refused token", async () => {
    const calls: boolean[] = [];
    const c = client(server.url, {
      rooms: [P1],
      getToken: async ({ forceRefresh }) => {
        calls.push(forceRefresh);
        // More failures than maxAuthFailures (3): the network is down for a while.
        if (calls.length <= 6) throw new TypeError("Failed to fetch");
        return userToken({ sub: "tok1", projects: ["p1"] });
      },
    });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected" || c.state === "error", "connected (or error)");
    expect(c.state).toBe("connected");
    expect(w.states).not.toContain("error");
    // Nothing was refused by the server: no token was asked to be fresh.
    expect(calls).toEqual([false, false, false, false, false, false, false]);
    const failures = w.retries.slice(0, 6);
    expect(failures).toHaveLength(6);
    for (const r of failures) {
      expect(r.error.code).toBe(Code.Unavailable);
      expect(r.error.rawMessage).toContain("Failed to fetch");
    }
    // Backed off (each delay within [base/2, base] of 50 ms doubling to 400 ms), none immediate.
    failures.forEach((r, i) => {
      const base = Math.min(400, 50 * 2 ** i);
      expect(r.delayMs).toBeGreaterThanOrEqual(base / 2);
      expect(r.delayMs).toBeLessThanOrEqual(base);
    });
    const id = await pub.task(P1, "task.created", { id: "after-outage", projectId: "p1", tenantId: "t1" });
    await w.waitFor(() => c.cursors()[P1] === id, "the event after the outage");
  });

  it("a getToken() that never resolves times out (aborting its signal) and is retried", async () => {
    const signals: AbortSignal[] = [];
    let calls = 0;
    const c = client(server.url, {
      rooms: [P1],
      tokenTimeoutMs: 300,
      getToken: (context) => {
        calls += 1;
        if (context.signal) signals.push(context.signal);
        if (calls === 1) return new Promise<string>(() => undefined); // hangs for ever
        return userToken({ sub: "tok2", projects: ["p1"] });
      },
    });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected", "connected after the token fetch timed out");
    expect(calls).toBe(2);
    expect(w.retries[0]!.error.code).toBe(Code.Unavailable);
    expect(w.retries[0]!.error.rawMessage).toContain("no token after 300 ms");
    expect(signals[0]?.aborted).toBe(true);
    expect(w.states).toEqual(["connecting", "reconnecting", "connected"]);
  });

  it("a re-open refused as UNAUTHENTICATED while the old stream is up asks for a fresh token", async () => {
    const calls: boolean[] = [];
    const c = client(server.url, {
      rooms: [P1],
      getToken: ({ forceRefresh }) => {
        calls.push(forceRefresh);
        // The first token is good; later cached ones are refused (say, revoked); a fresh one is good.
        if (calls.length === 1 || forceRefresh) return userToken({ sub: "tok3", projects: ["p1", "p2"] });
        return mintDevToken({ sub: "tok3", tid: "t1", projects: ["p1", "p2"] }, "not-the-server-secret");
      },
    });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected", "connected");
    await Promise.race([
      c.join(P2),
      new Promise((_, reject) => setTimeout(() => reject(new Error(`join not confirmed; getToken calls: ${JSON.stringify(calls)}`)), WAIT)),
    ]);
    expect(calls).toEqual([false, false, true]);
    expect(w.retries.map((r) => r.error.code)).toEqual([Code.Unauthenticated]);
    expect(c.state).toBe("connected");
  });

  it("a new token source re-opens the stream with its token while staying connected", async () => {
    const c = client(server.url, { autoJoinUserRooms: true, rooms: [P1], getToken: () => userToken({ sub: "tok4a", projects: ["p1"] }) });
    const w = watch(c);
    await w.waitFor(() => c.state === "connected" && c.rooms().includes("user:tok4a"), "connected as tok4a");
    const confirmed: string[][] = [];
    c.on("subscribed", (rooms) => confirmed.push(rooms.map((r) => r.room).sort()));

    c.setTokenSource(() => userToken({ sub: "tok4b", projects: ["p1"] }));
    await w.waitFor(() => confirmed.some((rooms) => rooms.includes("user:tok4b")), "a stream carrying tok4b's rooms");
    expect(c.identity?.userId).toBe("tok4b");
    expect(c.rooms()).not.toContain("user:tok4a");
    expect(w.states).toEqual(["connecting", "connected"]); // never left connected
    const presence = await c.getPresence(P1);
    expect(presence.userIds).toContain("tok4b");
  });

  it("a client that gave up on refused tokens starts again with a new token source", async () => {
    const c = client(server.url, {
      rooms: [P1],
      backoff: { initialMs: 20, maxMs: 100 },
      getToken: () => mintDevToken({ sub: "tok5", tid: "t1", projects: ["p1"] }, "not-the-server-secret"),
    });
    const w = watch(c);
    await w.waitFor(() => c.state === "error", "the error state");
    c.setTokenSource(() => userToken({ sub: "tok5", projects: ["p1"] }));
    await w.waitFor(() => c.state === "connected", "connected with the new source");
  });
});
