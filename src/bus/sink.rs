//! A stream's bounded inbox, fed by the bus.
//!
//! Each `Subscribe` stream owns one [`SinkReceiver`]; the bus holds a [`Sink`] per room the stream joined.
//! Offering never waits: when the inbox is full (in items, or in bytes: the events' encoded size) the sink
//! is marked *overflowed*, later offers are refused, and the stream ends with `RESOURCE_EXHAUSTED` once it
//! notices. That bounds memory per stream and keeps a slow client from slowing the publisher or anyone
//! else. One item is always accepted into an empty inbox, whatever its size, so an event of the largest
//! size allowed never ends a stream by itself.
//!
//! Fan-out is the hot path, so the inbox is a plain queue under a lock that is rarely contended (the bus
//! offers, the stream takes): an offer to an inbox that already holds items does not wake the stream again,
//! and the stream takes everything queued at once, with one lock per batch rather than per item. A new
//! inbox holds no buffer, a stream gives back the buffer a burst grew when it runs dry, and an idle one
//! gives back the rest at its heartbeat ([`SinkReceiver::release_idle`]).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use super::RoomItem;
use crate::metrics::EVENTS_DROPPED;

/// Buffer capacity (items) a stream keeps once it ran dry; a larger one, grown by a burst, is released.
const KEEP_CAPACITY: usize = 32;

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// The stream's task, woken by the first offer into an empty inbox, an overflow, or the last sink.
    waker: AtomicWaker,
    overflowed: AtomicBool,
    /// Live [`Sink`] handles.
    senders: AtomicUsize,
    capacity: usize,
    /// Most bytes queued (see [`item_bytes`]).
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<RoomItem>,
    /// Sum of [`item_bytes`] over `items`.
    bytes: usize,
    receiver_gone: bool,
}

/// What an item weighs against the inbox's byte bound: an event's encoded response (shared with the
/// other streams, but kept alive by this queue), a fixed estimate for a `Reset`.
fn item_bytes(item: &RoomItem) -> usize {
    match item {
        RoomItem::Event(event) => event.frame.as_slice().len(),
        RoomItem::Reset { room, reason } => 64 + room.len() + reason.len(),
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bus's handle to a stream's inbox. Cheap to clone.
#[derive(Debug)]
pub struct Sink {
    shared: Arc<Shared>,
}

/// The stream's end of its inbox.
#[derive(Debug)]
pub struct SinkReceiver {
    shared: Arc<Shared>,
    /// Items taken from the inbox in one go, not yet handed out.
    batch: VecDeque<RoomItem>,
}

/// A new inbox holding at most `capacity` items.
pub fn sink(capacity: usize) -> (Sink, SinkReceiver) {
    sink_with_bytes(capacity, usize::MAX)
}

/// A new inbox holding at most `capacity` items and `max_bytes` bytes (one item always fits).
pub fn sink_with_bytes(capacity: usize, max_bytes: usize) -> (Sink, SinkReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        waker: AtomicWaker::new(),
        overflowed: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
        capacity: capacity.max(1),
        max_bytes,
    });
    (
        Sink {
            shared: shared.clone(),
        },
        SinkReceiver {
            shared,
            batch: VecDeque::new(),
        },
    )
}

impl Sink {
    /// Queues `item` without waiting. Returns false when the stream is gone or has overflowed: the caller
    /// should stop offering to it.
    pub fn offer(&self, item: RoomItem) -> bool {
        let shared = &self.shared;
        if shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let mut queue = shared.queue();
        if queue.receiver_gone {
            drop(queue);
            metrics::counter!(EVENTS_DROPPED, "reason" => "stream_closed").increment(1);
            return false;
        }
        let size = item_bytes(&item);
        let too_many = queue.items.len() >= shared.capacity;
        let too_big =
            !queue.items.is_empty() && queue.bytes.saturating_add(size) > shared.max_bytes;
        if too_many || too_big {
            shared.overflowed.store(true, Ordering::Relaxed);
            drop(queue);
            metrics::counter!(EVENTS_DROPPED, "reason" => "slow_consumer").increment(1);
            shared.waker.wake();
            return false;
        }
        queue.items.push_back(item);
        queue.bytes += size;
        // Only the first item needs a wake-up: the stream takes everything queued when it runs.
        let first = queue.items.len() == 1;
        drop(queue);
        if first {
            shared.waker.wake();
        }
        true
    }

    /// True when both handles belong to the same inbox.
    pub fn same_as(&self, other: &Sink) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Clone for Sink {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.waker.wake();
        }
    }
}

