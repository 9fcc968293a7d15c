//! Ends streams the server cannot write to.
//!
//! A stream ends itself (token expiry, slow consumer, shutdown) only when the transport polls it, and hyper
//! polls a response body only when it can send what it already has: a client that withholds HTTP/2
//! flow-control window (or stops reading its socket) freezes its stream, which would then stay open, and
//! in presence, for as long as the client answers PINGs.
//!
//! One task per node looks at every open stream once per tick (a few atomic loads each; no task or timer
//! per stream). Each stream is wrapped in [`Tracked`], which counts the transport's polls and notes when
//! the stream has something to send (it was woken, or it handed out an item the transport has not come
//! back after). A stream is ended from outside when
//! - it had something to send and was not polled for `--stream-stall-secs` (*stalled*), or
//! - it is still open [`OUTSIDE_END_GRACE`] after its token expired (it would have ended itself if it
//!   could).
//!
//! Ending it from outside means closing its connection ([`ConnectionHandle::close`]): the connection's
//! other streams, which can still be written, end by themselves with their resume position; the frozen one
//! ends with its own reason if it gets polled again; after a short grace the connection is dropped, which
//! drops every stream on it and with them their presence, leases and counters. Closing the whole connection
//! is the only handle hyper gives on a stream it does not poll; a client that keeps one stream unread while
//! using others on the same connection loses those too (they end with `UNAVAILABLE` and a resume position).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::Stream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::StreamEnd;

/// How long after its token's expiry a stream that did not end by itself is ended from outside.
pub const OUTSIDE_END_GRACE: Duration = Duration::from_secs(3);

/// One accepted connection, as the service sees it (in the request extensions).
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    id: u64,
    closing: CancellationToken,
}

impl ConnectionHandle {
    /// A handle whose token is cancelled when the connection closes: the server's shutdown token's child.
    pub fn new(id: u64, closing: CancellationToken) -> Self {
        Self { id, closing }
    }

    /// Unique per connection on this node.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancelled when the server closes this connection (shutdown, or a stalled stream on it). Streams on
    /// the connection watch it and end with their resume position.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Asks the connection to close: GOAWAY, then dropped after a short grace.
    pub fn close(&self) {
        self.closing.cancel();
    }
}

const VERDICT_NONE: u8 = 0;
const VERDICT_STALLED: u8 = 1;
const VERDICT_EXPIRED: u8 = 2;

/// What the watchdog knows about one open stream.
#[derive(Debug)]
pub(crate) struct Watched {
    /// Polls by the transport.
    polls: AtomicU64,
    /// The stream has something to send: it was woken, or it handed out an item, since it was last polled.
    wanted: AtomicBool,
    /// The transport's waker, woken with ours.
    parent: AtomicWaker,
    /// When the token stops being accepted (`exp` + leeway).
    expires: Instant,
    connection: Option<ConnectionHandle>,
    verdict: AtomicU8,
}

impl Watched {
    /// Why the watchdog ended this stream, if it did.
    pub(crate) fn verdict(&self) -> Option<StreamEnd> {
        match self.verdict.load(Ordering::Acquire) {
            VERDICT_STALLED => Some(StreamEnd::Stalled),
            VERDICT_EXPIRED => Some(StreamEnd::TokenExpired),
            _ => None,
        }
    }
}

impl Wake for Watched {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wanted.store(true, Ordering::Relaxed);
        self.parent.wake();
    }
}

#[derive(Debug, Default)]
struct Registry {
    streams: Mutex<HashMap<u64, Arc<Watched>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn streams(&self) -> MutexGuard<'_, HashMap<u64, Arc<Watched>>> {
        // Nothing panics while holding it.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The per-node watchdog. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Watchdog {
    registry: Arc<Registry>,
}

