//! The node's room table: which local streams joined which room, and where each room's live feed stands.
//!
//! The first local stream of a room creates its slot (pending) and asks the subscriber task to subscribe;
//! it waits until Redis confirmed, later streams of the room just add their sink. When the last one
//! leaves, the slot goes and the task unsubscribes: one Redis subscription per room per node. A live slot
//! remembers the room's epoch and the last stored event offered to its sinks, so that messages arriving
//! twice (live and from a catch-up read) are offered once, and so that after a disconnection the task
//! knows where to read the room's stream from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use super::ids::{EventId, StreamId};
use super::scripts;
use super::stored_event;
use crate::bus::{RoomItem, Sink};
use crate::metrics::ROOMS_LOCAL;

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
    /// Waiting for the subscription.
    Pending(Vec<Waiter>),
    /// Subscribed; live events at or before `delivered` (a stored event of `epoch`) were already offered.
    Live {
        epoch: Arc<str>,
        delivered: StreamId,
    },
}

pub(super) struct Slot {
    pub(super) sinks: Vec<(u64, Sink)>,
    pub(super) state: SlotState,
}

/// The rooms this node's streams joined. Shared by the bus (attach/detach) and the subscriber task.
pub(crate) struct RoomTable {
    pub(super) slots: Mutex<HashMap<Arc<str>, Slot>>,
    next_lease: AtomicU64,
    commands: mpsc::UnboundedSender<Command>,
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
            SlotState::Live { .. } => None,
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
            .filter(|(_, slot)| matches!(slot.state, SlotState::Live { .. }))
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// Offers a live message of `room` (`{id}\n{payload}`) to the room's sinks, unless it was already
    /// offered (a stored event at or before the last one fanned out).
    pub(super) fn deliver(&self, room: &str, message: &[u8]) {
        let Some(split) = message.iter().position(|&b| b == b'\n') else {
            tracing::warn!(room, "malformed message on a room channel: no id");
            return;
        };
        let (id_bytes, payload) = (&message[..split], &message[split + 1..]);
        let Some(id_str) = std::str::from_utf8(id_bytes).ok() else {
            tracing::warn!(room, "malformed message on a room channel: id is not UTF-8");
            return;
        };
        let Ok(id) = EventId::parse(id_str) else {
            tracing::warn!(room, id = id_str, "malformed event id on a room channel");
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
        let SlotState::Live { epoch, delivered } = &mut slot.state else {
            // Not confirmed yet: the waiting streams read history after the confirmation.
            return;
        };
        if **epoch != *id.epoch {
            // The room was recreated in Redis (flushed or expired) while we stayed subscribed: positions
            // of the old epoch do not compare with the new ones.
            *epoch = id.epoch.into();
            *delivered = id.stream;
        } else if id.ephemeral.is_none() {
            if id.stream <= *delivered {
                return;
            }
            *delivered = id.stream;
        }
        let event = Arc::new(stored_event(key, id_str.to_owned(), id.position(), payload));
        for (_, sink) in &slot.sinks {
            sink.offer(RoomItem::Event(event.clone()));
        }
    }
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

/// What a room missed while the node was disconnected (read by the subscriber task).
pub(super) struct Gap {
    pub(super) room: Arc<str>,
    /// Where the room stood before (its slot must still say so, else the gap is stale).
    pub(super) base: (Arc<str>, StreamId),
    /// Why history cannot cover the gap, if it cannot.
    pub(super) reset: Option<&'static str>,
    pub(super) read: scripts::ReadResult,
}

impl RoomTable {
    /// Offers a gap's events (after a `Reset` if it has one) to the room's sinks.
    pub(super) fn fill(&self, gap: Gap) {
        let Gap {
            room,
            base,
            reset,
            read,
        } = gap;
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(&room) else {
            return;
        };
        let SlotState::Live { epoch, delivered } = &mut slot.state else {
            return;
        };
        if (epoch.clone(), *delivered) != base {
            // Fanned out meanwhile (cannot happen: the subscriber task does both); rather than guess,
            // the next recovery reads again.
            return;
        }
        if let Some(reason) = reset {
            tracing::warn!(room = %room, reason, "room reset after reconnect");
            for (_, sink) in &slot.sinks {
                sink.offer(RoomItem::Reset {
                    room: room.clone(),
                    reason: reason.into(),
                });
            }
            if *read.epoch != **epoch {
                *epoch = read.epoch.as_str().into();
                *delivered = StreamId::default();
            }
        }
        let mut missed = 0usize;
        for (id, payload) in read.entries {
            if id <= *delivered {
                continue;
            }
            *delivered = id;
            missed += 1;
            let event = Arc::new(stored_event(
                room.clone(),
                format!("{epoch}:{id}"),
                id.position(false),
                &payload,
            ));
            for (_, sink) in &slot.sinks {
                sink.offer(RoomItem::Event(event.clone()));
            }
        }
        *delivered = (*delivered).max(read.last);
        if missed > 0 {
            tracing::info!(room = %room, missed, "delivered events missed while disconnected");
        }
    }
}
