//! Where Redis is and how to reach it: `--redis-url` (one server or cluster seeds, `redis://` or
//! `rediss://`, an ACL user and password in the URL) and the certificate files for TLS
//! (`--redis-ca-file`, `--redis-client-cert-file`, `--redis-client-key-file`), read once at start-up.
//!
//! TLS is redis-rs's rustls support: the server's certificate is checked against the system's roots
//! plus `--redis-ca-file`, and must name the host of the URL. Passwords never appear in messages or
//! `Debug` output.

use std::path::{Path, PathBuf};

use redis::cluster::ClusterClientBuilder;
use redis::{ClientTlsConfig, IntoConnectionInfo, RedisError, TlsCertificates};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where Redis is, and how to reach it: plain TCP (`redis://`) or TLS (`rediss://`), with the user and
/// password of an ACL user in the URL (`rediss://user:password@host:port`). The `Debug` output hides
/// passwords.
#[derive(Clone)]
pub struct Target {
    pub(super) nodes: Nodes,
    /// Extra roots and a client certificate for `rediss://`; `None`: the system's roots only.
    certs: Option<TlsCertificates>,
}

#[derive(Clone)]
pub(super) enum Nodes {
    /// One server (`redis://host:port/db`).
    Standalone(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// Files for `rediss://` connections (`--redis-ca-file`, `--redis-client-cert-file`,
/// `--redis-client-key-file`), read once at start-up.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA certificates (PEM) trusted besides the system's roots, e.g. a managed Redis's private CA.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM), for a Redis that requires one (`tls-auth-clients yes`).
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert_file.is_none() && self.client_key_file.is_none()
    }
}

impl Target {
    /// Reads `--redis-url`: a `redis://` / `rediss://` URL, or with `cluster` (or a `redis+cluster://` /
    /// `rediss+cluster://` URL) one or more comma-separated seed URLs of a cluster. Seeds are all TLS or
    /// all plain, and carry the same user and password.
    pub fn parse(url: &str, cluster: bool) -> Result<Self, String> {
        let mut urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        let mut cluster = cluster;
        for u in &mut urls {
            for (from, to) in [
                ("redis+cluster://", "redis://"),
                ("rediss+cluster://", "rediss://"),
            ] {
                if let Some(rest) = u.strip_prefix(from) {
                    *u = format!("{to}{rest}");
                    cluster = true;
                }
            }
        }
        if urls.is_empty() {
            return Err("--redis-url is empty".into());
        }
        for u in &urls {
            u.as_str()
                .into_connection_info()
                .map_err(|e| format!("invalid Redis URL {:?}: {e}", redact(u)))?;
        }
        if urls.iter().any(|u| is_tls_url(u)) && !urls.iter().all(|u| is_tls_url(u)) {
            return Err(
                "mixed rediss:// (TLS) and redis:// (plain) URLs: use one scheme for every \
                        seed"
                    .into(),
            );
        }
        let nodes = match (cluster, urls.len()) {
            (true, _) => Nodes::Cluster(urls),
            (false, 1) => Nodes::Standalone(urls.remove(0)),
            (false, _) => {
                return Err(
                    "several Redis URLs given: pass --redis-cluster (or redis+cluster:// \
                            URLs) for a cluster"
                        .into(),
                )
            }
        };
        Ok(Self { nodes, certs: None })
    }

    /// Adds the certificates in `files` (read now). They need a `rediss://` target: with a plain
    /// `redis://` URL they would silently not be used, so that is an error. Messages name the flag.
    pub fn with_tls(mut self, files: &TlsFiles) -> Result<Self, String> {
        if files.is_empty() {
            return Ok(self);
        }
        if !self.is_tls() {
            return Err(
                "--redis-ca-file and --redis-client-cert-file/--redis-client-key-file are \
                        for TLS: use a rediss:// --redis-url"
                    .into(),
            );
        }
        let root_cert = match &files.ca_file {
            Some(path) => Some(roots_with(&read_certificates(path, "--redis-ca-file")?)),
            None => None,
        };
        let client_tls = match (&files.client_cert_file, &files.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let client_cert = read_certificates(cert, "--redis-client-cert-file")?;
                let client_key = read_file(key, "--redis-client-key-file")?;
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                    format!(
                        "--redis-client-key-file {}: no PEM private key ({e})",
                        key.display()
                    )
                })?;
                Some(ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
            _ => {
                return Err(
                    "--redis-client-cert-file and --redis-client-key-file go together".into(),
                )
            }
        };
        self.certs = Some(TlsCertificates {
            client_tls,
            root_cert,
        });
        Ok(self)
    }

    /// True for a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.nodes, Nodes::Cluster(_))
    }

    /// True for `rediss://` (TLS).
    pub fn is_tls(&self) -> bool {
        match &self.nodes {
            Nodes::Standalone(url) => is_tls_url(url),
            Nodes::Cluster(urls) => urls.iter().all(|u| is_tls_url(u)),
        }
    }

    /// The client for one server, with this target's certificates.
    pub(super) fn client(&self, info: redis::ConnectionInfo) -> Result<redis::Client, RedisError> {
        let info = info.set_tcp_settings(tcp_settings());
        match &self.certs {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        }
    }

    /// A cluster client builder for the seeds, with this target's certificates.
    pub(super) fn cluster_builder(&self, urls: &[String]) -> ClusterClientBuilder {
        let builder = ClusterClientBuilder::new(urls.to_vec()).tcp_settings(tcp_settings());
        match &self.certs {
            Some(certs) => builder.certs(certs.clone()),
            None => builder,
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = match &self.nodes {
            Nodes::Standalone(url) => vec![redact(url)],
            Nodes::Cluster(urls) => urls.iter().map(|u| redact(u)).collect(),
        };
        f.debug_struct("Target")
            .field("cluster", &self.is_cluster())
            .field("urls", &urls)
            .field("certs", &self.certs)
            .finish()
    }
}

