//! Limits on connections and streams, tried as an attacker with a valid token would: streams per HTTP/2
//! connection, streams per user, connections per node, and the timeouts that close connections which send
//! nothing, half a request, or stop answering PINGs.
mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";

/// Retries `attempt` every 100 ms until it returns `Some`, failing the test after `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn streams_per_connection_are_capped_and_the_excess_waits_for_a_free_slot() {
    let server = TestServer::start_with(|c| c.max_streams_per_connection = 3).await;
    // One client = one connection.
    let mut client = server.client(&user_token("u1")).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (stream, _) = subscribe(&mut client, &[PROJECT], &[]).await.unwrap();
        open.push(stream);
    }
    let fourth = tokio::spawn(async move { subscribe(&mut client, &[PROJECT], &[]).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !fourth.is_finished(),
        "a fourth stream opened on a connection limited to 3 (SETTINGS_MAX_CONCURRENT_STREAMS not sent?)"
    );
    open.pop();
    let opened = tokio::time::timeout(Duration::from_secs(10), fourth)
        .await
        .expect("the fourth stream opens once one of the three closed")
        .unwrap();
    assert!(opened.is_ok(), "{:?}", opened.err());
}

#[tokio::test]
async fn streams_per_user_are_capped_across_connections_and_released_when_they_end() {
    let server = TestServer::start_with(|c| c.max_streams_per_user = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        // A new connection each time: the limit is per user, not per connection.
        let mut client = server.client(&user_token("u1")).await;
        let (stream, _) = subscribe(&mut client, &[PROJECT], &[]).await.unwrap();
        held.push((client, stream));
    }
    let mut fourth = server.client(&user_token("u1")).await;
    let refused = expect_status(
        subscribe(&mut fourth, &[PROJECT], &[]).await,
        Code::ResourceExhausted,
        &["3", "--max-streams-per-user"],
    );
    assert!(refused.message().contains("u1"), "{refused:?}");

    // Another user of the same tenant is not affected.
    let mut other = server.client(&user_token("u2")).await;
    subscribe(&mut other, &[PROJECT], &[]).await.unwrap();

    // Services are counted by `sub` too.
    let mut services = Vec::new();
    for _ in 0..3 {
        let mut svc = server.client(&publisher_token()).await;
        let (stream, _) = subscribe(&mut svc, &[PROJECT], &[]).await.unwrap();
        services.push((svc, stream));
    }
    let mut svc = server.client(&publisher_token()).await;
    expect_status(
        subscribe(&mut svc, &[PROJECT], &[]).await,
        Code::ResourceExhausted,
        &["--max-streams-per-user"],
    );

    // Closing one (the client goes away) gives the slot back.
    held.pop();
    drop(fourth);
    eventually(10, "u1's slot is given back", || async {
        let mut client = server.client(&user_token("u1")).await;
        subscribe(&mut client, &[PROJECT], &[]).await.ok()
    })
    .await;
}

#[tokio::test]
async fn a_stream_ended_by_the_server_gives_its_slot_back() {
    let server = TestServer::start_with(|c| c.max_streams_per_user = 1).await;
    let mut claims = user_claims("u1");
    claims.exp = now() + 2;
    let mut short = server.client(&sign(&claims)).await;
    let (mut stream, _) = subscribe(&mut short, &[PROJECT], &[]).await.unwrap();
    let (_, status) = drain_until_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    eventually(10, "the expired stream's slot is given back", || async {
        let mut fresh = server.client(&user_token("u1")).await;
        subscribe(&mut fresh, &[PROJECT], &[]).await.ok()
    })
    .await;
}

/// A client on a new connection, or the error that stopped it (the server closed it at accept).
async fn try_new_connection(server: &TestServer, token: &str) -> Result<(), String> {
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client =
        lamplight::proto::v1::event_service_client::EventServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        );
    let req = lamplight::proto::v1::GetPresenceRequest {
        room: PROJECT.into(),
        ..Default::default()
    };
    client
        .get_presence(req)
        .await
        .map(|_| ())
        .map_err(|status| format!("call: {status:?}"))
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_accept_and_open_ones_keep_working() {
    let server = TestServer::start_with(|c| c.max_connections = 3).await;
    let mut u1 = server.client(&user_token("u1")).await;
    let (mut s1, _) = subscribe(&mut u1, &[PROJECT], &[]).await.unwrap();
    let mut svc = server.client(&publisher_token()).await;
    let mut u2 = server.client(&user_token("u2")).await;
    let (s2, _) = subscribe(&mut u2, &[PROJECT], &[]).await.unwrap();

    for _ in 0..3 {
        let refused = try_new_connection(&server, &user_token("u3")).await;
        assert!(
            refused.is_err(),
            "a fourth connection was served with --max-connections 3"
        );
    }

    // The open ones are unhurt.
    let id = publish_event(&mut svc, task_event(PROJECT, "still served")).await;
    assert_eq!(next_event(&mut s1).await.id, id);

    // A closed connection frees its place.
    drop(s2);
    drop(u2);
    eventually(10, "a new connection is served once one closed", || async {
        try_new_connection(&server, &user_token("u3")).await.ok()
    })
    .await;
}

/// Reads from `socket` until the server closes it; panics if it is still open after `secs` seconds.
async fn expect_closed_within(socket: &mut TcpStream, secs: u64, what: &str) {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => panic!("{what}: the server kept the connection open for {secs} s"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn http1_clients_that_do_not_finish_their_headers_are_disconnected() {
    let server = TestServer::start_with(|c| c.http1_header_read_timeout_secs = 1).await;
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"POST /lamplight.v1.EventService/Publish HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    expect_closed_within(&mut half, 6, "half a request").await;

    // One that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    expect_closed_within(&mut silent, 6, "a silent connection").await;
}

#[tokio::test]
async fn http2_peers_that_stop_answering_pings_are_disconnected() {
    let server = TestServer::start_with(|c| {
        c.http2_keepalive_secs = 1;
        c.http2_keepalive_timeout_secs = 1;
    })
    .await;
    let mut dead = TcpStream::connect(server.addr).await.unwrap();
    // The connection preface and an empty SETTINGS frame; then this peer answers nothing (no SETTINGS
    // ack, no PING ack), as a peer that vanished would.
    dead.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    expect_closed_within(&mut dead, 10, "a peer that does not answer PINGs").await;
}

#[tokio::test]
async fn accepted_sockets_have_tcp_keepalive() {
    let server = TestServer::start_with(|c| c.tcp_keepalive_secs = 30).await;
    let mut u1 = server.client(&user_token("u1")).await;
    let (_stream, _) = subscribe(&mut u1, &[PROJECT], &[]).await.unwrap();
    // /proc/net/tcp: `tr` (the timer column) is 2 while the keepalive timer runs, which it does once
    // nothing is waiting for an ACK (1, the retransmit timer, until then).
    let port = format!(":{:04X}", server.addr.port());
    let last = eventually(10, "the server socket runs its keepalive timer", || async {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (Linux)");
        let ours: Vec<String> = table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 5 && fields[1].ends_with(&port) && fields[3] == "01"
            })
            .map(str::to_owned)
            .collect();
        let ok = !ours.is_empty()
            && ours.iter().all(|l| {
                l.split_whitespace()
                    .nth(5)
                    .is_some_and(|t| t.starts_with("02:"))
            });
        ok.then(|| ours.join("\n"))
    })
    .await;
    assert!(!last.is_empty());
}
