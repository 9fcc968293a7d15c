/**
 * The lamplight browser client: one `Subscribe` stream carrying every room the app has joined.
 *
 * Browsers on HTTP/1.1 allow about six connections per host, and a server stream holds one for as long as
 * it is open, so the client never opens one stream per room. Joining or leaving a room re-opens the one
 * stream with the new room list and `since` = the last event id seen in every room, so nothing is missed:
 * the new stream is opened first, and the old one is closed only when the new one has said `Subscribed`
 * (events that both deliver are dropped by id, see {@link CursorTracker}).
 *
 * When the stream fails it is re-opened after a backoff ({@link Backoff}), resuming every room from its
 * cursor; the server replays what was missed, or sends `Reset` (surfaced as the `reset` event: refetch).
 * A watchdog treats a stream with no message (heartbeats included) for 2.5 heartbeat intervals as dead.
 * Every `UNAUTHENTICATED` gets a fresh token from `getToken({ forceRefresh: true })`; refusals that keep
 * coming end in the `error` state rather than a loop. A token *source* that fails (rejects, returns no
 * token, or gives none within `tokenTimeoutMs`) is not a refusal: the attempt is retried with backoff.
 * A room the server refuses (`PERMISSION_DENIED`) is reported to whoever joined it and dropped; the other
 * rooms carry on.
 *
 * Administrators act on live streams (`AdminService`): a room taken off the stream (`Removed`) is dropped
 * the same way (a {@link RoomRemovedError} for its pending joins and `joinError`, plus the `removed` event)
 * and not joined again; a disconnect (PERMISSION_DENIED ending a confirmed stream) puts the client in the
 * `error` state with a {@link DisconnectedError} and no reconnection; revoked tokens end the stream
 * UNAUTHENTICATED, as an expired one does: a fresh token is asked for, and refusals that keep coming end
 * in `error`.
 */

import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { Backoff, type BackoffOptions } from "./backoff.js";
import { CursorTracker } from "./cursors.js";
import { Emitter } from "./emitter.js";
import {
  DisconnectedError,
  JoinCancelledError,
  JoinError,
  RoomRemovedError,
  classify,
  isAdminDisconnect,
  resumeSince,
} from "./errors.js";
import {
  EventService,
  type Event,
  type RoomPosition,
  type SubscribeResponse,
} from "./gen/lamplight/v1/events_pb.js";
import { RoomSet, channelRoom, projectRoom, roomNamedIn, sameRooms, tenantRoom, userRoom } from "./rooms.js";
import { nextState, type ConnectionInput, type ConnectionState } from "./state.js";
import { readIdentity, type Identity } from "./token.js";
import { DEFAULT_TYPING, TypingSender, TypingTracker, type TypingOptions } from "./typing.js";

/** Heartbeat interval the client expects when not told otherwise: lamplight's default `--heartbeat-secs`. */
export const DEFAULT_HEARTBEAT_MS = 25_000;
/** A stream silent for this many heartbeat intervals is presumed dead. */
export const DEFAULT_WATCHDOG_FACTOR = 2.5;
/** Consecutive refusals of fresh tokens before giving up (`error` state). */
export const DEFAULT_MAX_AUTH_FAILURES = 3;
/** How long a `getToken()` call may take before the attempt fails (and is retried with backoff). */
export const DEFAULT_TOKEN_TIMEOUT_MS = 10_000;

/** What {@link LamplightOptions.getToken} is told. */
export interface TokenContext {
  /** The server refused the last token (e.g. it expired): do not answer from a cache. */
  forceRefresh: boolean;
  /** Aborted when the client no longer waits for this token (timeout, `close()`, `reconnect()`). */
  signal: AbortSignal;
}

