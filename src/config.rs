//! Server configuration: one documented struct, read from flags and environment variables by clap, so
//! `--help` and the env vars come from the same source. Every flag `--foo-bar` also reads
//! `LAMPLIGHT_FOO_BAR` (except `REDIS_URL`). Invalid values fail at start-up with a message, never later.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, ValueEnum};

/// Default listen address: gRPC, grpc-web, reflection and health share this port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50051";
/// Default events kept per room for `since` replay.
pub const DEFAULT_HISTORY_SIZE: usize = 1000;
/// Default seconds an idle room's history is kept after its last event.
pub const DEFAULT_HISTORY_TTL_SECS: u64 = 24 * 3600;
/// Default heartbeat interval (the seed's 25 s).
pub const DEFAULT_HEARTBEAT_SECS: u64 = 25;
/// Default maximum rooms in one `Subscribe`.
pub const DEFAULT_MAX_ROOMS_PER_SUBSCRIBE: usize = 64;
/// Default maximum encoded size of one event.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;
/// Default number of undelivered events queued for one stream before it is ended.
pub const DEFAULT_STREAM_QUEUE: usize = 1024;
/// Default bytes of undelivered events (their encoded size) queued for one stream before it is ended.
pub const DEFAULT_STREAM_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Default bytes of Redis messages queued between a node's pub/sub connection and its subscriber task
/// (`--redis-push-queue-bytes`).
pub const DEFAULT_REDIS_PUSH_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Default JWT clock leeway.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 30;
/// Default shortest cache lifetime of a fetched JWKS (`--jwt-jwks-min-ttl-secs`).
pub const DEFAULT_JWT_JWKS_MIN_TTL_SECS: u64 = 60;
/// Default longest cache lifetime of a fetched JWKS (`--jwt-jwks-max-ttl-secs`).
pub const DEFAULT_JWT_JWKS_MAX_TTL_SECS: u64 = 3600;
/// Default least interval between refetches for an unknown `kid` (`--jwt-jwks-refetch-secs`).
pub const DEFAULT_JWT_JWKS_REFETCH_SECS: u64 = 30;
/// Default deadline of one JWKS fetch (`--jwt-jwks-timeout-ms`).
pub const DEFAULT_JWT_JWKS_TIMEOUT_MS: u64 = 5000;
/// Default `SetTyping` calls allowed per second per user (burst of the same size).
pub const DEFAULT_TYPING_PER_SEC: u32 = 5;
/// Default time open streams get to end after SIGINT/SIGTERM before the process exits anyway.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 5;
/// Default bound on each Redis call a request waits for (`--redis-timeout-ms`).
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 2000;
/// Default presence TTL (`--redis-presence-ttl-secs`): nodes refresh their registry entry every sixth of
/// it, and the members of a node that died leave presence within half of it and are reaped (OFFLINE)
/// within two thirds.
pub const DEFAULT_REDIS_PRESENCE_TTL_SECS: u64 = 45;
/// Default concurrent streams (calls) a client may open on one HTTP/2 connection, advertised in SETTINGS;
/// hyper's default (200) is what tonic replaces with "unlimited".
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Default `Subscribe` streams one user (or service, by `sub`) may have open on one node.
pub const DEFAULT_MAX_STREAMS_PER_USER: usize = 64;
/// Default open connections per node: twice the 10,000 idle subscribers BENCHMARKS.md measures. An idle
/// connection costs about 31 KiB of RSS, so 20,000 of them about 620 MiB. Also raise the process's file
/// descriptor limit (`ulimit -n`) above it; past that limit `accept` fails and the server retries every
/// 100 ms.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default seconds a stream may have something to send and send nothing before it is ended: its client
/// stopped reading (or granting HTTP/2 flow-control window).
pub const DEFAULT_STREAM_STALL_SECS: u64 = 30;
/// Default seconds a revocation (`AdminService.RevokeTokens`) is kept after its cutoff: the longest token
/// lifetime (`exp - iat`) an identity provider usually issues is a day.
pub const DEFAULT_REVOCATION_TTL_SECS: u64 = 86_400;
/// Default HTTP/2 PING interval on idle and busy connections alike.
pub const DEFAULT_HTTP2_KEEPALIVE_SECS: u64 = 20;
/// Default wait for a PING acknowledgement before the connection is closed. With the interval, a dead peer
/// is found within 40 s.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECS: u64 = 20;
/// Default idle time before TCP keepalive probes start; probes then go every
/// [`TCP_KEEPALIVE_INTERVAL_SECS`], and [`TCP_KEEPALIVE_RETRIES`] unanswered ones close the socket: 60 s in
/// all. It finds dead peers of HTTP/1.1 (grpc-web) connections, which have no PING.
pub const DEFAULT_TCP_KEEPALIVE_SECS: u64 = 30;
/// Seconds between TCP keepalive probes.
pub const TCP_KEEPALIVE_INTERVAL_SECS: u64 = 10;
/// Unanswered TCP keepalive probes before the kernel closes the socket.
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Default time an HTTP/1.1 client gets to send a request's headers (hyper's own default is 30 s).
pub const DEFAULT_HTTP1_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// Streams a client may make the server reset for protocol errors on one connection before it is closed
/// with GOAWAY (h2's default, set explicitly so a dependency update cannot turn it off).
pub const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Streams reset by the client before the server accepted them that may be pending on one connection
/// (the "rapid reset" attack, CVE-2023-44487); beyond: GOAWAY `ENHANCE_YOUR_CALM`. h2's default, explicit.
pub const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// The HS256 secret used when no key is configured, so `cargo run` works out of the box. Never use it in
/// production: anyone can mint tokens with it. The server logs a warning when it is in use.
pub const DEV_JWT_SECRET: &str = "lamplight-dev-secret";

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where the JWT verification keys come from. At least one source is used; with none, the development
/// secret [`DEV_JWT_SECRET`].
#[derive(Clone, Debug, Args)]
pub struct JwtConfig {
    /// HS256 shared secret.
    #[arg(long, env = "LAMPLIGHT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 shared secret (surrounding whitespace is ignored).
    #[arg(long, env = "LAMPLIGHT_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA -> RS256, EC P-256 -> ES256, Ed25519 -> EdDSA), used for tokens without a
    /// `kid` or whose `kid` is not in the JWKS.
    #[arg(long, env = "LAMPLIGHT_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`); the token's `kid` selects the key.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// The identity provider's JWKS URL (`https://` only), e.g.
    /// `https://idp.example.com/.well-known/jwks.json`. Fetched at start (no start without it unless
    /// another key is configured), cached per `Cache-Control`, refetched early for an unknown `kid`.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `--jwt-jwks-url`, besides the system's.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_CA_FILE")]
    pub jwt_jwks_ca_file: Option<PathBuf>,
    /// Shortest time a fetched JWKS is used before refetching, whatever its `max-age` says.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_MIN_TTL_SECS", default_value_t = DEFAULT_JWT_JWKS_MIN_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub jwt_jwks_min_ttl_secs: u64,
    /// Longest time a fetched JWKS is used before refetching, whatever its `max-age` says.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_MAX_TTL_SECS", default_value_t = DEFAULT_JWT_JWKS_MAX_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=7 * 86_400))]
    pub jwt_jwks_max_ttl_secs: u64,
    /// At most one early refetch per this many seconds when tokens name an unknown `kid`.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_REFETCH_SECS", default_value_t = DEFAULT_JWT_JWKS_REFETCH_SECS,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub jwt_jwks_refetch_secs: u64,
    /// Deadline of one JWKS fetch, in milliseconds.
    #[arg(long, env = "LAMPLIGHT_JWT_JWKS_TIMEOUT_MS", default_value_t = DEFAULT_JWT_JWKS_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub jwt_jwks_timeout_ms: u64,
    /// Required `iss` claim, if set.
    #[arg(long, env = "LAMPLIGHT_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, if set.
    #[arg(long, env = "LAMPLIGHT_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds.
    #[arg(long, env = "LAMPLIGHT_JWT_LEEWAY_SECS", default_value_t = DEFAULT_JWT_LEEWAY_SECS)]
    pub jwt_leeway_secs: u64,
}

