//! The embedded bus: everything in one process, no other service needed.
//!
//! Ids are `{epoch}-{seq}`: `seq` comes from one counter shared by all rooms (so it only grows within a
//! room), and `epoch` identifies this run, so an id from an earlier run is recognised and answered with a
//! `Reset` instead of a false recovery.
//!
//! Bounds: each room keeps its last `history_size` non-ephemeral events; a room nobody is subscribed to is
//! forgotten after `history_ttl` without events (one minute if it kept no history); idempotency keys are
//! remembered for ten minutes, at most [`MAX_IDEMPOTENCY_KEYS`] (the oldest are forgotten first).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use async_trait::async_trait;

use super::{
    is_ephemeral, Bus, BusError, Position, Recovery, Replay, RoomFeed, RoomItem, Sink, StoredEvent,
    IDEMPOTENCY_TTL,
};
use crate::metrics::ROOMS_LOCAL;
use crate::presence::{Member, PageRequest, PresenceSnapshot, PresenceTable, Transition};
use crate::proto::v1::Event;
use crate::statuses::{
    diff_event, Outcome, Settle, StatusSettings, StatusWindow, MAX_CHANGES_PER_EVENT,
};

/// Most idempotency keys remembered at once; past it the oldest are forgotten early.
pub const MAX_IDEMPOTENCY_KEYS: usize = 100_000;
/// Idle time after which a room without history and without subscribers is forgotten.
const EMPTY_ROOM_TTL: Duration = Duration::from_secs(60);

/// In-process [`Bus`].
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: String,
    seq: AtomicU64,
    /// Highest seq of any room forgotten by the sweeper: a room created again cannot replay before it.
    swept_through: AtomicU64,
    next_lease: AtomicU64,
    rooms: Mutex<HashMap<Arc<str>, Arc<Mutex<RoomState>>>>,
    idempotency: Mutex<Idempotency>,
    presence: Mutex<PresenceTable>,
    /// Tenants with status changes to publish at the end of the window.
    statuses: Arc<StatusWindow>,
    /// Stops the status window's task when the bus is dropped.
    _stop: tokio_util::sync::DropGuard,
    history_size: usize,
    history_ttl: Duration,
    /// Runs between a room's lookup and its lock (see [`Inner::with_room`]), so a test can sweep there.
    #[cfg(test)]
    between_lookup_and_lock: Mutex<Option<TestHook>>,
}

/// See `Inner::between_lookup_and_lock`.
#[cfg(test)]
type TestHook = Box<dyn FnOnce(&Inner) + Send>;

struct RoomState {
    name: Arc<str>,
    history: VecDeque<Arc<StoredEvent>>,
    /// Events with a seq at or below this may be gone: a `since` before it cannot be recovered.
    trimmed_through: u64,
    last_id: Option<String>,
    last_seq: u64,
    sinks: Vec<(u64, Sink)>,
    last_activity: Instant,
    /// Set by the sweeper, under this lock, when it takes the room out of the map: whoever looked the
    /// room up before that and locks it after must look it up again (see [`Inner::with_room`]).
    removed: bool,
}

#[derive(Default)]
struct Idempotency {
    ids: HashMap<String, String>,
    order: VecDeque<(Instant, String)>,
}

