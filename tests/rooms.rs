//! Room authorisation and request limits over real gRPC calls: who may join and publish to which room
//! (PERMISSION_DENIED naming the room), all-or-nothing subscriptions, the room grammar, and the limits on
//! rooms per call, `since` and event size (INVALID_ARGUMENT).
mod support;

use lamplight::auth::DevToken;
use lamplight::proto::v1::{
    event::Payload, Custom, Event, GetPresenceRequest, PublishRequest, SetTypingRequest,
    SubscribeRequest,
};
use prost::Message as _;
use support::*;
use tonic::Code;

/// The four room kinds user `u1` of tenant `t1` (project `p1`, channel `c1`) may join.
const U1_ROOMS: [&str; 4] = [
    "user:u1",
    "tenant:t1",
    "tenant:t1:project:p1",
    "tenant:t1:channel:c1",
];

fn admin_token(sub: &str) -> String {
    sign(&DevToken {
        roles: vec!["admin".into()],
        projects: vec![],
        channels: vec![],
        ..user_claims(sub)
    })
}

/// A publisher confined to tenant `t1`.
fn tenant_publisher_token() -> String {
    sign(&DevToken {
        sub: "svc-t1".into(),
        tid: Some("t1".into()),
        roles: vec!["publisher".into()],
        iat: now(),
        exp: now() + 3600,
        ..DevToken::default()
    })
}

async fn subscribe_rooms(client: &mut Client, rooms: &[&str]) -> Result<(), tonic::Status> {
    subscribe(client, rooms, &[]).await.map(|_| ())
}

/// Subscribing to `rooms` fails with PERMISSION_DENIED naming `denied`.
async fn assert_join_denied(client: &mut Client, rooms: &[&str], denied: &str) {
    let status = expect_status(
        subscribe_rooms(client, rooms).await,
        Code::PermissionDenied,
        &["not allowed in room", denied],
    );
    // The denied room is named as a whole, not as a prefix of a longer one.
    assert!(
        status.message().contains(&format!("room {denied}:")),
        "{status:?}"
    );
}

#[tokio::test]
async fn user_joins_each_of_its_own_rooms() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for room in U1_ROOMS {
        let (_stream, subscribed) = subscribe(&mut u1, &[room], &[])
            .await
            .unwrap_or_else(|s| panic!("{room}: {s:?}"));
        assert_eq!(subscribed.rooms.len(), 1);
        assert_eq!(subscribed.rooms[0].room, room);
    }
    let (_stream, subscribed) = subscribe(&mut u1, &U1_ROOMS, &[]).await.unwrap();
    let rooms: Vec<&str> = subscribed.rooms.iter().map(|r| r.room.as_str()).collect();
    assert_eq!(rooms, U1_ROOMS);
}

#[tokio::test]
async fn user_is_denied_every_other_room() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for room in [
        "user:u2",
        "tenant:t2",
        "tenant:t1:project:p2",
        "tenant:t1:channel:c2",
        "tenant:t2:project:p1",
        "tenant:t2:channel:c1",
    ] {
        assert_join_denied(&mut u1, &[room], room).await;
    }
}

#[tokio::test]
async fn denial_reasons_are_specific() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for (room, reason) in [
        ("user:u2", "only for their own user"),
        ("tenant:t2", "another tenant"),
        ("tenant:t2:project:p1", "another tenant"),
        ("tenant:t1:project:p2", "project not in the token"),
        ("tenant:t1:channel:c2", "channel not in the token"),
    ] {
        expect_status(
            subscribe_rooms(&mut u1, &[room]).await,
            Code::PermissionDenied,
            &[room, reason],
        );
    }
}

#[tokio::test]
async fn admin_joins_every_project_and_channel_of_its_tenant_only() {
    let server = TestServer::start().await;
    let mut admin = server.client(&admin_token("boss")).await;
    subscribe_rooms(
        &mut admin,
        &[
            "tenant:t1",
            "user:boss",
            "tenant:t1:project:p1",
            "tenant:t1:project:p9",
            "tenant:t1:channel:c1",
            "tenant:t1:channel:c9",
        ],
    )
    .await
    .expect("admin of t1 joins any project and channel of t1");
    for room in [
        "tenant:t2",
        "tenant:t2:project:p1",
        "tenant:t2:channel:c1",
        "user:u1",
    ] {
        assert_join_denied(&mut admin, &[room], room).await;
    }
}

