/**
 * DEVELOPMENT ONLY: mints HS256 tokens with lamplight's built-in development secret (or
 * LAMPLIGHT_JWT_SECRET), for the demo and the tests. A real app's backend issues tokens from its own auth;
 * a browser must never hold the secret, which is why this runs in the Vite server, not the page.
 */

import { createHmac } from "node:crypto";

/** lamplight's built-in development secret, used when no key is configured (see `lamplight --help`). */
export const DEV_SECRET = "lamplight-dev-secret";

/** Claims lamplight reads. */
export interface DevClaims {
  sub: string;
  tid?: string;
  projects?: string[];
  channels?: string[];
  roles?: string[];
  emailVerified?: boolean;
  /** Lifetime in seconds (default one hour). */
  ttlSecs?: number;
  /** `iat`, Unix seconds (default now), e.g. a token issued before a revocation in the tests. */
  issuedAt?: number;
}

const b64url = (data: string | Buffer) => Buffer.from(data).toString("base64url");

/** The secret lamplight uses when started with the same environment. */
export function devSecret(): string {
  return process.env.LAMPLIGHT_JWT_SECRET || DEV_SECRET;
}

/** An HS256 JWT for `claims`. */
export function mintDevToken(claims: DevClaims, secret: string = devSecret()): string {
  const now = claims.issuedAt ?? Math.floor(Date.now() / 1000);
  const payload = {
    sub: claims.sub,
    ...(claims.tid ? { tid: claims.tid } : {}),
    email_verified: claims.emailVerified ?? true,
    projects: claims.projects ?? [],
    channels: claims.channels ?? [],
    roles: claims.roles ?? [],
    iat: now,
    exp: now + (claims.ttlSecs ?? 3600),
  };
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(payload));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}
