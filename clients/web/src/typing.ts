/**
 * Typing indicators, both ways.
 *
 * Sending ({@link TypingSender}): the app calls `set(room, true)` on every keystroke. At most one
 * `SetTyping` goes out per `minIntervalMs` per room (the server also rate-limits, a few per second per
 * user); while the user keeps typing, `true` is re-sent every `refreshMs` so receivers do not time it out;
 * after `idleMs` without a keystroke the state falls back to `false` by itself. While the client is not
 * connected nothing is sent and only the latest state per room is kept: on reconnect a room still typing
 * sends `true`, a room that stopped after announcing `true` sends `false`, and nothing else is replayed.
 *
 * Receiving ({@link TypingTracker}): who is typing per room, each entry expiring after `displayTtlMs`
 * unless refreshed, so a sender that vanished does not type forever.
 */

/** Timing of typing indicators, in ms. */
export interface TypingOptions {
  /** Fewest ms between two `SetTyping` calls for one room. */
  minIntervalMs: number;
  /** While typing, `true` is re-sent this often. */
  refreshMs: number;
  /** Without a new keystroke for this long, typing stops by itself. */
  idleMs: number;
  /** A received `true` is shown this long unless refreshed. */
  displayTtlMs: number;
}

export const DEFAULT_TYPING: Readonly<TypingOptions> = Object.freeze({
  minIntervalMs: 1_000,
  refreshMs: 3_000,
  idleMs: 5_000,
  displayTtlMs: 6_000,
});

interface SendState {
  desired: boolean;
  /** What the server last accepted from us; undefined when unknown (never sent, or after a reconnect). */
  sent: boolean | undefined;
  sentAt: number;
  inFlight: boolean;
  flushTimer: ReturnType<typeof setTimeout> | undefined;
  flushAt: number;
  idleTimer: ReturnType<typeof setTimeout> | undefined;
}

/** Throttles and coalesces outgoing typing state. `send` performs the RPC. */
export class TypingSender {
  private readonly rooms = new Map<string, SendState>();
  private online = false;

  constructor(
    private readonly send: (room: string, isTyping: boolean) => Promise<void>,
    private readonly options: TypingOptions = DEFAULT_TYPING,
    private readonly now: () => number = Date.now,
  ) {}

  /** The app's latest typing state for `room`. */
  set(room: string, isTyping: boolean): void {
    let s = this.rooms.get(room);
    if (!s) {
      if (!isTyping) return; // never said anything: nothing to take back
      s = { desired: false, sent: undefined, sentAt: -Infinity, inFlight: false, flushTimer: undefined, flushAt: 0, idleTimer: undefined };
      this.rooms.set(room, s);
    }
    s.desired = isTyping;
    if (s.idleTimer) clearTimeout(s.idleTimer);
    s.idleTimer = isTyping ? setTimeout(() => this.set(room, false), this.options.idleMs) : undefined;
    this.flush(room);
  }

  /** The latest state the app asked for (what will be sent when possible). */
  desired(room: string): boolean {
    return this.rooms.get(room)?.desired ?? false;
  }

  /** The stream is up: send what is pending. */
  connected(): void {
    this.online = true;
    for (const room of [...this.rooms.keys()]) this.flush(room);
  }

  /** The stream is down: hold everything; after reconnecting the server's view is unknown. */
  disconnected(): void {
    this.online = false;
    for (const s of this.rooms.values()) {
      if (s.flushTimer) clearTimeout(s.flushTimer);
      s.flushTimer = undefined;
      // A `true` we sent has expired on the receivers by the time we are back, unless refreshed; a
      // `false` needs no repeat. Keep `sent === true` so a stop during the outage is still announced.
      if (s.sent === false) s.sent = undefined;
    }
  }

  /** Forgets a room (left): stops typing there if we had announced it. */
  forget(room: string): void {
    const s = this.rooms.get(room);
    if (!s) return;
    if (s.flushTimer) clearTimeout(s.flushTimer);
    if (s.idleTimer) clearTimeout(s.idleTimer);
    this.rooms.delete(room);
    if (this.online && s.sent === true) void this.send(room, false).catch(() => undefined);
  }

