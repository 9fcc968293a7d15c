//! A Rust client for lamplight that rides out disconnects (cargo feature `client`, on by default).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use lamplight::client::{Client, SubscriptionEvent};
//! use lamplight::proto::v1::{event::Payload, Event, Task};
//!
//! let client = Client::connect("http://127.0.0.1:50051", "<jwt>".to_owned()).await?;
//! let mut events = client.subscribe(["tenant:t1:project:p1"]);
//! let id = client
//!     .publish(Event {
//!         room: "tenant:t1:project:p1".into(),
//!         r#type: "task.created".into(),
//!         payload: Some(Payload::Task(Task { id: "42".into(), ..Default::default() })),
//!         ..Default::default()
//!     })?
//!     .await?;
//! while let Some(item) = events.next().await {
//!     match item? {
//!         SubscriptionEvent::Event(event) => println!("{} {}", event.id, event.r#type),
//!         SubscriptionEvent::Reset { room, .. } => println!("refetch {room}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - [`Client::subscribe`] returns a [`Subscription`]: a stream that reconnects by itself (exponential
//!   [`Backoff`] with jitter, at most 30 s), resumes every room from the last event id it delivered (so
//!   nothing is lost or repeated), refreshes the token after `UNAUTHENTICATED`, surfaces `Reset`, and
//!   treats a stream silent for longer than [`ClientConfig::heartbeat_timeout`] as dead.
//! - [`Client::publish`] puts the event in a bounded queue that one background task sends in order. Each
//!   event gets an idempotency key once, reused by every retry, so a retry after an ambiguous failure is
//!   delivered once. While the server is unreachable events wait in the queue; when it is full the event
//!   is handed back in [`PublishError::QueueFull`].
//!
//! One [`Client`] shares one HTTP/2 connection (re-established as needed) between all of this.

mod backoff;
pub mod json;
mod publisher;
mod subscription;
mod token;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::proto::v1::admin_service_client::AdminServiceClient;
use crate::proto::v1::event_service_client::EventServiceClient;
use crate::proto::v1::{
    DisconnectRequest, Event, GetPresenceRequest, GetPresenceResponse, RevokeTokensRequest,
    SetTypingRequest, UnsubscribeRequest, UserRef,
};

pub use backoff::{
    Backoff, DEFAULT_BACKOFF_MULTIPLIER, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF,
};
pub use publisher::{PublishError, PublishReceipt};
pub use subscription::{Subscription, SubscriptionEvent};
pub use token::{token_fn, FnToken, StaticToken, TokenError, TokenSource};

/// Default watchdog: a stream with no message (heartbeats included) for this long is considered dead and
/// reopened. 2.5 times the server's default `--heartbeat-secs` of 25 s.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(62_500);
/// Default number of publishes that may wait for the server.
pub const DEFAULT_PUBLISH_QUEUE: usize = 1024;
/// Default limit for one attempt of a call (connecting, and the answer to a publish or to opening a
/// stream).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a stream must stay open before its reconnect backoff starts from the shortest wait again.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// How the client behaves; every field has a documented default.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Waits between reconnects and publish retries.
    pub backoff: Backoff,
    /// Silence after which a stream is reopened ([`DEFAULT_HEARTBEAT_TIMEOUT`]). Keep it above the
    /// server's `--heartbeat-secs`; 2.5 times it tolerates one lost heartbeat.
    pub heartbeat_timeout: Duration,
    /// Publishes that may wait (queued, not yet accepted by the server); more fail with
    /// [`PublishError::QueueFull`] ([`DEFAULT_PUBLISH_QUEUE`]).
    pub publish_queue: usize,
    /// How long a publish keeps retrying while the server is unreachable, counted from the call to
    /// [`Client::publish`]; then it fails with [`PublishError::Unavailable`]. `None` (the default): until
    /// delivered.
    pub publish_retry_for: Option<Duration>,
    /// Limit for one attempt ([`DEFAULT_REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
    /// A stream open this long resets the reconnect backoff ([`DEFAULT_HEALTHY_AFTER`]).
    pub healthy_after: Duration,
    /// For `https://` endpoints: PEM CA certificates to trust besides the system's (e.g. a private CA).
    pub ca_certificate_pem: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            publish_queue: DEFAULT_PUBLISH_QUEUE,
            publish_retry_for: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            ca_certificate_pem: None,
        }
    }
}

