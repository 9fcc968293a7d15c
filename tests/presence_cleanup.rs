//! Presence cleans up after every way a connection or a node can end (issue 10, item 4): a Subscribe
//! cancelled while its connection is being counted, streams ending while the node records them again, a
//! node stopped with SIGTERM (and in-process, on a cluster), a node killed with SIGKILL, a node
//! restarted under the same `--redis-node-id`, and (the other way round) live nodes that must not take
//! each other for dead after a Redis outage. Each test runs real lamplight nodes
//! (a `lamplight` process and/or in-process servers) on a private redis-server, and watches the statuses
//! and `GetPresence` from another node.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lamplight::proto::v1::{
    event::Payload, subscribe_response::Kind, Event, SubscribeRequest, SubscribeResponse, Task,
};
use redis_support::*;
use support::*;
use tonic::Streaming;

const ROOM: &str = "tenant:t1:project:p1";

/// A `lamplight` process; SIGKILLed on drop if still running.
struct Node {
    child: Child,
    url: String,
}

impl Node {
    /// Starts the binary on a free port against `redis_url`, under `node_id`.
    async fn start(redis_url: &str, node_id: &str, ttl_secs: u64, grace_secs: u64) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_lamplight"))
            .env_clear()
            .env("REDIS_URL", redis_url)
            .env("LAMPLIGHT_LISTEN", format!("127.0.0.1:{port}"))
            .env("LAMPLIGHT_JWT_SECRET", SECRET)
            .env("LAMPLIGHT_JWT_LEEWAY_SECS", "0")
            .env("LAMPLIGHT_REDIS_PRESENCE_TTL_SECS", ttl_secs.to_string())
            .env("LAMPLIGHT_REDIS_NODE_ID", node_id)
            .env("LAMPLIGHT_SHUTDOWN_GRACE_SECS", grace_secs.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the lamplight binary");
        let node = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let addr = format!("127.0.0.1:{port}");
        eventually(
            Duration::from_secs(30),
            "the lamplight process accepts connections",
            || async { tokio::net::TcpStream::connect(&addr).await.is_ok() },
        )
        .await;
        node
    }

    async fn client(&self, token: &str) -> Client {
        client_of(&self.url, token).await
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {signal} failed");
    }

    /// Waits for the process to exit, failing after `within`.
    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lamplight still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client_of(url: &str, token: &str) -> Client {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .expect("connect to lamplight");
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    lamplight::proto::v1::event_service_client::EventServiceClient::with_interceptor(
        channel,
        Box::new(move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", header.clone());
            Ok(req)
        }),
    )
}

/// A Subscribe to [`ROOM`] as `user`, past its `Subscribed`.
async fn join(client: &mut Client) -> Streaming<SubscribeResponse> {
    subscribe(client, &[ROOM], &[]).await.unwrap().0
}

/// `GetPresence` of [`ROOM`], asked of `client`'s node.
async fn present(client: &mut Client) -> Vec<String> {
    all_present(client, ROOM).await
}

/// Watches `tenant:t1` statuses (other than the watcher's own) and `marker` events, one change at a
/// time (the changes of one `user.status` event in user order).
struct Statuses(
    Streaming<SubscribeResponse>,
    std::collections::VecDeque<(String, bool)>,
);

impl Statuses {
    async fn open(client: &mut Client) -> Self {
        Self(
            subscribe(client, &["tenant:t1"], &[]).await.unwrap().0,
            Default::default(),
        )
    }

