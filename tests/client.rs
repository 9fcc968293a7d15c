//! `lamplight::client` against the real server: events and resume positions, idempotent publishing, the
//! publish queue while the server is down (in order, bounded, event handed back when full), reconnecting
//! with `Reset` after a restart that lost history, token refresh, terminal errors, a slow consumer, the
//! heartbeat watchdog on a connection that went silent, and the `lamplight` binary killed (SIGKILL) and
//! restarted mid-stream, with the memory bus and with a private Redis.
#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lamplight::client::{
    token_fn, Backoff, Client, ClientConfig, ClientError, PublishError, PublishReceipt,
    StaticToken, Subscription, SubscriptionEvent, TokenError,
};
use lamplight::proto::v1::{event::Payload, Event};
use redis_support::RedisServer;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";
/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(15);

/// Quick retries, so tests do not wait for the production backoff.
fn fast_config() -> ClientConfig {
    ClientConfig {
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        },
        ..ClientConfig::default()
    }
}

async fn client(addr: SocketAddr, token: String) -> Client {
    Client::with_config(format!("http://{addr}"), token, fast_config())
        .await
        .unwrap()
}

/// The next item of a subscription; fails the test after [`WAIT`] or on an error.
async fn next_item(sub: &mut Subscription) -> SubscriptionEvent {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Err(_) => panic!("nothing from the subscription within {WAIT:?}"),
        Ok(None) => panic!("the subscription ended"),
        Ok(Some(Err(e))) => panic!("the subscription failed: {e}"),
        Ok(Some(Ok(item))) => item,
    }
}

async fn expect_connected(sub: &mut Subscription) -> Vec<lamplight::proto::v1::RoomPosition> {
    match next_item(sub).await {
        SubscriptionEvent::Connected { rooms } => rooms,
        other => panic!("expected Connected, got {other:?}"),
    }
}

