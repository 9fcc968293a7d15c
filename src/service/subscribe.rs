//! `Subscribe`: one server stream for a set of rooms.
//!
//! Order on the wire: `Subscribed` (where each room stands), then per room a `Reset` or the replay of what
//! the client missed, then live events and heartbeats. The stream ends by itself, with the last event id
//! delivered per room in the status, when the client falls too far behind (`RESOURCE_EXHAUSTED`), when the
//! token expires (`UNAUTHENTICATED`) or when the server shuts down (`UNAVAILABLE`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::EventApi;
use crate::auth::Principal;
use crate::bus::{sink, Bus, Lease, Position, Recovery, RoomItem};
use crate::error::{ServiceError, StreamEnd};
use crate::metrics::{StreamGuard, EVENTS_DELIVERED};
use crate::policy;
use crate::presence::Member;
use crate::proto::v1::{
    subscribe_response::Kind, Heartbeat, Reset, RoomPosition, SubscribeRequest, Subscribed,
};
use crate::rooms::Room;
use crate::wire::SharedResponse;

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
        req: SubscribeRequest,
    ) -> Result<SubscribeStream, ServiceError> {
        let rooms = self.validate(&principal, &req)?;
        let inner = self.inner.clone();
        let (sink, mut inbox) = sink(inner.limits.stream_queue);

        // Attach to every room before anything is sent, so nothing published from here on is missed.
        let mut first = Vec::with_capacity(rooms.len());
        let mut pending = Vec::new();
        let mut leases: Vec<Lease> = Vec::with_capacity(rooms.len());
        let mut position: BTreeMap<String, String> = BTreeMap::new();
        let mut skip: HashMap<Arc<str>, Position> = HashMap::new();
        for room in &rooms {
            let since = req
                .since
                .get(room)
                .map(String::as_str)
                .filter(|id| !id.is_empty());
            let feed = inner.bus.subscribe(room, since, &sink).await?;
            let recovered = feed.recovery == Recovery::Recovered;
            if let Recovery::Reset(reason) = &feed.recovery {
                pending.push(SharedResponse::from_message(Kind::Reset(Reset {
                    room: room.clone(),
                    reason: reason.clone(),
                })));
            }
            pending.extend(feed.replay.iter().map(|e| e.frame.clone()));
            if let Some(through) = feed.skip_through {
                skip.insert(room.as_str().into(), through);
            }
            first.push(RoomPosition {
                room: room.clone(),
                last_event_id: feed.last_event_id.clone(),
                recovered,
            });
            position.insert(room.clone(), feed.last_event_id);
            leases.push(feed.lease);
        }
        let subscribed =
            SharedResponse::from_message(Kind::Subscribed(Subscribed { rooms: first }));

        let presence = PresenceGuard::connect(&inner, &principal, &rooms).await?;
        let shutdown = inner.shutdown.clone();
        let heartbeat_every = inner.limits.heartbeat;
        let expires = Instant::now()
            + principal
                .valid_until
                .duration_since(SystemTime::now())
                .unwrap_or_default();
        tracing::debug!(user = %principal.user_id, rooms = ?rooms, "stream opened");

        let stream = async_stream::stream! {
            // Dropped with the stream: detaches from the rooms and updates presence.
            let _leases = leases;
            let _presence = presence;
            let _sink = sink;
            let mut metrics = StreamGuard::open();
            let delivered = metrics::counter!(EVENTS_DELIVERED);
            yield Ok(subscribed);
            for frame in pending {
                yield Ok(frame);
            }
            // One timer for the next heartbeat and the token's expiry, and this stream's own cancellation
            // token (a child of the server's), so that waiting costs no lock other streams share.
            let mut next_heartbeat = Instant::now() + heartbeat_every;
            let timer = tokio::time::sleep_until(next_heartbeat.min(expires));
            tokio::pin!(timer);
            let shutdown = shutdown.child_token();
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
                            _ = &mut cancelled => break StreamEnd::ShuttingDown,
                            _ = &mut timer => {
                                let now = Instant::now();
                                if now >= expires {
                                    break StreamEnd::TokenExpired;
                                }
                                if now >= next_heartbeat {
                                    next_heartbeat = now + heartbeat_every;
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
                        if skip.get(&event.room).is_some_and(|through| event.pos <= *through) {
                            continue;
                        }
                        if let Some(last) = position.get_mut(&*event.room) {
                            last.clone_from(&event.id);
                        }
                        uncounted += 1;
                        yield Ok(SharedResponse::from_stored(event));
                    }
                    RoomItem::Reset { room, reason } => {
                        yield Ok(SharedResponse::from_message(Kind::Reset(Reset {
                            room: room.to_string(),
                            reason: reason.to_string(),
                        })));
                    }
                }
            };
            delivered.increment(uncounted);
            tracing::debug!(reason = %end, "stream ended by the server");
            metrics.ended(end);
            yield Err(Status::from(ServiceError::StreamEnded { reason: end, since: position }));
        };
        Ok(Box::pin(stream))
    }

    /// Room grammar, limits and policy; all or nothing. Returns the rooms without duplicates, in order.
    fn validate(&self, p: &Principal, req: &SubscribeRequest) -> Result<Vec<String>, ServiceError> {
        if req.rooms.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "rooms is empty: name at least one room".into(),
            ));
        }
        let max = self.inner.limits.max_rooms_per_subscribe;
        let mut seen = HashSet::new();
        let rooms: Vec<String> = req
            .rooms
            .iter()
            .filter(|r| seen.insert(r.as_str()))
            .cloned()
            .collect();
        if rooms.len() > max {
            return Err(ServiceError::InvalidArgument(format!(
                "{} rooms requested; at most {max} per Subscribe (--max-rooms-per-subscribe)",
                rooms.len()
            )));
        }
        for name in &rooms {
            policy::may_join(p, &Room::parse(name)?)?;
        }
        if let Some(stray) = req.since.keys().find(|r| !seen.contains(r.as_str())) {
            return Err(ServiceError::InvalidArgument(format!(
                "since names room {stray:?}, which is not in rooms"
            )));
        }
        Ok(rooms)
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
