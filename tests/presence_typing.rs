//! Presence (GetPresence counts, ONLINE/OFFLINE statuses in the tenant room) and typing (SetTyping events,
//! policy, rate limit), and that both kinds of event are ephemeral: live only, never replayed by `since`.
mod support;

use std::time::Duration;

use lamplight::auth::DevToken;
use lamplight::proto::v1::{event::Payload, GetPresenceResponse, SetTypingRequest, Typing};
use support::*;
use tonic::Code;

const CHANNEL: &str = "tenant:t1:channel:c1";

/// Polls `GetPresence(room)` until it reports `users` users and `connections` connections, failing after
/// 10 s. Polling is needed because a dropped stream is removed from presence by a task the server spawns
/// when it notices the stream is gone; no event marks that moment unless it is the user's last stream.
async fn wait_presence(
    client: &mut Client,
    room: &str,
    users: u32,
    connections: u32,
) -> GetPresenceResponse {
    let mut last = None;
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let p = get_presence(client, room).await.expect("GetPresence");
            if (p.user_count, p.connection_count) == (users, connections) {
                return p;
            }
            last = Some(p);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        panic!("{room}: expected {users} users / {connections} connections within 10 s, last saw {last:?}")
    })
}

async fn set_typing(client: &mut Client, room: &str, is_typing: bool) -> Result<(), tonic::Status> {
    client
        .set_typing(SetTypingRequest {
            channel_room: room.into(),
            is_typing,
        })
        .await
        .map(|_| ())
}

/// Asserts `event` is the `user.status` event of tenant `t1` telling that `user` came online / went
/// offline, and nobody else.
fn assert_status(event: &lamplight::proto::v1::Event, user: &str, online: bool) {
    assert_diff(event, &[(user, online)]);
}

/// Publishes a task to `room` and asserts it is the next event on `stream`: everything published to
/// the room before it (and not yet read) would have come first.
async fn assert_nothing_before_marker(
    publisher: &mut Client,
    stream: &mut tonic::Streaming<lamplight::proto::v1::SubscribeResponse>,
    room: &str,
    marker: &str,
) {
    // A status is published a window after its transition: give it time to come first.
    tokio::time::sleep(STATUS_SETTLE).await;
    let id = publish_task(publisher, room, marker).await.unwrap();
    let event = next_event(stream).await;
    assert_eq!(event.id, id, "expected marker {marker}, got {event:?}");
}

#[tokio::test]
async fn presence_counts_distinct_users_and_connections() {
    let server = TestServer::start().await;
    // zoe first, so a sorted list is not just the order of arrival.
    let mut zoe = server.client(&user_token("zoe")).await;
    let (zoe_stream, _) = subscribe(&mut zoe, &["tenant:t1", CHANNEL], &[])
        .await
        .unwrap();
    let mut amy = server.client(&user_token("amy")).await;
    let (amy_1, _) = subscribe(&mut amy, &["tenant:t1"], &[]).await.unwrap();
    let (amy_2, _) = subscribe(&mut amy, &["tenant:t1", "tenant:t1:project:p1"], &[])
        .await
        .unwrap();
    // Publishers are not people: not counted, with or without a tenant in their token.
    let tenant_publisher = sign(&DevToken {
        sub: "svc-t1".into(),
        tid: Some("t1".into()),
        roles: vec!["publisher".into()],
        iat: now(),
        exp: now() + 3600,
        ..DevToken::default()
    });
    let mut streams = Vec::new();
    for token in [publisher_token(), tenant_publisher] {
        let mut svc = server.client(&token).await;
        let (stream, _) = subscribe(&mut svc, &["tenant:t1", CHANNEL], &[])
            .await
            .unwrap();
        streams.push(stream);
    }

    // A member of the tenant without a stream of its own asks.
    let mut u3 = server.client(&user_token("u3")).await;
    let p = get_presence(&mut u3, "tenant:t1").await.unwrap();
    assert_eq!(
        (p.user_count, p.connection_count, p.user_ids.clone()),
        (2, 3, vec!["amy".to_owned(), "zoe".to_owned()])
    );
    let p = get_presence(&mut u3, CHANNEL).await.unwrap();
    assert_eq!(
        (p.user_count, p.connection_count, p.user_ids),
        (1, 1, vec!["zoe".to_owned()])
    );
    let p = get_presence(&mut u3, "tenant:t1:project:p1").await.unwrap();
    assert_eq!(
        (p.user_count, p.connection_count, p.user_ids),
        (1, 1, vec!["amy".to_owned()])
    );
    let p = get_presence(&mut u3, "tenant:t1:project:p9").await;
    expect_status(p, Code::PermissionDenied, &["tenant:t1:project:p9"]);

    // Streams close: counts drop.
    drop(amy_1);
    let p = wait_presence(&mut u3, "tenant:t1", 2, 2).await;
    assert_eq!(p.user_ids, ["amy", "zoe"]);
    drop(zoe_stream);
    let p = wait_presence(&mut u3, "tenant:t1", 1, 1).await;
    assert_eq!(p.user_ids, ["amy"]);
    let p = wait_presence(&mut u3, CHANNEL, 0, 0).await;
    assert!(p.user_ids.is_empty());
    drop(amy_2);
    let p = wait_presence(&mut u3, "tenant:t1", 0, 0).await;
    assert!(p.user_ids.is_empty());
    wait_presence(&mut u3, "tenant:t1:project:p1", 0, 0).await;
}

