//! A node killed with SIGKILL: its members leave presence (within the presence TTL, at most 60 s by
//! default) and users whose last stream was there go OFFLINE, once. The doomed node is a real
//! `lamplight` process; the survivor runs in-process.
//!
//! And the cost of keeping presence (issue 12): an idle node sends Redis as many commands with 200
//! streams as with 20; no presence key lives for ever; after Redis lost its data (`FLUSHALL`), and after
//! a node was taken for dead and reaped while cut off from Redis, the node's users come back in presence
//! and online.

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

/// Rooms of every stream in the heartbeat tests.
const ROOMS: [&str; 3] = ["tenant:t1", "tenant:t1:project:p1", "tenant:t1:channel:c1"];
/// Presence TTL of the heartbeat tests: registry refreshes every 0.5 s (and, before issue 12, every
/// connection refreshed every second).
const SHORT_TTL_SECS: u64 = 3;

/// A node with a short presence TTL on `redis`, under `node_id`.
async fn short_ttl_node(redis: &RedisServer, node_id: &str) -> TestServer {
    TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = SHORT_TTL_SECS;
        c.redis.redis_node_id = Some(node_id.into());
        c.max_streams_per_connection = 1_000;
    })
    .await
}

/// One stream per user `u000`.. on [`ROOMS`], past `Subscribed` (the stream is then in presence).
async fn open_streams(
    server: &TestServer,
    users: usize,
) -> Vec<tonic::Streaming<lamplight::proto::v1::SubscribeResponse>> {
    let channel = server.channel().await;
    let opening = (0..users).map(|n| {
        let mut client = EventServiceClient::new(channel.clone());
        async move {
            let mut req = tonic::Request::new(SubscribeRequest {
                rooms: ROOMS.iter().map(|r| r.to_string()).collect(),
                since: Default::default(),
            });
            let header = format!("Bearer {}", user_token(&format!("u{n:03}")))
                .parse()
                .unwrap();
            req.metadata_mut().insert("authorization", header);
            let mut stream = client.subscribe(req).await.unwrap().into_inner();
            assert!(matches!(next(&mut stream).await, Ok(Kind::Subscribed(_))));
            stream
        }
    });
    futures::future::join_all(opening).await
}

/// `INFO stats` `total_commands_processed` of `redis`.
async fn commands_processed(redis: &RedisServer) -> u64 {
    let mut r = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut r)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

/// Redis commands one node with `streams` open streams (3 rooms each, no changes) costs in 3 s: six
/// registry refreshes.
async fn idle_cost(streams: usize) -> u64 {
    let redis = RedisServer::start().await;
    let server = short_ttl_node(&redis, "idle").await;
    let open = open_streams(&server, streams).await;
    // The users' ONLINE statuses are settled a window after the connects: let that pass.
    tokio::time::sleep(STATUS_SETTLE + Duration::from_secs(1)).await;
    let before = commands_processed(&redis).await;
    tokio::time::sleep(Duration::from_secs(SHORT_TTL_SECS)).await;
    // Minus the first INFO itself.
    let cost = commands_processed(&redis).await - before - 1;
    assert_eq!(server_presence(&server).await.len(), streams);
    drop(open);
    cost
}

