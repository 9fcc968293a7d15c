//! `lamplight::client` and `AdminService` against the real server: a room an administrator removes is
//! reported and forgotten (not asked for again when the stream is reopened) while the other rooms flow;
//! a disconnect ends the subscription for good with the reason, also when it is sent to another node on
//! Redis; revoked tokens are replaced by fresh ones, and a token refused again ends the subscription; the
//! admin calls themselves are refused to plain users.
#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use lamplight::auth::DevToken;
use lamplight::client::{
    token_fn, Backoff, Client, ClientConfig, ClientError, Subscription, SubscriptionEvent,
    TokenError,
};
use lamplight::proto::v1::{event::Payload, Event, UserRef};
use redis_support::{use_redis, RedisServer};
use support::*;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";
const CHANNEL: &str = "tenant:t1:channel:c1";
/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(15);

fn fast_config() -> ClientConfig {
    ClientConfig {
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        },
        ..ClientConfig::default()
    }
}

async fn client(server: &TestServer, token: String) -> Client {
    Client::with_config(server.url(), token, fast_config())
        .await
        .unwrap()
}

fn u1() -> UserRef {
    UserRef {
        tenant_id: "t1".into(),
        user_id: "u1".into(),
    }
}

/// The next item; fails the test after [`WAIT`], at the end of the stream or on an error.
async fn next_item(sub: &mut Subscription) -> SubscriptionEvent {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Err(_) => panic!("nothing from the subscription within {WAIT:?}"),
        Ok(None) => panic!("the subscription ended"),
        Ok(Some(Err(e))) => panic!("the subscription failed: {e}"),
        Ok(Some(Ok(item))) => item,
    }
}

