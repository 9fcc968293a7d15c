//! The event bus: where published events get their ids, are kept for replay and reach subscribers.
//!
//! [`Bus`] is the seam between the gRPC layer and the transport that carries events between nodes. The
//! service only ever holds an `Arc<dyn Bus>`; [`memory::MemoryBus`] runs everything in one process (the
//! default), and a Redis implementation shares rooms, history and presence across nodes.
//!
//! Contract every implementation keeps:
//! - ids are strictly increasing within a room, and subscribers see a room's events in id order;
//! - [`Bus::subscribe`] attaches a stream's [`Sink`] before the replay is read, so between the replayed
//!   events and the live ones there is no gap, and no duplicate once live items at or before
//!   [`RoomFeed::skip_through`] are dropped;
//! - the replay is read in pages of bounded size as the stream sends it ([`Replay`]), so a resume across
//!   many rooms of large events is never held in memory at once;
//! - recovery is exact or not claimed: when history cannot cover `since`, the feed says [`Recovery::Reset`];
//! - a publish returns only once the event is accepted, and never waits for a subscriber.

pub mod control;
pub mod memory;
pub mod redis;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;

pub use sink::{sink, sink_with_bytes, Sink, SinkReceiver};

use crate::auth::Revocation;
use crate::presence::{Member, PageRequest, PresenceSnapshot};
use crate::proto::v1::{event::Payload, Event};
use crate::wire::SharedResponse;

/// How long a publish's idempotency key is remembered, by every bus (the contract promises ten minutes).
pub const IDEMPOTENCY_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Order of an event within its room (for the in-memory bus a sequence number; for Redis a stream id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Most significant part.
    pub major: u64,
    /// Least significant part.
    pub minor: u64,
}

/// An accepted event: its id, its room and its `SubscribeResponse` encoding, shared by every subscriber.
#[derive(Debug)]
pub struct StoredEvent {
    /// The id the bus assigned.
    pub id: String,
    /// Order within the room.
    pub pos: Position,
    /// The room.
    pub room: Arc<str>,
    /// `SubscribeResponse { event }`, encoded once.
    pub frame: SharedResponse,
}

impl StoredEvent {
    /// Encodes `event` (whose `id` is already set) for fan-out.
    pub fn new(pos: Position, room: Arc<str>, event: &Event) -> Self {
        Self {
            id: event.id.clone(),
            pos,
            room,
            frame: SharedResponse::from_event(event),
        }
    }
}

/// What a subscriber's queue carries.
#[derive(Clone, Debug)]
pub enum RoomItem {
    /// A live event.
    Event(Arc<StoredEvent>),
    /// The bus lost events of this room that the stream may not have seen (e.g. Redis was down longer than
    /// its history covers): the client should refetch.
    Reset {
        /// The room.
        room: Arc<str>,
        /// Why.
        reason: Arc<str>,
    },
}

/// Whether `since` could be honoured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No `since` was given.
    Fresh,
    /// Every event after `since` is in [`RoomFeed::replay`].
    Recovered,
    /// History cannot cover `since` (trimmed, expired or from an earlier run): why.
    Reset(String),
}

/// Keeps a stream attached to a room; dropping it detaches the stream.
pub type Lease = Box<dyn Send + Sync>;

/// A stream's view of one room, returned by [`Bus::subscribe`].
pub struct RoomFeed {
    /// The room's position after the replay: its newest event id, or, for a room without events, a
    /// position id that is just as valid as `since`. Never empty.
    pub last_event_id: String,
    /// Whether `since` was honoured.
    pub recovery: Recovery,
    /// Events after `since`, oldest first, read page by page (empty without `since` or on reset).
    pub replay: Replay,
    /// Live items at or before this position were (or will be) replayed: drop them.
    pub skip_through: Option<Position>,
    /// Attachment of the sink to the room.
    pub lease: Lease,
}

/// Maximum events in one page of a replay read from a shared store.
pub const REPLAY_PAGE_EVENTS: usize = 256;
/// Bytes (stored events' encoded size) after which a replay page ends; a page holds at least one event.
pub const REPLAY_PAGE_BYTES: usize = 1024 * 1024;

/// One step of a [`Replay`].
#[derive(Debug)]
pub enum Page {
    /// The next events, oldest first (never empty).
    Events(Vec<Arc<StoredEvent>>),
    /// History stopped covering the replay while it was being read (trimmed or lost meanwhile): the
    /// stream must send a `Reset` for the room; the replay is over.
    Reset(String),
    /// The replay is complete.
    Done,
}

/// Reads the next page of a replay from the bus's store.
#[async_trait]
pub trait ReplayPages: Send {
    /// The next page. After [`Page::Reset`] or [`Page::Done`] it is not called again.
    async fn next_page(&mut self) -> Result<Page, BusError>;
}

/// What a stream replays for one room: events the bus already holds (the memory bus: shared `Arc`s of
/// its history) or pages read on demand (Redis), so only one page per stream is held at a time.
pub struct Replay {
    ready: Vec<Arc<StoredEvent>>,
    pages: Option<Box<dyn ReplayPages>>,
}

impl Replay {
    /// Nothing to replay.
    pub fn none() -> Self {
        Self::ready(Vec::new())
    }

    /// A replay of events already in memory: one page.
    pub fn ready(events: Vec<Arc<StoredEvent>>) -> Self {
        Self {
            ready: events,
            pages: None,
        }
    }

