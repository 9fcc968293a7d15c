//! The service layer's error, and its one mapping to `tonic::Status`.
//!
//! Every layer has its own error ([`AuthError`], [`Denied`], [`InvalidRoom`], [`BusError`]); the service
//! wraps them in [`ServiceError`], and [`From<ServiceError> for Status`] decides the code and the message a
//! client sees. Internal details are logged, not returned.

use std::collections::BTreeMap;
use std::fmt;

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::bus::BusError;
use crate::metrics::AUTH_FAILURES;
use crate::policy::Denied;
use crate::rooms::InvalidRoom;

/// Metadata key (in trailers) carrying the last event id delivered per room, as a JSON object, when a
/// stream ends early: pass it back as `since` to resume without loss.
pub const RESUME_METADATA_KEY: &str = "lamplight-resume-since";

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
    /// The server ended a stream; `since` is the last event id delivered per room.
    #[error("{reason}; resume with since={}", since_json(.since))]
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
            ServiceError::RateLimited(_) => Code::ResourceExhausted,
            ServiceError::StreamEnded { reason, .. } => match reason {
                StreamEnd::SlowConsumer => Code::ResourceExhausted,
                StreamEnd::TokenExpired => Code::Unauthenticated,
                StreamEnd::ShuttingDown | StreamEnd::BusUnavailable => Code::Unavailable,
            },
        };
        let mut status = Status::new(code, err.to_string());
        if let ServiceError::StreamEnded { since, .. } = &err {
            if let Ok(value) = since_json(since).parse() {
                status.metadata_mut().insert(RESUME_METADATA_KEY, value);
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
}