/** Options of {@link createLamplight}. */
export interface LamplightOptions {
  /** lamplight's grpc-web URL, e.g. `http://localhost:50051` (the same port as gRPC). */
  baseUrl: string;
  /**
   * Returns the app's JWT. Called before every stream is opened and for unary calls; with
   * `forceRefresh: true` after the server refused the token (e.g. it expired), so cache accordingly.
   * A call that throws, rejects, returns no token or takes longer than `tokenTimeoutMs` fails the attempt,
   * which is retried with backoff (it does not count as a refused token); pass `signal` to `fetch` so a
   * timed-out call is cancelled. Replace it with {@link Lamplight.setTokenSource}.
   */
  getToken: (context: TokenContext) => string | Promise<string>;
  /** How long a `getToken()` call may take, in ms (default 10 000); then the attempt is retried. */
  tokenTimeoutMs?: number;
  /** Rooms to join from the start (each holds one reference, see {@link Lamplight.join}). */
  rooms?: string[];
  /**
   * Where rooms resume from (room -> event id), e.g. another client's `cursors()`: a room joined later
   * is subscribed with this `since`, so the server replays what came after it (or says `Reset`).
   */
  since?: Record<string, string>;
  /** Join `user:{sub}` and `tenant:{tid}` from the token's claims (default true), as the seed did. */
  autoJoinUserRooms?: boolean;
  /** The server's `--heartbeat-secs`, in ms (default 25 000). The watchdog is derived from it. */
  heartbeatIntervalMs?: number;
  /** Silence, in heartbeat intervals, after which a stream is presumed dead (default 2.5). */
  watchdogFactor?: number;
  /** Reconnection delays (default 0.5 s doubling to 30 s, with jitter, reset after 10 s up). */
  backoff?: Partial<BackoffOptions>;
  /** Fresh tokens refused in a row before the `error` state (default 3). */
  maxAuthFailures?: number;
  /** Failed attempts in a row (without a `Subscribed`) before the `error` state (default: no limit). */
  maxAttempts?: number;
  /** Typing indicator timings. */
  typing?: Partial<TypingOptions>;
  /** A transport to use instead of grpc-web on `baseUrl` (e.g. in Node tests). */
  transport?: Transport;
  /** Start connecting at once (default true); otherwise on `connect()`. */
  autoConnect?: boolean;
  /** Randomness for the backoff jitter (tests). */
  random?: () => number;
}

/** A room whose history could not cover the cursor: events may have been missed, refetch its state. */
export interface ResetNotice {
  room: string;
  reason: string;
}

/** A room an administrator took off the stream: it was dropped from the joined rooms. */
export interface RemovedNotice {
  room: string;
  /** The administrator's reason (may be empty). */
  reason: string;
}

/** The next reconnection attempt. */
export interface RetryNotice {
  /** Delay before the attempt, in ms. */
  delayMs: number;
  /** Attempts since the last reset of the backoff. */
  attempt: number;
  /** Why the stream failed. */
  error: ConnectError;
}

/** Who is connected to a room. */
/** A room's presence: totals, and one page of its users (sorted by id). */
export interface Presence {
  /** This page's users (by default the first 100). */
  userIds: string[];
  /** Distinct users in the room: the total, on every page. */
  userCount: number;
  /** Open streams in the room: the total, on every page. */
  connectionCount: number;
  /** Pass as `pageToken` for the next page; empty on the last page. */
  nextPageToken: string;
}

/** Which page of a room's users `getPresence` returns. */
export interface PresencePage {
  /** Users per page: the server's default (100) when absent or 0; the server clamps it to 1,000. */
  limit?: number;
  /** The previous page's `nextPageToken`; absent or empty for the first page. */
  pageToken?: string;
}

/** Counters, for diagnostics and tests. */
export interface LamplightStats {
  /** Events handed to listeners. */
  eventsDelivered: number;
  /** Events dropped because they had already been delivered. */
  duplicatesDropped: number;
  /** Streams opened (first connection, re-opens for join/leave, reconnections). */
  streamsOpened: number;
  /** Stream failures followed by a retry. */
  reconnects: number;
  /** Streams the watchdog declared dead. */
  watchdogTimeouts: number;
}

/** What a client emits. */
export interface LamplightEvents {
  /** The connection state changed. */
  state: { state: ConnectionState; error?: Error };
  /** An event of a joined room, once, in order within its room. */
  event: Event;
  /** A room's missed events could not be replayed: refetch its state. */
  reset: ResetNotice;
  /** A stream was confirmed: where each room stands. */
  subscribed: RoomPosition[];
  /** A room was refused, or removed by an administrator ({@link RoomRemovedError}), and dropped. */
  joinError: JoinError;
  /** An administrator took a room off the stream (`joinError` fires too); it is not joined again. */
  removed: RemovedNotice;
  /** Who is typing in a room changed (the current user is never listed). */
  typing: { room: string; userIds: string[] };
  /** A reconnection is scheduled. */
  retry: RetryNotice;
  /** The token's identity became known or changed. */
  identity: Identity;
  /** The set of joined rooms changed. */
  rooms: string[];
}