#[tokio::test]
async fn admin_of_another_tenant_is_denied() {
    let server = TestServer::start().await;
    let mut admin = server
        .client(&sign(&DevToken {
            tid: Some("t2".into()),
            roles: vec!["admin".into()],
            ..user_claims("boss2")
        }))
        .await;
    subscribe_rooms(&mut admin, &["tenant:t2:project:p1"])
        .await
        .unwrap();
    assert_join_denied(
        &mut admin,
        &["tenant:t1:project:p1"],
        "tenant:t1:project:p1",
    )
    .await;
    assert_join_denied(
        &mut admin,
        &["tenant:t1:channel:c1"],
        "tenant:t1:channel:c1",
    )
    .await;
}

#[tokio::test]
async fn one_denied_room_fails_the_whole_subscribe() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    assert_join_denied(
        &mut u1,
        &[
            "tenant:t1",
            "tenant:t1:project:p1",
            "tenant:t1:project:p2",
            "user:u1",
        ],
        "tenant:t1:project:p2",
    )
    .await;
    // Nothing was attached: the allowed rooms show no connection.
    let mut watcher = server.client(&user_token("u2")).await;
    for room in ["tenant:t1", "tenant:t1:project:p1"] {
        let presence = get_presence(&mut watcher, room).await.unwrap();
        assert_eq!(presence.connection_count, 0, "{room}");
        assert!(presence.user_ids.is_empty(), "{room}");
    }
    // The same call without the denied room works.
    subscribe_rooms(&mut u1, &["tenant:t1", "tenant:t1:project:p1", "user:u1"])
        .await
        .unwrap();
}

#[tokio::test]
async fn unverified_email_is_denied() {
    let server = TestServer::start().await;
    let mut claims = user_claims("u1");
    claims.email_verified = false;
    let mut u1 = server.client(&sign(&claims)).await;
    for room in ["user:u1", "tenant:t1", "tenant:t1:project:p1"] {
        expect_status(
            subscribe_rooms(&mut u1, &[room]).await,
            Code::PermissionDenied,
            &["email not verified"],
        );
    }
    let presence = get_presence(&mut u1, "tenant:t1").await;
    expect_status(presence, Code::PermissionDenied, &["email not verified"]);
    let typing = u1
        .set_typing(SetTypingRequest {
            channel_room: "tenant:t1:channel:c1".into(),
            is_typing: true,
        })
        .await;
    expect_status(typing, Code::PermissionDenied, &["email not verified"]);
}

#[tokio::test]
async fn user_token_without_tenant_is_denied() {
    let server = TestServer::start().await;
    let mut claims = user_claims("u1");
    claims.tid = None;
    let mut u1 = server.client(&sign(&claims)).await;
    expect_status(
        subscribe_rooms(&mut u1, &["user:u1"]).await,
        Code::PermissionDenied,
        &["no tenant"],
    );
}

#[tokio::test]
async fn users_may_not_publish() {
    let server = TestServer::start().await;
    for token in [user_token("u1"), admin_token("boss")] {
        let mut user = server.client(&token).await;
        for room in ["user:u1", "tenant:t1", "tenant:t1:project:p1"] {
            expect_status(
                publish_task(&mut user, room, "task-1").await,
                Code::PermissionDenied,
                &["only tokens with role `publisher` may publish"],
            );
        }
    }
}

#[tokio::test]
async fn publisher_subscribes_and_publishes_anywhere() {
    let server = TestServer::start().await;
    let rooms = [
        "tenant:t1:user:u9",
        "tenant:t1",
        "tenant:t2",
        "tenant:t1:project:p7",
        "tenant:t2:channel:c8",
    ];
    let mut svc = server.client(&publisher_token()).await;
    let (mut stream, _) = subscribe(&mut svc, &rooms, &[]).await.unwrap();
    let mut publisher = server.client(&publisher_token()).await;
    for room in rooms {
        let id = publish_task(&mut publisher, room, "task-1").await.unwrap();
        let event = next_event(&mut stream).await;
        assert_eq!(
            (event.id.as_str(), event.room.as_str()),
            (id.as_str(), room)
        );
    }
    // Presence of any room too.
    get_presence(&mut svc, "tenant:t2:project:p1")
        .await
        .unwrap();
}

