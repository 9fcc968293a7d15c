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

/// Where an id sorts in its room: `{epoch}:{ms}-{seq}` is stored event (ms, seq) and `{...}.{n}` the
/// n-th ephemeral event after it, so (ms, seq, n) orders every id of one epoch.
fn order(id: &str) -> (String, u64, u64, u64) {
    let (epoch, rest) = id.split_once(':').expect("{epoch}:...");
    let (stream, n) = rest
        .split_once('.')
        .map_or((rest, 0), |(s, n)| (s, n.parse().unwrap()));
    let (ms, seq) = stream.split_once('-').expect("{ms}-{seq}");
    (epoch.into(), ms.parse().unwrap(), seq.parse().unwrap(), n)
}

fn typing(room: &str, n: usize) -> Event {
    Event {
        room: room.into(),
        r#type: "typing".into(),
        payload: Some(Payload::Typing(lamplight::proto::v1::Typing {
            user_id: format!("u{n}"),
            is_typing: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Issue 10, item 1: after a catch-up from history, typing events that were still queued from before
/// the read were delivered after newer stored events, and the stream's resume position moved back.
/// Typing and stored events flow in one room all along while the node is cut off from Redis three
/// times; 63 other rooms miss a hundred 8 KiB events each, so that every catch-up takes a while. Every id a
/// stream yields must sort after the one before it in its room, and the resume position in the status
/// that ends the stream must be the last id delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_keep_increasing_through_catch_ups_with_typing_in_flight() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let (direct, via_proxy) = (redis.url(), proxy.url());
    // History and queues long enough that every gap is filled (no Reset) and no stream falls behind.
    let a = TestServer::start_with(|c| {
        use_redis(c, &direct);
        c.history_size = 100_000;
    })
    .await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &via_proxy);
        c.history_size = 100_000;
        c.stream_queue = 100_000;
        // A catch-up brings up to 63 rooms x 100 events x 8 KiB at once: above the default byte bound.
        c.stream_queue_bytes = 256 * 1024 * 1024;
    })
    .await;
    let others: Vec<String> = (0..63).map(|i| format!("tenant:t1:channel:q{i}")).collect();
    let mut rooms = vec![ROOM];
    rooms.extend(others.iter().map(String::as_str));
    let mut claims = user_claims("u1");
    claims.channels = (0..63).map(|i| format!("q{i}")).collect();
    let mut user_b = b.client(&sign(&claims)).await;
    let (mut stream, _) = subscribe(&mut user_b, &rooms, &[]).await.unwrap();

    // The reader: checks the order of every id as it arrives (the stream must not fall behind).
    let reader = tokio::spawn(async move {
        let mut last: HashMap<String, String> = HashMap::new();
        let mut backwards = Vec::new();
        loop {
            let item = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("a message or the end within 30 s");
            let kind = match item {
                Ok(Some(message)) => message.kind.expect("kind"),
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return (last, backwards, status),
            };
            match kind {
                Kind::Event(e) => {
                    if let Some(before) = last.get(&e.room) {
                        if order(&e.id) <= order(before) {
                            backwards.push(format!("{}: {} after {before}", e.room, e.id));
                        }
                    }
                    last.insert(e.room, e.id);
                }
                // A cut longer than the node waits for a room's catch-up costs a Reset; the missed
                // events follow it, still in order (the room keeps its epoch).
                Kind::Reset(r) => assert!(r.reason.contains("has not answered"), "{r:?}"),
                _ => {}
            }
        }
    });

    // Typing and stored events alternate in the hot room, published through node A, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let mut hot = Vec::new();
    for worker in 0..2 {
        let mut svc = a.client(&publisher_token()).await;
        let stop = stop.clone();
        hot.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                publish_event(&mut svc, typing(ROOM, worker)).await;
                publish(&mut svc, 1000 * worker + n).await.unwrap();
                n += 1;
            }
        }));
    }
    for _round in 0..3 {
        proxy.set(ProxyMode::Cut);
        wait_health(&b, ServingStatus::NotServing).await;
        let mut fillers = Vec::new();
        for chunk in others.chunks(8) {
            let mut svc = a.client(&publisher_token()).await;
            let chunk = chunk.to_vec();
            fillers.push(tokio::spawn(async move {
                for room in &chunk {
                    for n in 0..100 {
                        let mut event = task_event(room, &format!("gap-{n}"));
                        if let Some(Payload::Task(task)) = &mut event.payload {
                            task.title = "x".repeat(8 * 1024);
                        }
                        publish_event(&mut svc, event).await;
                    }
                }
            }));
        }
        for f in fillers {
            f.await.unwrap();
        }
        proxy.set(ProxyMode::Open);
        wait_health(&b, ServingStatus::Serving).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for h in hot {
        h.await.unwrap();
    }
    let mut svc = a.client(&publisher_token()).await;
    let marker = publish(&mut svc, 9999).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A graceful stop ends the stream with the resume position.
    b.stop().await.unwrap();
    let (last, backwards, status) = reader.await.unwrap();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "ended by the stop: {status:?}"
    );
    assert!(backwards.is_empty(), "ids went backwards: {backwards:#?}");
    assert_eq!(last.get(ROOM), Some(&marker), "the marker arrived last");
    let since = resume_since(&status);
    for (room, id) in &last {
        assert_eq!(since.get(room), Some(id), "resume position of {room}");
    }
}