impl Default for JwtConfig {
    /// No key source (so the development secret), and the documented defaults.
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_jwks_url: None,
            jwt_jwks_ca_file: None,
            jwt_jwks_min_ttl_secs: DEFAULT_JWT_JWKS_MIN_TTL_SECS,
            jwt_jwks_max_ttl_secs: DEFAULT_JWT_JWKS_MAX_TTL_SECS,
            jwt_jwks_refetch_secs: DEFAULT_JWT_JWKS_REFETCH_SECS,
            jwt_jwks_timeout_ms: DEFAULT_JWT_JWKS_TIMEOUT_MS,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: DEFAULT_JWT_LEEWAY_SECS,
        }
    }
}

impl JwtConfig {
    /// The HS256 secret: `--jwt-secret`, else the contents of `--jwt-secret-file` (trimmed), else the
    /// development secret when no key at all is configured, else none.
    pub fn hs256_secret(&self) -> std::io::Result<Option<String>> {
        Ok(match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(secret), _) => Some(secret.clone()),
            (None, Some(path)) => Some(std::fs::read_to_string(path)?.trim().to_owned()),
            (None, None) if self.uses_dev_secret() => Some(DEV_JWT_SECRET.to_owned()),
            (None, None) => None,
        })
    }

    /// True when no key source is configured and the development secret will be used.
    pub fn uses_dev_secret(&self) -> bool {
        self.jwt_secret.is_none()
            && self.jwt_secret_file.is_none()
            && self.jwt_public_key_file.is_none()
            && self.jwt_jwks_file.is_none()
            && self.jwt_jwks_url.is_none()
    }

    /// How `--jwt-jwks-url` is fetched, when it is set.
    pub fn jwks_options(&self) -> Option<crate::auth::JwksOptions> {
        let url = self.jwt_jwks_url.clone()?;
        let min_ttl = Duration::from_secs(self.jwt_jwks_min_ttl_secs);
        Some(crate::auth::JwksOptions {
            url,
            ca_file: self.jwt_jwks_ca_file.clone(),
            min_ttl,
            max_ttl: Duration::from_secs(self.jwt_jwks_max_ttl_secs).max(min_ttl),
            refetch_every: Duration::from_secs(self.jwt_jwks_refetch_secs),
            timeout: Duration::from_millis(self.jwt_jwks_timeout_ms),
        })
    }
}