impl Watchdog {
    /// Starts the watchdog task (in the current tokio runtime) for streams stalled for `stall`; it stops
    /// when `shutdown` is cancelled or every handle is dropped.
    pub(crate) fn start(stall: Duration, shutdown: CancellationToken) -> Self {
        let registry = Arc::new(Registry::default());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(watch(Arc::downgrade(&registry), stall, shutdown));
        }
        Self { registry }
    }

    /// Registers a stream whose token expires at `expires`, on `connection`. The watchdog sees it until
    /// the [`Ticket`] (or the [`Tracked`] stream it wraps) is dropped.
    pub(crate) fn register(
        &self,
        expires: Instant,
        connection: Option<ConnectionHandle>,
    ) -> Ticket {
        let watched = Arc::new(Watched {
            polls: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
            parent: AtomicWaker::new(),
            expires,
            connection,
            verdict: AtomicU8::new(VERDICT_NONE),
        });
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        self.registry.streams().insert(id, watched.clone());
        Ticket {
            watched,
            registration: Registration {
                registry: self.registry.clone(),
                id,
            },
        }
    }
}

/// A registered stream, before its stream is wrapped.
#[derive(Debug)]
pub(crate) struct Ticket {
    watched: Arc<Watched>,
    registration: Registration,
}

impl Ticket {
    /// What the watchdog knows about this stream (e.g. why it ended it).
    pub(crate) fn watched(&self) -> Arc<Watched> {
        self.watched.clone()
    }

    /// Wraps `stream`, which the watchdog then sees until it is dropped.
    pub(crate) fn wrap<S>(self, stream: S) -> Tracked<S> {
        Tracked {
            inner: stream,
            waker: Waker::from(self.watched.clone()),
            watched: self.watched,
            _registration: self.registration,
        }
    }
}

/// Removes a stream from the registry when it is dropped.
#[derive(Debug)]
struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.streams().remove(&self.id);
    }
}

/// A stream the watchdog sees: counts polls and notes when it has something to send.
pub(crate) struct Tracked<S> {
    inner: S,
    watched: Arc<Watched>,
    /// Our waker (wraps the transport's), handed to the inner stream.
    waker: Waker,
    /// Held for its drop.
    _registration: Registration,
}

impl<S: Stream + Unpin> Stream for Tracked<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let watched = &this.watched;
        watched.parent.register(cx.waker());
        watched.wanted.store(false, Ordering::Relaxed);
        watched.polls.fetch_add(1, Ordering::Relaxed);
        let mut inner_cx = Context::from_waker(&this.waker);
        let polled = Pin::new(&mut this.inner).poll_next(&mut inner_cx);
        if let Poll::Ready(Some(_)) = &polled {
            // Until the transport comes back for more, that item may be waiting for window.
            watched.wanted.store(true, Ordering::Relaxed);
        }
        polled
    }
}

/// The watchdog's own view of one stream between ticks.
struct Seen {
    polls: u64,
    /// First tick at which it had something to send and had not been polled since the tick before.
    blocked_since: Option<Instant>,
}

