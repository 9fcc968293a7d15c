import { describe, expect, it } from "vitest";

import { Backoff, DEFAULT_BACKOFF } from "../../src/backoff.js";

describe("Backoff", () => {
  it("doubles from the initial delay up to the 30 s cap", () => {
    const b = new Backoff({}, () => 0); // no jitter drawn
    const delays = Array.from({ length: 10 }, () => b.next());
    expect(delays).toEqual([500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
    expect(DEFAULT_BACKOFF.maxMs).toBe(30_000);
  });

  it("jitter only shortens a delay, by at most the jitter fraction", () => {
    const b = new Backoff({ jitter: 0.5 }, () => 1);
    expect([b.next(), b.next(), b.next()]).toEqual([250, 500, 1000]);
    let seed = 7;
    const random = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
    const r = new Backoff({}, random);
    for (let i = 0; i < 200; i++) {
      const base = Math.min(30_000, 500 * 2 ** i);
      const d = r.next();
      expect(d).toBeGreaterThanOrEqual(base / 2);
      expect(d).toBeLessThanOrEqual(base);
    }
  });

  it("spreads clients that failed together", () => {
    const delays = new Set<number>();
    for (let i = 0; i < 50; i++) {
      const b = new Backoff();
      b.next();
      b.next();
      delays.add(b.next()); // third attempt: 2000 ms base
    }
    expect(delays.size).toBeGreaterThan(10);
    for (const d of delays) expect(d).toBeGreaterThanOrEqual(1000);
  });

  it("reset starts again from the initial delay", () => {
    const b = new Backoff({}, () => 0);
    for (let i = 0; i < 5; i++) b.next();
    expect(b.attempts).toBe(5);
    b.reset();
    expect(b.attempts).toBe(0);
    expect(b.next()).toBe(500);
  });

  it("never overflows after a very long outage", () => {
    const b = new Backoff({}, () => 0);
    let last = 0;
    for (let i = 0; i < 5000; i++) last = b.next();
    expect(last).toBe(30_000);
  });

  it("rejects nonsensical options", () => {
    expect(() => new Backoff({ initialMs: -1 })).toThrow(RangeError);
    expect(() => new Backoff({ initialMs: 1000, maxMs: 10 })).toThrow(RangeError);
    expect(() => new Backoff({ factor: 0.5 })).toThrow(RangeError);
    expect(() => new Backoff({ jitter: 2 })).toThrow(RangeError);
  });
});
