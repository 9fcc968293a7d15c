//! Command line: `lamplight [serve] [flags]` runs the server (the default), `lamplight token ...` prints a
//! signed development token.

use clap::{Args, Parser, Subcommand};

use crate::auth::{mint_hs256, DevToken};
use crate::config::{Config, JwtConfig, DEV_JWT_SECRET};

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
}

/// Claims of `lamplight token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// `sub`: user or service id.
    #[arg(long)]
    pub sub: String,
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
    /// Leave `email_verified` false (users need it true to subscribe).
    #[arg(long)]
    pub unverified: bool,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// The secret and the `iss`/`aud` the server checks.
    #[command(flatten)]
    pub jwt: JwtConfig,
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
        let secret = match (&self.jwt.jwt_secret, &self.jwt.jwt_secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)?.trim().to_owned(),
            (None, None) if self.jwt.uses_dev_secret() => DEV_JWT_SECRET.to_owned(),
            (None, None) => return Err(TokenError::NoSecret),
        };
        let now = crate::auth::now_unix();
        let claims = DevToken {
            sub: self.sub.clone(),
            tid: self.tid.clone(),
            email_verified: !self.unverified,
            projects: self.projects.clone(),
            channels: self.channels.clone(),
            roles: self.roles.clone(),
            iat: now,
            exp: now + self.ttl_secs,
            iss: self.jwt.jwt_issuer.clone(),
            aud: self.jwt.jwt_audience.clone(),
        };
        Ok(mint_hs256(secret.as_bytes(), &claims)?)
    }
}