  /** Stops all timers. */
  dispose(): void {
    for (const s of this.rooms.values()) {
      if (s.flushTimer) clearTimeout(s.flushTimer);
      if (s.idleTimer) clearTimeout(s.idleTimer);
    }
    this.rooms.clear();
  }

  private flush(room: string): void {
    const s = this.rooms.get(room);
    if (!s || !this.online || s.inFlight) return;
    const now = this.now();
    if (s.desired === s.sent) {
      if (!s.desired) {
        this.cleanup(room, s);
        return;
      }
      // Still typing: refresh when due.
      const due = s.sentAt + this.options.refreshMs;
      if (now < due) return this.schedule(room, s, due - now);
    } else if (s.sent === undefined && !s.desired) {
      // The server never heard `true` from us (or has forgotten it): nothing to take back.
      this.cleanup(room, s);
      return;
    }
    const allowed = s.sentAt + this.options.minIntervalMs;
    if (now < allowed) return this.schedule(room, s, allowed - now);
    const value = s.desired;
    s.inFlight = true;
    s.sentAt = now;
    this.send(room, value).then(
      () => {
        s.inFlight = false;
        s.sent = value;
        if (this.rooms.get(room) === s) this.flush(room);
      },
      () => {
        // Rate-limited or offline: unknown; try again after the interval if still wanted.
        s.inFlight = false;
        s.sent = undefined;
        if (this.rooms.get(room) === s && s.desired) this.schedule(room, s, this.options.minIntervalMs);
      },
    );
  }

  private schedule(room: string, s: SendState, delay: number): void {
    const at = this.now() + delay;
    if (s.flushTimer) {
      if (s.flushAt <= at) return; // an earlier flush is already due
      clearTimeout(s.flushTimer);
    }
    s.flushAt = at;
    s.flushTimer = setTimeout(() => {
      s.flushTimer = undefined;
      this.flush(room);
    }, delay);
  }

  private cleanup(room: string, s: SendState): void {
    if (s.desired || s.idleTimer || s.flushTimer || s.inFlight) return;
    this.rooms.delete(room);
  }
}

/** Who is typing where, from received `typing` events. */
export class TypingTracker {
  /** room -> user -> expiry (ms since epoch). */
  private readonly rooms = new Map<string, Map<string, number>>();
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly onChange: (room: string, userIds: string[]) => void,
    private readonly ttlMs: number = DEFAULT_TYPING.displayTtlMs,
    private readonly now: () => number = Date.now,
  ) {}

  /** A typing event from `userId` in `room`. */
  update(room: string, userId: string, isTyping: boolean): void {
    let users = this.rooms.get(room);
    const before = users?.has(userId) ?? false;
    if (isTyping) {
      if (!users) {
        users = new Map();
        this.rooms.set(room, users);
      }
      users.set(userId, this.now() + this.ttlMs);
      this.arm();
    } else if (users) {
      users.delete(userId);
    }
    if (before !== isTyping) this.onChange(room, this.typing(room));
  }

  /** A user who sent a message has stopped typing. */
  stopped(room: string, userId: string): void {
    if (this.rooms.get(room)?.has(userId)) this.update(room, userId, false);
  }

  /** Users typing in `room`, sorted. */
  typing(room: string): string[] {
    return [...(this.rooms.get(room)?.keys() ?? [])].sort();
  }

  /** Forgets a room. */
  clear(room: string): void {
    if (this.rooms.delete(room)) this.onChange(room, []);
  }

  dispose(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.rooms.clear();
  }

  private arm(): void {
    if (this.timer) clearTimeout(this.timer);
    let next = Infinity;
    for (const users of this.rooms.values()) for (const t of users.values()) next = Math.min(next, t);
    if (next === Infinity) {
      this.timer = undefined;
      return;
    }
    this.timer = setTimeout(() => this.expire(), Math.max(0, next - this.now()));
  }

  private expire(): void {
    this.timer = undefined;
    const now = this.now();
    for (const [room, users] of this.rooms) {
      let changed = false;
      for (const [user, t] of users) {
        if (t <= now) {
          users.delete(user);
          changed = true;
        }
      }
      if (users.size === 0) this.rooms.delete(room);
      if (changed) this.onChange(room, this.typing(room));
    }
    this.arm();
  }
}