/// Default seconds between checks of the TLS certificate and key files for changes.
pub const DEFAULT_TLS_RELOAD_SECS: u64 = 30;

/// TLS on the listening port: gRPC, grpc-web and reflection over HTTPS (ALPN `h2` and `http/1.1`).
#[derive(Clone, Debug, Args)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first). With `--tls-key-file`, the port speaks TLS only. Reloaded
    /// when the file changes (cert-manager, certbot), without dropping connections.
    #[arg(long, env = "LAMPLIGHT_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file`.
    #[arg(long, env = "LAMPLIGHT_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: clients may authenticate with a certificate chaining to them (mTLS), in
    /// addition to their JWT.
    #[arg(long, env = "LAMPLIGHT_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Refuse TLS handshakes without a client certificate (needs `--tls-client-ca-file`).
    #[arg(
        long,
        env = "LAMPLIGHT_TLS_CLIENT_CERT_REQUIRED",
        requires = "tls_client_ca_file"
    )]
    pub tls_client_cert_required: bool,
    /// Seconds between checks of the certificate and key files for changes.
    #[arg(long, env = "LAMPLIGHT_TLS_RELOAD_SECS", default_value_t = DEFAULT_TLS_RELOAD_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub tls_reload_secs: u64,
}

impl Default for TlsConfig {
    /// TLS off.
    fn default() -> Self {
        Self {
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_client_cert_required: false,
            tls_reload_secs: DEFAULT_TLS_RELOAD_SECS,
        }
    }
}

