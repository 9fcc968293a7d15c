//! Authentication: bearer JWTs become a verified [`Principal`] before any handler runs.
//!
//! The [`Interceptor`] reads `authorization: Bearer <JWT>`, verifies it with the [`Verifier`] built from the
//! configured keys ([`keys`]) and puts an `Arc<Principal>` into the request extensions. What a principal may
//! do with a room is decided later, by [`crate::policy`].

mod jwks;
mod keys;
mod revocations;
mod token;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Validation;
use serde::Deserialize;

pub use jwks::{JwksOptions, MAX_JWKS_BYTES};
pub use keys::KeyError;
pub use revocations::{Revocation, Revocations, TooManyRevocations, MAX_REVOCATIONS};
pub use token::{mint_hs256, DevToken};

use crate::config::JwtConfig;
use crate::error::ServiceError;
use crate::rooms::{is_valid_id, MAX_ID_LEN};

/// Role that lets internal services publish to, and subscribe to, any room.
pub const ROLE_PUBLISHER: &str = "publisher";
/// Role that lets a user join every project and channel room of their own tenant.
pub const ROLE_ADMIN: &str = "admin";

/// Why a token was refused. Every variant maps to `UNAUTHENTICATED`; the message says which check failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing authorization metadata: send `authorization: Bearer <JWT>`")]
    Missing,
    /// The metadata is not `Bearer <token>`, or the token is not a JWT.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match the key.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid (nbf is in the future)")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("wrong token issuer (iss)")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("wrong token audience (aud)")]
    WrongAudience,
    /// The header's `alg` has no configured key (this includes `none`).
    #[error("token algorithm {0} is not accepted by this server")]
    AlgorithmNotAllowed(String),
    /// The header's `kid` names no configured key.
    #[error("unknown token key id (kid) {0:?}")]
    UnknownKeyId(String),
    /// A required claim is missing or has the wrong type.
    #[error("invalid token claims: {0}")]
    InvalidClaims(String),
    /// `AdminService.RevokeTokens` revoked this user's tokens issued before a time (or without `iat`).
    #[error("token revoked: tokens of this user issued before {issued_before} (Unix seconds) are no longer accepted; get a new token")]
    Revoked {
        /// The cutoff, Unix seconds.
        issued_before: u64,
    },
}

/// The verified identity behind a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: the user (or service) id.
    pub user_id: String,
    /// `tid`: the tenant, required for users, optional for publishers.
    pub tenant: Option<String>,
    /// `email_verified`: users must have a verified email (as in the seed).
    pub email_verified: bool,
    /// `projects`: project ids the user may join.
    pub projects: HashSet<String>,
    /// `channels`: channel ids the user may join.
    pub channels: HashSet<String>,
    /// `roles`.
    pub roles: HashSet<String>,
    /// When the token stops being accepted (`exp` plus the leeway): open streams end then.
    pub valid_until: SystemTime,
    /// `iat`, Unix seconds, if the token has it (revocations compare it).
    pub issued_at: Option<u64>,
}

impl Principal {
    /// Internal service allowed to publish.
    pub fn is_publisher(&self) -> bool {
        self.roles.contains(ROLE_PUBLISHER)
    }

    /// Tenant administrator.
    pub fn is_admin(&self) -> bool {
        self.roles.contains(ROLE_ADMIN)
    }
}

#[cfg(test)]
impl Principal {
    /// A verified user of `tenant` with no claims beyond that, for unit tests.
    pub(crate) fn test_user(tenant: &str, user: &str, issued_at: Option<u64>) -> Self {
        Self {
            user_id: user.into(),
            tenant: Some(tenant.into()),
            email_verified: true,
            projects: Default::default(),
            channels: Default::default(),
            roles: Default::default(),
            valid_until: SystemTime::now(),
            issued_at,
        }
    }
}

/// The claims lamplight reads. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    tid: Option<String>,
    #[serde(default)]
    email_verified: bool,
    #[serde(default)]
    projects: Vec<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

