import { describe, expect, it } from "vitest";

import { readIdentity } from "../../src/token.js";

const b64url = (s: string) => Buffer.from(s).toString("base64url");
const jwt = (claims: object) => `${b64url('{"alg":"HS256","typ":"JWT"}')}.${b64url(JSON.stringify(claims))}.sig`;

describe("readIdentity", () => {
  it("reads sub, tid and exp", () => {
    expect(readIdentity(jwt({ sub: "u1", tid: "t1", exp: 100 }))).toEqual({ userId: "u1", tenantId: "t1", expiresAt: 100_000 });
  });

  it("handles non-ASCII claims and tokens without a tenant", () => {
    expect(readIdentity(jwt({ sub: "zoë" }))).toEqual({ userId: "zoë", tenantId: undefined, expiresAt: undefined });
  });

  it("returns undefined for anything else", () => {
    for (const bad of ["", "a.b", "a.b.c", jwt({ tid: "t1" }), jwt({ sub: "" })]) expect(readIdentity(bad)).toBeUndefined();
  });
});
