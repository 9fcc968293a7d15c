//! Command line: `lamplight [serve] [flags]` runs the server (the default), `lamplight token ...` prints a
//! signed development token, and (cargo feature `client`) `subscribe`, `publish`, `presence` and `admin`
//! talk to a running server through [`crate::client`]; [`commands`] runs those and defines their exit
//! codes.

use clap::{Args, Parser, Subcommand};

use crate::auth::{mint_hs256, DevToken};
use crate::config::{Config, JwtConfig};

/// lamplight: a gRPC-native real-time event service.
#[derive(Debug, Parser)]
#[command(
    name = "lamplight",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags, when no subcommand is given.
    #[command(flatten)]
    pub serve: Config,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(Config),
    /// Print an HS256 token signed with the configured secret, for local use and the README's examples.
    Token(TokenArgs),
    /// Print the events of rooms as JSON lines, live, reconnecting and resuming by itself.
    #[cfg(feature = "client")]
    Subscribe(SubscribeArgs),
    /// Publish one event and print its id.
    #[cfg(feature = "client")]
    Publish(PublishArgs),
    /// Print who is subscribed to a room, as JSON.
    #[cfg(feature = "client")]
    Presence(PresenceArgs),
    /// Membership changes on live streams: take a room off a user's streams, disconnect a user, revoke
    /// their tokens (AdminService; the token needs role publisher, or admin of the user's tenant).
    #[cfg(feature = "client")]
    Admin(AdminArgs),
    /// Load-test a running deployment (fanout, two-node, idle; --find-max): one JSON line per run.
    #[cfg(feature = "client")]
    Bench(crate::bench::BenchArgs),
}

#[cfg(feature = "client")]
pub mod commands;

/// Server address the client subcommands use by default.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";
/// `sub` of the token the client subcommands mint when neither `--token` nor `--sub` is given; it gets role
/// `publisher`, which may publish to and subscribe to every room.
pub const DEFAULT_CLI_SUB: &str = "lamplight-cli";

/// Where and as whom `subscribe`, `publish` and `presence` connect.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Server URL (`http://host:port`, or `https://host:port` for a server with TLS).
    #[arg(long, env = "LAMPLIGHT_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// For `https://`: a PEM CA certificate to trust besides the system's (e.g. a private CA).
    #[arg(long, env = "LAMPLIGHT_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Bearer token to send. Without it a token is minted from the configured secret (like `lamplight
    /// token`, see --sub) and minted again when the server refuses an expired one.
    #[arg(long, env = "LAMPLIGHT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// `sub` of the minted token. Without --sub: the internal service `lamplight-cli`, role publisher.
    #[arg(long)]
    pub sub: Option<String>,
    /// The other claims of the minted token, and the secret to mint it with.
    #[command(flatten)]
    pub claims: ClaimArgs,
}

/// Claims and signing secret shared by `lamplight token` and the client subcommands' minted tokens.
#[derive(Clone, Debug, Args)]
pub struct ClaimArgs {
    /// `tid`: tenant id.
    #[arg(long)]
    pub tid: Option<String>,
    /// Project ids (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub projects: Vec<String>,
    /// Channel ids (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Roles: `admin`, `publisher` (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// The secret (and the `iss`/`aud` the server checks) to sign with: the server's.
    #[command(flatten)]
    pub jwt: JwtConfig,
}

impl ConnectArgs {
    /// The claims to mint when no --token is given.
    pub fn mint_args(&self) -> TokenArgs {
        let mut claims = self.claims.clone();
        let sub = match &self.sub {
            Some(sub) => sub.clone(),
            None => {
                if claims.roles.is_empty() {
                    claims.roles = vec![crate::auth::ROLE_PUBLISHER.to_owned()];
                }
                DEFAULT_CLI_SUB.to_owned()
            }
        };
        TokenArgs {
            sub,
            unverified: false,
            claims,
        }
    }
}

/// Flags of `lamplight subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// Room to subscribe to (repeat, or separate with commas, for several).
    #[arg(long = "room", required = true, value_delimiter = ',')]
    pub rooms: Vec<String>,
    /// Replay what ROOM had after event ID first: `ROOM=ID` (repeatable).
    #[arg(long, value_name = "ROOM=ID", value_parser = parse_since)]
    pub since: Vec<(String, String)>,
    /// Exit (status 0) after printing this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Give up (exit status 6) when no stream opened within this many seconds of the start; 0 keeps
    /// trying. Once connected, it reconnects for as long as it runs.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_secs: u64,
    /// The server's --heartbeat-secs: a stream silent for 2.5 times this is considered dead and reopened.
    #[arg(long, default_value_t = crate::config::DEFAULT_HEARTBEAT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,
    /// Server and token.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `ROOM=ID`.
fn parse_since(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((room, id)) if !room.is_empty() && !id.is_empty() => {
            Ok((room.to_owned(), id.to_owned()))
        }
        _ => Err(format!("expected ROOM=ID, got {value:?}")),
    }
}

