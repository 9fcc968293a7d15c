import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";

import {
  EventSchema,
  PresenceDiffSchema,
  UserStatus_Status,
  UserStatusSchema,
} from "../../src/gen/lamplight/v1/events_pb.js";
import { applyStatusChanges, statusChanges } from "../../src/statuses.js";

const diff = (online: string, offline: string) =>
  create(EventSchema, {
    room: "tenant:t1",
    type: "user.status",
    payload: { case: "presenceDiff", value: create(PresenceDiffSchema, { online, offline }) },
  });

describe("status diffs", () => {
  it("reads every change of a diff, and the one of a UserStatus", () => {
    expect(statusChanges(diff("u1\nu3", "u2"))).toEqual([
      { userId: "u1", online: true },
      { userId: "u3", online: true },
      { userId: "u2", online: false },
    ]);
    expect(statusChanges(diff("", "u4"))).toEqual([{ userId: "u4", online: false }]);
    expect(statusChanges(diff("", ""))).toEqual([]);
    const single = create(EventSchema, {
      payload: { case: "userStatus", value: create(UserStatusSchema, { userId: "u9", status: UserStatus_Status.ONLINE }) },
    });
    expect(statusChanges(single)).toEqual([{ userId: "u9", online: true }]);
    expect(statusChanges(create(EventSchema, {}))).toEqual([]);
  });

  it("applies changes to a sorted online set", () => {
    const ids = ["a", "c"];
    const next = applyStatusChanges(ids, [
      { userId: "b", online: true },
      { userId: "c", online: false },
      { userId: "x", online: false },
    ]);
    expect(next).toEqual(["a", "b"]);
    expect(applyStatusChanges(next, [{ userId: "a", online: true }])).toBe(next);
  });
});