    /// The next status as `(user, online)`, or `("marker", false)`; `None` if nothing came within `limit`.
    async fn next_within(&mut self, limit: Duration) -> Option<(String, bool)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(change) = self.1.pop_front() {
                return Some(change);
            }
            let msg = tokio::time::timeout_at(deadline, self.0.message())
                .await
                .ok()?;
            let kind = msg
                .expect("watcher stream failed")
                .expect("watcher stream ended")
                .kind;
            match kind {
                Some(Kind::Event(e)) if status_changes(&e).is_some() => {
                    let changes = status_changes(&e).unwrap_or_default();
                    self.1
                        .extend(changes.into_iter().filter(|(u, _)| u != "watcher"));
                }
                Some(Kind::Event(e)) if e.r#type == "marker" => {
                    return Some(("marker".into(), false))
                }
                _ => continue,
            }
        }
    }

    async fn expect(&mut self, user: &str, online: bool, limit: Duration, why: &str) {
        let got = self.next_within(limit).await;
        assert_eq!(got, Some((user.to_owned(), online)), "{why}");
    }

    /// Publishes a marker through `svc` and checks that no status came before it.
    async fn expect_quiet(&mut self, svc: &mut Client, why: &str) {
        tokio::time::sleep(STATUS_SETTLE).await;
        publish_event(
            svc,
            Event {
                room: "tenant:t1".into(),
                r#type: "marker".into(),
                payload: Some(Payload::Task(Task::default())),
                ..Default::default()
            },
        )
        .await;
        let got = self.next_within(Duration::from_secs(10)).await;
        assert_eq!(got, Some(("marker".to_owned(), false)), "{why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscribe_cancelled_while_its_connection_is_counted_leaves_no_ghost() {
    let redis = RedisServer::start().await;
    let proxy = HoldProxy::start(redis.port).await;
    // Node A reaches Redis through the proxy; a long Redis timeout, so that the client's cancellation
    // (not a timeout) is what ends the Subscribe.
    let a = TestServer::start_with(|c| {
        use_redis(c, &proxy.url());
        c.redis.redis_timeout_ms = 20_000;
    })
    .await;
    let b = TestServer::start_with(|c| use_redis(c, &redis.url())).await;
    // The watcher is a user, so its own connect loads the presence scripts into Redis.
    let mut watcher = b.client(&user_token("watcher")).await;
    let mut statuses = Statuses::open(&mut watcher).await;

    // The ghost's Subscribe reaches A's presence connect; Redis runs it (ONLINE is published) but A gets
    // no answer, so the Subscribe is still waiting when the client gives up.
    proxy.hold_replies_after(b":user:");
    let mut ghost = a.client(&user_token("ghost")).await;
    let call = tokio::spawn(async move {
        ghost
            .subscribe(SubscribeRequest {
                rooms: vec![ROOM.into()],
                since: Default::default(),
            })
            .await
            .map(|_| ())
    });
    statuses
        .expect(
            "ghost",
            true,
            Duration::from_secs(10),
            "the connect ran in Redis",
        )
        .await;
    assert!(proxy.holding(), "A is waiting for Redis");
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    // Give the server a moment to see the reset before Redis answers again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.release();

    statuses
        .expect(
            "ghost",
            false,
            Duration::from_secs(10),
            "the cancelled connection goes OFFLINE",
        )
        .await;
    // OFFLINE is published with the removal of the user's last connection, after its rooms were left.
    assert!(present(&mut watcher).await.is_empty(), "ghost in presence");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_that_end_while_the_node_records_them_again_are_not_brought_back() {
    const USERS: usize = 150;
    const ENDED: usize = 100;
    let redis = RedisServer::start().await;
    let proxy = HoldProxy::start(redis.port).await;
    // A refreshes its registry entry every 2.5 s, and records its connections again, 64 at a time, when
    // the entry is gone: with 150, most are recorded only after the first ones were answered.
    let a = TestServer::start_with(|c| {
        use_redis(c, &proxy.url());
        c.redis.redis_presence_ttl_secs = 15;
        c.redis.redis_timeout_ms = 5_000;
        c.redis.redis_node_id = Some("recorder".into());
    })
    .await;
    let b = TestServer::start_with(|c| use_redis(c, &redis.url())).await;
    let mut watcher = b.client(&user_token("watcher")).await;
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i:03}")).collect();
    let mut streams = Vec::new();
    for user in &users {
        let mut client = a.client(&user_token(user)).await;
        streams.push(join(&mut client).await);
    }
    assert_eq!(present(&mut watcher).await, users);

    // A's registry entry goes (as when a reaper took A for dead): at its next refresh A records every
    // connection again. Their first records reach Redis, but A gets no answer: the rest wait. Meanwhile
    // 100 streams end; their removals start (the first command of each reaches Redis) before the records
    // of most of them are even sent.
    proxy.hold_replies_after(b":user:");
    let mut r = redis.conn().await;
    let _: () = redis::cmd("ZREM")
        .arg("lamplight:nodes")
        .arg("recorder")
        .query_async(&mut r)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "A records its connections again",
        || async { proxy.holding() },
    )
    .await;
    streams.truncate(USERS - ENDED);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.release();
    // Let that recording finish (it takes milliseconds once Redis answers): records it sent after the
    // removals would have brought the ended streams back, for good.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let remaining = &users[..USERS - ENDED];
    let limit = Duration::from_secs(6);
    let deadline = Instant::now() + limit;
    loop {
        let now_present = present(&mut watcher).await;
        if now_present == remaining {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ended streams still present {limit:?} after the recording (brought back by it): {:?}",
            now_present
                .iter()
                .filter(|u| !remaining.contains(u))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_takes_the_node_and_its_users_out_of_presence_within_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(5);
    let redis = RedisServer::start().await;
    let mut a = Node::start(&redis.url(), "node-a", 45, GRACE.as_secs()).await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = 45;
    })
    .await;
    let mut watcher = b.client(&user_token("watcher")).await;
    let mut statuses = Statuses::open(&mut watcher).await;

    let users = ["u1", "u2", "u3", "u4", "u5"];
    let mut streams = Vec::new();
    for user in users {
        let mut client = a.client(&user_token(user)).await;
        streams.push(join(&mut client).await);
        statuses
            .expect(user, true, Duration::from_secs(10), "ONLINE on connect")
            .await;
    }
    assert_eq!(present(&mut watcher).await, users);

    let sigterm = Instant::now();
    a.signal("-TERM");
    let mut offline: Vec<String> = Vec::new();
    while offline.len() < users.len() {
        let left = GRACE.saturating_sub(sigterm.elapsed()) + Duration::from_secs(1);
        match statuses.next_within(left).await {
            Some((user, false)) => offline.push(user),
            other => panic!(
                "expected OFFLINE for every user of the stopped node within the grace period; got \
                 {other:?} after {offline:?}"
            ),
        }
    }
    offline.sort();
    assert_eq!(offline, users);
    assert!(present(&mut watcher).await.is_empty());
    let exit = a.wait_exit(GRACE + Duration::from_secs(5)).await;
    assert!(exit.success(), "{exit:?}");

    // The node left the registry and its hash of connections, so nobody reaps it again later.
    let mut r = redis.conn().await;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("lamplight:nodes")
        .arg("node-a")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(score, None, "node-a is still in the node registry");
    let hash: i64 = redis::cmd("EXISTS")
        .arg("lamplight:node:{node-a}:connections")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(hash, 0, "node-a's connections are still recorded");
    let mut svc = b.client(&publisher_token()).await;
    statuses
        .expect_quiet(&mut svc, "one OFFLINE per user, nothing else")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_leaves_presence_on_a_cluster_too() {
    let cluster = RedisCluster::start().await;
    let a = TestServer::start_with(|c| {
        use_cluster(c, &cluster);
        c.redis.redis_node_id = Some("leaving".into());
    })
    .await;
    let b = TestServer::start_with(|c| use_cluster(c, &cluster)).await;
    let mut watcher = b.client(&user_token("watcher")).await;
    let mut statuses = Statuses::open(&mut watcher).await;
    let mut u1 = a.client(&user_token("u1")).await;
    let _stream = join(&mut u1).await;
    statuses
        .expect("u1", true, Duration::from_secs(10), "ONLINE on connect")
        .await;

    tokio::time::timeout(Duration::from_secs(10), a.stop())
        .await
        .expect("serve returns within its grace period")
        .unwrap();
    statuses
        .expect("u1", false, Duration::from_secs(5), "OFFLINE on stop")
        .await;
    assert!(present(&mut watcher).await.is_empty());
    // Out of the registry, asked of the master that serves its key.
    let owner = cluster.owner("lamplight:nodes").await;
    let mut r = cluster.nodes[owner].conn().await;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("lamplight:nodes")
        .arg("leaving")
        .query_async(&mut r)
        .await
        .expect("ZSCORE on the registry's master");
    assert_eq!(score, None, "the stopped node is still in the registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_redis_outage_live_nodes_do_not_reap_each_other() {
    // Registry entries live 6 s (half the TTL); Redis is gone for 8 s and comes back with its data, so
    // every node's entry has expired when the nodes reconnect, while the connections' entries (12 s) have
    // not.
    const TTL: u64 = 12;
    let mut redis = RedisServer::start_persistent().await;
    let a = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = TTL;
    })
    .await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = TTL;
    })
    .await;
    let mut u1 = a.client(&user_token("u1")).await;
    let _u1 = join(&mut u1).await;
    let mut u2 = b.client(&user_token("u2")).await;
    let _u2 = join(&mut u2).await;
    // Their ONLINE statuses went out (a window after the connects), so none is due after the outage.
    let r = redis.conn().await;
    eventually(
        Duration::from_secs(10),
        "both users told online",
        || async {
            let told: Vec<String> = redis::cmd("SMEMBERS")
                .arg("lamplight:{tenant:t1}:status-told")
                .query_async(&mut r.clone())
                .await
                .unwrap();
            told.len() == 2
        },
    )
    .await;

    redis.kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    redis.start_again().await;
    // Statuses straight from Redis (a node's own subscription may miss what is published while it
    // reconnects).
    let mut statuses = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    statuses.subscribe(room_channel("tenant:t1")).await.unwrap();
    let mut statuses = statuses.into_on_message();

    // Two heartbeat rounds: a node that took the other for dead would have published OFFLINE by then.
    let got = tokio::time::timeout(
        Duration::from_secs(2 * TTL / 3),
        futures::StreamExt::next(&mut statuses),
    )
    .await;
    assert!(
        got.is_err(),
        "a status was published after the outage (a live node reaped another): {got:?}"
    );
    assert_eq!(present(&mut u1).await, ["u1", "u2"]);
}

