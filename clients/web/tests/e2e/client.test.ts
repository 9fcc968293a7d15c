/**
 * The client against a real lamplight (the `cargo build` binary), over grpc-web on Node's fetch: the same
 * transport code a browser runs. Join/leave, refusals, token expiry, the watchdog, reconnection and
 * typing, each observed through the client's public API.
 */

import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import { createLamplight, JoinError, type ConnectionState, type Event, type Lamplight, type LamplightOptions, type RetryNotice } from "../../src/index.js";
import { mintDevToken } from "../../demo/server/token.js";
import { Publisher, startLamplight, until, userToken, type LamplightServer } from "../support/lamplight.js";
import { startProxy } from "../support/proxy.js";

const P1 = "tenant:t1:project:p1";
const P2 = "tenant:t1:project:p2";
const C1 = "tenant:t1:channel:c1";
const C_TYPING = "tenant:t1:channel:typing";
const WAIT = 10_000;

const clients: Lamplight[] = [];
function client(url: string, options: Partial<LamplightOptions> & Pick<LamplightOptions, "getToken">): Lamplight {
  const c = createLamplight({
    baseUrl: url,
    heartbeatIntervalMs: 1000,
    backoff: { initialMs: 50, maxMs: 400 },
    ...options,
  });
  clients.push(c);
  return c;
}

/** Everything a client emits, in order. */
function record(c: Lamplight) {
  const events: Event[] = [];
  const states: ConnectionState[] = [];
  const retries: RetryNotice[] = [];
  const resets: { room: string; reason: string }[] = [];
  c.on("event", (e) => events.push(e));
  c.on("state", (s) => states.push(s.state));
  c.on("retry", (r) => retries.push(r));
  c.on("reset", (r) => resets.push(r));
  const idsIn = (room: string) => events.filter((e) => e.room === room).map((e) => e.id);
  const waitFor = (check: () => boolean, what: string, ms = WAIT) =>
    until(check, ms, what, (notify) => {
      const offs = (["event", "state", "retry", "reset", "subscribed", "typing"] as const).map((n) => c.on(n, notify));
      return () => offs.forEach((off) => off());
    });
  return { events, states, retries, resets, idsIn, waitFor };
}

