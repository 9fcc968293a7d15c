/**
 * lamplight browser client.
 *
 * ```ts
 * import { createLamplight } from "@lamplight/web";
 * const client = createLamplight({ baseUrl: "http://localhost:50051", getToken: () => auth.accessToken() });
 * client.on("event", (e) => console.log(e.type, e.payload));
 * await client.join(client.projectRoom("p1")!);
 * ```
 */

export {
  createLamplight,
  DEFAULT_HEARTBEAT_MS,
  DEFAULT_MAX_AUTH_FAILURES,
  DEFAULT_TOKEN_TIMEOUT_MS,
  DEFAULT_WATCHDOG_FACTOR,
  type Lamplight,
  type LamplightEvents,
  type LamplightOptions,
  type LamplightStats,
  type Presence,
  type PresencePage,
  type RemovedNotice,
  type ResetNotice,
  type RetryNotice,
  type TokenContext,
} from "./client.js";
export { Backoff, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff.js";
export { CursorTracker, DEFAULT_DEDUPE_WINDOW } from "./cursors.js";
export { compareEventIds, movesForward } from "./ids.js";
export {
  ADMIN_DISCONNECT_TEXT,
  DisconnectedError,
  JoinCancelledError,
  JoinError,
  RESUME_METADATA_KEY,
  RoomRemovedError,
  classify,
  disconnectReason,
  isAdminDisconnect,
  resumeSince,
  type FailureKind,
} from "./errors.js";
export {
  RoomSet,
  channelRoom,
  parseRoom,
  projectRoom,
  roomNamedIn,
  sameRooms,
  tenantRoom,
  userRoom,
  type ParsedRoom,
} from "./rooms.js";
export { applyStatusChanges, packedIds, statusChanges, type StatusChange } from "./statuses.js";
export { CONNECTION_STATES, nextState, type ConnectionInput, type ConnectionState } from "./state.js";
export { readIdentity, type Identity } from "./token.js";
export { DEFAULT_TYPING, TypingSender, TypingTracker, type TypingOptions } from "./typing.js";
export * from "./gen/lamplight/v1/events_pb.js";
