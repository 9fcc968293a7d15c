//! `AdminService` end to end: membership changes reach live streams on every node (two lamplight nodes
//! on a private Redis, and the embedded bus), and only those allowed may make them.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::time::Duration;

use lamplight::auth::{mint_hs256, DevToken};
use lamplight::proto::v1::admin_service_client::AdminServiceClient;
use lamplight::proto::v1::{
    subscribe_response::Kind, DisconnectRequest, Removed, RevokeTokensRequest, SubscribeResponse,
    UnsubscribeRequest, UserRef,
};
use redis_support::*;
use serde_json::json;
use support::*;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const PROJECT: &str = "tenant:t1:project:p1";
const CHANNEL: &str = "tenant:t1:channel:c1";

type Admin = AdminServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>,
    >,
>;

async fn admin_client(server: &TestServer, token: &str) -> Admin {
    let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    AdminServiceClient::with_interceptor(
        server.channel().await,
        Box::new(move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", header.clone());
            Ok(req)
        }),
    )
}

fn claims(sub: &str, tid: &str, roles: &[&str]) -> DevToken {
    DevToken {
        tid: Some(tid.into()),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        ..user_claims(sub)
    }
}

/// Token of an admin of tenant `tid`.
fn admin_token(tid: &str) -> String {
    sign(&claims("boss", tid, &["admin"]))
}

fn user_ref(tenant: &str, user: &str) -> Option<UserRef> {
    Some(UserRef {
        tenant_id: tenant.into(),
        user_id: user.into(),
    })
}

fn unsubscribe(user: &str, room: &str, reason: &str) -> UnsubscribeRequest {
    UnsubscribeRequest {
        user: user_ref("t1", user),
        room: room.into(),
        reason: reason.into(),
    }
}

async fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    TestServer::start_with(|c| use_redis(c, &url)).await
}

/// The next message that is not a heartbeat.
async fn next_message(stream: &mut Streaming<SubscribeResponse>) -> Result<Kind, tonic::Status> {
    next_non_heartbeat(stream).await
}

fn removed(kind: Result<Kind, tonic::Status>) -> Removed {
    match kind {
        Ok(Kind::Removed(r)) => r,
        other => panic!("expected Removed, got {other:?}"),
    }
}

