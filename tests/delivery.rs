//! Delivery semantics, end to end through the real server: server-set fields, per-room order, replay with
//! `since` (exact recovery, `Reset` past the history, ephemeral events never replayed) and idempotent
//! publishes.
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use lamplight::auth::DevToken;
use lamplight::proto::v1::{
    event::Payload, subscribe_response::Kind, Bug, Custom, Event, Feature, Message, Notification,
    PublishRequest, SetTypingRequest, Task,
};
use prost_types::Timestamp;
use support::*;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";
const CHANNEL: &str = "tenant:t1:channel:c1";
const TENANT: &str = "tenant:t1";

/// A publisher token with its own `sub` (idempotency keys are per publisher).
fn publisher_token_for(sub: &str) -> String {
    sign(&DevToken {
        sub: sub.into(),
        roles: vec!["publisher".into()],
        iat: now(),
        exp: now() + 3600,
        ..DevToken::default()
    })
}

/// Publishes with an idempotency key.
async fn publish_keyed(client: &mut Client, event: Event, key: &str) -> String {
    let req = PublishRequest {
        event: Some(event),
        idempotency_key: key.into(),
    };
    tokio::time::timeout(Duration::from_secs(10), client.publish(req))
        .await
        .expect("publish did not complete within 10 s")
        .expect("publish failed")
        .into_inner()
        .id
}

/// The ids of `events` that belong to `room`, in order.
fn ids_in(events: &[Event], room: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.room == room)
        .map(|e| e.id.clone())
        .collect()
}

#[tokio::test]
async fn every_payload_round_trips_and_the_server_sets_id_time_and_publisher() {
    let server = TestServer::start().await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[PROJECT, CHANNEL, "tenant:t1:user:u1"], &[])
        .await
        .unwrap();
    let mut svc = server.client(&publisher_token()).await;

    // Client-supplied id, time and publisher must be overwritten.
    let forged = |room: &str, kind: &str, payload: Payload| Event {
        id: "forged-id".into(),
        room: room.into(),
        r#type: kind.into(),
        time: Some(Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        publisher_id: "mallory".into(),
        payload: Some(payload),
    };
    let mut custom_bytes: Vec<u8> = (0..=255u8).collect();
    custom_bytes.extend_from_slice(&[0, 0, 0xff, 0xfe, 0x80]);
    let sent = vec![
        forged(
            PROJECT,
            "task.created",
            Payload::Task(Task {
                id: "task-1".into(),
                project_id: "p1".into(),
                tenant_id: "t1".into(),
                title: "Write the tests ✓".into(),
                status: "todo".into(),
                priority: "high".into(),
                created_by_id: "u9".into(),
            }),
        ),
        forged(
            PROJECT,
            "bug.reported",
            Payload::Bug(Bug {
                id: "bug-1".into(),
                project_id: "p1".into(),
                tenant_id: "t1".into(),
                title: "Crash on resume".into(),
                status: "open".into(),
                severity: "critical".into(),
                reported_by_id: "u8".into(),
            }),
        ),
        forged(
            PROJECT,
            "feature.updated",
            Payload::Feature(Feature {
                id: "feat-1".into(),
                project_id: "p1".into(),
                tenant_id: "t1".into(),
                title: "Dark mode".into(),
                status: "planned".into(),
            }),
        ),
        forged(
            CHANNEL,
            "message.created",
            Payload::Message(Message {
                id: "msg-1".into(),
                channel_id: "c1".into(),
                tenant_id: "t1".into(),
                author_id: "u2".into(),
                body: "hello\nworld, with ünïcödé and \"quotes\"".into(),
            }),
        ),
        forged(
            "tenant:t1:user:u1",
            "notification.created",
            Payload::Notification(Notification {
                id: "n-1".into(),
                user_id: "u1".into(),
                title: "You were mentioned".into(),
                body: "in #general".into(),
                link: "https://example.test/c/1?m=1".into(),
            }),
        ),
        forged(
            PROJECT,
            "custom.blob",
            Payload::Custom(Custom {
                content_type: "application/octet-stream".into(),
                data: custom_bytes,
            }),
        ),
        forged(
            PROJECT,
            "custom.empty",
            Payload::Custom(Custom {
                content_type: "application/x-empty".into(),
                data: Vec::new(),
            }),
        ),
    ];

    let mut seen_ids = Vec::new();
    for event in sent {
        let before = SystemTime::now();
        let id = publish_event(&mut svc, event.clone()).await;
        let got = next_event(&mut stream).await;
        let after = SystemTime::now();

        assert!(!id.is_empty(), "Publish returned an empty id");
        assert_ne!(id, "forged-id", "client-supplied id was kept");
        assert_eq!(got.id, id, "delivered id differs from the published one");
        assert_eq!(got.publisher_id, "svc", "publisher_id is the token's sub");
        let time = SystemTime::try_from(got.time.expect("time is set")).expect("valid timestamp");
        assert!(
            before <= time && time <= after,
            "time {time:?} is not the server's publish time (between {before:?} and {after:?})"
        );
        let expected = Event {
            id: id.clone(),
            time: got.time,
            publisher_id: "svc".into(),
            ..event
        };
        assert_eq!(got, expected, "event did not round-trip intact");
        assert!(!seen_ids.contains(&id), "id {id} issued twice");
        seen_ids.push(id);
    }
}

