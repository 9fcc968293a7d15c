//! TLS on the one port (`--tls-cert-file`/`--tls-key-file`), with certificates made at run time: gRPC over
//! h2 and grpc-web over HTTP/1.1, chosen by ALPN; certificates reloaded from their files without dropping
//! open streams (a bad new pair is refused and the old one kept); optional and required client
//! certificates (mTLS) on top of JWTs; start-up refused for an unusable pair.
#[path = "support/tls.rs"]
mod tls_support;

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use lamplight::proto::v1::event_service_client::EventServiceClient;
use lamplight::proto::v1::PublishRequest;
use prost::Message as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tls_support::{CertPair, TempDir, TestCa};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const ROOM: &str = "tenant:t1:project:p1";

/// A TLS server for `localhost`/`127.0.0.1` whose certificate files live in `dir`.
struct Tls {
    dir: TempDir,
    ca: TestCa,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
}

impl Tls {
    fn new() -> Self {
        let dir = TempDir::new("tls");
        let ca = TestCa::new();
        let pair = ca.issue(&["localhost", "127.0.0.1"]);
        let cert_file = dir.write("cert.pem", &pair.cert_pem);
        let key_file = dir.write("key.pem", &pair.key_pem);
        Self {
            dir,
            ca,
            cert_file,
            key_file,
        }
    }

    fn configure(&self, c: &mut lamplight::Config) {
        c.tls.tls_cert_file = Some(self.cert_file.clone());
        c.tls.tls_key_file = Some(self.key_file.clone());
        c.tls.tls_reload_secs = 1;
    }

    /// Replaces the files in place, as a renewal does (write to a temporary file, rename over).
    fn install(&self, pair: &CertPair) {
        let tmp = self.dir.write("new.pem", &pair.cert_pem);
        std::fs::rename(tmp, &self.cert_file).unwrap();
        let tmp = self.dir.write("new.key", &pair.key_pem);
        std::fs::rename(tmp, &self.key_file).unwrap();
    }
}

/// A tonic client over TLS trusting `ca`, with an optional client certificate, sending `token`.
async fn tls_client(
    addr: SocketAddr,
    ca: &TestCa,
    identity: Option<&CertPair>,
    token: Option<&str>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert_pem, &pair.key_pem));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let header: Option<tonic::metadata::MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    Ok(EventServiceClient::with_interceptor(
        channel,
        Box::new(move |mut req: tonic::Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        }),
    ))
}

/// rustls client config trusting `ca`, offering `alpn`.
fn client_config(ca: &TestCa, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A raw TLS connection: the protocol ALPN chose and the server's leaf certificate.
async fn handshake(
    addr: SocketAddr,
    ca: &TestCa,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, alpn)));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake")
}

fn leaf_of(stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn grpc_over_h2_and_grpc_web_over_http1_on_one_tls_port() {
    let tls = Tls::new();
    let server = TestServer::start_with(|c| tls.configure(c)).await;

    // ALPN: h2 for gRPC clients and browsers, http/1.1 for those that ask for it.
    let h2 = handshake(server.addr, &tls.ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let h1 = handshake(server.addr, &tls.ca, &[b"http/1.1"]).await;
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop((h2, h1));

    // gRPC over TLS: subscribe, publish, receive.
    let mut user = tls_client(server.addr, &tls.ca, None, Some(&user_token("u1")))
        .await
        .expect("TLS channel");
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc = tls_client(server.addr, &tls.ca, None, Some(&publisher_token()))
        .await
        .unwrap();
    let id = publish_task(&mut svc, ROOM, "over-tls").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, id);

    // grpc-web over HTTP/1.1 over TLS, as a browser on an HTTP/1.1 connection sends it.
    let tls_stream = handshake(server.addr, &tls.ca, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls_stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let msg = PublishRequest {
        event: Some(task_event(ROOM, "over-grpc-web")),
        idempotency_key: String::new(),
    }
    .encode_to_vec();
    let mut body = BytesMut::from(&[0u8][..]);
    body.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&msg);
    let req = http::Request::post("/lamplight.v1.EventService/Publish")
        .header("host", "localhost")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {}", publisher_token()))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("grpc-status:0"), "{text:?}");
    assert_eq!(next_event(&mut stream).await.room, ROOM);

    // Plain HTTP/2 against the TLS port gets nowhere, even with a valid token.
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        Endpoint::from_shared(server.url()).unwrap().connect(),
    )
    .await
    .expect("plaintext connect answered in time");
    let plain = plain.map(|channel| {
        let header: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", publisher_token()).parse().unwrap();
        EventServiceClient::with_interceptor(
            channel,
            Box::new(move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            }) as Interceptor,
        )
    });
    refused_by_transport(plain, "plaintext gRPC on the TLS port").await;
}

type Interceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

/// The connection (or the first call on it, with a valid publisher token) failed in the transport, not
/// in authentication or policy: TLS refused it.
async fn refused_by_transport(client: Result<Client, tonic::transport::Error>, what: &str) {
    let mut client = match client {
        Err(_) => return,
        Ok(client) => client,
    };
    match publish_task(&mut client, ROOM, "must-not-arrive").await {
        Ok(id) => panic!("{what}: accepted (published {id})"),
        Err(status) => assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
            ),
            "{what}: refused by the service, not by TLS: {status:?}"
        ),
    }
}

#[tokio::test]
async fn renewed_certificates_are_served_without_dropping_streams_and_bad_ones_are_refused() {
    let tls = Tls::new();
    let server = TestServer::start_with(|c| tls.configure(c)).await;
    let first = der_of(&std::fs::read_to_string(&tls.cert_file).unwrap());
    assert_eq!(
        leaf_of(&handshake(server.addr, &tls.ca, &[b"h2"]).await),
        first
    );

    let mut user = tls_client(server.addr, &tls.ca, None, Some(&user_token("u1")))
        .await
        .unwrap();
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();

    // Renewal in place: new handshakes get the new certificate.
    let renewed = tls.ca.issue(&["localhost", "127.0.0.1"]);
    tls.install(&renewed);
    let second = der_of(&renewed.cert_pem);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if leaf_of(&handshake(server.addr, &tls.ca, &[b"h2"]).await) == second {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stream opened before the renewal is still up and delivering.
    let mut svc = tls_client(server.addr, &tls.ca, None, Some(&publisher_token()))
        .await
        .unwrap();
    let id = publish_task(&mut svc, ROOM, "after-renewal").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, id);

    // A broken renewal (the key of another certificate): refused, the second pair stays.
    let other = tls.ca.issue(&["localhost"]);
    let mismatched = CertPair {
        cert_pem: tls.ca.issue(&["localhost", "127.0.0.1"]).cert_pem,
        key_pem: other.key_pem,
    };
    tls.install(&mismatched);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        leaf_of(&handshake(server.addr, &tls.ca, &[b"h2"]).await),
        second
    );
    // Garbage too.
    std::fs::write(&tls.cert_file, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        leaf_of(&handshake(server.addr, &tls.ca, &[b"h2"]).await),
        second
    );
    let id = publish_task(&mut svc, ROOM, "after-bad-renewal")
        .await
        .unwrap();
    assert_eq!(next_event(&mut stream).await.id, id);
}

