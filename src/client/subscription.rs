//! [`Subscription`]: a stream of a set of rooms that outlives connections.
//!
//! It remembers, per room, the id of the last event it handed out (or, before any event, the room's
//! position when the stream opened) and reopens with those ids as `since`, so the server replays exactly
//! what was missed. When a stream ends with a status that names the resume position (the
//! `lamplight-resume-since` metadata), that position is used. Between attempts it waits with exponential
//! backoff and jitter; the backoff starts over once a stream stayed open for
//! [`ClientConfig::healthy_after`](super::ClientConfig). A stream that sends nothing, not even a heartbeat,
//! for [`ClientConfig::heartbeat_timeout`](super::ClientConfig) is dropped and reopened.
//!
//! It ends (with one `Err` item) only for failures that retrying cannot fix: a room the token may not
//! join, an invalid room or `since`, a token refused again right after a refresh, a failing token
//! source, or an administrator's disconnect ([`ClientError::Disconnected`]: `PERMISSION_DENIED` on a
//! stream that had opened; reconnecting would defy it).
//!
//! An administrator may also take one room off the stream (`AdminService.Unsubscribe`): the server says
//! `Removed`, the subscription yields [`SubscriptionEvent::Removed`] and forgets the room (it is not
//! subscribed again on reconnect, and leaves [`Subscription::since`]); the other rooms go on. When the
//! last room is removed there is nothing left to carry and the stream ends (`None`) after that item.
//!
//! Positions only move forward: an event whose id is not newer than the one remembered for its room (a
//! duplicate, or one older than what was handed out) is dropped, and a resume map from the server never
//! moves a room back. Ids are compared within one history (epoch) of the room; an id of another epoch
//! (the room's history was lost, the server said `Reset`) is taken as it comes.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::backoff::BackoffState;
use super::{describe, is_transient, ClientError, Shared};
use crate::error::RESUME_METADATA_KEY;
use crate::proto::v1::{subscribe_response::Kind, Event, RoomPosition, SubscribeRequest};

/// What a [`Subscription`] yields.
// Events are by far the most common item: boxing them would cost an allocation each to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum SubscriptionEvent {
    /// A stream is open (first, and after every reconnect): where each room stands. Events missed while
    /// disconnected follow, then live ones.
    Connected {
        /// Per room: the newest event id and whether the missed events are being replayed.
        rooms: Vec<RoomPosition>,
    },
    /// An event, exactly once and in id order per room.
    Event(Event),
    /// The server could not replay what this room missed (its history no longer reaches back, or the
    /// server lost it): refetch the room's state. Live events follow.
    Reset {
        /// The room.
        room: String,
        /// Why, from the server.
        reason: String,
    },
    /// An administrator took this room off the subscription (`AdminService.Unsubscribe`): no more events
    /// of it, and it is not subscribed again on reconnect. The other rooms go on; after the last room the
    /// stream ends.
    Removed {
        /// The room, as subscribed.
        room: String,
        /// Why, from the administrator.
        reason: String,
    },
    /// The stream broke; the subscription reconnects after `retry_in`.
    Disconnected {
        /// What happened (the status that ended the stream, a transport error, or the watchdog).
        error: Status,
        /// Wait before the next attempt.
        retry_in: Duration,
    },
}

type Inner = Pin<Box<dyn Stream<Item = Result<SubscriptionEvent, ClientError>> + Send>>;

/// A stream of [`SubscriptionEvent`]s for a set of rooms that reconnects by itself (see the module docs).
/// It only does work while it is polled; an `Err` item is final and the stream ends after it. Dropping it
/// closes the stream.
pub struct Subscription {
    inner: Inner,
    since: Arc<Positions>,
}

impl Subscription {
    pub(crate) fn open(
        shared: Arc<Shared>,
        rooms: Vec<String>,
        since: BTreeMap<String, String>,
    ) -> Self {
        let since = Arc::new(Mutex::new(since));
        let inner = Box::pin(run(shared, rooms, since.clone()));
        Self { inner, since }
    }

    /// Room -> the id to resume after: the last event handed out, or the room's position when the stream
    /// opened. Pass it to [`Client::subscribe_since`](super::Client::subscribe_since) to continue later.
    pub fn since(&self) -> BTreeMap<String, String> {
        lock(&self.since).clone()
    }
}