#[tokio::test]
async fn a_thousand_events_arrive_in_publish_order() {
    const N: usize = 1000;
    let server = TestServer::start().await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[PROJECT], &[]).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(N);
        for _ in 0..N {
            got.push(next_event(&mut stream).await);
        }
        (got, stream)
    });

    let mut svc = server.client(&publisher_token()).await;
    let mut published = Vec::with_capacity(N);
    for i in 0..N {
        published.push(publish_event(&mut svc, task_event(PROJECT, &format!("t{i}"))).await);
    }
    let (got, mut stream) = reader.await.expect("reader panicked");

    let got_ids: Vec<String> = got.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got_ids, published, "events not delivered in publish order");
    let distinct: std::collections::HashSet<_> = published.iter().collect();
    assert_eq!(distinct.len(), N, "ids are not unique");
    for (i, e) in got.iter().enumerate() {
        match &e.payload {
            Some(Payload::Task(t)) => assert_eq!(t.id, format!("t{i}")),
            other => panic!("unexpected payload {other:?}"),
        }
    }
    // Nothing else was queued behind them.
    let marker = publish_event(&mut svc, task_event(PROJECT, "marker")).await;
    assert_eq!(next_event(&mut stream).await.id, marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_are_seen_in_the_same_order_by_every_subscriber() {
    const PER_PUBLISHER: usize = 300;
    let server = TestServer::start().await;
    let mut streams = Vec::new();
    for user in ["u1", "u2"] {
        let mut client = server.client(&user_token(user)).await;
        streams.push(subscribe(&mut client, &[PROJECT], &[]).await.unwrap().0);
    }
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..2 * PER_PUBLISHER {
                    ids.push(next_event(&mut stream).await.id);
                }
                ids
            })
        })
        .collect();

    let mut publishers = Vec::new();
    for name in ["svc-a", "svc-b"] {
        let mut client = server.client(&publisher_token_for(name)).await;
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..PER_PUBLISHER {
                let event = task_event(PROJECT, &format!("{name}-{i}"));
                ids.push(publish_event(&mut client, event).await);
            }
            ids
        }));
    }
    let mut published = Vec::new();
    for p in publishers {
        published.push(p.await.expect("publisher panicked"));
    }
    let mut seen = Vec::new();
    for r in readers {
        seen.push(r.await.expect("reader panicked"));
    }

    assert_eq!(seen[0], seen[1], "the two subscribers saw different orders");
    let distinct: std::collections::HashSet<_> = seen[0].iter().collect();
    assert_eq!(distinct.len(), 2 * PER_PUBLISHER, "duplicate deliveries");
    for own in &published {
        // Each publisher's events appear in the order it published them (it published sequentially).
        let subsequence: Vec<&String> = seen[0].iter().filter(|id| own.contains(id)).collect();
        assert_eq!(
            subsequence,
            own.iter().collect::<Vec<_>>(),
            "a publisher's events were reordered or lost"
        );
    }
}

