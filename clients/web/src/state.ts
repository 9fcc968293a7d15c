/**
 * The connection state machine, as a pure function so it can be tested on its own.
 *
 * ```text
 *   disconnected --open--> connecting --subscribed--> connected
 *        ^                    |                         |   ^
 *        |                  failed                   failed |
 *      idle/close             v                         v   |
 *        +------------- reconnecting ----subscribed---------+
 *   any --fatal--> error --open--> connecting
 * ```
 *
 * - `connecting`: the first attempt (since start, `connect()` or `reconnect()`).
 * - `connected`: a stream carrying every joined room is open (re-opening it for a join or leave keeps
 *   this state: the old stream stays open until the new one is confirmed).
 * - `reconnecting`: the stream failed; waiting out the backoff or trying again.
 * - `disconnected`: no stream, on purpose (closed, or no rooms joined).
 * - `error`: gave up (e.g. the token keeps being refused); `reconnect()` starts again.
 */

/** Observable connection state. */
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "disconnected" | "error";

/** Every state, for exhaustive checks and UIs. */
export const CONNECTION_STATES: readonly ConnectionState[] = [
  "connecting",
  "connected",
  "reconnecting",
  "disconnected",
  "error",
];

/** What happened to the connection. */
export type ConnectionInput =
  /** A stream is being opened. */
  | "open"
  /** A stream's first message (`Subscribed`) arrived. */
  | "subscribed"
  /** The stream failed and will be retried. */
  | "failed"
  /** Nothing to carry (no rooms) or closed by the app. */
  | "idle"
  /** Giving up until the app calls `reconnect()`. */
  | "fatal";

/** The state after `input` in state `current`. */
export function nextState(current: ConnectionState, input: ConnectionInput): ConnectionState {
  switch (input) {
    case "open":
      // Re-opening for a join keeps `connected`; a retry keeps `reconnecting`.
      return current === "disconnected" || current === "error" ? "connecting" : current;
    case "subscribed":
      return "connected";
    case "failed":
      return current === "disconnected" ? current : "reconnecting";
    case "idle":
      return "disconnected";
    case "fatal":
      return "error";
  }
}
