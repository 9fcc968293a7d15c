//! Test harness: starts the real lamplight server on an ephemeral port and hands out tonic clients and
//! tokens. Every test file includes it with `mod support;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use lamplight::auth::{mint_hs256, DevToken};
use lamplight::proto::v1::event_service_client::EventServiceClient;
use lamplight::proto::v1::{subscribe_response::Kind, SubscribeRequest, SubscribeResponse};
use lamplight::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Streaming;

/// The HS256 secret every test server uses.
pub const SECRET: &str = "test-secret";

/// A running server. Dropping it cancels the server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<Result<(), lamplight::ServeError>>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Defaults for tests: HS256 [`SECRET`], no leeway, on 127.0.0.1:0.
pub fn test_config() -> Config {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap());
    config.jwt.jwt_secret = Some(SECRET.into());
    config.jwt.jwt_leeway_secs = 0;
    config
}

impl TestServer {
    /// Starts a server with [`test_config`].
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server with [`test_config`] changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(lamplight::serve(listener, config, shutdown.clone()));
        Self {
            addr,
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A raw channel (no token).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to test server")
    }

    /// An `EventService` client that sends `token` on every call.
    pub async fn client(&self, token: &str) -> Client {
        let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        EventServiceClient::with_interceptor(
            self.channel().await,
            Box::new(move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            }),
        )
    }

    /// Cancels the server and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), lamplight::ServeError> {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("not stopped yet");
        handle.await.expect("server task panicked")
    }
}

pub type Client = EventServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>,
    >,
>;

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for a verified user of tenant `t1` with project `p1` and channel `c1`, valid for an hour.
pub fn user_claims(sub: &str) -> DevToken {
    DevToken {
        sub: sub.into(),
        tid: Some("t1".into()),
        email_verified: true,
        projects: vec!["p1".into()],
        channels: vec!["c1".into()],
        roles: vec![],
        iat: now(),
        exp: now() + 3600,
        iss: None,
        aud: None,
    }
}

/// Signs claims with [`SECRET`].
pub fn sign(claims: &DevToken) -> String {
    mint_hs256(SECRET.as_bytes(), claims).unwrap()
}

/// Token of a verified user `sub` in tenant `t1` (projects p1, channels c1).
pub fn user_token(sub: &str) -> String {
    sign(&user_claims(sub))
}

/// Token of an internal service (role `publisher`, no tenant).
pub fn publisher_token() -> String {
    sign(&DevToken {
        sub: "svc".into(),
        roles: vec!["publisher".into()],
        iat: now(),
        exp: now() + 3600,
        ..DevToken::default()
    })
}

/// Opens a stream on `rooms` (with `since`) and returns it after reading the `Subscribed` message.
pub async fn subscribe(
    client: &mut Client,
    rooms: &[&str],
    since: &[(&str, &str)],
) -> Result<
    (
        Streaming<SubscribeResponse>,
        lamplight::proto::v1::Subscribed,
    ),
    tonic::Status,
> {
    let req = SubscribeRequest {
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        since: since
            .iter()
            .map(|(r, id)| (r.to_string(), id.to_string()))
            .collect(),
    };
    let mut stream = client.subscribe(req).await?.into_inner();
    match next(&mut stream).await? {
        Kind::Subscribed(s) => Ok((stream, s)),
        other => panic!("first message must be Subscribed, got {other:?}"),
    }
}

/// The next message of a stream, failing the test after 10 s; heartbeats are returned too.
pub async fn next(stream: &mut Streaming<SubscribeResponse>) -> Result<Kind, tonic::Status> {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Err(_) => panic!("no message within 10 s"),
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => panic!("stream ended without a status"),
        Ok(Ok(Some(msg))) => Ok(msg.kind.expect("message without kind")),
    }
}

/// The next non-heartbeat message.
pub async fn next_non_heartbeat(
    stream: &mut Streaming<SubscribeResponse>,
) -> Result<Kind, tonic::Status> {
    loop {
        match next(stream).await? {
            Kind::Heartbeat(_) => continue,
            other => return Ok(other),
        }
    }
}

// ---- Helpers for the auth, rooms and presence/typing tests. ----

/// Asserts that `result` failed with `code` and a message containing every one of `needles`, and returns
/// the status for further checks.
pub fn expect_status<T>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needles: &[&str],
) -> tonic::Status {
    let status = match result {
        Ok(_) => panic!("expected {code:?} with {needles:?}, but the call succeeded"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "wrong code; message: {:?}",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message {:?} should contain {needle:?}",
            status.message()
        );
    }
    status
}