/// Every Redis connection's socket options: `TCP_NODELAY`, which redis-rs leaves off. With Nagle's
/// algorithm a command written while an earlier one is still unacknowledged waits for that ACK, and the
/// multiplexed connection pipelines the node's concurrent publishes.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

fn is_tls_url(url: &str) -> bool {
    url.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"))
}

/// `url` with its password (if any) replaced by `***`, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn read_file(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
}

/// The PEM file at `path`, checked to hold at least one certificate.
fn read_certificates(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    let pem = read_file(path, flag)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{flag} {}: not a PEM certificate file ({e})",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(pem)
}

/// The system's roots, PEM, followed by `extra`: redis-rs trusts only the roots it is given once any
/// are, and the CA file is meant to add to the system's roots, not replace them.
fn roots_with(extra: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut pem = Vec::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem.extend_from_slice(extra);
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_standalone_and_cluster_targets() {
        let t = Target::parse("redis://127.0.0.1:7000/0", false).unwrap();
        assert!(!t.is_cluster() && !t.is_tls());
        let t = Target::parse(
            "redis+cluster://127.0.0.1:7000,redis://127.0.0.1:7001",
            false,
        )
        .unwrap();
        match &t.nodes {
            Nodes::Cluster(urls) => {
                assert_eq!(urls, &["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"])
            }
            Nodes::Standalone(_) => panic!("{t:?}"),
        }
        assert!(Target::parse("redis://a:1,redis://b:2", true)
            .unwrap()
            .is_cluster());
        assert!(Target::parse("redis://a:1,redis://b:2", false).is_err());
        assert!(Target::parse("", false).is_err());
        assert!(Target::parse("http://x", false).is_err());
    }

    #[test]
    fn tls_targets_are_all_tls_and_take_certificates_only_with_tls() {
        let t = Target::parse("rediss+cluster://a:1,rediss://b:2", false).unwrap();
        assert!(t.is_cluster() && t.is_tls());
        assert!(Target::parse("REDISS://u:p@a:1", false).unwrap().is_tls());
        let mixed = Target::parse("rediss://a:1,redis://b:2", true).unwrap_err();
        assert!(mixed.contains("mixed"), "{mixed}");

        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let plain = Target::parse("redis://a:1", false).unwrap();
        let err = plain.with_tls(&files).unwrap_err();
        assert!(err.contains("rediss://"), "{err}");
        let tls = Target::parse("rediss://a:1", false).unwrap();
        let err = tls.clone().with_tls(&files).unwrap_err();
        assert!(
            err.contains("--redis-ca-file") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let half = TlsFiles {
            client_cert_file: Some("/nonexistent/cert.pem".into()),
            ..TlsFiles::default()
        };
        let err = tls.clone().with_tls(&half).unwrap_err();
        assert!(err.contains("go together"), "{err}");
        assert!(tls.with_tls(&TlsFiles::default()).unwrap().certs.is_none());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path =
            std::env::temp_dir().join(format!("lamplight-not-a-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let files = TlsFiles {
            ca_file: Some(path.clone()),
            ..TlsFiles::default()
        };
        let err = Target::parse("rediss://a:1", false)
            .unwrap()
            .with_tls(&files)
            .unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn the_ca_file_adds_to_the_system_roots() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let system = rustls_native_certs::load_native_certs().certs;
        let pem = roots_with(ca.pem().as_bytes());
        let roots: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(roots.len(), system.len() + 1);
        assert_eq!(
            roots[..system.len()],
            system[..],
            "the system's roots, re-encoded"
        );
        assert_eq!(roots.last().unwrap().as_ref(), ca.der().as_ref());
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("rediss://app:s3cret@redis.example:6380/0"),
            "rediss://app:***@redis.example:6380/0"
        );
        assert_eq!(redact("redis://:s3cret@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://h:1/0?x=a@b"), "redis://h:1/0?x=a@b");
        assert_eq!(redact("redis://app@h:1"), "redis://app@h:1");
        let t = Target::parse("rediss://app:s3cret@a:1,rediss://app:s3cret@b:2", true).unwrap();
        assert!(!format!("{t:?}").contains("s3cret"), "{t:?}");
        let err = Target::parse("redis://app:s3cret@h:notaport", false).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
