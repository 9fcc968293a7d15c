import { describe, expect, it } from "vitest";

import { RoomSet, channelRoom, parseRoom, projectRoom, roomNamedIn, sameRooms, tenantRoom, userRoom } from "../../src/rooms.js";

describe("RoomSet (join/leave bookkeeping)", () => {
  it("counts references: a room stays until its last holder leaves", () => {
    const s = new RoomSet();
    expect(s.add("tenant:t1:project:p1")).toBe(true);
    expect(s.add("tenant:t1:project:p1")).toBe(false);
    expect(s.count("tenant:t1:project:p1")).toBe(2);
    expect(s.remove("tenant:t1:project:p1")).toBe(false);
    expect(s.has("tenant:t1:project:p1")).toBe(true);
    expect(s.remove("tenant:t1:project:p1")).toBe(true);
    expect(s.has("tenant:t1:project:p1")).toBe(false);
    expect(s.remove("tenant:t1:project:p1")).toBe(false);
  });

  it("keeps first-join order and drops refused rooms whatever their count", () => {
    const s = new RoomSet();
    s.add("b");
    s.add("a");
    s.add("c");
    s.add("c");
    expect(s.list()).toEqual(["b", "a", "c"]);
    expect(s.drop("c")).toBe(true);
    expect(s.list()).toEqual(["b", "a"]);
    expect(s.size).toBe(2);
  });

  it("join then leave in the same tick leaves the set as it was", () => {
    const s = new RoomSet();
    s.add("x");
    const before = s.list();
    s.add("y");
    s.remove("y");
    expect(sameRooms(before, s.list())).toBe(true);
  });
});

describe("room names", () => {
  it("builds the four shapes", () => {
    expect(userRoom("u1")).toBe("user:u1");
    expect(userRoom("u1", "t1")).toBe("tenant:t1:user:u1");
    expect(tenantRoom("t1")).toBe("tenant:t1");
    expect(projectRoom("t1", "p1")).toBe("tenant:t1:project:p1");
    expect(channelRoom("t1", "c1")).toBe("tenant:t1:channel:c1");
  });

  it("parses them back and rejects others", () => {
    expect(parseRoom("user:u1")).toEqual({ kind: "user", userId: "u1" });
    expect(parseRoom("tenant:t1:user:u1")).toEqual({ kind: "user", tenantId: "t1", userId: "u1" });
    expect(parseRoom("tenant:t1")).toEqual({ kind: "tenant", tenantId: "t1" });
    expect(parseRoom("tenant:t1:project:p1")).toEqual({ kind: "project", tenantId: "t1", projectId: "p1" });
    expect(parseRoom("tenant:t1:channel:c-2")).toEqual({ kind: "channel", tenantId: "t1", channelId: "c-2" });
    for (const bad of ["", "user:", "tenant:t1:team:x", "room:1", "tenant:t 1"]) expect(parseRoom(bad)).toBeUndefined();
  });

  it("compares room lists ignoring order", () => {
    expect(sameRooms(["a", "b"], ["b", "a"])).toBe(true);
    expect(sameRooms(["a", "b"], ["a"])).toBe(false);
    expect(sameRooms(["a", "b"], ["a", "c"])).toBe(false);
  });
});

describe("roomNamedIn (which room a refusal is about)", () => {
  const rooms = ["user:u1", "tenant:t1", "tenant:t1:channel:c3", "tenant:t1:project:p1"];

  it("finds the room in lamplight's PERMISSION_DENIED message, preferring the longest name", () => {
    expect(roomNamedIn("not allowed in room tenant:t1:channel:c3: channel not in the token's channels", rooms)).toBe(
      "tenant:t1:channel:c3",
    );
    expect(roomNamedIn("not allowed in room tenant:t1: the room belongs to another tenant", rooms)).toBe("tenant:t1");
  });

  it("finds quoted rooms (INVALID_ARGUMENT) and cursor refusals", () => {
    expect(roomNamedIn('invalid room "tenant:t1:project:p1": expected user:{id}, ...', rooms)).toBe("tenant:t1:project:p1");
    expect(roomNamedIn('invalid since for room user:u1: "zz" is not an event id (bad epoch)', rooms)).toBe("user:u1");
  });

  it("names nothing when the refusal is about the token", () => {
    expect(roomNamedIn("email not verified: users need email_verified=true in their token", rooms)).toBeUndefined();
  });
});
