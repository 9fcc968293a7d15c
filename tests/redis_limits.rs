//! The Redis bus within bounds: history replayed in pages as the client reads it, the rooms of a stream
//! subscribed together, a byte-bounded pub/sub queue that catches up instead of losing events, and the
//! start-up refusal of a Redis that may evict keys. Private redis-servers only.
//!
//! One process-wide metrics recorder: only `a_push_queue_overflow_catches_up_from_the_streams` installs
//! it.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use lamplight::proto::v1::subscribe_response::Kind;
use lamplight::proto::v1::Event;
use redis_support::*;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_lamplight");

/// A task event for `room` whose title makes it about `bytes` long.
fn large_event(room: &str, n: usize, bytes: usize) -> Event {
    let mut event = task_event(room, &format!("task-{n}"));
    if let Some(lamplight::proto::v1::event::Payload::Task(task)) = &mut event.payload {
        task.title = "x".repeat(bytes);
    }
    event
}

/// Token of an admin of tenant t1: may join every project room of the tenant.
fn admin_token() -> String {
    let mut claims = user_claims("admin");
    claims.roles = vec!["admin".into()];
    sign(&claims)
}

/// `calls` of `cmdstat_{command}` in `INFO commandstats`.
async fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let mut c = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A resume across 64 rooms of large events (about 37 MiB of history) arrives complete and in order, room
/// after room. The node reads it a page at a time as the client takes it: with Redis frozen right after
/// the first replayed event, the rest does not arrive (the old code read all of it before sending the
/// first); once Redis answers again, it does. The 64 rooms are subscribed in a few batches, not one
/// Redis SUBSCRIBE per room (the old code attached them one after another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_across_64_rooms_of_large_events_is_read_in_pages_complete_and_in_order() {
    const ROOMS: usize = 64;
    const PER_ROOM: usize = 25;
    const BYTES: usize = 24 * 1024;
    let redis = RedisServer::start().await;
    let setup = |c: &mut lamplight::Config| {
        use_redis(c, &redis.url());
        // Redis is frozen for a few seconds below: no call may give up meanwhile.
        c.redis.redis_timeout_ms = 30_000;
        c.history_size = 100;
    };
    let publisher_node = TestServer::start_with(setup).await;
    let mut publisher = publisher_node.client(&publisher_token()).await;
    let rooms: Vec<String> = (0..ROOMS)
        .map(|i| format!("tenant:t1:project:p{i}"))
        .collect();
    let mut published: Vec<Vec<String>> = vec![Vec::new(); ROOMS];
    for n in 0..PER_ROOM {
        for (i, room) in rooms.iter().enumerate() {
            let id = publish_event(&mut publisher, large_event(room, n, BYTES)).await;
            published[i].push(id);
        }
    }
    // Resume from each room's first event: 24 events per room to replay.
    let since: Vec<(&str, &str)> = rooms
        .iter()
        .zip(&published)
        .map(|(room, ids)| (room.as_str(), ids[0].as_str()))
        .collect();
    let expected: Vec<String> = published
        .iter()
        .flat_map(|ids| ids[1..].iter().cloned())
        .collect();

    // A node with no subscription yet, so that opening the stream subscribes all 64 rooms.
    let node = TestServer::start_with(setup).await;
    let mut client = node.client(&admin_token()).await;
    let subscribes_before = command_calls(&redis, "subscribe").await;
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let (mut stream, subscribed) = subscribe(&mut client, &room_refs, &since)
        .await
        .expect("subscribe");
    assert!(
        subscribed.rooms.iter().all(|r| r.recovered),
        "{subscribed:?}"
    );
    let subscribes = command_calls(&redis, "subscribe").await - subscribes_before;
    assert!(
        subscribes <= (ROOMS / 4) as u64,
        "{subscribes} SUBSCRIBE calls for {ROOMS} rooms: the rooms were subscribed one at a time"
    );

    let mut got: Vec<String> = Vec::new();
    match next_non_heartbeat(&mut stream).await {
        Ok(Kind::Event(e)) => got.push(e.id),
        other => panic!("expected the first replayed event, got {other:?}"),
    }
    redis.freeze();
    // Whatever the node already read arrives; the rest needs Redis.
    let frozen_until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(frozen_until, stream.message()).await {
            Err(_) => break,
            Ok(Ok(Some(msg))) => match msg.kind {
                Some(Kind::Event(e)) => got.push(e.id),
                Some(Kind::Heartbeat(_)) => {}
                other => panic!("unexpected message while Redis is frozen: {other:?}"),
            },
            Ok(other) => panic!("stream ended while Redis is frozen: {other:?}"),
        }
    }
    let while_frozen = got.len();
    redis.thaw();
    assert!(
        while_frozen < expected.len() / 2,
        "{while_frozen} of {} replayed events arrived while Redis was frozen: the replay was read \
         before it was sent",
        expected.len()
    );
    while got.len() < expected.len() {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Ok(Ok(Some(msg))) => match msg.kind {
                Some(Kind::Event(e)) => got.push(e.id),
                Some(Kind::Heartbeat(_)) => {}
                other => panic!("unexpected message in the replay: {other:?}"),
            },
            other => panic!(
                "replay stopped after {} of {} events: {other:?}",
                got.len(),
                expected.len()
            ),
        }
    }
    assert_eq!(
        got, expected,
        "every room's missed events, in order, room after room"
    );
    // And the stream is live: a new event arrives once.
    let id = publish_event(&mut publisher, large_event(&rooms[7], 99, 100)).await;
    assert_eq!(next_event(&mut stream).await.id, id);
}