/// The registry score of `node` (ms), if it is registered.
async fn registry_score(r: &mut redis::aio::MultiplexedConnection, node: &str) -> Option<f64> {
    redis::cmd("ZSCORE")
        .arg("lamplight:nodes")
        .arg(node)
        .query_async(r)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_of_a_killed_node_go_offline_within_the_presence_ttl() {
    const TTL: Duration = Duration::from_secs(15);
    let redis = RedisServer::start().await;
    let mut doomed = Node::start(&redis.url(), "doomed", TTL.as_secs(), 5).await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = TTL.as_secs();
    })
    .await;
    let mut watcher = b.client(&user_token("watcher")).await;
    let mut statuses = Statuses::open(&mut watcher).await;
    let mut u1 = doomed.client(&user_token("u1")).await;
    let _stream = join(&mut u1).await;
    statuses
        .expect("u1", true, Duration::from_secs(10), "ONLINE on connect")
        .await;

    // Kill it just after it renewed its registry entry: the worst moment, when the entry has the longest
    // to live.
    let mut r = redis.conn().await;
    let before = registry_score(&mut r, "doomed").await;
    eventually(TTL, "the node renews its registry entry", || async {
        registry_score(&mut r.clone(), "doomed").await != before
    })
    .await;
    let killed = Instant::now();
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();

    // Within the TTL, with a margin for a loaded machine (a node renewing its entry only with its
    // connections, every third of the TTL, would take a full TTL at best).
    let limit = TTL * 5 / 6;
    let got = statuses
        .next_within(limit.saturating_sub(killed.elapsed()))
        .await;
    assert_eq!(
        got,
        Some(("u1".to_owned(), false)),
        "u1 of the killed node is OFFLINE within {limit:?} (after {:?})",
        killed.elapsed()
    );
    assert!(present(&mut watcher).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_under_the_same_id_clears_its_previous_run() {
    const TTL: u64 = 15;
    let redis = RedisServer::start().await;
    let b = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = TTL;
    })
    .await;
    let mut watcher = b.client(&user_token("watcher")).await;
    let mut statuses = Statuses::open(&mut watcher).await;

    let mut first = Node::start(&redis.url(), "phoenix", TTL, 5).await;
    let mut u1 = first.client(&user_token("u1")).await;
    let _u1 = join(&mut u1).await;
    statuses
        .expect("u1", true, Duration::from_secs(10), "ONLINE on connect")
        .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    // Back under the same id well before the others would take it for dead: it must clear u1 itself.
    let second = Node::start(&redis.url(), "phoenix", TTL, 5).await;
    let restarted = Instant::now();
    let mut u2 = second.client(&user_token("u2")).await;
    let _u2 = join(&mut u2).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let left = Duration::from_secs(10).saturating_sub(restarted.elapsed());
        match statuses.next_within(left).await {
            Some(status) => seen.push(status),
            None => {
                panic!("within 10 s of the restart expected u1 OFFLINE and u2 ONLINE; got {seen:?}")
            }
        }
    }
    seen.sort();
    assert_eq!(seen, [("u1".to_owned(), false), ("u2".to_owned(), true)]);
    assert_eq!(present(&mut watcher).await, ["u2"]);

    // Heartbeats of the new run neither bring u1 back nor drop u2.
    tokio::time::sleep(Duration::from_secs(TTL / 3 + 1)).await;
    assert_eq!(present(&mut watcher).await, ["u2"]);
    let mut svc = b.client(&publisher_token()).await;
    statuses
        .expect_quiet(&mut svc, "no status after the restart settled")
        .await;
}