impl Claims {
    /// `sub`, `tid` and the `projects`/`channels` entries become parts of room names and Redis keys: each
    /// must be an id of the room grammar, or a signed `tid` such as `t1:channel:c9` would reach into
    /// another room. A bad entry refuses the whole token (dropping it silently would hide the IdP's bug).
    fn check_ids(&self) -> Result<(), AuthError> {
        let bad = |claim: &str, value: &str| {
            let shown: String = value.chars().take(32).collect();
            let more = if shown.len() < value.len() { "..." } else { "" };
            Err(AuthError::InvalidClaims(format!(
                "claim {claim} ({shown:?}{more}) is not an id: 1-{MAX_ID_LEN} characters [A-Za-z0-9_.-]"
            )))
        };
        if !is_valid_id(&self.sub) {
            return bad("sub", &self.sub);
        }
        // An empty `tid` means no tenant, as before.
        if let Some(tid) = self.tid.as_deref().filter(|t| !t.is_empty()) {
            if !is_valid_id(tid) {
                return bad("tid", tid);
            }
        }
        for (claim, list) in [("projects", &self.projects), ("channels", &self.channels)] {
            if let Some(entry) = list.iter().find(|id| !is_valid_id(id)) {
                return bad(claim, entry);
            }
        }
        Ok(())
    }
}

/// Verifies tokens against the configured keys. Built once at start-up; keys never come from globals.
#[derive(Debug)]
pub struct Verifier {
    keys: keys::KeySet,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl Verifier {
    /// Loads the key files and secret of `config` (or the development secret when no key source is
    /// configured). A `--jwt-jwks-url` needs [`Verifier::load`].
    pub fn from_config(config: &JwtConfig) -> Result<Self, KeyError> {
        Ok(Self {
            keys: keys::KeySet::load(config)?,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: Duration::from_secs(config.jwt_leeway_secs),
        })
    }

    /// Every key source of `config`, the JWKS URL included: fetched now, and kept current in the background
    /// while the verifier lives. Fails when the URL cannot be fetched and no other key is configured.
    pub async fn load(config: &JwtConfig) -> Result<Self, KeyError> {
        let mut verifier = Self::from_config(config)?;
        if let Some(options) = config.jwks_options() {
            let url = options.url.clone();
            let (remote, failure) = jwks::RemoteJwks::start(options).await?;
            let others = !verifier.keys.is_empty();
            verifier.keys = verifier.keys.with_remote(remote);
            match failure {
                Some(reason) if !others => return Err(KeyError::JwksUrl { url, reason }),
                Some(reason) => tracing::warn!(
                    %url, %reason,
                    "JWKS URL unreachable at start; using the other keys and retrying in the background"
                ),
                None => {}
            }
        }
        Ok(verifier)
    }

    /// For a token whose `kid` no key had when it was first verified, with a JWKS URL configured: refetch
    /// the set (at most once per `--jwt-jwks-refetch-secs`) and verify it again, so keys the identity
    /// provider just rotated in work without a restart.
    pub async fn verify_after_refetch(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(remote) = self.keys.remote() {
            remote.refetch_for_unknown_kid().await;
        }
        self.verify(token)
    }

    /// Checks `authorization` metadata (`Bearer <JWT>`) and returns the principal.
    pub fn verify_header(&self, value: Option<&str>) -> Result<Principal, AuthError> {
        self.verify(bearer(value.ok_or(AuthError::Missing)?)?)
    }

    /// Verifies one JWT.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            // A header naming an algorithm jsonwebtoken does not know (e.g. `none`) fails to parse.
            match alg_name_from_raw(token) {
                Some(alg) if alg.parse::<jsonwebtoken::Algorithm>().is_err() => {
                    AuthError::AlgorithmNotAllowed(alg)
                }
                _ => AuthError::Malformed(format!("not a JWT ({e})")),
            }
        })?;
        let key = self.keys.select(header.alg, header.kid.as_deref())?;
        let key = &key.key;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when the token has them: a configured issuer or
        // audience must also make the claim required, or a token without it would pass.
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::InvalidAlgorithm => {
                AuthError::AlgorithmNotAllowed(format!("{:?}", header.alg))
            }
            ErrorKind::MissingRequiredClaim(c) => {
                AuthError::InvalidClaims(format!("missing claim {c:?}"))
            }
            ErrorKind::Json(err) => AuthError::InvalidClaims(err.to_string()),
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        claims.check_ids()?;
        let valid_until = UNIX_EPOCH + Duration::from_secs(claims.exp) + self.leeway;
        Ok(Principal {
            user_id: claims.sub,
            tenant: claims.tid.filter(|t| !t.is_empty()),
            email_verified: claims.email_verified,
            projects: claims.projects.into_iter().collect(),
            channels: claims.channels.into_iter().collect(),
            roles: claims.roles.into_iter().collect(),
            valid_until,
            issued_at: claims.iat,
        })
    }
}

