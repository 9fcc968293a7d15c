/**
 * React bindings: `<LamplightProvider>`, `useLamplight()`, `useRoom()`, `useRealTimeUpdates()`,
 * `useTyping()`, `usePresence()` and `<ConnectionStatus/>`, the replacements for the seed's SocketContext,
 * useRealTimeUpdates and ConnectionStatus.
 *
 * Needs `react` (18+) and `@tanstack/react-query` (5+) installed (optional peers of the core client);
 * a `QueryClientProvider` is optional: without one, `useRealTimeUpdates` just calls the handlers.
 */

import { QueryClientContext, type QueryClient, type QueryKey } from "@tanstack/react-query";
import {
  createContext,
  useCallback,
  useContext,
  useEffect,
  useMemo,
  useRef,
  useState,
  useSyncExternalStore,
  type CSSProperties,
  type ReactNode,
} from "react";

import { createLamplight, type Lamplight, type LamplightOptions, type Presence, type ResetNotice } from "../client.js";
import { DisconnectedError, JoinCancelledError } from "../errors.js";
import {
  type Bug,
  type Event,
  type Feature,
  type Message,
  type Notification,
  type Task,
} from "../gen/lamplight/v1/events_pb.js";
import { channelRoom, parseRoom, projectRoom, tenantRoom, userRoom } from "../rooms.js";
import { applyStatusChanges, statusChanges } from "../statuses.js";
import type { ConnectionState } from "../state.js";
import type { Identity } from "../token.js";

const LamplightContext = createContext<Lamplight | null>(null);

/** Props of {@link LamplightProvider}: either a client, or the options to create one. */
export type LamplightProviderProps =
  | { client: Lamplight; children?: ReactNode }
  | ({ client?: undefined; children?: ReactNode } & LamplightOptions);

/** Ids for transports, so a new transport object counts as a change of options. */
const transportIds = new WeakMap<object, number>();
let lastTransportId = 0;

/** JSON with object keys sorted: equal options give equal text whatever order they were written in. */
function stableJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) =>
    v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}

/** Which server a client talks to: its base URL and transport. */
function serverOf(options: LamplightOptions): string {
  const { transport } = options;
  let id = 0;
  if (transport) {
    id = transportIds.get(transport) ?? ++lastTransportId;
    transportIds.set(transport, id);
  }
  return stableJson([options.baseUrl, id]);
}

/**
 * What a client is made of, as text: every option but `getToken` (swapped on the running client),
 * `random` (tests), `autoConnect` (the provider connects) and `since` (read once). Compared by value,
 * so inline objects (`backoff={{ ... }}`) re-created on every render change nothing.
 */
function clientKey(options: LamplightOptions): string {
  const { getToken: _g, random: _r, autoConnect: _a, since: _s, transport: _t, baseUrl: _b, rooms, ...rest } = options;
  return stableJson({ ...rest, rooms: rooms ? [...rooms].sort() : undefined, server: serverOf(options) });
}

interface Owned {
  key: string;
  server: string;
  client: Lamplight;
}

/** Created without connecting: React may render (and so create) more than once and drop the results. */
function createOwned(options: LamplightOptions, key: string, previous: Owned | undefined): Owned {
  const server = serverOf(options);
  // Same server: rooms resume where the replaced client was, instead of a silent gap.
  const since = previous?.server === server ? { ...previous.client.cursors(), ...options.since } : options.since;
  return { key, server, client: createLamplight({ ...options, since, autoConnect: false }) };
}

/**
 * Makes a client available to the hooks below it. Given options (`baseUrl`, `getToken`, ...), it creates
 * the client, connects it, and closes it on unmount. It follows later props: a new `getToken` function
 * goes to the running client ({@link Lamplight.setTokenSource}: the stream is re-opened with a token from
 * it), so pass a stable function (module level or `useCallback`), not a new arrow on every render. Any
 * other change of value (`baseUrl`, `heartbeatIntervalMs`, `backoff`, ...) replaces the client: the old one
 * is closed, hooks join their rooms on the new one, which resumes them from the old one's positions when
 * the server is the same. Given a `client`, it only provides it.
 */
