/**
 * How lamplight's event ids order within a room, so a room's position only ever moves forward.
 *
 * The proto promises strictly increasing ids per room, but says nothing of their format; the client reads
 * the two formats lamplight's buses issue (and treats anything else as opaque, i.e. not comparable):
 *
 * - Redis bus (`src/bus/redis/ids.rs`): `{epoch}:{ms}-{seq}` for a stored event (the Redis stream entry
 *   id), `{epoch}:{ms}-{seq}.{n}` for the n-th ephemeral event (typing, status) after that entry; `n` comes
 *   from an atomic per-room counter (from 1, reset by every stored event), so the order is (ms, seq, n)
 *   with a stored event at n = 0. A room without history is at `{epoch}:0-0`.
 * - Memory bus (`src/bus/memory.rs`): `{epoch}-{n}`, `n` from one counter of the server process.
 *
 * The epoch names one history of the room (a Redis room recreated after a flush or expiry, a restarted
 * memory-bus server). Ids of different epochs do not compare: a new epoch is a new history, not an older
 * or newer position in the old one.
 */

/** A parsed event id: its epoch, and a key that orders ids of that epoch. */
interface ParsedId {
  /** `redis` and `memory` ids never compare with each other. */
  bus: "redis" | "memory";
  epoch: string;
  /** Compared element by element. */
  key: bigint[];
}

const DIGITS = /^[0-9]{1,20}$/;
const REDIS_EPOCH = /^[0-9a-z]{1,32}$/;
const MEMORY_EPOCH = /^[0-9A-Za-z]+$/;

function parseId(id: string): ParsedId | undefined {
  const colon = id.indexOf(":");
  if (colon >= 0) {
    const epoch = id.slice(0, colon);
    if (!REDIS_EPOCH.test(epoch)) return undefined;
    const rest = id.slice(colon + 1);
    const dot = rest.indexOf(".");
    const stream = dot >= 0 ? rest.slice(0, dot) : rest;
    const n = dot >= 0 ? rest.slice(dot + 1) : "0";
    const dash = stream.indexOf("-");
    if (dash < 0) return undefined;
    const ms = stream.slice(0, dash);
    const seq = stream.slice(dash + 1);
    if (!DIGITS.test(ms) || !DIGITS.test(seq) || !DIGITS.test(n)) return undefined;
    return { bus: "redis", epoch, key: [BigInt(ms), BigInt(seq), BigInt(n)] };
  }
  const dash = id.lastIndexOf("-");
  if (dash < 0) return undefined;
  const epoch = id.slice(0, dash);
  const n = id.slice(dash + 1);
  if (!MEMORY_EPOCH.test(epoch) || !DIGITS.test(n)) return undefined;
  return { bus: "memory", epoch, key: [BigInt(n)] };
}

/**
 * Orders two event ids of one room: negative when `a` is older than `b`, 0 when they are the same
 * position, positive when `a` is newer. `undefined` when they do not compare: different epochs (another
 * history of the room) or a format this client does not know.
 */
export function compareEventIds(a: string, b: string): number | undefined {
  const pa = parseId(a);
  const pb = parseId(b);
  if (!pa || !pb || pa.bus !== pb.bus || pa.epoch !== pb.epoch) return undefined;
  for (let i = 0; i < pa.key.length; i++) {
    const x = pa.key[i]!;
    const y = pb.key[i]!;
    if (x !== y) return x < y ? -1 : 1;
  }
  return 0;
}

/**
 * Whether a room's position may move from `current` to `next`: always from nothing, never back or in
 * place within one epoch, and always to another epoch (or to an id that cannot be compared, as an opaque
 * id was treated before ids were compared).
 */
export function movesForward(current: string | undefined, next: string): boolean {
  if (!next) return false;
  if (current === undefined || current === "") return true;
  const order = compareEventIds(next, current);
  return order === undefined || order > 0;
}
