//! `Subscribe`: one server stream for a set of rooms.
//!
//! Order on the wire: `Subscribed` (where each room stands), then per room a `Reset` or the replay of what
//! the client missed, then live events and heartbeats. The stream ends by itself, with the last event id
//! delivered per room in the status, when the client falls too far behind (`RESOURCE_EXHAUSTED`), when the
//! token expires (`UNAUTHENTICATED`), when the server shuts down or closes its connection, or the bus
//! cannot read the history being replayed (`UNAVAILABLE`). The replay is read a page at a time as the
//! client takes it. A stream the transport stops polling (the client withholds flow-control window) cannot
//! end itself: [`crate::watchdog`] ends it from outside. Each user may hold `--max-streams-per-user`.
//!
//! Membership commands ([`crate::admin`]) reach the stream through its registration: a removed room is
//! detached and announced with `Removed` (events of it still queued are dropped, and it leaves the resume
//! map and the room's presence); a disconnect ends the stream with `PERMISSION_DENIED`, a revocation of its token with
//! `UNAUTHENTICATED` and the resume map. They are acted on in the live loop; during a replay only an
//! ending is (between pages), a removal waits for the replay's end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::{FutureExt as _, Stream, StreamExt as _, TryStreamExt as _};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::EventApi;
use crate::admin::{Ending, LiveTicket, StreamControl};
use crate::auth::Principal;
use crate::bus::{
    sink_with_bytes, Bus, BusError, Lease, Page, Position, Recovery, RoomFeed, RoomItem, Sink,
    StoredEvent,
};
use crate::error::{ServiceError, StreamEnd};
use crate::limits::StreamPermit;
use crate::metrics::{StreamGuard, EVENTS_DELIVERED};
use crate::policy;
use crate::presence::Member;
use crate::proto::v1::{
    subscribe_response::Kind, Heartbeat, Removed, Reset, RoomPosition, SubscribeRequest, Subscribed,
};
use crate::watchdog::{ConnectionHandle, Watched};
use crate::wire::SharedResponse;
use tokio_util::sync::CancellationToken;

