//! `--jwt-jwks-url` against a local HTTPS identity provider (certificates and signing keys made at run
//! time): keys rotated mid-test are accepted without a restart, a removed key is refused, a failing IdP
//! keeps the last good set, unknown `kid`s cannot make lamplight hammer it, `Cache-Control` drives
//! refreshes, and a server with no reachable key set refuses to start.
#[path = "support/tls.rs"]
mod tls_support;

mod support;

use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use support::*;
use tls_support::{Answer, HttpsServer, TempDir, TestCa};
use tonic::Code;

/// An ES256 signing key of the "identity provider", with its `kid`.
struct SigningKey {
    kid: String,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: rcgen::KeyPair::generate().expect("P-256 key"),
        }
    }

    /// The public key as a JWK.
    fn jwk(&self) -> serde_json::Value {
        // Uncompressed point: 0x04 || x || y.
        let point = self.pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        })
    }

    /// A user token of tenant t1 signed with this key.
    fn token(&self, sub: &str) -> String {
        let key = EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).expect("PKCS#8");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &user_claims(sub), &key).expect("sign")
    }
}

fn jwks(keys: &[&SigningKey]) -> Answer {
    Answer {
        status: 200,
        cache_control: Some("public, max-age=3600".into()),
        body: serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
            .to_string(),
    }
}

/// A server trusting only the IdP at `url` (no HS256 secret).
async fn server_with_jwks(
    url: String,
    ca_file: std::path::PathBuf,
    refetch_secs: u64,
) -> TestServer {
    TestServer::start_with(move |c| {
        c.jwt.jwt_secret = None;
        c.jwt.jwt_jwks_url = Some(url);
        c.jwt.jwt_jwks_ca_file = Some(ca_file);
        c.jwt.jwt_jwks_refetch_secs = refetch_secs;
        c.jwt.jwt_jwks_min_ttl_secs = 1;
    })
    .await
}

async fn try_subscribe(server: &TestServer, token: &str) -> Result<(), tonic::Status> {
    let mut client = server.client(token).await;
    subscribe(&mut client, &["tenant:t1"], &[])
        .await
        .map(|_| ())
}