/** The client. Create it with {@link createLamplight}. */
export interface Lamplight {
  /** Current connection state. */
  readonly state: ConnectionState;
  /** The failure behind `reconnecting` or `error`, if any. */
  readonly error: Error | undefined;
  /** `sub` and `tid` of the current token, once a token was obtained. */
  readonly identity: Identity | undefined;
  /** When the next reconnection attempt is due (ms since the epoch), while one is scheduled. */
  readonly nextRetryAt: number | undefined;
  /** Listens; returns the function that stops listening. */
  on<K extends keyof LamplightEvents>(name: K, listener: (value: LamplightEvents[K]) => void): () => void;
  /**
   * Adds a reference to `room` and makes sure the stream carries it. Resolves once a stream carrying the
   * room is confirmed; rejects with {@link JoinError} when the server refuses the room (the other rooms are
   * not affected), or {@link JoinCancelledError} when it is left or the client closed first.
   */
  join(room: string): Promise<void>;
  /** Drops a reference to `room`; the stream stops carrying it when the last reference is gone. */
  leave(room: string): void;
  /** Joined rooms. */
  rooms(): string[];
  /** Last event id seen per room (what `since` would be now). */
  cursors(): Record<string, string>;
  /** Says the current user is (or stopped) typing in a channel room; throttled, see {@link TypingSender}. */
  setTyping(channelRoom: string, isTyping: boolean): void;
  /** Users typing in a room now (not the current user). */
  typingUsers(room: string): string[];
  /**
   * Who is connected to a room: totals, and a page of user ids (the first 100 unless `page` says
   * otherwise). A malformed `pageToken` rejects with INVALID_ARGUMENT.
   */
  getPresence(room: string, page?: PresencePage): Promise<Presence>;
  /** `tenant:{tid}:project:{pid}` for the token's tenant (undefined until the identity is known). */
  projectRoom(projectId: string): string | undefined;
  /** `tenant:{tid}:channel:{cid}` for the token's tenant (undefined until the identity is known). */
  channelRoom(channelId: string): string | undefined;
  /** Starts again after `close()` or the `error` state; no-op while running. */
  connect(): void;
  /** Drops the current stream and connects again now (resets the backoff and failure counts). */
  reconnect(): void;
  /** Closes the stream and stops reconnecting; joined rooms are kept for a later `connect()`. */
  close(): void;
  /**
   * Replaces `getToken` (e.g. another user signed in). No-op for the same function. Otherwise the next
   * token comes from the new source, and a running client re-opens its stream with one now (staying
   * connected meanwhile, as for a join); a client that gave up (`error`) starts again.
   */
  setTokenSource(getToken: LamplightOptions["getToken"]): void;
  /** Counters. */
  stats(): LamplightStats;
}

/** Creates a client and starts connecting. */
export function createLamplight(options: LamplightOptions): Lamplight {
  return new LamplightClient(options);
}

/** Why the client itself ended a stream. */
type StopReason = "superseded" | "replaced" | "closed" | "watchdog" | "failed";

interface StreamHandle {
  readonly id: number;
  /** Rooms requested; undefined while the token is being fetched. */
  rooms: string[] | undefined;
  readonly controller: AbortController;
  stopped: StopReason | undefined;
  subscribed: boolean;
  watchdog: ReturnType<typeof setTimeout> | undefined;
  healthy: ReturnType<typeof setTimeout> | undefined;
}

interface Waiter {
  resolve: () => void;
  reject: (err: Error) => void;
}

class LamplightClient implements Lamplight {
  private readonly rpc: Client<typeof EventService>;
  private readonly emitter = new Emitter<LamplightEvents>();
  private readonly roomSet = new RoomSet();
  private readonly autoRooms = new Set<string>();
  private readonly cursorTracker = new CursorTracker();
  private readonly backoff: Backoff;
  private readonly typingSender: TypingSender;
  private readonly typingTracker: TypingTracker;
  private readonly waiters = new Map<string, Waiter[]>();
  private readonly heartbeatMs: number;
  private readonly watchdogMs: number;
  private readonly maxAuthFailures: number;
  private readonly maxAttempts: number;
  private readonly autoJoin: boolean;
  private readonly tokenTimeoutMs: number;
  private getToken: LamplightOptions["getToken"];

  private currentState: ConnectionState = "disconnected";
  private lastError: Error | undefined;
  private currentIdentity: Identity | undefined;
  private token: string | undefined;
  /** UNAUTHENTICATED answers so far; a token fetched with `forceRefresh` serves those before its call. */
  private freshTokensWanted = 0;
  private freshTokensServed = 0;
  private active: StreamHandle | undefined;
  private opening: StreamHandle | undefined;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private retryAt: number | undefined;
  private reconcileQueued = false;
  private closed = false;
  /** Gave up (`error` state) until `connect()` / `reconnect()`. */
  private halted = false;
  private authFailures = 0;
  private failures = 0;
  private nextId = 0;
  private readonly counters: LamplightStats = {
    eventsDelivered: 0,
    duplicatesDropped: 0,
    streamsOpened: 0,
    reconnects: 0,
    watchdogTimeouts: 0,
  };
  private readonly onOnline = (): void => {
    // The browser says the network is back: do not wait out the rest of the backoff.
    if (this.retryTimer) this.retryNow();
  };