export function LamplightProvider(props: LamplightProviderProps): ReactNode {
  const { children } = props;
  const options = props.client ? undefined : (props as LamplightOptions);
  const key = options ? clientKey(options) : undefined;
  const [owned, setOwned] = useState<Owned | undefined>(() => (options && key !== undefined ? createOwned(options, key, undefined) : undefined));
  let current = owned;
  if (options && key !== undefined && (!owned || owned.key !== key)) {
    // Options changed: derive the new client during render (React re-renders at once with it).
    current = createOwned(options, key, owned);
    setOwned(current);
  }
  const ownedClient = options ? current?.client : undefined;
  useEffect(() => {
    if (!ownedClient) return;
    // Effects may run twice in development (StrictMode): closing keeps the joined rooms, connect resumes.
    ownedClient.connect();
    return () => ownedClient.close();
  }, [ownedClient]);
  const getToken = options?.getToken;
  useEffect(() => {
    if (ownedClient && getToken) ownedClient.setTokenSource(getToken);
  }, [ownedClient, getToken]);
  const client = props.client ?? ownedClient!;
  return <LamplightContext.Provider value={client}>{children}</LamplightContext.Provider>;
}

/** The client from the nearest provider. Throws when there is none. */
export function useLamplightClient(): Lamplight {
  const client = useContext(LamplightContext);
  if (!client) throw new Error("lamplight hooks need a <LamplightProvider> above them");
  return client;
}

/** What {@link useLamplight} returns. */
export interface LamplightContextValue {
  client: Lamplight;
  state: ConnectionState;
  isConnected: boolean;
  error: Error | undefined;
  identity: Identity | undefined;
  join: (room: string) => Promise<void>;
  leave: (room: string) => void;
}

function useClientValue<T>(client: Lamplight, events: ("state" | "identity" | "rooms" | "retry")[], read: () => T): T {
  const subscribe = useCallback(
    (onChange: () => void) => {
      const offs = events.map((name) => client.on(name, onChange));
      return () => offs.forEach((off) => off());
    },
    // eslint-disable-next-line react-hooks/exhaustive-deps
    [client, events.join(",")],
  );
  return useSyncExternalStore(subscribe, read, read);
}

/** The client, its connection state (re-rendering on change) and identity: the seed's `useSocket`. */
export function useLamplight(): LamplightContextValue {
  const client = useLamplightClient();
  const state = useClientValue(client, ["state"], () => client.state);
  const error = useClientValue(client, ["state"], () => client.error);
  const identity = useClientValue(client, ["identity"], () => client.identity);
  return useMemo(
    () => ({
      client,
      state,
      isConnected: state === "connected",
      error,
      identity,
      join: (room: string) => client.join(room),
      leave: (room: string) => client.leave(room),
    }),
    [client, state, error, identity],
  );
}

/** The tenant to build room names with: the option, else the token's `tid`. */
function useTenant(client: Lamplight, tenantId: string | undefined): string | undefined {
  const fromToken = useClientValue(client, ["identity"], () => client.identity?.tenantId);
  return tenantId ?? fromToken;
}

/** State of one joined room. */
export interface RoomStatus {
  /** A stream carrying the room has been confirmed. */
  joined: boolean;
  /**
   * The server refused the room (a `JoinError`), an administrator removed it later (a `RoomRemovedError`,
   * `joined` goes back to false), or the join failed otherwise.
   */
  error: Error | undefined;
}

/** Joins `room` while mounted (no-op for `undefined`); reports refusal and removal instead of throwing. */
export function useRoom(room: string | undefined): RoomStatus {
  const client = useLamplightClient();
  const [status, setStatus] = useState<RoomStatus>({ joined: false, error: undefined });
  useEffect(() => {
    if (!room) return;
    let live = true;
    setStatus({ joined: false, error: undefined });
    client.join(room).then(
      () => live && setStatus({ joined: true, error: undefined }),
      (error: Error) => {
        if (live && !(error instanceof JoinCancelledError)) setStatus({ joined: false, error });
      },
    );
    // A room dropped after the join completed (an administrator removed it).
    const off = client.on("joinError", (error) => {
      if (live && error.room === room) setStatus({ joined: false, error });
    });
    return () => {
      live = false;
      off();
      client.leave(room);
    };
  }, [client, room]);
  return status;
}

type Handler<T> = (value: T, event: Event) => void;

