import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";

import {
  EventSchema,
  PresenceDiffSchema,
  UserStatus_Status,
  UserStatusSchema,
} from "../../src/gen/lamplight/v1/events_pb.js";
import { applyStatusChanges, statusChanges } from "../../src/statuses.js";

const diff = (changes: [string, UserStatus_Status][]) =>
  create(EventSchema, {
    room: "tenant:t1",
    type: "user.status",
    payload: {
      case: "presenceDiff",
      value: create(PresenceDiffSchema, {
        changes: changes.map(([userId, status]) => create(UserStatusSchema, { userId, status })),
      }),
    },
  });

describe("status diffs", () => {
  it("reads every change of a diff, and the one of a UserStatus", () => {
    expect(
      statusChanges(
        diff([
          ["u1", UserStatus_Status.ONLINE],
          ["u2", UserStatus_Status.OFFLINE],
          ["u3", UserStatus_Status.STATUS_UNSPECIFIED],
        ]),
      ),
    ).toEqual([
      { userId: "u1", online: true },
      { userId: "u2", online: false },
    ]);
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