#[tokio::test]
async fn presence_is_for_members_of_the_room_only() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for room in [
        "tenant:t2",
        "user:u2",
        "tenant:t1:project:p2",
        "tenant:t1:channel:c2",
        "tenant:t2:channel:c1",
    ] {
        expect_status(
            get_presence(&mut u1, room).await,
            Code::PermissionDenied,
            &["not allowed in room", room],
        );
    }
    let mut other_tenant = server
        .client(&sign(&DevToken {
            tid: Some("t2".into()),
            ..user_claims("x1")
        }))
        .await;
    expect_status(
        get_presence(&mut other_tenant, "tenant:t1").await,
        Code::PermissionDenied,
        &["tenant:t1"],
    );
    for room in ["user:u1", "tenant:t1", "tenant:t1:project:p1", CHANNEL] {
        get_presence(&mut u1, room).await.unwrap();
    }
    // Internal services may ask about any room.
    let mut svc = server.client(&publisher_token()).await;
    get_presence(&mut svc, "tenant:t2:project:p5")
        .await
        .unwrap();
}

#[tokio::test]
async fn online_on_first_stream_offline_after_last() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let mut watcher = server.client(&publisher_token()).await;
    let (mut statuses, _) = subscribe(&mut watcher, &["tenant:t1"], &[]).await.unwrap();

    let mut u1 = server.client(&user_token("u1")).await;
    let (first, _) = subscribe(&mut u1, &["user:u1"], &[]).await.unwrap();
    assert_status(&next_event(&mut statuses).await, "u1", true);

    // A second stream of the same user, and a user of another tenant: no status in tenant:t1.
    let (second, _) = subscribe(&mut u1, &["tenant:t1:project:p1"], &[])
        .await
        .unwrap();
    let mut stranger = server
        .client(&sign(&DevToken {
            tid: Some("t2".into()),
            ..user_claims("x1")
        }))
        .await;
    let (_stranger_stream, _) = subscribe(&mut stranger, &["user:x1"], &[]).await.unwrap();
    assert_nothing_before_marker(&mut svc, &mut statuses, "tenant:t1", "marker-1").await;

    // The first stream closes; once the server has counted that, there is still no OFFLINE.
    drop(first);
    wait_presence(&mut svc, "tenant:t1:user:u1", 0, 0).await;
    assert_nothing_before_marker(&mut svc, &mut statuses, "tenant:t1", "marker-2").await;

    // The last one closes: OFFLINE.
    drop(second);
    assert_status(&next_event(&mut statuses).await, "u1", false);

    // Back again: ONLINE again.
    let (_third, _) = subscribe(&mut u1, &["tenant:t1:channel:c1"], &[])
        .await
        .unwrap();
    assert_status(&next_event(&mut statuses).await, "u1", true);
}

#[tokio::test]
async fn each_user_gets_its_own_status() {
    let server = TestServer::start().await;
    let mut watcher = server.client(&user_token("watcher")).await;
    let (mut statuses, _) = subscribe(&mut watcher, &["tenant:t1"], &[]).await.unwrap();
    // The watcher's own ONLINE comes first: it is a user too.
    assert_status(&next_event(&mut statuses).await, "watcher", true);

    let mut a = server.client(&user_token("a")).await;
    let (a_stream, _) = subscribe(&mut a, &["user:a"], &[]).await.unwrap();
    assert_status(&next_event(&mut statuses).await, "a", true);
    let mut b = server.client(&user_token("b")).await;
    let (b_stream, _) = subscribe(&mut b, &["user:b"], &[]).await.unwrap();
    assert_status(&next_event(&mut statuses).await, "b", true);

    drop(b_stream);
    assert_status(&next_event(&mut statuses).await, "b", false);
    drop(a_stream);
    assert_status(&next_event(&mut statuses).await, "a", false);
}