  constructor(options: LamplightOptions) {
    if (!options.baseUrl && !options.transport) throw new TypeError("createLamplight: baseUrl is required");
    if (typeof options.getToken !== "function") throw new TypeError("createLamplight: getToken is required");
    const transport = options.transport ?? createGrpcWebTransport({ baseUrl: options.baseUrl });
    this.rpc = createClient(EventService, transport);
    this.getToken = options.getToken;
    this.autoJoin = options.autoJoinUserRooms ?? true;
    this.heartbeatMs = options.heartbeatIntervalMs ?? DEFAULT_HEARTBEAT_MS;
    this.watchdogMs = Math.round(this.heartbeatMs * (options.watchdogFactor ?? DEFAULT_WATCHDOG_FACTOR));
    this.maxAuthFailures = options.maxAuthFailures ?? DEFAULT_MAX_AUTH_FAILURES;
    this.maxAttempts = options.maxAttempts ?? Infinity;
    this.tokenTimeoutMs = options.tokenTimeoutMs ?? DEFAULT_TOKEN_TIMEOUT_MS;
    if (!(this.tokenTimeoutMs > 0)) throw new RangeError(`createLamplight: tokenTimeoutMs must be positive, got ${this.tokenTimeoutMs}`);
    this.backoff = new Backoff(options.backoff, options.random);
    const typing = { ...DEFAULT_TYPING, ...options.typing };
    this.typingSender = new TypingSender(
      (room, isTyping) => this.unary((headers) => this.rpc.setTyping({ channelRoom: room, isTyping }, { headers })).then(() => undefined),
      typing,
    );
    this.typingTracker = new TypingTracker((room, userIds) => this.emitter.emit("typing", { room, userIds }), typing.displayTtlMs);
    for (const room of options.rooms ?? []) this.roomSet.add(room);
    this.cursorTracker.adoptMissing(options.since ?? {});
    if (options.autoConnect === false) {
      this.closed = true;
    } else {
      globalThis.addEventListener?.("online", this.onOnline);
      this.scheduleReconcile();
    }
  }

  // ---- public API ----

  get state(): ConnectionState {
    return this.currentState;
  }

  get error(): Error | undefined {
    return this.lastError;
  }

  get identity(): Identity | undefined {
    return this.currentIdentity;
  }

  get nextRetryAt(): number | undefined {
    return this.retryAt;
  }

  on<K extends keyof LamplightEvents>(name: K, listener: (value: LamplightEvents[K]) => void): () => void {
    return this.emitter.on(name, listener);
  }

  join(room: string): Promise<void> {
    if (typeof room !== "string" || room === "") return Promise.reject(new TypeError("join: room must be a non-empty string"));
    const added = this.roomSet.add(room);
    if (added) this.emitter.emit("rooms", this.roomSet.list());
    const current = this.active;
    const carried = current?.rooms?.includes(room) && !this.opening;
    if (carried && this.currentState === "connected") return Promise.resolve();
    const promise = new Promise<void>((resolve, reject) => {
      const list = this.waiters.get(room) ?? [];
      list.push({ resolve, reject });
      this.waiters.set(room, list);
    });
    this.scheduleReconcile();
    return promise;
  }

  leave(room: string): void {
    if (!this.roomSet.remove(room)) return;
    this.autoRooms.delete(room);
    this.cursorTracker.forget(room);
    this.typingSender.forget(room);
    this.typingTracker.clear(room);
    this.settleWaiters(room, new JoinCancelledError(room, "left before the join completed"));
    this.emitter.emit("rooms", this.roomSet.list());
    this.scheduleReconcile();
  }

  rooms(): string[] {
    return this.roomSet.list();
  }

  cursors(): Record<string, string> {
    return this.cursorTracker.snapshot();
  }

  setTyping(channelRoom: string, isTyping: boolean): void {
    this.typingSender.set(channelRoom, isTyping);
  }

  typingUsers(room: string): string[] {
    return this.typingTracker.typing(room);
  }

  async getPresence(room: string, page: PresencePage = {}): Promise<Presence> {
    const request = { room, limit: page.limit ?? 0, pageToken: page.pageToken ?? "" };
    const res = await this.unary((headers) => this.rpc.getPresence(request, { headers }));
    return {
      userIds: [...res.userIds],
      userCount: res.userCount,
      connectionCount: res.connectionCount,
      nextPageToken: res.nextPageToken,
    };
  }