/// A node whose pub/sub queue holds less than one event (`--redis-push-queue-bytes` 1024, events of
/// 4 KiB) drops every message at the bound, treats its subscription as lagging and reads the events from
/// the room's stream: the subscriber still gets every one, in order, without a `Reset`. The recoveries
/// are counted (the old code, bounded in messages only, never overflowed here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_queue_overflow_catches_up_from_the_streams() {
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let redis = RedisServer::start().await;
    let node = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_push_queue_bytes = 1024;
        c.metrics_listen = Some(metrics_addr);
    })
    .await;
    let room = "tenant:t1:project:p1";
    let mut client = node.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut client, &[room], &[])
        .await
        .expect("subscribe");
    let mut publisher = node.client(&publisher_token()).await;
    let mut published = Vec::new();
    for n in 0..20 {
        published.push(publish_event(&mut publisher, large_event(room, n, 4096)).await);
    }
    let mut got = Vec::new();
    while got.len() < published.len() {
        match next_non_heartbeat(&mut stream).await {
            Ok(Kind::Event(e)) => got.push(e.id),
            other => panic!("expected events only, got {other:?} after {got:?}"),
        }
    }
    assert_eq!(got, published);
    let recoveries = sample(
        &scrape(metrics_addr).await,
        "lamplight_redis_reconnects_total",
    );
    assert!(
        recoveries >= 1.0,
        "the queue never overflowed: {recoveries} recoveries"
    );
}

/// Starts the binary against `redis_url` with `extra` flags; returns (exit status if it exited before
/// it was listening or within 20 s, output so far). A process still running then is killed.
async fn run_binary(redis_url: &str, extra: &[&str]) -> (Option<std::process::ExitStatus>, String) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lamplight-evict-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("out.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", &addr.to_string()])
        .args(extra)
        .env_clear()
        .env("REDIS_URL", redis_url)
        .env("LAMPLIGHT_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    // Started = it logged that it listens (a connect to the port could reach another test's server that
    // got the same port after we released it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        let listening = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("lamplight listening");
        if listening || tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status, output)
}