impl Idempotency {
    fn expire(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.front() {
            if now.duration_since(*at) < IDEMPOTENCY_TTL && self.ids.len() <= MAX_IDEMPOTENCY_KEYS {
                break;
            }
            self.ids.remove(key);
            self.order.pop_front();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (no multi-step invariants span a
    // panic point), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryBus {
    /// A bus keeping `history_size` events per room. Spawns the sweeper that forgets idle rooms, so it must
    /// be called inside a tokio runtime; the sweeper stops when the bus is dropped.
    pub fn new(history_size: usize, history_ttl: Duration) -> Self {
        Self::with_statuses(history_size, history_ttl, StatusSettings::default())
    }

    /// [`Self::new`] with status settings (see [`crate::statuses`]).
    pub fn with_statuses(
        history_size: usize,
        history_ttl: Duration,
        statuses: StatusSettings,
    ) -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cancel = tokio_util::sync::CancellationToken::new();
        let window = StatusWindow::new(statuses);
        let inner = Arc::new(Inner {
            epoch: base36(epoch_ms),
            seq: AtomicU64::new(0),
            swept_through: AtomicU64::new(0),
            next_lease: AtomicU64::new(0),
            rooms: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(Idempotency::default()),
            presence: Mutex::new(PresenceTable::default()),
            statuses: window.clone(),
            _stop: cancel.clone().drop_guard(),
            history_size: history_size.max(1),
            history_ttl,
            #[cfg(test)]
            between_lookup_and_lock: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(window.run(weak.clone(), cancel));
        tokio::spawn(sweep(
            weak,
            (history_ttl / 10).clamp(Duration::from_secs(1), EMPTY_ROOM_TTL),
        ));
        Self { inner }
    }

    /// Rooms currently held in memory (for tests and metrics).
    pub fn room_count(&self) -> usize {
        lock(&self.inner.rooms).len()
    }
}

impl Inner {
    /// Runs `f` on `name`'s room (created if missing) under the room's lock. The map's lock is released
    /// before the room's is taken, so the sweeper may forget the room in between: then the room is marked
    /// `removed` and this looks it up again, so nothing is ever published into or subscribed to a room that
    /// is no longer in the map.
    fn with_room<R>(
        &self,
        name: &str,
        f: impl FnOnce(&Arc<Mutex<RoomState>>, &mut RoomState) -> R,
    ) -> R {
        loop {
            let slot = self.room(name);
            #[cfg(test)]
            if let Some(hook) = lock(&self.between_lookup_and_lock).take() {
                hook(self);
            }
            let mut st = lock(&slot);
            if !st.removed {
                return f(&slot, &mut st);
            }
        }
    }

    fn room(&self, name: &str) -> Arc<Mutex<RoomState>> {
        let mut rooms = lock(&self.rooms);
        if let Some(room) = rooms.get(name) {
            return room.clone();
        }
        let name: Arc<str> = name.into();
        let room = Arc::new(Mutex::new(RoomState {
            name: name.clone(),
            history: VecDeque::new(),
            trimmed_through: self.swept_through.load(Ordering::Acquire),
            last_id: None,
            last_seq: 0,
            sinks: Vec::new(),
            last_activity: Instant::now(),
            removed: false,
        }));
        rooms.insert(name, room.clone());
        room
    }

    /// Assigns the id and fans out under the room's lock, so every subscriber sees the room in id order.
    /// Offers never wait (see [`Sink::offer`]).
    fn publish_now(&self, event: Event) -> String {
        let room = event.room.clone();
        self.with_room(&room, |_, st| self.publish_locked(st, event))
    }

    fn publish_locked(&self, st: &mut RoomState, mut event: Event) -> String {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        event.id = format!("{}-{seq}", self.epoch);
        let stored = Arc::new(StoredEvent::new(
            Position {
                major: seq,
                minor: 0,
            },
            st.name.clone(),
            &event,
        ));
        if !is_ephemeral(&event) {
            st.history.push_back(stored.clone());
            while st.history.len() > self.history_size {
                if let Some(old) = st.history.pop_front() {
                    st.trimmed_through = old.pos.major;
                }
            }
        }
        st.last_id = Some(event.id.clone());
        st.last_seq = seq;
        st.last_activity = Instant::now();
        let attached = !st.sinks.is_empty();
        st.sinks
            .retain(|(_, sink)| sink.offer(RoomItem::Event(stored.clone())));
        if attached && st.sinks.is_empty() {
            metrics::gauge!(ROOMS_LOCAL).decrement(1.0);
        }
        event.id
    }

    fn parse_since(&self, room: &str, since: &str) -> Result<(String, u64), BusError> {
        let invalid = |reason| BusError::InvalidCursor {
            room: room.to_owned(),
            id: since.chars().take(64).collect(),
            reason,
        };
        let (epoch, seq) = since
            .rsplit_once('-')
            .ok_or_else(|| invalid("expected {epoch}-{seq}"))?;
        if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(invalid("bad epoch"));
        }
        let seq = seq
            .parse::<u64>()
            .map_err(|_| invalid("bad sequence number"))?;
        Ok((epoch.to_owned(), seq))
    }

    /// Marks the user for the next status settle of their tenant, under the presence lock.
    fn transition(&self, presence: &mut PresenceTable, member: &Member, transition: Transition) {
        if transition != Transition::None && self.statuses.enabled() {
            presence.mark_dirty(member);
            self.statuses.mark(&member.tenant);
        }
    }
}

#[async_trait]
impl Settle for Inner {
    /// Settles and publishes under the presence lock, so that the diffs reach the tenant room in the
    /// order they were settled.
    async fn settle(&self, tenant: &str, _spaced: bool) -> Result<Outcome, BusError> {
        let mut presence = lock(&self.presence);
        let changes = presence.settle(tenant);
        for chunk in changes.chunks(MAX_CHANGES_PER_EVENT) {
            self.publish_now(diff_event(tenant, chunk));
            crate::statuses::count_published(chunk.len());
        }
        Ok(Outcome::Settled {
            audience: presence.told_online(tenant),
        })
    }
}

/// Detaches a sink from a room when the stream leaves it.
struct MemoryLease {
    room: Arc<Mutex<RoomState>>,
    id: u64,
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        let mut st = lock(&self.room);
        let attached = !st.sinks.is_empty();
        st.sinks.retain(|(id, _)| *id != self.id);
        if attached && st.sinks.is_empty() {
            metrics::gauge!(ROOMS_LOCAL).decrement(1.0);
        }
        st.last_activity = Instant::now();
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(
        &self,
        event: Event,
        idempotency_key: Option<String>,
    ) -> Result<String, BusError> {
        let Some(key) = idempotency_key else {
            return Ok(self.inner.publish_now(event));
        };
        // Held across the publish so two concurrent retries cannot both deliver.
        let mut idem = lock(&self.inner.idempotency);
        let now = Instant::now();
        idem.expire(now);
        if let Some(id) = idem.ids.get(&key) {
            return Ok(id.clone());
        }
        let id = self.inner.publish_now(event);
        idem.ids.insert(key.clone(), id.clone());
        idem.order.push_back((now, key));
        Ok(id)
    }

    async fn subscribe(
        &self,
        room: &str,
        since: Option<&str>,
        sink: &Sink,
    ) -> Result<RoomFeed, BusError> {
        let cursor = since.map(|s| self.inner.parse_since(room, s)).transpose()?;
        let inner = &self.inner;
        Ok(inner.with_room(room, |slot, st| {
        let id = inner.next_lease.fetch_add(1, Ordering::Relaxed);
        if st.sinks.is_empty() {
            metrics::gauge!(ROOMS_LOCAL).increment(1.0);
        }
        st.sinks.push((id, sink.clone()));
        let (recovery, replay) = match cursor {
            None => (Recovery::Fresh, Vec::new()),
            Some((epoch, _)) if epoch != inner.epoch => (
                Recovery::Reset(
                    "the event id is from an earlier run of this server; its history is gone".into(),
                ),
                Vec::new(),
            ),
            Some((_, seq)) if seq > inner.seq.load(Ordering::Acquire) => (
                Recovery::Reset("the event id is newer than any this server issued".into()),
                Vec::new(),
            ),
            Some((_, seq)) if seq < st.trimmed_through => (
                Recovery::Reset(format!(
                    "history no longer reaches back to that event (it keeps the last {} events per room)",
                    inner.history_size
                )),
                Vec::new(),
            ),
            Some((_, seq)) => (
                Recovery::Recovered,
                st.history
                    .iter()
                    .filter(|e| e.pos.major > seq)
                    .cloned()
                    .collect(),
            ),
        };
        // A room without events still gets a position, so a client that saw nothing can resume from here.
        let last_event_id = st.last_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                inner.epoch,
                inner.seq.load(Ordering::Acquire)
            )
        });
        RoomFeed {
            last_event_id,
            recovery,
            replay: Replay::ready(replay),
            skip_through: None,
            lease: Box::new(MemoryLease {
                room: slot.clone(),
                id,
            }),
        }
        }))
    }