#[tokio::test]
async fn since_replays_exactly_the_missed_events_of_each_room_then_live() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, subscribed) = subscribe(&mut user, &[PROJECT, CHANNEL], &[])
        .await
        .unwrap();
    assert!(subscribed.rooms.iter().all(|r| !r.recovered));

    let mut first = Vec::new();
    for i in 0..3 {
        first.push(publish_event(&mut svc, task_event(PROJECT, &format!("p{i}"))).await);
        first.push(publish_event(&mut svc, task_event(CHANNEL, &format!("c{i}"))).await);
    }
    let mut read = Vec::new();
    for _ in 0..first.len() {
        read.push(next_event(&mut stream).await);
    }
    assert_eq!(read.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), first);
    let last_project = ids_in(&read, PROJECT).pop().unwrap();
    let last_channel = ids_in(&read, CHANNEL).pop().unwrap();
    drop(stream);

    let mut missed_project = Vec::new();
    let mut missed_channel = Vec::new();
    for i in 3..7 {
        missed_project.push(publish_event(&mut svc, task_event(PROJECT, &format!("p{i}"))).await);
        missed_channel.push(publish_event(&mut svc, task_event(CHANNEL, &format!("c{i}"))).await);
    }

    let (mut stream, subscribed) = subscribe(
        &mut user,
        &[PROJECT, CHANNEL],
        &[(PROJECT, &last_project), (CHANNEL, &last_channel)],
    )
    .await
    .unwrap();
    for position in &subscribed.rooms {
        assert!(position.recovered, "{position:?} not recovered");
        let expected_last = if position.room == PROJECT {
            missed_project.last()
        } else {
            missed_channel.last()
        };
        assert_eq!(Some(&position.last_event_id), expected_last);
    }
    let mut replayed = Vec::new();
    for _ in 0..missed_project.len() + missed_channel.len() {
        replayed.push(next_event(&mut stream).await);
    }
    assert_eq!(ids_in(&replayed, PROJECT), missed_project);
    assert_eq!(ids_in(&replayed, CHANNEL), missed_channel);

    // Then live, with nothing duplicated in between.
    let live_project = publish_event(&mut svc, task_event(PROJECT, "live-p")).await;
    let live_channel = publish_event(&mut svc, task_event(CHANNEL, "live-c")).await;
    assert_eq!(next_event(&mut stream).await.id, live_project);
    assert_eq!(next_event(&mut stream).await.id, live_channel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_while_events_are_published_loses_and_duplicates_nothing() {
    const N: usize = 400;
    const READ_PER_STREAM: usize = 37;
    let server = TestServer::start().await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[PROJECT], &[]).await.unwrap();

    let mut svc = server.client(&publisher_token()).await;
    let publisher = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(N);
        for i in 0..N {
            ids.push(publish_event(&mut svc, task_event(PROJECT, &format!("t{i}"))).await);
        }
        ids
    });

    let mut received: Vec<String> = Vec::with_capacity(N);
    let mut resubscriptions = 0;
    while received.len() < N {
        let batch = READ_PER_STREAM.min(N - received.len());
        for _ in 0..batch {
            received.push(next_event(&mut stream).await.id);
        }
        if received.len() < N {
            // Leave and come back from the last id seen, while the publisher keeps going.
            drop(stream);
            let last = received.last().unwrap().clone();
            let (s, subscribed) = subscribe(&mut user, &[PROJECT], &[(PROJECT, &last)])
                .await
                .unwrap();
            assert!(subscribed.rooms[0].recovered, "{subscribed:?}");
            stream = s;
            resubscriptions += 1;
        }
    }
    let published = publisher.await.expect("publisher panicked");
    assert!(resubscriptions >= 10);
    assert_eq!(
        received, published,
        "gap or duplicate across resubscriptions"
    );
}

