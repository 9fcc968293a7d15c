//! Prometheus metrics for operators, served as text on `--metrics-listen` (off unless set).
//!
//! Instrumentation goes through the `metrics` facade: without an installed recorder every call is a no-op,
//! so tests and embedders pay nothing. [`install`] sets the process-wide Prometheus recorder and its HTTP
//! listener (once per process). Gauges are maintained by drop guards, so they go down however a stream ends.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `lamplight_streams_open` | gauge | |
//! | `lamplight_streams_ended_total` | counter | `reason`: client_closed, slow_consumer, token_expired, shutting_down, stalled, connection_closed |
//! | `lamplight_streams_refused_total` | counter (`Subscribe` refused by `--max-streams-per-user`) | |
//! | `lamplight_connections_open` | gauge | |
//! | `lamplight_connections_refused_total` | counter (closed at accept by `--max-connections`) | |
//! | `lamplight_connections_closed_by_watchdog_total` | counter (a stream on them could not be written) | `reason`: stalled, token_expired |
//! | `lamplight_slow_consumer_disconnects_total` | counter | |
//! | `lamplight_rooms_local` | gauge (rooms with at least one subscriber on this node) | |
//! | `lamplight_events_published_total` | counter | `kind`: publish, typing |
//! | `lamplight_events_delivered_total` | counter (events written to streams) | |
//! | `lamplight_events_dropped_total` | counter (offers refused) | `reason`: slow_consumer, stream_closed |
//! | `lamplight_publish_duration_seconds` | histogram | |
//! | `lamplight_auth_failures_total` | counter | `code`: unauthenticated, permission_denied |
//! | `lamplight_redis_reconnects_total`, `lamplight_redis_subscriptions` | counter, gauge | (Redis bus) |
//! | `lamplight_tls_reloads_total` | counter | `result`: loaded, refused |
//! | `lamplight_jwks_fetch_failures_total`, `lamplight_jwks_keys` | counter, gauge | (`--jwt-jwks-url`) |

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::error::StreamEnd;

/// Open `Subscribe` streams.
pub const STREAMS_OPEN: &str = "lamplight_streams_open";
/// Streams ended, by reason.
pub const STREAMS_ENDED: &str = "lamplight_streams_ended_total";
/// `Subscribe` calls refused by `--max-streams-per-user`.
pub const STREAMS_REFUSED: &str = "lamplight_streams_refused_total";
/// Open connections.
pub const CONNECTIONS_OPEN: &str = "lamplight_connections_open";
/// Connections closed at accept because `--max-connections` were open.
pub const CONNECTIONS_REFUSED: &str = "lamplight_connections_refused_total";
/// Connections the stream watchdog closed, by reason.
pub const CONNECTIONS_CLOSED_BY_WATCHDOG: &str = "lamplight_connections_closed_by_watchdog_total";
/// Streams ended because their queue overflowed.
pub const SLOW_CONSUMER_DISCONNECTS: &str = "lamplight_slow_consumer_disconnects_total";
/// Rooms with at least one local subscriber, and the control room ([`crate::bus::control`]).
pub const ROOMS_LOCAL: &str = "lamplight_rooms_local";
/// Events accepted by `Publish` or `SetTyping`.
pub const EVENTS_PUBLISHED: &str = "lamplight_events_published_total";
/// Events written to streams (one per event per stream).
pub const EVENTS_DELIVERED: &str = "lamplight_events_delivered_total";
/// Offers a stream's inbox refused.
pub const EVENTS_DROPPED: &str = "lamplight_events_dropped_total";
/// Time from receiving a `Publish` to the bus accepting it.
pub const PUBLISH_DURATION: &str = "lamplight_publish_duration_seconds";
/// Calls refused by authentication or policy.
pub const AUTH_FAILURES: &str = "lamplight_auth_failures_total";
/// Failed fetches of `--jwt-jwks-url` (the last good key set is kept).
pub const JWKS_FETCH_FAILURES: &str = "lamplight_jwks_fetch_failures_total";
/// Keys of the last good `--jwt-jwks-url` fetch.
pub const JWKS_KEYS: &str = "lamplight_jwks_keys";
/// Reloads of the TLS certificate, by result (`loaded`, `refused`: the old pair stays).
pub const TLS_RELOADS: &str = "lamplight_tls_reloads_total";
/// Recoveries of the Redis bus's pub/sub: reconnections, and overflows of its queue (both re-read the rooms' streams).
pub const REDIS_RECONNECTS: &str = "lamplight_redis_reconnects_total";
/// `user.status` events this node published (one per tenant per window at most, see `statuses`).
pub const STATUS_EVENTS: &str = "lamplight_status_events_total";
/// ONLINE/OFFLINE changes those events carried.
pub const STATUS_CHANGES: &str = "lamplight_status_changes_total";
/// Redis channel subscriptions this node holds.
pub const REDIS_SUBSCRIPTIONS: &str = "lamplight_redis_subscriptions";

