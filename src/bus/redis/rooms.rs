//! The node's room table: which local streams joined which room, and where each room's live feed stands.
//!
//! The first local stream of a room creates its slot (pending) and asks the subscriber task to subscribe;
//! it waits until Redis confirmed, later streams of the room just add their sink. When the last one
//! leaves, the slot goes and the task unsubscribes: one Redis subscription per room per node.
//!
//! Order: a live slot remembers the room's epoch, the last stored event offered (where a catch-up read
//! starts) and the last event offered at all, stored or ephemeral. Nothing at or before that is offered
//! again, so every sink sees a room's ids strictly increasing even when live messages and a catch-up read
//! overlap. While a room waits for its subscription or for the catch-up after a fault (read and offered a
//! page at a time: [`RoomTable::fill_page`]), its live messages are *held* (bounded in bytes) and offered
//! after the last page ([`RoomTable::caught_up`]), minus what the pages covered. A fault
//! the node cannot repair costs the room's streams a `Reset`, never a silent gap.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::ids::{EventId, StreamId};
use super::scripts;
use super::stored_event;
use crate::bus::{RoomItem, Sink};
use crate::metrics::ROOMS_LOCAL;

/// Bytes of live messages held per room while it waits for a read; past it (or past
/// [`HELD_BYTES_PER_NODE`] for all rooms together) the room's held messages are dropped and it is read
/// again (history covers stored events; held ephemeral ones are lost).
const HELD_BYTES_PER_ROOM: usize = 4 * 1024 * 1024;
/// Bytes of live messages held by all the node's rooms together.
const HELD_BYTES_PER_NODE: usize = 64 * 1024 * 1024;
/// Earlier epochs of a room remembered, so that late messages of a replaced epoch are recognised.
const RETIRED_EPOCHS: usize = 4;

/// Requests to the subscriber task.
#[derive(Debug)]
pub(crate) enum Command {
    /// The room got its first local stream: subscribe, then release the waiters.
    Subscribe(Arc<str>),
    /// The room's last local stream left.
    Unsubscribe(Arc<str>),
    /// The connection looks wedged (health probes are published but never arrive): replace it.
    Rebuild,
}

pub(super) type Waiter = oneshot::Sender<Result<(), String>>;

pub(super) enum SlotState {
    /// Waiting for the subscription (live messages are held meanwhile).
    Pending(Vec<Waiter>),
    /// Subscribed.
    Live(Feed),
}

/// Where a subscribed room's feed stands on this node.
pub(super) struct Feed {
    /// The room's epoch in Redis.
    pub(super) epoch: Arc<str>,
    /// Epochs the room had before (newest last): their messages are stale.
    retired: Vec<Arc<str>>,
    /// The last stored event offered (or the room's position when subscribed): catch-up reads start here.
    pub(super) delivered: StreamId,
    /// The last event offered, stored or ephemeral, as (stream id, ephemeral counter or 0).
    last: (StreamId, u64),
    /// Set from a fault (lost connection, dropped pushes) until the room is subscribed again and caught
    /// up; live messages are held meanwhile.
    pub(super) fault: Option<Fault>,
}

/// A room's unrepaired fault.
pub(super) struct Fault {
    /// When it happened.
    since: Instant,
    /// Whether the room's streams got a `Reset` for it.
    reset_sent: bool,
}

/// Live messages of a room that waits for a read, in arrival order.
struct Held {
    messages: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Some were dropped at the bound: the read must be repeated.
    dropped: bool,
    /// Bytes held by all rooms of the node (this one's `bytes` included; given back on drop).
    total: Arc<AtomicUsize>,
}

impl Held {
    fn new(total: Arc<AtomicUsize>) -> Self {
        Self {
            messages: VecDeque::new(),
            bytes: 0,
            dropped: false,
            total,
        }
    }

    /// An empty one sharing the node's count.
    fn fresh(&self) -> Self {
        Self::new(self.total.clone())
    }