/// Flags of `lamplight publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The room to publish to.
    #[arg(long)]
    pub room: String,
    /// The event type, a dotted name such as `task.created`.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: String,
    /// The payload.
    #[command(flatten)]
    pub payload: PayloadArgs,
    /// Media type of --custom-file.
    #[arg(long, default_value = "application/octet-stream")]
    pub content_type: String,
    /// Idempotency key (default: a random one). A publish repeated with the same key within 10 minutes
    /// prints the first id and is delivered once.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Seconds to keep retrying while the server is unreachable before giving up (exit status 6).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Server and token.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Exactly one payload of `lamplight publish`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PayloadArgs {
    /// A `Task` as a JSON object of strings, e.g. '{"id":"42","title":"Ship"}'.
    #[arg(long, value_name = "JSON")]
    pub task_json: Option<String>,
    /// A `Bug` as a JSON object of strings.
    #[arg(long, value_name = "JSON")]
    pub bug_json: Option<String>,
    /// A `Feature` as a JSON object of strings.
    #[arg(long, value_name = "JSON")]
    pub feature_json: Option<String>,
    /// A `Message` as a JSON object of strings.
    #[arg(long, value_name = "JSON")]
    pub message_json: Option<String>,
    /// A `Notification` as a JSON object of strings.
    #[arg(long, value_name = "JSON")]
    pub notification_json: Option<String>,
    /// A `Custom` payload: the bytes of this file (`-` for standard input), see --content-type.
    #[arg(long, value_name = "PATH")]
    pub custom_file: Option<std::path::PathBuf>,
}

/// Flags of `lamplight presence`.
#[derive(Debug, Args)]
pub struct PresenceArgs {
    /// The room.
    #[arg(long)]
    pub room: String,
    /// User ids per page (0: the server's default, 100; at most 1,000).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    /// The page after the one that printed this `next_page_token` (empty: the first page).
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Server and token.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `lamplight admin ...`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: AdminAction,
}

/// The admin calls.
#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// Take a room off every open stream of a user (each gets `Removed`; its other rooms go on).
    Unsubscribe {
        /// The user.
        #[command(flatten)]
        target: AdminTarget,
        /// The room (`tenant:{tid}:...`, or `user:{sub}` shorthand in the user's tenant).
        #[arg(long)]
        room: String,
        /// Shown to the user.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End every open stream of a user with PERMISSION_DENIED; their clients do not reconnect.
    Disconnect {
        /// The user.
        #[command(flatten)]
        target: AdminTarget,
        /// Shown to the user.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Refuse the user's tokens issued before a time (default: now) until they expire, and end the
    /// streams opened with them (UNAUTHENTICATED: clients ask for a new token).
    Revoke {
        /// The user.
        #[command(flatten)]
        target: AdminTarget,
        /// Tokens issued before this RFC 3339 time (e.g. `2026-12-01T12:00:00Z`) are refused; default: now.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        issued_before: Option<std::time::SystemTime>,
        /// Why (logged by the server).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// The user an admin call is about, and how to connect.
#[derive(Debug, Args)]
pub struct AdminTarget {
    /// The user's `sub`.
    #[arg(long)]
    pub user: String,
    /// The user's tenant; default: the minted token's --tid.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Server and token.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl AdminTarget {
    /// The user as the proto names it.
    pub fn user_ref(&self) -> crate::proto::v1::UserRef {
        crate::proto::v1::UserRef {
            tenant_id: self
                .tenant
                .clone()
                .or_else(|| self.connect.claims.tid.clone())
                .unwrap_or_default(),
            user_id: self.user.clone(),
        }
    }
}

/// An RFC 3339 time.
fn parse_time(value: &str) -> Result<std::time::SystemTime, String> {
    let timestamp: prost_types::Timestamp = value
        .parse()
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-12-01T12:00:00Z: {e}"))?;
    std::time::SystemTime::try_from(timestamp).map_err(|e| format!("time out of range: {e}"))
}

/// Claims of `lamplight token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// `sub`: user or service id.
    #[arg(long)]
    pub sub: String,
    /// Leave `email_verified` false (users need it true to subscribe).
    #[arg(long)]
    pub unverified: bool,
    /// The other claims, and the secret to sign with.
    #[command(flatten)]
    pub claims: ClaimArgs,
}

/// Why a token could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Only HS256 secrets can sign here.
    #[error("no HS256 secret configured to sign with (set --jwt-secret or LAMPLIGHT_JWT_SECRET); tokens for public-key setups come from your identity provider")]
    NoSecret,
    /// The secret file could not be read.
    #[error("cannot read the secret file: {0}")]
    Read(#[from] std::io::Error),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

impl TokenArgs {
    /// The signed token.
    pub fn mint(&self) -> Result<String, TokenError> {
        let c = &self.claims;
        let secret = c.jwt.hs256_secret()?.ok_or(TokenError::NoSecret)?;
        let now = crate::auth::now_unix();
        let claims = DevToken {
            sub: self.sub.clone(),
            tid: c.tid.clone(),
            email_verified: !self.unverified,
            projects: c.projects.clone(),
            channels: c.channels.clone(),
            roles: c.roles.clone(),
            iat: now,
            exp: now + c.ttl_secs,
            iss: c.jwt.jwt_issuer.clone(),
            aud: c.jwt.jwt_audience.clone(),
        };
        Ok(mint_hs256(secret.as_bytes(), &claims)?)
    }
}