/// Best effort: the `alg` string of a token whose header `jsonwebtoken` refuses to parse (e.g. `none`).
fn alg_name_from_raw(token: &str) -> Option<String> {
    use base64::Engine as _;
    token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_owned))
}

/// tonic interceptor: verifies the bearer token, refuses revoked ones and stores the [`Principal`] in the
/// request extensions.
#[derive(Clone, Debug)]
pub struct Interceptor {
    verifier: Arc<Verifier>,
    revocations: Arc<Revocations>,
}

impl Interceptor {
    /// An interceptor sharing `verifier`, enforcing no revocation.
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self::with_revocations(verifier, Arc::new(Revocations::new()))
    }

    /// An interceptor sharing `verifier` that refuses tokens `revocations` covers.
    pub fn with_revocations(verifier: Arc<Verifier>, revocations: Arc<Revocations>) -> Self {
        Self {
            verifier,
            revocations,
        }
    }
}

impl tonic::service::Interceptor for Interceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ServiceError::from(AuthError::Malformed(
                    "authorization metadata is not ASCII".into(),
                ))
            })?),
        };
        match self
            .verifier
            .verify_header(header)
            .and_then(|p| self.revocations.check(&p).map(|()| p))
        {
            Ok(principal) => {
                req.extensions_mut().insert(Arc::new(principal));
            }
            // The interceptor cannot wait for a JWKS refetch: the handler finishes the check (see
            // `principal`), which it must do before anything else anyway.
            Err(AuthError::UnknownKeyId(_)) if self.verifier.keys.remote().is_some() => {
                let token = header
                    .and_then(|h| bearer(h).ok())
                    .unwrap_or_default()
                    .to_owned();
                req.extensions_mut().insert(Arc::new(Unverified {
                    verifier: self.verifier.clone(),
                    revocations: self.revocations.clone(),
                    token,
                }));
            }
            Err(e) => {
                tracing::debug!(error = %e, "authentication failed");
                return Err(ServiceError::from(e).into());
            }
        }
        Ok(req)
    }
}

/// A token whose `kid` was unknown when the interceptor ran, to verify again after a JWKS refetch.
struct Unverified {
    verifier: Arc<Verifier>,
    revocations: Arc<Revocations>,
    token: String,
}

/// `<JWT>` of an `authorization: Bearer <JWT>` value.
fn bearer(value: &str) -> Result<&str, AuthError> {
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("expected `Bearer <JWT>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed(format!(
            "expected the Bearer scheme, got {scheme:?}"
        )));
    }
    Ok(token.trim())
}