  projectRoom(projectId: string): string | undefined {
    const tid = this.currentIdentity?.tenantId;
    return tid ? projectRoom(tid, projectId) : undefined;
  }

  channelRoom(channelId: string): string | undefined {
    const tid = this.currentIdentity?.tenantId;
    return tid ? channelRoom(tid, channelId) : undefined;
  }

  connect(): void {
    if (!this.closed && !this.halted) return;
    this.restart();
  }

  reconnect(): void {
    this.restart();
  }

  close(): void {
    this.closed = true;
    globalThis.removeEventListener?.("online", this.onOnline);
    this.stopStreams("closed");
    this.clearRetry();
    this.typingSender.disconnected();
    for (const room of [...this.waiters.keys()]) {
      this.settleWaiters(room, new JoinCancelledError(room, "the client was closed"));
    }
    this.setState(nextState(this.currentState, "idle"));
  }

  setTokenSource(getToken: LamplightOptions["getToken"]): void {
    if (typeof getToken !== "function") throw new TypeError("setTokenSource: getToken must be a function");
    if (getToken === this.getToken) return;
    this.getToken = getToken;
    this.token = undefined;
    this.authFailures = 0;
    if (this.closed) return;
    if (this.halted) {
      this.restart();
      return;
    }
    // Make-before-break, as for a join: the current stream stays until one with the new token is confirmed.
    if (this.active || this.opening || this.retryTimer) {
      this.clearRetry();
      this.open();
    }
  }

  stats(): LamplightStats {
    return { ...this.counters };
  }

  // ---- stream management ----

  private restart(): void {
    globalThis.addEventListener?.("online", this.onOnline);
    this.closed = false;
    this.halted = false;
    this.authFailures = 0;
    this.failures = 0;
    this.backoff.reset();
    this.clearRetry();
    this.stopStreams("closed");
    this.typingSender.disconnected();
    this.lastError = undefined;
    if (this.currentState === "connected") this.setState("reconnecting");
    this.reconcile(true);
  }

  /** Coalesces joins and leaves made in the same tick into one re-open. */
  private scheduleReconcile(): void {
    if (this.reconcileQueued) return;
    this.reconcileQueued = true;
    queueMicrotask(() => {
      this.reconcileQueued = false;
      this.reconcile(false);
    });
  }

  /** Makes the stream carry exactly the joined rooms. */
  private reconcile(fromRetry: boolean): void {
    if (this.closed || this.halted) return;
    // While waiting out a backoff, the scheduled attempt will pick up the latest rooms.
    if (this.retryTimer && !fromRetry) return;
    const target = this.roomSet.list();
    const needIdentity = this.autoJoin && !this.currentIdentity;
    if (target.length === 0 && !needIdentity) {
      this.stopStreams("closed");
      this.typingSender.disconnected();
      this.setState(nextState(this.currentState, "idle"));
      return;
    }
    const current = this.opening ?? this.active;
    if (current && (current.rooms === undefined || sameRooms(current.rooms, target))) return;
    this.open();
  }

  private open(): void {
    if (this.opening) this.stop(this.opening, "superseded");
    const h: StreamHandle = {
      id: ++this.nextId,
      rooms: undefined,
      controller: new AbortController(),
      stopped: undefined,
      subscribed: false,
      watchdog: undefined,
      healthy: undefined,
    };
    this.opening = h;
    this.setState(nextState(this.currentState, "open"));
    void this.run(h);
  }

  private isCurrent(h: StreamHandle): boolean {
    return h === this.opening || h === this.active;
  }

  private async run(h: StreamHandle): Promise<void> {
    let token: string;
    try {
      token = await this.obtainToken(h.controller.signal);
    } catch (err) {
      if (this.isCurrent(h) && !h.stopped) this.failed(h, ConnectError.from(err));
      return;
    }
    if (!this.isCurrent(h)) return;
    const rooms = this.roomSet.list();
    if (rooms.length === 0) {
      this.opening = undefined;
      this.reconcile(true);
      return;
    }
    h.rooms = rooms;
    const since = this.cursorTracker.since(rooms);
    this.counters.streamsOpened += 1;
    this.armWatchdog(h);
    try {
      const stream = this.rpc.subscribe(
        { rooms, since },
        { signal: h.controller.signal, headers: { authorization: `Bearer ${token}` } },
      );
      for await (const msg of stream) {
        if (!this.isCurrent(h) || h.stopped) return;
        this.armWatchdog(h);
        this.handle(h, msg);
      }
      if (this.isCurrent(h) && !h.stopped) {
        this.failed(h, new ConnectError("the server ended the stream without a status", Code.Unavailable));
      }
    } catch (err) {
      if (this.isCurrent(h) && !h.stopped) {
        this.failed(h, ConnectError.from(err));
      }
    } finally {
      if (h.watchdog) clearTimeout(h.watchdog);
      h.watchdog = undefined;
    }
  }