/// Against a Redis with `maxmemory-policy allkeys-lru` the binary refuses to start, naming the setting
/// and the override; with `--redis-allow-eviction` it starts (and warns).
#[tokio::test]
async fn an_evicting_redis_is_refused_at_start_unless_allowed() {
    let redis = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory-policy",
        "allkeys-lru",
    ])
    .await;
    let (status, output) = run_binary(&redis.url(), &[]).await;
    let status = status.unwrap_or_else(|| panic!("started against an evicting Redis:\n{output}"));
    assert!(!status.success(), "{output}");
    for needle in [
        "maxmemory-policy allkeys-lru",
        "noeviction",
        "--redis-allow-eviction",
    ] {
        assert!(output.contains(needle), "{needle:?} not in:\n{output}");
    }

    let (status, output) = run_binary(&redis.url(), &["--redis-allow-eviction"]).await;
    assert!(
        status.is_none() && output.contains("lamplight listening"),
        "did not start with --redis-allow-eviction ({status:?}):\n{output}"
    );
    assert!(output.contains("may evict keys"), "no warning:\n{output}");

    // The check reads the policy of the server it is pointed at: a noeviction Redis starts without the flag.
    let safe = RedisServer::start().await;
    let (status, output) = run_binary(&safe.url(), &[]).await;
    assert!(
        status.is_none() && output.contains("lamplight listening"),
        "did not start against a noeviction Redis:\n{output}"
    );
}

/// Publishes `per_room` events of about `bytes` to each of `rooms`, round robin; returns the ids per room.
async fn fill_rooms(
    publisher: &mut Client,
    rooms: &[String],
    per_room: usize,
    bytes: usize,
) -> Vec<Vec<String>> {
    let mut published = vec![Vec::new(); rooms.len()];
    for n in 0..per_room {
        for (i, room) in rooms.iter().enumerate() {
            published[i].push(publish_event(publisher, large_event(room, n, bytes)).await);
        }
    }
    published
}

/// Redis stops answering in the middle of a replay (frozen longer than `--redis-timeout-ms`): the stream
/// ends with UNAVAILABLE and a resume position that names the last event it sent of the room being
/// replayed and the untouched `since` of the rooms not replayed yet; resuming from it once Redis is back
/// delivers exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failing_mid_replay_ends_the_stream_with_an_exact_resume_position() {
    const ROOMS: usize = 16;
    let redis = RedisServer::start().await;
    let node = TestServer::start_with(|c| use_redis(c, &redis.url())).await;
    let mut publisher = node.client(&publisher_token()).await;
    let rooms: Vec<String> = (0..ROOMS)
        .map(|i| format!("tenant:t1:project:p{i}"))
        .collect();
    let published = fill_rooms(&mut publisher, &rooms, 20, 32 * 1024).await;
    let since: Vec<(&str, &str)> = rooms
        .iter()
        .zip(&published)
        .map(|(room, ids)| (room.as_str(), ids[0].as_str()))
        .collect();
    let expected: Vec<String> = published
        .iter()
        .flat_map(|ids| ids[1..].iter().cloned())
        .collect();

    let mut client = node.client(&admin_token()).await;
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let (mut stream, _) = subscribe(&mut client, &room_refs, &since)
        .await
        .expect("subscribe");
    let first = next_event(&mut stream).await;
    redis.freeze();
    let (mut got, status) = drain_until_status(&mut stream).await;
    redis.thaw();
    got.insert(0, first);
    let got: Vec<String> = got.into_iter().map(|e| e.id).collect();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("replaying history"), "{status:?}");
    assert!(got.len() < expected.len(), "the whole replay arrived");
    assert_eq!(got, expected[..got.len()], "gap or reorder before the cut");

    // Every room's position is the last event it was sent, or its `since` when none was.
    let resume = resume_since(&status);
    for (i, room) in rooms.iter().enumerate() {
        let sent = published[i][1..].iter().rev().find(|id| got.contains(id));
        let want = sent.unwrap_or(&published[i][0]);
        assert_eq!(resume.get(room), Some(want), "{room}: {resume:?}");
    }

    // Resume (retrying while the node reconnects): exactly the rest.
    let resume_pairs: Vec<(&str, &str)> = resume
        .iter()
        .map(|(r, i)| (r.as_str(), i.as_str()))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut resumed = loop {
        match subscribe(&mut client, &room_refs, &resume_pairs).await {
            Ok((stream, subscribed)) => {
                assert!(
                    subscribed.rooms.iter().all(|r| r.recovered),
                    "{subscribed:?}"
                );
                break stream;
            }
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("resume refused for 30 s: {status:?}"),
        }
    };
    for want in &expected[got.len()..] {
        assert_eq!(&next_event(&mut resumed).await.id, want, "gap or duplicate");
    }
}

