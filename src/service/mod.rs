//! The `lamplight.v1.EventService` implementation: request validation, policy checks, and calls into the
//! [`Bus`]. It never knows which bus is running. Authentication already happened (see [`crate::auth`]).

mod presence_page;
mod subscribe;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::admin::LiveStreams;
use crate::auth::{self, Principal};
use crate::bus::Bus;
use crate::config::Config;
use crate::error::ServiceError;
use crate::limits::UserStreams;
use crate::metrics::{EVENTS_PUBLISHED, PUBLISH_DURATION};
use crate::policy;
use crate::presence::{ConnectionIds, PageRequest};
use crate::proto::server::event_service_server::EventService;
use crate::proto::v1::{
    event::Payload, Event, GetPresenceRequest, GetPresenceResponse, PublishRequest,
    PublishResponse, SetTypingRequest, SetTypingResponse, SubscribeRequest, Typing,
};
use crate::ratelimit::RateLimiter;
use crate::rooms::Room;
use crate::watchdog::{ConnectionHandle, Watchdog};

/// Longest event `type` accepted.
pub const MAX_TYPE_LEN: usize = 128;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// Room of the longest id the bus may assign, reserved when checking an event against the size limit.
const ID_RESERVE: usize = 48;

/// Limits and timings the service enforces (from [`Config`]).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Maximum rooms in one `Subscribe`.
    pub max_rooms_per_subscribe: usize,
    /// Maximum encoded event size.
    pub max_event_bytes: usize,
    /// Per-stream queue, in events.
    pub stream_queue: usize,
    /// Per-stream queue, in bytes of encoded events.
    pub stream_queue_bytes: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Open streams per user on this node.
    pub max_streams_per_user: usize,
    /// How long a stream may have something to send and send nothing before it is ended.
    pub stream_stall: Duration,
}

impl Limits {
    /// The limits in `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_rooms_per_subscribe: config.max_rooms_per_subscribe,
            max_event_bytes: config.max_event_bytes,
            stream_queue: config.stream_queue,
            stream_queue_bytes: config.stream_queue_bytes,
            heartbeat: config.heartbeat(),
            max_streams_per_user: config.max_streams_per_user,
            stream_stall: Duration::from_secs(config.stream_stall_secs),
        }
    }
}

/// The gRPC service. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct EventApi {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Arc<dyn Bus>,
    limits: Limits,
    typing: RateLimiter,
    shutdown: CancellationToken,
    connection_ids: ConnectionIds,
    /// Presence clean-up spawned when streams end; [`crate::serve`] waits for it within the grace period.
    cleanup: TaskTracker,
    user_streams: Arc<UserStreams>,
    watchdog: Watchdog,
    live: Arc<LiveStreams>,
}

