//! Coalesced user statuses across two nodes on one (private) Redis: a burst costs a handful of
//! `user.status` events; watchers on both nodes end with the true online set, also when users move between
//! nodes (OFFLINE decided on one node, ONLINE on the other within one window); a user who came and went
//! within a window is not announced; statuses off publish none.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use lamplight::proto::v1::SubscribeResponse;
use redis_support::*;
use support::*;
use tonic::Streaming;

const USERS: usize = 200;

async fn node(redis: &RedisServer, tweak: impl FnOnce(&mut lamplight::Config)) -> TestServer {
    let url = redis.url();
    TestServer::start_with(|c| {
        use_redis(c, &url);
        tweak(c);
    })
    .await
}

/// A stream of `user` on `server` in the tenant room and the user's own room.
async fn open(server: &TestServer, user: &str) -> Streaming<SubscribeResponse> {
    let mut client = server.client(&user_token(user)).await;
    let own = format!("user:{user}");
    subscribe(&mut client, &["tenant:t1", own.as_str()], &[])
        .await
        .unwrap()
        .0
}

async fn tenant_users(server: &TestServer) -> BTreeSet<String> {
    let mut svc = server.client(&publisher_token()).await;
    all_present(&mut svc, "tenant:t1")
        .await
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_coalesce_a_burst_and_watchers_end_with_the_truth() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, |_| {}).await, node(&redis, |_| {}).await);
    // A service watches on each node (services have no status of their own).
    let mut watchers = Vec::new();
    for server in [&a, &b] {
        let mut svc = server.client(&publisher_token()).await;
        watchers.push(subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap().0);
    }

    // 200 users at once, half on each node.
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i:03}")).collect();
    let mut streams: Vec<Option<Streaming<SubscribeResponse>>> =
        futures::future::join_all(users.iter().enumerate().map(|(i, user)| {
            let server = if i % 2 == 0 { &a } else { &b };
            async move { Some(open(server, user).await) }
        }))
        .await;
    let all: BTreeSet<String> = users.iter().cloned().collect();
    let mut seen: Vec<OnlineSet> = vec![OnlineSet::default(), OnlineSet::default()];
    for (set, stream) in seen.iter_mut().zip(&mut watchers) {
        set.until(stream, &all, Duration::from_secs(60)).await;
        assert_eq!(set.changes, USERS, "each user announced once");
    }
    eprintln!(
        "{USERS} users on two nodes: {} status events, largest {} changes",
        seen[0].events, seen[0].largest
    );
    assert!(
        seen[0].events <= USERS / 10,
        "{} status events for {USERS} users coming online",
        seen[0].events
    );

    // Users move between nodes: the even ones (on A) close on A and open on B right away, so that one
    // node decides OFFLINE and the other ONLINE within the same window; the first 20 odd ones (on B)
    // leave for good.
    let mut moved = Vec::new();
    for (i, user) in users.iter().enumerate() {
        if i % 2 == 0 {
            streams[i] = None;
            moved.push(open(&b, user).await);
        } else if i < 40 {
            streams[i] = None;
        }
    }
    let truth: BTreeSet<String> = users
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0 || *i >= 40)
        .map(|(_, u)| u.clone())
        .collect();
    eventually(Duration::from_secs(30), "presence settles", || async {
        tenant_users(&a).await == truth
    })
    .await;
    for (set, stream) in seen.iter_mut().zip(&mut watchers) {
        set.until(stream, &truth, Duration::from_secs(60)).await;
    }
    // And nothing more follows that would change it: a marker comes next on both.
    tokio::time::sleep(STATUS_SETTLE).await;
    let mut svc = a.client(&publisher_token()).await;
    let marker = publish_task(&mut svc, "tenant:t1", "marker").await.unwrap();
    for (set, stream) in seen.iter_mut().zip(&mut watchers) {
        loop {
            let e = next_event(stream).await;
            if e.id == marker {
                break;
            }
            assert!(set.apply(&e), "{e:?}");
        }
        assert_eq!(set.online, truth, "the watchers' online set is the truth");
    }

    // Everybody leaves: nobody stays online.
    drop(streams);
    drop(moved);
    for (set, stream) in seen.iter_mut().zip(&mut watchers) {
        set.until(stream, &BTreeSet::new(), Duration::from_secs(60))
            .await;
    }
    assert!(tenant_users(&b).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_who_comes_and_goes_within_a_window_is_not_announced_by_any_node() {
    let redis = RedisServer::start().await;
    // A long window, so that u1's stream opens and closes within it even on a loaded machine.
    let slow = |c: &mut lamplight::Config| c.status_window_ms = 4000;
    let (a, b) = (node(&redis, slow).await, node(&redis, slow).await);
    let mut svc = b.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap();

    let u1 = open(&a, "u1").await;
    let _u2 = open(&b, "u2").await;
    drop(u1);
    eventually(Duration::from_secs(10), "u1 leaves presence", || async {
        !tenant_users(&b).await.contains("u1")
    })
    .await;
    assert_diff(&next_event(&mut statuses).await, &[("u2", true)]);
    // Node A settles the tenant too (it decided u1's transitions): nothing more to tell.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let marker = publish_task(&mut svc, "tenant:t1", "marker").await.unwrap();
    assert_eq!(next_event(&mut statuses).await.id, marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statuses_off_publish_none_on_redis() {
    let redis = RedisServer::start().await;
    let off = |c: &mut lamplight::Config| c.user_statuses = false;
    let (a, b) = (node(&redis, off).await, node(&redis, off).await);
    let mut svc = b.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap();
    let u1 = open(&a, "u1").await;
    assert_eq!(tenant_users(&b).await, BTreeSet::from(["u1".to_owned()]));
    drop(u1);
    eventually(Duration::from_secs(10), "u1 leaves presence", || async {
        tenant_users(&b).await.is_empty()
    })
    .await;
    tokio::time::sleep(STATUS_SETTLE).await;
    let marker = publish_task(&mut svc, "tenant:t1", "marker").await.unwrap();
    assert_eq!(next_event(&mut statuses).await.id, marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_moving_between_nodes_is_not_announced_whatever_order_the_nodes_settle_in() {
    let redis = RedisServer::start().await;
    // A settles 3 s after a change, B after 100 ms: B publishes first what A decided first.
    let a = node(&redis, |c| c.status_window_ms = 3000).await;
    let b = node(&redis, |c| c.status_window_ms = 100).await;
    let mut svc = b.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap();
    let on_a = open(&a, "u1").await;
    assert_diff(&next_event(&mut statuses).await, &[("u1", true)]);

    // u1 leaves A (A decides OFFLINE) and opens on B (B decides ONLINE) at once.
    drop(on_a);
    eventually(Duration::from_secs(10), "u1 leaves A", || async {
        !tenant_users(&b).await.contains("u1")
    })
    .await;
    let _on_b = open(&b, "u1").await;
    // Both nodes have settled (A's window is the longer): u1 was online before and is now, so nothing
    // was published; one event per decided transition, in the order nodes settle, would have ended with
    // OFFLINE.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let marker = publish_task(&mut svc, "tenant:t1", "marker").await.unwrap();
    let next = next_event(&mut statuses).await;
    assert_eq!(next.id, marker, "a status was published: {next:?}");
    assert!(tenant_users(&a).await.contains("u1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_big_tenants_events_are_spaced_cluster_wide_and_one_settle_takes_every_nodes_changes() {
    let redis = RedisServer::start().await;
    // 50 users online and 50 deliveries/s: one event a second at most, whichever node publishes it.
    let spaced = |c: &mut lamplight::Config| {
        c.status_window_ms = 100;
        c.status_deliveries_per_sec = 50;
    };
    let (a, b) = (node(&redis, spaced).await, node(&redis, spaced).await);
    let mut svc = b.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap();
    let mut streams = Vec::new();
    let mut all = BTreeSet::new();
    for i in 0..50 {
        let user = format!("u{i:02}");
        streams.push(open(&a, &user).await);
        all.insert(user);
    }
    let mut seen = OnlineSet::default();
    seen.until(&mut statuses, &all, Duration::from_secs(60))
        .await;
    let last = tokio::time::Instant::now();
    let events = seen.events;

    // One new user on each node: each node decided one ONLINE, and each settles 100 ms later.
    streams.push(open(&a, "x1").await);
    streams.push(open(&b, "x2").await);
    all.extend(["x1".to_owned(), "x2".to_owned()]);
    seen.until(&mut statuses, &all, Duration::from_secs(30))
        .await;
    let gap = last.elapsed();
    assert!(
        gap >= Duration::from_millis(700),
        "the next status event came {gap:?} after the previous one: not spaced cluster-wide (1 s)"
    );
    assert_eq!(
        seen.events,
        events + 1,
        "the first node to settle took both nodes' changes"
    );
}
