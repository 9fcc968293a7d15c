//! The service layer's error, and its one mapping to `tonic::Status`.
//!
//! Every layer has its own error ([`AuthError`], [`Denied`], [`InvalidRoom`], [`BusError`]); the service
//! wraps them in [`ServiceError`], and [`From<ServiceError> for Status`] decides the code and the message a
//! client sees. Internal details are logged, not returned.

use std::collections::BTreeMap;
use std::fmt;

use tonic::{Code, Status};

use crate::auth::{AuthError, TooManyRevocations};
use crate::bus::BusError;
use crate::metrics::AUTH_FAILURES;
use crate::policy::Denied;
use crate::rooms::InvalidRoom;

/// Metadata key (in trailers) carrying the last event id delivered per room, as a JSON object, when a
/// stream ends early: pass it back as `since` to resume without loss.
pub const RESUME_METADATA_KEY: &str = "lamplight-resume-since";

/// Largest resume map (JSON bytes) also written into the status message, for people reading grpcurl
/// output and for clients that only see the message. A larger map goes in the trailer only.
pub const RESUME_IN_MESSAGE_MAX: usize = 1024;

/// Largest resume map (JSON bytes) sent in the trailer. With the status and a short message, trailers stay
/// under 8 KiB, well inside what clients accept (hyper's and grpc-go's default header list limit is 16 KiB;
/// a status over the peer's limit is lost altogether). A larger map (many rooms with long names) is left
/// out, and the message says so: resume from the positions in `Subscribed` and the ids of the events
/// received, which is what the map would say.
pub const RESUME_TRAILER_MAX: usize = 7 * 1024;

/// Why the server ended a stream that the client did not close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The stream's queue overflowed: it fell behind by more than `--stream-queue` events.
    SlowConsumer,
    /// The token's `exp` (plus leeway) passed.
    TokenExpired,
    /// The server received SIGINT/SIGTERM.
    ShuttingDown,
    /// The bus could not read the history being replayed (e.g. Redis went away mid-replay).
    BusUnavailable,
    /// The stream had something to send and sent nothing for `--stream-stall-secs`: its client stopped
    /// reading or granting HTTP/2 flow-control window. Its connection is closed too.
    Stalled,
    /// The server closed the stream's connection because another stream on it stalled.
    ConnectionClosed,
    /// `AdminService.RevokeTokens` revoked the token the stream was opened with.
    TokenRevoked,
    /// `AdminService.Disconnect` ended every stream of the user (the status is
    /// [`ServiceError::Disconnected`], which names the reason).
    Disconnected,
}