  /**
   * No message on `h` for too long: it is replaced at once, as after any transport failure. Done here, not
   * when the aborted stream ends: on a silent connection the abort may end it quietly, or late.
   */
  private watchdogFired(h: StreamHandle): void {
    this.stop(h, "watchdog");
    this.counters.watchdogTimeouts += 1;
    this.failed(
      h,
      new ConnectError(
        `no message for ${this.watchdogMs} ms (heartbeats every ${this.heartbeatMs} ms): stream presumed dead`,
        Code.DeadlineExceeded,
      ),
    );
  }

  private handle(h: StreamHandle, msg: SubscribeResponse): void {
    switch (msg.kind.case) {
      case "subscribed":
        this.onSubscribed(h, msg.kind.value.rooms);
        break;
      case "event":
        if (h.subscribed) this.onEvent(msg.kind.value);
        break;
      case "reset":
        if (h.subscribed && this.roomSet.has(msg.kind.value.room)) {
          this.emitter.emit("reset", { room: msg.kind.value.room, reason: msg.kind.value.reason });
        }
        break;
      case "removed":
        this.onRemoved(h, msg.kind.value.room, msg.kind.value.reason);
        break;
      case "heartbeat":
      case undefined:
        break;
    }
  }

  private onSubscribed(h: StreamHandle, positions: RoomPosition[]): void {
    if (h !== this.opening) return;
    const old = this.active;
    this.opening = undefined;
    this.active = h;
    h.subscribed = true;
    if (old) this.stop(old, "replaced");
    this.cursorTracker.onSubscribed(positions);
    this.failures = 0;
    h.healthy = setTimeout(() => {
      if (this.active !== h) return;
      this.backoff.reset();
      this.authFailures = 0;
    }, this.backoff.options.healthyAfterMs);
    this.lastError = undefined;
    this.setState(nextState(this.currentState, "subscribed"));
    for (const room of h.rooms ?? []) this.settleWaiters(room);
    this.typingSender.connected();
    this.emitter.emit("subscribed", positions);
    // Joins or leaves made while this stream was being confirmed.
    this.scheduleReconcile();
  }

  private onEvent(event: Event): void {
    if (!this.roomSet.has(event.room)) return; // left: the re-open without it is under way
    const payload = event.payload;
    const ephemeral = payload.case === "typing" || payload.case === "userStatus" || payload.case === "presenceDiff";
    if (!this.cursorTracker.accept({ room: event.room, id: event.id, ephemeral })) {
      this.counters.duplicatesDropped += 1;
      return;
    }
    const self = this.currentIdentity?.userId;
    if (payload.case === "typing" && payload.value.userId !== self) {
      this.typingTracker.update(event.room, payload.value.userId, payload.value.isTyping);
    } else if (payload.case === "message") {
      this.typingTracker.stopped(event.room, payload.value.authorId);
    }
    this.counters.eventsDelivered += 1;
    this.emitter.emit("event", event);
  }

  /**
   * An administrator took `room` off stream `h`. The stream no longer carries it (so no re-open is needed
   * for it), and the room is dropped from the joined set, so no later stream asks for it again.
   */
  private onRemoved(h: StreamHandle, room: string, reason: string): void {
    if (h.rooms) h.rooms = h.rooms.filter((r) => r !== room);
    if (!this.roomSet.has(room)) return; // already left
    this.roomSet.drop(room);
    this.autoRooms.delete(room);
    this.cursorTracker.forget(room);
    this.typingSender.forget(room);
    this.typingTracker.clear(room);
    const error = new RoomRemovedError(room, reason);
    this.settleWaiters(room, error);
    this.emitter.emit("joinError", error);
    this.emitter.emit("removed", { room, reason });
    this.emitter.emit("rooms", this.roomSet.list());
    // Another stream (one being opened for a join) may still ask for the room: re-open without it.
    this.scheduleReconcile();
  }

