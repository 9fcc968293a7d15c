//! Keys from an identity provider's JWKS URL (`--jwt-jwks-url`).
//!
//! The set is fetched over HTTPS at start-up; the server refuses to start when that fails and no other key
//! is configured. A background task then keeps it current: it refetches when the response's
//! `Cache-Control: max-age` runs out (clamped to `--jwt-jwks-min-ttl-secs`..`--jwt-jwks-max-ttl-secs`), and
//! a token naming an unknown `kid` triggers an early refetch, at most once per `--jwt-jwks-refetch-secs`,
//! so tokens signed with a freshly rotated key work without a restart while a flood of made-up `kid`s
//! cannot make lamplight hammer the identity provider. Every fetch has a timeout; a failed one keeps the
//! last good set (logged, and counted in `lamplight_jwks_fetch_failures_total`). Keys that lamplight
//! cannot use (encryption keys, other algorithms) are skipped with a warning; each key stays pinned to its
//! `alg`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use tokio::time::Instant;

use super::keys::{jwk_key, Key, KeyError};
use crate::metrics::{JWKS_FETCH_FAILURES, JWKS_KEYS};

/// Largest JWKS document read; a bigger answer is a failed fetch.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Cache lifetime of a response without `Cache-Control: max-age` (then clamped like any other).
const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// How the JWKS URL is fetched and cached (from [`crate::config::JwtConfig`]).
#[derive(Clone, Debug)]
pub struct JwksOptions {
    /// The `https://` URL.
    pub url: String,
    /// Extra CA certificates (PEM) to trust besides the system's, e.g. a private IdP's.
    pub ca_file: Option<PathBuf>,
    /// Shortest time a fetched set is kept before refetching, whatever `max-age` says.
    pub min_ttl: Duration,
    /// Longest time a fetched set is kept before refetching, whatever `max-age` says.
    pub max_ttl: Duration,
    /// At most one refetch for an unknown `kid` per this interval.
    pub refetch_every: Duration,
    /// Deadline of one fetch (connect, TLS, answer, body).
    pub timeout: Duration,
}

/// The identity provider's current keys.
pub(crate) struct RemoteJwks {
    options: JwksOptions,
    uri: http::Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    keys: RwLock<Arc<Vec<Arc<Key>>>>,
    /// Held while fetching, so concurrent refetches become one.
    fetching: tokio::sync::Mutex<Fetches>,
}

#[derive(Default)]
struct Fetches {
    /// When the last refetch for an unknown `kid` (successful or not) started. Scheduled refreshes do not
    /// count: a key rotated in just after one is still picked up at once.
    last_for_kid: Option<Instant>,
}

impl RemoteJwks {
    /// Builds the HTTPS client and fetches the set once. Returns the source (even when that first fetch
    /// failed: the caller decides whether other keys make up for it) and the first fetch's error, if any.
    /// The background refresher runs while the returned `Arc` is alive.
    pub(super) async fn start(
        options: JwksOptions,
    ) -> Result<(Arc<Self>, Option<String>), KeyError> {
        let bad = |reason: String| KeyError::JwksUrl {
            url: options.url.clone(),
            reason,
        };
        let uri: http::Uri = options
            .url
            .parse()
            .map_err(|e| bad(format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(
                "must be an https:// URL (keys are trusted for what they sign)".into(),
            ));
        }
        let tls = tls_config(options.ca_file.as_ref()).map_err(bad)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        let remote = Arc::new(Self {
            options,
            uri,
            client,
            keys: RwLock::new(Arc::new(Vec::new())),
            fetching: tokio::sync::Mutex::new(Fetches::default()),
        });
        let (first, ttl) = match remote.fetch_now().await {
            Ok(ttl) => (None, ttl),
            Err(e) => (Some(e), remote.options.min_ttl),
        };
        tokio::spawn(refresh(Arc::downgrade(&remote), ttl));
        Ok((remote, first))
    }