impl TlsConfig {
    /// The TLS settings, when a certificate and key are configured.
    pub fn settings(&self) -> Option<crate::tls::TlsSettings> {
        Some(crate::tls::TlsSettings {
            cert_file: self.tls_cert_file.clone()?,
            key_file: self.tls_key_file.clone()?,
            client_ca_file: self.tls_client_ca_file.clone(),
            client_cert_required: self.tls_client_cert_required,
            reload_every: Duration::from_secs(self.tls_reload_secs),
        })
    }
}

/// The Redis bus. Without `--redis-url` the embedded in-memory bus runs (one node).
#[derive(Clone, Debug, Args)]
pub struct RedisConfig {
    /// Redis to share rooms, history and presence with other nodes, e.g. `redis://127.0.0.1:6379/0`, or
    /// over TLS with an ACL user `rediss://user:password@redis.example.com:6380/0` (password
    /// percent-encoded; `rediss://:password@...` for `requirepass`). With `--redis-cluster`, or
    /// `redis+cluster://` / `rediss+cluster://` URLs, one or more comma-separated seed nodes of a Redis
    /// Cluster (7+), all TLS or all plain, with the same user. Unset: the embedded bus, single node.
    /// The server refuses to start when Redis cannot be reached, refuses the credentials, or presents a
    /// certificate that is not trusted.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// `--redis-url` names a Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH) and hash-tagged keys.
    #[arg(long, env = "LAMPLIGHT_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Extra CA certificates (PEM) trusted for a `rediss://` `--redis-url`, besides the system's (e.g. a
    /// managed Redis's private CA). Needs a `rediss://` URL.
    #[arg(long, env = "LAMPLIGHT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Client certificate chain (PEM) presented to a Redis that requires one (`tls-auth-clients yes`).
    /// Needs `--redis-client-key-file` and a `rediss://` URL.
    #[arg(
        long,
        env = "LAMPLIGHT_REDIS_CLIENT_CERT_FILE",
        requires = "redis_client_key_file"
    )]
    pub redis_client_cert_file: Option<PathBuf>,

    /// Private key (PEM) of `--redis-client-cert-file`.
    #[arg(
        long,
        env = "LAMPLIGHT_REDIS_CLIENT_KEY_FILE",
        requires = "redis_client_cert_file"
    )]
    pub redis_client_key_file: Option<PathBuf>,

    /// Longest wait for Redis in a request (publish, history read, presence), in milliseconds. A Redis
    /// that refuses connections fails the call at once with UNAVAILABLE; one that does not answer, after
    /// this. Also the deadline of the health probe's pub/sub round trip.
    #[arg(long, env = "LAMPLIGHT_REDIS_TIMEOUT_MS", default_value_t = DEFAULT_REDIS_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub redis_timeout_ms: u64,

    /// Presence TTL in seconds. Each node refreshes its entry in the node registry every sixth of it; the
    /// entry lives half of it. The members of a node that dies without warning leave `GetPresence` when
    /// its entry expires, and a live node reaps them (OFFLINE) within two thirds of it. Connections are
    /// written only when they change: the periodic cost does not grow with them.
    #[arg(long, env = "LAMPLIGHT_REDIS_PRESENCE_TTL_SECS", default_value_t = DEFAULT_REDIS_PRESENCE_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(3..=60))]
    pub redis_presence_ttl_secs: u64,

    /// This node's id in presence entries (1-64 characters `[A-Za-z0-9_.-]`). Default: random per start.
    #[arg(long, env = "LAMPLIGHT_REDIS_NODE_ID", value_parser = parse_node_id)]
    pub redis_node_id: Option<String>,

    /// Start even though Redis may evict keys (its `maxmemory-policy` is not `noeviction`). Without it
    /// the server refuses to start against such a Redis: an evicted room's metadata makes the room replay
    /// old events under a new epoch.
    #[arg(long, env = "LAMPLIGHT_REDIS_ALLOW_EVICTION")]
    pub redis_allow_eviction: bool,

    /// Bytes of Redis pub/sub messages a node queues between its subscriber connection and the task that
    /// fans them out. Past it messages are dropped and the node treats its subscription as lagging: it
    /// re-reads every room's stream from the last event it delivered (stored events arrive in order, late;
    /// typing and status events in that span are lost), or sends `Reset` if history no longer covers it.
    #[arg(long, env = "LAMPLIGHT_REDIS_PUSH_QUEUE_BYTES", default_value_t = DEFAULT_REDIS_PUSH_QUEUE_BYTES,
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 34)).map(|v| v as usize))]
    pub redis_push_queue_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_cluster: false,
            redis_ca_file: None,
            redis_client_cert_file: None,
            redis_client_key_file: None,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            redis_presence_ttl_secs: DEFAULT_REDIS_PRESENCE_TTL_SECS,
            redis_node_id: None,
            redis_allow_eviction: false,
            redis_push_queue_bytes: DEFAULT_REDIS_PUSH_QUEUE_BYTES,
        }
    }
}