impl EventApi {
    /// A service over `bus`. Open streams end with `UNAVAILABLE` when `shutdown` is cancelled, and are
    /// registered in `live` for membership commands ([`crate::admin`]). Starts the stream watchdog
    /// ([`crate::watchdog`]) in the current tokio runtime.
    pub fn new(
        bus: Arc<dyn Bus>,
        limits: Limits,
        typing_per_sec: u32,
        shutdown: CancellationToken,
        live: Arc<LiveStreams>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                bus,
                user_streams: UserStreams::new(limits.max_streams_per_user),
                watchdog: Watchdog::start(limits.stream_stall, shutdown.clone()),
                limits,
                typing: RateLimiter::new(typing_per_sec),
                shutdown,
                connection_ids: ConnectionIds::new(),
                cleanup: TaskTracker::new(),
                live,
            }),
        }
    }

    /// The presence clean-up still running for streams that ended (see [`crate::serve`]'s shutdown).
    pub fn cleanup_tasks(&self) -> TaskTracker {
        self.inner.cleanup.clone()
    }

    async fn publish(&self, p: &Principal, req: PublishRequest) -> Result<String, ServiceError> {
        let started = std::time::Instant::now();
        let mut event = req
            .event
            .ok_or_else(|| ServiceError::InvalidArgument("event is required".into()))?;
        let room = authorize(p, &event.room, policy::may_publish)?;
        // History, ids and fan-out use the canonical name, whichever spelling the publisher used.
        event.room = room.to_string();
        validate_type(&event.r#type)?;
        if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(ServiceError::InvalidArgument(format!(
                "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_LEN}",
                req.idempotency_key.len()
            )));
        }
        event.id.clear();
        event.time = Some(prost_types::Timestamp::from(SystemTime::now()));
        event.publisher_id = p.user_id.clone();
        self.check_size(&event)?;
        // Keys are per publisher: two services cannot collide on each other's keys.
        let key = (!req.idempotency_key.is_empty())
            .then(|| format!("{}\n{}", p.user_id, req.idempotency_key));
        let id = self.inner.bus.publish(event, key).await?;
        metrics::histogram!(PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(EVENTS_PUBLISHED, "kind" => "publish").increment(1);
        Ok(id)
    }

    fn check_size(&self, event: &Event) -> Result<(), ServiceError> {
        let size = event.encoded_len() + ID_RESERVE;
        let limit = self.inner.limits.max_event_bytes;
        if size > limit {
            return Err(ServiceError::InvalidArgument(format!(
                "event is {size} bytes encoded; the limit is {limit} (--max-event-bytes)"
            )));
        }
        Ok(())
    }

    async fn set_typing(&self, p: &Principal, req: SetTypingRequest) -> Result<(), ServiceError> {
        let room = authorize(p, &req.channel_room, policy::may_type)?;
        let Room::Channel { channel, .. } = &room else {
            unreachable!("may_type admits channel rooms only")
        };
        if !self.inner.typing.try_acquire(&p.user_id) {
            return Err(ServiceError::RateLimited(
                "too many SetTyping calls: slow down (a few per second per user)".into(),
            ));
        }
        let event = Event {
            room: room.to_string(),
            r#type: "typing".into(),
            time: Some(prost_types::Timestamp::from(SystemTime::now())),
            publisher_id: p.user_id.clone(),
            payload: Some(Payload::Typing(Typing {
                channel_id: channel.clone(),
                user_id: p.user_id.clone(),
                is_typing: req.is_typing,
            })),
            ..Default::default()
        };
        self.inner.bus.publish(event, None).await?;
        metrics::counter!(EVENTS_PUBLISHED, "kind" => "typing").increment(1);
        Ok(())
    }

    async fn presence(
        &self,
        p: &Principal,
        req: GetPresenceRequest,
    ) -> Result<GetPresenceResponse, ServiceError> {
        let room = authorize(p, &req.room, policy::may_join)?;
        let page = PageRequest {
            after: presence_page::decode(&req.page_token)?,
            limit: presence_page::limit(req.limit),
        };
        let snapshot = self.inner.bus.presence(&room.to_string(), &page).await?;
        Ok(GetPresenceResponse {
            user_count: snapshot.user_count,
            connection_count: snapshot.connections,
            user_ids: snapshot.user_ids,
            next_page_token: snapshot
                .more_after
                .as_deref()
                .map(presence_page::encode)
                .unwrap_or_default(),
        })
    }
}

/// Parses a room name, resolves the `user:{sub}` shorthand in the caller's tenant and asks `check` whether
/// the caller may use it. A refusal names the room as the caller wrote it.
fn authorize(
    p: &Principal,
    name: &str,
    check: fn(&Principal, &Room) -> Result<(), policy::Denied>,
) -> Result<Room, ServiceError> {
    let room = Room::parse(name)?;
    let room = policy::canonical(p, room).and_then(|room| check(p, &room).map(|()| room));
    Ok(room.map_err(|denied| denied.naming(name))?)
}

/// Event types are dotted names: `task.created`, `message.deleted`, `typing`.
fn validate_type(kind: &str) -> Result<(), ServiceError> {
    let ok = !kind.is_empty()
        && kind.len() <= MAX_TYPE_LEN
        && kind.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ServiceError::InvalidArgument(format!(
            "invalid event type {:?}: expected a dotted name such as task.created (1-{MAX_TYPE_LEN} characters [A-Za-z0-9_-] and dots)",
            kind.chars().take(MAX_TYPE_LEN).collect::<String>()
        )))
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    type SubscribeStream = subscribe::SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = auth::principal(&request).await?;
        // Set by the server for every connection it accepts: how the watchdog closes a frozen stream.
        let connection = request.extensions().get::<ConnectionHandle>().cloned();
        let stream = self
            .open_stream(principal, connection, request.into_inner())
            .await?;
        Ok(Response::new(stream))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let principal = auth::principal(&request).await?;
        let id = EventApi::publish(self, &principal, request.into_inner()).await?;
        Ok(Response::new(PublishResponse { id }))
    }

    async fn set_typing(
        &self,
        request: Request<SetTypingRequest>,
    ) -> Result<Response<SetTypingResponse>, Status> {
        let principal = auth::principal(&request).await?;
        EventApi::set_typing(self, &principal, request.into_inner()).await?;
        Ok(Response::new(SetTypingResponse {}))
    }

    async fn get_presence(
        &self,
        request: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceResponse>, Status> {
        let principal = auth::principal(&request).await?;
        let response = self.presence(&principal, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_dotted_names() {
        for ok in ["task.created", "typing", "a.b-c.d_e", "X1"] {
            assert!(validate_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "task.",
            ".task",
            "task..created",
            "task created",
            "tâche",
        ] {
            assert!(validate_type(bad).is_err(), "{bad:?}");
        }
    }
}
