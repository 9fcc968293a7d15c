/**
 * User statuses: the server publishes ONLINE/OFFLINE changes of a tenant's users to `tenant:{tid}` as
 * `user.status` events carrying a `PresenceDiff` (every change one node decided in one window, at most
 * one entry per user; the ids of each list packed in one "\n"-separated string). Apply them to the
 * online set `getPresence` returned instead of refetching it.
 */

import { UserStatus_Status, type Event } from "./gen/lamplight/v1/events_pb.js";

/** One change: `userId` came online (`online: true`) or went offline. */
export interface StatusChange {
  userId: string;
  online: boolean;
}

/**
 * The status changes `event` carries: those of a `PresenceDiff`, or the single one of a `UserStatus`
 * (the older shape of the contract); empty for any other event.
 */
export function statusChanges(event: Event): StatusChange[] {
  const p = event.payload;
  const out: StatusChange[] = [];
  if (p.case === "presenceDiff") {
    for (const userId of packedIds(p.value.online)) out.push({ userId, online: true });
    for (const userId of packedIds(p.value.offline)) out.push({ userId, online: false });
  } else if (p.case === "userStatus") {
    const c = p.value;
    if (c.status === UserStatus_Status.ONLINE) out.push({ userId: c.userId, online: true });
    else if (c.status === UserStatus_Status.OFFLINE) out.push({ userId: c.userId, online: false });
  }
  return out;
}

/** The ids of one packed `PresenceDiff` list ("" is none). */
export function packedIds(list: string): string[] {
  return list === "" ? [] : list.split("\n").filter((id) => id !== "");
}

/** `userIds` (sorted) with `changes` applied, sorted; the same array when nothing changed. */
export function applyStatusChanges(userIds: readonly string[], changes: readonly StatusChange[]): readonly string[] {
  const ids = new Set(userIds);
  let changed = false;
  for (const { userId, online } of changes) {
    if (online && !ids.has(userId)) {
      ids.add(userId);
      changed = true;
    } else if (!online && ids.delete(userId)) {
      changed = true;
    }
  }
  return changed ? [...ids].sort() : userIds;
}