fn task_of(kind: Result<Kind, tonic::Status>) -> (String, String) {
    match kind {
        Ok(Kind::Event(e)) => match e.payload {
            Some(lamplight::proto::v1::event::Payload::Task(t)) => (e.room, t.id),
            other => panic!("not a task: {other:?}"),
        },
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Unsubscribe sent to `a` reaches u1's stream on `b`: `Removed` with the room as the stream named it,
/// no more events of it, the stream's other rooms and other users' streams go on.
async fn unsubscribe_reaches_streams(a: &TestServer, b: &TestServer) {
    let mut on_b = b.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut on_b, &["user:u1", PROJECT, CHANNEL], &[])
        .await
        .unwrap();
    let mut other_user = b.client(&user_token("u2")).await;
    let (mut other, _) = subscribe(&mut other_user, &[PROJECT], &[]).await.unwrap();
    let mut same_user_elsewhere = a.client(&user_token("u1")).await;
    let (mut unaffected, _) = subscribe(&mut same_user_elsewhere, &[CHANNEL], &[])
        .await
        .unwrap();

    assert_eq!(
        get_presence(&mut other_user, PROJECT)
            .await
            .unwrap()
            .user_ids,
        ["u1", "u2"]
    );

    let mut admin = admin_client(a, &admin_token("t1")).await;
    admin
        .unsubscribe(unsubscribe("u1", PROJECT, "left the project"))
        .await
        .expect("unsubscribe");
    let r = removed(next_message(&mut stream).await);
    assert_eq!(
        (r.room.as_str(), r.reason.as_str()),
        (PROJECT, "left the project")
    );

    let mut svc = a.client(&publisher_token()).await;
    publish_task(&mut svc, PROJECT, "p-after").await.unwrap();
    publish_task(&mut svc, CHANNEL, "c-after").await.unwrap();
    assert_eq!(
        task_of(next_message(&mut stream).await),
        (CHANNEL.into(), "c-after".into()),
        "the removed room's event is not delivered, the other room's is"
    );
    assert_eq!(
        task_of(next_message(&mut other).await),
        (PROJECT.into(), "p-after".into()),
        "another user in the room keeps it"
    );
    assert_eq!(
        task_of(next_message(&mut unaffected).await),
        (CHANNEL.into(), "c-after".into()),
        "a stream of the user without the room gets nothing but its events"
    );
    // The removed stream no longer counts in the room's presence (its other rooms keep it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let users = get_presence(&mut other_user, PROJECT)
            .await
            .unwrap()
            .user_ids;
        if users == ["u2"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "u1 still in the project's presence: {users:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get_presence(&mut other_user, CHANNEL).await.unwrap(),
        lamplight::proto::v1::GetPresenceResponse {
            user_count: 1,
            connection_count: 2,
            user_ids: vec!["u1".into()],
            next_page_token: String::new(),
        }
    );

    // The canonical name reaches the stream that used the shorthand, which sees its own name.
    admin
        .unsubscribe(unsubscribe("u1", "tenant:t1:user:u1", ""))
        .await
        .expect("unsubscribe the user room");
    assert_eq!(removed(next_message(&mut stream).await).room, "user:u1");
    publish_task(&mut svc, "tenant:t1:user:u1", "u-after")
        .await
        .unwrap();
    publish_task(&mut svc, CHANNEL, "c-after-2").await.unwrap();
    assert_eq!(
        task_of(next_message(&mut stream).await),
        (CHANNEL.into(), "c-after-2".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsubscribe_on_one_node_reaches_a_stream_on_another_and_other_rooms_keep_flowing() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    unsubscribe_reaches_streams(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_reaches_streams_on_the_embedded_bus() {
    let server = TestServer::start().await;
    unsubscribe_reaches_streams(&server, &server).await;
    // Removals are not remembered: a token that still grants the room may subscribe (and resume) again.
    let mut client = server.client(&user_token("u1")).await;
    let (mut stream, subscribed) = subscribe(&mut client, &[PROJECT], &[]).await.unwrap();
    let since = subscribed.rooms[0].last_event_id.clone();
    let mut svc = server.client(&publisher_token()).await;
    publish_task(&mut svc, PROJECT, "rejoined").await.unwrap();
    assert_eq!(task_of(next_message(&mut stream).await).1, "rejoined");
    let (mut resumed, _) = subscribe(&mut client, &[PROJECT], &[(PROJECT, since.as_str())])
        .await
        .unwrap();
    assert_eq!(task_of(next_message(&mut resumed).await).1, "rejoined");
}

/// The control channel on a Redis Cluster: sharded pub/sub, and the revocation keys in one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_cross_nodes_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let a = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let b = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    unsubscribe_reaches_streams(&a, &b).await;

    let old = sign(&DevToken {
        iat: now() - 10,
        ..user_claims("u1")
    });
    let mut client = b.client(&old).await;
    let (mut stream, _) = subscribe(&mut client, &[PROJECT], &[]).await.unwrap();
    let mut admin = admin_client(&a, &admin_token("t1")).await;
    admin
        .revoke_tokens(RevokeTokensRequest {
            user: user_ref("t1", "u1"),
            issued_before: Some(prost_types::Timestamp {
                seconds: (now() - 5) as i64,
                nanos: 0,
            }),
            reason: String::new(),
        })
        .await
        .expect("revoke");
    expect_status(
        next_message(&mut stream).await,
        Code::Unauthenticated,
        &["revoked"],
    );
    let c = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let mut on_c = c.client(&old).await;
    expect_status(
        subscribe(&mut on_c, &[PROJECT], &[]).await,
        Code::Unauthenticated,
        &["revoked"],
    );
    // Issued at or after the cutoff: accepted.
    let mut fresh = c.client(&user_token("u1")).await;
    subscribe(&mut fresh, &[PROJECT], &[])
        .await
        .expect("a token issued after the cutoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_ends_the_users_streams_on_both_nodes_with_permission_denied() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut on_a = a.client(&user_token("u1")).await;
    let (mut stream_a, _) = subscribe(&mut on_a, &[PROJECT], &[]).await.unwrap();
    let mut on_b = b.client(&user_token("u1")).await;
    let (mut stream_b, _) = subscribe(&mut on_b, &[CHANNEL, PROJECT], &[])
        .await
        .unwrap();
    let mut other_user = b.client(&user_token("u2")).await;
    let (mut other, _) = subscribe(&mut other_user, &[PROJECT], &[]).await.unwrap();

    let mut admin = admin_client(&b, &sign(&claims("svc", "t1", &["publisher"]))).await;
    admin
        .disconnect(DisconnectRequest {
            user: user_ref("t1", "u1"),
            reason: "account suspended".into(),
        })
        .await
        .expect("disconnect");
    for (name, stream) in [("node A", &mut stream_a), ("node B", &mut stream_b)] {
        let status = expect_status(
            next_message(stream).await,
            Code::PermissionDenied,
            &["account suspended", "administrator", "do not reconnect"],
        );
        assert!(
            status
                .metadata()
                .get(lamplight::error::RESUME_METADATA_KEY)
                .is_none(),
            "{name}: no resume map for a stream that must not come back"
        );
    }
    let mut svc = a.client(&publisher_token()).await;
    publish_task(&mut svc, PROJECT, "still-here").await.unwrap();
    assert_eq!(
        task_of(next_message(&mut other).await),
        (PROJECT.into(), "still-here".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_tokens_are_refused_on_every_node_and_their_streams_end_while_fresh_tokens_work() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let old = sign(&DevToken {
        iat: now() - 10,
        ..user_claims("u1")
    });
    let without_iat = mint_hs256(
        SECRET.as_bytes(),
        &json!({"sub": "u1", "tid": "t1", "email_verified": true, "projects": ["p1"],
                "exp": now() + 3600}),
    )
    .unwrap();
    let other_user = user_token("u2");
    let mut streams = Vec::new();
    for server in [&a, &b] {
        for token in [&old, &without_iat] {
            let mut client = server.client(token).await;
            streams.push(subscribe(&mut client, &[PROJECT], &[]).await.unwrap().0);
        }
    }
    let mut u2 = b.client(&other_user).await;
    let (mut u2_stream, _) = subscribe(&mut u2, &[PROJECT], &[]).await.unwrap();

    let mut admin = admin_client(&a, &admin_token("t1")).await;
    admin
        .revoke_tokens(RevokeTokensRequest {
            user: user_ref("t1", "u1"),
            issued_before: None,
            reason: "password changed".into(),
        })
        .await
        .expect("revoke");
    for stream in &mut streams {
        let status = expect_status(
            next_message(stream).await,
            Code::Unauthenticated,
            &["revoked"],
        );
        assert!(resume_since(&status).contains_key(PROJECT), "{status:?}");
    }
    // Refused on both nodes (on B once the command arrived), and on a node started later.
    let c = node(&redis).await;
    for server in [&a, &b, &c] {
        for token in [&old, &without_iat] {
            let mut client = server.client(token).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let status = loop {
                match subscribe(&mut client, &[PROJECT], &[]).await {
                    Err(status) => break status,
                    Ok(_) => {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "the old token is still accepted"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            expect_status::<()>(Err(status), Code::Unauthenticated, &["revoked"]);
        }
    }
    // Another user's stream goes on; a token issued after the cutoff (iat has whole seconds) works.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = user_token("u1");
    let mut svc = a.client(&publisher_token()).await;
    for server in [&a, &b, &c] {
        let mut client = server.client(&fresh).await;
        let (mut stream, _) = subscribe(&mut client, &[PROJECT], &[])
            .await
            .expect("fresh token");
        let id = format!("fresh-{}", server.addr.port());
        publish_task(&mut svc, PROJECT, &id).await.unwrap();
        assert_eq!(task_of(next_message(&mut stream).await).1, id);
    }
    assert_eq!(
        task_of(next_message(&mut u2_stream).await).0,
        PROJECT,
        "the other user's stream is untouched"
    );
}

#[tokio::test]
async fn only_admins_of_the_tenant_and_publishers_in_scope_may_change_memberships() {
    let server = TestServer::start().await;
    let denied = [
        ("a user without role admin", sign(&claims("u9", "t1", &[]))),
        ("an admin of another tenant", admin_token("t2")),
        (
            "a publisher confined to another tenant",
            sign(&claims("svc", "t2", &["publisher"])),
        ),
    ];
    for (who, token) in &denied {
        let mut admin = admin_client(&server, token).await;
        let results = [
            admin
                .unsubscribe(unsubscribe("u1", PROJECT, ""))
                .await
                .map(drop),
            admin
                .disconnect(DisconnectRequest {
                    user: user_ref("t1", "u1"),
                    reason: String::new(),
                })
                .await
                .map(drop),
            admin
                .revoke_tokens(RevokeTokensRequest {
                    user: user_ref("t1", "u1"),
                    ..Default::default()
                })
                .await
                .map(drop),
        ];
        for result in results {
            let status = expect_status(result, Code::PermissionDenied, &["tenant t1"]);
            assert!(!status.message().is_empty(), "{who}");
        }
    }
    // Allowed: the tenant's admin, a publisher confined to it, an unconfined publisher.
    for token in [
        admin_token("t1"),
        sign(&claims("svc", "t1", &["publisher"])),
        publisher_token(),
    ] {
        let mut admin = admin_client(&server, &token).await;
        admin
            .unsubscribe(unsubscribe("u1", "user:u1", ""))
            .await
            .expect("allowed");
    }
    // Bad input: INVALID_ARGUMENT naming the field.
    let mut admin = admin_client(&server, &admin_token("t1")).await;
    let bad = [
        (
            UnsubscribeRequest {
                user: user_ref("t1", "u:1"),
                room: PROJECT.into(),
                reason: String::new(),
            },
            "user.user_id",
        ),
        (
            UnsubscribeRequest {
                user: None,
                room: PROJECT.into(),
                reason: String::new(),
            },
            "user is required",
        ),
        (unsubscribe("u1", "tenant:t1:board:b1", ""), "invalid room"),
        (
            unsubscribe("u1", "tenant:t2:project:p1", ""),
            "another tenant",
        ),
        (unsubscribe("u1", PROJECT, &"x".repeat(600)), "reason"),
    ];
    for (req, needle) in bad {
        expect_status(
            admin.unsubscribe(req).await,
            Code::InvalidArgument,
            &[needle],
        );
    }
    expect_status(
        admin
            .revoke_tokens(RevokeTokensRequest {
                user: user_ref("t1", "u1"),
                issued_before: Some(prost_types::Timestamp {
                    seconds: (now() + 86_400) as i64,
                    nanos: 0,
                }),
                reason: String::new(),
            })
            .await,
        Code::InvalidArgument,
        &["future"],
    );
    // No token at all.
    let mut anonymous = AdminServiceClient::new(server.channel().await);
    expect_status(
        anonymous.disconnect(DisconnectRequest::default()).await,
        Code::Unauthenticated,
        &["authorization"],
    );
}