impl RedisConfig {
    /// The certificate files for a `rediss://` `--redis-url`.
    pub fn tls_files(&self) -> crate::bus::redis::TlsFiles {
        crate::bus::redis::TlsFiles {
            ca_file: self.redis_ca_file.clone(),
            client_cert_file: self.redis_client_cert_file.clone(),
            client_key_file: self.redis_client_key_file.clone(),
        }
    }
}

fn parse_node_id(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected 1-64 characters [A-Za-z0-9_.-]".into())
    }
}

/// Everything `lamplight serve` needs.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Address for gRPC (HTTP/2), grpc-web (HTTP/1.1 and HTTP/2), reflection and health.
    #[arg(long, env = "LAMPLIGHT_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Browser origins allowed to call over grpc-web (comma-separated, e.g. the seed's FRONTEND_URL).
    /// Preflights from other origins get no CORS headers. Empty: no browser origin is allowed.
    #[arg(long, env = "LAMPLIGHT_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// TLS on the one port (off: plain TCP).
    #[command(flatten)]
    pub tls: TlsConfig,

    /// JWT verification keys and checks.
    #[command(flatten)]
    pub jwt: JwtConfig,

    /// Events kept per room for `since` replay. Older ones are dropped; a `since` before them gets `Reset`.
    #[arg(long, env = "LAMPLIGHT_HISTORY_SIZE", default_value_t = DEFAULT_HISTORY_SIZE,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|v| v as usize))]
    pub history_size: usize,

    /// Seconds a room's history is kept after its last event while nobody is subscribed.
    #[arg(long, env = "LAMPLIGHT_HISTORY_TTL_SECS", default_value_t = DEFAULT_HISTORY_TTL_SECS)]
    pub history_ttl_secs: u64,

    /// Seconds between heartbeat messages on every stream.
    #[arg(long, env = "LAMPLIGHT_HEARTBEAT_SECS", default_value_t = DEFAULT_HEARTBEAT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// Maximum rooms in one `Subscribe` (more -> INVALID_ARGUMENT).
    #[arg(long, env = "LAMPLIGHT_MAX_ROOMS_PER_SUBSCRIBE", default_value_t = DEFAULT_MAX_ROOMS_PER_SUBSCRIBE,
          value_parser = clap::value_parser!(u64).range(1..=10_000).map(|v| v as usize))]
    pub max_rooms_per_subscribe: usize,

    /// Maximum encoded size of one published event in bytes (more -> INVALID_ARGUMENT).
    #[arg(long, env = "LAMPLIGHT_MAX_EVENT_BYTES", default_value_t = DEFAULT_MAX_EVENT_BYTES,
          value_parser = clap::value_parser!(u64).range(256..=16 * 1024 * 1024).map(|v| v as usize))]
    pub max_event_bytes: usize,

    /// Events queued for one stream (all its rooms together) that it has not taken yet. Past it the stream
    /// ends with RESOURCE_EXHAUSTED naming the last event id delivered per room; publishers and other
    /// streams never wait for it.
    #[arg(long, env = "LAMPLIGHT_STREAM_QUEUE", default_value_t = DEFAULT_STREAM_QUEUE,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|v| v as usize))]
    pub stream_queue: usize,

    /// Bytes (encoded size) of the events queued for one stream that it has not taken yet; the stream
    /// ends as with `--stream-queue` when either is exceeded. One event is always accepted into an empty
    /// queue, whatever its size.
    #[arg(long, env = "LAMPLIGHT_STREAM_QUEUE_BYTES", default_value_t = DEFAULT_STREAM_QUEUE_BYTES,
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 34)).map(|v| v as usize))]
    pub stream_queue_bytes: usize,

    /// `SetTyping` calls allowed per second per user (more -> RESOURCE_EXHAUSTED).
    #[arg(long, env = "LAMPLIGHT_TYPING_PER_SEC", default_value_t = DEFAULT_TYPING_PER_SEC,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub typing_per_sec: u32,

    /// Publish users' ONLINE/OFFLINE statuses to their tenant room (`user.status` events). `false`:
    /// none is published; `GetPresence` still counts. Set the same on every node.
    #[arg(long, env = "LAMPLIGHT_USER_STATUSES", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub user_statuses: bool,

    /// Milliseconds a node gathers a tenant's status changes before publishing them as one event (a
    /// user who came and went within it is not announced).
    #[arg(long, env = "LAMPLIGHT_STATUS_WINDOW_MS", default_value_t = crate::statuses::DEFAULT_STATUS_WINDOW_MS,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub status_window_ms: u64,

    /// Status deliveries per second a tenant may cost this node: a tenant whose room knows of N online
    /// users gets its `user.status` events at most every N / this seconds (at least the window, at most
    /// 5 s), so a big tenant's connect storm costs deliveries linear in its length. 0: every window.
    #[arg(long, env = "LAMPLIGHT_STATUS_DELIVERIES_PER_SEC", default_value_t = crate::statuses::DEFAULT_STATUS_DELIVERIES_PER_SEC)]
    pub status_deliveries_per_sec: u32,

    /// Seconds open streams get to end after SIGINT/SIGTERM before the server exits anyway.
    #[arg(long, env = "LAMPLIGHT_SHUTDOWN_GRACE_SECS", default_value_t = DEFAULT_SHUTDOWN_GRACE_SECS)]
    pub shutdown_grace_secs: u64,

    /// Concurrent calls one HTTP/2 connection may have open (advertised to the client in SETTINGS; a
    /// conforming client queues the excess, others get the stream refused). Per node.
    #[arg(long, env = "LAMPLIGHT_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_streams_per_connection: u32,

    /// `Subscribe` streams one user (or service, by `sub`) may have open on this node; one more ->
    /// RESOURCE_EXHAUSTED naming the limit. Per node: with Redis, every node allows this many.
    #[arg(long, env = "LAMPLIGHT_MAX_STREAMS_PER_USER", default_value_t = DEFAULT_MAX_STREAMS_PER_USER,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|v| v as usize))]
    pub max_streams_per_user: usize,

    /// Open connections (TCP) on this node; beyond, new connections are closed as soon as they are
    /// accepted, and open ones are not disturbed.
    #[arg(long, env = "LAMPLIGHT_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|v| v as usize))]
    pub max_connections: usize,

    /// Seconds a stream may have something to send (events, a heartbeat) and send nothing before the
    /// server ends it with RESOURCE_EXHAUSTED and closes its connection: a client that stopped reading or
    /// granting HTTP/2 flow-control window.
    #[arg(long, env = "LAMPLIGHT_STREAM_STALL_SECS", default_value_t = DEFAULT_STREAM_STALL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stream_stall_secs: u64,

    /// The longest token lifetime (`exp - iat`, seconds) you issue: a revocation (`RevokeTokens`) is kept
    /// this long (plus the leeway) after its cutoff, when every token it refuses has expired anyway.
    /// Tokens without `iat`, or living longer, are accepted again after that.
    #[arg(long, env = "LAMPLIGHT_REVOCATION_TTL_SECS", default_value_t = DEFAULT_REVOCATION_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(60..=31_536_000))]
    pub revocation_ttl_secs: u64,

    /// Seconds between HTTP/2 PINGs on every connection.
    #[arg(long, env = "LAMPLIGHT_HTTP2_KEEPALIVE_SECS", default_value_t = DEFAULT_HTTP2_KEEPALIVE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http2_keepalive_secs: u64,

    /// Seconds to wait for a PING acknowledgement before the connection is closed.
    #[arg(long, env = "LAMPLIGHT_HTTP2_KEEPALIVE_TIMEOUT_SECS", default_value_t = DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http2_keepalive_timeout_secs: u64,

    /// Idle seconds before TCP keepalive probes start (then every 10 s; 3 unanswered close the socket).
    #[arg(long, env = "LAMPLIGHT_TCP_KEEPALIVE_SECS", default_value_t = DEFAULT_TCP_KEEPALIVE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=7200))]
    pub tcp_keepalive_secs: u64,

    /// Seconds an HTTP/1.1 (grpc-web) client gets to send a request's headers before the connection is
    /// closed.
    #[arg(long, env = "LAMPLIGHT_HTTP1_HEADER_READ_TIMEOUT_SECS", default_value_t = DEFAULT_HTTP1_HEADER_READ_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub http1_header_read_timeout_secs: u64,

    /// The Redis bus (multi-node). Unset: the embedded bus.
    #[command(flatten)]
    pub redis: RedisConfig,

    /// Log format (filter with RUST_LOG, default `info`).
    #[arg(long, env = "LAMPLIGHT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics (text format, any path) on this address, e.g. `127.0.0.1:9464`. Off unless
    /// set. One per process.
    #[arg(long, env = "LAMPLIGHT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Threads that run connections (tokio workers). Default: one per CPU core. On a small machine shared
    /// with other busy processes (a sidecar, a load generator), fewer threads than cores avoid being
    /// descheduled mid-fan-out: see BENCHMARKS.md. Used by the `lamplight` binary, not by `serve()`.
    #[arg(long, env = "LAMPLIGHT_WORKER_THREADS",
          value_parser = clap::value_parser!(u64).range(1..=1024).map(|v| v as usize))]
    pub worker_threads: Option<usize>,
}

