//! Tenant isolation over real gRPC calls (issue 9, items 1 and 2): a user's personal room belongs to its
//! tenant (`tenant:{tid}:user:{sub}`, with `user:{sub}` as the shorthand in the caller's own tenant), a
//! tenant-confined publisher never reaches another tenant's users, users of two tenants with the same
//! `sub` never see each other's events, and claims that would inject room names are refused.
mod support;

use std::time::Duration;

use lamplight::auth::DevToken;
use lamplight::proto::v1::subscribe_response::Kind;
use support::*;
use tonic::Code;

fn user_of(tenant: &str, sub: &str) -> String {
    sign(&DevToken {
        tid: Some(tenant.into()),
        ..user_claims(sub)
    })
}

fn publisher_of(tenant: Option<&str>) -> String {
    sign(&DevToken {
        sub: format!("svc-{}", tenant.unwrap_or("global")),
        tid: tenant.map(str::to_owned),
        roles: vec!["publisher".into()],
        iat: now(),
        exp: now() + 3600,
        ..DevToken::default()
    })
}

/// Nothing but heartbeats arrive on `stream` for a while.
async fn assert_quiet(stream: &mut tonic::Streaming<lamplight::proto::v1::SubscribeResponse>) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return,
            Ok(Ok(Some(msg))) if matches!(msg.kind, Some(Kind::Heartbeat(_))) => continue,
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_tenant_publisher_cannot_reach_another_tenants_users() {
    let server = TestServer::start().await;
    let mut svc_a = server.client(&publisher_of(Some("ta"))).await;
    for room in ["tenant:tb:user:u1", "tenant:tb:user:svc-ta"] {
        expect_status(
            subscribe(&mut svc_a, &[room], &[]).await.map(|_| ()),
            Code::PermissionDenied,
            &[room, "confined to another tenant"],
        );
        expect_status(
            publish_task(&mut svc_a, room, "x").await,
            Code::PermissionDenied,
            &[room, "confined to another tenant"],
        );
        expect_status(
            get_presence(&mut svc_a, room).await,
            Code::PermissionDenied,
            &[room],
        );
    }
    // Its own tenant's users, by either name.
    for room in ["tenant:ta:user:u1", "user:u1"] {
        subscribe(&mut svc_a, &[room], &[])
            .await
            .unwrap_or_else(|s| panic!("{room}: {s:?}"));
        publish_task(&mut svc_a, room, "x")
            .await
            .unwrap_or_else(|s| panic!("{room}: {s:?}"));
    }
}

#[tokio::test]
async fn users_of_two_tenants_with_the_same_sub_never_see_each_others_events() {
    let server = TestServer::start().await;
    let mut alice_a = server.client(&user_of("ta", "u1")).await;
    let mut alice_b = server.client(&user_of("tb", "u1")).await;
    let (mut stream_a, subscribed_a) = subscribe(&mut alice_a, &["user:u1"], &[]).await.unwrap();
    let (mut stream_b, _) = subscribe(&mut alice_b, &["tenant:tb:user:u1"], &[])
        .await
        .unwrap();
    // The client sees its own name for the room.
    assert_eq!(subscribed_a.rooms[0].room, "user:u1");

    // Tenant A's integration notifies "u1": only tenant A's u1 hears it.
    let mut svc_a = server.client(&publisher_of(Some("ta"))).await;
    let id = publish_task(&mut svc_a, "user:u1", "for-a").await.unwrap();
    let event = next_event(&mut stream_a).await;
    assert_eq!(
        (event.id.as_str(), event.room.as_str()),
        (id.as_str(), "user:u1")
    );
    assert_quiet(&mut stream_b).await;

    // A global service names the tenant: only tenant B's u1 hears it.
    let mut svc = server.client(&publisher_of(None)).await;
    let id = publish_task(&mut svc, "tenant:tb:user:u1", "for-b")
        .await
        .unwrap();
    let event = next_event(&mut stream_b).await;
    assert_eq!(
        (event.id.as_str(), event.room.as_str()),
        (id.as_str(), "tenant:tb:user:u1")
    );
    assert_quiet(&mut stream_a).await;

    // Presence is per tenant too.
    assert_eq!(
        get_presence(&mut svc, "tenant:ta:user:u1")
            .await
            .unwrap()
            .connection_count,
        1
    );
    assert_eq!(
        get_presence(&mut alice_b, "user:u1")
            .await
            .unwrap()
            .connection_count,
        1
    );
}

