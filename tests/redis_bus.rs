//! The Redis bus across nodes: two lamplight servers share one private Redis.
//! Delivery and order, resume on another node, one Redis subscription per room per node, idempotency and
//! presence across nodes.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::time::Duration;

use lamplight::proto::v1::{
    event::Payload, subscribe_response::Kind, user_status, Event, GetPresenceRequest,
    PublishRequest,
};
use redis_support::*;
use support::*;
use tonic::Code;

const ROOM: &str = "tenant:t1:project:p1";

fn task(room: &str, n: usize) -> Event {
    task_event(room, &format!("task-{n}"))
}

async fn publish(
    client: &mut Client,
    room: &str,
    n: usize,
    key: &str,
) -> Result<String, tonic::Status> {
    Ok(client
        .publish(PublishRequest {
            event: Some(task(room, n)),
            idempotency_key: key.into(),
        })
        .await?
        .into_inner()
        .id)
}

/// The next event of a stream (skipping heartbeats), failing on anything else.
async fn next_event(
    stream: &mut tonic::Streaming<lamplight::proto::v1::SubscribeResponse>,
) -> Event {
    match next_non_heartbeat(stream).await.expect("stream ok") {
        Kind::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn task_id(e: &Event) -> String {
    match &e.payload {
        Some(Payload::Task(t)) => t.id.clone(),
        other => panic!("not a task: {other:?}"),
    }
}

async fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    TestServer::start_with(|c| use_redis(c, &url)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_events_cross_nodes_in_order() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut on_b = b.client(&user_token("u1")).await;
    let (mut stream_b, _) = subscribe(&mut on_b, &[ROOM], &[]).await.unwrap();
    let mut on_a = a.client(&user_token("u2")).await;
    let (mut stream_a, _) = subscribe(&mut on_a, &[ROOM], &[]).await.unwrap();

    let mut svc = a.client(&publisher_token()).await;
    let mut ids = Vec::new();
    for n in 0..1000 {
        ids.push(publish(&mut svc, ROOM, n, "").await.unwrap());
    }
    for (name, stream) in [("node B", &mut stream_b), ("node A", &mut stream_a)] {
        for (n, id) in ids.iter().enumerate() {
            let e = next_event(stream).await;
            assert_eq!(
                (&e.id, task_id(&e)),
                (id, format!("task-{n}")),
                "{name}, event {n}"
            );
        }
    }
    // Ids increase (as the contract says) and every one is a valid `since` on the other node.
    let (_, sub) = subscribe(&mut on_b, &[ROOM], &[(ROOM, &ids[998])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered);
    assert_eq!(sub.rooms[0].last_event_id, ids[999]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_on_another_node_from_an_id_seen_on_the_first() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = node(&redis).await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &url);
        c.history_size = 20;
    })
    .await;
    let mut svc_a = a.client(&publisher_token()).await;
    let mut user_a = a.client(&user_token("u1")).await;
    let (mut stream_a, first) = subscribe(&mut user_a, &[ROOM], &[]).await.unwrap();
    let start = first.rooms[0].last_event_id.clone();
    assert!(
        !start.is_empty(),
        "an empty room still has a resumable position"
    );
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(publish(&mut svc_a, ROOM, n, "").await.unwrap());
    }
    // The client saw events 0..5 on node A, then lost its connection.
    for id in &ids[..5] {
        assert_eq!(&next_event(&mut stream_a).await.id, id);
    }
    drop(stream_a);

    let mut user_b = b.client(&user_token("u1")).await;
    let (mut stream_b, sub) = subscribe(&mut user_b, &[ROOM], &[(ROOM, &ids[4])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered, "{sub:?}");
    assert_eq!(sub.rooms[0].last_event_id, ids[9]);
    for id in &ids[5..] {
        assert_eq!(&next_event(&mut stream_b).await.id, id, "replayed in order");
    }
    // Then live, with nothing in between.
    let live = publish(&mut svc_a, ROOM, 10, "").await.unwrap();
    assert_eq!(next_event(&mut stream_b).await.id, live);

    // The position of the empty room resumes exactly too: everything since is replayed.
    let (mut from_start, sub) = subscribe(&mut user_b, &[ROOM], &[(ROOM, &start)])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered);
    for id in ids.iter().chain([&live]) {
        assert_eq!(&next_event(&mut from_start).await.id, id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_that_history_cannot_cover_get_a_reset_never_a_false_recovery() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = TestServer::start_with(|c| {
        use_redis(c, &url);
        c.history_size = 5;
    })
    .await;
    let mut svc = a.client(&publisher_token()).await;
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(publish(&mut svc, ROOM, n, "").await.unwrap());
    }
    let mut user = a.client(&user_token("u1")).await;
    // Only the last 5 are kept: since=#2 (events 3..8 kept) recovers, since=#1 does not.
    let (_, sub) = subscribe(&mut user, &[ROOM], &[(ROOM, &ids[2])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered);
    let (mut stream, sub) = subscribe(&mut user, &[ROOM], &[(ROOM, &ids[1])])
        .await
        .unwrap();
    assert!(!sub.rooms[0].recovered);
    match next_non_heartbeat(&mut stream).await.unwrap() {
        Kind::Reset(r) => assert!(r.reason.contains("history"), "{r:?}"),
        other => panic!("expected a reset, got {other:?}"),
    }

    // FLUSHALL: the room's history is gone. An old id must not claim recovery.
    let mut c = redis.conn().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    let after = publish(&mut svc, ROOM, 8, "").await.unwrap();
    assert_ne!(
        after.split(':').next(),
        ids[7].split(':').next(),
        "a new epoch"
    );
    let (mut stream, sub) = subscribe(&mut user, &[ROOM], &[(ROOM, &ids[7])])
        .await
        .unwrap();
    assert!(!sub.rooms[0].recovered);
    assert!(matches!(
        next_non_heartbeat(&mut stream).await.unwrap(),
        Kind::Reset(_)
    ));

    // Malformed ids are refused.
    let err = subscribe(&mut user, &[ROOM], &[(ROOM, "not-an-id")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_redis_subscription_per_room_per_node() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let channel = room_channel(ROOM);
    let mut streams_a = Vec::new();
    let mut streams_b = Vec::new();
    for i in 0..3 {
        let mut c = a.client(&user_token(&format!("a{i}"))).await;
        streams_a.push(subscribe(&mut c, &[ROOM], &[]).await.unwrap().0);
    }
    for i in 0..2 {
        let mut c = b.client(&user_token(&format!("b{i}"))).await;
        streams_b.push(subscribe(&mut c, &[ROOM], &[]).await.unwrap().0);
    }
    // Subscribe returns after Redis confirmed the subscription: no waiting needed here.
    assert_eq!(
        redis.numsub(&channel).await,
        2,
        "one per node, not per stream"
    );

    // Every stream still gets every event.
    let mut svc = a.client(&publisher_token()).await;
    let id = publish(&mut svc, ROOM, 0, "").await.unwrap();
    for s in streams_a.iter_mut().chain(streams_b.iter_mut()) {
        assert_eq!(next_event(s).await.id, id);
    }

    streams_a.truncate(1);
    // Two of three streams left node A: still subscribed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(redis.numsub(&channel).await, 2);
    streams_a.clear();
    eventually(
        Duration::from_secs(10),
        "node A unsubscribes after its last stream",
        || async { redis.numsub(&channel).await == 1 },
    )
    .await;
    streams_b.clear();
    eventually(Duration::from_secs(10), "no subscription left", || async {
        redis.numsub(&channel).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_on_another_node_is_deduplicated() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut user = a.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc_a = a.client(&publisher_token()).await;
    let mut svc_b = b.client(&publisher_token()).await;
    let first = publish(&mut svc_a, ROOM, 1, "order-42").await.unwrap();
    let retry = publish(&mut svc_b, ROOM, 1, "order-42").await.unwrap();
    assert_eq!(first, retry, "the retry returns the first id");
    let other = publish(&mut svc_b, ROOM, 2, "order-43").await.unwrap();
    assert_ne!(other, first);
    // Delivered once: the next event after the first is the other key's.
    assert_eq!(next_event(&mut stream).await.id, first);
    assert_eq!(next_event(&mut stream).await.id, other);
    // Stored once too.
    let (_, sub) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    assert_eq!(sub.rooms[0].last_event_id, other);
    let mut c = redis.conn().await;
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("lamplight:{{{ROOM}}}:stream"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_and_statuses_are_cluster_wide() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    const TENANT: &str = "tenant:t1";
    // An observer of the tenant room (on node B) sees the statuses.
    let mut observer = b.client(&user_token("observer")).await;
    let (mut statuses, _) = subscribe(&mut observer, &[TENANT], &[]).await.unwrap();
    // The next status event, less the observer's own ONLINE: exactly `user` with `status`.
    let mut expect_status = async |user: &str, status: user_status::Status| loop {
        let e = next_event(&mut statuses).await;
        let mut changes = status_changes(&e).unwrap_or_else(|| panic!("{e:?}"));
        changes.retain(|(u, online)| !(u == "observer" && *online));
        if changes.is_empty() {
            continue;
        }
        let online = status == user_status::Status::Online;
        assert_eq!(changes, [(user.to_owned(), online)]);
        return;
    };

    let mut u1_a = a.client(&user_token("u1")).await;
    let mut u1_b = b.client(&user_token("u1")).await;
    let mut u2_b = b.client(&user_token("u2")).await;
    let (s1, _) = subscribe(&mut u1_a, &[ROOM], &[]).await.unwrap();
    expect_status("u1", user_status::Status::Online).await;
    let (s2, _) = subscribe(&mut u1_b, &[ROOM], &[]).await.unwrap();
    let (s3, _) = subscribe(&mut u2_b, &[ROOM], &[]).await.unwrap();
    expect_status("u2", user_status::Status::Online).await; // and no second ONLINE for u1

    for server in [&a, &b] {
        let mut c = server.client(&user_token("u3")).await;
        let p = c
            .get_presence(GetPresenceRequest {
                room: ROOM.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.user_ids, ["u1", "u2"]);
        assert_eq!((p.user_count, p.connection_count), (2, 3));
    }

    // u1 closes the stream on A: still online through B.
    drop(s1);
    drop(s3);
    expect_status("u2", user_status::Status::Offline).await;
    drop(s2);
    expect_status("u1", user_status::Status::Offline).await;
    let mut c = a.client(&user_token("u3")).await;
    let p = c
        .get_presence(GetPresenceRequest {
            room: ROOM.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.connection_count, 0, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_typing_event_id_is_a_valid_since() {
    const CHANNEL: &str = "tenant:t1:channel:c1";
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut user = a.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[CHANNEL], &[]).await.unwrap();
    let mut svc = a.client(&publisher_token()).await;
    let e1 = publish(&mut svc, CHANNEL, 1, "").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, e1);
    let mut typist = b.client(&user_token("u2")).await;
    typist
        .set_typing(lamplight::proto::v1::SetTypingRequest {
            channel_room: CHANNEL.into(),
            is_typing: true,
        })
        .await
        .unwrap();
    let typing = next_event(&mut stream).await;
    assert!(matches!(typing.payload, Some(Payload::Typing(_))));
    assert!(
        typing.id.starts_with(&e1),
        "an ephemeral id follows the stored one: {}",
        typing.id
    );
    let e2 = publish(&mut svc, CHANNEL, 2, "").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, e2);

    // Resuming from the typing event (on the other node) replays what came after it, and no typing.
    let mut again = b.client(&user_token("u1")).await;
    let (mut resumed, sub) = subscribe(&mut again, &[CHANNEL], &[(CHANNEL, &typing.id)])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered);
    assert_eq!(next_event(&mut resumed).await.id, e2);
}

#[tokio::test]
async fn a_node_refuses_to_start_without_its_redis() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let mut server = TestServer::start_with(|c| use_redis(c, &url)).await;
    let result = tokio::time::timeout(Duration::from_secs(10), server.handle.take().unwrap())
        .await
        .expect("fails fast")
        .unwrap();
    let err = result.expect_err("no Redis, no server");
    assert!(err.to_string().contains("Redis"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_streams_joining_many_rooms_at_once() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    // 200 users open their streams at the same moment, each in their own room (subscriptions batch).
    let mut opened = futures::future::join_all((0..200).map(|i| {
        let b = &b;
        async move {
            let user = format!("u{i}");
            let mut c = b.client(&user_token(&user)).await;
            let room = format!("tenant:t1:user:{user}");
            (
                room.clone(),
                subscribe(&mut c, &[&room], &[]).await.unwrap().0,
            )
        }
    }))
    .await;
    let mut svc = a.client(&publisher_token()).await;
    for (room, stream) in opened.iter_mut() {
        assert_eq!(redis.numsub(&room_channel(room)).await, 1, "{room}");
        let id = publish(&mut svc, room, 0, "").await.unwrap();
        assert_eq!(next_event(stream).await.id, id);
    }
}

/// The node's sockets to Redis, found among this process's file descriptors (the test servers run
/// in-process), with whether each has `TCP_NODELAY`.
fn redis_sockets_nodelay(redis_port: u16) -> Vec<bool> {
    use std::os::fd::BorrowedFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor was open a moment ago and is only borrowed for two getsockopt calls; if a
        // task closed it meanwhile they fail (or name another socket) and it is skipped or checked as well.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let to_redis = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() == redis_port);
        if to_redis {
            found.push(sock.tcp_nodelay().unwrap_or(false));
        }
    }
    found
}

/// A node pipelines its concurrent publishes on one connection: with Nagle's algorithm (redis-rs's
/// default) a command written while an earlier one is unacknowledged would wait for that ACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_to_redis_has_tcp_nodelay() {
    let redis = RedisServer::start().await;
    let a = node(&redis).await;
    let mut subscriber = a.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut subscriber, &[ROOM], &[]).await.unwrap();
    let mut publisher = a.client(&publisher_token()).await;
    publish(&mut publisher, ROOM, 1, "").await.unwrap();
    next_event(&mut stream).await;
    let sockets = redis_sockets_nodelay(redis.port);
    assert!(
        sockets.len() >= 2,
        "expected the node's command and pub/sub connections to Redis, found {}",
        sockets.len()
    );
    assert!(
        sockets.iter().all(|&nodelay| nodelay),
        "connections to Redis without TCP_NODELAY: {sockets:?}"
    );
}