/// Path of a key fixture in `tests/keys/` (test-only keys).
pub fn key_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

impl TestServer {
    /// An `EventService` client that sends `authorization` metadata verbatim, or none at all for `None`.
    pub async fn client_with_authorization(&self, authorization: Option<&str>) -> Client {
        let header: Option<MetadataValue<_>> = authorization.map(|v| v.parse().unwrap());
        EventServiceClient::with_interceptor(
            self.channel().await,
            Box::new(move |mut req: tonic::Request<()>| {
                if let Some(header) = &header {
                    req.metadata_mut().insert("authorization", header.clone());
                }
                Ok(req)
            }),
        )
    }
}

/// Publishes [`task_event`] (defined with the delivery helpers below) and returns its id.
pub async fn publish_task(
    client: &mut Client,
    room: &str,
    task_id: &str,
) -> Result<String, tonic::Status> {
    let req = lamplight::proto::v1::PublishRequest {
        event: Some(task_event(room, task_id)),
        idempotency_key: String::new(),
    };
    Ok(client.publish(req).await?.into_inner().id)
}

/// `GetPresence` of `room`.
pub async fn get_presence(
    client: &mut Client,
    room: &str,
) -> Result<lamplight::proto::v1::GetPresenceResponse, tonic::Status> {
    let req = lamplight::proto::v1::GetPresenceRequest {
        room: room.into(),
        ..Default::default()
    };
    Ok(client.get_presence(req).await?.into_inner())
}

