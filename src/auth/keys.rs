//! Verification keys: an HS256 secret, a PEM public key (RS256, ES256 or EdDSA), the keys of a JWKS file
//! and those of a JWKS URL ([`super::jwks`]), each pinned to one algorithm so a token can never choose how
//! it is checked (no `none`, no HS256 signed with a public key).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::AuthError;
use crate::config::JwtConfig;

/// A key source that could not be loaded. Start-up fails with this message.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM file holds no RSA, EC P-256 or Ed25519 public key.
    #[error("{0}: not an RSA, EC (P-256) or Ed25519 public key in PEM format")]
    Pem(PathBuf),
    /// The JWKS file is not a valid key set.
    #[error("{path}: invalid JWKS: {reason}")]
    Jwks {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An empty HS256 secret.
    #[error("the JWT secret is empty")]
    EmptySecret,
    /// `--jwt-jwks-url` could not be used at start-up.
    #[error("--jwt-jwks-url {url}: {reason}")]
    JwksUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// One key, pinned to the algorithm it verifies.
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) alg: Algorithm,
    pub(super) key: DecodingKey,
}

/// The configured keys: those loaded once at start (secret, PEM, JWKS file) and, with `--jwt-jwks-url`,
/// the identity provider's current set.
pub(super) struct KeySet {
    keys: Vec<Arc<Key>>,
    remote: Option<Arc<super::jwks::RemoteJwks>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.kid.as_deref(), k.alg)))
            .finish()
    }
}

impl KeySet {
    /// The keys of `config`'s files and secret (not its JWKS URL: see [`Self::with_remote`]).
    pub(super) fn load(config: &JwtConfig) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let secret = config.hs256_secret().map_err(|source| KeyError::Read {
            path: config.jwt_secret_file.clone().unwrap_or_default(),
            source,
        })?;
        if let Some(secret) = secret {
            if secret.is_empty() {
                return Err(KeyError::EmptySecret);
            }
            keys.push(Arc::new(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }));
        }
        if let Some(path) = &config.jwt_public_key_file {
            keys.push(Arc::new(load_pem(path)?));
        }
        if let Some(path) = &config.jwt_jwks_file {
            keys.extend(load_jwks(path)?.into_iter().map(Arc::new));
        }
        Ok(Self { keys, remote: None })
    }

    /// Adds the keys of a JWKS URL, kept current by [`super::jwks::RemoteJwks`].
    pub(super) fn with_remote(mut self, remote: Arc<super::jwks::RemoteJwks>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// The JWKS URL's keys, if one is configured.
    pub(super) fn remote(&self) -> Option<&Arc<super::jwks::RemoteJwks>> {
        self.remote.as_ref()
    }

    /// True when no key at all is configured (e.g. a JWKS URL that could not be fetched yet).
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.remote.as_ref().is_none_or(|r| r.current().is_empty())
    }

    /// The key for a token header: by `kid` when a JWKS has it, else the key pinned to `alg`.
    pub(super) fn select(&self, alg: Algorithm, kid: Option<&str>) -> Result<Arc<Key>, AuthError> {
        let remote = self.remote.as_ref().map(|r| r.current());
        let all = || {
            self.keys
                .iter()
                .chain(remote.iter().flat_map(|keys| keys.iter()))
        };
        if let Some(kid) = kid {
            if let Some(key) = all().find(|k| k.kid.as_deref() == Some(kid)) {
                return if key.alg == alg {
                    Ok(key.clone())
                } else {
                    Err(AuthError::AlgorithmNotAllowed(format!(
                        "{alg:?} (key {kid:?} is {:?})",
                        key.alg
                    )))
                };
            }
        }
        match all().find(|k| k.kid.is_none() && k.alg == alg) {
            Some(key) => Ok(key.clone()),
            None => match kid {
                Some(kid) if self.remote.is_some() || all().any(|k| k.kid.is_some()) => {
                    Err(AuthError::UnknownKeyId(kid.to_owned()))
                }
                _ => Err(AuthError::AlgorithmNotAllowed(format!("{alg:?}"))),
            },
        }
    }
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load_pem(path: &Path) -> Result<Key, KeyError> {
    let pem = read(path)?;
    let bytes = pem.as_bytes();
    let (alg, key) = if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        (Algorithm::RS256, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        (Algorithm::ES256, key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        (Algorithm::EdDSA, key)
    } else {
        return Err(KeyError::Pem(path.to_owned()));
    };
    Ok(Key {
        kid: None,
        alg,
        key,
    })
}

fn load_jwks(path: &Path) -> Result<Vec<Key>, KeyError> {
    let invalid = |reason: String| KeyError::Jwks {
        path: path.to_owned(),
        reason,
    };
    let set: JwkSet = serde_json::from_str(&read(path)?).map_err(|e| invalid(e.to_string()))?;
    // A file is the operator's own: any key it cannot use is a mistake to report at start.
    set.keys
        .iter()
        .map(|jwk| jwk_key(jwk).map_err(invalid))
        .collect()
}

/// One key of a JWK set, pinned to the algorithm its `alg` (or key type) names. It needs a `kid`.
pub(super) fn jwk_key(jwk: &Jwk) -> Result<Key, String> {
    let kid = jwk
        .common
        .key_id
        .clone()
        .ok_or_else(|| "every key needs a kid".to_owned())?;
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (_, Some(KeyAlgorithm::RS256)) | (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (_, Some(KeyAlgorithm::ES256)) | (AlgorithmParameters::EllipticCurve(_), None) => {
            Algorithm::ES256
        }
        (_, Some(KeyAlgorithm::EdDSA)) | (AlgorithmParameters::OctetKeyPair(_), None) => {
            Algorithm::EdDSA
        }
        (_, other) => {
            return Err(format!(
                "key {kid:?}: algorithm {other:?} is not supported (RS256, ES256, EdDSA)"
            ))
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
    Ok(Key {
        kid: Some(kid),
        alg,
        key,
    })
}
