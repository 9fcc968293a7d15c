import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";

import { JoinError, RESUME_METADATA_KEY, classify, resumeSince } from "../../src/errors.js";

describe("classify", () => {
  it("maps lamplight's codes to what the client does", () => {
    expect(classify(new ConnectError("token expired", Code.Unauthenticated))).toBe("auth");
    expect(classify(new ConnectError("not allowed in room x: y", Code.PermissionDenied))).toBe("denied");
    expect(classify(new ConnectError("invalid room", Code.InvalidArgument))).toBe("invalid");
    expect(classify(new ConnectError("no such method", Code.Unimplemented))).toBe("fatal");
    for (const code of [Code.Unavailable, Code.ResourceExhausted, Code.Internal, Code.Unknown, Code.DeadlineExceeded, Code.Canceled]) {
      expect(classify(new ConnectError("x", code))).toBe("retry");
    }
    expect(classify(new TypeError("Failed to fetch"))).toBe("retry");
  });
});

describe("resumeSince", () => {
  it("reads the trailer", () => {
    const err = new ConnectError("server shutting down", Code.Unavailable, {
      [RESUME_METADATA_KEY]: '{"tenant:t1":"e-7","user:u1":"e-2"}',
    });
    expect(resumeSince(err)).toEqual({ "tenant:t1": "e-7", "user:u1": "e-2" });
  });

  it("falls back to the message", () => {
    const err = new ConnectError('token expired; resume with since={"tenant:t1":"e-9"}', Code.Unauthenticated);
    expect(resumeSince(err)).toEqual({ "tenant:t1": "e-9" });
  });

  it("is empty when absent or garbled", () => {
    expect(resumeSince(new ConnectError("nope", Code.Unavailable))).toEqual({});
    expect(resumeSince(new ConnectError("resume with since={oops", Code.Unavailable))).toEqual({});
  });
});

describe("JoinError", () => {
  it("names the room and keeps the status", () => {
    const status = new ConnectError("not allowed in room tenant:t1:channel:c3: nope", Code.PermissionDenied);
    const e = new JoinError("tenant:t1:channel:c3", status);
    expect(e.room).toBe("tenant:t1:channel:c3");
    expect(e.code).toBe(Code.PermissionDenied);
    expect(e.message).toContain("cannot join tenant:t1:channel:c3");
    expect(e).toBeInstanceOf(Error);
  });
});