impl fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamEnd::SlowConsumer => {
                "stream fell behind by more than its queue (--stream-queue, --stream-queue-bytes) and \
                 was ended"
            }
            StreamEnd::TokenExpired => "token expired",
            StreamEnd::ShuttingDown => "server shutting down",
            StreamEnd::BusUnavailable => "event bus unavailable while replaying history",
            StreamEnd::Stalled => {
                "stream could not be written for --stream-stall-secs (the client stopped reading) and was ended"
            }
            StreamEnd::ConnectionClosed => {
                "connection closed by the server because another stream on it stopped reading"
            }
            StreamEnd::TokenRevoked => {
                "token revoked by an administrator: get a new token before resuming"
            }
            StreamEnd::Disconnected => "disconnected by an administrator: do not reconnect",
        })
    }
}

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The token was refused.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The principal may not do this.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// A room name outside the grammar.
    #[error(transparent)]
    InvalidRoom(#[from] InvalidRoom),
    /// Any other malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The bus refused or failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A rate limit was hit.
    #[error("{0}")]
    RateLimited(String),
    /// The user already has as many open streams on this node as allowed.
    #[error("{user} already has {limit} open streams on this node, the limit (--max-streams-per-user): close one before opening another")]
    TooManyStreams {
        /// The `sub`.
        user: String,
        /// `--max-streams-per-user`.
        limit: usize,
    },
    /// More revocations than the node holds ([`crate::auth::MAX_REVOCATIONS`]).
    #[error(transparent)]
    TooManyRevocations(#[from] TooManyRevocations),
    /// `AdminService.Disconnect` ended the stream: final, the client must not reconnect.
    #[error("disconnected by an administrator ({reason}): do not reconnect")]
    Disconnected {
        /// As the administrator gave it (or "no reason given").
        reason: String,
    },
    /// The server ended a stream; `since` is the last event id delivered per room.
    #[error("{reason}; {}", resume_hint(.since))]
    StreamEnded {
        /// Why.
        reason: StreamEnd,
        /// room -> last event id delivered (or the position the stream started from).
        since: BTreeMap<String, String>,
    },
}

fn since_json(since: &BTreeMap<String, String>) -> String {
    serde_json::to_string(since).unwrap_or_default()
}

/// Where the client finds its resume position: in the message itself when the map is small, else in the
/// trailer only (or, past [`RESUME_TRAILER_MAX`], in what it received).
fn resume_hint(since: &BTreeMap<String, String>) -> String {
    let json = since_json(since);
    if json.len() <= RESUME_IN_MESSAGE_MAX {
        format!("resume with since={json}")
    } else if json.len() <= RESUME_TRAILER_MAX {
        format!(
            "resume with the since map of {} rooms in the {RESUME_METADATA_KEY} trailer",
            since.len()
        )
    } else {
        format!(
            "the since map of {} rooms is too large for trailers: resume from the positions in Subscribed \
             and the ids of the events received",
            since.len()
        )
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        let code = match &err {
            ServiceError::Auth(_) => {
                metrics::counter!(AUTH_FAILURES, "code" => "unauthenticated").increment(1);
                Code::Unauthenticated
            }
            ServiceError::Denied(_) => {
                metrics::counter!(AUTH_FAILURES, "code" => "permission_denied").increment(1);
                Code::PermissionDenied
            }
            ServiceError::InvalidRoom(_) | ServiceError::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            ServiceError::Bus(BusError::InvalidCursor { .. }) => Code::InvalidArgument,
            ServiceError::Bus(BusError::Unavailable(_)) => Code::Unavailable,
            ServiceError::Bus(BusError::Internal(cause) | BusError::Misconfigured(cause)) => {
                tracing::error!(%cause, "bus failure");
                return Status::internal("internal event bus error (logged on the server)");
            }
            ServiceError::RateLimited(_)
            | ServiceError::TooManyStreams { .. }
            | ServiceError::TooManyRevocations(_) => Code::ResourceExhausted,
            ServiceError::Disconnected { .. } => Code::PermissionDenied,
            ServiceError::StreamEnded { reason, .. } => match reason {
                StreamEnd::SlowConsumer | StreamEnd::Stalled => Code::ResourceExhausted,
                StreamEnd::TokenExpired | StreamEnd::TokenRevoked => Code::Unauthenticated,
                StreamEnd::Disconnected => Code::PermissionDenied,
                StreamEnd::ShuttingDown
                | StreamEnd::BusUnavailable
                | StreamEnd::ConnectionClosed => Code::Unavailable,
            },
        };
        let mut status = Status::new(code, err.to_string());
        if let ServiceError::StreamEnded { since, .. } = &err {
            let json = since_json(since);
            if json.len() <= RESUME_TRAILER_MAX {
                if let Ok(value) = json.parse() {
                    status.metadata_mut().insert(RESUME_METADATA_KEY, value);
                }
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_end_names_the_resume_position() {
        let status = Status::from(ServiceError::StreamEnded {
            reason: StreamEnd::SlowConsumer,
            since: [("tenant:t1".to_owned(), "abc-7".to_owned())].into(),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains(r#"{"tenant:t1":"abc-7"}"#));
        assert_eq!(
            status.metadata().get(RESUME_METADATA_KEY).unwrap(),
            r#"{"tenant:t1":"abc-7"}"#
        );
    }

    fn many_rooms(n: usize, name_len: usize) -> BTreeMap<String, String> {
        (0..n)
            .map(|i| {
                let room = format!("tenant:t1:channel:{i:0>width$}", width = name_len - 18);
                (room, format!("mwwkmslp-{i}"))
            })
            .collect()
    }

    #[test]
    fn a_large_resume_map_is_sent_once_in_the_trailer() {
        let since = many_rooms(64, 90);
        let status = Status::from(ServiceError::StreamEnded {
            reason: StreamEnd::TokenExpired,
            since: since.clone(),
        });
        assert!(status.message().len() < 200, "{}", status.message());
        assert!(status.message().contains(RESUME_METADATA_KEY));
        let trailer = status.metadata().get(RESUME_METADATA_KEY).unwrap();
        let parsed: BTreeMap<String, String> =
            serde_json::from_str(trailer.to_str().unwrap()).unwrap();
        assert_eq!(parsed, since);
    }

    #[test]
    fn a_map_too_large_for_trailers_is_left_out_and_the_message_says_so() {
        let status = Status::from(ServiceError::StreamEnded {
            reason: StreamEnd::Stalled,
            since: many_rooms(64, 272),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.metadata().get(RESUME_METADATA_KEY).is_none());
        assert!(status.message().contains("too large for trailers"));
        assert!(status.message().len() < 400, "{}", status.message());
    }
}