/// Attaching one room: the `since` it was given, and the bus's feed.
type Attach<'a> = BoxFuture<'a, Result<(Option<&'a str>, RoomFeed), BusError>>;

/// Rooms of one `Subscribe` attached at the same time.
const SUBSCRIBE_CONCURRENCY: usize = 16;
/// Queued items a stream takes in a row before it looks at its timer and shutdown token again.
const FAST_PATH_BURST: usize = 64;

/// The stream type of `Subscribe`: pre-encoded responses.
pub(crate) type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<SharedResponse, Status>> + Send>>;

impl EventApi {
    /// Validates and authorises the request, attaches the stream to every room and returns it.
    pub(super) async fn open_stream(
        &self,
        principal: Arc<Principal>,
        connection: Option<ConnectionHandle>,
        req: SubscribeRequest,
    ) -> Result<SubscribeStream, ServiceError> {
        let rooms = self.validate(&principal, &req)?;
        let inner = self.inner.clone();
        // Before attaching to anything, so a refused stream costs nothing.
        let permit = inner.user_streams.acquire(&principal)?;
        // Before attaching too, so a membership command sent meanwhile is not missed; and a revocation
        // that arrived after the interceptor let the token through is caught here.
        let canonical: Vec<String> = rooms.iter().map(|r| r.canonical.clone()).collect();
        let live = inner.live.register(&principal, &canonical);
        inner.live.revocations().check(&principal)?;
        let (sink, mut inbox) =
            sink_with_bytes(inner.limits.stream_queue, inner.limits.stream_queue_bytes);

        // Attach to every room before anything is sent, so nothing published from here on is missed; a
        // few rooms at a time, so that the bus can batch their subscriptions.
        let attach: Vec<Attach<'_>> = rooms
            .iter()
            .map(|room| {
                let since = req
                    .since
                    .get(&room.name)
                    .map(String::as_str)
                    .filter(|id| !id.is_empty());
                let (bus, sink) = (&inner.bus, &sink);
                async move {
                    bus.subscribe(&room.canonical, since, sink)
                        .await
                        .map(|feed| (since, feed))
                }
                .boxed()
            })
            .collect();
        let feeds: Vec<_> = futures::stream::iter(attach)
            .buffered(SUBSCRIBE_CONCURRENCY)
            .try_collect()
            .await?;
        let mut first = Vec::with_capacity(rooms.len());
        let mut replays = Vec::with_capacity(rooms.len());
        let mut leases: Vec<(String, Lease)> = Vec::with_capacity(rooms.len());
        let mut position = Resume::with_capacity(rooms.len());
        let mut newest = Newest::default();
        let mut aliases = Aliases::default();
        for (room, (since, feed)) in rooms.iter().zip(feeds) {
            if room.name != room.canonical {
                aliases
                    .0
                    .push((room.canonical.as_str().into(), room.name.clone()));
            }
            let recovered = feed.recovery == Recovery::Recovered;
            let reset = match feed.recovery {
                Recovery::Reset(reason) => Some(reason),
                _ => None,
            };
            if let Some(through) = feed.skip_through {
                newest.seed(room.canonical.as_str().into(), through);
            }
            first.push(RoomPosition {
                room: room.name.clone(),
                last_event_id: feed.last_event_id.clone(),
                recovered,
            });
            // Until its replay is sent, a room stands where the client said.
            let start = since.filter(|_| recovered).unwrap_or(&feed.last_event_id);
            position.set(&room.name, start);
            replays.push((room.name.clone(), reset, feed.replay, feed.last_event_id));
            leases.push((room.canonical.clone(), feed.lease));
        }
        aliases.0.shrink_to_fit();
        let subscribed =
            SharedResponse::from_message(Kind::Subscribed(Subscribed { rooms: first }));

        let presence = PresenceGuard::connect(&inner, &principal, &canonical).await?;
        let mut held = Held {
            leases,
            presence,
            live,
            _sink: sink,
            _permit: permit,
        };
        let server_shutdown = inner.shutdown.clone();
        // Cancelled on shutdown (a child of the server's token) and when the server closes the connection.
        let closing = connection
            .as_ref()
            .map_or_else(|| server_shutdown.clone(), |c| c.closing().clone());
        let heartbeat_every = inner.limits.heartbeat;
        let expires = Instant::now()
            + principal
                .valid_until
                .duration_since(SystemTime::now())
                .unwrap_or_default();
        let ticket = inner.watchdog.register(expires, connection);
        let watched = ticket.watched();
        tracing::debug!(user = %principal.user_id, rooms = ?canonical, "stream opened");

        let stream = async_stream::stream! {
            // `held` and the other captured values are used in place, never moved into locals: each
            // such move would keep a second copy in the stream's state for its whole life.
            let control = held.control().clone();
            // Rooms taken off by `AdminService.Unsubscribe` (canonical), and a disconnect's reason.
            let mut removed: HashSet<Arc<str>> = HashSet::new();
            let mut disconnected: Option<String> = None;
            let mut metrics = StreamGuard::open(Some(watched.clone()));
            let delivered = metrics::counter!(EVENTS_DELIVERED);
            yield Ok(subscribed);
            // Per room a Reset or its replay, read a page at a time as the client takes it. Between pages
            // the stream stops for shutdown and token expiry as it does when live.
            let mut replay_end = None;
            'rooms: for (room, reset, mut replay, last_event_id) in replays {
                if let Some(reason) = reset {
                    yield Ok(SharedResponse::from_message(Kind::Reset(Reset { room, reason })));
                    continue;
                }
                loop {
                    if closing.is_cancelled() {
                        replay_end = Some(closed_end(&watched, &server_shutdown));
                        break 'rooms;
                    }
                    if Instant::now() >= expires {
                        replay_end = Some(StreamEnd::TokenExpired);
                        break 'rooms;
                    }
                    if let Some(ending) = control.ending() {
                        replay_end = Some(ending_of(ending, &mut disconnected));
                        break 'rooms;
                    }
                    match replay.next_page().await {
                        Ok(Page::Events(events)) => {
                            for event in events {
                                position.advance(&room, &event.id);
                                yield Ok(aliases.frame(event));
                            }
                        }
                        Ok(Page::Reset(reason)) => {
                            // The history went while it was read: the room stands at its end.
                            position.set(&room, &last_event_id);
                            yield Ok(SharedResponse::from_message(Kind::Reset(Reset { room: room.clone(), reason })));
                            break;
                        }
                        Ok(Page::Done) => break,
                        Err(error) => {
                            tracing::warn!(room = %room, %error, "history replay failed: ending the stream");
                            replay_end = Some(StreamEnd::BusUnavailable);
                            break 'rooms;
                        }
                    }
                }
            }
            if let Some(end) = replay_end {
                metrics.ended(end);
                yield Err(Status::from(stream_ended(end, disconnected, position)));
                return;
            }
            // One timer for the next heartbeat and the token's expiry, and this stream's own cancellation
            // token (a child of its connection's), so that waiting costs no lock other streams share.
            let mut next_heartbeat = Instant::now() + heartbeat_every;
            let timer = tokio::time::sleep_until(next_heartbeat.min(expires));
            tokio::pin!(timer);
            let shutdown = closing.child_token();
            let cancelled = shutdown.cancelled();
            tokio::pin!(cancelled);
            let mut burst = 0;
            let mut uncounted = 0;
            let end = loop {
                // Fast path: items already queued are taken without polling the timer and the token. After
                // FAST_PATH_BURST of them those are polled anyway, so a stream that never runs dry still
                // heartbeats, expires and shuts down on time.
                let queued = if burst < FAST_PATH_BURST { inbox.try_recv() } else { None };
                let item = match queued {
                    Some(item) => {
                        burst += 1;
                        item
                    }
                    None => {
                        burst = 0;
                        if uncounted > 0 {
                            delivered.increment(std::mem::take(&mut uncounted));
                        }
                        tokio::select! {
                            biased;
                            _ = &mut cancelled => break closed_end(&watched, &server_shutdown),
                            _ = control.changed() => {
                                let (taken_off, ending) = control.take();
                                for (room, reason) in taken_off {
                                    held.leave(&room).await;
                                    newest.forget(&room);
                                    let name = aliases.name(&room).to_owned();
                                    position.remove(&name);
                                    removed.insert(room.into());
                                    tracing::debug!(room = %name, "room removed from the stream");
                                    yield Ok(SharedResponse::from_message(Kind::Removed(Removed { room: name, reason })));
                                }
                                if let Some(ending) = ending {
                                    break ending_of(ending, &mut disconnected);
                                }
                                continue;
                            }
                            _ = &mut timer => {
                                let now = Instant::now();
                                if now >= expires {
                                    break StreamEnd::TokenExpired;
                                }
                                if now >= next_heartbeat {
                                    next_heartbeat = now + heartbeat_every;
                                    inbox.release_idle();
                                    let time = Some(prost_types::Timestamp::from(SystemTime::now()));
                                    yield Ok(SharedResponse::from_message(Kind::Heartbeat(Heartbeat { time })));
                                }
                                timer.as_mut().reset(next_heartbeat.min(expires));
                                continue;
                            }
                            item = inbox.recv() => match item {
                                Some(item) => item,
                                None => break StreamEnd::SlowConsumer,
                            },
                        }
                    }
                };
                match item {
                    RoomItem::Event(event) => {
                        if !removed.is_empty() && removed.contains(&event.room) {
                            continue;
                        }
                        if !newest.advance(&event) {
                            continue;
                        }
                        position.advance(aliases.name(&event.room), &event.id);
                        uncounted += 1;
                        yield Ok(aliases.frame(event));
                    }
                    RoomItem::Reset { room, .. } if removed.contains(&room) => continue,
                    RoomItem::Reset { room, reason } => {
                        // What follows a Reset may start over (a new epoch of the room's history).
                        newest.forget(&room);
                        yield Ok(SharedResponse::from_message(Kind::Reset(Reset {
                            room: aliases.name(&room).to_owned(),
                            reason: reason.to_string(),
                        })));
                    }
                }
            };
            delivered.increment(uncounted);
            tracing::debug!(reason = %end, "stream ended by the server");
            metrics.ended(end);
            yield Err(Status::from(stream_ended(end, disconnected, position)));
        };
        Ok(Box::pin(ticket.wrap(Box::pin(stream))))
    }

    /// Room grammar, limits and policy; all or nothing. Returns the rooms without duplicates, in order,
    /// with the `user:{sub}` shorthand resolved.
    fn validate(
        &self,
        p: &Principal,
        req: &SubscribeRequest,
    ) -> Result<Vec<StreamRoom>, ServiceError> {
        if req.rooms.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "rooms is empty: name at least one room".into(),
            ));
        }
        let max = self.inner.limits.max_rooms_per_subscribe;
        let mut seen = HashSet::new();
        let names: Vec<&String> = req
            .rooms
            .iter()
            .filter(|r| seen.insert(r.as_str()))
            .collect();
        if names.len() > max {
            return Err(ServiceError::InvalidArgument(format!(
                "{} rooms requested; at most {max} per Subscribe (--max-rooms-per-subscribe)",
                names.len()
            )));
        }
        let mut rooms: Vec<StreamRoom> = Vec::with_capacity(names.len());
        for name in names {
            let room = super::authorize(p, name, policy::may_join)?;
            let canonical = room.to_string();
            // `user:u1` and `tenant:t1:user:u1` are one room: carrying it twice would deliver twice.
            if let Some(twin) = rooms.iter().find(|r| r.canonical == canonical) {
                return Err(ServiceError::InvalidArgument(format!(
                    "rooms {:?} and {name:?} are the same room: name it once",
                    twin.name
                )));
            }
            rooms.push(StreamRoom {
                name: name.clone(),
                canonical,
            });
        }
        if let Some(stray) = req.since.keys().find(|r| !seen.contains(r.as_str())) {
            return Err(ServiceError::InvalidArgument(format!(
                "since names room {stray:?}, which is not in rooms"
            )));
        }
        Ok(rooms)
    }
}