/** Options of {@link useRealTimeUpdates} (the seed's hook, same names). */
export interface RealTimeUpdatesOptions {
  /** Joins `tenant:{tid}:project:{projectId}` while mounted. */
  projectId?: string;
  /** Joins `tenant:{tid}:channel:{channelId}` while mounted. */
  channelId?: string;
  /** Tenant for the room names (default: the token's `tid`). */
  tenantId?: string;
  onTaskCreated?: Handler<Task>;
  onTaskUpdated?: Handler<Task>;
  onTaskDeleted?: Handler<Task>;
  onBugCreated?: Handler<Bug>;
  onBugUpdated?: Handler<Bug>;
  onBugDeleted?: Handler<Bug>;
  onFeatureCreated?: Handler<Feature>;
  onFeatureUpdated?: Handler<Feature>;
  onFeatureDeleted?: Handler<Feature>;
  /** Any message event of the channel (`message.created`, `message.updated`, ...). */
  onMessage?: Handler<Message>;
  /** Notifications for the current user (from `user:{sub}`, joined automatically). */
  onNotification?: Handler<Notification>;
  /** Every event of this hook's rooms, after the specific handlers. */
  onEvent?: (event: Event) => void;
  /** Events of one of this hook's rooms were lost: refetch (queries are invalidated too, see below). */
  onReset?: (reset: ResetNotice) => void;
  /**
   * Invalidate TanStack Query keys on events (default true; needs a `QueryClientProvider`). Keys:
   * tasks `["tasks", projectId]` + `["task", id]`, bugs `["bugs", projectId]` + `["bug", id]`, features
   * `["features", projectId]` + `["feature", id]`, messages `["messages", channelId]`, notifications
   * `["notifications"]`; a `Reset` invalidates every list key of its room.
   */
  autoInvalidateQueries?: boolean;
  /** Replaces the default keys above. */
  queryKeysFor?: (event: Event) => QueryKey[];
}

/** What {@link useRealTimeUpdates} returns. */
export interface RealTimeUpdates {
  isConnected: boolean;
  state: ConnectionState;
  projectRoom: string | undefined;
  channelRoom: string | undefined;
  /** A refusal of the project or channel room. */
  joinError: Error | undefined;
}

/** The default query keys an event invalidates (see {@link RealTimeUpdatesOptions.autoInvalidateQueries}). */
export function defaultQueryKeys(event: Event): QueryKey[] {
  const p = event.payload;
  switch (p.case) {
    case "task":
      return [["tasks", p.value.projectId], ["task", p.value.id]];
    case "bug":
      return [["bugs", p.value.projectId], ["bug", p.value.id]];
    case "feature":
      return [["features", p.value.projectId], ["feature", p.value.id]];
    case "message":
      return [["messages", p.value.channelId]];
    case "notification":
      return [["notifications"]];
    default:
      return [];
  }
}

function resetQueryKeys(room: string): QueryKey[] {
  const r = parseRoom(room);
  if (r?.kind === "project") return [["tasks", r.projectId], ["bugs", r.projectId], ["features", r.projectId]];
  if (r?.kind === "channel") return [["messages", r.channelId]];
  if (r?.kind === "user") return [["notifications"]];
  return [];
}

/** `created` / `updated` / `deleted` from `task.created` etc. */
function action(type: string): string {
  return type.slice(type.lastIndexOf(".") + 1);
}

/**
 * Subscribes a component to the real-time events of a project and/or channel, calls the handlers, and
 * invalidates TanStack Query caches. Handlers may change on every render without re-subscribing.
 */
export function useRealTimeUpdates(options: RealTimeUpdatesOptions): RealTimeUpdates {
  const client = useLamplightClient();
  const { state } = useLamplight();
  const tenant = useTenant(client, options.tenantId);
  const project = tenant && options.projectId ? projectRoom(tenant, options.projectId) : undefined;
  const channel = tenant && options.channelId ? channelRoom(tenant, options.channelId) : undefined;
  const projectStatus = useRoom(project);
  const channelStatus = useRoom(channel);
  const queryClient = useContext(QueryClientContext) as QueryClient | undefined;
  const latest = useRef(options);
  latest.current = options;
  const userId = useClientValue(client, ["identity"], () => client.identity?.userId);

  useEffect(() => {
    const mine = new Set([project, channel, userId ? userRoom(userId) : undefined].filter(Boolean) as string[]);
    const invalidate = (keys: QueryKey[]) => {
      if (!queryClient || latest.current.autoInvalidateQueries === false) return;
      for (const queryKey of keys) void queryClient.invalidateQueries({ queryKey });
    };
    const offEvent = client.on("event", (event) => {
      if (!mine.has(event.room)) return;
      const o = latest.current;
      const p = event.payload;
      const act = action(event.type);
      if (p.case === "task" && event.room === project) {
        (act === "created" ? o.onTaskCreated : act === "deleted" ? o.onTaskDeleted : o.onTaskUpdated)?.(p.value, event);
      } else if (p.case === "bug" && event.room === project) {
        (act === "created" ? o.onBugCreated : act === "deleted" ? o.onBugDeleted : o.onBugUpdated)?.(p.value, event);
      } else if (p.case === "feature" && event.room === project) {
        (act === "created" ? o.onFeatureCreated : act === "deleted" ? o.onFeatureDeleted : o.onFeatureUpdated)?.(p.value, event);
      } else if (p.case === "message" && event.room === channel) {
        o.onMessage?.(p.value, event);
      } else if (p.case === "notification") {
        o.onNotification?.(p.value, event);
      }
      o.onEvent?.(event);
      invalidate((o.queryKeysFor ?? defaultQueryKeys)(event));
    });
    const offReset = client.on("reset", (reset) => {
      if (!mine.has(reset.room)) return;
      latest.current.onReset?.(reset);
      invalidate(resetQueryKeys(reset.room));
    });
    return () => {
      offEvent();
      offReset();
    };
  }, [client, project, channel, userId, queryClient]);

  return {
    isConnected: state === "connected",
    state,
    projectRoom: project,
    channelRoom: channel,
    joinError: projectStatus.error ?? channelStatus.error,
  };
}

