//! Private `redis-server` processes for the Redis bus tests: each on free loopback ports, in its own
//! temporary directory, killed when dropped. Never the shared server on 6379. Include it with
//! `#[path = "support/redis.rs"] mod redis_support;`.
//!
//! If `redis-server` (or `redis-cli`, for the cluster) is not installed the tests fail, saying how to
//! install it: they are never skipped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lamplight::Config;

const INSTALL: &str = "the Redis bus tests need redis-server and redis-cli (Redis 7+): \
                       apt-get install redis-server (Debian/Ubuntu) or brew install redis (macOS)";

fn check_installed(bin: &str) {
    match Command::new(bin).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout);
            let major = version
                .split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
                .and_then(|s| s.parse::<u32>().ok());
            // `redis-server --version` -> "Redis server v=7.0.15 ..."; `redis-cli 7.0.15`.
            if let Some(major) = major {
                assert!(major >= 7, "{bin} is version {version}: {INSTALL}");
            }
        }
        _ => panic!("{bin} not found or not runnable: {INSTALL}"),
    }
}

/// A free loopback port whose cluster bus port (port + 10000) is free too. Both lie below the kernel's
/// ephemeral range (32768 and up): a port the kernel hands to some outgoing connection between this check
/// and redis-server binding it (seen: "bind: Address already in use" for the bus port) cannot be one of them.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const LOW: u16 = 20_000;
    const SPAN: u64 = 2_700; // ports 20000..22700, bus ports 30000..32700
    loop {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = LOW + (random % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lamplight-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// One private redis-server.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server without persistence: a restart loses everything.
    pub async fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// A server with an append-only file synced on every write: a restart keeps every accepted event.
    pub async fn start_persistent() -> Self {
        Self::start_with(&[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .await
    }

    /// A server started with extra `redis-server` arguments.
    pub async fn start_with(args: &[&str]) -> Self {
        check_installed("redis-server");
        let mut server = Self {
            port: free_port(),
            dir: temp_dir("redis"),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server.wait_ready().await;
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("log file");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL}"));
        self.child = Some(child);
    }

    /// Waits (at most 10 s) until the server answers PING.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.try_conn().await {
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start within 10 s; log: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connect timeout",
            ))),
        }
    }

    /// A connection for inspecting the server.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn().await.expect("connect to the private redis")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server vanishes without a goodbye (as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (with the same data directory).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
        self.wait_ready().await;
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// `PUBSUB NUMSUB channel` (standalone pub/sub subscribers of a channel).
    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut c = self.conn().await;
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .expect("PUBSUB NUMSUB");
        n
    }

    /// `PUBSUB SHARDNUMSUB channel` on this node only.
    pub async fn shard_numsub(&self, channel: &str) -> i64 {
        let mut c = self.conn().await;
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .expect("PUBSUB SHARDNUMSUB");
        n
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen process ignores SIGKILL only until continued; continue it first to be safe.
            if let Some(child) = &self.child {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
            }
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Joins the redis-servers on `ports` into a cluster of masters (no replicas) with `redis-cli
/// [cli_args] --cluster create`.
fn create_cluster(ports: impl Iterator<Item = u16>, cli_args: &[&str]) {
    let addrs: Vec<String> = ports.map(|port| format!("127.0.0.1:{port}")).collect();
    let out = Command::new("redis-cli")
        .args(cli_args)
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}; {INSTALL}"));
    assert!(
        out.status.success(),
        "redis-cli {cli_args:?} --cluster create failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Redis Cluster of three masters (no replicas), each a private redis-server.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> Self {
        check_installed("redis-server");
        check_installed("redis-cli");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let dir = temp_dir("cluster");
            let conf = dir.join("nodes.conf");
            let mut node = RedisServer {
                port: free_port(),
                dir,
                args: vec![
                    "--save".into(),
                    "".into(),
                    "--appendonly".into(),
                    "no".into(),
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf.to_string_lossy().into_owned(),
                    "--cluster-node-timeout".into(),
                    "5000".into(),
                    // With a master stopped, the other shards keep serving their slots (the tests
                    // check that rooms there keep flowing).
                    "--cluster-require-full-coverage".into(),
                    "no".into(),
                ],
                child: None,
            };
            node.spawn();
            nodes.push(node);
        }
        for node in &nodes {
            node.wait_ready().await;
        }
        create_cluster(nodes.iter().map(|n| n.port), &[]);
        let cluster = Self { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits (at most 20 s) until every node reports `cluster_state:ok`.
    async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &self.nodes {
            loop {
                let mut c = node.conn().await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .expect("CLUSTER INFO");
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster not ok within 20 s: {info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Seed URLs, comma-separated (what `--redis-url` takes with `--redis-cluster`).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index in [`Self::nodes`] of the master serving `key`'s slot.
    pub async fn owner(&self, key: &str) -> usize {
        let mut c = self.nodes[0].conn().await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("CLUSTER KEYSLOT");
        for i in 0..self.nodes.len() {
            if self.owns(i, slot).await {
                return i;
            }
        }
        panic!("no master owns slot {slot}");
    }

    /// Whether node `i` lists itself as serving `slot` (`CLUSTER NODES`, its `myself` line).
    async fn owns(&self, i: usize, slot: i64) -> bool {
        let mut c = self.nodes[i].conn().await;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .expect("CLUSTER NODES");
        let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
            return false;
        };
        me.split_whitespace().skip(8).any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            match (lo.parse::<i64>(), hi.parse::<i64>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                _ => false,
            }
        })
    }

    /// Sharded subscribers of `channel`, summed over the masters (only the slot's owner has any).
    pub async fn shard_numsub(&self, channel: &str) -> i64 {
        let mut total = 0;
        for node in &self.nodes {
            total += node.shard_numsub(channel).await;
        }
        total
    }
}

/// The channel of a room (see `docs/redis.md`).
pub fn room_channel(room: &str) -> String {
    format!("lamplight:{{{room}}}:events")
}

/// Points `config` at a standalone Redis with test-friendly timings.
pub fn use_redis(config: &mut Config, url: &str) {
    config.redis.redis_url = Some(url.to_owned());
    config.redis.redis_timeout_ms = 1000;
    config.redis.redis_presence_ttl_secs = 6;
}

/// Points `config` at a Redis Cluster.
pub fn use_cluster(config: &mut Config, cluster: &RedisCluster) {
    use_redis(config, &cluster.url());
    config.redis.redis_cluster = true;
}

/// Polls `check` every 50 ms until it returns true, failing the test after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a [`TcpProxy`] does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Open,
    /// A network cut: close every connection and refuse new ones.
    Cut,
    /// The subscriber connections open now (those that sent a (S)SUBSCRIBE) stay open but nothing
    /// flows on them either way any more: wedged. Other and new connections work.
    WedgeSubscribers,
}