#[tokio::test]
async fn typing_reaches_the_other_members_of_the_channel() {
    let server = TestServer::start().await;
    let mut u2 = server.client(&user_token("u2")).await;
    let (mut stream, _) = subscribe(&mut u2, &[CHANNEL], &[]).await.unwrap();
    let mut u1 = server.client(&user_token("u1")).await;
    for is_typing in [true, false] {
        set_typing(&mut u1, CHANNEL, is_typing).await.unwrap();
        let event = next_event(&mut stream).await;
        assert_eq!(event.r#type, "typing");
        assert_eq!(event.room, CHANNEL);
        assert_eq!(event.publisher_id, "u1");
        assert!(!event.id.is_empty() && event.time.is_some(), "{event:?}");
        assert_eq!(
            event.payload,
            Some(Payload::Typing(Typing {
                channel_id: "c1".into(),
                user_id: "u1".into(),
                is_typing,
            }))
        );
    }
}

#[tokio::test]
async fn typing_only_in_channel_rooms_the_user_may_join() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for room in ["tenant:t1:project:p1", "tenant:t1", "user:u1"] {
        expect_status(
            set_typing(&mut u1, room, true).await,
            Code::PermissionDenied,
            &[room, "typing is only for channel rooms"],
        );
    }
    for room in ["tenant:t1:channel:c2", "tenant:t2:channel:c1"] {
        expect_status(
            set_typing(&mut u1, room, true).await,
            Code::PermissionDenied,
            &["not allowed in room", room],
        );
    }
    // Admins may type in every channel of their tenant.
    let mut admin = server
        .client(&sign(&DevToken {
            roles: vec!["admin".into()],
            channels: vec![],
            ..user_claims("boss")
        }))
        .await;
    set_typing(&mut admin, "tenant:t1:channel:c9", true)
        .await
        .unwrap();
    expect_status(
        set_typing(&mut admin, "tenant:t2:channel:c9", true).await,
        Code::PermissionDenied,
        &["tenant:t2:channel:c9"],
    );
}

#[tokio::test]
async fn typing_is_rate_limited_per_user() {
    // The default rate: 5 per second, bursts of 5.
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for i in 0..5 {
        set_typing(&mut u1, CHANNEL, i % 2 == 0)
            .await
            .unwrap_or_else(|s| panic!("call {i} of the first burst: {s:?}"));
    }
    // Beyond the burst, calls are refused until the bucket refills (one call per 200 ms); 30 calls
    // spread over less than 6 s cannot all fit.
    let mut refused = None;
    for _ in 0..30 {
        if let Err(status) = set_typing(&mut u1, CHANNEL, true).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("30 SetTyping calls right after a burst of 5 were all accepted");
    expect_status::<()>(
        Err(refused),
        Code::ResourceExhausted,
        &["too many SetTyping calls"],
    );
    // The limit is per user: another user types freely.
    let mut u2 = server.client(&user_token("u2")).await;
    set_typing(&mut u2, CHANNEL, true).await.unwrap();
}

#[tokio::test]
async fn typing_and_statuses_are_not_replayed() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let mut live = server.client(&publisher_token()).await;
    let (mut live_stream, _) = subscribe(&mut live, &[CHANNEL, "tenant:t1"], &[])
        .await
        .unwrap();

    // In the channel: task, typing, task.
    let first = publish_task(&mut svc, CHANNEL, "task-1").await.unwrap();
    let mut u1 = server.client(&user_token("u1")).await;
    set_typing(&mut u1, CHANNEL, true).await.unwrap();
    let second = publish_task(&mut svc, CHANNEL, "task-2").await.unwrap();
    // In the tenant room: task, user.status (u1 online), task.
    let tenant_first = publish_task(&mut svc, "tenant:t1", "task-3").await.unwrap();
    let (_u1_stream, _) = subscribe(&mut u1, &["user:u1"], &[]).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let e = next_event(&mut live_stream).await;
        seen.push((e.room, e.r#type));
    }
    // The status came (a window after u1's stream opened): now the second task.
    let tenant_second = publish_task(&mut svc, "tenant:t1", "task-4").await.unwrap();
    let e = next_event(&mut live_stream).await;
    seen.push((e.room, e.r#type));

    let expected = [
        (CHANNEL, "task.created"),
        (CHANNEL, "typing"),
        (CHANNEL, "task.created"),
        ("tenant:t1", "task.created"),
        ("tenant:t1", "user.status"),
        ("tenant:t1", "task.created"),
    ];
    let seen: Vec<(&str, &str)> = seen.iter().map(|(r, t)| (r.as_str(), t.as_str())).collect();
    assert_eq!(seen, expected);

    // Resuming after the first task of each room replays only the second task. A publisher resumes, so
    // no ONLINE of its own comes live on this stream.
    let mut resumer = server.client(&publisher_token()).await;
    let (mut stream, subscribed) = subscribe(
        &mut resumer,
        &[CHANNEL, "tenant:t1"],
        &[(CHANNEL, &first), ("tenant:t1", &tenant_first)],
    )
    .await
    .unwrap();
    assert!(
        subscribed.rooms.iter().all(|r| r.recovered),
        "{subscribed:?}"
    );
    let replayed = [next_event(&mut stream).await, next_event(&mut stream).await];
    let mut ids: Vec<&str> = replayed.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    let mut want = [second.as_str(), tenant_second.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "{replayed:?}");
    // Then live events only: nothing else was replayed.
    assert_nothing_before_marker(&mut svc, &mut stream, CHANNEL, "marker-1").await;
    assert_nothing_before_marker(&mut svc, &mut stream, "tenant:t1", "marker-2").await;
}
