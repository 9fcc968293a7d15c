//! A stream's bounded inbox, fed by the bus.
//!
//! Each `Subscribe` stream owns one [`SinkReceiver`]; the bus holds a [`Sink`] per room the stream joined.
//! Offering never waits: when the inbox is full the sink is marked *overflowed*, later offers are refused,
//! and the stream ends with `RESOURCE_EXHAUSTED` once it notices. That bounds memory per stream and keeps
//! a slow client from slowing the publisher or anyone else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::RoomItem;
use crate::metrics::EVENTS_DROPPED;

#[derive(Debug, Default)]
struct Shared {
    overflowed: AtomicBool,
}

/// The bus's handle to a stream's inbox. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Sink {
    tx: mpsc::Sender<RoomItem>,
    shared: Arc<Shared>,
}

/// The stream's end of its inbox.
#[derive(Debug)]
pub struct SinkReceiver {
    rx: mpsc::Receiver<RoomItem>,
    shared: Arc<Shared>,
}

/// A new inbox holding at most `capacity` items.
pub fn sink(capacity: usize) -> (Sink, SinkReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared::default());
    (
        Sink {
            tx,
            shared: shared.clone(),
        },
        SinkReceiver { rx, shared },
    )
}

impl Sink {
    /// Queues `item` without waiting. Returns false when the stream is gone or has overflowed: the caller
    /// should stop offering to it.
    pub fn offer(&self, item: RoomItem) -> bool {
        if self.shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.overflowed.store(true, Ordering::Relaxed);
                metrics::counter!(EVENTS_DROPPED, "reason" => "slow_consumer").increment(1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!(EVENTS_DROPPED, "reason" => "stream_closed").increment(1);
                false
            }
        }
    }

    /// True when both handles belong to the same inbox.
    pub fn same_as(&self, other: &Sink) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl SinkReceiver {
    /// The next item, or `None` once the inbox overflowed (the stream must end) or every sink is gone.
    pub async fn recv(&mut self) -> Option<RoomItem> {
        if self.overflowed() {
            return None;
        }
        let item = self.rx.recv().await;
        if self.overflowed() {
            return None;
        }
        item
    }

    /// The next item if one is queued right now (`None` also once overflowed).
    pub fn try_recv(&mut self) -> Option<RoomItem> {
        if self.overflowed() {
            return None;
        }
        self.rx.try_recv().ok()
    }

    /// True once an offer found the inbox full.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
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

    #[tokio::test]
    async fn overflow_is_sticky_and_ends_the_receiver() {
        let (tx, mut rx) = sink(2);
        assert!(tx.offer(reset(1)));
        assert!(tx.offer(reset(2)));
        assert!(!tx.offer(reset(3)), "third item overflows");
        assert!(!tx.offer(reset(4)), "and later offers are refused");
        assert!(rx.overflowed());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn closed_receiver_refuses_offers() {
        let (tx, rx) = sink(2);
        drop(rx);
        assert!(!tx.offer(reset(1)));
    }
}
