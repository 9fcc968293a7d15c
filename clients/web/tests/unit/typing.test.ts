import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { TypingSender, TypingTracker, type TypingOptions } from "../../src/typing.js";

const opts: TypingOptions = { minIntervalMs: 1000, refreshMs: 3000, idleMs: 5000, displayTtlMs: 6000 };
const ROOM = "tenant:t1:channel:c1";

describe("TypingSender", () => {
  let sent: [string, boolean, number][];
  let fail = false;
  let sender: TypingSender;

  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(0);
    sent = [];
    fail = false;
    sender = new TypingSender(
      async (room, isTyping) => {
        sent.push([room, isTyping, Date.now()]);
        if (fail) throw new Error("RESOURCE_EXHAUSTED");
      },
      opts,
      () => Date.now(),
    );
  });
  afterEach(() => {
    sender.dispose();
    vi.useRealTimers();
  });

  it("sends the first keystroke at once and throttles the rest", async () => {
    sender.connected();
    for (let i = 0; i < 20; i++) {
      sender.set(ROOM, true);
      await vi.advanceTimersByTimeAsync(100); // a keystroke every 100 ms for 2 s
    }
    // One `true`, no refresh before refreshMs.
    expect(sent).toEqual([[ROOM, true, 0]]);
  });

  it("re-sends true while typing continues, then stops by itself after the idle time", async () => {
    sender.connected();
    for (let t = 0; t < 7000; t += 500) {
      sender.set(ROOM, true);
      await vi.advanceTimersByTimeAsync(500);
    }
    await vi.advanceTimersByTimeAsync(10_000);
    expect(sent.map(([, v, at]) => [v, at])).toEqual([
      [true, 0],
      [true, 3000],
      [true, 6000],
      [true, 9000], // keystrokes until 6500 count as typing until the idle time runs out
      [false, 11500], // last keystroke at 6500 + idle 5000
    ]);
  });

  it("an explicit stop soon after starting waits only for the minimum interval", async () => {
    sender.connected();
    sender.set(ROOM, true);
    await vi.advanceTimersByTimeAsync(200);
    sender.set(ROOM, false);
    await vi.advanceTimersByTimeAsync(5000);
    expect(sent.map(([, v, at]) => [v, at])).toEqual([
      [true, 0],
      [false, 1000],
    ]);
  });

  it("a stop before anything was sent sends nothing", async () => {
    sender.connected();
    sender.set(ROOM, false);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(sent).toEqual([]);
  });

  it("while disconnected keeps only the latest state and sends it on reconnect", async () => {
    sender.set(ROOM, true);
    sender.set(ROOM, false);
    sender.set(ROOM, true);
    await vi.advanceTimersByTimeAsync(1000);
    expect(sent).toEqual([]);
    sender.connected();
    await vi.advanceTimersByTimeAsync(0);
    expect(sent.map(([, v]) => v)).toEqual([true]);
  });

  it("does not replay a stale `true` after a long outage", async () => {
    sender.set(ROOM, true); // typed while offline
    await vi.advanceTimersByTimeAsync(60_000); // ... a minute ago
    sender.connected();
    await vi.advanceTimersByTimeAsync(10_000);
    expect(sent).toEqual([]);
  });

  it("announces a stop that happened during the outage", async () => {
    sender.connected();
    sender.set(ROOM, true);
    await vi.advanceTimersByTimeAsync(100);
    sender.disconnected();
    sender.set(ROOM, false);
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent.map(([, v]) => v)).toEqual([true]);
    sender.connected();
    await vi.advanceTimersByTimeAsync(0);
    expect(sent.map(([, v]) => v)).toEqual([true, false]);
  });

  it("retries after a failed send while still typing", async () => {
    sender.connected();
    fail = true;
    sender.set(ROOM, true);
    await vi.advanceTimersByTimeAsync(10);
    fail = false;
    sender.set(ROOM, true);
    await vi.advanceTimersByTimeAsync(1000);
    expect(sent.map(([, v, at]) => [v, at])).toEqual([
      [true, 0],
      [true, 1000],
    ]);
  });

  it("rooms are throttled independently", async () => {
    sender.connected();
    sender.set("tenant:t1:channel:a", true);
    sender.set("tenant:t1:channel:b", true);
    await vi.advanceTimersByTimeAsync(0);
    expect(sent.map(([r]) => r)).toEqual(["tenant:t1:channel:a", "tenant:t1:channel:b"]);
  });
});

describe("TypingTracker", () => {
  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(0);
  });
  afterEach(() => vi.useRealTimers());

  it("lists typers, drops them on stop, on a message, and when they fall silent", async () => {
    const changes: string[][] = [];
    const t = new TypingTracker((_room, users) => changes.push(users), 6000, () => Date.now());
    t.update(ROOM, "bob", true);
    t.update(ROOM, "amy", true);
    expect(t.typing(ROOM)).toEqual(["amy", "bob"]);
    t.update(ROOM, "amy", true); // refresh: no change
    t.update(ROOM, "bob", false);
    expect(t.typing(ROOM)).toEqual(["amy"]);
    t.stopped(ROOM, "amy");
    expect(t.typing(ROOM)).toEqual([]);
    t.update(ROOM, "cat", true);
    await vi.advanceTimersByTimeAsync(3000);
    t.update(ROOM, "cat", true); // refreshed at 3000: expires at 9000
    await vi.advanceTimersByTimeAsync(5000);
    expect(t.typing(ROOM)).toEqual(["cat"]);
    await vi.advanceTimersByTimeAsync(1000);
    expect(t.typing(ROOM)).toEqual([]);
    expect(changes).toEqual([["bob"], ["amy", "bob"], ["amy"], [], ["cat"], []]);
    t.dispose();
  });
});