    /// Holds `message`, or at a bound drops everything held (the room will be read again).
    fn push(&mut self, message: &[u8]) {
        if self.dropped {
            return;
        }
        let len = message.len();
        if self.bytes + len > HELD_BYTES_PER_ROOM
            || self.total.load(Ordering::Relaxed) + len > HELD_BYTES_PER_NODE
        {
            self.total.fetch_sub(self.bytes, Ordering::Relaxed);
            self.messages = VecDeque::new();
            self.bytes = 0;
            self.dropped = true;
            return;
        }
        self.total.fetch_add(len, Ordering::Relaxed);
        self.bytes += len;
        self.messages.push_back(message.to_vec());
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

pub(super) struct Slot {
    pub(super) sinks: Vec<(u64, Sink)>,
    pub(super) state: SlotState,
    held: Held,
}

impl Slot {
    /// Whether live messages must wait (no confirmed subscription, or a catch-up is due).
    fn holding(&self) -> bool {
        match &self.state {
            SlotState::Pending(_) => true,
            SlotState::Live(feed) => feed.fault.is_some(),
        }
    }

    fn offer(&self, item: RoomItem) {
        for (_, sink) in &self.sinks {
            sink.offer(item.clone());
        }
    }

    fn reset(&self, room: &Arc<str>, reason: &str) {
        tracing::warn!(room = %room, reason, "room reset");
        self.offer(RoomItem::Reset {
            room: room.clone(),
            reason: reason.into(),
        });
    }

    /// Offers a live message (`{id}\n{payload}`) unless it is not newer than what was offered; a message
    /// of a new epoch is preceded by a `Reset`.
    fn offer_message(&mut self, room: &Arc<str>, message: &[u8]) {
        if let Some((id, id_str, payload)) = parse_message(room, message) {
            self.offer_parsed(room, id, id_str, payload);
        }
    }

    /// [`Self::offer_message`] for a message already split into its id and payload.
    fn offer_parsed(&mut self, room: &Arc<str>, id: EventId<'_>, id_str: &str, payload: &[u8]) {
        let SlotState::Live(feed) = &mut self.state else {
            return;
        };
        match feed.admit(&id) {
            Admit::Drop => return,
            Admit::NewEpoch => self.reset(
                room,
                "the room's history in Redis was recreated (expired or lost); events may have been missed",
            ),
            Admit::Offer => {}
        }
        let event = Arc::new(stored_event(
            room.clone(),
            id_str.to_owned(),
            id.position(),
            payload,
        ));
        self.offer(RoomItem::Event(event));
    }

    /// Offers the held messages (in order; what was offered already is dropped by [`Feed::admit`]).
    /// Returns false when some had been dropped at the bound (the room must be read again).
    fn release_held(&mut self, room: &Arc<str>) -> bool {
        let fresh = self.held.fresh();
        let held = std::mem::replace(&mut self.held, fresh);
        for message in &held.messages {
            self.offer_message(room, message);
        }
        !held.dropped
    }
}

/// What [`Feed::admit`] decided about a live event.
enum Admit {
    /// Not newer than what was offered (or of a replaced epoch, or its stored predecessors are missing).
    Drop,
    Offer,
    /// The first event of a new epoch: offer it after a `Reset`.
    NewEpoch,
}

impl Feed {
    fn new(epoch: Arc<str>, position: StreamId) -> Self {
        Self {
            epoch,
            retired: Vec::new(),
            delivered: position,
            last: (position, 0),
            fault: None,
        }
    }

    fn retire(&mut self, epoch: Arc<str>) {
        let old = std::mem::replace(&mut self.epoch, epoch);
        self.retired.retain(|e| *e != self.epoch);
        self.retired.push(old);
        if self.retired.len() > RETIRED_EPOCHS {
            self.retired.remove(0);
        }
    }

    /// Whether a live event may be offered now, and the feed's position after it.
    fn admit(&mut self, id: &EventId<'_>) -> Admit {
        let key = (id.stream, id.ephemeral.unwrap_or(0));
        if *self.epoch != *id.epoch {
            if self.retired.iter().any(|e| **e == *id.epoch) {
                return Admit::Drop;
            }
            // The room was recreated in Redis (expired or flushed) while we stayed subscribed: positions
            // of the old epoch do not compare with the new ones.
            self.retire(id.epoch.into());
            self.delivered = id.stream;
            self.last = key;
            return Admit::NewEpoch;
        }
        if key <= self.last {
            return Admit::Drop;
        }
        match id.ephemeral {
            None => self.delivered = id.stream,
            // It follows stored events this node has not offered (a catch-up read brings them): offered
            // now, it would come before them.
            Some(_) if id.stream > self.delivered => return Admit::Drop,
            Some(_) => {}
        }
        self.last = key;
        Admit::Offer
    }
}

fn parse_message<'m>(room: &str, message: &'m [u8]) -> Option<(EventId<'m>, &'m str, &'m [u8])> {
    let Some(split) = message.iter().position(|&b| b == b'\n') else {
        tracing::warn!(room, "malformed message on a room channel: no id");
        return None;
    };
    let (id_bytes, payload) = (&message[..split], &message[split + 1..]);
    let Ok(id_str) = std::str::from_utf8(id_bytes) else {
        tracing::warn!(room, "malformed message on a room channel: id is not UTF-8");
        return None;
    };
    let Ok(id) = EventId::parse(id_str) else {
        tracing::warn!(room, id = id_str, "malformed event id on a room channel");
        return None;
    };
    Some((id, id_str, payload))
}

/// The rooms this node's streams joined. Shared by the bus (attach/detach) and the subscriber task.
pub(crate) struct RoomTable {
    pub(super) slots: Mutex<HashMap<Arc<str>, Slot>>,
    next_lease: AtomicU64,
    commands: mpsc::UnboundedSender<Command>,
    /// Bytes of live messages held by all rooms (see [`HELD_BYTES_PER_NODE`]).
    held_total: Arc<AtomicUsize>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No invariant spans a panic point inside these critical sections.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RoomTable {
    /// A table whose commands go to the returned receiver (the subscriber task's).
    pub(crate) fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Command>) {
        // Unbounded but small: at most two commands per room a stream joins or leaves.
        let (commands, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                slots: Mutex::new(HashMap::new()),
                next_lease: AtomicU64::new(0),
                commands,
                held_total: Arc::new(AtomicUsize::new(0)),
            }),
            rx,
        )
    }

    /// Adds `sink` to `room`. Returns the lease (dropping it removes the sink) and, when the room's
    /// subscription is not confirmed yet, a receiver that resolves once it is (or failed).
    pub(crate) fn attach(
        self: &Arc<Self>,
        room: &str,
        sink: &Sink,
    ) -> (RoomLease, Option<oneshot::Receiver<Result<(), String>>>) {
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let mut slots = lock(&self.slots);
        let room = match slots.get_key_value(room) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = room.into();
                slots.insert(
                    key.clone(),
                    Slot {
                        sinks: Vec::new(),
                        state: SlotState::Pending(Vec::new()),
                        held: Held::new(self.held_total.clone()),
                    },
                );
                metrics::gauge!(ROOMS_LOCAL).increment(1.0);
                // If the task is gone (bus dropped), the waiter below reports it.
                let _ = self.commands.send(Command::Subscribe(key.clone()));
                key
            }
        };
        let Some(slot) = slots.get_mut(&room) else {
            unreachable!("the slot was found or inserted above, under the same lock")
        };
        slot.sinks.push((id, sink.clone()));
        let wait = match &mut slot.state {
            SlotState::Pending(waiters) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Some(rx)
            }
            SlotState::Live(_) => None,
        };
        drop(slots);
        (
            RoomLease {
                table: self.clone(),
                room,
                id,
            },
            wait,
        )
    }

    /// Where to send commands to the subscriber task.
    pub(crate) fn command_sender(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
    }

    /// Rooms with at least one local stream (for tests and metrics).
    pub(crate) fn room_count(&self) -> usize {
        lock(&self.slots).len()
    }

    fn detach(&self, room: &Arc<str>, id: u64) {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(room) else {
            return;
        };
        slot.sinks.retain(|(lease, _)| *lease != id);
        if slot.sinks.is_empty() {
            slots.remove(room);
            metrics::gauge!(ROOMS_LOCAL).decrement(1.0);
            let _ = self.commands.send(Command::Unsubscribe(room.clone()));
        }
    }

    pub(super) fn live_rooms(&self) -> Vec<Arc<str>> {
        lock(&self.slots)
            .iter()
            .filter(|(_, slot)| matches!(slot.state, SlotState::Live(_)))
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// Offers a live message of `room` (`{id}\n{payload}`) to the room's sinks, unless it is not newer
    /// than what they were offered; holds it while the room waits for a read.
    pub(super) fn deliver(&self, room: &str, message: &[u8]) {
        // Parsed before taking the node-wide lock every room's fan-out shares.
        let Some((id, id_str, payload)) = parse_message(room, message) else {
            return;
        };
        let mut slots = lock(&self.slots);
        let Some((key, _)) = slots.get_key_value(room) else {
            return;
        };
        let key = key.clone();
        let Some(slot) = slots.get_mut(&key) else {
            return;
        };
        if slot.holding() {
            slot.held.push(message);
            return;
        }
        slot.offer_parsed(&key, id, id_str, payload);
    }

    /// A pending room's subscription is confirmed and `read` says where the room stands: it goes live,
    /// its held messages are offered, its waiting streams released. `fault` (a fault happened while it
    /// was being subscribed) leaves it due for a catch-up. False when the slot is gone or not pending.
    pub(super) fn joined(&self, room: &Arc<str>, read: &scripts::ReadResult, fault: bool) -> bool {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(room) else {
            return false;
        };
        let SlotState::Pending(waiters) = &mut slot.state else {
            return false;
        };
        let waiters = std::mem::take(waiters);
        slot.state = SlotState::Live(Feed::new(read.epoch.as_str().into(), read.last));
        let complete = slot.release_held(room);
        if fault || !complete {
            if let SlotState::Live(feed) = &mut slot.state {
                feed.fault = Some(Fault {
                    since: Instant::now(),
                    reset_sent: false,
                });
            }
        }
        for w in waiters {
            let _ = w.send(Ok(()));
        }
        true
    }

    /// A pending room could not be subscribed: its waiting streams fail with `reason` (UNAVAILABLE) and
    /// the slot goes (their leases find none). False when it is not pending.
    pub(super) fn join_failed(&self, room: &Arc<str>, reason: &str) -> bool {
        let mut slots = lock(&self.slots);
        if !matches!(
            slots.get(room).map(|s| &s.state),
            Some(SlotState::Pending(_))
        ) {
            return false;
        }
        let Some(slot) = slots.remove(room) else {
            return false;
        };
        metrics::gauge!(ROOMS_LOCAL).decrement(1.0);
        if let SlotState::Pending(waiters) = slot.state {
            for w in waiters {
                let _ = w.send(Err(reason.to_owned()));
            }
        }
        true
    }

    /// Marks live rooms (`None`: all) as faulted: their live messages are held until a catch-up read.
    /// Returns the rooms that were not faulted already.
    pub(super) fn fault(&self, rooms: Option<&[Arc<str>]>) -> Vec<Arc<str>> {
        let mut slots = lock(&self.slots);
        let mut marked = Vec::new();
        let mut mark = |room: &Arc<str>, slot: &mut Slot| {
            if let SlotState::Live(feed) = &mut slot.state {
                if feed.fault.is_none() {
                    feed.fault = Some(Fault {
                        since: Instant::now(),
                        reset_sent: false,
                    });
                    let fresh = slot.held.fresh();
                    slot.held = fresh;
                    marked.push(room.clone());
                }
            }
        };
        match rooms {
            None => {
                for (room, slot) in slots.iter_mut() {
                    mark(room, slot);
                }
            }
            Some(rooms) => {
                for room in rooms {
                    if let Some(slot) = slots.get_mut(room) {
                        mark(room, slot);
                    }
                }
            }
        }
        marked
    }

    /// Sends a `Reset` to the streams of rooms faulted for `after` or longer (once per fault), and
    /// returns when the next one is due, if any room is faulted.
    pub(super) fn reset_overdue(&self, after: Duration, reason: &str) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut slots = lock(&self.slots);
        for (room, slot) in slots.iter_mut() {
            let SlotState::Live(Feed {
                fault: Some(fault), ..
            }) = &mut slot.state
            else {
                continue;
            };
            if fault.reset_sent {
                continue;
            }
            let due = fault.since + after;
            if due <= now {
                fault.reset_sent = true;
                slot.reset(room, reason);
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// Live rooms that cannot be delivered now (faulted), for health.
    pub(super) fn faulted_count(&self) -> usize {
        lock(&self.slots)
            .values()
            .filter(|slot| matches!(&slot.state, SlotState::Live(feed) if feed.fault.is_some()))
            .count()
    }

    /// What the slot of `room` is now.
    pub(super) fn state_of(&self, room: &str) -> RoomState {
        match lock(&self.slots).get(room).map(|slot| &slot.state) {
            None => RoomState::Gone,
            Some(SlotState::Pending(_)) => RoomState::Pending,
            Some(SlotState::Live(feed)) if feed.fault.is_some() => {
                RoomState::Faulted(feed.epoch.clone(), feed.delivered)
            }
            Some(SlotState::Live(_)) => RoomState::Live,
        }
    }
}

/// What the subscriber task must do about a room.
#[derive(Debug)]
pub(super) enum RoomState {
    /// No local stream: unsubscribe.
    Gone,
    /// Subscribe and read.
    Pending,
    /// Catch up from (epoch, last stored event offered).
    Faulted(Arc<str>, StreamId),
    /// Nothing to do.
    Live,
}

/// Keeps a stream's sink in a room; dropping it detaches the sink (and unsubscribes after the last).
pub(crate) struct RoomLease {
    table: Arc<RoomTable>,
    room: Arc<str>,
    id: u64,
}

impl Drop for RoomLease {
    fn drop(&mut self) {
        self.table.detach(&self.room, self.id);
    }
}

/// Where a room's paged catch-up ended (see [`RoomTable::fill_page`]).
#[derive(Debug)]
pub(super) struct CatchUp {
    /// Where the room stands after the last page (its slot must still say so, else it is stale).
    pub(super) base: (Arc<str>, StreamId),
    /// The room's last stored event when the catch-up started: later ones arrive live (held meanwhile).
    pub(super) through: StreamId,
}

/// What became of a catch-up.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Filled {
    /// Offered; the room is live again.
    Done,
    /// Offered, but live messages were dropped meanwhile (or a fault came in between): read again.
    Again,
    /// The room is gone or no longer stands where the read started.
    Stale,
}

impl RoomTable {
    /// Offers one page of what a faulted room missed (after a `Reset` with `reset`, if given) to its
    /// sinks, if the room still stands at `base`. A page of another `epoch` than the base's (Redis lost the
    /// room) must come with a reset: the room then starts over in that epoch. The room stays faulted (its
    /// live messages held) until [`RoomTable::caught_up`]. Returns where it stands now, `None` if stale.
    pub(super) fn fill_page(
        &self,
        room: &Arc<str>,
        base: &(Arc<str>, StreamId),
        reset: Option<&str>,
        epoch: &str,
        entries: &[(StreamId, Vec<u8>)],
    ) -> Option<(Arc<str>, StreamId)> {
        let mut slots = lock(&self.slots);
        let slot = slots.get_mut(room)?;
        let SlotState::Live(feed) = &mut slot.state else {
            return None;
        };
        if feed.fault.is_none() || (&feed.epoch, feed.delivered) != (&base.0, base.1) {
            return None;
        }
        if let Some(reason) = reset {
            if *epoch != *feed.epoch {
                feed.retire(epoch.into());
                feed.delivered = StreamId::default();
                feed.last = (StreamId::default(), 0);
            }
            slot.reset(room, reason);
        }
        let SlotState::Live(feed) = &mut slot.state else {
            return None;
        };
        if *epoch != *feed.epoch {
            // Only a reset may switch epochs.
            return None;
        }
        for (id, payload) in entries {
            if *id <= feed.delivered {
                continue;
            }
            feed.delivered = *id;
            let event = Arc::new(stored_event(
                room.clone(),
                format!("{}:{id}", feed.epoch),
                id.position(false),
                payload,
            ));
            for (_, sink) in &slot.sinks {
                sink.offer(RoomItem::Event(event.clone()));
            }
        }
        feed.last = feed.last.max((feed.delivered, 0));
        Some((feed.epoch.clone(), feed.delivered))
    }

    /// A faulted room's catch-up offered everything through `end.through`: it goes live again, and the
    /// messages held meanwhile that are newer are offered.
    pub(super) fn caught_up(&self, room: &Arc<str>, end: &CatchUp) -> Filled {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(room) else {
            return Filled::Stale;
        };
        let SlotState::Live(feed) = &mut slot.state else {
            return Filled::Stale;
        };
        if feed.fault.is_none() || (&feed.epoch, feed.delivered) != (&end.base.0, end.base.1) {
            return Filled::Stale;
        }
        feed.delivered = feed.delivered.max(end.through);
        feed.last = feed.last.max((feed.delivered, 0));
        let fault = feed.fault.take();
        if slot.release_held(room) {
            Filled::Done
        } else {
            if let SlotState::Live(feed) = &mut slot.state {
                feed.fault = fault;
            }
            Filled::Again
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::sink;

    fn sid(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    fn read(epoch: &str, last: StreamId, ids: &[StreamId]) -> scripts::ReadResult {
        scripts::ReadResult {
            epoch: epoch.into(),
            last,
            trimmed_through: StreamId::default(),
            entries: entries(ids),
        }
    }

    fn entries(ids: &[StreamId]) -> Vec<(StreamId, Vec<u8>)> {
        ids.iter().map(|id| (*id, Vec::new())).collect()
    }

    fn ids(inbox: &mut crate::bus::SinkReceiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(item) = inbox.try_recv() {
            out.push(match item {
                RoomItem::Event(e) => e.id.clone(),
                RoomItem::Reset { .. } => "reset".into(),
            });
        }
        out
    }

    #[test]
    fn typing_held_across_a_catch_up_is_not_offered_after_newer_stored_events() {
        let (table, _commands) = RoomTable::new();
        let (sink, mut inbox) = sink(100);
        let (_lease, _wait) = table.attach("r", &sink);
        let room: Arc<str> = "r".into();
        assert!(table.joined(&room, &read("e", sid(10, 0), &[]), false));
        table.deliver("r", b"e:10-0.1\n");
        assert_eq!(ids(&mut inbox), ["e:10-0.1"]);

        // A fault: live messages wait for the catch-up read.
        table.fault(None);
        table.deliver("r", b"e:11-0\n"); // stored, also in the read below
        table.deliver("r", b"e:11-0.1\n"); // typing, before 12-0
        table.deliver("r", b"e:12-0\n");
        table.deliver("r", b"e:12-0.1\n"); // typing after the read's last event: newer
        assert!(ids(&mut inbox).is_empty(), "held");
        // The catch-up reads the gap in two pages; the room keeps holding between them.
        let base = ("e".into(), sid(10, 0));
        let base = table
            .fill_page(&room, &base, None, "e", &entries(&[sid(11, 0)]))
            .expect("the room stands where the read started");
        assert_eq!(ids(&mut inbox), ["e:11-0"]);
        table.deliver("r", b"e:11-0.2\n"); // typing after 11-0, arriving between the pages: before 12-0
        assert!(ids(&mut inbox).is_empty(), "still held");
        // A page read from a position the room no longer stands at is stale.
        assert!(table
            .fill_page(&room, &("e".into(), sid(10, 0)), None, "e", &[])
            .is_none());
        let base = table
            .fill_page(&room, &base, None, "e", &entries(&[sid(12, 0)]))
            .unwrap();
        let end = CatchUp {
            base,
            through: sid(12, 0),
        };
        assert_eq!(table.caught_up(&room, &end), Filled::Done);
        assert_eq!(ids(&mut inbox), ["e:12-0", "e:12-0.1"]);
        assert_eq!(table.caught_up(&room, &end), Filled::Stale, "once");
        assert_eq!(
            table.held_total.load(Ordering::Relaxed),
            0,
            "held bytes given back"
        );

        // Late copies are dropped; the next events pass.
        table.deliver("r", b"e:11-0.1\n");
        table.deliver("r", b"e:12-0.1\n");
        table.deliver("r", b"e:12-0.2\n");
        table.deliver("r", b"e:13-0\n");
        assert_eq!(ids(&mut inbox), ["e:12-0.2", "e:13-0"]);

        // A typing event after stored events this node has not offered waits for them (a catch-up).
        table.deliver("r", b"e:15-0.1\n");
        assert!(ids(&mut inbox).is_empty());

        // A new epoch (the room was recreated) comes with a Reset; late messages of the old one are stale.
        table.deliver("r", b"f:1-0\n");
        table.deliver("r", b"e:14-0\n");
        table.deliver("r", b"f:2-0\n");
        assert_eq!(ids(&mut inbox), ["reset", "f:1-0", "f:2-0"]);
    }

    #[test]
    fn a_room_faulted_too_long_gets_one_reset() {
        let (table, _commands) = RoomTable::new();
        let (sink, mut inbox) = sink(100);
        let (_lease, _wait) = table.attach("r", &sink);
        let room: Arc<str> = "r".into();
        assert!(table.joined(&room, &read("e", sid(1, 0), &[]), false));
        table.fault(None);
        assert_eq!(table.faulted_count(), 1);
        assert!(table.reset_overdue(Duration::from_secs(60), "x").is_some());
        assert!(ids(&mut inbox).is_empty());
        assert!(table.reset_overdue(Duration::ZERO, "x").is_none());
        assert!(table.reset_overdue(Duration::ZERO, "x").is_none());
        assert_eq!(ids(&mut inbox), ["reset"]);
        // Once caught up it delivers again.
        let base = table
            .fill_page(
                &room,
                &("e".into(), sid(1, 0)),
                None,
                "e",
                &entries(&[sid(2, 0)]),
            )
            .unwrap();
        let end = CatchUp {
            base,
            through: sid(2, 0),
        };
        assert_eq!(table.caught_up(&room, &end), Filled::Done);
        assert_eq!(table.faulted_count(), 0);
        assert_eq!(ids(&mut inbox), ["e:2-0"]);
    }

    #[test]
    fn a_catch_up_page_of_a_new_epoch_resets_and_starts_the_room_over() {
        let (table, _commands) = RoomTable::new();
        let (sink, mut inbox) = sink(100);
        let (_lease, _wait) = table.attach("r", &sink);
        let room: Arc<str> = "r".into();
        assert!(table.joined(&room, &read("e", sid(5, 0), &[]), false));
        table.fault(None);
        table.deliver("r", b"f:2-0\n"); // live, of the new epoch, after the read below
        let base = ("e".into(), sid(5, 0));
        // A page of another epoch without a reset is not this room's history.
        assert!(table.fill_page(&room, &base, None, "f", &[]).is_none());
        assert!(ids(&mut inbox).is_empty());
        let base = table
            .fill_page(&room, &base, Some("lost"), "f", &[])
            .expect("a reset switches epochs");
        assert_eq!(base, ("f".into(), StreamId::default()));
        let base = table
            .fill_page(&room, &base, None, "f", &entries(&[sid(1, 0)]))
            .unwrap();
        let end = CatchUp {
            base,
            through: sid(1, 0),
        };
        assert_eq!(table.caught_up(&room, &end), Filled::Done);
        assert_eq!(ids(&mut inbox), ["reset", "f:1-0", "f:2-0"]);
        // Late messages of the old epoch are stale.
        table.deliver("r", b"e:6-0\n");
        assert!(ids(&mut inbox).is_empty());
    }
}