/** Polls `check` (for server state that has no notification) every 100 ms, for at most 5 s. */
async function eventually(check: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const task = (n: number | string) => ({ id: `task-${n}`, title: `Task ${n}`, status: "todo", projectId: "p1", tenantId: "t1" });

afterEach(() => {
  while (clients.length) clients.pop()!.close();
});

describe("with one server", () => {
  let server: LamplightServer;
  let pub: Publisher;

  beforeAll(async () => {
    server = await startLamplight({ heartbeatSecs: 1 });
    pub = new Publisher(server.url);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it("carries every joined room on one stream and re-opens it on join/leave without losing or repeating events", async () => {
    const c = client(server.url, { getToken: () => userToken({ sub: "u1", projects: ["p1", "p2"], channels: ["c1"] }) });
    const r = record(c);
    await c.join(P1);
    expect(c.state).toBe("connected");
    expect(c.rooms().sort()).toEqual([P1, "tenant:t1", "user:u1"].sort());

    // Publish a steady flow to P1 while the stream is re-opened again and again for joins and leaves.
    const published: string[] = [];
    let done = false;
    const publishing = (async () => {
      for (let i = 0; i < 80; i++) published.push(await pub.task(P1, "task.created", task(i)));
      done = true;
    })();
    let switches = 0;
    while (!done) {
      await c.join(P2);
      await c.join(C1);
      c.leave(P2);
      c.leave(C1);
      switches += 1;
    }
    await publishing;
    await r.waitFor(() => r.idsIn(P1).length >= published.length, "every P1 event");
    expect(switches).toBeGreaterThan(0);
    expect(r.idsIn(P1)).toEqual(published); // all of them, once each, in order
    expect(c.stats().streamsOpened).toBeGreaterThan(switches);
    expect(c.state).toBe("connected");
  });

  it("stops carrying a left room while the others keep flowing", async () => {
    const c = client(server.url, { getToken: () => userToken({ sub: "u2", projects: ["p1", "p2"] }) });
    const r = record(c);
    await Promise.all([c.join(P1), c.join(P2)]);
    const before = await c.getPresence(P2);
    expect(before.userIds).toContain("u2");

    c.leave(P2);
    await r.waitFor(() => false === c.rooms().includes(P2), "P2 left");
    // The stream is re-opened without P2: once confirmed, the server no longer counts us there.
    await new Promise<void>((resolve) => {
      const off = c.on("subscribed", (rooms) => {
        if (!rooms.some((p) => p.room === P2)) {
          off();
          resolve();
        }
      });
    });
    // The server drops the old stream's presence when it notices the closed connection (at its next write
    // at the latest: heartbeats come every second). Presence has no change feed per room, so ask again.
    await eventually(async () => !(await c.getPresence(P2)).userIds.includes("u2"), "u2 to leave P2's presence");

    await pub.task(P2, "task.created", task("left-room"));
    const id = await pub.task(P1, "task.created", task("kept-room"));
    await r.waitFor(() => r.idsIn(P1).includes(id), "the P1 event");
    expect(r.idsIn(P2)).toEqual([]);
  });

  it("reports a refused join to the caller and keeps the other rooms", async () => {
    const c = client(server.url, { getToken: () => userToken({ sub: "u3", projects: ["p1"], channels: ["c1"] }) });
    const r = record(c);
    const joinErrors: JoinError[] = [];
    c.on("joinError", (e) => joinErrors.push(e));
    await c.join(P1);

    const [ok, denied] = await Promise.allSettled([c.join(C1), c.join("tenant:t1:channel:secret")]);
    expect(ok.status).toBe("fulfilled");
    expect(denied.status).toBe("rejected");
    const err = (denied as PromiseRejectedResult).reason as JoinError;
    expect(err).toBeInstanceOf(JoinError);
    expect(err.room).toBe("tenant:t1:channel:secret");
    expect(err.code).toBe(Code.PermissionDenied);
    expect(err.message).toContain("not allowed in room tenant:t1:channel:secret");
    expect(joinErrors.map((e) => e.room)).toEqual(["tenant:t1:channel:secret"]);

    // A malformed name is refused the same way (INVALID_ARGUMENT), naming the room.
    await expect(c.join("no-such-room")).rejects.toMatchObject({ room: "no-such-room", code: Code.InvalidArgument });

    expect(c.state).toBe("connected");
    expect(c.rooms()).not.toContain("tenant:t1:channel:secret");
    expect(c.rooms()).toContain(C1);
    const id = await pub.task(P1, "task.created", task("after-denial"));
    await r.waitFor(() => r.idsIn(P1).includes(id), "an event after the refusal");
    expect(r.states).not.toContain("error");
  });

  it("ends in the error state, not a loop, when fresh tokens keep being refused", async () => {
    const calls: boolean[] = [];
    const c = client(server.url, {
      autoJoinUserRooms: false,
      rooms: [P1],
      backoff: { initialMs: 20, maxMs: 100 },
      getToken: ({ forceRefresh }) => {
        calls.push(forceRefresh);
        return mintDevToken({ sub: "u4", tid: "t1", projects: ["p1"] }, "not-the-server-secret");
      },
    });
    const r = record(c);
    await r.waitFor(() => c.state === "error", "the error state");
    expect(calls).toEqual([false, true, true, true]); // the first try plus maxAuthFailures (3) fresh tokens
    expect(c.error).toBeInstanceOf(ConnectError);
    expect((c.error as ConnectError).code).toBe(Code.Unauthenticated);
    expect(c.nextRetryAt).toBeUndefined(); // nothing scheduled: it waits for reconnect()
    expect(r.states).toEqual(["connecting", "reconnecting", "error"]);
  });

  it("resumes a room from the `since` it was created with (another client's cursors)", async () => {
    const first = await pub.task(P1, "task.created", task("since-1"));
    const missed = await pub.task(P1, "task.created", task("since-2"));
    const c = client(server.url, { autoJoinUserRooms: false, since: { [P1]: first }, getToken: () => userToken({ sub: "u8", projects: ["p1"] }) });
    const r = record(c);
    const confirmed: { room: string; recovered: boolean }[] = [];
    c.on("subscribed", (rooms) => confirmed.push(...rooms.map(({ room, recovered }) => ({ room, recovered }))));
    await c.join(P1);
    await r.waitFor(() => r.idsIn(P1).includes(missed), "the event after `since`, replayed");
    expect(r.idsIn(P1)).toEqual([missed]);
    expect(confirmed).toEqual([{ room: P1, recovered: true }]);
  });

  it("shows who is typing to the others, never to the typist", async () => {
    const ada = client(server.url, { getToken: () => userToken({ sub: "ada", channels: ["typing"] }) });
    const bob = client(server.url, { getToken: () => userToken({ sub: "bob", channels: ["typing"] }) });
    const rb = record(bob);
    const seenByAda: string[][] = [];
    ada.on("typing", (t) => seenByAda.push(t.userIds));
    await Promise.all([ada.join(C_TYPING), bob.join(C_TYPING)]);

    ada.setTyping(C_TYPING, true);
    await rb.waitFor(() => bob.typingUsers(C_TYPING).includes("ada"), "bob to see ada typing");
    ada.setTyping(C_TYPING, false);
    await rb.waitFor(() => bob.typingUsers(C_TYPING).length === 0, "ada to stop typing");
    expect(seenByAda).toEqual([]);
    const presence = await ada.getPresence(C_TYPING);
    expect(presence.userIds).toEqual(["ada", "bob"]);
  });
});

describe("resumption", () => {
  it("gets a fresh token when the stream ends with an expired one, and resumes without loss", async () => {
    const server = await startLamplight({ heartbeatSecs: 1, extraArgs: ["--jwt-leeway-secs", "0"] });
    try {
      const pub = new Publisher(server.url);
      const published: string[] = [];
      const refreshes: boolean[] = [];
      const c = client(server.url, {
        autoJoinUserRooms: false,
        getToken: async ({ forceRefresh }) => {
          refreshes.push(forceRefresh);
          // After an expiry, publish before handing out the new token: that event happens while no
          // stream is open, so only the resume (`since`) can deliver it.
          if (forceRefresh) published.push(await pub.task(P1, "task.updated", task(`gap-${refreshes.length}`)));
          return userToken({ sub: "u5", projects: ["p1"], ttlSecs: 2 });
        },
      });
      const r = record(c);
      await c.join(P1);
      published.push(await pub.task(P1, "task.created", task("before-expiry")));
      const expiries = () => r.retries.filter((x) => x.error.code === Code.Unauthenticated).length;
      await r.waitFor(() => expiries() >= 2 && c.state === "connected", "two expiries and a new stream", 15_000);
      published.push(await pub.task(P1, "task.updated", task("after-expiry")));
      await r.waitFor(() => r.idsIn(P1).length >= published.length, "every event");
      expect(r.idsIn(P1)).toEqual(published);
      expect(refreshes.filter(Boolean).length).toBeGreaterThanOrEqual(2);
      expect(r.retries.find((x) => x.error.code === Code.Unauthenticated)?.error.rawMessage).toContain("token expired");
      expect(r.states).not.toContain("error");
    } finally {
      await server.stop();
    }
  });

  it("a watchdog replaces a stream that went silent, and the missed events are replayed", async () => {
    const server = await startLamplight({ heartbeatSecs: 1 });
    const proxy = await startProxy(server.port);
    try {
      const pub = new Publisher(server.url);
      const c = client(proxy.url, { autoJoinUserRooms: false, getToken: () => userToken({ sub: "u6", projects: ["p1"] }) });
      const r = record(c);
      await c.join(P1);
      const published = [await pub.task(P1, "task.created", task("w1"))];
      await r.waitFor(() => r.idsIn(P1).length === 1, "the first event");

      proxy.freezeOpenConnections(); // no bytes, no close: only silence
      published.push(await pub.task(P1, "task.created", task("w2")));
      published.push(await pub.task(P1, "task.created", task("w3")));
      await r.waitFor(() => r.states.includes("reconnecting"), "the watchdog to fire", 8000);
      await r.waitFor(() => c.state === "connected", "a new stream");
      published.push(await pub.task(P1, "task.created", task("w4")));
      await r.waitFor(() => r.idsIn(P1).length >= 4, "all four events");
      expect(r.idsIn(P1)).toEqual(published);
      expect(c.stats().watchdogTimeouts).toBeGreaterThanOrEqual(1);
      expect(r.retries[0]?.error.code).toBe(Code.DeadlineExceeded);
      expect(proxy.connections()).toBeGreaterThanOrEqual(2);
    } finally {
      await proxy.close();
      await server.stop();
    }
  });

  it("backs off while the server is down, reconnects when it is back, surfaces Reset for lost history, and resets the backoff after a healthy period", async () => {
    const first = await startLamplight({ heartbeatSecs: 1 });
    let second: LamplightServer | undefined;
    try {
      const pub = new Publisher(first.url);
      const c = client(first.url, {
        autoJoinUserRooms: false,
        backoff: { initialMs: 100, maxMs: 400, jitter: 0.5, healthyAfterMs: 300 },
        getToken: () => userToken({ sub: "u7", projects: ["p1"] }),
      });
      const r = record(c);
      await c.join(P1);
      const id = await pub.task(P1, "task.created", task("r1"));
      await r.waitFor(() => r.idsIn(P1).includes(id), "the first event");

      await first.stop(); // graceful: the stream ends UNAVAILABLE, naming where to resume
      await r.waitFor(() => r.retries.length >= 4, "several retries against the stopped server");
      expect(r.retries[0]!.error.code).toBe(Code.Unavailable);
      expect(r.retries[0]!.error.rawMessage).toContain("resume with since=");
      // Delays grow (each within [base/2, base]) up to the cap.
      r.retries.slice(0, 4).forEach((retry, i) => {
        const base = Math.min(400, 100 * 2 ** i);
        expect(retry.delayMs).toBeGreaterThanOrEqual(base / 2);
        expect(retry.delayMs).toBeLessThanOrEqual(base);
      });
      expect(c.state).toBe("reconnecting");

      // Same port, new process: the in-memory history is gone, so the room must be refetched.
      second = await startLamplight({ heartbeatSecs: 1, port: first.port });
      await r.waitFor(() => c.state === "connected", "reconnected");
      await r.waitFor(() => r.resets.length > 0, "a Reset");
      expect(r.resets[0]!.room).toBe(P1);
      expect(r.resets[0]!.reason).toMatch(/earlier run/);
      const id2 = await new Publisher(second.url).task(P1, "task.created", task("r2"));
      await r.waitFor(() => r.idsIn(P1).includes(id2), "events on the new server");
      expect(r.states.filter((s) => s === "connected").length).toBe(2);

      // Stay up past healthyAfterMs (the duration itself is what is tested), then fail again: the
      // backoff starts over from the initial delay instead of continuing at the cap.
      await new Promise((resolve) => setTimeout(resolve, 600));
      const before = r.retries.length;
      await second.stop();
      await r.waitFor(() => r.retries.length > before, "a retry after the second stop");
      expect(r.retries[before]!.delayMs).toBeLessThanOrEqual(100);
    } finally {
      await first.stop();
      await second?.stop();
    }
  });
});