    async fn connect(&self, member: &Member, rooms: &[String]) -> Result<(), BusError> {
        let mut presence = lock(&self.inner.presence);
        let transition = presence.connect(member, rooms);
        self.inner.transition(&mut presence, member, transition);
        Ok(())
    }

    async fn leave(&self, member: &Member, room: &str) -> Result<(), BusError> {
        lock(&self.inner.presence).leave(member, room);
        Ok(())
    }

    async fn disconnect(&self, member: &Member, rooms: &[String]) -> Result<(), BusError> {
        let mut presence = lock(&self.inner.presence);
        let transition = presence.disconnect(member, rooms);
        self.inner.transition(&mut presence, member, transition);
        Ok(())
    }

    async fn presence(&self, room: &str, page: &PageRequest) -> Result<PresenceSnapshot, BusError> {
        Ok(lock(&self.inner.presence).snapshot(room, page))
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

/// Forgets rooms nobody is subscribed to once they have been idle long enough.
async fn sweep(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep_once(Instant::now());
    }
}

impl Inner {
    /// Forgets the rooms idle at `now`. Each is marked `removed` under its own lock while the map's lock is
    /// held, so a caller that looked it up before cannot use it after (see [`Inner::with_room`]).
    fn sweep_once(&self, now: Instant) {
        let mut rooms = lock(&self.rooms);
        rooms.retain(|_, room| {
            let mut st = lock(room);
            let ttl = if st.history.is_empty() {
                EMPTY_ROOM_TTL.min(self.history_ttl)
            } else {
                self.history_ttl
            };
            let keep = !st.sinks.is_empty() || now.duration_since(st.last_activity) < ttl;
            if !keep {
                st.removed = true;
                self.swept_through.fetch_max(st.last_seq, Ordering::AcqRel);
            }
            keep
        });
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::sink;
    use crate::proto::v1::{event::Payload, Task, Typing};

    fn event(room: &str) -> Event {
        Event {
            room: room.into(),
            r#type: "task.created".into(),
            payload: Some(Payload::Task(Task::default())),
            ..Default::default()
        }
    }

    fn ids(items: &[Arc<StoredEvent>]) -> Vec<String> {
        items.iter().map(|e| e.id.clone()).collect()
    }

    #[tokio::test]
    async fn replays_exactly_what_was_missed_then_resets_past_the_history() {
        let bus = MemoryBus::new(3, Duration::from_secs(60));
        let (s, _rx) = sink(16);
        let mut published = Vec::new();
        for _ in 0..5 {
            published.push(bus.publish(event("tenant:t1"), None).await.unwrap());
        }
        let feed = bus
            .subscribe("tenant:t1", Some(&published[2]), &s)
            .await
            .unwrap();
        assert_eq!(feed.recovery, Recovery::Recovered);
        assert_eq!(ids(feed.replay.in_memory()), published[3..].to_vec());
        assert_eq!(feed.last_event_id, published[4]);
        // Only the last 3 are kept: events 2..5 are there, so since=#2 works and since=#1 does not.
        let feed = bus
            .subscribe("tenant:t1", Some(&published[1]), &s)
            .await
            .unwrap();
        assert_eq!(ids(feed.replay.in_memory()), published[2..].to_vec());
        let feed = bus
            .subscribe("tenant:t1", Some(&published[0]), &s)
            .await
            .unwrap();
        assert!(matches!(feed.recovery, Recovery::Reset(_)));
        let feed = bus.subscribe("tenant:t1", Some("zzz-1"), &s).await.unwrap();
        assert!(matches!(feed.recovery, Recovery::Reset(_)), "other epoch");
        assert!(bus
            .subscribe("tenant:t1", Some("nonsense"), &s)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn ephemeral_events_are_delivered_but_not_kept() {
        let bus = MemoryBus::new(10, Duration::from_secs(60));
        let (s, mut rx) = sink(16);
        let first = bus.publish(event("r"), None).await.unwrap();
        let feed = bus.subscribe("r", None, &s).await.unwrap();
        let mut typing = event("r");
        typing.payload = Some(Payload::Typing(Typing::default()));
        bus.publish(typing, None).await.unwrap();
        assert!(matches!(rx.recv().await, Some(RoomItem::Event(_))));
        let replay = bus.subscribe("r", Some(&first), &s).await.unwrap().replay;
        assert!(replay.in_memory().is_empty());
        drop(feed);
    }

    #[tokio::test]
    async fn idempotent_publish_delivers_once() {
        let bus = MemoryBus::new(10, Duration::from_secs(60));
        let (s, mut rx) = sink(16);
        let _feed = bus.subscribe("r", None, &s).await.unwrap();
        let a = bus.publish(event("r"), Some("k".into())).await.unwrap();
        let b = bus.publish(event("r"), Some("k".into())).await.unwrap();
        assert_eq!(a, b);
        assert!(rx.recv().await.is_some());
        assert!(rx.try_recv().is_none(), "delivered once");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_rooms_are_swept_and_cannot_falsely_recover() {
        let bus = MemoryBus::new(10, Duration::from_secs(100));
        let id = bus.publish(event("r"), None).await.unwrap();
        let later = bus.publish(event("r"), None).await.unwrap();
        assert_eq!(bus.room_count(), 1);
        tokio::time::sleep(Duration::from_secs(130)).await;
        assert_eq!(bus.room_count(), 0);
        let (s, _rx) = sink(4);
        let feed = bus.subscribe("r", Some(&id), &s).await.unwrap();
        assert!(matches!(feed.recovery, Recovery::Reset(_)));
        let feed = bus.subscribe("r", Some(&later), &s).await.unwrap();
        assert_eq!(feed.recovery, Recovery::Recovered);
    }

    /// Makes the next room lookup of `bus` sweep, as if the sweeper ran between the lookup and the lock,
    /// at a time when every room without subscribers is idle.
    fn sweep_between_lookup_and_lock(bus: &MemoryBus) {
        *lock(&bus.inner.between_lookup_and_lock) = Some(Box::new(|inner: &Inner| {
            inner.sweep_once(Instant::now() + Duration::from_secs(24 * 3600));
        }));
    }

    #[tokio::test]
    async fn a_subscribe_racing_the_sweeper_is_not_left_on_a_forgotten_room() {
        let bus = MemoryBus::new(10, Duration::from_secs(60));
        bus.publish(event("r"), None).await.unwrap();
        sweep_between_lookup_and_lock(&bus);
        let (s, mut rx) = sink(16);
        let _feed = bus.subscribe("r", None, &s).await.unwrap();
        let id = bus.publish(event("r"), None).await.unwrap();
        match rx.try_recv() {
            Some(RoomItem::Event(e)) => assert_eq!(e.id, id),
            other => panic!("the subscriber missed the event: {other:?}"),
        }
        assert_eq!(bus.room_count(), 1);
    }

    #[tokio::test]
    async fn a_publish_racing_the_sweeper_is_kept_and_delivered() {
        let bus = MemoryBus::new(10, Duration::from_secs(60));
        let first = bus.publish(event("r"), None).await.unwrap();
        sweep_between_lookup_and_lock(&bus);
        let id = bus.publish(event("r"), None).await.unwrap();
        assert_eq!(bus.room_count(), 1, "the event's room is in the map");
        let (s, _rx) = sink(16);
        let feed = bus.subscribe("r", Some(&first), &s).await.unwrap();
        // Everything after `first` is still known, so recovery from it is claimed: it must include `id`.
        assert_eq!(feed.recovery, Recovery::Recovered);
        assert_eq!(ids(feed.replay.in_memory()), std::slice::from_ref(&id));
        assert_eq!(feed.last_event_id, id);
    }
}