impl Stream for Subscription {
    type Item = Result<SubscriptionEvent, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

type Positions = Mutex<BTreeMap<String, String>>;

fn lock(positions: &Positions) -> MutexGuard<'_, BTreeMap<String, String>> {
    positions.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An event id split into its room history (epoch) and the numbers that order it within that history:
/// `{epoch}:{ms}-{seq}[.{n}]` (Redis bus) or `{epoch}-{seq}` (embedded bus). `None` for any other shape.
fn id_order(id: &str) -> Option<(&str, Vec<u64>)> {
    let (epoch, rest) = match id.split_once(':') {
        Some(split) => split,
        None => id.rsplit_once('-')?,
    };
    let numbers = rest
        .split(['-', '.'])
        .map(|n| n.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    (!epoch.is_empty()).then_some((epoch, numbers))
}

/// Whether `candidate` may replace `current` as a room's position: true unless both are ids of the same
/// history and `candidate` is not after `current`. Ids of different histories do not compare (the server
/// sends a `Reset` when a room's history was lost): the newer one is taken.
fn moves_forward(current: &str, candidate: &str) -> bool {
    match (id_order(current), id_order(candidate)) {
        (Some((a, x)), Some((b, y))) if a == b => y > x,
        _ => true,
    }
}

/// What to do after a stream attempt ended with `status`.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Wait the backoff, then reopen.
    Retry,
    /// Reopen at once with a refreshed token.
    Refresh,
    /// Give up.
    Fail,
}

fn next_step(status: &Status, refreshed_without_success: bool) -> Next {
    match status.code() {
        Code::Unauthenticated if refreshed_without_success => Next::Fail,
        Code::Unauthenticated => Next::Refresh,
        _ if is_transient(status) => Next::Retry,
        _ => Next::Fail,
    }
}

/// The error that ends the subscription after a stream ended with `status`; `opened`: that stream had
/// said `Subscribed`. Rooms are refused when a stream opens, so `PERMISSION_DENIED` on a stream that had
/// opened is an administrator's disconnect (`AdminService.Disconnect`).
fn final_error(status: Status, opened: bool) -> ClientError {
    if opened && status.code() == Code::PermissionDenied {
        ClientError::Disconnected(status)
    } else {
        ClientError::Status(status)
    }
}

/// Takes `room` off `rooms` and forgets its position, after the server said `Removed`. False when the
/// subscription did not carry it (a repeated or unknown `Removed`): nothing to report.
fn forget_room(rooms: &mut Vec<String>, since: &Positions, room: &str) -> bool {
    let before = rooms.len();
    rooms.retain(|r| r != room);
    lock(since).remove(room);
    rooms.len() != before
}

/// The room -> id map in a stream-ending status, if it has one.
fn resume_map(status: &Status) -> Option<BTreeMap<String, String>> {
    let value = status.metadata().get(RESUME_METADATA_KEY)?.to_str().ok()?;
    serde_json::from_str(value).ok()
}

fn run(
    shared: Arc<Shared>,
    mut rooms: Vec<String>,
    since: Arc<Positions>,
) -> impl Stream<Item = Result<SubscriptionEvent, ClientError>> + Send {
    async_stream::stream! {
        let config = &shared.config;
        let mut backoff = BackoffState::new(config.backoff.clone());
        let mut refresh = false;
        // A refresh was done and no stream has opened since: a second refusal is final.
        let mut refreshed_without_success = false;
        loop {
            let message = SubscribeRequest {
                rooms: rooms.clone(),
                since: lock(&since).iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            };
            let request = match shared.request(message, refresh).await {
                Ok(request) => request,
                Err(e) => {
                    yield Err(ClientError::Token(e));
                    return;
                }
            };
            if refresh {
                refreshed_without_success = true;
                refresh = false;
            }
            let mut opened_at = None;
            let (generation, mut grpc) = shared.grpc();
            let opened = tokio::time::timeout(config.request_timeout, grpc.subscribe(request))
                .await
                .unwrap_or_else(|_| {
                    shared.reconnect(generation);
                    Err(Status::deadline_exceeded(format!(
                        "the stream did not open within {:?}",
                        config.request_timeout
                    )))
                });
            let end = match opened {
                Err(status) => status,
                Ok(response) => {
                    let mut stream = response.into_inner();
                    // Where each room stood when this stream opened, for rooms that get a Reset.
                    let mut start: HashMap<String, String> = HashMap::new();
                    loop {
                        let message =
                            match tokio::time::timeout(config.heartbeat_timeout, stream.message())
                                .await
                            {
                                Err(_) => {
                                    shared.reconnect(generation);
                                    break Status::unavailable(format!(
                                        "no message for {:?} (heartbeat watchdog): reconnecting",
                                        config.heartbeat_timeout
                                    ))
                                }
                                Ok(Err(status)) => break status,
                                Ok(Ok(None)) => {
                                    break Status::unavailable("the server closed the stream")
                                }
                                Ok(Ok(Some(message))) => message,
                            };
                        match message.kind {
                            Some(Kind::Subscribed(subscribed)) => {
                                opened_at = Some(Instant::now());
                                refreshed_without_success = false;
                                {
                                    let mut since = lock(&since);
                                    for room in &subscribed.rooms {
                                        start.insert(room.room.clone(), room.last_event_id.clone());
                                        // A fresh room replays nothing: resume from where it stood.
                                        if !since.contains_key(&room.room) && !room.last_event_id.is_empty() {
                                            since.insert(room.room.clone(), room.last_event_id.clone());
                                        }
                                    }
                                }
                                yield Ok(SubscriptionEvent::Connected { rooms: subscribed.rooms });
                            }
                            Some(Kind::Event(event)) => {
                                if !rooms.contains(&event.room) {
                                    tracing::debug!(room = %event.room, id = %event.id, "dropped an event of a room not carried (removed)");
                                    continue;
                                }
                                {
                                    let mut since = lock(&since);
                                    if since.get(&event.room).is_some_and(|current| !moves_forward(current, &event.id)) {
                                        tracing::debug!(room = %event.room, id = %event.id, "dropped an event not newer than the room's position");
                                        continue;
                                    }
                                    since.insert(event.room.clone(), event.id.clone());
                                }
                                yield Ok(SubscriptionEvent::Event(event));
                            }
                            Some(Kind::Reset(reset)) => {
                                // After a Reset at the start, live events follow from the room's position
                                // then; a later Reset keeps the old id so the next stream reports it again.
                                if let Some(position) = start.remove(&reset.room) {
                                    let mut since = lock(&since);
                                    if position.is_empty() {
                                        since.remove(&reset.room);
                                    } else {
                                        since.insert(reset.room.clone(), position);
                                    }
                                }
                                yield Ok(SubscriptionEvent::Reset { room: reset.room, reason: reset.reason });
                            }
                            Some(Kind::Removed(removed)) => {
                                if !forget_room(&mut rooms, &since, &removed.room) {
                                    continue;
                                }
                                start.remove(&removed.room);
                                yield Ok(SubscriptionEvent::Removed { room: removed.room, reason: removed.reason });
                                if rooms.is_empty() {
                                    tracing::debug!("every room was removed; the subscription ends");
                                    return;
                                }
                            }
                            Some(Kind::Heartbeat(_)) | None => {}
                        }
                    }
                }
            };
            if let Some(map) = resume_map(&end) {
                let mut since = lock(&since);
                for (room, id) in map {
                    if id.is_empty() || !rooms.contains(&room) {
                        continue;
                    }
                    if since.get(&room).is_none_or(|current| moves_forward(current, &id)) {
                        since.insert(room, id);
                    }
                }
            }
            if opened_at.is_some_and(|at| at.elapsed() >= config.healthy_after) {
                backoff.reset();
            }
            let retry_in = match next_step(&end, refreshed_without_success) {
                Next::Fail => {
                    yield Err(final_error(end, opened_at.is_some()));
                    return;
                }
                Next::Refresh => {
                    refresh = true;
                    Duration::ZERO
                }
                Next::Retry => backoff.next_delay(),
            };
            tracing::debug!(error = %describe(&end), ?retry_in, "stream ended; reconnecting");
            yield Ok(SubscriptionEvent::Disconnected { error: end, retry_in });
            tokio::time::sleep(retry_in).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_follows_a_stream_end() {
        let unauth = Status::unauthenticated("token expired");
        assert_eq!(next_step(&unauth, false), Next::Refresh);
        assert_eq!(next_step(&unauth, true), Next::Fail);
        assert_eq!(next_step(&Status::unavailable("x"), false), Next::Retry);
        assert_eq!(
            next_step(&Status::resource_exhausted("slow"), false),
            Next::Retry
        );
        assert_eq!(
            next_step(&Status::permission_denied("no"), false),
            Next::Fail
        );
        assert_eq!(
            next_step(&Status::invalid_argument("room"), false),
            Next::Fail
        );
        // A broken connection surfaces as UNKNOWN or INTERNAL.
        assert_eq!(
            next_step(&Status::internal("h2 protocol error"), false),
            Next::Retry
        );
        assert_eq!(
            next_step(&Status::unknown("connection reset"), false),
            Next::Retry
        );
        assert_eq!(next_step(&Status::not_found("x"), false), Next::Fail);
    }

    #[test]
    fn permission_denied_on_an_open_stream_is_a_disconnect() {
        let denied =
            || Status::permission_denied("disconnected by an administrator: left the team");
        assert!(matches!(
            final_error(denied(), true),
            ClientError::Disconnected(s) if s.message().contains("left the team")
        ));
        // Before `Subscribed` it is a refused room or token.
        assert!(matches!(
            final_error(denied(), false),
            ClientError::Status(_)
        ));
        assert!(matches!(
            final_error(Status::invalid_argument("room"), true),
            ClientError::Status(_)
        ));
        assert_eq!(
            final_error(denied(), true).code(),
            Some(Code::PermissionDenied)
        );
    }

    #[test]
    fn a_removed_room_is_forgotten() {
        let mut rooms = vec!["tenant:t1:project:p1".to_owned(), "tenant:t1".to_owned()];
        let since: Positions = Mutex::new(BTreeMap::from([
            ("tenant:t1:project:p1".to_owned(), "ab-3".to_owned()),
            ("tenant:t1".to_owned(), "ab-9".to_owned()),
        ]));
        assert!(forget_room(&mut rooms, &since, "tenant:t1:project:p1"));
        assert_eq!(rooms, ["tenant:t1"]);
        assert_eq!(
            *lock(&since),
            BTreeMap::from([("tenant:t1".to_owned(), "ab-9".to_owned())])
        );
        // Again, or a room never carried: nothing to report.
        assert!(!forget_room(&mut rooms, &since, "tenant:t1:project:p1"));
        assert!(!forget_room(&mut rooms, &since, "tenant:t2"));
        assert_eq!(rooms, ["tenant:t1"]);
    }

    #[test]
    fn positions_only_move_forward_within_a_history() {
        // Redis ids: a typing event sorts after the stored event it follows and before the next one.
        assert!(moves_forward("k3:10-3", "k3:10-3.1"));
        assert!(moves_forward("k3:10-3.1", "k3:10-3.2"));
        assert!(moves_forward("k3:10-3.2", "k3:10-4"));
        assert!(moves_forward("k3:10-9", "k3:11-0"));
        assert!(
            !moves_forward("k3:10-4", "k3:10-3.7"),
            "a late typing event"
        );
        assert!(!moves_forward("k3:10-4", "k3:10-4"), "a duplicate");
        assert!(!moves_forward("k3:11-0", "k3:10-9"));
        // Embedded bus ids.
        assert!(moves_forward("ab12-9", "ab12-10"));
        assert!(!moves_forward("ab12-10", "ab12-9"));
        // Another history (the room was lost and recreated), or an id of unknown shape: taken as is.
        assert!(moves_forward("k3:10-4", "z9:0-1"));
        assert!(moves_forward("k3:10-4", "opaque"));
        assert!(moves_forward("opaque", "k3:1-0"));
    }

    #[test]
    fn the_resume_map_is_read_from_the_status_metadata() {
        let mut status = Status::unavailable("server shutting down");
        status.metadata_mut().insert(
            RESUME_METADATA_KEY,
            r#"{"tenant:t1":"abc-7"}"#.parse().unwrap(),
        );
        assert_eq!(
            resume_map(&status).unwrap(),
            BTreeMap::from([("tenant:t1".to_owned(), "abc-7".to_owned())])
        );
        assert_eq!(resume_map(&Status::unavailable("no map")), None);
    }
}
