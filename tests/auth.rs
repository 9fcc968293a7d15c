//! Authentication over real gRPC calls: every way a token can be refused (UNAUTHENTICATED, with a message
//! naming the failure), and tokens signed with each supported key kind (HS256 secret, RS256 / ES256 / EdDSA
//! PEM, JWKS by `kid`). Key fixtures are in `tests/keys/` (test-only).
mod support;

use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lamplight::auth::{mint_hs256, DevToken};
use lamplight::proto::v1::{
    GetPresenceRequest, PublishRequest, SetTypingRequest, SubscribeRequest,
};
use support::*;
use tonic::Code;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "lamplight-test";

/// Claims of an internal service: if authentication wrongly let such a token through, both Subscribe and
/// Publish would succeed, so a refusal can only come from authentication.
fn publisher_claims() -> DevToken {
    DevToken {
        sub: "svc".into(),
        roles: vec!["publisher".into()],
        iat: now(),
        exp: now() + 3600,
        ..DevToken::default()
    }
}

fn read_key(name: &str) -> Vec<u8> {
    let path = key_file(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read key fixture {}: {e}", path.display()))
}

/// Signs `claims` with the PEM private key `file` using `alg`, with an optional `kid`.
fn sign_with(file: &str, alg: Algorithm, kid: Option<&str>, claims: &DevToken) -> String {
    let pem = read_key(file);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no PEM signer for {other:?}"),
    }
    .expect("private key fixture");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// A server that accepts only the PEM public key `file` (no HS256 secret).
async fn pem_server(file: &str) -> TestServer {
    let path = key_file(file);
    TestServer::start_with(move |c| {
        c.jwt.jwt_secret = None;
        c.jwt.jwt_public_key_file = Some(path);
    })
    .await
}

fn subscribe_request() -> SubscribeRequest {
    SubscribeRequest {
        rooms: vec!["tenant:t1".into()],
        since: Default::default(),
    }
}

fn publish_request() -> PublishRequest {
    PublishRequest {
        event: Some(task_event("tenant:t1", "task-1")),
        idempotency_key: String::new(),
    }
}

/// Subscribe and Publish with this `authorization` metadata (None: none) both fail with UNAUTHENTICATED
/// and a message containing every one of `needles`.
async fn assert_refused(server: &TestServer, authorization: Option<&str>, needles: &[&str]) {
    let mut client = server.client_with_authorization(authorization).await;
    let subscribed = client.subscribe(subscribe_request()).await.map(|_| ());
    expect_status(subscribed, Code::Unauthenticated, needles);
    let published = client.publish(publish_request()).await.map(|_| ());
    expect_status(published, Code::Unauthenticated, needles);
}

async fn assert_token_refused(server: &TestServer, token: &str, needles: &[&str]) {
    assert_refused(server, Some(&format!("Bearer {token}")), needles).await;
}

/// A user token and a publisher token both work: the user subscribes to a project room (not the tenant
/// room, where its own ONLINE status would arrive first), the publisher publishes there, and the user
/// receives the event.
async fn assert_round_trip(server: &TestServer, user: &str, publisher: &str) {
    let room = "tenant:t1:project:p1";
    let mut user = server.client(user).await;
    let (mut stream, _) = subscribe(&mut user, &[room], &[])
        .await
        .expect("user token accepted");
    let mut svc = server.client(publisher).await;
    let id = publish_task(&mut svc, room, "task-rt")
        .await
        .expect("publisher token accepted");
    let event = next_event(&mut stream).await;
    assert_eq!(event.id, id);
    assert_eq!(event.publisher_id, "svc");
}

#[tokio::test]
async fn no_metadata_is_refused_on_every_call() {
    let server = TestServer::start().await;
    assert_refused(&server, None, &["missing authorization metadata"]).await;
    let mut client = server.client_with_authorization(None).await;
    let typing = client
        .set_typing(SetTypingRequest {
            channel_room: "tenant:t1:channel:c1".into(),
            is_typing: true,
        })
        .await;
    expect_status(typing, Code::Unauthenticated, &["missing authorization"]);
    let presence = client
        .get_presence(GetPresenceRequest {
            room: "tenant:t1".into(),
            ..Default::default()
        })
        .await;
    expect_status(presence, Code::Unauthenticated, &["missing authorization"]);
}

#[tokio::test]
async fn basic_scheme_is_refused() {
    let server = TestServer::start().await;
    assert_refused(&server, Some("Basic xyz"), &["malformed token", "Bearer"]).await;
    // Even with a valid JWT behind it.
    let token = sign(&publisher_claims());
    assert_refused(
        &server,
        Some(&format!("Basic {token}")),
        &["malformed token", "Bearer"],
    )
    .await;
}

#[tokio::test]
async fn bearer_without_token_is_refused() {
    let server = TestServer::start().await;
    assert_refused(&server, Some("Bearer"), &["malformed token"]).await;
}

#[tokio::test]
async fn garbage_token_is_refused() {
    let server = TestServer::start().await;
    assert_token_refused(&server, "not-a-jwt", &["malformed token", "not a JWT"]).await;
    assert_token_refused(&server, "a.b.c", &["malformed token"]).await;
}

#[tokio::test]
async fn wrong_secret_is_refused() {
    let server = TestServer::start().await;
    let token = mint_hs256(b"some-other-secret", &publisher_claims()).unwrap();
    assert_token_refused(&server, &token, &["bad token signature"]).await;
}

#[tokio::test]
async fn tampered_claims_are_refused() {
    let server = TestServer::start().await;
    let user = user_token("u1");
    // Same header and signature, claims swapped for a publisher's.
    let forged_claims = sign(&publisher_claims());
    let mut parts: Vec<&str> = user.split('.').collect();
    parts[1] = forged_claims.split('.').nth(1).unwrap();
    assert_token_refused(&server, &parts.join("."), &["bad token signature"]).await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let server = TestServer::start().await;
    let mut claims = publisher_claims();
    claims.iat = now() - 120;
    claims.exp = now() - 5;
    assert_token_refused(&server, &sign(&claims), &["token expired"]).await;
}

#[tokio::test]
async fn token_without_exp_is_refused() {
    let server = TestServer::start().await;
    let token = mint_hs256(
        SECRET.as_bytes(),
        &serde_json::json!({"sub": "svc", "roles": ["publisher"]}),
    )
    .unwrap();
    assert_token_refused(&server, &token, &["invalid token claims", "exp"]).await;
}

#[tokio::test]
async fn token_not_yet_valid_is_refused() {
    let server = TestServer::start().await;
    let token = mint_hs256(
        SECRET.as_bytes(),
        &serde_json::json!({"sub": "svc", "roles": ["publisher"], "exp": now() + 3600, "nbf": now() + 600}),
    )
    .unwrap();
    assert_token_refused(&server, &token, &["not yet valid"]).await;
}

async fn iss_aud_server() -> TestServer {
    TestServer::start_with(|c| {
        c.jwt.jwt_issuer = Some(ISSUER.into());
        c.jwt.jwt_audience = Some(AUDIENCE.into());
    })
    .await
}

fn with_iss_aud(mut claims: DevToken, iss: &str, aud: &str) -> DevToken {
    claims.iss = Some(iss.into());
    claims.aud = Some(aud.into());
    claims
}

#[tokio::test]
async fn wrong_issuer_is_refused() {
    let server = iss_aud_server().await;
    let token = sign(&with_iss_aud(
        publisher_claims(),
        "https://evil.test",
        AUDIENCE,
    ));
    assert_token_refused(&server, &token, &["wrong token issuer"]).await;
}

#[tokio::test]
async fn missing_issuer_is_refused_when_one_is_required() {
    let server = iss_aud_server().await;
    let mut claims = publisher_claims();
    claims.aud = Some(AUDIENCE.into());
    assert_token_refused(&server, &sign(&claims), &["invalid token claims", "iss"]).await;
}

#[tokio::test]
async fn missing_audience_is_refused_when_one_is_required() {
    let server = iss_aud_server().await;
    let mut claims = publisher_claims();
    claims.iss = Some(ISSUER.into());
    assert_token_refused(&server, &sign(&claims), &["invalid token claims", "aud"]).await;
}

#[tokio::test]
async fn wrong_audience_is_refused() {
    let server = iss_aud_server().await;
    let token = sign(&with_iss_aud(publisher_claims(), ISSUER, "another-service"));
    assert_token_refused(&server, &token, &["wrong token audience"]).await;
}

#[tokio::test]
async fn right_issuer_and_audience_pass() {
    let server = iss_aud_server().await;
    let user = sign(&with_iss_aud(user_claims("u1"), ISSUER, AUDIENCE));
    let publisher = sign(&with_iss_aud(publisher_claims(), ISSUER, AUDIENCE));
    assert_round_trip(&server, &user, &publisher).await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    let server = TestServer::start().await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = b64.encode(serde_json::to_vec(&publisher_claims()).unwrap());
    let token = format!("{header}.{claims}.");
    assert_token_refused(&server, &token, &["algorithm none is not accepted"]).await;
}

#[tokio::test]
async fn hs256_is_refused_when_only_rs256_is_configured() {
    let server = pem_server("rsa_public.pem").await;
    let token = sign(&publisher_claims());
    assert_token_refused(&server, &token, &["algorithm HS256 is not accepted"]).await;
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic key-confusion attack: the public PEM used as an HMAC secret.
    let public_pem = read_key("rsa_public.pem");
    let token = mint_hs256(&public_pem, &publisher_claims()).unwrap();
    let server = pem_server("rsa_public.pem").await;
    assert_token_refused(&server, &token, &["algorithm HS256 is not accepted"]).await;

    // With an HS256 secret configured too, HS256 tokens are checked against that secret only.
    let path = key_file("rsa_public.pem");
    let both = TestServer::start_with(move |c| c.jwt.jwt_public_key_file = Some(path)).await;
    assert_token_refused(&both, &token, &["bad token signature"]).await;
}

#[tokio::test]
async fn rs256_token_is_refused_by_an_hs256_server() {
    let server = TestServer::start().await;
    let token = sign_with(
        "rsa_private.pem",
        Algorithm::RS256,
        None,
        &publisher_claims(),
    );
    assert_token_refused(&server, &token, &["algorithm RS256 is not accepted"]).await;
}

#[tokio::test]
async fn rs256_pem_token_passes() {
    let server = pem_server("rsa_public.pem").await;
    let user = sign_with(
        "rsa_private.pem",
        Algorithm::RS256,
        None,
        &user_claims("u1"),
    );
    let publisher = sign_with(
        "rsa_private.pem",
        Algorithm::RS256,
        None,
        &publisher_claims(),
    );
    assert_round_trip(&server, &user, &publisher).await;
}

#[tokio::test]
async fn rs256_signed_by_another_key_is_refused() {
    let server = pem_server("rsa_public.pem").await;
    let token = sign_with(
        "rsa2_private.pem",
        Algorithm::RS256,
        None,
        &publisher_claims(),
    );
    assert_token_refused(&server, &token, &["bad token signature"]).await;
}

#[tokio::test]
async fn es256_pem_token_passes() {
    let server = pem_server("ec_public.pem").await;
    let user = sign_with("ec_private.pem", Algorithm::ES256, None, &user_claims("u1"));
    let publisher = sign_with(
        "ec_private.pem",
        Algorithm::ES256,
        None,
        &publisher_claims(),
    );
    assert_round_trip(&server, &user, &publisher).await;
    // The same server does not take RS256 or HS256.
    let rs = sign_with(
        "rsa_private.pem",
        Algorithm::RS256,
        None,
        &publisher_claims(),
    );
    assert_token_refused(&server, &rs, &["algorithm RS256 is not accepted"]).await;
}

#[tokio::test]
async fn eddsa_pem_token_passes() {
    let server = pem_server("ed_public.pem").await;
    let user = sign_with("ed_private.pem", Algorithm::EdDSA, None, &user_claims("u1"));
    let publisher = sign_with(
        "ed_private.pem",
        Algorithm::EdDSA,
        None,
        &publisher_claims(),
    );
    assert_round_trip(&server, &user, &publisher).await;
    let hs = sign(&publisher_claims());
    assert_token_refused(&server, &hs, &["algorithm HS256 is not accepted"]).await;
}

/// A JWKS file with `rsa2_private.pem` as kid `rsa-2` and `ec_private.pem` as kid `ec-1`, written to
/// cargo's per-target temp dir.
fn write_jwks() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let jwk = |file: &str, alg: Algorithm, kid: &str| {
        let pem = read_key(file);
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, alg).expect("public JWK from the private key");
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    let set = JwkSet {
        keys: vec![
            jwk("rsa2_private.pem", Algorithm::RS256, "rsa-2"),
            jwk("ec_private.pem", Algorithm::ES256, "ec-1"),
        ],
    };
    let json = serde_json::to_string_pretty(&set).unwrap();
    // A public key set: no private parameters may leak into it.
    for private in ["\"d\"", "\"p\"", "\"q\""] {
        assert!(
            !json.contains(private),
            "JWKS holds a private parameter: {json}"
        );
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "auth-jwks-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, json).unwrap();
    path
}

async fn jwks_server() -> TestServer {
    let path = write_jwks();
    TestServer::start_with(move |c| {
        c.jwt.jwt_secret = None;
        c.jwt.jwt_jwks_file = Some(path);
    })
    .await
}

#[tokio::test]
async fn jwks_picks_the_key_by_kid() {
    let server = jwks_server().await;
    // One key per token kind, so both keys of the set are used.
    let user = sign_with(
        "rsa2_private.pem",
        Algorithm::RS256,
        Some("rsa-2"),
        &user_claims("u1"),
    );
    let publisher = sign_with(
        "ec_private.pem",
        Algorithm::ES256,
        Some("ec-1"),
        &publisher_claims(),
    );
    assert_round_trip(&server, &user, &publisher).await;
    // And the other way round.
    let user = sign_with(
        "ec_private.pem",
        Algorithm::ES256,
        Some("ec-1"),
        &user_claims("u1"),
    );
    let publisher = sign_with(
        "rsa2_private.pem",
        Algorithm::RS256,
        Some("rsa-2"),
        &publisher_claims(),
    );
    assert_round_trip(&server, &user, &publisher).await;
}

#[tokio::test]
async fn jwks_unknown_kid_is_refused() {
    let server = jwks_server().await;
    let token = sign_with(
        "rsa2_private.pem",
        Algorithm::RS256,
        Some("rotated-away"),
        &publisher_claims(),
    );
    assert_token_refused(&server, &token, &["unknown token key id", "rotated-away"]).await;
}

#[tokio::test]
async fn jwks_kid_of_another_key_is_refused() {
    let server = jwks_server().await;
    // Signed by a key that is not in the set, claiming the kid of one that is.
    let token = sign_with(
        "rsa_private.pem",
        Algorithm::RS256,
        Some("rsa-2"),
        &publisher_claims(),
    );
    assert_token_refused(&server, &token, &["bad token signature"]).await;
    // The kid of an ES256 key with an RS256 signature: the key's algorithm wins.
    let token = sign_with(
        "rsa2_private.pem",
        Algorithm::RS256,
        Some("ec-1"),
        &publisher_claims(),
    );
    assert_token_refused(
        &server,
        &token,
        &["algorithm RS256", "not accepted", "ec-1"],
    )
    .await;
}
