//! Streams the server cannot write to, made with a raw HTTP/2 client that withholds flow-control window
//! while it keeps answering PINGs: they must still end at token expiry and after `--stream-stall-secs`,
//! and leave presence. And a stream over many long room names ends with trailers a client accepts.
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lamplight::auth::DevToken;
use lamplight::proto::v1::SubscribeRequest;
use prost::Message as _;
use support::*;
use tokio::net::TcpStream;

const PROJECT: &str = "tenant:t1:project:p1";

/// A raw HTTP/2 connection whose streams get `window` bytes of flow-control window each; the connection
/// task keeps running (it answers PINGs) but nothing is read unless the test reads it.
async fn raw_connection(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// Sends a `Subscribe` and returns the response once its headers arrived (the stream is open, and counted
/// in presence, by then).
async fn raw_subscribe(
    send: &h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    token: &str,
    rooms: &[String],
) -> http::Response<h2::RecvStream> {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/lamplight.v1.EventService/Subscribe"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let message = SubscribeRequest {
        rooms: rooms.to_vec(),
        since: Default::default(),
    }
    .encode_to_vec();
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut body) = ready.send_request(request, false).unwrap();
    body.send_data(Bytes::from(frame), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("response headers within 10 s")
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

/// Reads a response body to its end, granting window as it goes, and returns its trailers.
async fn read_to_trailers(mut body: h2::RecvStream) -> http::HeaderMap {
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    body.trailers()
        .await
        .unwrap()
        .expect("the stream ends with trailers")
}

/// The `lamplight-resume-since` trailer, parsed.
fn resume_trailer(trailers: &http::HeaderMap) -> BTreeMap<String, String> {
    let value = trailers
        .get(lamplight::error::RESUME_METADATA_KEY)
        .expect("resume trailer");
    serde_json::from_str(value.to_str().unwrap()).unwrap()
}

/// Users in `room` as another member sees them.
async fn users_in(observer: &mut Client, room: &str) -> Vec<String> {
    get_presence(observer, room).await.unwrap().user_ids
}

/// Waits until `user` left `room`'s presence; panics after `secs` seconds.
async fn expect_left_presence(observer: &mut Client, room: &str, user: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let users = users_in(observer, room).await;
        if !users.iter().any(|u| u == user) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user} is still in {room} after {secs} s: {users:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_window_ends_at_token_expiry_and_leaves_presence() {
    // A stall would take ten minutes: only the expiry can end this stream.
    let server = TestServer::start_with(|c| {
        c.stream_stall_secs = 600;
        c.heartbeat_secs = 1;
    })
    .await;
    let mut claims = user_claims("zombie");
    claims.exp = now() + 2;
    let send = raw_connection(server.addr, 0).await;
    let _zombie = raw_subscribe(&send, server.addr, &sign(&claims), &[PROJECT.into()]).await;

    let mut observer = server.client(&user_token("observer")).await;
    let users = users_in(&mut observer, PROJECT).await;
    assert!(users.contains(&"zombie".to_owned()), "{users:?}");
    // Expiry (2 s, no leeway) + the watchdog's grace (3 s) + the connection's close grace (2 s).
    expect_left_presence(&mut observer, PROJECT, "zombie", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_ended_and_its_connection_siblings_get_their_resume_position() {
    let server = TestServer::start_with(|c| {
        c.stream_stall_secs = 2;
        c.heartbeat_secs = 1;
    })
    .await;
    // 1 KiB per stream: the unread stream is full after a few events; the read one keeps going.
    let send = raw_connection(server.addr, 1024).await;
    let stalled = raw_subscribe(&send, server.addr, &user_token("zombie"), &[PROJECT.into()]).await;
    let sibling = raw_subscribe(
        &send,
        server.addr,
        &user_token("sibling"),
        &[PROJECT.into()],
    )
    .await;
    let sibling = tokio::spawn(read_to_trailers(sibling.into_body()));

    let mut bystander_client = server.client(&user_token("bystander")).await;
    let (mut bystander, _) = subscribe(&mut bystander_client, &[PROJECT], &[])
        .await
        .unwrap();
    let mut observer = server.client(&user_token("observer")).await;
    let users = users_in(&mut observer, PROJECT).await;
    assert!(users.contains(&"zombie".to_owned()), "{users:?}");
    assert!(users.contains(&"sibling".to_owned()), "{users:?}");

    let mut svc = server.client(&publisher_token()).await;
    let mut published = Vec::new();
    for n in 0..20 {
        published.push(
            publish_event(
                &mut svc,
                task_event(PROJECT, &format!("task {n:03} {}", "x".repeat(200))),
            )
            .await,
        );
    }
    for id in &published {
        assert_eq!(&next_event(&mut bystander).await.id, id);
    }

    // The watchdog closes the connection: the sibling, which can still be written, gets a status and
    // where to resume.
    let trailers = tokio::time::timeout(Duration::from_secs(20), sibling)
        .await
        .expect("the sibling stream ends once the stalled one is found")
        .unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "14", "{trailers:?}");
    let since = resume_trailer(&trailers);
    assert_eq!(since.get(PROJECT), published.last(), "{since:?}");

    // The stalled stream, read now (within the connection's close grace), ends with its own reason and
    // resume position too.
    let trailers = tokio::time::timeout(
        Duration::from_secs(10),
        read_to_trailers(stalled.into_body()),
    )
    .await
    .expect("the stalled stream ends once read");
    assert_eq!(trailers.get("grpc-status").unwrap(), "8", "{trailers:?}");
    let message = trailers.get("grpc-message").unwrap().to_str().unwrap();
    assert!(message.contains("--stream-stall-secs"), "{message}");
    let since = resume_trailer(&trailers);
    assert!(
        since.get(PROJECT).is_some_and(|id| published.contains(id)),
        "{since:?}"
    );

    expect_left_presence(&mut observer, PROJECT, "zombie", 10).await;
    expect_left_presence(&mut observer, PROJECT, "sibling", 10).await;

    // Others were not disturbed.
    let after = publish_event(&mut svc, task_event(PROJECT, "after")).await;
    assert_eq!(next_event(&mut bystander).await.id, after);
}

#[tokio::test]
async fn many_long_room_names_end_with_the_whole_resume_map_in_under_8_kib_of_trailers() {
    let server = TestServer::start().await;
    let rooms: Vec<String> = (0..64)
        .map(|i| format!("tenant:t1:channel:c{i:02}-{}", "x".repeat(60)))
        .collect();
    let admin = DevToken {
        roles: vec!["admin".into()],
        exp: now() + 2,
        ..user_claims("admin1")
    };
    let send = raw_connection(server.addr, 1 << 20).await;
    let response = raw_subscribe(&send, server.addr, &sign(&admin), &rooms).await;
    let trailers = tokio::time::timeout(
        Duration::from_secs(15),
        read_to_trailers(response.into_body()),
    )
    .await
    .expect("the stream ends at token expiry");

    assert_eq!(trailers.get("grpc-status").unwrap(), "16", "{trailers:?}");
    let size: usize = trailers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let sizes: Vec<(&str, usize)> = trailers
        .iter()
        .map(|(name, value)| (name.as_str(), value.len()))
        .collect();
    assert!(size < 8 * 1024, "trailers are {size} bytes: {sizes:?}");
    let since = resume_trailer(&trailers);
    let named: Vec<&String> = since.keys().collect();
    let mut expected: Vec<&String> = rooms.iter().collect();
    expected.sort();
    assert_eq!(named, expected, "one position per room");
    assert!(since.values().all(|id| !id.is_empty()), "{since:?}");
}