#[tokio::test]
async fn a_publisher_without_a_tenant_must_name_the_users_tenant() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_of(None)).await;
    expect_status(
        publish_task(&mut svc, "user:u1", "x").await,
        Code::PermissionDenied,
        &["user:u1", "tenant:{tid}:user:{sub}"],
    );
    expect_status(
        subscribe(&mut svc, &["user:u1"], &[]).await.map(|_| ()),
        Code::PermissionDenied,
        &["user:u1", "no tid"],
    );
}

#[tokio::test]
async fn the_shorthand_and_the_canonical_name_are_one_room_and_resume_under_the_clients_name() {
    let server = TestServer::start().await;
    let mut u1 = server.client(&user_token("u1")).await;
    let mut svc = server.client(&publisher_token()).await;

    // Both names in one Subscribe would deliver every event twice: refused.
    expect_status(
        subscribe(&mut u1, &["user:u1", "tenant:t1:user:u1"], &[])
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        &["same room"],
    );

    let (mut short, _) = subscribe(&mut u1, &["user:u1"], &[]).await.unwrap();
    let (mut long, _) = subscribe(&mut u1, &["tenant:t1:user:u1"], &[])
        .await
        .unwrap();
    let first = publish_task(&mut svc, "tenant:t1:user:u1", "one")
        .await
        .unwrap();
    let event = next_event(&mut short).await;
    assert_eq!(
        (event.id.as_str(), event.room.as_str()),
        (first.as_str(), "user:u1")
    );
    let event = next_event(&mut long).await;
    assert_eq!(
        (event.id.as_str(), event.room.as_str()),
        (first.as_str(), "tenant:t1:user:u1")
    );
    // Presence counts both streams in the one room, whichever name is asked.
    for name in ["user:u1", "tenant:t1:user:u1"] {
        assert_eq!(
            get_presence(&mut u1, name).await.unwrap().connection_count,
            2
        );
    }
    drop((short, long));

    // Resume under the shorthand: the missed event comes back, named as the client named the room.
    let second = publish_task(&mut svc, "tenant:t1:user:u1", "two")
        .await
        .unwrap();
    let (mut resumed, subscribed) = subscribe(&mut u1, &["user:u1"], &[("user:u1", &first)])
        .await
        .unwrap();
    assert_eq!(subscribed.rooms[0].room, "user:u1");
    assert!(subscribed.rooms[0].recovered);
    assert_eq!(subscribed.rooms[0].last_event_id, second);
    let event = next_event(&mut resumed).await;
    assert_eq!(
        (event.id.as_str(), event.room.as_str()),
        (second.as_str(), "user:u1")
    );
}

#[tokio::test]
async fn claims_that_are_not_ids_are_refused_naming_the_claim() {
    let server = TestServer::start().await;
    let long = "x".repeat(10_000);
    let cases: Vec<(DevToken, &str)> = vec![
        (
            DevToken {
                tid: Some("t1:channel:c9".into()),
                ..user_claims("u1")
            },
            "claim tid",
        ),
        (
            DevToken {
                tid: Some("{t1}".into()),
                ..user_claims("u1")
            },
            "claim tid",
        ),
        (
            DevToken {
                tid: Some("t 1".into()),
                ..user_claims("u1")
            },
            "claim tid",
        ),
        (
            DevToken {
                tid: Some(long.clone()),
                ..user_claims("u1")
            },
            "claim tid",
        ),
        (user_claims("u1:x"), "claim sub"),
        (
            DevToken {
                projects: vec!["p1".into(), "p1:channel:c1".into()],
                ..user_claims("u1")
            },
            "claim projects",
        ),
        (
            DevToken {
                channels: vec!["c 1".into()],
                ..user_claims("u1")
            },
            "claim channels",
        ),
    ];
    for (claims, named) in cases {
        let mut client = server.client(&sign(&claims)).await;
        let status = expect_status(
            subscribe(&mut client, &["tenant:t1"], &[])
                .await
                .map(|_| ()),
            Code::Unauthenticated,
            &[named, "is not an id"],
        );
        assert!(status.message().len() < 300, "{status:?}");
    }
    // The ONLINE status of such a token never reached tenant t1's channel.
    let mut svc = server.client(&publisher_token()).await;
    let presence = get_presence(&mut svc, "tenant:t1:channel:c9")
        .await
        .unwrap();
    assert_eq!(presence.connection_count, 0);
}