/// The stream's end for an administrative command (noting a disconnect's reason).
fn ending_of(ending: Ending, disconnected: &mut Option<String>) -> StreamEnd {
    match ending {
        Ending::Revoked => StreamEnd::TokenRevoked,
        Ending::Disconnected(reason) => {
            *disconnected = Some(reason);
            StreamEnd::Disconnected
        }
    }
}

/// The error a stream ends with: a disconnect names its reason and no resume map (the client must not
/// come back); every other end names the resume map.
fn stream_ended(end: StreamEnd, disconnected: Option<String>, since: Resume) -> ServiceError {
    match (end, disconnected) {
        (StreamEnd::Disconnected, reason) => ServiceError::Disconnected {
            reason: reason
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "no reason given".into()),
        },
        (reason, _) => ServiceError::StreamEnded {
            reason,
            since: since.into_map(),
        },
    }
}

/// Why a stream whose connection token was cancelled ends: the watchdog's verdict, else shutdown, else the
/// server closed its connection.
fn closed_end(watched: &Watched, server_shutdown: &CancellationToken) -> StreamEnd {
    match watched.verdict() {
        Some(verdict) => verdict,
        None if server_shutdown.is_cancelled() => StreamEnd::ShuttingDown,
        None => StreamEnd::ConnectionClosed,
    }
}