/** What {@link useTyping} returns. */
export interface TypingState {
  /** Other users typing in the channel now. */
  typingUsers: string[];
  /** Sets the current user's state explicitly (e.g. `false` after sending). */
  setTyping: (isTyping: boolean) => void;
  /** Call on every keystroke: throttled, and stops by itself after a pause. */
  notifyTyping: () => void;
  /** The channel room, once known. */
  room: string | undefined;
}

/** Typing indicator of a channel: who else is typing, and the functions to announce our own typing. */
export function useTyping(channelId: string | undefined, options: { tenantId?: string } = {}): TypingState {
  const client = useLamplightClient();
  const tenant = useTenant(client, options.tenantId);
  const room = tenant && channelId ? channelRoom(tenant, channelId) : undefined;
  useRoom(room);
  const [typingUsers, setTypingUsers] = useState<string[]>(() => (room ? client.typingUsers(room) : []));
  useEffect(() => {
    if (!room) return;
    setTypingUsers(client.typingUsers(room));
    return client.on("typing", (t) => {
      if (t.room === room) setTypingUsers(t.userIds);
    });
  }, [client, room]);
  const setTyping = useCallback((isTyping: boolean) => room && client.setTyping(room, isTyping), [client, room]);
  const notifyTyping = useCallback(() => room && client.setTyping(room, true), [client, room]);
  return { typingUsers, setTyping, notifyTyping, room };
}

/** What {@link usePresence} returns. */
export interface PresenceState extends Presence {
  loading: boolean;
  error: Error | undefined;
  refresh: () => void;
}

/** Every page of `room`'s presence, 1,000 users per call: the diffs below apply to the whole list. */
async function allPresence(client: Lamplight, room: string): Promise<Presence> {
  let page = await client.getPresence(room, { limit: 1000 });
  const userIds = [...page.userIds];
  while (page.nextPageToken) {
    page = await client.getPresence(room, { limit: 1000, pageToken: page.nextPageToken });
    userIds.push(...page.userIds);
  }
  return { ...page, userIds, userCount: userIds.length, nextPageToken: "" };
}

/**
 * Who is connected to `room` (e.g. `tenant:{tid}` for everyone online), every user (fetched 1,000 per
 * call). Fetched when mounted, whenever
 * the connection is (re-)established and every `refreshMs`. In between, the tenant's status diffs
 * (`user.status` events, received when the client is subscribed to `tenant:{tid}`) are applied as they
 * come: to a tenant room's list in full; to another room of the tenant, a user who went offline leaves
 * its list at once, and one who came online makes it refetch (once per `refreshMs / 10` at most, since
 * only the server knows which rooms they joined).
 */