  /** A stream failed (or an attempt to open one did). Decides what happens next. */
  private failed(h: StreamHandle, err: ConnectError): void {
    const wasActive = h === this.active;
    if (h === this.opening) this.opening = undefined;
    else if (wasActive) this.active = undefined;
    else return;
    this.stop(h, "failed");
    if (wasActive) this.cursorTracker.adoptMissing(resumeSince(err));
    const kind = classify(err);
    // Whatever happens next, the token just refused is not offered again.
    if (kind === "auth") this.freshTokensWanted += 1;

    if (kind === "denied" && isAdminDisconnect(err, h.subscribed)) {
      // Not a refused room: an administrator ended the connection. Final, whatever the other stream does.
      this.fatal(new DisconnectedError(err));
      return;
    }
    if (kind === "denied" || kind === "invalid") {
      if (this.refused(h, err)) {
        if (!this.active) this.setState(nextState(this.currentState, "failed"), err);
        this.reconcile(true);
        return;
      }
      this.fatal(err);
      return;
    }
    if (kind === "fatal") {
      this.fatal(err);
      return;
    }
    if (this.active) {
      // Re-opening for a join failed, but the previous stream still carries the other rooms: try later,
      // at once with a fresh token after a first refusal. It never gives up while that stream is up.
      this.counters.reconnects += 1;
      let delay: number;
      if (kind === "auth") {
        this.authFailures += 1;
        delay = this.authFailures === 1 ? 0 : this.backoff.next();
      } else {
        delay = this.backoff.next();
      }
      this.scheduleRetry(delay, err);
      return;
    }
    this.typingSender.disconnected();
    if (this.opening && kind !== "auth") {
      // A re-open is already under way; its outcome decides what comes next.
      this.setState(nextState(this.currentState, "failed"), err);
      return;
    }
    let delay: number;
    if (kind === "auth") {
      // A stream that was confirmed and then ended UNAUTHENTICATED had a token that expired: a fresh token
      // is the normal cure. Only refusals of fresh tokens count towards giving up.
      if (h.subscribed) this.authFailures = 0;
      this.authFailures += 1;
      if (this.authFailures > this.maxAuthFailures) {
        this.fatal(err);
        return;
      }
      delay = this.authFailures === 1 ? 0 : this.backoff.next();
    } else {
      this.failures += 1;
      if (this.failures > this.maxAttempts) {
        this.fatal(err);
        return;
      }
      delay = this.backoff.next();
    }
    this.counters.reconnects += 1;
    this.setState(nextState(this.currentState, "failed"), err);
    this.scheduleRetry(delay, err);
  }

  /**
   * PERMISSION_DENIED / INVALID_ARGUMENT: finds the room at fault and drops it (or its cursor). False when
   * no room can be blamed, i.e. the token itself is refused.
   */
  private refused(h: StreamHandle, err: ConnectError): boolean {
    const rooms = h.rooms ?? [];
    const message = err.rawMessage;
    const room = roomNamedIn(message, rooms);
    if (room && err.code === Code.InvalidArgument && message.startsWith("invalid since")) {
      // The server cannot read our cursor (e.g. another bus): start that room afresh and say so.
      this.cursorTracker.forget(room);
      this.emitter.emit("reset", { room, reason: `the server refused the resume position: ${message}` });
      return true;
    }
    if (room) {
      this.refuseRoom(room, err);
      return true;
    }
    // Not named: the rooms this stream added to the previous one are the only possible cause.
    const carried = this.active?.rooms;
    if (!carried) return false;
    const added = rooms.filter((r) => !carried.includes(r));
    if (added.length === 0) return false;
    for (const r of added) this.refuseRoom(r, err);
    return true;
  }

  private refuseRoom(room: string, err: ConnectError): void {
    this.roomSet.drop(room);
    this.autoRooms.delete(room);
    this.cursorTracker.forget(room);
    const error = new JoinError(room, err);
    this.settleWaiters(room, error);
    this.emitter.emit("joinError", error);
    this.emitter.emit("rooms", this.roomSet.list());
  }

  private fatal(err: Error): void {
    this.halted = true;
    this.stopStreams("closed");
    this.clearRetry();
    this.typingSender.disconnected();
    for (const room of [...this.waiters.keys()]) this.settleWaiters(room, err);
    this.setState(nextState(this.currentState, "fatal"), err);
  }

  private scheduleRetry(delayMs: number, error: ConnectError): void {
    this.clearRetry();
    this.retryAt = Date.now() + delayMs;
    this.retryTimer = setTimeout(() => this.retryNow(), delayMs);
    this.emitter.emit("retry", { delayMs, attempt: this.backoff.attempts, error });
  }

  private retryNow(): void {
    this.clearRetry();
    this.reconcile(true);
  }

