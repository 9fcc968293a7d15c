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

describe("CursorTracker: a room's position only moves forward", () => {
  it("drops an ephemeral event older than the stored event delivered before it (Redis ids)", () => {
    const c = new CursorTracker();
    expect(c.accept(ev("ch", "ep1:100-0"))).toBe(true);
    expect(c.accept(ev("ch", "ep1:100-0.1", true))).toBe(true);
    expect(c.accept(ev("ch", "ep1:105-2"))).toBe(true);
    // Typing queued before the catch-up, delivered after a newer stored event: older, dropped.
    expect(c.accept(ev("ch", "ep1:100-0.2", true))).toBe(false);
    expect(c.accept(ev("ch", "ep1:105-2.1", true))).toBe(true);
    expect(c.accept(ev("ch", "ep1:105-2.1", true))).toBe(false);
    expect(c.get("ch")).toBe("ep1:105-2");
  });

  it("never moves the cursor back for a stored event older than the last one, even past the dedupe window", () => {
    const c = new CursorTracker(2);
    for (const id of ["ep1:1-0", "ep1:2-0", "ep1:3-0", "ep1:3-1"]) expect(c.accept(ev("a", id))).toBe(true);
    expect(c.accept(ev("a", "ep1:1-0"))).toBe(false); // long out of the id window
    expect(c.accept(ev("a", "ep1:2-9"))).toBe(false);
    expect(c.get("a")).toBe("ep1:3-1");
  });

  it("orders memory-bus ids by their number, not as strings", () => {
    const c = new CursorTracker(1);
    expect(c.accept(ev("a", "mq1-9"))).toBe(true);
    expect(c.accept(ev("a", "mq1-10"))).toBe(true);
    expect(c.accept(ev("a", "mq1-8"))).toBe(false);
    expect(c.accept(ev("a", "mq1-9"))).toBe(false);
    expect(c.get("a")).toBe("mq1-10");
  });

  it("a Subscribed position older than or equal to the cursor does not move it back", () => {
    const c = new CursorTracker();
    c.accept(ev("r", "ep1:50-1"));
    c.accept(ev("m", "mq1-40"));
    c.onSubscribed([
      { room: "r", lastEventId: "ep1:49-7", recovered: false },
      { room: "m", lastEventId: "mq1-40", recovered: false },
    ]);
    expect(c.snapshot()).toEqual({ r: "ep1:50-1", m: "mq1-40" });
    // Nor does it reopen the door to events already passed.
    expect(c.accept(ev("r", "ep1:50-0"))).toBe(false);
    expect(c.accept(ev("r", "ep1:50-1.1", true))).toBe(true);
  });

  it("a newer Subscribed position moves the cursor, and events up to it are not delivered again", () => {
    const c = new CursorTracker();
    c.accept(ev("r", "ep1:50-1"));
    c.onSubscribed([{ room: "r", lastEventId: "ep1:60-0", recovered: false }]);
    expect(c.get("r")).toBe("ep1:60-0");
    expect(c.accept(ev("r", "ep1:55-0.3", true))).toBe(false);
    expect(c.accept(ev("r", "ep1:60-1"))).toBe(true);
  });

  it("a recovered room keeps its cursor and still receives its replay after a newer ephemeral", () => {
    const c = new CursorTracker();
    c.accept(ev("r", "ep1:50-1"));
    c.accept(ev("r", "ep1:50-1.4", true));
    c.onSubscribed([{ room: "r", lastEventId: "ep1:70-0", recovered: true }]);
    expect(c.get("r")).toBe("ep1:50-1");
    expect(c.accept(ev("r", "ep1:60-0"))).toBe(true);
    expect(c.accept(ev("r", "ep1:70-0"))).toBe(true);
    expect(c.get("r")).toBe("ep1:70-0");
  });

  it("another epoch is a new history: its positions are taken even if they look older", () => {
    const c = new CursorTracker();
    c.accept(ev("r", "ep1:90-0"));
    c.accept(ev("m", "mq1-500"));
    c.onSubscribed([
      { room: "r", lastEventId: "ep2:0-0", recovered: false },
      { room: "m", lastEventId: "mq2-3", recovered: false },
    ]);
    expect(c.snapshot()).toEqual({ r: "ep2:0-0", m: "mq2-3" });
    expect(c.accept(ev("r", "ep2:5-0"))).toBe(true);
    expect(c.accept(ev("m", "mq2-4"))).toBe(true);
    expect(c.snapshot()).toEqual({ r: "ep2:5-0", m: "mq2-4" });
  });

  it("ids it cannot read stay opaque: deduplicated by the window, the latest one is the cursor", () => {
    const c = new CursorTracker();
    expect(c.accept(ev("a", "opaque-z"))).toBe(true);
    expect(c.accept(ev("a", "another"))).toBe(true);
    expect(c.accept(ev("a", "another"))).toBe(false);
    expect(c.get("a")).toBe("another");
  });
});