/// A room's history is trimmed past the replay while earlier rooms are still being replayed: the stream
/// sends a `Reset` for it (never a silent gap), then its new events live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_during_a_paged_replay_gives_a_reset_not_a_gap() {
    const EARLY: usize = 16;
    let redis = RedisServer::start().await;
    let node = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.history_size = 30;
    })
    .await;
    let mut publisher = node.client(&publisher_token()).await;
    let early: Vec<String> = (0..EARLY)
        .map(|i| format!("tenant:t1:project:p{i}"))
        .collect();
    let late = "tenant:t1:project:late".to_owned();
    let published = fill_rooms(&mut publisher, &early, 25, 32 * 1024).await;
    let late_ids = fill_rooms(&mut publisher, std::slice::from_ref(&late), 10, 100).await;
    let mut since: Vec<(&str, &str)> = early
        .iter()
        .zip(&published)
        .map(|(room, ids)| (room.as_str(), ids[0].as_str()))
        .collect();
    since.push((late.as_str(), late_ids[0][0].as_str()));
    let mut rooms: Vec<&str> = early.iter().map(String::as_str).collect();
    rooms.push(&late);

    let mut client = node.client(&admin_token()).await;
    let (mut stream, subscribed) = subscribe(&mut client, &rooms, &since)
        .await
        .expect("subscribe");
    assert!(
        subscribed.rooms.iter().all(|r| r.recovered),
        "{subscribed:?}"
    );
    let first = next_event(&mut stream).await;
    // While the early rooms are replayed, the late room's history moves past its `since`.
    let mut live = Vec::new();
    for n in 0..40 {
        live.push(publish_event(&mut publisher, large_event(&late, 100 + n, 100)).await);
    }
    let mut got = vec![first.id];
    let expected: Vec<String> = published
        .iter()
        .flat_map(|ids| ids[1..].iter().cloned())
        .collect();
    while got.len() < expected.len() {
        got.push(next_event(&mut stream).await.id);
    }
    assert_eq!(got, expected, "the early rooms' replay");
    match next_non_heartbeat(&mut stream).await {
        Ok(Kind::Reset(reset)) => {
            assert_eq!(reset.room, late);
            assert!(reset.reason.contains("trimmed"), "{reset:?}");
        }
        other => panic!("expected a Reset for the late room, got {other:?}"),
    }
    for want in &live {
        assert_eq!(
            &next_event(&mut stream).await.id,
            want,
            "the late room's live events"
        );
    }
}

/// A managed Redis that refuses `CONFIG` (here: the command renamed away) is still checked, through
/// `INFO memory`: an evicting one is refused, naming the setting.
#[tokio::test]
async fn the_policy_is_read_from_info_when_config_is_refused() {
    let redis = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory-policy",
        "volatile-lru",
        "--rename-command",
        "CONFIG",
        "",
    ])
    .await;
    let mut c = redis.conn().await;
    let refused: redis::RedisResult<redis::Value> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut c)
        .await;
    assert!(refused.is_err(), "CONFIG still works: {refused:?}");
    let (status, output) = run_binary(&redis.url(), &[]).await;
    assert!(status.is_some_and(|s| !s.success()), "{output}");
    assert!(output.contains("maxmemory-policy volatile-lru"), "{output}");
}

/// In a cluster every master is checked: one evicting master is enough to refuse, and the message names
/// it; `--redis-allow-eviction` lets the node start and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_master_is_checked() {
    let cluster = RedisCluster::start().await;
    let evicting = &cluster.nodes[2];
    let mut c = evicting.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-random")
        .query_async(&mut c)
        .await
        .expect("CONFIG SET");
    let mut refused = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        refused.handle.take().expect("serve task"),
    )
    .await
    .expect("serve returned within 30 s")
    .expect("serve task");
    let message = match result {
        Ok(()) => panic!("started against a cluster with an evicting master"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains(&format!("{}", evicting.port))
            && message.contains("maxmemory-policy allkeys-random"),
        "{message}"
    );

    let node = TestServer::start_with(|c| {
        use_cluster(c, &cluster);
        c.redis.redis_allow_eviction = true;
    })
    .await;
    let mut publisher = node.client(&publisher_token()).await;
    publish_event(&mut publisher, task_event("tenant:t1:project:p1", "t")).await;
}