/// The verified principal of a request (set by [`Interceptor`]). Every handler calls it first.
pub async fn principal<T>(req: &tonic::Request<T>) -> Result<Arc<Principal>, ServiceError> {
    if let Some(principal) = req.extensions().get::<Arc<Principal>>() {
        return Ok(principal.clone());
    }
    let Some(pending) = req.extensions().get::<Arc<Unverified>>().cloned() else {
        return Err(ServiceError::Auth(AuthError::Missing));
    };
    let verified = pending.verifier.verify_after_refetch(&pending.token).await;
    match verified.and_then(|p| pending.revocations.check(&p).map(|()| p)) {
        Ok(principal) => Ok(Arc::new(principal)),
        Err(e) => {
            tracing::debug!(error = %e, "authentication failed");
            Err(e.into())
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verifier(secret: &str) -> Verifier {
        Verifier::from_config(&JwtConfig {
            jwt_secret: Some(secret.into()),
            jwt_leeway_secs: 0,
            ..JwtConfig::default()
        })
        .expect("verifier")
    }

    #[test]
    fn reads_claims_of_a_valid_token() {
        let token = mint_hs256(
            b"s",
            &json!({"sub": "u1", "tid": "t1", "email_verified": true, "projects": ["p1"],
                    "channels": ["c1"], "roles": ["admin"], "exp": now_unix() + 60}),
        )
        .unwrap();
        let p = verifier("s")
            .verify_header(Some(&format!("Bearer {token}")))
            .unwrap();
        assert_eq!(p.user_id, "u1");
        assert_eq!(p.tenant.as_deref(), Some("t1"));
        assert!(p.email_verified && p.is_admin() && !p.is_publisher());
        assert!(p.projects.contains("p1") && p.channels.contains("c1"));
    }

    #[test]
    fn ids_in_claims_must_follow_the_room_grammar() {
        let v = verifier("s");
        let exp = now_unix() + 60;
        let long = "x".repeat(10_000);
        for (claims, named) in [
            (json!({"sub": "u1", "tid": "t1:channel:c9"}), "tid"),
            (json!({"sub": "u1", "tid": "{t1}"}), "tid"),
            (json!({"sub": "u1", "tid": "t 1"}), "tid"),
            (json!({"sub": "u1", "tid": long}), "tid"),
            (json!({"sub": "u:1", "tid": "t1"}), "sub"),
            (json!({"sub": "", "tid": "t1"}), "sub"),
            (
                json!({"sub": "u1", "tid": "t1", "projects": ["p1", "p2:x"]}),
                "projects",
            ),
            (
                json!({"sub": "u1", "tid": "t1", "channels": ["c}1"]}),
                "channels",
            ),
        ] {
            let mut claims = claims;
            claims["exp"] = json!(exp);
            let token = mint_hs256(b"s", &claims).unwrap();
            match v.verify(&token) {
                Err(AuthError::InvalidClaims(msg)) => {
                    assert!(msg.contains(&format!("claim {named} ")), "{msg}");
                    assert!(msg.len() < 200, "the message stays short: {msg}");
                }
                other => panic!("{claims}: expected InvalidClaims naming {named}, got {other:?}"),
            }
        }
        let ok = mint_hs256(
            b"s",
            &json!({"sub": "u-1.x_2", "tid": "", "projects": ["p.1"], "exp": exp}),
        )
        .unwrap();
        assert_eq!(v.verify(&ok).map(|p| p.tenant), Ok(None));
    }

    #[test]
    fn names_each_failure() {
        let v = verifier("s");
        let exp = now_unix() + 60;
        let good = mint_hs256(b"s", &json!({"sub": "u", "exp": exp})).unwrap();
        assert_eq!(v.verify_header(None), Err(AuthError::Missing));
        assert!(matches!(
            v.verify_header(Some(&format!("Basic {good}"))),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(v.verify("abc"), Err(AuthError::Malformed(_))));
        let other = mint_hs256(b"other", &json!({"sub": "u", "exp": exp})).unwrap();
        assert_eq!(v.verify(&other), Err(AuthError::BadSignature));
        let expired = mint_hs256(b"s", &json!({"sub": "u", "exp": now_unix() - 5})).unwrap();
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        let future = mint_hs256(
            b"s",
            &json!({"sub": "u", "exp": exp, "nbf": now_unix() + 30}),
        )
        .unwrap();
        assert_eq!(v.verify(&future), Err(AuthError::NotYetValid));
        let no_sub = mint_hs256(b"s", &json!({"exp": exp})).unwrap();
        assert!(matches!(
            v.verify(&no_sub),
            Err(AuthError::InvalidClaims(_))
        ));
        // alg=none: header {"alg":"none"} and an empty signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            good.split('.').nth(1).unwrap()
        );
        let got = v.verify(&none);
        assert!(
            matches!(got, Err(AuthError::AlgorithmNotAllowed(_))),
            "{got:?}"
        );
    }
}
