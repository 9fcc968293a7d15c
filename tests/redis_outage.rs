//! Redis outages while lamplight nodes keep serving: restart with and without persistence, and a
//! frozen (unresponsive) Redis. Open streams stay open; publish fails fast with UNAVAILABLE; health
//! reports NOT_SERVING until a pub/sub round trip works again; then every event accepted after Redis came
//! back reaches the streams that stayed open, nothing twice (with a Reset when Redis lost history).

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use lamplight::proto::v1::{
    event::Payload, subscribe_response::Kind, Event, PublishRequest, SubscribeResponse, Task,
};
use redis_support::*;
use support::*;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ROOM: &str = "tenant:t1:project:p1";

fn task(n: usize) -> Event {
    Event {
        room: ROOM.into(),
        r#type: "task.created".into(),
        payload: Some(Payload::Task(Task {
            id: format!("task-{n}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn publish(client: &mut Client, n: usize) -> Result<String, tonic::Status> {
    Ok(client
        .publish(PublishRequest {
            event: Some(task(n)),
            idempotency_key: String::new(),
        })
        .await?
        .into_inner()
        .id)
}

/// Publishes event `n` until Redis accepts it (it is just coming back), failing after 30 s.
async fn publish_when_back(client: &mut Client, n: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match publish(client, n).await {
            Ok(id) => return id,
            Err(e) if e.code() == Code::Unavailable => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "Redis not back within 30 s: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("unexpected error while Redis comes back: {e:?}"),
        }
    }
}

async fn health(server: &TestServer) -> ServingStatus {
    let mut client = HealthClient::new(server.channel().await);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check answers even while Redis is down");
    response.into_inner().status()
}

async fn wait_health(server: &TestServer, want: ServingStatus) {
    eventually(
        Duration::from_secs(30),
        &format!("health {want:?}"),
        || async { health(server).await == want },
    )
    .await;
}

async fn next_event(stream: &mut Streaming<SubscribeResponse>) -> Event {
    match next_non_heartbeat(stream)
        .await
        .expect("the stream stays open")
    {
        Kind::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Reads events until every id in `want` arrived, in order, with nothing else in between.
async fn expect_events(stream: &mut Streaming<SubscribeResponse>, want: &[String]) {
    for id in want {
        assert_eq!(&next_event(stream).await.id, id);
    }
}

/// After the expected events: one more event, and it must be the next thing on the stream (so no
/// duplicate or stray event was queued).
async fn expect_nothing_more(
    stream: &mut Streaming<SubscribeResponse>,
    publisher: &mut Client,
    n: usize,
) {
    let marker = publish(publisher, n).await.unwrap();
    assert_eq!(
        next_event(stream).await.id,
        marker,
        "nothing twice, nothing extra"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_with_persistence_loses_nothing_and_repeats_nothing() {
    let mut redis = RedisServer::start_persistent().await;
    let url = redis.url();
    let a = TestServer::start_with(|c| use_redis(c, &url)).await;
    let b = TestServer::start_with(|c| use_redis(c, &url)).await;
    let mut user_b = b.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user_b, &[ROOM], &[]).await.unwrap();
    let mut svc = a.client(&publisher_token()).await;
    let mut before = Vec::new();
    for n in 0..5 {
        before.push(publish(&mut svc, n).await.unwrap());
    }
    expect_events(&mut stream, &before).await;
    wait_health(&a, ServingStatus::Serving).await;

    redis.kill();
    // Fails, and fast: a refused connection does not wait for the timeout. (Bounded here so a hang
    // fails the test instead of stalling it.)
    let refused = tokio::time::timeout(Duration::from_secs(10), publish(&mut svc, 100))
        .await
        .expect("publish must not hang while Redis is down");
    assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
    wait_health(&a, ServingStatus::NotServing).await;
    wait_health(&b, ServingStatus::NotServing).await;

    redis.start_again().await;
    let mut after = vec![publish_when_back(&mut svc, 5).await];
    for n in 6..30 {
        after.push(publish(&mut svc, n).await.unwrap());
    }
    // The stream that stayed open on B gets every event accepted after the restart, in order, no reset.
    expect_events(&mut stream, &after).await;
    expect_nothing_more(&mut stream, &mut svc, 30).await;
    wait_health(&a, ServingStatus::Serving).await;
    wait_health(&b, ServingStatus::Serving).await;

    // History survived too: resuming from before the outage replays everything since.
    let (mut resumed, sub) = subscribe(&mut user_b, &[ROOM], &[(ROOM, &before[4])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered);
    expect_events(&mut resumed, &after).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_without_persistence_resets_then_delivers_what_came_after() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let a = TestServer::start_with(|c| use_redis(c, &url)).await;
    let mut user = a.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc = a.client(&publisher_token()).await;
    let first = publish(&mut svc, 0).await.unwrap();
    expect_events(&mut stream, std::slice::from_ref(&first)).await;

    redis.kill();
    redis.start_again().await;
    let mut after = vec![publish_when_back(&mut svc, 1).await];
    for n in 2..10 {
        after.push(publish(&mut svc, n).await.unwrap());
    }
    // Redis forgot the room: the stream is told, then gets everything accepted since.
    match next_non_heartbeat(&mut stream).await.unwrap() {
        Kind::Reset(r) => assert_eq!(r.room, ROOM),
        other => panic!("expected a reset, got {other:?}"),
    }
    let mut seen = HashSet::new();
    for id in &after {
        let e = next_event(&mut stream).await;
        assert_eq!(&e.id, id);
        assert!(seen.insert(e.id));
    }
    expect_nothing_more(&mut stream, &mut svc, 10).await;

    // The old id cannot claim recovery.
    let (_, sub) = subscribe(&mut user, &[ROOM], &[(ROOM, &first)])
        .await
        .unwrap();
    assert!(!sub.rooms[0].recovered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_redis_fails_publish_within_the_timeout_and_recovers() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = TestServer::start_with(|c| use_redis(c, &url)).await;
    let mut user = a.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc = a.client(&publisher_token()).await;
    let first = publish(&mut svc, 0).await.unwrap();
    expect_events(&mut stream, std::slice::from_ref(&first)).await;

    redis.freeze();
    // Connections stay open but nothing answers: publish gives up after --redis-timeout-ms (1 s here).
    let stalled = tokio::time::timeout(Duration::from_secs(10), publish(&mut svc, 1))
        .await
        .expect("publish must not hang longer than the Redis timeout");
    assert_eq!(stalled.unwrap_err().code(), Code::Unavailable);
    wait_health(&a, ServingStatus::NotServing).await;

    redis.thaw();
    wait_health(&a, ServingStatus::Serving).await;
    let next = publish(&mut svc, 2).await.unwrap();
    // A publish that timed out may still have been applied once Redis woke up: then it arrives first,
    // exactly once. Nothing else comes before `next`.
    let e = next_event(&mut stream).await;
    if e.id != next {
        match e.payload {
            Some(Payload::Task(t)) => assert_eq!(t.id, "task-1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(next_event(&mut stream).await.id, next);
    }
    expect_nothing_more(&mut stream, &mut svc, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_redis_fills_the_gap_from_history_when_back() {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let (direct, via_proxy) = (redis.url(), proxy.url());
    let a = TestServer::start_with(|c| use_redis(c, &direct)).await;
    let b = TestServer::start_with(|c| use_redis(c, &via_proxy)).await;
    let mut user_b = b.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user_b, &[ROOM], &[]).await.unwrap();
    let mut svc_a = a.client(&publisher_token()).await;
    let mut svc_b = b.client(&publisher_token()).await;
    let first = publish(&mut svc_a, 0).await.unwrap();
    expect_events(&mut stream, std::slice::from_ref(&first)).await;

    proxy.set(ProxyMode::Cut);
    let refused = tokio::time::timeout(Duration::from_secs(10), publish(&mut svc_b, 100))
        .await
        .expect("publish must not hang while Redis is unreachable");
    assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
    wait_health(&b, ServingStatus::NotServing).await;
    // Accepted by Redis (through node A) while node B cannot hear anything.
    let mut missed = Vec::new();
    for n in 1..21 {
        missed.push(publish(&mut svc_a, n).await.unwrap());
    }

    proxy.set(ProxyMode::Open);
    wait_health(&b, ServingStatus::Serving).await;
    let live = publish(&mut svc_a, 21).await.unwrap();
    // The stream stayed open: the gap is filled from the room's history, in order, then live.
    expect_events(&mut stream, &missed).await;
    expect_events(&mut stream, std::slice::from_ref(&live)).await;
    expect_nothing_more(&mut stream, &mut svc_b, 22).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wedged_subscriber_connection_is_unhealthy_and_replaced() {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let url = proxy.url();
    let a = TestServer::start_with(|c| use_redis(c, &url)).await;
    let mut user = a.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc = a.client(&publisher_token()).await;
    let first = publish(&mut svc, 0).await.unwrap();
    expect_events(&mut stream, std::slice::from_ref(&first)).await;
    wait_health(&a, ServingStatus::Serving).await;

    // Only the pub/sub connection hangs: commands (and a PING) still work, publishes are accepted.
    proxy.set(ProxyMode::WedgeSubscribers);
    let mut during = Vec::new();
    for n in 1..6 {
        during.push(publish(&mut svc, n).await.expect("commands still work"));
    }
    wait_health(&a, ServingStatus::NotServing).await;
    // The node replaces the wedged connection (the old one stays wedged) and reads what it missed.
    wait_health(&a, ServingStatus::Serving).await;
    expect_events(&mut stream, &during).await;
    expect_nothing_more(&mut stream, &mut svc, 6).await;
}
