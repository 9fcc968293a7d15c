//! TLS on the one port (`--tls-cert-file`, `--tls-key-file`): rustls on ring, TLS 1.2 and 1.3, ALPN `h2`
//! and `http/1.1`, so browsers get HTTP/2 for grpc-web and gRPC clients their usual h2.
//!
//! The certificate and key are read again whenever their files change (checked every
//! `--tls-reload-secs`): cert-manager and certbot renew in place, and new handshakes get the new pair while
//! open connections keep theirs. A new pair that does not load (unreadable, not PEM, key not matching the
//! certificate) is logged and counted, and the old one stays in use. With `--tls-client-ca-file`, clients
//! may present a certificate (required with `--tls-client-cert-required`), which must chain to that CA; a
//! JWT is still needed for every call: client certificates add to tokens, they do not replace them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::metrics::TLS_RELOADS;

/// How TLS is set up (from [`crate::config::TlsConfig`]).
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse handshakes without a client certificate (needs `client_ca_file`).
    pub client_cert_required: bool,
    /// How often the certificate and key files are checked for changes.
    pub reload_every: Duration,
}

/// Why TLS could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate or key could not be loaded.
    #[error("TLS certificate {cert} / key {key}: {reason}")]
    Pair {
        /// `--tls-cert-file`.
        cert: PathBuf,
        /// `--tls-key-file`.
        key: PathBuf,
        /// Why.
        reason: String,
    },
    /// The client CA file could not be used.
    #[error("--tls-client-ca-file {path}: {reason}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `--tls-client-cert-required` without a CA to check certificates against.
    #[error("--tls-client-cert-required needs --tls-client-ca-file")]
    RequiredWithoutCa,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Accepts TLS on accepted TCP connections, with the current certificate.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsAcceptor {
    /// Loads the pair (failing start-up when it does not load) and starts watching its files until
    /// `shutdown`.
    pub fn start(settings: &TlsSettings, shutdown: CancellationToken) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (key, files) = load_pair(&settings.cert_file, &settings.key_file, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(key)),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &settings.client_ca_file {
            None if settings.client_cert_required => return Err(TlsError::RequiredWithoutCa),
            None => builder.with_no_client_auth(),
            Some(path) => {
                let bad = |reason: String| TlsError::ClientCa {
                    path: path.clone(),
                    reason,
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(path).map_err(bad)? {
                    roots.add(cert).map_err(|e| bad(e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let verifier = if settings.client_cert_required {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| bad(e.to_string()))?)
            }
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio::spawn(watch(resolver, settings.clone(), provider, files, shutdown));
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The TLS handshake on an accepted connection.
    pub fn accept<IO>(&self, stream: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.acceptor.accept(stream)
    }
}

/// Hands every handshake the current pair.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The bytes of the certificate and key files a pair was loaded from, to tell when they change.
type Files = (Vec<u8>, Vec<u8>);

/// Checks the files every `reload_every`; a changed pair that loads replaces the current one.
async fn watch(
    resolver: Arc<Resolver>,
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    mut loaded: Files,
    shutdown: CancellationToken,
) {
    // The last contents that failed, so a bad pair is reported once, not every check.
    let mut refused: Option<Files> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.reload_every) => {}
        }
        let (Ok(cert), Ok(key)) = (
            std::fs::read(&settings.cert_file),
            std::fs::read(&settings.key_file),
        ) else {
            // Mid-rename, or removed: try again next time.
            continue;
        };
        let now = (cert, key);
        if now == loaded || refused.as_ref() == Some(&now) {
            continue;
        }
        match pair_from_pem(&now.0, &now.1, &provider) {
            Ok(key) => {
                *resolver.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                metrics::counter!(TLS_RELOADS, "result" => "loaded").increment(1);
                tracing::info!(cert = %settings.cert_file.display(), "TLS certificate reloaded");
                loaded = now;
                refused = None;
            }
            Err(reason) => {
                metrics::counter!(TLS_RELOADS, "result" => "refused").increment(1);
                tracing::warn!(
                    cert = %settings.cert_file.display(),
                    key = %settings.key_file.display(),
                    %reason,
                    "new TLS certificate/key not loaded; keeping the current one"
                );
                refused = Some(now);
            }
        }
    }
}

fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Files), TlsError> {
    let bad = |reason: String| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| bad(format!("reading the certificate: {e}")))?;
    let key_pem = std::fs::read(key).map_err(|e| bad(format!("reading the key: {e}")))?;
    let pair = pair_from_pem(&cert_pem, &key_pem, provider).map_err(bad)?;
    Ok((pair, (cert_pem, key_pem)))
}

/// A certificate chain and its key, checked to belong together.
fn pair_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the certificate file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key PEM: {e}"))?;
    let pair = CertifiedKey::from_der(certs, key, provider).map_err(|e| e.to_string())?;
    Ok(pair)
}

/// The PEM certificates in `path` (at least one), for trust stores: the client CA here, the JWKS CA.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}
