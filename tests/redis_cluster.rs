//! The Redis bus on a 3-master Redis Cluster started by the test: sharded pub/sub, hash-tagged keys.
//! The same delivery guarantees as on one Redis: cross-node delivery in order, resume on another node,
//! one sharded subscription per room per node, idempotency and presence across nodes.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::time::Duration;

use lamplight::proto::v1::{
    event::Payload, subscribe_response::Kind, user_status, Event, GetPresenceRequest,
    PublishRequest, SubscribeResponse,
};
use redis_support::*;
use support::*;
use tonic::Streaming;

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
    let cluster = RedisCluster::start().await;
    let a = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let b = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let mut observer = b.client(&user_token("observer")).await;
    let (mut statuses, _) = subscribe(&mut observer, &["tenant:t1"], &[]).await.unwrap();
    let mut next_status = async || loop {
        let e = next_event(&mut statuses).await;
        if let Some(Payload::UserStatus(s)) = e.payload {
            if s.user_id != "observer" {
                return (s.user_id.clone(), s.status());
            }
        }
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
    let mut svc = a.client(&publisher_token()).await;
    let marker = publish(&mut svc, "tenant:t1", 0, "").await;
    assert_eq!(next_event(&mut statuses).await.id, marker);
}