/// Health of `server` as its gRPC health service reports it.
async fn serving(server: &TestServer) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut client = HealthClient::new(server.channel().await);
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

/// Issue 10, item 5: a node cut off from Redis while 16 rooms each got 64 events of 60 KiB (3.75 MiB a
/// room, 60 MiB in all) catches them up from the rooms' streams a bounded page at a time (256 events or
/// about 256 KiB), offering each page as it is read: at least four reads per room (one per MiB or less). The old code read each
/// room's whole gap in one go (up to `--history-size` x `--max-event-bytes` per room) and held the gaps
/// of all rooms of a batch before offering any. Every event still arrives, once, in order per room, and
/// the room is live after it. Reads are counted by Redis (`INFO commandstats`: the read script's XRANGE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_after_a_cut_is_read_in_pages_complete_and_in_order() {
    const ROOMS: usize = 16;
    const PER_ROOM: usize = 64;
    const BYTES: usize = 60 * 1024;
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let (direct, via_proxy) = (redis.url(), proxy.url());
    let a = TestServer::start_with(|c| {
        use_redis(c, &direct);
        c.history_size = 1000;
    })
    .await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &via_proxy);
        c.history_size = 1000;
        // The test reads as fast as it can; the stream must not be ended for falling behind.
        c.stream_queue = 100_000;
        c.stream_queue_bytes = 256 * 1024 * 1024;
    })
    .await;
    let rooms: Vec<String> = (0..ROOMS)
        .map(|i| format!("tenant:t1:project:p{i}"))
        .collect();
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut client = b.client(&admin_token()).await;
    let (mut stream, _) = subscribe(&mut client, &room_refs, &[])
        .await
        .expect("subscribe");
    eventually(Duration::from_secs(30), "node B serving", || serving(&b)).await;

    proxy.set(ProxyMode::Cut);
    eventually(Duration::from_secs(30), "node B not serving", || async {
        !serving(&b).await
    })
    .await;
    // Published through node A while node B hears nothing; four publishers, each keeping its rooms' order.
    let mut publishers = Vec::new();
    for chunk in rooms.chunks(ROOMS / 4) {
        let mut publisher = a.client(&publisher_token()).await;
        let chunk = chunk.to_vec();
        publishers.push(tokio::spawn(async move {
            fill_rooms(&mut publisher, &chunk, PER_ROOM, BYTES).await
        }));
    }
    let mut published: Vec<Vec<String>> = Vec::new();
    for p in publishers {
        published.extend(p.await.unwrap());
    }
    let reads_before = command_calls(&redis, "xrange").await;

    proxy.set(ProxyMode::Open);
    let total = ROOMS * PER_ROOM;
    let mut got: Vec<Vec<String>> = vec![Vec::new(); ROOMS];
    let mut count = 0;
    while count < total {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(msg))) => match msg.kind {
                Some(Kind::Event(e)) => {
                    let i = rooms
                        .iter()
                        .position(|r| *r == e.room)
                        .expect("a room of the stream");
                    got[i].push(e.id);
                    count += 1;
                }
                Some(Kind::Heartbeat(_)) => {}
                // The cut outlasted the node's wait for a catch-up: a Reset, and the events still follow.
                Some(Kind::Reset(r)) => assert!(r.reason.contains("has not answered"), "{r:?}"),
                other => panic!("unexpected message in the catch-up: {other:?}"),
            },
            other => panic!("catch-up stopped after {count} of {total} events: {other:?}"),
        }
    }
    assert_eq!(got, published, "every room's missed events, once, in order");
    let reads = command_calls(&redis, "xrange").await - reads_before;
    assert!(
        reads >= (4 * ROOMS) as u64,
        "{reads} stream reads caught up {ROOMS} rooms of 3.75 MiB each: their gaps were read whole, not \
         in bounded pages"
    );
    // And the rooms are live: a new event arrives next.
    let mut publisher = a.client(&publisher_token()).await;
    let id = publish_event(&mut publisher, large_event(&rooms[3], 999, 100)).await;
    assert_eq!(next_event(&mut stream).await.id, id);
}