/// A loopback TCP proxy in front of a Redis, to cut or wedge one node's connections.
pub struct TcpProxy {
    pub port: u16,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards a new loopback port to `target_port`.
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, rx) = tokio::sync::watch::channel(ProxyMode::Open);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() == ProxyMode::Cut {
                    continue; // dropped: refused
                }
                tokio::spawn(pipe(client, target_port, rx.clone()));
            }
        });
        Self { port, mode, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.set(ProxyMode::Cut);
        self.task.abort();
    }
}

async fn pipe(
    client: tokio::net::TcpStream,
    target_port: u16,
    mut mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
        return;
    };
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut subscriber = false;
    // Wedged connections stay wedged until the mode goes back to Open.
    let mut wedged = false;
    let mut last = *mode.borrow();
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Cut => return,
            ProxyMode::Open => wedged = false,
            ProxyMode::WedgeSubscribers if last != current => wedged = subscriber,
            ProxyMode::WedgeSubscribers => {}
        }
        last = current;
        let flowing = !wedged;
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            n = client_r.read(&mut up), if flowing => {
                let Ok(n @ 1..) = n else { return };
                if up[..n].windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE")) {
                    subscriber = true;
                }
                if server_w.write_all(&up[..n]).await.is_err() { return }
            }
            n = server_r.read(&mut down), if flowing => {
                let Ok(n @ 1..) = n else { return };
                if client_w.write_all(&down[..n]).await.is_err() { return }
            }
        }
    }
}

/// Certificate files of a [`TlsRedisServer`] (PEM paths; made at test time with `tests/support/tls.rs`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The server's certificate and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA the server checks client certificates against (and that signed its own certificate).
    pub ca_file: PathBuf,
}