/// Every user in the first of [`ROOMS`], asked of `server` by a service (not counted in presence).
async fn server_presence(server: &TestServer) -> Vec<String> {
    let mut svc = server.client(&publisher_token()).await;
    all_present(&mut svc, ROOMS[0]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_presence_heartbeat_costs_the_same_for_20_and_200_streams() {
    // Before issue 12 every connection was rewritten every third of the TTL: 20 streams of 3 rooms cost
    // about 180 commands a second, 200 streams ten times that.
    const LIMIT: u64 = 100;
    let few = idle_cost(20).await;
    let many = idle_cost(200).await;
    eprintln!("Redis commands in {SHORT_TTL_SECS} s without changes: {few} with 20 streams, {many} with 200");
    assert!(
        few < LIMIT && many < LIMIT,
        "an idle node costs Redis {few} (20 streams) / {many} (200 streams) commands in {SHORT_TTL_SECS} s"
    );
    assert!(
        many <= few + 20,
        "the idle cost grows with the streams: {few} with 20, {many} with 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_presence_key_lives_for_ever() {
    let redis = RedisServer::start().await;
    let server = short_ttl_node(&redis, "mortal").await;
    let _open = open_streams(&server, 5).await;
    tokio::time::sleep(STATUS_SETTLE).await;
    let mut r = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("lamplight:*")
        .query_async(&mut r)
        .await
        .unwrap();
    for key in ["lamplight:nodes", "lamplight:node:{mortal}:connections"] {
        assert!(keys.iter().any(|k| k == key), "{key} missing in {keys:?}");
    }
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut r)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no expiry (PTTL {ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_redis_lost_its_data_a_nodes_users_are_back_in_presence_and_online() {
    let redis = RedisServer::start().await;
    let server = short_ttl_node(&redis, "survivor").await;
    let _open = open_streams(&server, 20).await;
    let everyone: Vec<String> = (0..20).map(|n| format!("u{n:03}")).collect();
    let r = redis.conn().await;
    let told = || {
        let mut r = r.clone();
        async move {
            let mut told: Vec<String> = redis::cmd("SMEMBERS")
                .arg("lamplight:{tenant:t1}:status-told")
                .query_async(&mut r)
                .await
                .unwrap();
            told.sort();
            told
        }
    };
    eventually(Duration::from_secs(10), "all announced online", || async {
        told().await == everyone
    })
    .await;

    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut r.clone())
        .await
        .unwrap();
    let flushed = Instant::now();
    assert!(server_presence(&server).await.is_empty());
    // Noticed at the node's next registry refresh (every 0.5 s), then rewritten.
    eventually(
        Duration::from_secs(SHORT_TTL_SECS),
        "the users are back in presence",
        || async { server_presence(&server).await == everyone },
    )
    .await;
    // Online again (decided anew: Redis forgot they were), and announced as such.
    eventually(
        Duration::from_secs(SHORT_TTL_SECS) + STATUS_SETTLE,
        "the users are announced online again",
        || async { told().await == everyone },
    )
    .await;
    eprintln!(
        "back in presence and online {:?} after FLUSHALL",
        flushed.elapsed()
    );
    for user in ["u000", "u019"] {
        let flag = format!(
            "lamplight:{{tenant:t1}}:user:{}:online",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, user)
        );
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&flag)
            .query_async(&mut r.clone())
            .await
            .unwrap();
        assert_eq!(exists, 1, "{user} is not online ({flag})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_taken_for_dead_comes_back_with_its_users() {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    // A reaches Redis through the proxy; B directly, and reaps A while A is cut off.
    let a = TestServer::start_with(|c| {
        use_redis(c, &proxy.url());
        c.redis.redis_presence_ttl_secs = SHORT_TTL_SECS;
        c.redis.redis_node_id = Some("cut-off".into());
    })
    .await;
    let b = short_ttl_node(&redis, "reaper").await;
    let _open = open_streams(&a, 10).await;
    let everyone: Vec<String> = (0..10).map(|n| format!("u{n:03}")).collect();
    assert_eq!(server_presence(&b).await, everyone);

    proxy.set(ProxyMode::Cut);
    eventually(
        Duration::from_secs(10),
        "B reaps A: its users leave presence",
        || async { server_presence(&b).await.is_empty() },
    )
    .await;
    let r = redis.conn().await;
    eventually(Duration::from_secs(10), "A's reap is over", || async {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg("lamplight:nodes")
            .arg("cut-off")
            .query_async(&mut r.clone())
            .await
            .unwrap();
        score.is_none()
    })
    .await;
    proxy.set(ProxyMode::Open);
    eventually(
        Duration::from_secs(15),
        "A's users are back in presence",
        || async { server_presence(&b).await == everyone },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "A's users are online again",
        || async {
            let online: Vec<String> = redis::cmd("SMEMBERS")
                .arg("lamplight:{tenant:t1}:online")
                .query_async(&mut r.clone())
                .await
                .unwrap();
            online.len() == everyone.len()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_waits_while_a_reaper_claims_it_and_takes_over_a_stale_claim() {
    let redis = RedisServer::start().await;
    let server = short_ttl_node(&redis, "claimed").await;
    let _open = open_streams(&server, 5).await;
    let everyone: Vec<String> = (0..5).map(|n| format!("u{n:03}")).collect();
    let r = redis.conn().await;
    let score = || {
        let mut r = r.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg("lamplight:nodes")
                .arg("claimed")
                .query_async(&mut r)
                .await
                .unwrap();
            score
        }
    };
    // A reaper's claim, as another node would write it (minus the time it was renewed, in ms). The lease
    // is the TTL or four Redis timeouts, whichever is longer: 4 s here.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let _: () = redis::cmd("ZADD")
        .arg("lamplight:nodes")
        .arg(-now_ms)
        .arg("claimed")
        .query_async(&mut r.clone())
        .await
        .unwrap();
    let claimed = Instant::now();
    // The node does not refresh over the claim (its writes could be undone by the reaper), so it is not
    // live: its users are out of presence.
    assert!(server_presence(&server).await.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        score().await,
        Some(-now_ms as f64),
        "the node refreshed over a claim"
    );
    // Once the claim is stale (no reaper renewed it), the node registers again and records its
    // connections again.
    eventually(
        Duration::from_secs(6),
        "the node takes over the stale claim",
        || async { score().await.is_some_and(|s| s > 0.0) },
    )
    .await;
    assert!(
        claimed.elapsed() >= Duration::from_millis(3900),
        "the node took over a claim after {:?}, before its lease ran out",
        claimed.elapsed()
    );
    eventually(Duration::from_secs(3), "its users are back", || async {
        server_presence(&server).await == everyone
    })
    .await;
}