  private clearRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.retryAt = undefined;
  }

  private armWatchdog(h: StreamHandle): void {
    if (h.watchdog) clearTimeout(h.watchdog);
    h.watchdog = setTimeout(() => {
      if (this.isCurrent(h) && !h.stopped) this.watchdogFired(h);
    }, this.watchdogMs);
  }

  private stop(h: StreamHandle, why: StopReason): void {
    if (!h.stopped) h.stopped = why;
    if (h.watchdog) clearTimeout(h.watchdog);
    if (h.healthy) clearTimeout(h.healthy);
    h.watchdog = undefined;
    h.healthy = undefined;
    h.controller.abort();
  }

  private stopStreams(why: StopReason): void {
    if (this.opening) this.stop(this.opening, why);
    if (this.active) this.stop(this.active, why);
    this.opening = undefined;
    this.active = undefined;
  }

  private setState(state: ConnectionState, error?: Error): void {
    if (error) this.lastError = error;
    if (state === this.currentState) return;
    this.currentState = state;
    this.emitter.emit("state", { state, error: this.lastError && state !== "connected" ? this.lastError : undefined });
  }

  private settleWaiters(room: string, err?: Error): void {
    const list = this.waiters.get(room);
    if (!list) return;
    this.waiters.delete(room);
    for (const w of list) {
      if (err) w.reject(err);
      else w.resolve();
    }
  }

  // ---- tokens and unary calls ----

  /**
   * A token from the app's source. Its failures (a throw, a rejection, no token, no answer within
   * `tokenTimeoutMs`) are UNAVAILABLE, i.e. retried with backoff like a network error: the server refused
   * nothing. `cancel` (the stream's signal) stops waiting early.
   */
  private async obtainToken(cancel?: AbortSignal): Promise<string> {
    const wanted = this.freshTokensWanted;
    const forceRefresh = wanted > this.freshTokensServed;
    const source = this.getToken;
    const controller = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    let onCancel: (() => void) | undefined;
    const gaveUp = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const err = new ConnectError(`getToken gave no token after ${this.tokenTimeoutMs} ms (tokenTimeoutMs)`, Code.Unavailable);
        controller.abort(err);
        reject(err);
      }, this.tokenTimeoutMs);
      onCancel = () => {
        const err = new ConnectError("no longer waiting for the token", Code.Canceled);
        controller.abort(err);
        reject(err);
      };
      if (cancel?.aborted) onCancel();
      else cancel?.addEventListener("abort", onCancel, { once: true });
    });
    let token: unknown;
    try {
      token = await Promise.race([Promise.resolve().then(() => source({ forceRefresh, signal: controller.signal })), gaveUp]);
    } catch (err) {
      if (err instanceof ConnectError && controller.signal.aborted && err === controller.signal.reason) throw err;
      throw new ConnectError(`getToken failed: ${err instanceof Error ? err.message : String(err)}`, Code.Unavailable, undefined, undefined, err);
    } finally {
      clearTimeout(timer);
      if (onCancel) cancel?.removeEventListener("abort", onCancel);
    }
    if (typeof token !== "string" || token === "") {
      throw new ConnectError("getToken returned no token", Code.Unavailable);
    }
    if (source !== this.getToken) {
      throw new ConnectError("the token source was replaced while fetching a token", Code.Unavailable);
    }
    if (forceRefresh) this.freshTokensServed = Math.max(this.freshTokensServed, wanted);
    this.token = token;
    this.learnIdentity(token);
    return token;
  }

  private learnIdentity(token: string): void {
    const id = readIdentity(token);
    if (!id) return;
    const before = this.currentIdentity;
    this.currentIdentity = id;
    if (before && before.userId === id.userId && before.tenantId === id.tenantId) return;
    if (this.autoJoin) {
      const wanted = [userRoom(id.userId), ...(id.tenantId ? [tenantRoom(id.tenantId)] : [])];
      for (const room of [...this.autoRooms]) {
        if (!wanted.includes(room)) {
          this.autoRooms.delete(room);
          this.roomSet.remove(room);
        }
      }
      for (const room of wanted) {
        if (!this.autoRooms.has(room)) {
          this.autoRooms.add(room);
          this.roomSet.add(room);
        }
      }
      this.emitter.emit("rooms", this.roomSet.list());
      this.scheduleReconcile();
    }
    this.emitter.emit("identity", id);
  }

  /** A unary call with the current token; one retry with a fresh token if it is refused. */
  private async unary<T>(call: (headers: Record<string, string>) => Promise<T>): Promise<T> {
    const token = this.token ?? (await this.obtainToken());
    try {
      return await call({ authorization: `Bearer ${token}` });
    } catch (err) {
      if (classify(err) !== "auth") throw err;
      this.freshTokensWanted += 1;
      const fresh = await this.obtainToken();
      return call({ authorization: `Bearer ${fresh}` });
    }
  }
}
