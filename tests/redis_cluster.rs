//! The Redis bus on a 3-master Redis Cluster started by the test: sharded pub/sub, hash-tagged keys.
//! The same delivery guarantees as on one Redis: cross-node delivery in order, resume on another node,
//! one sharded subscription per room per node, idempotency and presence across nodes.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::time::Duration;

use lamplight::proto::v1::{
    subscribe_response::Kind, user_status, Event, GetPresenceRequest, PublishRequest,
    SubscribeResponse,
};
use redis_support::*;
use support::*;
use tonic::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn task(room: &str, n: usize) -> Event {
    task_event(room, &format!("task-{n}"))
}

async fn publish(client: &mut Client, room: &str, n: usize, key: &str) -> String {
    client
        .publish(PublishRequest {
            event: Some(task(room, n)),
            idempotency_key: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn next_event(stream: &mut Streaming<SubscribeResponse>) -> Event {
    match next_non_heartbeat(stream).await.expect("stream ok") {
        Kind::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivery_resume_subscriptions_idempotency_and_presence_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let a = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let b = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    // Rooms on different shards (their hash tags differ).
    let rooms = [
        "tenant:t1:project:p1",
        "tenant:t1:channel:c1",
        "tenant:t1:user:u1",
    ];
    let owners: Vec<_> = {
        let mut c = cluster.nodes[0].conn().await;
        let mut slots = Vec::new();
        for room in rooms {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(room_channel(room))
                .query_async(&mut c)
                .await
                .unwrap();
            slots.push(slot);
        }
        slots
    };
    assert!(
        owners.iter().any(|s| *s != owners[0]),
        "rooms spread over slots: {owners:?}"
    );

    // 1. A thousand events published on A reach a stream on B, in order; other rooms too.
    let mut user_b = b.client(&user_token("u1")).await;
    let (mut stream_b, _) = subscribe(&mut user_b, &rooms, &[]).await.unwrap();
    let mut svc_a = a.client(&publisher_token()).await;
    let mut ids = Vec::new();
    for n in 0..1000 {
        ids.push(publish(&mut svc_a, rooms[0], n, "").await);
    }
    for (n, id) in ids.iter().enumerate() {
        let e = next_event(&mut stream_b).await;
        assert_eq!((&e.id, e.room.as_str()), (id, rooms[0]), "event {n}");
    }
    for room in &rooms[1..] {
        let id = publish(&mut svc_a, room, 0, "").await;
        let e = next_event(&mut stream_b).await;
        assert_eq!((&e.id, &e.room), (&id, &room.to_string()));
    }

    // 2. One sharded subscription per room per node.
    let mut user_a = a.client(&user_token("u2")).await;
    let (stream_a1, _) = subscribe(&mut user_a, &rooms[..1], &[]).await.unwrap();
    let (stream_a2, _) = subscribe(&mut user_a, &rooms[..1], &[]).await.unwrap();
    let channel = room_channel(rooms[0]);
    assert_eq!(
        cluster.shard_numsub(&channel).await,
        2,
        "node A and node B, once each"
    );

    // 3. Resume on A from an id seen on B.
    let (mut resumed, sub) = subscribe(&mut user_a, &rooms[..1], &[(rooms[0], &ids[989])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered);
    for id in &ids[990..] {
        assert_eq!(&next_event(&mut resumed).await.id, id);
    }
    drop(resumed);

    // 4. A retry on the other node is deduplicated.
    let mut svc_b = b.client(&publisher_token()).await;
    let first = publish(&mut svc_a, rooms[0], 1, "k-1").await;
    let retry = publish(&mut svc_b, rooms[0], 1, "k-1").await;
    assert_eq!(first, retry);
    let other = publish(&mut svc_b, rooms[0], 2, "").await;
    assert_eq!(next_event(&mut stream_b).await.id, first);
    assert_eq!(next_event(&mut stream_b).await.id, other, "delivered once");

    // 5. Presence counts across nodes.
    let p = b
        .client(&user_token("u3"))
        .await
        .get_presence(GetPresenceRequest {
            room: rooms[0].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.user_ids, ["u1", "u2"]);

    // 6. No subscription left once the last local stream leaves.
    drop((stream_a1, stream_a2));
    eventually(Duration::from_secs(10), "node A unsubscribed", || async {
        cluster.shard_numsub(&channel).await == 1
    })
    .await;
    drop(stream_b);
    eventually(Duration::from_secs(10), "no subscription left", || async {
        cluster.shard_numsub(&channel).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statuses_are_published_once_per_transition_on_a_cluster() {
    // One status event per change (apart from the observer's own ONLINE, which may share one).
    let cluster = RedisCluster::start().await;
    let a = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let b = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let mut observer = b.client(&user_token("observer")).await;
    let (mut statuses, _) = subscribe(&mut observer, &["tenant:t1"], &[]).await.unwrap();
    let mut next_status = async || loop {
        let e = next_event(&mut statuses).await;
        let mut changes = status_changes(&e).unwrap_or_else(|| panic!("{e:?}"));
        changes.retain(|(u, _)| u != "observer");
        if let [(user, online)] = &changes[..] {
            let status = if *online {
                user_status::Status::Online
            } else {
                user_status::Status::Offline
            };
            return (user.clone(), status);
        }
        assert!(changes.is_empty(), "{changes:?}");
    };
    let mut on_a = a.client(&user_token("u1")).await;
    let mut on_b = b.client(&user_token("u1")).await;
    let (s1, _) = subscribe(&mut on_a, &["tenant:t1"], &[]).await.unwrap();
    let (s2, _) = subscribe(&mut on_b, &["tenant:t1"], &[]).await.unwrap();
    assert_eq!(
        next_status().await,
        ("u1".into(), user_status::Status::Online)
    );
    drop(s1);
    drop(s2);
    assert_eq!(
        next_status().await,
        ("u1".into(), user_status::Status::Offline)
    );
    // Then a marker: no second ONLINE/OFFLINE was queued before it.
    tokio::time::sleep(STATUS_SETTLE).await;
    let mut svc = a.client(&publisher_token()).await;
    let marker = publish(&mut svc, "tenant:t1", 0, "").await;
    assert_eq!(next_event(&mut statuses).await.id, marker);
}

async fn health(server: &TestServer) -> ServingStatus {
    let mut client = HealthClient::new(server.channel().await);
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

async fn wait_health(server: &TestServer, want: ServingStatus) {
    eventually(
        Duration::from_secs(30),
        &format!("health {want:?}"),
        || async { health(server).await == want },
    )
    .await;
}

/// Issue 10, item 3: one failing shard stopped every room (the node's catch-up stopped at the first
/// failing room and retried for ever, delivering nothing and taking no new Subscribe). With one master
/// killed, rooms on the other shards keep flowing and new streams on them open; a new stream on the
/// dead shard fails with UNAVAILABLE; an open stream gets a Reset for its room there; health is
/// NOT_SERVING while a local stream is in a room it cannot deliver, SERVING again once none is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_shard_costs_only_its_own_rooms() {
    let mut cluster = RedisCluster::start().await;
    let names: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let room = |name: &str| format!("tenant:t1:channel:{name}");
    let dead = cluster.owner(&room_channel(&room(&names[0]))).await;
    let (mut on_dead, mut on_live) = (Vec::new(), Vec::new());
    for name in &names {
        let r = room(name);
        if cluster.owner(&room_channel(&r)).await == dead {
            on_dead.push(r);
        } else {
            on_live.push(r);
        }
    }
    assert!(
        on_dead.len() >= 2 && on_live.len() >= 2,
        "rooms on both sides"
    );
    // A node whose own health probe goes through a live shard.
    let mut node_id = None;
    for i in 0..100 {
        let id = format!("node{i}");
        if cluster
            .owner(&format!("lamplight:node:{{{id}}}:health"))
            .await
            != dead
        {
            node_id = Some(id);
            break;
        }
    }
    let a = TestServer::start_with(|c| {
        use_cluster(c, &cluster);
        c.redis.redis_node_id = node_id;
    })
    .await;
    let mut claims = user_claims("u1");
    claims.channels = names.clone();
    let mut user = a.client(&sign(&claims)).await;
    let mut svc = a.client(&publisher_token()).await;
    let (live1, live2, dead1, dead2) = (&on_live[0], &on_live[1], &on_dead[0], &on_dead[1]);
    let (mut mixed, _) = subscribe(&mut user, &[live1, dead1], &[]).await.unwrap();
    let (mut only_live, _) = subscribe(&mut user, &[live1], &[]).await.unwrap();
    let before = publish(&mut svc, dead1, 0, "").await;
    assert_eq!(next_event(&mut mixed).await.id, before);
    wait_health(&a, ServingStatus::Serving).await;

    cluster.nodes[dead].kill();
    // Rooms on the live shards keep flowing, on both streams.
    let mut live_ids = Vec::new();
    for n in 1..6 {
        let id = publish(&mut svc, live1, n, "").await;
        assert_eq!(
            next_event(&mut only_live).await.id,
            id,
            "live room, event {n}"
        );
        live_ids.push(id);
    }
    // A new stream on a live shard opens and gets its events.
    let (mut fresh, _) =
        tokio::time::timeout(Duration::from_secs(10), subscribe(&mut user, &[live2], &[]))
            .await
            .expect("a Subscribe on a live shard does not hang")
            .expect("and it succeeds");
    let id = publish(&mut svc, live2, 0, "").await;
    assert_eq!(next_event(&mut fresh).await.id, id);
    // A new stream on the dead shard fails, and does not hang.
    let refused =
        tokio::time::timeout(Duration::from_secs(15), subscribe(&mut user, &[dead2], &[]))
            .await
            .expect("a Subscribe on the dead shard does not hang");
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);
    // The open stream: the live room's events in order, and a Reset for its room on the dead shard.
    let mut got = Vec::new();
    let mut reset = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !(reset && got.len() == live_ids.len()) {
        assert!(
            std::time::Instant::now() < deadline,
            "within 40 s: reset {reset}, live events {got:?}"
        );
        match next_non_heartbeat(&mut mixed)
            .await
            .expect("the stream stays open")
        {
            Kind::Event(e) => {
                assert_eq!(&e.room, live1);
                got.push(e.id);
            }
            Kind::Reset(r) => {
                assert_eq!(&r.room, dead1);
                reset = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, live_ids);
    // Health: a local stream sits in a room this node cannot deliver.
    wait_health(&a, ServingStatus::NotServing).await;
    drop(mixed);
    wait_health(&a, ServingStatus::Serving).await;
    let id = publish(&mut svc, live1, 9, "").await;
    assert_eq!(next_event(&mut only_live).await.id, id);
}
