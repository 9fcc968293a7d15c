//! Coalesced user statuses on the embedded bus: a burst of connections of one tenant costs a handful of
//! `user.status` events, each carrying many changes; a watcher applying them ends with the true online
//! set; a user who came and went within one window is not announced; a big tenant's events are spaced by
//! its size (`--status-deliveries-per-sec`); `--user-statuses=false` publishes none.
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;

const USERS: usize = 200;

/// Opens one stream for each of `users` at once (concurrently), each on its own connection, in the
/// tenant room (where every member hears the statuses) and the user's own room.
async fn connect_all(
    server: &TestServer,
    users: &[String],
) -> Vec<tonic::Streaming<lamplight::proto::v1::SubscribeResponse>> {
    let opened = futures::future::join_all(users.iter().map(|user| async move {
        let mut client = server.client(&user_token(user)).await;
        let room = format!("user:{user}");
        subscribe(&mut client, &["tenant:t1", room.as_str()], &[])
            .await
            .unwrap()
            .0
    }))
    .await;
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_users_costs_a_handful_of_status_events() {
    let server = TestServer::start().await;
    // A service watches the tenant room (services have no status of their own).
    let mut watcher = server.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut watcher, &["tenant:t1"], &[]).await.unwrap();

    let users: Vec<String> = (0..USERS).map(|i| format!("u{i:03}")).collect();
    let streams = connect_all(&server, &users).await;
    let all: BTreeSet<String> = users.iter().cloned().collect();
    let mut seen = OnlineSet::default();
    seen.until(&mut statuses, &all, Duration::from_secs(60))
        .await;
    eprintln!(
        "{USERS} users online: {} status events, largest {} changes",
        seen.events, seen.largest
    );
    // One event per transition would be 200; one per window is a handful.
    assert!(
        seen.events <= USERS / 10,
        "{} status events for {USERS} users coming online",
        seen.events
    );
    assert_eq!(seen.changes, USERS, "each user announced once");
    // The truth agrees.
    let mut svc = server.client(&publisher_token()).await;
    let mut presence = get_presence(&mut svc, "tenant:t1").await.unwrap();
    assert_eq!(presence.user_count as usize, USERS);

    // All leave at once: again a handful of events, and nobody is left online.
    drop(streams);
    seen.until(&mut statuses, &BTreeSet::new(), Duration::from_secs(60))
        .await;
    assert!(
        seen.events <= 2 * USERS / 10,
        "{} status events in all",
        seen.events
    );
    assert_eq!(seen.changes, 2 * USERS);
    presence = get_presence(&mut svc, "tenant:t1").await.unwrap();
    assert_eq!(presence.user_count, 0);
    // Nothing else follows.
    assert_nothing_before_marker(&mut svc, &mut statuses).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_tenant_gets_its_status_events_spaced_by_its_size() {
    // 100 users online and 50 deliveries/s: at most one status event every 2 s (the window is 100 ms).
    let server = TestServer::start_with(|c| {
        c.status_window_ms = 100;
        c.status_deliveries_per_sec = 50;
    })
    .await;
    let mut watcher = server.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut watcher, &["tenant:t1"], &[]).await.unwrap();
    let users: Vec<String> = (0..100).map(|i| format!("u{i:03}")).collect();
    let _streams = connect_all(&server, &users).await;
    let mut all: BTreeSet<String> = users.iter().cloned().collect();
    let mut seen = OnlineSet::default();
    seen.until(&mut statuses, &all, Duration::from_secs(60))
        .await;
    // The event that completed the set was settled with 100 users told online, at most now.
    let last = tokio::time::Instant::now();
    let _late = connect_all(&server, &["u100".to_owned()]).await;
    all.insert("u100".to_owned());
    seen.until(&mut statuses, &all, Duration::from_secs(30))
        .await;
    let gap = last.elapsed();
    // 2 s after the previous settle; its delivery to us may have taken a little of that.
    assert!(
        gap >= Duration::from_millis(1500),
        "u100 was announced {gap:?} after the previous event, not spaced by the tenant's size"
    );
}

async fn assert_nothing_before_marker(
    svc: &mut Client,
    stream: &mut tonic::Streaming<lamplight::proto::v1::SubscribeResponse>,
) {
    tokio::time::sleep(STATUS_SETTLE).await;
    let id = publish_task(svc, "tenant:t1", "marker").await.unwrap();
    let event = next_event(stream).await;
    assert_eq!(event.id, id, "expected the marker, got {event:?}");
}

#[tokio::test]
async fn a_user_who_comes_and_goes_within_a_window_is_not_announced() {
    // A long window, so that u1's stream opens and closes within it even on a loaded machine.
    let server = TestServer::start_with(|c| c.status_window_ms = 4000).await;
    let mut svc = server.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap();

    let mut u1 = server.client(&user_token("u1")).await;
    let (u1_stream, _) = subscribe(&mut u1, &["user:u1"], &[]).await.unwrap();
    let mut u2 = server.client(&user_token("u2")).await;
    let (_u2_stream, _) = subscribe(&mut u2, &["user:u2"], &[]).await.unwrap();
    drop(u1_stream);
    eventually_presence(&mut svc, "tenant:t1:user:u1", 0).await;
    // The window's one event: u2 came, u1 is not in it.
    assert_diff(&next_event(&mut statuses).await, &[("u2", true)]);
}

/// Polls `GetPresence(room)` until it counts `users` users.
async fn eventually_presence(client: &mut Client, room: &str, users: u32) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while get_presence(client, room).await.unwrap().user_count != users {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{room} never had {users} users"));
}

#[tokio::test]
async fn statuses_off_publishes_none_and_presence_still_counts() {
    let server = TestServer::start_with(|c| c.user_statuses = false).await;
    let mut svc = server.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut svc, &["tenant:t1"], &[]).await.unwrap();
    let mut u1 = server.client(&user_token("u1")).await;
    let (u1_stream, _) = subscribe(&mut u1, &["user:u1"], &[]).await.unwrap();
    assert_eq!(
        get_presence(&mut svc, "tenant:t1:user:u1")
            .await
            .unwrap()
            .user_count,
        1
    );
    drop(u1_stream);
    eventually_presence(&mut svc, "tenant:t1:user:u1", 0).await;
    assert_nothing_before_marker(&mut svc, &mut statuses).await;
}