#[tokio::test]
async fn since_older_than_the_history_gets_a_reset_then_live() {
    const HISTORY: usize = 5;
    let server = TestServer::start_with(|c| c.history_size = HISTORY).await;
    let mut svc = server.client(&publisher_token()).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(publish_event(&mut svc, task_event(PROJECT, &format!("t{i}"))).await);
    }
    let channel_anchor = publish_event(&mut svc, task_event(CHANNEL, "c0")).await;
    let channel_missed = publish_event(&mut svc, task_event(CHANNEL, "c1")).await;
    let mut user = server.client(&user_token("u1")).await;

    // The last HISTORY events are kept: since = the one just before them replays all of them.
    let (mut stream, subscribed) = subscribe(&mut user, &[PROJECT], &[(PROJECT, &ids[2])])
        .await
        .unwrap();
    assert!(subscribed.rooms[0].recovered);
    assert_eq!(subscribed.rooms[0].last_event_id, ids[7]);
    for expected in &ids[3..] {
        assert_eq!(&next_event(&mut stream).await.id, expected);
    }
    drop(stream);

    // One older: not covered. Reset for that room only; the other room recovers; then live.
    let (mut stream, subscribed) = subscribe(
        &mut user,
        &[PROJECT, CHANNEL],
        &[(PROJECT, &ids[1]), (CHANNEL, &channel_anchor)],
    )
    .await
    .unwrap();
    let by_room: BTreeMap<_, _> = subscribed
        .rooms
        .iter()
        .map(|r| (r.room.as_str(), r))
        .collect();
    assert!(!by_room[PROJECT].recovered, "{subscribed:?}");
    assert_eq!(by_room[PROJECT].last_event_id, ids[7]);
    assert!(by_room[CHANNEL].recovered, "{subscribed:?}");
    let mut saw_reset = false;
    let mut saw_channel_event = false;
    for _ in 0..2 {
        match next_non_heartbeat(&mut stream).await.unwrap() {
            Kind::Reset(reset) => {
                assert_eq!(reset.room, PROJECT);
                assert!(!reset.reason.is_empty(), "a Reset says why");
                assert!(!saw_reset, "two resets");
                saw_reset = true;
            }
            Kind::Event(e) => {
                assert_eq!(e.id, channel_missed, "only the channel's missed event");
                saw_channel_event = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_reset && saw_channel_event);
    let live = publish_event(&mut svc, task_event(PROJECT, "live")).await;
    assert_eq!(
        next_event(&mut stream).await.id,
        live,
        "nothing replayed after a Reset"
    );
}

#[tokio::test]
async fn typing_and_user_status_are_delivered_live_but_never_replayed() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let tenant_anchor = publish_event(&mut svc, task_event(TENANT, "t0")).await;
    let channel_anchor = publish_event(&mut svc, task_event(CHANNEL, "c0")).await;

    // A service observes (services are not counted in presence, so it causes no statuses itself).
    let mut observer = server.client(&publisher_token()).await;
    let (mut stream, _) = subscribe(&mut observer, &[TENANT, CHANNEL], &[])
        .await
        .unwrap();

    // u2 comes online: a status in the tenant room.
    let mut u2 = server.client(&user_token("u2")).await;
    let (u2_stream, _) = subscribe(&mut u2, &[PROJECT], &[]).await.unwrap();
    let status = next_event(&mut stream).await;
    assert_eq!(
        status_changes(&status),
        Some(vec![("u2".to_owned(), true)]),
        "expected u2's status, got {status:?}"
    );
    // u2 types: Typing in the channel room.
    tokio::time::timeout(
        Duration::from_secs(10),
        u2.set_typing(SetTypingRequest {
            channel_room: CHANNEL.into(),
            is_typing: true,
        }),
    )
    .await
    .unwrap()
    .unwrap();
    match next_event(&mut stream).await.payload {
        Some(Payload::Typing(t)) => {
            assert_eq!(t.user_id, "u2");
            assert!(t.is_typing);
        }
        other => panic!("expected typing, got {other:?}"),
    }
    let tenant_event = publish_event(&mut svc, task_event(TENANT, "t1")).await;
    let channel_event = publish_event(&mut svc, task_event(CHANNEL, "c1")).await;
    assert_eq!(next_event(&mut stream).await.id, tenant_event);
    assert_eq!(next_event(&mut stream).await.id, channel_event);
    drop(stream);

    let (mut stream, subscribed) = subscribe(
        &mut observer,
        &[TENANT, CHANNEL],
        &[(TENANT, &tenant_anchor), (CHANNEL, &channel_anchor)],
    )
    .await
    .unwrap();
    assert!(subscribed.rooms.iter().all(|r| r.recovered));
    let replayed = vec![next_event(&mut stream).await, next_event(&mut stream).await];
    assert_eq!(
        ids_in(&replayed, TENANT),
        vec![tenant_event],
        "the tenant room's replay holds its durable event only"
    );
    assert_eq!(
        ids_in(&replayed, CHANNEL),
        vec![channel_event],
        "the channel room's replay holds its durable event only"
    );
    let marker = publish_event(&mut svc, task_event(CHANNEL, "marker")).await;
    assert_eq!(
        next_event(&mut stream).await.id,
        marker,
        "an ephemeral event was replayed"
    );
    drop(u2_stream);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_id_and_delivers_once_per_publisher() {
    let server = TestServer::start().await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[PROJECT], &[]).await.unwrap();
    let mut svc = server.client(&publisher_token()).await;
    let mut other = server.client(&publisher_token_for("svc-other")).await;

    let first = publish_keyed(&mut svc, task_event(PROJECT, "original"), "key-1").await;
    let retry = publish_keyed(&mut svc, task_event(PROJECT, "retry"), "key-1").await;
    assert_eq!(retry, first, "a retry returns the first id");
    let other_publisher = publish_keyed(&mut other, task_event(PROJECT, "other"), "key-1").await;
    assert_ne!(other_publisher, first, "keys are per publisher");
    let new_key = publish_keyed(&mut svc, task_event(PROJECT, "new key"), "key-2").await;
    assert_ne!(new_key, first);

    let e = next_event(&mut stream).await;
    assert_eq!(e.id, first);
    match e.payload {
        Some(Payload::Task(t)) => assert_eq!(t.id, "original", "the first publish is delivered"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next_event(&mut stream).await.id,
        other_publisher,
        "the retry was delivered again"
    );
    assert_eq!(next_event(&mut stream).await.id, new_key);
}

#[tokio::test]
async fn malformed_since_is_invalid_argument_naming_the_room() {
    let server = TestServer::start().await;
    let mut user = server.client(&user_token("u1")).await;
    // Not an id this server could have issued (the memory bus's ids are `{epoch}-{seq}`).
    let err = subscribe(&mut user, &[PROJECT], &[(PROJECT, "not an id")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(PROJECT), "{err:?}");
}