#[tokio::test]
async fn rotated_keys_work_without_restart_and_removed_keys_are_refused() {
    let dir = TempDir::new("jwks");
    let ca = TestCa::new();
    let ca_file = dir.write("ca.pem", &ca.cert_pem());
    let (a, b, c) = (
        SigningKey::new("key-a"),
        SigningKey::new("key-b"),
        SigningKey::new("key-c"),
    );
    let idp = HttpsServer::start(&ca.issue(&["127.0.0.1"]), jwks(&[&a])).await;
    let server = server_with_jwks(idp.url("/.well-known/jwks.json"), ca_file, 1).await;

    try_subscribe(&server, &a.token("u1"))
        .await
        .expect("key A is in the set");
    // Keys stay pinned to their alg: key A's kid on an HS256 token (signed with anything) is refused.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("key-a".into());
    let forged = jsonwebtoken::encode(
        &header,
        &user_claims("u1"),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    expect_status(
        try_subscribe(&server, &forged).await,
        Code::Unauthenticated,
        &["HS256", "key-a"],
    );
    // The HS256 development secret is not accepted when a key source is configured.
    expect_status(
        try_subscribe(&server, &user_token("u1")).await,
        Code::Unauthenticated,
        &["HS256"],
    );

    // The IdP rotates A out and B in: B works at once (unknown kid -> refetch), A no longer does.
    idp.set(jwks(&[&b]));
    try_subscribe(&server, &b.token("u1"))
        .await
        .expect("a token signed with the new key is accepted without restart");
    expect_status(
        try_subscribe(&server, &a.token("u1")).await,
        Code::Unauthenticated,
        &["key-a"],
    );

    // The IdP fails: the last good set (B) is kept; a new kid is refused, not trusted.
    idp.set(Answer {
        status: 500,
        cache_control: None,
        body: "oops".into(),
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = idp.request_count();
    expect_status(
        try_subscribe(&server, &c.token("u1")).await,
        Code::Unauthenticated,
        &["key-c"],
    );
    assert!(
        idp.request_count() > before,
        "an unknown kid triggers a refetch"
    );
    try_subscribe(&server, &b.token("u1"))
        .await
        .expect("the last good key set is kept when a refetch fails");

    // A burst of made-up kids costs at most one fetch per --jwt-jwks-refetch-secs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = idp.request_count();
    for i in 0..20 {
        let forged = SigningKey::new(&format!("made-up-{i}"));
        let _ = try_subscribe(&server, &forged.token("u1")).await;
    }
    let fetches = idp.request_count() - before;
    assert!(
        (1..=3).contains(&fetches),
        "{fetches} fetches for 20 unknown kids"
    );
}

#[tokio::test]
async fn the_key_set_is_refreshed_when_its_max_age_runs_out() {
    let dir = TempDir::new("jwks");
    let ca = TestCa::new();
    let ca_file = dir.write("ca.pem", &ca.cert_pem());
    let (a, b) = (SigningKey::new("key-a"), SigningKey::new("key-b"));
    let mut answer = jwks(&[&a]);
    answer.cache_control = Some("max-age=1".into());
    let idp = HttpsServer::start(&ca.issue(&["127.0.0.1"]), answer).await;
    // Refetches for unknown kids are off (an hour apart): only the cache lifetime can bring B in.
    let server = server_with_jwks(idp.url("/jwks"), ca_file, 3600).await;
    try_subscribe(&server, &a.token("u1")).await.expect("key A");

    let mut answer = jwks(&[&b]);
    answer.cache_control = Some("max-age=1".into());
    idp.set(answer);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match try_subscribe(&server, &b.token("u1")).await {
            Ok(()) => break,
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("key B never arrived with max-age=1: {status:?}"),
        }
    }
}

#[tokio::test]
async fn no_start_without_a_reachable_key_set() {
    let dir = TempDir::new("jwks");
    let ca = TestCa::new();
    let ca_file = dir.write("ca.pem", &ca.cert_pem());
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut config = test_config();
    config.jwt.jwt_secret = None;
    config.jwt.jwt_jwks_url = Some(format!("https://127.0.0.1:{port}/jwks"));
    config.jwt.jwt_jwks_ca_file = Some(ca_file.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        lamplight::serve(listener, config, Default::default()),
    )
    .await
    .expect("serve gives up within the fetch timeout");
    let err = result
        .expect_err("no key at all: the server must not start")
        .to_string();
    assert!(err.contains("--jwt-jwks-url"), "{err}");

    // An IdP whose certificate is not signed by a trusted CA is just as unreachable.
    let other_ca = TestCa::new();
    let idp = HttpsServer::start(
        &other_ca.issue(&["127.0.0.1"]),
        jwks(&[&SigningKey::new("k")]),
    )
    .await;
    let mut config = test_config();
    config.jwt.jwt_secret = None;
    config.jwt.jwt_jwks_url = Some(idp.url("/jwks"));
    config.jwt.jwt_jwks_ca_file = Some(ca_file);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = lamplight::serve(listener, config, Default::default())
        .await
        .expect_err("untrusted certificate");
    assert!(err.to_string().contains("--jwt-jwks-url"), "{err}");

    // Plain http:// is refused outright.
    let mut config = test_config();
    config.jwt.jwt_jwks_url = Some(format!("http://127.0.0.1:{port}/jwks"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = lamplight::serve(listener, config, Default::default())
        .await
        .expect_err("http:// URL");
    assert!(err.to_string().contains("https://"), "{err}");
}

/// Tokens signed for a configured HS256 secret still work next to an unreachable JWKS URL.
#[tokio::test]
async fn another_key_makes_an_unreachable_idp_a_warning() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = TestServer::start_with(move |c| {
        c.jwt.jwt_jwks_url = Some(format!("https://127.0.0.1:{port}/jwks"));
        c.jwt.jwt_jwks_timeout_ms = 500;
    })
    .await;
    let token = user_token("u1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_subscribe(&server, &token).await {
            Ok(()) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(status) => panic!("HS256 token refused: {status:?}"),
        }
    }
}