#[tokio::test]
async fn publisher_with_a_tenant_is_confined_to_it() {
    let server = TestServer::start().await;
    let mut svc = server.client(&tenant_publisher_token()).await;
    subscribe_rooms(
        &mut svc,
        &[
            "tenant:t1",
            "tenant:t1:project:p9",
            "tenant:t1:channel:c9",
            "user:anyone",
            "tenant:t1:user:someone",
        ],
    )
    .await
    .expect("own tenant's rooms and its users' rooms");
    for room in [
        "tenant:t1",
        "tenant:t1:project:p9",
        "user:anyone",
        "tenant:t1:user:someone",
    ] {
        publish_task(&mut svc, room, "task-1")
            .await
            .unwrap_or_else(|s| panic!("{room}: {s:?}"));
    }
    for room in [
        "tenant:t2",
        "tenant:t2:project:p1",
        "tenant:t2:channel:c1",
        "tenant:t2:user:anyone",
    ] {
        expect_status(
            subscribe_rooms(&mut svc, &["tenant:t1", room]).await,
            Code::PermissionDenied,
            &[room, "confined to another tenant"],
        );
        expect_status(
            publish_task(&mut svc, room, "task-1").await,
            Code::PermissionDenied,
            &[room, "confined to another tenant"],
        );
    }
}

#[tokio::test]
async fn names_outside_the_grammar_are_invalid_arguments() {
    let server = TestServer::start().await;
    let long = format!("user:{}", "x".repeat(129));
    let bad = [
        "",
        "user",
        "user:",
        "user:a:b",
        "tenant:t1:project",
        "tenant:t1:project:",
        "tenant:t1:board:b1",
        "tenant:t1:project:p1:extra",
        "team:t1",
        "user:a b",
        "user:ü",
        "tenant:t*1",
        "Tenant:t1",
        long.as_str(),
    ];
    let mut u1 = server.client(&user_token("u1")).await;
    let mut svc = server.client(&publisher_token()).await;
    for room in bad {
        expect_status(
            subscribe_rooms(&mut u1, &[room]).await,
            Code::InvalidArgument,
            &["invalid room"],
        );
        // A bad name among good ones fails the call too.
        expect_status(
            subscribe_rooms(&mut u1, &["tenant:t1", room]).await,
            Code::InvalidArgument,
            &["invalid room"],
        );
        expect_status(
            publish_task(&mut svc, room, "task-1").await,
            Code::InvalidArgument,
            &["invalid room"],
        );
        expect_status(
            get_presence(&mut u1, room).await,
            Code::InvalidArgument,
            &["invalid room"],
        );
        let typing = u1
            .set_typing(SetTypingRequest {
                channel_room: room.into(),
                is_typing: true,
            })
            .await;
        expect_status(typing, Code::InvalidArgument, &["invalid room"]);
    }
    // The longest id allowed is accepted.
    let longest = format!("tenant:t1:user:{}", "x".repeat(128));
    let mut svc_sub = server.client(&publisher_token()).await;
    subscribe_rooms(&mut svc_sub, &[&longest]).await.unwrap();
}

#[tokio::test]
async fn empty_room_list_is_invalid() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    expect_status(
        subscribe_rooms(&mut u1, &[]).await,
        Code::InvalidArgument,
        &["rooms is empty"],
    );
}

#[tokio::test]
async fn too_many_rooms_are_invalid() {
    let server = TestServer::start_with(|c| c.max_rooms_per_subscribe = 3).await;
    let mut admin = server.client(&admin_token("boss")).await;
    subscribe_rooms(
        &mut admin,
        &["tenant:t1", "tenant:t1:project:a", "tenant:t1:project:b"],
    )
    .await
    .expect("exactly the limit is fine");
    expect_status(
        subscribe_rooms(
            &mut admin,
            &[
                "tenant:t1",
                "tenant:t1:project:a",
                "tenant:t1:project:b",
                "tenant:t1:project:c",
            ],
        )
        .await,
        Code::InvalidArgument,
        &["4 rooms requested", "at most 3"],
    );
}

#[tokio::test]
async fn since_must_name_a_subscribed_room() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let id = publish_task(&mut svc, "tenant:t1:project:p1", "task-1")
        .await
        .unwrap();
    let mut u1 = server.client(&user_token("u1")).await;
    let result = subscribe(&mut u1, &["tenant:t1"], &[("tenant:t1:project:p1", &id)]).await;
    expect_status(
        result,
        Code::InvalidArgument,
        &["since names room", "tenant:t1:project:p1", "not in rooms"],
    );
    // With the room subscribed, the same since is fine.
    let (_stream, subscribed) = subscribe(
        &mut u1,
        &["tenant:t1:project:p1"],
        &[("tenant:t1:project:p1", &id)],
    )
    .await
    .unwrap();
    assert!(subscribed.rooms[0].recovered);
}

#[tokio::test]
async fn malformed_since_is_invalid() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    let room = "tenant:t1:project:p1";
    for since in ["garbage", "abc-xyz", "-5", "a b-1", "abc-"] {
        expect_status(
            subscribe(&mut u1, &[room], &[(room, since)]).await,
            Code::InvalidArgument,
            &["invalid since", room],
        );
    }
}

