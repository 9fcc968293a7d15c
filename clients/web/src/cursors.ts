/**
 * Per-room resume positions and duplicate suppression.
 *
 * The cursor of a room is the id of the last *durable* event the app was given (typing and user-status
 * events are ephemeral: never replayed, so never a cursor). It is sent back as `since` whenever the stream
 * is re-opened (reconnect, join, leave), and the server replays what came after it.
 *
 * Ids are opaque strings (their format differs between buses), so duplicates are found by remembering
 * the last `window` ids per room rather than by comparing ids. Duplicates can legitimately arrive while
 * the client switches streams: the new stream replays from the cursor it was opened with, while the old
 * one was still delivering.
 */

import type { RoomPosition } from "./gen/lamplight/v1/events_pb.js";

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
  private readonly last = new Map<string, string>();
  private readonly seen = new Map<string, Seen>();

  constructor(private readonly window: number = DEFAULT_DEDUPE_WINDOW) {}

  /**
   * The first message of a stream. A room keeps its own cursor when the server recovered from it (the
   * replay follows); otherwise (no cursor sent, or a `Reset` follows) the server's position becomes the
   * cursor, so the next re-open resumes from there.
   */
  onSubscribed(positions: readonly Pick<RoomPosition, "room" | "lastEventId" | "recovered">[]): void {
    for (const p of positions) {
      if (!p.lastEventId) continue;
      if (!p.recovered || !this.last.has(p.room)) this.last.set(p.room, p.lastEventId);
    }
  }

  /**
   * Records an event; false if it was already delivered (drop it). Events without an id (never sent by
   * lamplight) are passed through.
   */
  accept(event: EventRef): boolean {
    if (!event.id) return true;
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
    if (!event.ephemeral) this.last.set(event.room, event.id);
    return true;
  }

  /** Adopts positions the server reported (e.g. in `lamplight-resume-since`) for rooms without a cursor. */
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
    this.seen.delete(room);
  }

  /** Every cursor, for inspection. */
  snapshot(): Record<string, string> {
    return Object.fromEntries(this.last);
  }
}