#[tokio::test]
async fn client_certificates_add_to_tokens() {
    let tls = Tls::new();
    let client_ca = TestCa::new();
    let client_ca_file = tls.dir.write("client-ca.pem", &client_ca.cert_pem());
    let service_cert = client_ca.issue(&["billing.internal"]);
    let stranger_cert = TestCa::new().issue(&["billing.internal"]);

    // Optional: calls without a certificate work; a certificate must chain to the CA.
    let optional = TestServer::start_with(|c| {
        tls.configure(c);
        c.tls.tls_client_ca_file = Some(client_ca_file.clone());
    })
    .await;
    let mut anon = tls_client(optional.addr, &tls.ca, None, Some(&user_token("u1")))
        .await
        .unwrap();
    subscribe(&mut anon, &[ROOM], &[])
        .await
        .expect("no client certificate is fine");
    let stranger = tls_client(
        optional.addr,
        &tls.ca,
        Some(&stranger_cert),
        Some(&publisher_token()),
    )
    .await;
    refused_by_transport(stranger, "a client certificate from another CA").await;
    // A certificate of the configured CA is accepted.
    let mut known = tls_client(
        optional.addr,
        &tls.ca,
        Some(&service_cert),
        Some(&publisher_token()),
    )
    .await
    .unwrap();
    publish_task(&mut known, ROOM, "known-certificate")
        .await
        .expect("a certificate of the client CA is accepted when optional");

    // Required: no certificate, no connection; a good certificate still needs a token.
    let required = TestServer::start_with(|c| {
        tls.configure(c);
        c.tls.tls_client_ca_file = Some(client_ca_file.clone());
        c.tls.tls_client_cert_required = true;
    })
    .await;
    refused_by_transport(
        tls_client(required.addr, &tls.ca, None, Some(&publisher_token())).await,
        "no client certificate where one is required",
    )
    .await;
    let mut no_token = tls_client(required.addr, &tls.ca, Some(&service_cert), None)
        .await
        .unwrap();
    expect_status(
        publish_task(&mut no_token, ROOM, "x").await,
        Code::Unauthenticated,
        &["authorization"],
    );
    let mut svc = tls_client(
        required.addr,
        &tls.ca,
        Some(&service_cert),
        Some(&publisher_token()),
    )
    .await
    .unwrap();
    publish_task(&mut svc, ROOM, "with-both")
        .await
        .expect("certificate and token");
}

/// A change to a server's configuration.
type Tweak<'a> = Box<dyn Fn(&mut lamplight::Config) + 'a>;

#[tokio::test]
async fn no_start_with_an_unusable_certificate() {
    let tls = Tls::new();
    let cases: Vec<(Tweak, &str)> = vec![
        (
            Box::new(|c| c.tls.tls_cert_file = Some(tls.dir.0.join("missing.pem"))),
            "missing.pem",
        ),
        (
            Box::new(|c| c.tls.tls_key_file = Some(tls.dir.write("bad.key", "garbage"))),
            "key PEM",
        ),
        (
            Box::new(|c| {
                let other = tls.ca.issue(&["localhost"]);
                c.tls.tls_key_file = Some(tls.dir.write("other.key", &other.key_pem));
            }),
            "keys may not be consistent",
        ),
    ];
    for (tweak, needle) in cases {
        let mut config = test_config();
        tls.configure(&mut config);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = lamplight::serve(listener, config, Default::default())
            .await
            .expect_err("an unusable pair must stop the start");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[tokio::test]
async fn the_rust_client_and_the_cli_speak_https_with_a_ca_file() {
    use futures::StreamExt as _;
    use lamplight::client::{Client, ClientConfig, SubscriptionEvent};

    let tls = Tls::new();
    let server = TestServer::start_with(|c| tls.configure(c)).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let config = ClientConfig {
        ca_certificate_pem: Some(tls.ca.cert_pem()),
        ..ClientConfig::default()
    };
    let client = Client::with_config(url.clone(), user_token("u1"), config)
        .await
        .unwrap();
    let mut events = client.subscribe([ROOM]);
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(SubscriptionEvent::Connected { .. }))) => {}
        other => panic!("expected Connected over TLS, got {other:?}"),
    }

    // The CLI publishes over HTTPS with --ca-file; without it the private CA is not trusted.
    let ca_file = tls.dir.write("cli-ca.pem", &tls.ca.cert_pem());
    let cli = |ca: Option<&std::path::Path>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lamplight"));
        cmd.args([
            "publish",
            "--addr",
            &url,
            "--room",
            ROOM,
            "--type",
            "task.created",
        ])
        .args(["--task-json", r#"{"id":"from-cli"}"#, "--timeout-secs", "3"])
        .args(["--jwt-secret", SECRET])
        .env_remove("LAMPLIGHT_CA_FILE");
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.output()
    };
    let out = cli(Some(&ca_file)).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(SubscriptionEvent::Event(e)))) => assert_eq!(e.id, id),
        other => panic!("expected the CLI's event, got {other:?}"),
    }
    let out = cli(None).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an untrusted certificate must fail");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
}