/// Why a call or a subscription failed for good.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// What was given.
        endpoint: String,
        /// Why it was refused.
        reason: String,
    },
    /// The token source failed.
    #[error("cannot get a token: {0}")]
    Token(#[from] TokenError),
    /// The server (or the transport) answered with this status.
    #[error("{}", describe(.0))]
    Status(Status),
    /// An administrator ended the subscription (`AdminService.Disconnect`): its stream, already open,
    /// ended with `PERMISSION_DENIED`, whose message gives the reason. Final: reconnecting would defy it.
    #[error("{}", describe(.0))]
    Disconnected(Status),
}

impl ClientError {
    /// The gRPC code, when the error is a status.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(status) | ClientError::Disconnected(status) => Some(status.code()),
            _ => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

/// `CODE: message`, with the transport's cause when the status came from the connection.
pub(crate) fn describe(status: &Status) -> String {
    let mut out = format!("{:?}", status.code());
    if !status.message().is_empty() {
        out.push_str(": ");
        out.push_str(status.message());
    }
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Whether a failure may go away by itself: the server is unreachable, restarting, overloaded or failing
/// inside, or the connection broke mid-call (which tonic reports as UNKNOWN or INTERNAL). Answers about the
/// request itself (invalid argument, permission denied, not found...) are not; `UNAUTHENTICATED` is handled
/// by refreshing the token.
pub(crate) fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
    )
}

/// A lamplight client: one connection, a reconnecting [`Subscription`] per [`subscribe`](Self::subscribe)
/// call, and an ordered, retrying publish queue. Cheap to clone; clones share all of it. Queued publishes
/// are still sent after the last clone is dropped, while the tokio runtime runs.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    publisher: publisher::Handle,
}

pub(crate) struct Shared {
    endpoint: Endpoint,
    connection: Mutex<Connection>,
    tokens: Arc<dyn TokenSource>,
    config: ClientConfig,
}

/// The current connection; replaced when it stops answering.
struct Connection {
    generation: u64,
    grpc: EventServiceClient<Channel>,
    /// The admin service on the same connection.
    admin: AdminServiceClient<Channel>,
}

impl Connection {
    fn new(generation: u64, channel: Channel) -> Self {
        Self {
            generation,
            grpc: EventServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel),
        }
    }
}

impl Shared {
    /// The current connection and its generation (for [`reconnect`](Self::reconnect)).
    fn grpc(&self) -> (u64, EventServiceClient<Channel>) {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (connection.generation, connection.grpc.clone())
    }

    /// The admin service on the current connection, and its generation.
    fn admin(&self) -> (u64, AdminServiceClient<Channel>) {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (connection.generation, connection.admin.clone())
    }

    /// Abandons connection `generation` because it stopped answering (watchdog or timeout): a dead TCP
    /// connection can stay open for minutes, and every call on it would hang. The next call opens a new
    /// one; calls still running on the old one finish or fail on their own.
    fn reconnect(&self, generation: u64) {
        let mut connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connection.generation == generation {
            *connection = Connection::new(generation + 1, self.endpoint.connect_lazy());
            tracing::debug!("connection abandoned; the next call opens a new one");
        }
    }