    /// A replay read page by page.
    pub fn paged(pages: Box<dyn ReplayPages>) -> Self {
        Self {
            ready: Vec::new(),
            pages: Some(pages),
        }
    }

    /// The next page.
    pub async fn next_page(&mut self) -> Result<Page, BusError> {
        if !self.ready.is_empty() {
            return Ok(Page::Events(std::mem::take(&mut self.ready)));
        }
        match &mut self.pages {
            Some(pages) => pages.next_page().await,
            None => Ok(Page::Done),
        }
    }

    /// The events held in memory, not read yet (all of a [`Replay::ready`]).
    pub fn in_memory(&self) -> &[Arc<StoredEvent>] {
        &self.ready
    }
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("ready", &self.ready.len())
            .field("paged", &self.pages.is_some())
            .finish()
    }
}

/// Failures of a bus operation.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// `since` is not an event id this bus could have issued.
    #[error("invalid since for room {room}: {id:?} is not an event id ({reason})")]
    InvalidCursor {
        /// The room.
        room: String,
        /// The id given.
        id: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The bus cannot accept or serve right now (e.g. Redis is down). Retry, possibly on another node.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// Redis is set up in a way the bus cannot work with safely (found at start-up): what to change.
    #[error("{0}")]
    Misconfigured(String),
    /// A bus-internal failure.
    #[error("event bus error: {0}")]
    Internal(String),
}

/// The transport behind rooms. See the module docs for the contract.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Assigns the id, stores the event (unless [`is_ephemeral`]) and fans it out. With an
    /// `idempotency_key` seen in the last ten minutes, returns the first id and delivers nothing.
    async fn publish(
        &self,
        event: Event,
        idempotency_key: Option<String>,
    ) -> Result<String, BusError>;

    /// Attaches `sink` to `room` and reads what it missed since `since`.
    async fn subscribe(
        &self,
        room: &str,
        since: Option<&str>,
        sink: &Sink,
    ) -> Result<RoomFeed, BusError>;

    /// Records a connection of `member` in `rooms`; when it is the user's first connection, marks the
    /// user ONLINE-changed atomically with the count, for the coalesced status event of the window
    /// ([`crate::statuses`]). Once the returned future was polled, [`Bus::disconnect`] of the same member is valid and
    /// undoes whatever it did, even if the future was then dropped or failed.
    async fn connect(&self, member: &Member, rooms: &[String]) -> Result<(), BusError>;

    /// That connection left `room` (`AdminService.Unsubscribe`): it no longer counts there, and still
    /// does in its other rooms (a later [`Bus::disconnect`] names only those).
    async fn leave(&self, member: &Member, room: &str) -> Result<(), BusError>;

    /// Removes that connection; after the user's last one, marks the user OFFLINE-changed (see
    /// [`Bus::connect`]).
    async fn disconnect(&self, member: &Member, rooms: &[String]) -> Result<(), BusError>;

    /// Distinct users and connections in a room (totals), and the page of its users `page` asks for.
    async fn presence(&self, room: &str, page: &PageRequest) -> Result<PresenceSnapshot, BusError>;

    /// Says goodbye before the process exits: removes every connection of this node from presence
    /// (publishing OFFLINE at once for users with no other connection anywhere) and the node itself from
    /// whatever registry other nodes watch. [`crate::serve`] calls it once, after the streams ended, within the
    /// shutdown grace period. The embedded bus has nothing outside the process to clean.
    async fn shutdown(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Short name for logs ("memory", "redis").
    fn name(&self) -> &'static str;

    /// Sends a membership command to every node, this one included (see [`control`]); returns once the
    /// bus accepted it.
    async fn control(&self, cmd: &control::Control) -> Result<(), BusError> {
        self.publish(cmd.to_event(), None).await.map(drop)
    }

    /// Attaches `sink` to the control channel: commands sent from now on (and after `since`, the id of
    /// the last command this node saw, those it missed) arrive as events of [`control::CONTROL_ROOM`].
    async fn subscribe_control(
        &self,
        since: Option<&str>,
        sink: &Sink,
    ) -> Result<RoomFeed, BusError> {
        self.subscribe(control::CONTROL_ROOM, since, sink).await
    }

    /// Keeps a revocation where nodes that start later find it ([`Bus::revocations`]), until it expires.
    /// The embedded bus has only this node, which holds it in memory: nothing to do.
    async fn store_revocation(&self, _revocation: &Revocation) -> Result<(), BusError> {
        Ok(())
    }

    /// The revocations in force, loaded by a node at start.
    async fn revocations(&self) -> Result<Vec<Revocation>, BusError> {
        Ok(Vec::new())
    }

    /// Whether the bus can serve right now, for the gRPC health service: `None` for a bus that is always
    /// healthy (the embedded one), else a receiver that turns `false` while the bus cannot deliver (e.g.
    /// Redis is down) and back to `true` when it can.
    fn health(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// Typing and user-status events (`UserStatus`, `PresenceDiff`) are delivered live and never kept in
/// history.
pub fn is_ephemeral(event: &Event) -> bool {
    matches!(
        event.payload,
        Some(Payload::Typing(_)) | Some(Payload::UserStatus(_)) | Some(Payload::PresenceDiff(_))
    )
}