export function usePresence(room: string | undefined, options: { refreshMs?: number } = {}): PresenceState {
  const client = useLamplightClient();
  const { state } = useLamplight();
  const refreshMs = options.refreshMs ?? 15_000;
  const [presence, setPresence] = useState<Presence>({
    userIds: [],
    userCount: 0,
    connectionCount: 0,
    nextPageToken: "",
  });
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState<Error | undefined>();
  const [tick, setTick] = useState(0);
  const refresh = useCallback(() => setTick((t) => t + 1), []);
  const connected = state === "connected";

  useEffect(() => {
    if (!room || !connected) return;
    let live = true;
    allPresence(client, room).then(
      (p) => {
        if (!live) return;
        setPresence(p);
        setError(undefined);
        setLoading(false);
      },
      (err: Error) => {
        if (!live) return;
        setError(err);
        setLoading(false);
      },
    );
    const timer = setTimeout(refresh, refreshMs);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [client, room, connected, tick, refreshMs, refresh]);

  useEffect(() => {
    if (!room) return;
    const parsed = parseRoom(room);
    const tenant = parsed && parsed.kind !== "user" ? parsed.tenantId : undefined;
    if (!tenant) return;
    const whole = room === tenantRoom(tenant);
    let pending: ReturnType<typeof setTimeout> | undefined;
    const off = client.on("event", (event) => {
      if (event.room !== tenantRoom(tenant)) return;
      const changes = statusChanges(event);
      if (changes.length === 0) return;
      // A tenant room's members are its online users; another room loses whoever went offline.
      const applied = whole ? changes : changes.filter((c) => !c.online);
      setPresence((p) => {
        const userIds = applyStatusChanges(p.userIds, applied);
        return userIds === p.userIds ? p : { ...p, userIds: [...userIds], userCount: userIds.length };
      });
      if (!whole && !pending && changes.some((c) => c.online)) {
        pending = setTimeout(() => {
          pending = undefined;
          refresh();
        }, refreshMs / 10);
      }
    });
    return () => {
      off();
      if (pending) clearTimeout(pending);
    };
  }, [client, room, refresh, refreshMs]);

  return { ...presence, loading, error, refresh };
}

/** Props of {@link ConnectionStatus}. */
export interface ConnectionStatusProps {
  className?: string;
  style?: CSSProperties;
  /** Text per state (defaults in English). */
  labels?: Partial<Record<Exclude<ConnectionState, "connected">, string>>;
  /** Text for the `error` state when an administrator disconnected the user (default in English). */
  disconnectedLabel?: string;
}

const DEFAULT_LABELS: Record<Exclude<ConnectionState, "connected">, string> = {
  connecting: "Connecting…",
  reconnecting: "Reconnecting…",
  disconnected: "Disconnected",
  error: "Connection error",
};

const BASE_STYLE: CSSProperties = {
  position: "fixed",
  bottom: 16,
  right: 16,
  padding: "8px 14px",
  borderRadius: 8,
  font: "14px system-ui, sans-serif",
  color: "#fff",
  boxShadow: "0 4px 14px rgba(0,0,0,.2)",
  zIndex: 1000,
};

const COLORS: Record<Exclude<ConnectionState, "connected">, string> = {
  connecting: "#2563eb",
  reconnecting: "#d97706",
  disconnected: "#6b7280",
  error: "#dc2626",
};

/** Seconds until the next retry, re-rendering every second while one is scheduled. */
function useRetryCountdown(client: Lamplight): number | undefined {
  const retryAt = useClientValue(client, ["retry", "state"], () => client.nextRetryAt);
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    if (!retryAt) return;
    setNow(Date.now());
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, [retryAt]);
  return retryAt ? Math.max(0, Math.ceil((retryAt - now) / 1000)) : undefined;
}

/**
 * The connection indicator: hidden while connected (the normal state), as in the seed; otherwise says
 * connecting, reconnecting (with the retry countdown), disconnected, or the error, with a Retry button
 * (`reconnect()`: a new attempt now, with the backoff and failure counts reset). An administrator's
 * disconnect (a `DisconnectedError`) shows its reason and no Retry: reconnecting is the app's decision.
 */
export function ConnectionStatus({ className, style, labels, disconnectedLabel }: ConnectionStatusProps): ReactNode {
  const { client, state, error } = useLamplight();
  const seconds = useRetryCountdown(client);
  if (state === "connected") return null;
  const byAdmin = state === "error" && error instanceof DisconnectedError;
  const text = byAdmin ? (disconnectedLabel ?? "Disconnected by an administrator") : { ...DEFAULT_LABELS, ...labels }[state];
  const detail = byAdmin ? error.reason : error?.message;
  return (
    <div
      role="status"
      aria-live="polite"
      data-lamplight-state={state}
      className={className}
      style={className ? style : { ...BASE_STYLE, background: COLORS[state], ...style }}
    >
      <span>{text}</span>
      {state === "reconnecting" && seconds !== undefined && seconds > 0 ? <span> retrying in {seconds} s</span> : null}
      {state === "error" && error && detail ? <span title={error.message}> ({detail})</span> : null}
      {/* Whenever not connected: a wait can be cut short, and a stuck attempt is never the end. */}
      {byAdmin ? null : (
        <button
          type="button"
          onClick={() => client.reconnect()}
          style={{ marginLeft: 10, font: "inherit", cursor: "pointer", borderRadius: 6, border: "1px solid #fff8", background: "transparent", color: "inherit" }}
        >
          Retry
        </button>
      )}
    </div>
  );
}

export type { Lamplight, LamplightOptions, Presence, RemovedNotice, ResetNotice } from "../client.js";
export type { ConnectionState } from "../state.js";