/// The rooms of the next item, which must be `Connected`.
async fn expect_connected(sub: &mut Subscription) -> Vec<String> {
    match next_item(sub).await {
        SubscriptionEvent::Connected { rooms } => rooms.into_iter().map(|r| r.room).collect(),
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// (room, task id) of the next item, which must be an event.
async fn expect_task(sub: &mut Subscription) -> (String, String) {
    match next_item(sub).await {
        SubscriptionEvent::Event(Event {
            room,
            payload: Some(Payload::Task(task)),
            ..
        }) => (room, task.id),
        other => panic!("expected a task event, got {other:?}"),
    }
}

/// The final error, after which the stream must end; nothing else but state changes before it.
async fn expect_failure(sub: &mut Subscription) -> ClientError {
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Err(_) => panic!("the subscription did not fail within {WAIT:?}"),
            Ok(None) => panic!("the subscription ended without an error"),
            Ok(Some(Err(e))) => {
                let after = tokio::time::timeout(WAIT, sub.next()).await.unwrap();
                assert!(after.is_none(), "an error is the last item: {after:?}");
                return e;
            }
            Ok(Some(Ok(SubscriptionEvent::Event(e)))) => panic!("unexpected event {e:?}"),
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn publish(svc: &Client, room: &str, task: &str) -> String {
    let receipt = svc.publish(task_event(room, task)).unwrap();
    tokio::time::timeout(WAIT, receipt)
        .await
        .expect("publish in time")
        .expect("publish")
}

/// Tokens of u1: the first issued a minute ago, every later one now.
fn old_then_fresh_tokens() -> (impl lamplight::client::TokenSource, Arc<AtomicUsize>) {
    let minted = Arc::new(AtomicUsize::new(0));
    let count = minted.clone();
    let tokens = token_fn(move || {
        let mut claims = user_claims("u1");
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            claims.iat = now() - 60;
        }
        let token = sign(&claims);
        async move { Ok::<_, TokenError>(token) }
    });
    (tokens, minted)
}

#[tokio::test]
async fn a_removed_room_is_reported_forgotten_and_not_asked_for_after_a_token_revocation() {
    let server = TestServer::start().await;
    let svc = client(&server, publisher_token()).await;
    let (tokens, minted) = old_then_fresh_tokens();
    let user = Client::with_config(server.url(), tokens, fast_config())
        .await
        .unwrap();
    let mut sub = user.subscribe([PROJECT, CHANNEL]);
    expect_connected(&mut sub).await;
    let first = publish(&svc, PROJECT, "p0").await;
    assert_eq!(expect_task(&mut sub).await, (PROJECT.into(), "p0".into()));
    assert_eq!(sub.since().get(PROJECT), Some(&first));

    svc.unsubscribe_user(u1(), PROJECT, "left the project")
        .await
        .expect("unsubscribe");
    match next_item(&mut sub).await {
        SubscriptionEvent::Removed { room, reason } => {
            assert_eq!(
                (room.as_str(), reason.as_str()),
                (PROJECT, "left the project")
            );
        }
        other => panic!("expected Removed, got {other:?}"),
    }
    assert!(!sub.since().contains_key(PROJECT), "{:?}", sub.since());
    publish(&svc, PROJECT, "p1").await;
    publish(&svc, CHANNEL, "c1").await;
    assert_eq!(
        expect_task(&mut sub).await,
        (CHANNEL.into(), "c1".into()),
        "the other room goes on, the removed one is silent"
    );

    // Revoking the first token ends the stream UNAUTHENTICATED; a fresh token reopens it, on the channel
    // alone, replaying what the channel got meanwhile.
    let cutoff = SystemTime::now() - Duration::from_secs(30);
    svc.revoke_tokens(u1(), Some(cutoff), "password changed")
        .await
        .expect("revoke");
    match next_item(&mut sub).await {
        SubscriptionEvent::Disconnected { error, retry_in } => {
            assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
            assert_eq!(retry_in, Duration::ZERO, "a refresh needs no backoff");
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    publish(&svc, CHANNEL, "c2").await;
    assert_eq!(expect_connected(&mut sub).await, [CHANNEL]);
    assert_eq!(expect_task(&mut sub).await, (CHANNEL.into(), "c2".into()));
    publish(&svc, PROJECT, "p2").await;
    publish(&svc, CHANNEL, "c3").await;
    assert_eq!(expect_task(&mut sub).await, (CHANNEL.into(), "c3".into()));
    assert_eq!(
        sub.since().keys().collect::<Vec<_>>(),
        [CHANNEL],
        "the removed room is not resumed"
    );
    assert!(minted.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn removing_every_room_ends_the_subscription() {
    let server = TestServer::start().await;
    let svc = client(&server, publisher_token()).await;
    let user = client(&server, user_token("u1")).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    svc.unsubscribe_user(u1(), PROJECT, "")
        .await
        .expect("unsubscribe");
    assert!(matches!(
        next_item(&mut sub).await,
        SubscriptionEvent::Removed { room, .. } if room == PROJECT
    ));
    let end = tokio::time::timeout(WAIT, sub.next()).await.expect("ends");
    assert!(end.is_none(), "nothing left to carry: {end:?}");
}

#[tokio::test]
async fn a_revoked_token_that_the_source_gives_again_ends_the_subscription() {
    let server = TestServer::start().await;
    let svc = client(&server, publisher_token()).await;
    let mut claims = user_claims("u1");
    claims.iat = now() - 60;
    let user = client(&server, sign(&claims)).await;
    let mut sub = user.subscribe([PROJECT]);
    expect_connected(&mut sub).await;
    svc.revoke_tokens(u1(), Some(SystemTime::now() - Duration::from_secs(30)), "")
        .await
        .expect("revoke");
    let err = expect_failure(&mut sub).await;
    assert!(matches!(err, ClientError::Status(_)), "{err:?}");
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
}

/// The disconnect is sent to node A; the user's stream is on node B: the control channel carries it.
#[tokio::test]
async fn a_disconnect_sent_to_another_node_ends_the_subscription_for_good_with_the_reason() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = TestServer::start_with(|c| use_redis(c, &url)).await;
    let b = TestServer::start_with(|c| use_redis(c, &url)).await;
    let admin = client(
        &a,
        sign(&DevToken {
            roles: vec!["admin".into()],
            ..user_claims("boss")
        }),
    )
    .await;
    let user = client(&b, user_token("u1")).await;
    let mut sub = user.subscribe([PROJECT, CHANNEL]);
    expect_connected(&mut sub).await;
    admin
        .disconnect_user(u1(), "account closed")
        .await
        .expect("disconnect");
    let err = expect_failure(&mut sub).await;
    match &err {
        ClientError::Disconnected(status) => {
            assert_eq!(status.code(), Code::PermissionDenied);
            assert!(status.message().contains("account closed"), "{status:?}");
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert_eq!(err.code(), Some(Code::PermissionDenied));
}

#[tokio::test]
async fn admin_calls_are_refused_to_users_and_other_tenants_admins() {
    let server = TestServer::start().await;
    let plain = client(&server, user_token("u2")).await;
    let err = plain.disconnect_user(u1(), "no").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    let other_admin = client(
        &server,
        sign(&DevToken {
            tid: Some("t2".into()),
            roles: vec!["admin".into()],
            ..user_claims("boss")
        }),
    )
    .await;
    let err = other_admin
        .unsubscribe_user(u1(), PROJECT, "no")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
}
