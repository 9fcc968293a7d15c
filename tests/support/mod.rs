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