fn custom_event(room: &str, data_len: usize) -> Event {
    Event {
        room: room.into(),
        r#type: "blob.created".into(),
        payload: Some(Payload::Custom(Custom {
            content_type: "application/octet-stream".into(),
            data: vec![b'x'; data_len],
        })),
        ..Default::default()
    }
}

fn publish_request(event: Event) -> PublishRequest {
    PublishRequest {
        event: Some(event),
        idempotency_key: String::new(),
    }
}

/// Bytes the server reserves for the event id it assigns when it checks an event against
/// `max_event_bytes` (`ID_RESERVE` in `src/service/mod.rs`).
const ID_RESERVE: usize = 48;

/// The largest payload whose event, with every server-set field at its largest (the id reserve, a
/// timestamp with nanoseconds, the publisher id), still fits in `limit`; and the smallest whose event,
/// with those fields at their smallest, is over it.
fn payload_bounds(room: &str, publisher_id: &str, limit: usize) -> (usize, usize) {
    let size = |data_len: usize, nanos: i32| {
        let mut event = custom_event(room, data_len);
        event.publisher_id = publisher_id.into();
        event.time = Some(prost_types::Timestamp {
            seconds: now() as i64,
            nanos,
        });
        event.encoded_len() + ID_RESERVE
    };
    let fits = (0..limit)
        .take_while(|&n| size(n, 999_999_999) <= limit)
        .last()
        .expect("an empty payload fits");
    let over = (0..limit)
        .find(|&n| size(n, 0) > limit)
        .expect("a payload of the limit is over it");
    (fits, over)
}

#[tokio::test]
async fn event_size_limit() {
    const LIMIT: usize = 1024;
    let server = TestServer::start_with(|c| c.max_event_bytes = LIMIT).await;
    let room = "tenant:t1:project:p1";
    let mut u1 = server.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut u1, &[room], &[]).await.unwrap();
    let mut svc = server.client(&publisher_token()).await;
    let (fits, over) = payload_bounds(room, "svc", LIMIT);
    assert!(fits < over && over - fits <= 8, "{fits} {over}");

    // Just under the limit: accepted and delivered whole.
    let id = svc
        .publish(publish_request(custom_event(room, fits)))
        .await
        .expect("an event within max_event_bytes is accepted")
        .into_inner()
        .id;
    let event = next_event(&mut stream).await;
    assert_eq!(event.id, id);
    match event.payload {
        Some(Payload::Custom(c)) => assert_eq!(c.data.len(), fits),
        other => panic!("{other:?}"),
    }

    for data_len in [over, 4 * LIMIT] {
        let result = svc
            .publish(publish_request(custom_event(room, data_len)))
            .await;
        expect_status(
            result,
            Code::InvalidArgument,
            &["the limit is 1024", "max-event-bytes"],
        );
    }
    // Nothing of the refused events reached the subscriber: the next event is a fresh one.
    let id = publish_task(&mut svc, room, "after").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, id);
}

#[tokio::test]
async fn invalid_event_types_are_refused() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let long = "a".repeat(129);
    for kind in [
        "",
        ".",
        "task.",
        ".task",
        "task..created",
        "task created",
        "tâche",
        long.as_str(),
    ] {
        let mut event = task_event("tenant:t1", "task-1");
        event.r#type = kind.into();
        expect_status(
            svc.publish(publish_request(event)).await,
            Code::InvalidArgument,
            &["invalid event type"],
        );
    }
    let mut event = task_event("tenant:t1", "task-1");
    event.r#type = "a.b-c.d_e".into();
    svc.publish(publish_request(event)).await.unwrap();
}

#[tokio::test]
async fn missing_event_is_refused() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let result = svc
        .publish(PublishRequest {
            event: None,
            idempotency_key: String::new(),
        })
        .await;
    expect_status(result, Code::InvalidArgument, &["event is required"]);
}

#[tokio::test]
async fn get_presence_and_subscribe_share_the_room_policy() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    for room in U1_ROOMS {
        u1.get_presence(GetPresenceRequest {
            room: room.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{room}: {s:?}"));
    }
    for room in ["user:u2", "tenant:t2", "tenant:t1:project:p2"] {
        expect_status(
            get_presence(&mut u1, room).await,
            Code::PermissionDenied,
            &[room],
        );
    }
    // A raw request (not through the helper) too.
    let req = SubscribeRequest {
        rooms: vec!["tenant:t1:channel:c2".into()],
        since: Default::default(),
    };
    expect_status(
        u1.subscribe(req).await.map(|_| ()),
        Code::PermissionDenied,
        &["tenant:t1:channel:c2"],
    );
}