/// Histogram buckets for publish latency, in seconds (100 µs to 2.5 s).
const PUBLISH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Why metrics could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter could not be built or its listener could not bind.
    #[error("metrics exporter on {addr}: {source}")]
    Build {
        /// The listen address.
        addr: SocketAddr,
        /// Why.
        source: BuildError,
    },
    /// A recorder is process-wide: a second server in the same process cannot have its own.
    #[error("metrics are already served on {0} by this process")]
    AlreadyInstalled(SocketAddr),
}

static INSTALLED: OnceLock<SocketAddr> = OnceLock::new();

/// Installs the Prometheus recorder and serves `GET /metrics` (any path) on `addr`. Must run inside a
/// tokio runtime. Once per process.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    if let Some(existing) = INSTALLED.get() {
        return Err(MetricsError::AlreadyInstalled(*existing));
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(PUBLISH_DURATION.into()), PUBLISH_BUCKETS)
        .and_then(|b| b.install())
        .map_err(|source| MetricsError::Build { addr, source })?;
    let _ = INSTALLED.set(addr);
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(STREAMS_OPEN, "Open Subscribe streams");
    describe_counter!(STREAMS_ENDED, "Subscribe streams ended, by reason");
    describe_counter!(
        STREAMS_REFUSED,
        "Subscribe calls refused by --max-streams-per-user"
    );
    describe_gauge!(CONNECTIONS_OPEN, "Open connections");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at accept because --max-connections were open"
    );
    describe_counter!(
        CONNECTIONS_CLOSED_BY_WATCHDOG,
        "Connections closed because a stream on them could not be written (stalled, or past its token's expiry)"
    );
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Streams ended because they fell behind by more than --stream-queue"
    );
    describe_gauge!(
        ROOMS_LOCAL,
        "Rooms with at least one subscriber on this node (the control room included)"
    );
    describe_counter!(EVENTS_PUBLISHED, "Events accepted by Publish and SetTyping");
    describe_counter!(EVENTS_DELIVERED, "Events written to streams (per stream)");
    describe_counter!(
        EVENTS_DROPPED,
        "Events a stream's full or closed inbox refused"
    );
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Publish latency until the bus accepted the event"
    );
    describe_counter!(AUTH_FAILURES, "Calls refused by authentication or policy");
    describe_counter!(STATUS_EVENTS, "user.status events this node published");
    describe_counter!(STATUS_CHANGES, "ONLINE/OFFLINE changes in those events");
    describe_counter!(REDIS_RECONNECTS, "Reconnections of the Redis bus");
    describe_gauge!(
        REDIS_SUBSCRIPTIONS,
        "Redis room subscriptions held by this node"
    );
}

/// Counts one open stream while alive; on drop records how the stream ended.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    end: Option<StreamEnd>,
    watched: Option<std::sync::Arc<crate::watchdog::Watched>>,
}

impl StreamGuard {
    /// `watched`: where the watchdog notes why it ended the stream from outside, if it did.
    pub(crate) fn open(watched: Option<std::sync::Arc<crate::watchdog::Watched>>) -> Self {
        metrics::gauge!(STREAMS_OPEN).increment(1.0);
        Self { end: None, watched }
    }

    /// The server ended the stream for `reason` (otherwise the client closed it).
    pub(crate) fn ended(&mut self, reason: StreamEnd) {
        self.end = Some(reason);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        metrics::gauge!(STREAMS_OPEN).decrement(1.0);
        let end = self
            .end
            .or_else(|| self.watched.as_ref().and_then(|w| w.verdict()));
        let reason = match end {
            None => "client_closed",
            Some(StreamEnd::SlowConsumer) => {
                metrics::counter!(SLOW_CONSUMER_DISCONNECTS).increment(1);
                "slow_consumer"
            }
            Some(StreamEnd::TokenExpired) => "token_expired",
            Some(StreamEnd::ShuttingDown) => "shutting_down",
            Some(StreamEnd::BusUnavailable) => "bus_unavailable",
            Some(StreamEnd::Stalled) => "stalled",
            Some(StreamEnd::ConnectionClosed) => "connection_closed",
            Some(StreamEnd::TokenRevoked) => "token_revoked",
            Some(StreamEnd::Disconnected) => "disconnected",
        };
        metrics::counter!(STREAMS_ENDED, "reason" => reason).increment(1);
    }
}
