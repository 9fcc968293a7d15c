//! A node killed with SIGKILL: its members leave presence (within the presence TTL, at most 60 s by
//! default) and users whose last stream was there go OFFLINE, once. The doomed node is a real
//! `lamplight` process; the survivor runs in-process.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lamplight::proto::v1::{
    event::Payload, event_service_client::EventServiceClient, subscribe_response::Kind,
    user_status, Event, GetPresenceRequest, PublishRequest, SubscribeRequest, Task,
};
use redis_support::*;
use support::*;
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ROOM: &str = "tenant:t1:project:p1";
/// Presence TTL of both nodes in this test (heartbeats every 2 s).
const TTL_SECS: u64 = 6;

/// The doomed node; killed on drop in any case.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn presence(server_url: &str) -> Vec<String> {
    let channel = tonic::transport::Channel::from_shared(server_url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: MetadataValue<_> = format!("Bearer {}", user_token("watcher")).parse().unwrap();
    let mut client =
        EventServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", header.clone());
            Ok(req)
        });
    client
        .get_presence(GetPresenceRequest {
            room: ROOM.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user_ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_of_a_killed_node_leave_presence_and_go_offline_once() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let port = free_port();
    let doomed_url = format!("http://127.0.0.1:{port}");
    let mut doomed = Process(
        Command::new(env!("CARGO_BIN_EXE_lamplight"))
            .env("REDIS_URL", &url)
            .env("LAMPLIGHT_LISTEN", format!("127.0.0.1:{port}"))
            .env("LAMPLIGHT_JWT_SECRET", SECRET)
            .env("LAMPLIGHT_JWT_LEEWAY_SECS", "0")
            .env("LAMPLIGHT_REDIS_PRESENCE_TTL_SECS", TTL_SECS.to_string())
            .env("LAMPLIGHT_REDIS_NODE_ID", "doomed")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the lamplight binary"),
    );
    let survivor = TestServer::start_with(|c| {
        use_redis(c, &url);
        c.redis.redis_presence_ttl_secs = TTL_SECS;
    })
    .await;

    // Wait for the doomed node to serve.
    eventually(
        Duration::from_secs(30),
        "the lamplight process serves",
        || async {
            let Ok(channel) = tonic::transport::Channel::from_shared(doomed_url.clone())
                .unwrap()
                .connect()
                .await
            else {
                return false;
            };
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            matches!(status, Ok(r) if r.get_ref().status() == ServingStatus::Serving)
        },
    )
    .await;

    // An observer on the survivor watches the tenant room.
    let mut observer = survivor.client(&user_token("observer")).await;
    let (mut statuses, _) = subscribe(&mut observer, &["tenant:t1"], &[]).await.unwrap();

    // u1 connects to the doomed node only; u2 to both.
    let channel = tonic::transport::Channel::from_shared(doomed_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for user in ["u1", "u2"] {
        let header: MetadataValue<_> = format!("Bearer {}", user_token(user)).parse().unwrap();
        let mut client = EventServiceClient::with_interceptor(
            channel.clone(),
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        );
        let mut stream = client
            .subscribe(SubscribeRequest {
                rooms: vec![ROOM.into()],
                since: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(next(&mut stream).await, Ok(Kind::Subscribed(_))));
        streams.push(stream);
    }
    let mut u2 = survivor.client(&user_token("u2")).await;
    let (_u2_on_survivor, _) = subscribe(&mut u2, &[ROOM], &[]).await.unwrap();
    assert_eq!(presence(&survivor.url()).await, ["u1", "u2"]);

    // One change at a time: those of one `user.status` event in user order.
    let mut pending = std::collections::VecDeque::new();
    let mut next_status = async || loop {
        if let Some((user, online)) = pending.pop_front() {
            let status = if online {
                user_status::Status::Online
            } else {
                user_status::Status::Offline
            };
            return (user, status);
        }
        match next_non_heartbeat(&mut statuses).await.unwrap() {
            Kind::Event(e) if status_changes(&e).is_some() => pending.extend(
                status_changes(&e)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(u, _)| u != "observer"),
            ),
            Kind::Event(e) if e.r#type == "marker" => {
                return (e.r#type, user_status::Status::Unspecified)
            }
            _ => continue,
        }
    };
    assert_eq!(
        next_status().await,
        ("u1".into(), user_status::Status::Online)
    );
    assert_eq!(
        next_status().await,
        ("u2".into(), user_status::Status::Online)
    );

    // SIGKILL: no goodbye, no cleanup.
    let killed = Instant::now();
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    eventually(
        Duration::from_secs(60),
        "the killed node's members leave presence",
        || async { presence(&survivor.url()).await == ["u2"] },
    )
    .await;
    eprintln!(
        "members of the killed node left presence after {:?}",
        killed.elapsed()
    );

    // u1 had no other stream: OFFLINE, once. u2 is still connected to the survivor: no status.
    let offline = tokio::time::timeout(Duration::from_secs(60), next_status())
        .await
        .expect("OFFLINE within 60 s");
    assert_eq!(offline, ("u1".into(), user_status::Status::Offline));
    // Two more heartbeat rounds of the survivor, then a marker: nothing else was published before it.
    tokio::time::sleep(Duration::from_secs(2 * TTL_SECS / 3 + 1)).await;
    let mut svc = survivor.client(&publisher_token()).await;
    svc.publish(PublishRequest {
        event: Some(Event {
            room: "tenant:t1".into(),
            r#type: "marker".into(),
            payload: Some(Payload::Task(Task::default())),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        next_status().await.0,
        "marker",
        "OFFLINE was published once"
    );
}