async fn expect_event(sub: &mut Subscription) -> Event {
    match next_item(sub).await {
        SubscriptionEvent::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// The subscription's final error (after skipping state changes).
async fn expect_failure(sub: &mut Subscription) -> ClientError {
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Err(_) => panic!("the subscription did not fail within {WAIT:?}"),
            Ok(None) => panic!("the subscription ended without an error"),
            Ok(Some(Err(e))) => {
                assert!(
                    tokio::time::timeout(WAIT, sub.next())
                        .await
                        .unwrap()
                        .is_none(),
                    "an error is the last item"
                );
                return e;
            }
            Ok(Some(Ok(SubscriptionEvent::Event(e)))) => panic!("unexpected event {e:?}"),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn task_id(event: &Event) -> &str {
    match &event.payload {
        Some(Payload::Task(t)) => &t.id,
        other => panic!("expected a task, got {other:?}"),
    }
}

async fn receipt(r: PublishReceipt) -> String {
    tokio::time::timeout(WAIT, r)
        .await
        .expect("publish did not complete in time")
        .expect("publish failed")
}

/// An address nothing listens on (a port the OS just handed out and took back).
async fn free_addr() -> SocketAddr {
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    probe.local_addr().unwrap()
}

#[tokio::test]
async fn events_arrive_once_with_their_fields_and_since_follows_them() {
    let server = TestServer::start().await;
    let user = client(server.addr, user_token("u1")).await;
    let svc = client(server.addr, publisher_token()).await;
    let mut sub = user.subscribe([PROJECT]);
    let rooms = expect_connected(&mut sub).await;
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].room, PROJECT);
    // Before any event, the resume position is where the room stood.
    assert_eq!(
        sub.since().get(PROJECT),
        Some(&rooms[0].last_event_id),
        "{rooms:?}"
    );

    let first = receipt(svc.publish(task_event(PROJECT, "t-1")).unwrap()).await;
    let second = receipt(svc.publish(task_event(PROJECT, "t-2")).unwrap()).await;
    let got = expect_event(&mut sub).await;
    assert_eq!(
        (got.id.as_str(), got.room.as_str()),
        (first.as_str(), PROJECT)
    );
    assert_eq!(got.r#type, "task.created");
    assert_eq!(got.publisher_id, "svc");
    assert!(got.time.is_some());
    assert_eq!(task_id(&got), "t-1");
    assert_eq!(expect_event(&mut sub).await.id, second);
    assert_eq!(sub.since(), BTreeMap::from([(PROJECT.to_owned(), second)]));

    // Presence through the same client: u1 is subscribed.
    let presence = user.presence(PROJECT).await.unwrap();
    assert_eq!(presence.user_ids, vec!["u1".to_owned()]);
}

#[tokio::test]
async fn a_resumed_subscription_replays_exactly_what_it_missed() {
    let server = TestServer::start().await;
    let user = client(server.addr, user_token("u1")).await;
    let svc = client(server.addr, publisher_token()).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let a = receipt(svc.publish(task_event(PROJECT, "a")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, a);
    let since = sub.since();
    drop(sub);
    let b = receipt(svc.publish(task_event(PROJECT, "b")).unwrap()).await;
    let c = receipt(svc.publish(task_event(PROJECT, "c")).unwrap()).await;
    let mut resumed = user.subscribe_since([PROJECT], since);
    assert!(expect_connected(&mut resumed).await[0].recovered);
    assert_eq!(expect_event(&mut resumed).await.id, b);
    assert_eq!(expect_event(&mut resumed).await.id, c);
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_id_and_is_delivered_once() {
    let server = TestServer::start().await;
    let user = client(server.addr, user_token("u1")).await;
    let svc = client(server.addr, publisher_token()).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let first = receipt(
        svc.publish_with_key(task_event(PROJECT, "once"), "key-1")
            .unwrap(),
    )
    .await;
    let again = receipt(
        svc.publish_with_key(task_event(PROJECT, "once"), "key-1")
            .unwrap(),
    )
    .await;
    assert_eq!(first, again);
    let marker = receipt(svc.publish(task_event(PROJECT, "marker")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, first);
    let next = expect_event(&mut sub).await;
    assert_eq!(
        (next.id.as_str(), task_id(&next)),
        (marker.as_str(), "marker")
    );
}

#[tokio::test]
async fn refused_publishes_come_back_to_the_caller() {
    let server = TestServer::start().await;
    let user = client(server.addr, user_token("u1")).await;
    match user.publish(task_event(PROJECT, "x")).unwrap().await {
        Err(PublishError::Rejected(status)) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}")
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let svc = client(server.addr, publisher_token()).await;
    let mut bad = task_event(PROJECT, "x");
    bad.r#type = "not a type".into();
    match svc.publish(bad).unwrap().await {
        Err(e @ PublishError::Rejected(_)) => {
            assert_eq!(e.code(), Some(Code::InvalidArgument));
            assert!(e.to_string().contains("invalid event type"), "{e}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // The queue moved on: the next event goes through.
    assert!(!receipt(svc.publish(task_event(PROJECT, "ok")).unwrap())
        .await
        .is_empty());
}

/// A token source the test can hold shut; while shut, callers wait and are counted.
#[derive(Clone)]
struct Gate {
    open: watch::Sender<bool>,
    waiting: watch::Sender<usize>,
    calls: Arc<AtomicUsize>,
}

impl Gate {
    fn new() -> Self {
        Self {
            open: watch::channel(true).0,
            waiting: watch::channel(0).0,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn tokens(&self) -> impl lamplight::client::TokenSource {
        let gate = self.clone();
        token_fn(move || {
            let gate = gate.clone();
            async move {
                gate.calls.fetch_add(1, Ordering::SeqCst);
                let mut open = gate.open.subscribe();
                if !*open.borrow_and_update() {
                    gate.waiting.send_modify(|n| *n += 1);
                    let _ = open.wait_for(|o| *o).await;
                    gate.waiting.send_modify(|n| *n -= 1);
                }
                Ok::<_, TokenError>(publisher_token())
            }
        })
    }
}

#[tokio::test]
async fn publishes_wait_in_a_bounded_queue_while_the_server_is_down_and_go_out_in_order() {
    const QUEUE: usize = 8;
    let addr = free_addr().await;
    let gate = Gate::new();
    let publisher = Client::with_config(
        format!("http://{addr}"),
        gate.tokens(),
        ClientConfig {
            publish_queue: QUEUE,
            ..fast_config()
        },
    )
    .await
    .unwrap();

    // Nothing listens: the first event is retried, the next ones queue until the queue is full.
    let mut receipts = Vec::new();
    let mut handed_back = None;
    for n in 0..QUEUE + 5 {
        match publisher.publish(task_event(PROJECT, &format!("q-{n}"))) {
            Ok(r) => receipts.push(r),
            Err(PublishError::QueueFull(event)) => {
                handed_back = Some((n, event));
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let (full_at, event) = handed_back.expect("the queue should fill up");
    assert_eq!(
        task_id(&event),
        format!("q-{full_at}"),
        "the event comes back"
    );
    // QUEUE wait in the queue, plus at most the one being retried.
    assert!(
        (QUEUE..=QUEUE + 1).contains(&receipts.len()),
        "{}",
        receipts.len()
    );
    // The head is being retried: every attempt asks for a token.
    let retried = async {
        while gate.calls.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, retried)
        .await
        .expect("publish retries");

    // Hold the next attempt, start the server and subscribe, then let the queue go.
    gate.open.send_replace(false);
    tokio::time::timeout(WAIT, gate.waiting.subscribe().wait_for(|n| *n > 0))
        .await
        .expect("the publisher waits for a token")
        .unwrap();
    let server = TestServer::start_with(|c| c.listen = addr).await;
    let user = client(server.addr, user_token("u1")).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    gate.open.send_replace(true);

    let mut ids = Vec::new();
    for r in receipts {
        ids.push(receipt(r).await);
    }
    for (n, id) in ids.iter().enumerate() {
        let got = expect_event(&mut sub).await;
        assert_eq!(
            (&got.id, task_id(&got)),
            (id, format!("q-{n}").as_str()),
            "queued publishes arrive in order, once"
        );
    }
    // The queue has room again.
    let last = receipt(publisher.publish(*event).unwrap()).await;
    let got = expect_event(&mut sub).await;
    assert_eq!(
        (got.id.as_str(), task_id(&got)),
        (last.as_str(), format!("q-{full_at}").as_str())
    );
}

#[tokio::test]
async fn publishes_give_up_after_the_retry_window() {
    let addr = free_addr().await;
    let publisher = Client::with_config(
        format!("http://{addr}"),
        publisher_token(),
        ClientConfig {
            publish_retry_for: Some(Duration::from_millis(300)),
            ..fast_config()
        },
    )
    .await
    .unwrap();
    match tokio::time::timeout(WAIT, publisher.publish(task_event(PROJECT, "x")).unwrap()).await {
        Ok(Err(e @ PublishError::Unavailable(_))) => {
            assert_eq!(e.code(), Some(Code::Unavailable), "{e}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_restart_that_lost_history_is_reported_as_reset_then_live_events_follow() {
    let first = TestServer::start().await;
    let addr = first.addr;
    let user = client(addr, user_token("u1")).await;
    let svc = client(addr, publisher_token()).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let before = receipt(svc.publish(task_event(PROJECT, "before")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, before);

    // A graceful stop ends the stream with UNAVAILABLE and the resume position.
    first.stop().await.unwrap();
    match next_item(&mut sub).await {
        SubscriptionEvent::Disconnected { error, .. } => {
            assert_eq!(error.code(), Code::Unavailable, "{error:?}");
            assert!(error.message().contains("shutting down"), "{error:?}");
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert_eq!(sub.since().get(PROJECT), Some(&before));

    // The new server (memory bus) does not know `before`: the subscription says so.
    let _second = TestServer::start_with(|c| c.listen = addr).await;
    let rooms = loop {
        match next_item(&mut sub).await {
            SubscriptionEvent::Connected { rooms } => break rooms,
            SubscriptionEvent::Disconnected { .. } => continue,
            other => panic!("expected Connected, got {other:?}"),
        }
    };
    assert!(!rooms[0].recovered, "{rooms:?}");
    match next_item(&mut sub).await {
        SubscriptionEvent::Reset { room, reason } => {
            assert_eq!(room, PROJECT);
            assert!(reason.contains("earlier run"), "{reason}");
        }
        other => panic!("expected Reset, got {other:?}"),
    }
    // From here the subscription resumes from the new server's position, not the lost id.
    assert_eq!(sub.since().get(PROJECT), Some(&rooms[0].last_event_id));
    let after = receipt(svc.publish(task_event(PROJECT, "after")).unwrap()).await;
    let got = expect_event(&mut sub).await;
    assert_eq!((got.id.as_str(), task_id(&got)), (after.as_str(), "after"));
}

#[tokio::test]
async fn an_expired_token_is_refreshed_and_the_stream_resumes_without_loss() {
    let server = TestServer::start().await;
    let minted = Arc::new(AtomicUsize::new(0));
    let count = minted.clone();
    // Tokens that expire within 1-2 s; the server's leeway is 0 in tests.
    let tokens = token_fn(move || {
        count.fetch_add(1, Ordering::SeqCst);
        let mut claims = user_claims("u1");
        claims.exp = now() + 2;
        let token = sign(&claims);
        async move { Ok::<_, TokenError>(token) }
    });
    let user = Client::with_config(server.url(), tokens, fast_config())
        .await
        .unwrap();
    let svc = client(server.addr, publisher_token()).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let a = receipt(svc.publish(task_event(PROJECT, "a")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, a);

    match next_item(&mut sub).await {
        SubscriptionEvent::Disconnected { error, retry_in } => {
            assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
            assert_eq!(retry_in, Duration::ZERO, "a refresh needs no backoff");
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // Published while the subscription is between streams: replayed after the refresh.
    let b = receipt(svc.publish(task_event(PROJECT, "b")).unwrap()).await;
    let rooms = expect_connected(&mut sub).await;
    assert!(rooms[0].recovered, "{rooms:?}");
    assert_eq!(expect_event(&mut sub).await.id, b);
    let c = receipt(svc.publish(task_event(PROJECT, "c")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, c);
    assert!(minted.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn a_token_that_cannot_be_refreshed_ends_the_subscription() {
    let server = TestServer::start().await;
    let mut claims = user_claims("u1");
    claims.exp = now() + 1;
    let user = client(server.addr, sign(&claims)).await;
    let mut sub = user.subscribe([PROJECT]);
    // Open while valid, or refused at once if the second already passed: either way it ends refused.
    let err = expect_failure(&mut sub).await;
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
}

#[tokio::test]
async fn rooms_the_token_may_not_join_end_the_subscription_at_once() {
    let server = TestServer::start().await;
    let user = client(server.addr, user_token("u1")).await;
    let mut sub = user.subscribe(["tenant:t2:project:p1"]);
    let err = expect_failure(&mut sub).await;
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("tenant:t2:project:p1"), "{err}");
    // A failing token source ends it too.
    let broken = Client::with_config(
        server.url(),
        token_fn(|| async { Err(TokenError::new("identity provider down")) }),
        fast_config(),
    )
    .await
    .unwrap();
    let err = expect_failure(&mut broken.subscribe([PROJECT])).await;
    assert!(matches!(err, ClientError::Token(_)), "{err}");
    // A static token that is simply wrong: refused, refreshed (same token), refused again.
    let wrong = client(server.addr, StaticToken("not-a-jwt".into()).0).await;
    let err = expect_failure(&mut wrong.subscribe([PROJECT])).await;
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_was_cut_off_resumes_without_loss() {
    // 3000 x 4 KiB: more than the windows and buffers hold, so the server ends the unread stream
    // (RESOURCE_EXHAUSTED); the subscription resumes from the position in that status.
    const EVENTS: usize = 3000;
    let server = TestServer::start_with(|c| {
        c.stream_queue = 16;
        c.history_size = EVENTS + 100;
    })
    .await;
    let user = client(server.addr, user_token("slow")).await;
    let svc = Client::with_config(
        server.url(),
        publisher_token(),
        ClientConfig {
            publish_queue: EVENTS,
            ..fast_config()
        },
    )
    .await
    .unwrap();
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let receipts: Vec<_> = (0..EVENTS as u64)
        .map(|n| svc.publish(blob_event(PROJECT, n, 4096)).unwrap())
        .collect();
    let mut ids = Vec::with_capacity(EVENTS);
    for r in receipts {
        ids.push(receipt(r).await);
    }
    let mut got = Vec::with_capacity(EVENTS);
    let mut cut_off = false;
    while got.len() < EVENTS {
        match next_item(&mut sub).await {
            SubscriptionEvent::Event(e) => got.push(e.id),
            SubscriptionEvent::Disconnected { error, .. } => {
                assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
                cut_off = true;
            }
            SubscriptionEvent::Connected { rooms } => assert!(rooms[0].recovered, "{rooms:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(cut_off, "the stream should have been cut off");
    assert_eq!(got, ids, "every event once, in order");
}

/// A TCP proxy whose existing connections can be frozen: open, but nothing goes through any more (like a
/// peer that vanished without closing). Connections accepted later work.
struct Proxy {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections numbered up to this are frozen.
    frozen_through: watch::Sender<usize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen_through = watch::channel(0usize).0;
        let accepted = Arc::new(AtomicUsize::new(0));
        let (frozen, count) = (frozen_through.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let mut frozen = frozen.subscribe();
                conns.spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let freeze = async {
                        let _ = frozen.wait_for(|through| *through >= n).await;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        () = freeze => {
                            // Keep both sockets open and silent until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            frozen_through,
            _task: task,
        }
    }

    /// Freezes every connection accepted so far; returns how many.
    fn freeze_existing(&self) -> usize {
        let n = self.accepted.load(Ordering::SeqCst);
        self.frozen_through.send_replace(n);
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self._task.abort();
    }
}

#[tokio::test]
async fn a_silent_connection_trips_the_heartbeat_watchdog_and_the_stream_reopens() {
    let server = TestServer::start_with(|c| c.heartbeat_secs = 1).await;
    let proxy = Proxy::start(server.addr).await;
    let mut watchdog_fired = false;
    let user = Client::with_config(
        format!("http://{}", proxy.addr),
        user_token("u1"),
        ClientConfig {
            heartbeat_timeout: Duration::from_secs(3),
            // Far longer than the test waits: the reopen must not wait for a request timeout on the dead
            // connection, the watchdog has to drop it.
            request_timeout: Duration::from_secs(60),
            ..fast_config()
        },
    )
    .await
    .unwrap();
    let svc = client(server.addr, publisher_token()).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let a = receipt(svc.publish(task_event(PROJECT, "a")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, a);

    assert_eq!(proxy.freeze_existing(), 1, "one connection so far");
    let b = receipt(svc.publish(task_event(PROJECT, "b")).unwrap()).await;
    loop {
        match next_item(&mut sub).await {
            SubscriptionEvent::Disconnected { error, .. } => {
                if error.message().contains("heartbeat watchdog") {
                    watchdog_fired = true;
                }
            }
            SubscriptionEvent::Connected { rooms } => {
                assert!(rooms[0].recovered, "{rooms:?}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(watchdog_fired, "the watchdog fired");
    let got = expect_event(&mut sub).await;
    assert_eq!((got.id.as_str(), task_id(&got)), (b.as_str(), "b"));
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2, "a new connection");
}

// ---- The real binary, killed with SIGKILL and restarted on the same port. ----

/// A `lamplight serve` process; killed when dropped.
struct Binary {
    child: tokio::process::Child,
}

impl Binary {
    async fn start(addr: SocketAddr, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lamplight"))
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--jwt-secret",
                SECRET,
            ])
            .args(["--jwt-leeway-secs", "0", "--heartbeat-secs", "1"])
            .args(["--log-format", "json"])
            .args(extra)
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start target/debug/lamplight");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("listening") {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(WAIT, ready).await {
            Ok(true) => {}
            Ok(false) => panic!("lamplight exited before listening on {addr}"),
            Err(_) => panic!("lamplight did not listen on {addr} within {WAIT:?}"),
        }
        // Keep draining its logs so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child }
    }

    /// SIGKILL: no graceful end of streams, no resume position sent.
    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Publishes `total` events in a background task, one every few milliseconds without waiting for the
/// answers, and counts the calls, so the test can kill the server while publishes are in flight and let
/// some queue up during the outage.
struct Load {
    called: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<Vec<PublishReceipt>>,
}

impl Load {
    fn start(publisher: Client, total: usize) -> Self {
        let (count, called) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(total);
            for n in 0..total {
                let event = task_event(PROJECT, &format!("k-{n}"));
                receipts.push(publisher.publish(event).expect("queue has room"));
                count.send_replace(n + 1);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            receipts
        });
        Self { called, task }
    }

    async fn wait_for_calls(&mut self, n: usize) {
        tokio::time::timeout(WAIT, self.called.wait_for(|c| *c >= n))
            .await
            .expect("publisher progress")
            .unwrap();
    }
}

/// Reads the subscription until it has `want` distinct events, returning every event it yielded (to
/// check for duplicates) and the resets it saw.
async fn collect(sub: &mut Subscription, want: usize) -> (Vec<Event>, Vec<String>) {
    let mut events = Vec::new();
    let mut resets = Vec::new();
    let mut distinct = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while distinct.len() < want {
        let item = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {want} events within 60 s; resets {resets:?}",
                    distinct.len()
                )
            });
        match item
            .expect("subscription ended")
            .expect("subscription failed")
        {
            SubscriptionEvent::Event(e) => {
                distinct.insert(e.id.clone());
                events.push(e);
            }
            SubscriptionEvent::Reset { room, .. } => resets.push(room),
            SubscriptionEvent::Removed { room, .. } => panic!("{room} removed"),
            SubscriptionEvent::Connected { .. } | SubscriptionEvent::Disconnected { .. } => {}
        }
    }
    (events, resets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_with_redis_nothing_is_lost_or_duplicated() {
    const TOTAL: usize = 60;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let flags = ["--redis-url", url.as_str()];
    let addr = free_addr().await;
    let server = Binary::start(addr, &flags).await;
    let subscriber = client(addr, user_token("u1")).await;
    let publisher = Client::with_config(
        format!("http://{addr}"),
        publisher_token(),
        ClientConfig {
            publish_queue: TOTAL,
            ..fast_config()
        },
    )
    .await
    .unwrap();
    let mut sub = subscriber.subscribe([PROJECT]);
    expect_connected(&mut sub).await;

    let mut load = Load::start(publisher.clone(), TOTAL);
    load.wait_for_calls(TOTAL / 3).await;
    // Mid-stream: the subscriber has seen events, the publisher is still going.
    let (mut events, _) = collect(&mut sub, 5).await;
    server.kill().await;
    // Publishes made while nothing listens wait in the queue.
    let down_at = *load.called.borrow();
    load.wait_for_calls(down_at + 10).await;
    let server = Binary::start(addr, &flags).await;

    let receipts = tokio::time::timeout(WAIT, &mut load.task)
        .await
        .expect("the publisher finished calling")
        .unwrap();
    let mut ids = Vec::with_capacity(TOTAL);
    for r in receipts {
        ids.push(receipt(r).await);
    }
    let (rest, resets) = collect(&mut sub, TOTAL - events.len()).await;
    events.extend(rest);
    assert!(
        resets.is_empty(),
        "Redis kept the history: no reset expected, got {resets:?}"
    );
    // Nothing trails: the next event is a new one.
    let marker = receipt(publisher.publish(task_event(PROJECT, "marker")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, marker);

    // Publisher side: one distinct id per call.
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), TOTAL, "{ids:?}");
    // Subscriber side: every published event exactly once, in publish order, including those queued
    // during the outage.
    let got: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let want: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(got, want, "each event once, in order");
    let tasks: Vec<&str> = events.iter().map(task_id).collect();
    let expected: Vec<String> = (0..TOTAL).map(|n| format!("k-{n}")).collect();
    assert_eq!(tasks, expected);
    drop(server);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_with_the_memory_bus_the_subscriber_gets_a_reset() {
    let addr = free_addr().await;
    let server = Binary::start(addr, &[]).await;
    let subscriber = client(addr, user_token("u1")).await;
    let publisher = client(addr, publisher_token()).await;
    let mut sub = subscriber.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    let before = receipt(publisher.publish(task_event(PROJECT, "before")).unwrap()).await;
    assert_eq!(expect_event(&mut sub).await.id, before);

    server.kill().await;
    // Queued while the server is down.
    let queued: Vec<_> = (0..5)
        .map(|n| {
            publisher
                .publish(task_event(PROJECT, &format!("queued-{n}")))
                .unwrap()
        })
        .collect();
    let _server = Binary::start(addr, &[]).await;
    let mut ids = Vec::new();
    for r in queued {
        ids.push(receipt(r).await);
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());

    // The new process has no history for `before`: Reset, then live events. Queued events that reached
    // the new server before the subscriber did are among what the Reset says may be missed.
    let mut after_reset = Vec::new();
    let marker = loop {
        match next_item(&mut sub).await {
            SubscriptionEvent::Reset { room, reason } => {
                assert_eq!(room, PROJECT);
                assert!(reason.contains("earlier run"), "{reason}");
                break receipt(publisher.publish(task_event(PROJECT, "marker")).unwrap()).await;
            }
            SubscriptionEvent::Event(e) => panic!("event before the reset: {e:?}"),
            SubscriptionEvent::Connected { rooms } => assert!(!rooms[0].recovered, "{rooms:?}"),
            SubscriptionEvent::Disconnected { .. } => {}
            SubscriptionEvent::Removed { room, .. } => panic!("{room} removed"),
        }
    };
    loop {
        let e = expect_event(&mut sub).await;
        let done = e.id == marker;
        after_reset.push(e.id);
        if done {
            break;
        }
    }
    // What came after the reset: some of the queued events (a suffix, in order, once), then the marker.
    let tail = &after_reset[..after_reset.len() - 1];
    assert!(
        ids.ends_with(tail),
        "after the reset: {after_reset:?}, queued: {ids:?}"
    );
}