/// A room of a stream: the name the client gave, and the canonical name the bus and presence use. They
/// differ only for the `user:{sub}` shorthand; the client always sees its own name (in `Subscribed`,
/// events, resets and the resume map), so its `since` keeps matching what it subscribed with.
struct StreamRoom {
    name: String,
    canonical: String,
}

/// What a stream holds until it ends, dropped with it: the attachments to its rooms (dropping one detaches
/// the inbox from its room), its presence, its registration for membership commands, a sink of its own
/// inbox and the user's stream slot.
struct Held {
    /// Per room (canonical), its attachment. A list: a stream has few rooms, and a map costs more.
    leases: Vec<(String, Lease)>,
    presence: PresenceGuard,
    live: LiveTicket,
    _sink: Sink,
    _permit: StreamPermit,
}

impl Held {
    /// What membership commands ask of this stream.
    fn control(&self) -> &Arc<StreamControl> {
        self.live.control()
    }

    /// The stream no longer carries `room` (canonical): detached, and no longer counted there.
    async fn leave(&mut self, room: &str) {
        self.leases.retain(|(r, _)| r != room);
        self.presence.leave(room).await;
    }
}

/// Per room (the client's name), the last event id it was sent: the resume map. Sorted by room, as the
/// status names them; a list rather than a map (a B-tree node is 544 bytes, most streams have a few rooms).
struct Resume(Vec<(String, String)>);