    /// `message` with the authorization metadata (a refreshed token when `refresh`).
    async fn request<T>(&self, message: T, refresh: bool) -> Result<Request<T>, TokenError> {
        let token = if refresh {
            self.tokens.refresh().await?
        } else {
            self.tokens.token().await?
        };
        let value = bearer(&token).map_err(|_| {
            TokenError::new("the token contains characters not allowed in metadata")
        })?;
        let mut request = Request::new(message);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

impl Client {
    /// A client of the server at `endpoint` (`http://host:port` or `https://host:port`; without a scheme,
    /// `http://`) using
    /// `tokens`, with [`ClientConfig::default`]. Connects lazily: it fails only for an invalid endpoint, and
    /// calls made while the server is down wait or retry as documented. Needs a tokio runtime.
    pub async fn connect(
        endpoint: impl Into<String>,
        tokens: impl TokenSource,
    ) -> Result<Self, ClientError> {
        Self::with_config(endpoint, tokens, ClientConfig::default()).await
    }

    /// [`connect`](Self::connect) with a configuration.
    pub async fn with_config(
        endpoint: impl Into<String>,
        tokens: impl TokenSource,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let endpoint = with_scheme(&endpoint.into());
        let invalid = |reason: String| ClientError::InvalidEndpoint {
            endpoint: endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(config.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if endpoint.uri().scheme_str() == Some("https") {
            // TLS (rustls on ring): the system's roots, plus the configured CA.
            let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = &config.ca_certificate_pem {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| invalid(format!("TLS: {e}")))?;
        }
        let connection = Connection::new(0, endpoint.connect_lazy());
        let shared = Arc::new(Shared {
            endpoint,
            connection: Mutex::new(connection),
            tokens: Arc::new(tokens),
            config,
        });
        let publisher = publisher::Handle::spawn(shared.clone());
        Ok(Self { shared, publisher })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// A stream of the events of `rooms`, live from now on. See [`Subscription`].
    pub fn subscribe<I, S>(&self, rooms: I) -> Subscription
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.subscribe_since(rooms, std::collections::BTreeMap::new())
    }

    /// Like [`subscribe`](Self::subscribe), first replaying what each room in `since` (room -> last event
    /// id seen, e.g. a previous [`Subscription::since`]) had after that id.
    pub fn subscribe_since<I, S>(
        &self,
        rooms: I,
        since: std::collections::BTreeMap<String, String>,
    ) -> Subscription
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Subscription::open(
            self.shared.clone(),
            rooms.into_iter().map(Into::into).collect(),
            since,
        )
    }

    /// Queues `event` for publishing and returns a future of the id the server assigns. Events are sent
    /// in the order of these calls. Fails at once, handing the event back, when the queue is full
    /// ([`ClientConfig::publish_queue`]). Dropping the returned future does not cancel the publish.
    pub fn publish(&self, event: Event) -> Result<PublishReceipt, PublishError> {
        self.publisher
            .publish(event, publisher::new_idempotency_key())
    }

    /// [`publish`](Self::publish) with your own idempotency key (at most 256 bytes): a publish with a key
    /// the server saw from the same publisher in the last 10 minutes returns the first id and is not
    /// delivered again.
    pub fn publish_with_key(
        &self,
        event: Event,
        idempotency_key: impl Into<String>,
    ) -> Result<PublishReceipt, PublishError> {
        self.publisher.publish(event, idempotency_key.into())
    }

    /// Who is subscribed to `room` now: the totals and the first page of user ids (the server's default
    /// size, 100). One attempt (after a token refresh if the token was refused).
    pub async fn presence(&self, room: &str) -> Result<GetPresenceResponse, ClientError> {
        self.presence_page(room, 0, "").await
    }

    /// One page of who is subscribed to `room`: at most `limit` user ids (0: the server's default, 100;
    /// at most 1,000) after `page_token` (empty for the first page, else the previous response's
    /// `next_page_token`, which is empty on the last page). Totals are on every page. One attempt.
    pub async fn presence_page(
        &self,
        room: &str,
        limit: u32,
        page_token: &str,
    ) -> Result<GetPresenceResponse, ClientError> {
        let message = GetPresenceRequest {
            room: room.into(),
            limit,
            page_token: page_token.into(),
        };
        self.unary(message, Shared::grpc, |mut grpc, req| async move {
            grpc.get_presence(req).await
        })
        .await
    }

    /// Tells a channel room that the caller started or stopped typing. One attempt.
    pub async fn set_typing(&self, channel_room: &str, is_typing: bool) -> Result<(), ClientError> {
        let message = SetTypingRequest {
            channel_room: channel_room.into(),
            is_typing,
        };
        self.unary(message, Shared::grpc, |mut grpc, req| async move {
            grpc.set_typing(req).await
        })
        .await
        .map(|_| ())
    }

    /// Administration (`AdminService`, role `publisher`, or `admin` of the user's tenant): takes `room`
    /// off every open stream of `user`, on every node. Each stream gets `Removed` with `reason` (a
    /// [`SubscriptionEvent::Removed`] for this client's subscriptions) and keeps its other rooms. It does
    /// not stop the user joining the room again: change what their tokens allow too. One attempt.
    pub async fn unsubscribe_user(
        &self,
        user: UserRef,
        room: &str,
        reason: &str,
    ) -> Result<(), ClientError> {
        let message = UnsubscribeRequest {
            user: Some(user),
            room: room.into(),
            reason: reason.into(),
        };
        self.unary(message, Shared::admin, |mut admin, req| async move {
            admin.unsubscribe(req).await
        })
        .await
        .map(|_| ())
    }

    /// Administration: ends every open stream of `user` with `PERMISSION_DENIED` naming `reason`
    /// ([`ClientError::Disconnected`] for this client's subscriptions, which do not reconnect). One attempt.
    pub async fn disconnect_user(&self, user: UserRef, reason: &str) -> Result<(), ClientError> {
        let message = DisconnectRequest {
            user: Some(user),
            reason: reason.into(),
        };
        self.unary(message, Shared::admin, |mut admin, req| async move {
            admin.disconnect(req).await
        })
        .await
        .map(|_| ())
    }

    /// Administration: refuses, on every node, the tokens of `user` issued before `issued_before` (`None`:
    /// now) until they would have expired anyway, and ends the streams opened with them
    /// (`UNAUTHENTICATED`: clients ask their token source for a new token). One attempt.
    pub async fn revoke_tokens(
        &self,
        user: UserRef,
        issued_before: Option<std::time::SystemTime>,
        reason: &str,
    ) -> Result<(), ClientError> {
        let message = RevokeTokensRequest {
            user: Some(user),
            issued_before: issued_before.map(prost_types::Timestamp::from),
            reason: reason.into(),
        };
        self.unary(message, Shared::admin, |mut admin, req| async move {
            admin.revoke_tokens(req).await
        })
        .await
        .map(|_| ())
    }

    /// One call with the request timeout, retried once with a refreshed token after `UNAUTHENTICATED`.
    /// `service` picks the service client (and its connection generation) from [`Shared`].
    async fn unary<C, T, R, F, Fut>(
        &self,
        message: T,
        service: fn(&Shared) -> (u64, C),
        call: F,
    ) -> Result<R, ClientError>
    where
        T: Clone,
        F: Fn(C, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let mut refresh = false;
        loop {
            let request = self.shared.request(message.clone(), refresh).await?;
            let timeout = self.shared.config.request_timeout;
            let (generation, client) = service(&self.shared);
            let result = tokio::time::timeout(timeout, call(client, request))
                .await
                .unwrap_or_else(|_| {
                    self.shared.reconnect(generation);
                    Err(Status::deadline_exceeded(format!(
                        "no answer within {timeout:?}"
                    )))
                });
            match result {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == Code::Unauthenticated && !refresh => refresh = true,
                Err(status) => return Err(status.into()),
            }
        }
    }
}

/// `host:port` -> `http://host:port`; an address that names its scheme is kept as it is.
pub(crate) fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// The `authorization` metadata value carrying `token`; fails for characters metadata cannot hold.
pub(crate) fn bearer(
    token: &str,
) -> Result<
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    tonic::metadata::errors::InvalidMetadataValue,
> {
    format!("Bearer {token}").parse()
}
