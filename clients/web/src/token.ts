/**
 * Reading (not verifying) the claims of the app's JWT: the client needs `sub` and `tid` to name the
 * user's own rooms. The server verifies the token; nothing here is trusted for security.
 */

/** The claims the client uses. */
export interface Identity {
  /** `sub`: the user id. */
  userId: string;
  /** `tid`: the tenant, when present. */
  tenantId?: string;
  /** `exp` in ms since the epoch, when present. */
  expiresAt?: number;
}

function base64UrlDecode(part: string): string {
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
  const binary = atob(b64);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** The identity in a JWT, or undefined when it is not a readable JWT with a `sub`. */
export function readIdentity(token: string): Identity | undefined {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts[1]) return undefined;
  try {
    const claims: unknown = JSON.parse(base64UrlDecode(parts[1]));
    if (!claims || typeof claims !== "object") return undefined;
    const c = claims as Record<string, unknown>;
    if (typeof c.sub !== "string" || !c.sub) return undefined;
    return {
      userId: c.sub,
      tenantId: typeof c.tid === "string" && c.tid ? c.tid : undefined,
      expiresAt: typeof c.exp === "number" ? c.exp * 1000 : undefined,
    };
  } catch {
    return undefined;
  }
}