impl Resume {
    fn with_capacity(rooms: usize) -> Self {
        Self(Vec::with_capacity(rooms))
    }

    /// `room` stands at `id` (it is added if missing).
    fn set(&mut self, room: &str, id: &str) {
        match self.0.binary_search_by(|(r, _)| r.as_str().cmp(room)) {
            Ok(i) => {
                let last = &mut self.0[i].1;
                last.clear();
                last.push_str(id);
            }
            Err(i) => self.0.insert(i, (room.to_owned(), id.to_owned())),
        }
    }

    /// `room`, if the stream still carries it, was sent `id`. Reuses the id's buffer: no allocation per
    /// event.
    fn advance(&mut self, room: &str, id: &str) {
        if let Ok(i) = self.0.binary_search_by(|(r, _)| r.as_str().cmp(room)) {
            let last = &mut self.0[i].1;
            last.clear();
            last.push_str(id);
        }
    }

    fn remove(&mut self, room: &str) {
        if let Ok(i) = self.0.binary_search_by(|(r, _)| r.as_str().cmp(room)) {
            self.0.remove(i);
        }
    }

    fn into_map(self) -> BTreeMap<String, String> {
        self.0.into_iter().collect()
    }
}

/// Canonical room -> the name the client gave, for the rooms where they differ (only the `user:{sub}`
/// shorthand, so at most one per stream: a list).
#[derive(Default)]
struct Aliases(Vec<(Arc<str>, String)>);

impl Aliases {
    /// The client's name for a canonical room.
    fn name<'a>(&'a self, canonical: &'a str) -> &'a str {
        self.get(canonical).unwrap_or(canonical)
    }

    fn get(&self, canonical: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(c, _)| &**c == canonical)
            .map(|(_, name)| name.as_str())
    }

    /// A stored event's frame, as this client must see it: shared as is, or re-encoded with the client's
    /// name for the room (only for the shorthand, so the fan-out path stays shared for every other room).
    fn frame(&self, event: Arc<StoredEvent>) -> SharedResponse {
        match self.get(&event.room) {
            None => SharedResponse::from_stored(event),
            Some(name) => event.frame.with_event_room(name),
        }
    }
}

/// Per room, the newest event a stream delivered (first: the end of its replay). Anything at or before it
/// is dropped, so the ids on the wire, and the resume position, only ever move forward.
#[derive(Default)]
struct Newest(HashMap<Arc<str>, (Position, Option<String>)>);

impl Newest {
    /// Live items at or before `through` were replayed already.
    fn seed(&mut self, room: Arc<str>, through: Position) {
        self.0.insert(room, (through, None));
    }

    /// Whether `event` is newer than what this stream delivered in its room; it becomes the newest if so.
    /// Several ephemeral events can share a position (those after one stored event): at an equal
    /// position only the same event again, or the replay's end, is old.
    fn advance(&mut self, event: &StoredEvent) -> bool {
        match self.0.get_mut(&event.room) {
            None => {
                self.0
                    .insert(event.room.clone(), (event.pos, Some(event.id.clone())));
            }
            Some((pos, last)) => {
                let old = match event.pos.cmp(pos) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Equal => last.as_ref().is_none_or(|l| *l == event.id),
                    std::cmp::Ordering::Greater => false,
                };
                if old {
                    return false;
                }
                *pos = event.pos;
                // `clone_from` reuses the buffer: no allocation per event.
                match last {
                    Some(last) => last.clone_from(&event.id),
                    None => *last = Some(event.id.clone()),
                }
            }
        }
        true
    }

    /// After a `Reset` positions may start over.
    fn forget(&mut self, room: &str) {
        self.0.remove(room);
    }
}

/// Presence of one stream: counted on open, removed (in the background, tracked by the service's
/// [`TaskTracker`]) when dropped.
///
/// Cancel-safe: the guard exists before the bus is asked to count the connection, so if the Subscribe is
/// dropped mid-connect (client cancelled, deadline) or the connect fails, the disconnect still runs and
/// a status the connect may already have published is answered by OFFLINE.
struct PresenceGuard {
    bus: Arc<dyn Bus>,
    member: Option<Member>,
    rooms: Vec<String>,
    cleanup: TaskTracker,
}