impl SinkReceiver {
    /// The next item, or `None` once the inbox overflowed (the stream must end) or every sink is gone.
    pub async fn recv(&mut self) -> Option<RoomItem> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`SinkReceiver::recv`] as a poll function.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<RoomItem>> {
        if self.overflowed() {
            return Poll::Ready(None);
        }
        if let Some(item) = self.batch.pop_front() {
            return Poll::Ready(Some(item));
        }
        // Register before looking, so an offer between the look and the registration still wakes us.
        self.shared.waker.register(cx.waker());
        if self.refill() {
            return Poll::Ready(self.batch.pop_front());
        }
        if self.overflowed() || self.shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        if self.batch.capacity() > KEEP_CAPACITY {
            self.batch = VecDeque::new();
        }
        Poll::Pending
    }

    /// The next item if one is queued right now (`None` also once overflowed).
    pub fn try_recv(&mut self) -> Option<RoomItem> {
        if self.overflowed() {
            return None;
        }
        if self.batch.is_empty() {
            self.refill();
        }
        self.batch.pop_front()
    }

    /// Gives back both buffers if the inbox is empty, so that an idle stream holds none: the stream
    /// calls this at its heartbeat. (Running dry keeps up to [`KEEP_CAPACITY`] items of buffer, so that a
    /// stream fed steadily does not allocate per event.)
    pub fn release_idle(&mut self) {
        if !self.batch.is_empty() {
            return;
        }
        self.batch = VecDeque::new();
        let mut queue = self.shared.queue();
        if queue.items.is_empty() {
            queue.items = VecDeque::new();
        }
    }

    /// True once an offer found the inbox full.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// Takes everything queued into `batch` (which is empty). False when nothing was queued.
    fn refill(&mut self) -> bool {
        let mut queue = self.shared.queue();
        if queue.items.is_empty() {
            return false;
        }
        std::mem::swap(&mut queue.items, &mut self.batch);
        queue.bytes = 0;
        true
    }
}

impl Drop for SinkReceiver {
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        queue.receiver_gone = true;
        // Release the queued events now rather than when the last room lets go of the sink.
        queue.items = VecDeque::new();
        queue.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset(n: usize) -> RoomItem {
        RoomItem::Reset {
            room: "r".into(),
            reason: n.to_string().into(),
        }
    }

    fn reason(item: Option<RoomItem>) -> Option<String> {
        match item {
            Some(RoomItem::Reset { reason, .. }) => Some(reason.to_string()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn overflow_is_sticky_and_ends_the_receiver() {
        let (tx, mut rx) = sink(2);
        assert!(tx.offer(reset(1)));
        assert!(tx.offer(reset(2)));
        assert!(!tx.offer(reset(3)), "third item overflows");
        assert!(!tx.offer(reset(4)), "and later offers are refused");
        assert!(rx.overflowed());
        assert!(rx.recv().await.is_none());
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn the_byte_bound_overflows_but_an_empty_inbox_takes_any_item() {
        let (tx, mut rx) = sink_with_bytes(100, 150);
        let item = || RoomItem::Reset {
            room: "r".into(),
            reason: "x".repeat(100).into(),
        };
        assert!(tx.offer(item()), "165 bytes into an empty inbox");
        assert!(rx.recv().await.is_some());
        assert!(tx.offer(item()), "empty again once taken");
        assert!(!tx.offer(item()), "a second one exceeds 150 bytes");
        assert!(rx.overflowed());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn an_idle_inbox_gives_back_its_buffers_and_a_busy_one_keeps_its_items() {
        let (tx, mut rx) = sink(8);
        assert!(tx.offer(reset(1)));
        assert!(rx.recv().await.is_some());
        assert!(tx.offer(reset(2)));
        assert!(rx.recv().await.is_some());
        let held = rx.batch.capacity() + rx.shared.queue().items.capacity();
        assert!(held > 0, "running dry keeps the buffers a burst grew");
        rx.release_idle();
        assert_eq!(rx.batch.capacity(), 0);
        assert_eq!(rx.shared.queue().items.capacity(), 0);
        // Items queued at the heartbeat stay, in order.
        assert!(tx.offer(reset(3)));
        assert!(tx.offer(reset(4)));
        assert_eq!(reason(rx.try_recv()).as_deref(), Some("3"));
        rx.release_idle();
        assert!(tx.offer(reset(5)));
        rx.release_idle();
        assert_eq!(reason(rx.recv().await).as_deref(), Some("4"));
        assert_eq!(reason(rx.recv().await).as_deref(), Some("5"));
    }

    #[tokio::test]
    async fn closed_receiver_refuses_offers() {
        let (tx, rx) = sink(2);
        drop(rx);
        assert!(!tx.offer(reset(1)));
    }

    #[tokio::test]
    async fn items_come_out_in_order_across_batches_and_the_last_sink_ends_the_receiver() {
        let (tx, mut rx) = sink(8);
        let other = tx.clone();
        for n in 0..3 {
            assert!(tx.offer(reset(n)));
        }
        assert_eq!(reason(rx.try_recv()).as_deref(), Some("0"));
        assert!(
            other.offer(reset(3)),
            "offered while the receiver holds a batch"
        );
        for n in 1..4 {
            assert_eq!(reason(rx.recv().await), Some(n.to_string()));
        }
        assert!(rx.try_recv().is_none());
        drop(tx);
        drop(other);
        assert!(rx.recv().await.is_none(), "every sink is gone");
    }

    #[tokio::test]
    async fn an_offer_wakes_a_waiting_receiver() {
        let (tx, mut rx) = sink(4);
        let waiting = tokio::spawn(async move { reason(rx.recv().await) });
        tokio::task::yield_now().await;
        assert!(tx.offer(reset(7)));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken within 5 s")
            .expect("task");
        assert_eq!(got.as_deref(), Some("7"));
    }
}
