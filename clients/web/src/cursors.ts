/**
 * Per-room resume positions and duplicate suppression.
 *
 * The cursor of a room is the id of the last *durable* event the app was given (typing and user-status
 * events are ephemeral: never replayed, so never a cursor). It is sent back as `since` whenever the stream
 * is re-opened (reconnect, join, leave), and the server replays what came after it.
 *
 * A room's position only ever moves forward. Ids of one room's history are ordered ({@link compareEventIds}
 * reads both buses' formats): an event not newer than the last one delivered in its room is dropped (a
 * duplicate while the client switches streams, or an ephemeral event queued before newer stored ones),
 * and neither an event nor a `Subscribed` position older than the cursor moves it back, so a re-open
 * never asks for events already delivered. An id of another epoch is a new history of the room and is
 * taken as it comes. Ids the client cannot read stay opaque: for them, duplicates are found by remembering
 * the last `window` ids per room, and the latest one is the cursor.
 */

import type { RoomPosition } from "./gen/lamplight/v1/events_pb.js";
import { compareEventIds, movesForward } from "./ids.js";

/** Ids remembered per room for duplicate suppression. */
export const DEFAULT_DEDUPE_WINDOW = 2048;

interface Seen {
  ids: Set<string>;
  order: string[];
}

/** What {@link CursorTracker.accept} needs to know about an event. */
export interface EventRef {
  room: string;
  id: string;
  /** Ephemeral events (typing, user status) are deduplicated but never become the cursor. */
  ephemeral: boolean;
}

/** Tracks, per room, the last event id seen and the recent ids (to drop duplicates). */
export class CursorTracker {
  /** The resume position (durable events and server positions only). */
  private readonly last = new Map<string, string>();
  /** The newest id delivered (ephemeral events too) or announced by a non-recovered `Subscribed`. */
  private readonly delivered = new Map<string, string>();
  private readonly seen = new Map<string, Seen>();

  constructor(private readonly window: number = DEFAULT_DEDUPE_WINDOW) {}

  /**
   * The first message of a stream. A room keeps its own cursor when the server recovered from it (the
   * replay follows); otherwise (no cursor sent, or a `Reset` follows) the server's position becomes the
   * cursor, so the next re-open resumes from there; but never a position older than (or the same as)
   * the cursor in the same epoch.
   */
  onSubscribed(positions: readonly Pick<RoomPosition, "room" | "lastEventId" | "recovered">[]): void {
    for (const p of positions) {
      if (!p.lastEventId) continue;
      if (p.recovered && this.last.has(p.room)) continue;
      this.advance(this.last, p.room, p.lastEventId);
      // Nothing at or before the position follows on this stream (a recovered room's replay does).
      this.advance(this.delivered, p.room, p.lastEventId);
    }
  }

  /**
   * Records an event; false if it was already delivered (drop it). Events without an id (never sent by
   * lamplight) are passed through.
   */
  accept(event: EventRef): boolean {
    if (!event.id) return true;
    const newest = this.delivered.get(event.room);
    const order = newest === undefined ? undefined : compareEventIds(event.id, newest);
    if (order !== undefined && order <= 0) return false;
    let seen = this.seen.get(event.room);
    if (!seen) {
      seen = { ids: new Set(), order: [] };
      this.seen.set(event.room, seen);
    }
    if (seen.ids.has(event.id)) return false;
    seen.ids.add(event.id);
    seen.order.push(event.id);
    if (seen.order.length > this.window) {
      const old = seen.order.splice(0, seen.order.length - this.window);
      for (const id of old) seen.ids.delete(id);
    }
    this.delivered.set(event.room, event.id);
    if (!event.ephemeral) this.advance(this.last, event.room, event.id);
    return true;
  }

  /** Sets `map[room]` to `id` unless that would move the room back within its epoch. */
  private advance(map: Map<string, string>, room: string, id: string): void {
    if (movesForward(map.get(room), id)) map.set(room, id);
  }

  /**
   * Adopts positions the server reported (e.g. in `lamplight-resume-since`) for rooms without a cursor:
   * a room that has one keeps it (what the client received is what it resumes from), so a trailer can
   * never move a cursor back.
   */
  adoptMissing(positions: Readonly<Record<string, string>>): void {
    for (const [room, id] of Object.entries(positions)) {
      if (id && !this.last.has(room)) this.last.set(room, id);
    }
  }

  /** `since` for a Subscribe of `rooms`: only rooms with a cursor. */
  since(rooms: Iterable<string>): Record<string, string> {
    const out: Record<string, string> = {};
    for (const room of rooms) {
      const id = this.last.get(room);
      if (id) out[room] = id;
    }
    return out;
  }

  /** The cursor of one room. */
  get(room: string): string | undefined {
    return this.last.get(room);
  }

  /** Forgets a room (after `leave`, or when the server refused its cursor). */
  forget(room: string): void {
    this.last.delete(room);
    this.delivered.delete(room);
    this.seen.delete(room);
  }

  /** Every cursor, for inspection. */
  snapshot(): Record<string, string> {
    return Object.fromEntries(this.last);
  }
}