/// A loopback proxy in front of Redis that, once armed, holds back every reply to the node from the
/// moment the node sends a command containing a given pattern (the commands themselves still reach
/// Redis), until released.
struct HoldProxy {
    port: u16,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
    armed: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldProxy {
    async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(tokio::sync::watch::channel(false).0);
        let armed: Arc<std::sync::Mutex<Option<Vec<u8>>>> = Arc::default();
        let (h, a) = (hold.clone(), armed.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(hold_pipe(client, target_port, h.clone(), a.clone()));
            }
        });
        Self {
            port,
            hold,
            armed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn hold_replies_after(&self, pattern: &[u8]) {
        *self.armed.lock().unwrap() = Some(pattern.to_vec());
    }

    fn holding(&self) -> bool {
        *self.hold.borrow()
    }

    fn release(&self) {
        self.hold.send_replace(false);
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.release();
        self.task.abort();
    }
}

async fn hold_pipe(
    client: tokio::net::TcpStream,
    target_port: u16,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
    armed: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
        return;
    };
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(n @ 1..) = client_r.read(&mut buf).await else {
                return;
            };
            {
                let mut armed = armed.lock().unwrap();
                let hit = armed
                    .as_ref()
                    .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == p.as_slice()));
                if hit {
                    *armed = None;
                    hold.send_replace(true);
                }
            }
            if server_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut rx = hold.subscribe();
        loop {
            let Ok(n @ 1..) = server_r.read(&mut buf).await else {
                return;
            };
            if rx.wait_for(|held| !held).await.is_err() {
                return;
            }
            if client_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