/// Every user id in `room`, across all pages of `GetPresence` (a page holds at most 1,000).
pub async fn all_present(client: &mut Client, room: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = lamplight::proto::v1::GetPresenceRequest {
            room: room.into(),
            limit: 1000,
            page_token: std::mem::take(&mut page_token),
        };
        let page = client
            .get_presence(req)
            .await
            .expect("GetPresence")
            .into_inner();
        ids.extend(page.user_ids);
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

// ---- delivery helpers (tests/delivery.rs, tests/streams.rs, tests/shutdown.rs) ----

/// A `task.created` event for `room` whose task id is `task_id` (id, time and publisher are left to the
/// server).
pub fn task_event(room: &str, task_id: &str) -> lamplight::proto::v1::Event {
    lamplight::proto::v1::Event {
        room: room.into(),
        r#type: "task.created".into(),
        payload: Some(lamplight::proto::v1::event::Payload::Task(
            lamplight::proto::v1::Task {
                id: task_id.into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// Publishes `event` (failing the test after 10 s) and returns the id the server assigned.
pub async fn publish_event(client: &mut Client, event: lamplight::proto::v1::Event) -> String {
    let req = lamplight::proto::v1::PublishRequest {
        event: Some(event),
        idempotency_key: String::new(),
    };
    tokio::time::timeout(Duration::from_secs(10), client.publish(req))
        .await
        .expect("publish did not complete within 10 s")
        .expect("publish failed")
        .into_inner()
        .id
}

/// The next non-heartbeat message, which must be an event.
pub async fn next_event(stream: &mut Streaming<SubscribeResponse>) -> lamplight::proto::v1::Event {
    match next_non_heartbeat(stream).await {
        Ok(Kind::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Reads messages (skipping heartbeats) until the stream ends with a status; returns the events read on
/// the way and that status.
pub async fn drain_until_status(
    stream: &mut Streaming<SubscribeResponse>,
) -> (Vec<lamplight::proto::v1::Event>, tonic::Status) {
    let mut events = Vec::new();
    loop {
        match next_non_heartbeat(stream).await {
            Ok(Kind::Event(e)) => events.push(e),
            Ok(other) => panic!("unexpected message before the end of the stream: {other:?}"),
            Err(status) => return (events, status),
        }
    }
}

/// The resume position (`lamplight-resume-since` trailer: room -> last event id delivered) of a status
/// that ended a stream.
pub fn resume_since(status: &tonic::Status) -> std::collections::BTreeMap<String, String> {
    let value = status
        .metadata()
        .get(lamplight::error::RESUME_METADATA_KEY)
        .unwrap_or_else(|| {
            panic!(
                "no {} metadata in {status:?}",
                lamplight::error::RESUME_METADATA_KEY
            )
        });
    serde_json::from_str(value.to_str().expect("ASCII metadata")).expect("JSON object room -> id")
}

/// Longer than a few status windows (default 250 ms): a status that was going to be published has been
/// by then, so a marker published after it comes after the status too.
pub const STATUS_SETTLE: Duration = Duration::from_millis(1200);

/// The (user, online) changes of a `user.status` event, sorted by user, or `None` for any other event.
/// Checks the envelope: tenant room, server publisher, id and time set, one entry per user, never empty.
pub fn status_changes(event: &lamplight::proto::v1::Event) -> Option<Vec<(String, bool)>> {
    use lamplight::proto::v1::event::Payload;
    let Some(Payload::PresenceDiff(diff)) = &event.payload else {
        return None;
    };
    assert_eq!(event.r#type, "user.status", "{event:?}");
    assert!(event.room.starts_with("tenant:"), "{event:?}");
    assert_eq!(event.publisher_id, "lamplight");
    assert!(!event.id.is_empty() && event.time.is_some(), "{event:?}");
    for list in [&diff.online, &diff.offline] {
        assert!(
            !list.starts_with('\n') && !list.ends_with('\n') && !list.contains("\n\n"),
            "an empty id in a packed list: {diff:?}"
        );
    }
    let mut changes: Vec<(String, bool)> = lamplight::statuses::diff_changes(diff)
        .map(|(user, online)| (user.to_owned(), online))
        .collect();
    changes.sort();
    assert!(!changes.is_empty(), "an empty diff was published");
    assert!(
        changes.windows(2).all(|w| w[0].0 != w[1].0),
        "a user twice in one diff: {changes:?}"
    );
    Some(changes)
}

/// Asserts `event` is a `user.status` event of tenant `t1` carrying exactly `expected` (user, online).
pub fn assert_diff(event: &lamplight::proto::v1::Event, expected: &[(&str, bool)]) {
    assert_eq!(event.room, "tenant:t1", "{event:?}");
    let changes = status_changes(event).unwrap_or_else(|| panic!("not a status: {event:?}"));
    let mut want: Vec<(String, bool)> = expected.iter().map(|(u, o)| (u.to_string(), *o)).collect();
    want.sort();
    assert_eq!(changes, want);
}

/// Applies `user.status` events to an online set, as a client does.
#[derive(Debug, Default)]
pub struct OnlineSet {
    /// Users announced online.
    pub online: std::collections::BTreeSet<String>,
    /// Status events applied.
    pub events: usize,
    /// Changes applied (all events).
    pub changes: usize,
    /// Most changes in one event.
    pub largest: usize,
}

impl OnlineSet {
    /// Applies `event` if it is a status; returns whether it was.
    pub fn apply(&mut self, event: &lamplight::proto::v1::Event) -> bool {
        let Some(changes) = status_changes(event) else {
            return false;
        };
        self.events += 1;
        self.changes += changes.len();
        self.largest = self.largest.max(changes.len());
        for (user, online) in changes {
            if online {
                self.online.insert(user);
            } else {
                self.online.remove(&user);
            }
        }
        true
    }

    /// Reads `stream` (statuses only; anything else fails) until the online set equals `want`, failing
    /// after `limit`.
    pub async fn until(
        &mut self,
        stream: &mut Streaming<SubscribeResponse>,
        want: &std::collections::BTreeSet<String>,
        limit: Duration,
    ) {
        let reached = tokio::time::timeout(limit, async {
            while &self.online != want {
                let event = next_event(stream).await;
                assert!(self.apply(&event), "not a status: {event:?}");
            }
        })
        .await;
        if reached.is_err() {
            let missing: Vec<_> = want.difference(&self.online).take(5).collect();
            let extra: Vec<_> = self.online.difference(want).take(5).collect();
            panic!(
                "online set not reached within {limit:?}: {} of {} online, missing e.g. {missing:?}, extra {extra:?}",
                self.online.len(),
                want.len()
            );
        }
    }
}

/// A `Custom` event for `room` of `size` bytes whose first 8 bytes carry `n` (big-endian): large events
/// for the flow-control and byte-bound tests.
pub fn blob_event(room: &str, n: u64, size: usize) -> lamplight::proto::v1::Event {
    let mut data = vec![0xA5; size.max(8)];
    data[..8].copy_from_slice(&n.to_be_bytes());
    lamplight::proto::v1::Event {
        room: room.into(),
        r#type: "custom.blob".into(),
        payload: Some(lamplight::proto::v1::event::Payload::Custom(
            lamplight::proto::v1::Custom {
                content_type: "application/octet-stream".into(),
                data,
            },
        )),
        ..Default::default()
    }
}

/// The Prometheus text of `--metrics-listen` at `addr` (the whole HTTP/1.1 response).
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: lamplight\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of a sample line `name{labels} value` (exact name-and-labels match), or 0.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
