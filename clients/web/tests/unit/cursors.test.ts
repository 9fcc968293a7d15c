import { describe, expect, it } from "vitest";

import { CursorTracker } from "../../src/cursors.js";

const ev = (room: string, id: string, ephemeral = false) => ({ room, id, ephemeral });

describe("CursorTracker", () => {
  it("advances the cursor of each room with its durable events", () => {
    const c = new CursorTracker();
    expect(c.accept(ev("a", "x-1"))).toBe(true);
    expect(c.accept(ev("b", "x-2"))).toBe(true);
    expect(c.accept(ev("a", "x-3"))).toBe(true);
    expect(c.snapshot()).toEqual({ a: "x-3", b: "x-2" });
    expect(c.since(["a", "b", "c"])).toEqual({ a: "x-3", b: "x-2" });
    expect(c.since(["b"])).toEqual({ b: "x-2" });
  });

  it("drops an event delivered twice (stream switch overlap)", () => {
    const c = new CursorTracker();
    expect(c.accept(ev("a", "x-1"))).toBe(true);
    expect(c.accept(ev("a", "x-2"))).toBe(true);
    expect(c.accept(ev("a", "x-1"))).toBe(false);
    expect(c.accept(ev("a", "x-2"))).toBe(false);
    // The same id in another room is another event.
    expect(c.accept(ev("b", "x-1"))).toBe(true);
    expect(c.get("a")).toBe("x-2");
  });

  it("ephemeral events are deduplicated but never become the cursor", () => {
    const c = new CursorTracker();
    c.accept(ev("ch", "x-5"));
    expect(c.accept(ev("ch", "x-6", true))).toBe(true);
    expect(c.accept(ev("ch", "x-6", true))).toBe(false);
    expect(c.get("ch")).toBe("x-5");
  });

  it("takes the server's position for fresh and reset rooms, keeps its own for recovered ones", () => {
    const c = new CursorTracker();
    c.accept(ev("recovered", "x-3"));
    c.accept(ev("reset", "old-9"));
    c.onSubscribed([
      { room: "fresh", lastEventId: "x-10", recovered: false },
      { room: "recovered", lastEventId: "x-12", recovered: true },
      { room: "reset", lastEventId: "new-1", recovered: false },
      { room: "empty", lastEventId: "", recovered: false },
    ]);
    // `recovered` keeps x-3: the replay of x-4..x-12 follows and must not be skipped by a later re-open.
    expect(c.snapshot()).toEqual({ fresh: "x-10", recovered: "x-3", reset: "new-1" });
  });

  it("forgets a left room entirely", () => {
    const c = new CursorTracker();
    c.accept(ev("a", "x-1"));
    c.forget("a");
    expect(c.get("a")).toBeUndefined();
    expect(c.accept(ev("a", "x-1"))).toBe(true);
  });

  it("adopts server-reported positions only where it has none", () => {
    const c = new CursorTracker();
    c.accept(ev("a", "x-4"));
    c.adoptMissing({ a: "x-2", b: "x-7", c: "" });
    expect(c.snapshot()).toEqual({ a: "x-4", b: "x-7" });
  });

  it("remembers a bounded window of ids per room", () => {
    const c = new CursorTracker(3);
    for (const id of ["1", "2", "3", "4"]) c.accept(ev("a", id));
    expect(c.accept(ev("a", "4"))).toBe(false);
    expect(c.accept(ev("a", "2"))).toBe(false);
    expect(c.accept(ev("a", "1"))).toBe(true); // evicted from the window
  });

  it("passes through events without an id", () => {
    const c = new CursorTracker();
    expect(c.accept(ev("a", ""))).toBe(true);
    expect(c.accept(ev("a", ""))).toBe(true);
    expect(c.get("a")).toBeUndefined();
  });
});
