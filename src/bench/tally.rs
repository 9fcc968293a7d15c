//! What the subscribers saw: per-subscriber sets of delivered sequence numbers (to count loss and
//! duplicates exactly), end-to-end latency histograms and the publisher's acks.
//!
//! A *window* is the measured part of a step, as nanoseconds on the bench's own monotonic clock. Only
//! events whose send time (carried in the event) falls inside it are counted, by the publisher when it
//! sends them and by the subscribers when they arrive, so both sides agree on which events count.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use hdrhistogram::Histogram;

/// Latency histograms per server are sharded by subscriber, so a multi-threaded bench rarely contends.
const SHARDS: usize = 16;
/// Latencies are recorded in microseconds, from 1 µs to 2 minutes, with 3 significant digits.
const MAX_LATENCY_US: u64 = 120_000_000;

pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters and histograms shared by the subscribers, the publisher and the controller.
pub(super) struct Tally {
    base: Instant,
    window_start: AtomicU64,
    window_end: AtomicU64,
    /// Benchmark events received at any time (for cool-down and progress).
    pub(super) received: AtomicU64,
    /// Receipts of in-window events, duplicates included (for the drain and progress).
    pub(super) received_in_window: AtomicU64,
    /// Task events that were not ours or arrived in a room the subscriber does not listen to.
    pub(super) foreign: AtomicU64,
    /// `Reset` messages received.
    pub(super) resets: AtomicU64,
    /// Streams that ended while the bench was running (each subscriber then subscribes again).
    pub(super) disconnects: AtomicU64,
    /// Streams opened again after one ended (storm: the mass reconnect is over when this reaches the
    /// disconnects).
    pub(super) resubscribed: AtomicU64,
    /// Status events (`user.status`, a `PresenceDiff` or a legacy `UserStatus`) received by subscribers,
    /// and the status changes they carried.
    pub(super) status_events: AtomicU64,
    pub(super) status_changes: AtomicU64,
    /// Publishes answered (ok or not) / answered with an error.
    pub(super) acked: AtomicU64,
    pub(super) publish_errors: AtomicU64,
    servers: usize,
    /// `[server * SHARDS + shard]`.
    latency: Vec<Mutex<Histogram<u64>>>,
    ack_latency: Mutex<Histogram<u64>>,
    /// (room, seq) of in-window publishes that failed: nobody should receive them.
    failed: Mutex<Vec<(usize, u64)>>,
    /// The first publish error, for the report.
    pub(super) first_publish_error: Mutex<Option<String>>,
}

impl Tally {
    pub(super) fn new(servers: usize) -> Self {
        Self {
            base: Instant::now(),
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            received: AtomicU64::new(0),
            received_in_window: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            resubscribed: AtomicU64::new(0),
            status_events: AtomicU64::new(0),
            status_changes: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            servers,
            latency: (0..servers * SHARDS)
                .map(|_| Mutex::new(histogram()))
                .collect(),
            ack_latency: Mutex::new(histogram()),
            failed: Mutex::new(Vec::new()),
            first_publish_error: Mutex::new(None),
        }
    }

    /// Nanoseconds on the bench's clock.
    pub(super) fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub(super) fn in_window(&self, sent_ns: u64) -> bool {
        sent_ns >= self.window_start.load(Relaxed) && sent_ns < self.window_end.load(Relaxed)
    }

    /// Clears the step's histograms and counters and opens the window `[start, end)`.
    pub(super) fn open_window(&self, start: u64, end: u64) {
        self.close_window();
        for h in self.latency.iter().chain([&self.ack_latency]) {
            lock(h).reset();
        }
        lock(&self.failed).clear();
        self.received_in_window.store(0, Relaxed);
        self.window_start.store(start, Relaxed);
        self.window_end.store(end, Relaxed);
    }

    /// From now on nothing counts.
    pub(super) fn close_window(&self) {
        self.window_start.store(u64::MAX, Relaxed);
        self.window_end.store(u64::MAX, Relaxed);
    }

