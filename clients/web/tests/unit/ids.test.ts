import { describe, expect, it } from "vitest";

import { compareEventIds, movesForward } from "../../src/ids.js";

describe("compareEventIds", () => {
  it("orders Redis ids by (ms, seq, ephemeral counter), numerically", () => {
    const ordered = ["e1:0-0", "e1:0-0.1", "e1:9-0", "e1:9-0.2", "e1:9-0.10", "e1:9-1", "e1:10-0", "e1:1700000000000-0"];
    for (let i = 0; i < ordered.length; i++) {
      expect(compareEventIds(ordered[i]!, ordered[i]!)).toBe(0);
      for (let j = i + 1; j < ordered.length; j++) {
        expect(compareEventIds(ordered[i]!, ordered[j]!), `${ordered[i]} < ${ordered[j]}`).toBeLessThan(0);
        expect(compareEventIds(ordered[j]!, ordered[i]!), `${ordered[j]} > ${ordered[i]}`).toBeGreaterThan(0);
      }
    }
  });

  it("orders memory-bus ids by their number", () => {
    expect(compareEventIds("mq1-9", "mq1-10")).toBeLessThan(0);
    expect(compareEventIds("mq1-10", "mq1-10")).toBe(0);
    expect(compareEventIds("mq1-18446744073709551615", "mq1-18446744073709551614")).toBeGreaterThan(0);
  });

  it("does not compare across epochs, buses or unknown formats", () => {
    for (const [a, b] of [
      ["e1:5-0", "e2:1-0"],
      ["mq1-5", "mq2-1"],
      ["e1:5-0", "e1-5"],
      ["e1:5-0", "E1:5-0"],
      ["e1:5", "e1:4-0"],
      ["e1:5-0.", "e1:4-0"],
      ["e1:5-0.x", "e1:4-0"],
      ["nodash", "nodash"],
      ["", "e1:1-0"],
    ] as const) {
      expect(compareEventIds(a, b), `${a} vs ${b}`).toBeUndefined();
    }
  });
});

describe("movesForward", () => {
  it("from nothing, to newer, to another epoch or an unreadable id; never back or in place", () => {
    expect(movesForward(undefined, "e1:1-0")).toBe(true);
    expect(movesForward("e1:1-0", "e1:1-1")).toBe(true);
    expect(movesForward("e1:1-1", "e1:1-0")).toBe(false);
    expect(movesForward("e1:1-1", "e1:1-1")).toBe(false);
    expect(movesForward("e1:1-1", "e2:0-0")).toBe(true);
    expect(movesForward("e1:1-1", "opaque")).toBe(true);
    expect(movesForward("e1:1-1", "")).toBe(false);
  });
});
