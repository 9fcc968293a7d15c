/**
 * Reconnection delays: exponential backoff with jitter, capped, reset after a healthy period.
 *
 * Delay `n` (from 0) is `min(maxMs, initialMs * factor^n)`, then shortened by a random fraction of up to
 * `jitter` of itself, so a crowd of clients that lost the same server does not come back in lock step.
 * The cap is the seed's figure (30 s). The client calls {@link Backoff.reset} once a stream has stayed
 * up for `healthyAfterMs`, so one blip after hours of uptime starts again from `initialMs`.
 */

/** How reconnection delays grow. */
export interface BackoffOptions {
  /** First delay, in ms. */
  initialMs: number;
  /** Largest delay, in ms (jitter only ever shortens a delay, so this is a hard cap). */
  maxMs: number;
  /** Growth per attempt. */
  factor: number;
  /** Fraction (0..1) of each delay that is randomised away. */
  jitter: number;
  /** A stream that stays up this long resets the backoff (and the auth-failure count). */
  healthyAfterMs: number;
}

/** Defaults: 0.5 s, 1 s, 2 s, ... up to 30 s, each shortened by up to half; healthy after 10 s. */
export const DEFAULT_BACKOFF: Readonly<BackoffOptions> = Object.freeze({
  initialMs: 500,
  maxMs: 30_000,
  factor: 2,
  jitter: 0.5,
  healthyAfterMs: 10_000,
});

/** Successive reconnection delays. `random` is injectable so tests can pin the jitter. */
export class Backoff {
  readonly options: Readonly<BackoffOptions>;
  private attempt = 0;

  constructor(options: Partial<BackoffOptions> = {}, private readonly random: () => number = Math.random) {
    const o = { ...DEFAULT_BACKOFF, ...options };
    if (!(o.initialMs >= 0) || !(o.maxMs >= o.initialMs) || !(o.factor >= 1) || !(o.jitter >= 0 && o.jitter <= 1)) {
      throw new RangeError(`invalid backoff options ${JSON.stringify(o)}`);
    }
    this.options = Object.freeze(o);
  }

  /** Attempts made since the last reset. */
  get attempts(): number {
    return this.attempt;
  }

  /** The delay before the next attempt, in ms; counts the attempt. */
  next(): number {
    const { initialMs, maxMs, factor, jitter } = this.options;
    // Cap the exponent too, so a long outage cannot overflow to Infinity.
    const base = Math.min(maxMs, initialMs * Math.pow(factor, Math.min(this.attempt, 64)));
    this.attempt += 1;
    const r = Math.min(Math.max(this.random(), 0), 1);
    return Math.round(base * (1 - jitter * r));
  }

  /** Back to the first delay. */
  reset(): void {
    this.attempt = 0;
  }
}