    /// A subscriber of `server` received event `seq` sent at `sent_ns`.
    pub(super) fn on_event(
        &self,
        seen: &Mutex<Seen>,
        sub: usize,
        server: usize,
        seq: u64,
        sent_ns: u64,
    ) {
        let now = self.now_ns();
        self.received.fetch_add(1, Relaxed);
        if !self.in_window(sent_ns) {
            return;
        }
        self.received_in_window.fetch_add(1, Relaxed);
        lock(seen).mark(seq);
        let us = (now.saturating_sub(sent_ns) / 1000).clamp(1, MAX_LATENCY_US);
        let slot = server.min(self.servers - 1) * SHARDS + sub % SHARDS;
        let _ = lock(&self.latency[slot]).record(us);
    }

    /// The publish of (`room`, `seq`) sent at `sent_ns` was answered.
    pub(super) fn on_ack(&self, room: usize, seq: u64, sent_ns: u64, ok: bool) {
        let now = self.now_ns();
        self.acked.fetch_add(1, Relaxed);
        if !ok {
            self.publish_errors.fetch_add(1, Relaxed);
        }
        if self.in_window(sent_ns) {
            if !ok {
                lock(&self.failed).push((room, seq));
            }
            let us = (now.saturating_sub(sent_ns) / 1000).clamp(1, MAX_LATENCY_US);
            let _ = lock(&self.ack_latency).record(us);
        }
    }

    /// End-to-end latency of the window, for one server's subscribers or (None) all of them.
    pub(super) fn latency(&self, server: Option<usize>) -> Histogram<u64> {
        let mut merged = histogram();
        for (i, h) in self.latency.iter().enumerate() {
            if server.is_none_or(|s| i / SHARDS == s) {
                let _ = merged.add(&*lock(h));
            }
        }
        merged
    }

    pub(super) fn ack_latency(&self) -> Histogram<u64> {
        lock(&self.ack_latency).clone()
    }

    /// In-window publishes of `room` that failed.
    pub(super) fn failed_in(&self, room: usize) -> u64 {
        lock(&self.failed)
            .iter()
            .filter(|(r, _)| *r == room)
            .count() as u64
    }
}

/// The in-window sequence numbers one subscriber received in its fan-out room.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// Sequence number of bit 0.
    base: u64,
    bits: Vec<u64>,
    duplicates: u64,
}

/// How one subscriber fared in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SeenCount {
    pub(super) distinct: u64,
    pub(super) duplicates: u64,
}

impl Seen {
    /// Forgets everything; sequence numbers start at `base` (the room's next one).
    pub(super) fn reset(&mut self, base: u64) {
        self.base = base;
        self.bits.clear();
        self.duplicates = 0;
    }

    fn mark(&mut self, seq: u64) {
        let Some(offset) = seq.checked_sub(self.base) else {
            return; // sent before this step began: cannot be in its window
        };
        let (word, bit) = ((offset / 64) as usize, offset % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
        } else {
            self.bits[word] |= 1 << bit;
        }
    }

    pub(super) fn count(&self) -> SeenCount {
        SeenCount {
            distinct: self.bits.iter().map(|w| u64::from(w.count_ones())).sum(),
            duplicates: self.duplicates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_and_duplicate_receipts_from_the_base_on() {
        let mut seen = Seen::default();
        seen.reset(100);
        for seq in [100, 101, 101, 99, 300, 200] {
            seen.mark(seq);
        }
        assert_eq!(
            seen.count(),
            SeenCount {
                distinct: 4,
                duplicates: 1
            }
        );
        seen.reset(0);
        assert_eq!(seen.count(), SeenCount::default());
    }

    #[test]
    fn only_the_window_counts() {
        let tally = Tally::new(1);
        let seen = Mutex::new(Seen::default());
        tally.on_event(&seen, 0, 0, 1, 5);
        tally.open_window(10, 20);
        tally.on_event(&seen, 0, 0, 2, 15);
        tally.on_event(&seen, 0, 0, 3, 20);
        assert_eq!(lock(&seen).count().distinct, 1);
        assert_eq!(tally.latency(None).len(), 1);
        assert_eq!(tally.received.load(Relaxed), 3);
    }
}
