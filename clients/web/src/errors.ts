/**
 * How the client reads failures: which ones are retried, which refresh the token, which are the caller's
 * (a refused room), and which end in the `error` state.
 */

import { Code, ConnectError } from "@connectrpc/connect";

/** Metadata (trailer) in which lamplight names the last event id delivered per room when it ends a stream. */
export const RESUME_METADATA_KEY = "lamplight-resume-since";

/** What to do about a failed call. */
export type FailureKind =
  /** UNAUTHENTICATED: get a fresh token and try again (a bounded number of times). */
  | "auth"
  /** PERMISSION_DENIED: a room (or the whole token) is refused. */
  | "denied"
  /** INVALID_ARGUMENT: a bad room name or cursor. */
  | "invalid"
  /** UNIMPLEMENTED: not a lamplight server (wrong URL); retrying cannot help. */
  | "fatal"
  /** Everything else (network, UNAVAILABLE, RESOURCE_EXHAUSTED, ...): back off and retry. */
  | "retry";

/** Classifies any thrown value. */
export function classify(err: unknown): FailureKind {
  const e = ConnectError.from(err);
  switch (e.code) {
    case Code.Unauthenticated:
      return "auth";
    case Code.PermissionDenied:
      return "denied";
    case Code.InvalidArgument:
      return "invalid";
    case Code.Unimplemented:
      return "fatal";
    default:
      return "retry";
  }
}

/**
 * The `room -> last event id` a server put in a stream's end status: from the `lamplight-resume-since`
 * trailer, else from the message (`...; resume with since={...}`). Empty when absent or unreadable.
 */
export function resumeSince(err: unknown): Record<string, string> {
  const e = ConnectError.from(err);
  const candidates = [e.metadata.get(RESUME_METADATA_KEY)];
  const marker = "resume with since=";
  const at = e.rawMessage.indexOf(marker);
  if (at >= 0) candidates.push(e.rawMessage.slice(at + marker.length));
  for (const text of candidates) {
    if (!text) continue;
    try {
      const parsed: unknown = JSON.parse(text);
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) {
        const out: Record<string, string> = {};
        for (const [k, v] of Object.entries(parsed)) if (typeof v === "string") out[k] = v;
        return out;
      }
    } catch {
      // try the next source
    }
  }
  return {};
}

/** A room the server refused (PERMISSION_DENIED or INVALID_ARGUMENT naming it). */
export class JoinError extends Error {
  override readonly name: string = "JoinError";
  constructor(
    /** The refused room. */
    readonly room: string,
    /** The server's status. */
    readonly status: ConnectError,
  ) {
    super(`cannot join ${room}: ${status.rawMessage}`, { cause: status });
  }

  /** The gRPC status code (PERMISSION_DENIED or INVALID_ARGUMENT). */
  get code(): Code {
    return this.status.code;
  }
}

/**
 * A room an administrator took off the stream (`AdminService.Unsubscribe`, the server's `Removed`): it is
 * dropped like a refused room (a {@link JoinError} with code PERMISSION_DENIED, so code that handles
 * refusals handles it), and {@link RoomRemovedError.reason} says why. Do not join it again unasked.
 */
export class RoomRemovedError extends JoinError {
  override readonly name: string = "RoomRemovedError";
  constructor(
    room: string,
    /** The administrator's reason (may be empty). */
    readonly reason: string,
  ) {
    super(room, new ConnectError(`removed by an administrator${reason ? `: ${reason}` : ""}`, Code.PermissionDenied));
    this.message = `${room} was removed by an administrator${reason ? `: ${reason}` : ""}`;
  }
}

/** The words lamplight's status uses when `AdminService.Disconnect` ends a stream. */
export const ADMIN_DISCONNECT_TEXT = "disconnected by an administrator";

/**
 * Whether a stream's PERMISSION_DENIED is an administrator's disconnect rather than a refused room or token:
 * rooms are refused when a stream opens, so a stream that had said `Subscribed` (`confirmed`) was
 * disconnected; an unconfirmed one is recognised by the server's words.
 */
export function isAdminDisconnect(err: unknown, confirmed: boolean): boolean {
  const e = ConnectError.from(err);
  if (e.code !== Code.PermissionDenied) return false;
  return confirmed || e.rawMessage.includes(ADMIN_DISCONNECT_TEXT);
}

/**
 * The reason in an administrator's disconnect message
 * (`disconnected by an administrator (REASON): do not reconnect`), or the whole message in another shape.
 */
export function disconnectReason(message: string): string {
  const prefix = `${ADMIN_DISCONNECT_TEXT} (`;
  const at = message.indexOf(prefix);
  const end = message.lastIndexOf(")");
  if (at < 0 || end < at + prefix.length) return message;
  return message.slice(at + prefix.length, end);
}

/**
 * An administrator ended the connection (`AdminService.Disconnect`): the client is in the `error` state
 * and does not reconnect by itself (`reconnect()` / `connect()` would, if the app decides to).
 */
export class DisconnectedError extends Error {
  override readonly name = "DisconnectedError";
  /** The administrator's reason, as the server gave it. */
  readonly reason: string;
  constructor(
    /** The status that ended the stream (PERMISSION_DENIED). */
    readonly status: ConnectError,
  ) {
    const reason = disconnectReason(status.rawMessage);
    super(`disconnected by an administrator: ${reason}`, { cause: status });
    this.reason = reason;
  }
}

/** A pending join that ended because the room was left or the client closed first. */
export class JoinCancelledError extends Error {
  override readonly name = "JoinCancelledError";
  constructor(readonly room: string, reason: string) {
    super(`join of ${room} cancelled: ${reason}`);
  }
}
