//! TLS fixtures made at test time (nothing committed): a private CA, certificates it signs for loopback
//! names, and a small HTTPS server whose answer a test can change while it runs (an identity provider's
//! JWKS endpoint). Include with `#[path = "support/tls.rs"] mod tls_support;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lamplight-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    /// Writes `contents` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lamplight test CA");
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM: what clients trust.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn issue(&self, names: &[&str]) -> CertPair {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// rustls server config for `pair` (ring, TLS 1.2+), offering `alpn`.
pub fn server_config(pair: &CertPair, alpn: &[&[u8]]) -> rustls::ServerConfig {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).expect("key PEM");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// What [`HttpsServer`] answers: status, `Cache-Control`, body.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub cache_control: Option<String>,
    pub body: String,
}

/// An HTTPS/1.1 server on 127.0.0.1 answering every request with the current [`Answer`], counting them.
pub struct HttpsServer {
    pub addr: SocketAddr,
    pub answer: Arc<Mutex<Answer>>,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl HttpsServer {
    pub async fn start(pair: &CertPair, answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(server_config(pair, &[b"http/1.1"])));
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (shared, counter) = (answer.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, shared, counter) =
                    (acceptor.clone(), shared.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |_req| {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let answer = shared.lock().unwrap().clone();
                        async move {
                            let mut response = http::Response::builder().status(answer.status);
                            if let Some(cc) = &answer.cache_control {
                                response = response.header("cache-control", cc);
                            }
                            response.body(Full::new(Bytes::from(answer.body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            answer,
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn request_count(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `pem` to a file in `dir` and returns its path.
pub fn pem_file(dir: &TempDir, name: &str, pem: &str) -> PathBuf {
    dir.write(name, pem)
}

/// True when `path` exists (for readable assertions).
pub fn exists(path: &Path) -> bool {
    path.exists()
}