async fn watch(registry: Weak<Registry>, stall: Duration, shutdown: CancellationToken) {
    let tick = (stall / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    let mut to_close: Vec<(Arc<Watched>, u8)> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let now = Instant::now();
        {
            let streams = registry.streams();
            seen.retain(|id, _| streams.contains_key(id));
            for (id, watched) in streams.iter() {
                if watched.verdict.load(Ordering::Relaxed) != VERDICT_NONE {
                    continue;
                }
                let polls = watched.polls.load(Ordering::Relaxed);
                let wanted = watched.wanted.load(Ordering::Relaxed);
                let entry = seen.entry(*id).or_insert(Seen {
                    polls,
                    blocked_since: None,
                });
                if polls != entry.polls || !wanted {
                    entry.polls = polls;
                    entry.blocked_since = None;
                } else if entry.blocked_since.is_none() {
                    entry.blocked_since = Some(now);
                }
                let stalled = entry
                    .blocked_since
                    .is_some_and(|since| now.duration_since(since) >= stall);
                if now >= watched.expires + OUTSIDE_END_GRACE {
                    to_close.push((watched.clone(), VERDICT_EXPIRED));
                } else if stalled {
                    to_close.push((watched.clone(), VERDICT_STALLED));
                }
            }
        }
        drop(registry);
        for (watched, verdict) in to_close.drain(..) {
            watched.verdict.store(verdict, Ordering::Release);
            let reason = if verdict == VERDICT_STALLED {
                "stalled"
            } else {
                "token_expired"
            };
            metrics::counter!(crate::metrics::CONNECTIONS_CLOSED_BY_WATCHDOG, "reason" => reason)
                .increment(1);
            match &watched.connection {
                Some(connection) => {
                    tracing::info!(
                        connection = connection.id(),
                        reason,
                        "closing a connection whose stream cannot be written"
                    );
                    connection.close();
                }
                None => {
                    tracing::warn!(reason, "a frozen stream has no connection handle to close")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt as _, StreamExt as _};

    fn connection(id: u64) -> ConnectionHandle {
        ConnectionHandle::new(id, CancellationToken::new())
    }

    #[tokio::test(start_paused = true)]
    async fn frozen_streams_get_their_connection_closed_and_idle_or_read_ones_do_not() {
        let shutdown = CancellationToken::new();
        let dog = Watchdog::start(Duration::from_secs(2), shutdown.clone());
        let far = Instant::now() + Duration::from_secs(3600);

        // Idle: nothing to send, never woken.
        let idle_conn = connection(1);
        let mut idle = dog
            .register(far, Some(idle_conn.clone()))
            .wrap(futures::stream::pending::<u32>());
        assert!(idle.next().now_or_never().is_none());

        // Handed out an item and was never polled again (no window for it).
        let frozen_conn = connection(2);
        let frozen_ticket = dog.register(far, Some(frozen_conn.clone()));
        let frozen_watched = frozen_ticket.watched();
        let mut frozen = frozen_ticket.wrap(futures::stream::iter([1u32, 2, 3]));
        assert_eq!(frozen.next().now_or_never(), Some(Some(1)));

        // Woken by a new item while waiting, and never polled again.
        let woken_conn = connection(3);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut woken = dog
            .register(far, Some(woken_conn.clone()))
            .wrap(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        assert!(woken.next().now_or_never().is_none());
        tx.send(7).unwrap();

        // Read all along: polled again after every item.
        let read_conn = connection(4);
        let (read_tx, read_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut read = dog.register(far, Some(read_conn.clone())).wrap(
            tokio_stream::wrappers::UnboundedReceiverStream::new(read_rx),
        );

        // Past its token's expiry and not ended (it cannot be polled).
        let expired_conn = connection(5);
        let expired_ticket = dog.register(
            Instant::now() + Duration::from_secs(1),
            Some(expired_conn.clone()),
        );
        let expired_watched = expired_ticket.watched();
        let _expired = expired_ticket.wrap(futures::stream::pending::<u32>());

        for n in 0..20 {
            read_tx.send(n).unwrap();
            assert_eq!(read.next().await, Some(n));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        assert!(!idle_conn.closing().is_cancelled(), "idle");
        assert!(!read_conn.closing().is_cancelled(), "read");
        assert!(frozen_conn.closing().is_cancelled(), "frozen");
        assert_eq!(frozen_watched.verdict(), Some(StreamEnd::Stalled));
        assert!(woken_conn.closing().is_cancelled(), "woken");
        assert!(expired_conn.closing().is_cancelled(), "expired");
        assert_eq!(expired_watched.verdict(), Some(StreamEnd::TokenExpired));

        // A dropped stream leaves the registry.
        drop((idle, frozen, woken, read));
        assert_eq!(dog.registry.streams().len(), 1);
        shutdown.cancel();
    }
}