/// A private redis-server that speaks only TLS (`--port 0 --tls-port P`), or a TLS Redis Cluster node.
/// Its `ready_user` (e.g. `"alice:secret"`, or `""` for the default user) is how the helper checks it
/// answers; the tests give ACL users with `--user` arguments.
pub struct TlsRedisServer {
    pub port: u16,
    pub files: TlsFiles,
    ready_user: String,
    /// A client certificate for the helper's own connections, when the server demands one.
    client: Option<(PathBuf, PathBuf)>,
    /// Extra `redis-server` arguments, kept for [`Self::start_again`].
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl TlsRedisServer {
    /// Starts a TLS-only server with extra `redis-server` arguments (ACL users, `--tls-auth-clients`).
    pub async fn start(files: &TlsFiles, ready_user: &str, args: &[&str]) -> Self {
        Self::start_with_client(files, ready_user, None, args).await
    }

    /// [`Self::start`], the helper presenting `client` (certificate, key) when it connects.
    pub async fn start_with_client(
        files: &TlsFiles,
        ready_user: &str,
        client: Option<(PathBuf, PathBuf)>,
        args: &[&str],
    ) -> Self {
        let server = Self::spawn(files, ready_user, client, args);
        server.wait_ready().await;
        server
    }

    fn spawn(
        files: &TlsFiles,
        ready_user: &str,
        client: Option<(PathBuf, PathBuf)>,
        args: &[&str],
    ) -> Self {
        check_installed("redis-server");
        let mut server = Self {
            port: free_port(),
            files: files.clone(),
            ready_user: ready_user.to_owned(),
            client,
            args: args.iter().map(|s| s.to_string()).collect(),
            dir: temp_dir("redis-tls"),
            child: None,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .expect("log file");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(&self.files.cert_file)
            .arg("--tls-key-file")
            .arg(&self.files.key_file)
            .arg("--tls-ca-cert-file")
            .arg(&self.files.ca_file)
            .args(["--tls-auth-clients", "optional"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL}"));
        self.child = Some(child);
    }

    /// SIGKILL: the server vanishes without a goodbye (as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (with the same data directory and arguments).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.launch();
        self.wait_ready().await;
    }

    /// Starts a server without waiting for it to answer (its certificate may be one the helper refuses).
    pub fn spawn_unchecked(files: &TlsFiles, args: &[&str]) -> Self {
        Self::spawn(files, "", None, args)
    }

    /// Waits (at most 10 s) until the server accepts TCP connections.
    pub async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "TLS redis-server on port {} not listening within 10 s; log: {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `rediss://{userinfo}@127.0.0.1:{port}` (`userinfo` like `alice:secret`; `""` for none).
    pub fn url(&self, userinfo: &str) -> String {
        match userinfo {
            "" => format!("rediss://127.0.0.1:{}", self.port),
            u => format!("rediss://{u}@127.0.0.1:{}", self.port),
        }
    }

    /// A connection as `ready_user`, trusting the test CA.
    pub async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client_tls = self
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: std::fs::read(cert).expect("client certificate"),
                client_key: std::fs::read(key).expect("client key"),
            });
        let client = redis::Client::build_with_tls(
            self.url(&self.ready_user),
            redis::TlsCertificates {
                client_tls,
                root_cert: Some(std::fs::read(&self.files.ca_file).expect("CA file")),
            },
        )?;
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connect timeout",
            ))),
        }
    }

    /// Waits (at most 10 s) until the server answers PING over TLS.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let error = match self.conn().await {
                Ok(mut c) => match redis::cmd("PING").query_async::<String>(&mut c).await {
                    Ok(_) => return,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "TLS redis-server on port {} did not answer within 10 s ({error}); log: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three TLS-only masters (`--tls-cluster yes`), each a [`TlsRedisServer`].
pub struct TlsRedisCluster {
    pub nodes: Vec<TlsRedisServer>,
}

impl TlsRedisCluster {
    /// Starts the nodes with `args` (ACL users) and joins them with `redis-cli --tls --cluster create`,
    /// authenticating as `ready_user` (`user:password`).
    pub async fn start(files: &TlsFiles, ready_user: &str, args: &[&str]) -> Self {
        check_installed("redis-cli");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut node_args = vec![
                "--cluster-enabled",
                "yes",
                "--tls-cluster",
                "yes",
                "--cluster-node-timeout",
                "5000",
            ];
            node_args.extend_from_slice(args);
            // The cluster config file goes to the node's own --dir.
            nodes.push(TlsRedisServer::spawn(files, ready_user, None, &node_args));
        }
        for node in &nodes {
            node.wait_ready().await;
        }
        let (user, pass) = ready_user.split_once(':').expect("user:password");
        let ca = files.ca_file.to_string_lossy();
        create_cluster(
            nodes.iter().map(|n| n.port),
            &[
                "--tls",
                "--cacert",
                &ca,
                "--user",
                user,
                "--pass",
                pass,
                "--no-auth-warning",
            ],
        );
        let cluster = Self { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits (at most 20 s) until every node reports `cluster_state:ok`.
    async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &self.nodes {
            loop {
                let mut c = node.conn().await.expect("connect to a TLS cluster node");
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .expect("CLUSTER INFO");
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "TLS cluster not ok within 20 s: {info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Seed URLs as `userinfo`, comma-separated.
    pub fn url(&self, userinfo: &str) -> String {
        self.nodes
            .iter()
            .map(|n| n.url(userinfo))
            .collect::<Vec<_>>()
            .join(",")
    }
}
