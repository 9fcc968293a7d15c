/**
 * Room names and the set of rooms the app has joined.
 *
 * Rooms are `tenant:{tid}`, `tenant:{tid}:user:{sub}`, `tenant:{tid}:project:{pid}` and
 * `tenant:{tid}:channel:{cid}` (the server checks the grammar and who may join). `user:{sub}` is shorthand
 * for `tenant:{tid}:user:{sub}` in the token's own tenant; the server answers in the name you used. Joins are reference-counted: two components that
 * join the same room share it, and it is left when the last one leaves.
 */

/**
 * A user's notifications: `tenant:{tid}:user:{sub}` with a tenant, else the shorthand `user:{sub}`, which
 * the server reads as that user in the token's own tenant.
 */
export const userRoom = (userId: string, tenantId?: string): string =>
  tenantId === undefined ? `user:${userId}` : `tenant:${tenantId}:user:${userId}`;
/** `tenant:{tid}`: tenant-wide broadcasts, including who is online. */
export const tenantRoom = (tenantId: string): string => `tenant:${tenantId}`;
/** `tenant:{tid}:project:{pid}`: tasks, bugs and features of a project. */
export const projectRoom = (tenantId: string, projectId: string): string =>
  `tenant:${tenantId}:project:${projectId}`;
/** `tenant:{tid}:channel:{cid}`: messages and typing of a channel. */
export const channelRoom = (tenantId: string, channelId: string): string =>
  `tenant:${tenantId}:channel:${channelId}`;

/** The parts of a room name, or undefined when it is not one of the four shapes. */
export type ParsedRoom =
  | { kind: "user"; userId: string; tenantId?: string }
  | { kind: "tenant"; tenantId: string }
  | { kind: "project"; tenantId: string; projectId: string }
  | { kind: "channel"; tenantId: string; channelId: string };

const ID = "[A-Za-z0-9_.-]+";
const USER = new RegExp(`^user:(${ID})$`);
const TENANT = new RegExp(`^tenant:(${ID})$`);
const SCOPED = new RegExp(`^tenant:(${ID}):(project|channel|user):(${ID})$`);

/** Splits a room name (client side, for routing events; the server is the authority). */
export function parseRoom(room: string): ParsedRoom | undefined {
  let m = USER.exec(room);
  if (m) return { kind: "user", userId: m[1]! };
  m = TENANT.exec(room);
  if (m) return { kind: "tenant", tenantId: m[1]! };
  m = SCOPED.exec(room);
  if (m) {
    if (m[2] === "user") return { kind: "user", tenantId: m[1]!, userId: m[3]! };
    return m[2] === "project"
      ? { kind: "project", tenantId: m[1]!, projectId: m[3]! }
      : { kind: "channel", tenantId: m[1]!, channelId: m[3]! };
  }
  return undefined;
}

/** Reference-counted set of joined rooms, in the order they were first joined. */
export class RoomSet {
  private readonly refs = new Map<string, number>();

  /** Adds a reference; true when the room was not in the set before. */
  add(room: string): boolean {
    const n = this.refs.get(room) ?? 0;
    this.refs.set(room, n + 1);
    return n === 0;
  }

  /** Drops a reference; true when that was the last one and the room left the set. */
  remove(room: string): boolean {
    const n = this.refs.get(room);
    if (n === undefined) return false;
    if (n <= 1) {
      this.refs.delete(room);
      return true;
    }
    this.refs.set(room, n - 1);
    return false;
  }

  /** Removes the room whatever its count (the server refused it); true if it was there. */
  drop(room: string): boolean {
    return this.refs.delete(room);
  }

  has(room: string): boolean {
    return this.refs.has(room);
  }

  /** References held on `room`. */
  count(room: string): number {
    return this.refs.get(room) ?? 0;
  }

  get size(): number {
    return this.refs.size;
  }

  /** The rooms, in first-joined order. */
  list(): string[] {
    return [...this.refs.keys()];
  }
}

/** True when both lists hold the same rooms (order ignored). */
export function sameRooms(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false;
  const set = new Set(a);
  return b.every((r) => set.has(r));
}

/**
 * Which of `candidates` a refusal names. lamplight names the room in its messages
 * (`not allowed in room ROOM: reason`, `invalid room "ROOM": ...`, `invalid since for room ROOM: ...`);
 * matching against the names we sent (longest first, since rooms contain `:`) avoids re-parsing them.
 */
export function roomNamedIn(message: string, candidates: readonly string[]): string | undefined {
  const sorted = [...candidates].sort((a, b) => b.length - a.length);
  for (const room of sorted) {
    if (message.includes(`room ${room}:`) || message.includes(`room ${JSON.stringify(room)}`)) return room;
  }
  for (const room of sorted) {
    if (message.endsWith(`room ${room}`)) return room;
  }
  return undefined;
}