impl PresenceGuard {
    async fn connect(
        inner: &super::Inner,
        p: &Principal,
        rooms: &[String],
    ) -> Result<Self, ServiceError> {
        // Services are not people: they are not counted and never go ONLINE.
        let member = match (&p.tenant, p.is_publisher()) {
            (Some(tenant), false) => Some(Member {
                user_id: p.user_id.clone(),
                tenant: tenant.clone(),
                connection_id: inner.connection_ids.next(),
            }),
            _ => None,
        };
        let guard = Self {
            bus: inner.bus.clone(),
            member,
            rooms: rooms.to_vec(),
            cleanup: inner.cleanup.clone(),
        };
        if let Some(member) = &guard.member {
            // Dropped here (cancelled) or returning the error: `guard`'s drop disconnects.
            guard.bus.connect(member, rooms).await?;
        }
        Ok(guard)
    }

    /// The stream left `room` (canonical): it no longer counts there. A failure is logged (with Redis the
    /// entry expires by itself).
    async fn leave(&mut self, room: &str) {
        let Some(member) = &self.member else { return };
        self.rooms.retain(|r| r != room);
        if let Err(e) = self.bus.leave(member, room).await {
            tracing::warn!(user = %member.user_id, room, error = %e, "presence update failed");
        }
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let Some(member) = self.member.take() else {
            return;
        };
        let bus = self.bus.clone();
        let rooms = std::mem::take(&mut self.rooms);
        if tokio::runtime::Handle::try_current().is_ok() {
            self.cleanup.spawn(async move {
                if let Err(e) = bus.disconnect(&member, &rooms).await {
                    tracing::warn!(user = %member.user_id, error = %e, "presence update failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::Event;

    fn event(room: &str, id: &str, major: u64, minor: u64) -> Arc<StoredEvent> {
        let e = Event {
            id: id.into(),
            room: room.into(),
            ..Default::default()
        };
        Arc::new(StoredEvent::new(Position { major, minor }, room.into(), &e))
    }

    #[test]
    fn the_resume_map_is_sorted_by_room_and_forgets_removed_rooms() {
        let mut resume = Resume::with_capacity(3);
        resume.set("tenant:t1", "e:1-0");
        resume.set("user:u1", "e:2-0");
        resume.set("tenant:t1:project:p1", "e:0-0");
        resume.advance("tenant:t1", "e:3-0");
        resume.advance("gone", "e:4-0");
        resume.set("user:u1", "e:5-0");
        resume.remove("tenant:t1:project:p1");
        let map = resume.into_map();
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            vec![
                ("tenant:t1".to_owned(), "e:3-0".to_owned()),
                ("user:u1".to_owned(), "e:5-0".to_owned()),
            ]
        );
    }

    #[test]
    fn a_stream_only_moves_forward_per_room() {
        let mut newest = Newest::default();
        newest.seed(
            "r".into(),
            Position {
                major: 10,
                minor: 4,
            },
        );
        // At or before the replay's end: already delivered.
        assert!(!newest.advance(&event("r", "e:10-1", 10, 2)));
        assert!(!newest.advance(&event("r", "e:10-2", 10, 4)));
        // Two ephemeral events after one stored event share a position; the same one twice does not pass.
        assert!(newest.advance(&event("r", "e:10-2.1", 10, 5)));
        assert!(!newest.advance(&event("r", "e:10-2.1", 10, 5)));
        assert!(newest.advance(&event("r", "e:10-2.2", 10, 5)));
        assert!(newest.advance(&event("r", "e:11-0", 11, 0)));
        // A typing event from before it, late: dropped (it would move the resume position back).
        assert!(!newest.advance(&event("r", "e:10-2.3", 10, 5)));
        // Other rooms are independent; a room without a seed takes its first event.
        assert!(newest.advance(&event("q", "e:1-0", 1, 0)));
        // After a Reset a new epoch starts low again.
        newest.forget("r");
        assert!(newest.advance(&event("r", "f:1-0", 1, 0)));
    }
}