impl Config {
    /// Defaults for every field, listening on `listen` (tests use `127.0.0.1:0`).
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            cors_origins: Vec::new(),
            tls: TlsConfig::default(),
            jwt: JwtConfig::default(),
            history_size: DEFAULT_HISTORY_SIZE,
            history_ttl_secs: DEFAULT_HISTORY_TTL_SECS,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            max_rooms_per_subscribe: DEFAULT_MAX_ROOMS_PER_SUBSCRIBE,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            stream_queue: DEFAULT_STREAM_QUEUE,
            stream_queue_bytes: DEFAULT_STREAM_QUEUE_BYTES,
            typing_per_sec: DEFAULT_TYPING_PER_SEC,
            user_statuses: true,
            status_window_ms: crate::statuses::DEFAULT_STATUS_WINDOW_MS,
            status_deliveries_per_sec: crate::statuses::DEFAULT_STATUS_DELIVERIES_PER_SEC,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_streams_per_user: DEFAULT_MAX_STREAMS_PER_USER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            stream_stall_secs: DEFAULT_STREAM_STALL_SECS,
            revocation_ttl_secs: DEFAULT_REVOCATION_TTL_SECS,
            http2_keepalive_secs: DEFAULT_HTTP2_KEEPALIVE_SECS,
            http2_keepalive_timeout_secs: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECS,
            tcp_keepalive_secs: DEFAULT_TCP_KEEPALIVE_SECS,
            http1_header_read_timeout_secs: DEFAULT_HTTP1_HEADER_READ_TIMEOUT_SECS,
            log_format: LogFormat::Pretty,
            metrics_listen: None,
            worker_threads: None,
            redis: RedisConfig::default(),
        }
    }

    /// Status settings.
    pub fn statuses(&self) -> crate::statuses::StatusSettings {
        crate::statuses::StatusSettings {
            enabled: self.user_statuses,
            window: Duration::from_millis(self.status_window_ms),
            deliveries_per_sec: self.status_deliveries_per_sec,
        }
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}