    /// The keys of the last good fetch.
    pub(super) fn current(&self) -> Arc<Vec<Arc<Key>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A token named a `kid` we do not have: refetch, unless such a refetch started less than
    /// `refetch_every` ago (then the caller just looks again at what the last fetch brought).
    pub(super) async fn refetch_for_unknown_kid(&self) {
        let mut fetches = self.fetching.lock().await;
        let recent = fetches
            .last_for_kid
            .is_some_and(|at| at.elapsed() < self.options.refetch_every);
        if recent {
            return;
        }
        fetches.last_for_kid = Some(Instant::now());
        if let Err(e) = self.fetch().await {
            self.failed(&e);
        }
    }

    /// One fetch now (start-up and the refresher). Returns how long to keep it.
    async fn fetch_now(&self) -> Result<Duration, String> {
        let _single = self.fetching.lock().await;
        self.fetch().await.inspect_err(|e| self.failed(e))
    }

    fn failed(&self, error: &str) {
        metrics::counter!(JWKS_FETCH_FAILURES).increment(1);
        tracing::warn!(
            url = %self.options.url,
            %error,
            keys_kept = self.current().len(),
            "JWKS fetch failed; keeping the last good key set"
        );
    }

    /// GETs the set, replaces the keys with it and returns its cache lifetime.
    async fn fetch(&self) -> Result<Duration, String> {
        let (set, ttl) = tokio::time::timeout(self.options.timeout, self.get())
            .await
            .map_err(|_| format!("no answer within {:?}", self.options.timeout))??;
        let mut keys = Vec::with_capacity(set.keys.len());
        for jwk in &set.keys {
            match jwk_key(jwk) {
                Ok(key) => keys.push(Arc::new(key)),
                Err(reason) => {
                    tracing::warn!(url = %self.options.url, %reason, "JWKS key skipped")
                }
            }
        }
        if keys.is_empty() {
            return Err(
                "the key set has no key lamplight can use (RS256, ES256, EdDSA with a kid)".into(),
            );
        }
        tracing::info!(url = %self.options.url, keys = keys.len(), ?ttl, "JWKS fetched");
        metrics::gauge!(JWKS_KEYS).set(keys.len() as f64);
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(ttl)
    }

    async fn get(&self) -> Result<(JwkSet, Duration), String> {
        let request = http::Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("HTTP status {}", response.status()));
        }
        let ttl = cache_ttl(response.headers().get(http::header::CACHE_CONTROL))
            .unwrap_or(DEFAULT_TTL)
            .clamp(self.options.min_ttl, self.options.max_ttl);
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        let set = serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))?;
        Ok((set, ttl))
    }
}

/// Refetches whenever the current set's lifetime runs out (a failed fetch is retried after the minimum
/// lifetime), until the key source is dropped.
async fn refresh(remote: Weak<RemoteJwks>, mut ttl: Duration) {
    loop {
        tokio::time::sleep(ttl).await;
        let Some(remote) = remote.upgrade() else {
            return;
        };
        ttl = remote.fetch_now().await.unwrap_or(remote.options.min_ttl);
    }
}

/// `max-age` of a `Cache-Control` header (`no-cache`/`no-store` count as 0, i.e. the minimum lifetime).
fn cache_ttl(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let value = value?.to_str().ok()?;
    value.split(',').map(str::trim).find_map(|directive| {
        let directive = directive.to_ascii_lowercase();
        if directive == "no-cache" || directive == "no-store" {
            return Some(Duration::ZERO);
        }
        let secs = directive.strip_prefix("max-age=")?;
        secs.trim_matches('"').parse().ok().map(Duration::from_secs)
    })
}

/// TLS for the fetch: the system's roots plus `ca_file`, TLS 1.2+, ring.
fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = crate::tls::read_certs(path)
            .map_err(|e| format!("--jwt-jwks-ca-file {}: {e}", path.display()))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("--jwt-jwks-ca-file {}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no CA certificate to trust: install ca-certificates or set --jwt-jwks-ca-file".into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_max_age() {
        let ttl = |v: &str| cache_ttl(Some(&http::HeaderValue::from_str(v).unwrap()));
        assert_eq!(ttl("public, max-age=600"), Some(Duration::from_secs(600)));
        assert_eq!(
            ttl("Max-Age=\"60\", must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(ttl("no-store"), Some(Duration::ZERO));
        assert_eq!(ttl("public"), None);
        assert_eq!(cache_ttl(None), None);
    }
}
