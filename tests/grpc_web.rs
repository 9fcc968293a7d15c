//! grpc-web spoken by hand over plain HTTP/1.1 (a hyper http1 client, no HTTP/2 anywhere), as a browser
//! would through `fetch`: frames are built and parsed here byte by byte, so these tests check the wire
//! format itself, not a client library's view of it. Also the CORS answers browsers depend on.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, HOST, ORIGIN};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use lamplight::proto::v1::{
    event::Payload, subscribe_response::Kind, Event, PublishRequest, PublishResponse,
    SubscribeRequest, SubscribeResponse, Task,
};
use prost::Message;
use support::*;

const PUBLISH: &str = "/lamplight.v1.EventService/Publish";
const SUBSCRIBE: &str = "/lamplight.v1.EventService/Subscribe";
const GRPC_WEB_PROTO: &str = "application/grpc-web+proto";
const GRPC_WEB_TEXT: &str = "application/grpc-web-text";
const APP_ORIGIN: &str = "http://app.example";
const ROOM: &str = "tenant:t1:project:p1";

/// Every await on the network is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

/// Bounds `fut` by [`WAIT`], failing the test with `what` if it does not finish.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

// ---------------------------------------------------------------------------------------------------
// A tiny grpc-web client over HTTP/1.1.

/// One HTTP/1.1 connection (hyper's http1 client: it cannot speak HTTP/2).
async fn connect(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let tcp = within("tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let (sender, conn) = within("http1 handshake", http1::handshake(TokioIo::new(tcp)))
        .await
        .expect("http1 handshake");
    tokio::spawn(async move {
        // Ends with an error when the test drops the sender mid-stream; nothing to report then.
        let _ = conn.await;
    });
    sender
}

/// A grpc-web data frame: flag 0 (uncompressed), 4-byte big-endian length, the protobuf bytes.
fn data_frame(msg: &impl Message) -> Bytes {
    let payload = msg.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(0u8);
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.into()
}

/// A grpc-web POST of `body` to `path`.
fn grpc_web_request(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    token: Option<&str>,
    origin: Option<&str>,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONTENT_TYPE, content_type)
        .header(ACCEPT, content_type)
        .header("x-grpc-web", "1")
        .header("x-user-agent", "grpc-web-by-hand/1");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if let Some(origin) = origin {
        req = req.header(ORIGIN, origin);
    }
    req.body(Full::new(body)).unwrap()
}

/// Sends a binary-mode grpc-web request carrying `msg`; returns the response head and a frame reader.
async fn call(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    origin: Option<&str>,
    msg: &impl Message,
) -> (http::response::Parts, FrameReader) {
    let mut sender = connect(addr).await;
    let req = grpc_web_request(addr, path, GRPC_WEB_PROTO, token, origin, data_frame(msg));
    let resp = within("grpc-web response head", sender.send_request(req))
        .await
        .expect("send grpc-web request");
    let (parts, body) = resp.into_parts();
    assert_eq!(
        parts.version,
        Version::HTTP_11,
        "the server must answer in HTTP/1.1"
    );
    assert_eq!(
        parts.status,
        StatusCode::OK,
        "grpc-web answers 200 even for errors"
    );
    let reader = FrameReader {
        body,
        buf: BytesMut::new(),
        _conn: sender,
    };
    (parts, reader)
}

/// One parsed grpc-web frame.
#[derive(Debug)]
enum WebFrame {
    /// Flag 0x00: a protobuf message.
    Data(Bytes),
    /// Flag 0x80: trailers as `name:value` lines (names lowercased).
    Trailers(Vec<(String, String)>),
}

/// Reads grpc-web frames from an HTTP/1.1 body as its chunks arrive, one frame at a time.
struct FrameReader {
    body: Incoming,
    buf: BytesMut,
    /// Keeps the connection open while the body is read.
    _conn: http1::SendRequest<Full<Bytes>>,
}

impl FrameReader {
    /// The next frame, or `None` when the body ended cleanly between frames. Fails the test after
    /// [`WAIT`] without a frame.
    async fn next(&mut self) -> Option<WebFrame> {
        within("next grpc-web frame", async {
            loop {
                if let Some(frame) = parse_frame(&mut self.buf) {
                    return Some(frame);
                }
                match self.body.frame().await {
                    None => {
                        assert!(
                            self.buf.is_empty(),
                            "body ended inside a frame: {} bytes left",
                            self.buf.len()
                        );
                        return None;
                    }
                    Some(Err(e)) => panic!("reading the grpc-web body: {e}"),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                }
            }
        })
        .await
    }

    /// The next data frame decoded as `M`; panics on trailers or the end of the body.
    async fn message<M: Message + Default>(&mut self) -> M {
        match self.next().await {
            Some(WebFrame::Data(bytes)) => M::decode(bytes).expect("decode message"),
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    /// Reads to the end of the body; returns the data frames and the trailer frame's lines.
    async fn finish(&mut self) -> (Vec<Bytes>, Option<Vec<(String, String)>>) {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = self.next().await {
            match frame {
                WebFrame::Data(bytes) => {
                    assert!(trailers.is_none(), "data frame after the trailer frame");
                    data.push(bytes);
                }
                WebFrame::Trailers(t) => trailers = Some(t),
            }
        }
        (data, trailers)
    }
}

/// Takes one complete frame off the front of `buf`, if there is one.
fn parse_frame(buf: &mut BytesMut) -> Option<WebFrame> {
    if buf.len() < 5 {
        return None;
    }
    let flag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    let payload = buf.split_to(len).freeze();
    match flag {
        0x00 => Some(WebFrame::Data(payload)),
        0x80 => Some(WebFrame::Trailers(parse_trailers(&payload))),
        other => panic!("unexpected grpc-web frame flag {other:#04x}"),
    }
}

/// `name:value\r\n` lines, as in an HTTP/1 header block.
fn parse_trailers(block: &[u8]) -> Vec<(String, String)> {
    std::str::from_utf8(block)
        .expect("trailers are text")
        .split("\r\n")
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').expect("trailer line name:value");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect()
}

fn trailer<'a>(trailers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    trailers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `grpc-message` is percent-encoded on the wire (gRPC over HTTP/2 spec).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("grpc-message is UTF-8")
}

/// The grpc-status of a finished call and its decoded message: from the headers of a trailers-only
/// response, or else from the trailer frame. Exactly one of the two must carry it.
fn grpc_status(headers: &HeaderMap, trailers: Option<&[(String, String)]>) -> (i32, String) {
    let from_headers = headers.get("grpc-status").map(|v| {
        let message = headers
            .get("grpc-message")
            .map(|m| percent_decode(m.to_str().unwrap()))
            .unwrap_or_default();
        (v.to_str().unwrap().parse::<i32>().unwrap(), message)
    });
    let from_trailers = trailers.and_then(|t| {
        trailer(t, "grpc-status").map(|code| {
            let message = percent_decode(trailer(t, "grpc-message").unwrap_or_default());
            (code.parse::<i32>().unwrap(), message)
        })
    });
    match (from_headers, from_trailers) {
        (Some(s), None) | (None, Some(s)) => s,
        (Some(h), Some(t)) => panic!("grpc-status both in headers {h:?} and trailers {t:?}"),
        (None, None) => panic!("no grpc-status in headers {headers:?} nor trailers {trailers:?}"),
    }
}

fn publish_request(task_id: &str) -> PublishRequest {
    PublishRequest {
        event: Some(Event {
            room: ROOM.into(),
            r#type: "task.created".into(),
            payload: Some(Payload::Task(Task {
                id: task_id.into(),
                title: "Write the README".into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    }
}

/// Publishes over grpc-web (binary) and returns the event id.
async fn publish_web(addr: SocketAddr, task_id: &str) -> String {
    let (head, mut body) = call(
        addr,
        PUBLISH,
        Some(&publisher_token()),
        None,
        &publish_request(task_id),
    )
    .await;
    assert_eq!(head.headers.get(CONTENT_TYPE).unwrap(), GRPC_WEB_PROTO);
    let (data, trailers) = body.finish().await;
    assert_eq!(
        grpc_status(&head.headers, trailers.as_deref()),
        (0, String::new())
    );
    assert_eq!(data.len(), 1, "a unary call answers one message");
    PublishResponse::decode(data[0].clone()).unwrap().id
}

// ---------------------------------------------------------------------------------------------------
// grpc-web calls.

#[tokio::test]
async fn unary_publish_over_http1_returns_an_id() {
    let server = TestServer::start().await;
    let (head, mut body) = call(
        server.addr,
        PUBLISH,
        Some(&publisher_token()),
        None,
        &publish_request("42"),
    )
    .await;
    assert_eq!(head.headers.get(CONTENT_TYPE).unwrap(), GRPC_WEB_PROTO);
    assert!(
        head.headers.get("grpc-status").is_none(),
        "a successful unary call has its status in the trailer frame, not in the headers"
    );
    let response: PublishResponse = body.message().await;
    assert!(!response.id.is_empty(), "Publish must return the event id");
    match body.next().await {
        Some(WebFrame::Trailers(t)) => {
            assert_eq!(trailer(&t, "grpc-status"), Some("0"), "trailers: {t:?}");
        }
        other => panic!("expected the trailer frame, got {other:?}"),
    }
    assert!(
        body.next().await.is_none(),
        "nothing after the trailer frame"
    );

    // The id is a real one: a second publish gets a different, later id in the same room.
    let second = publish_web(server.addr, "43").await;
    assert_ne!(second, response.id);
}

#[tokio::test]
async fn server_stream_over_http1_delivers_messages_as_they_happen() {
    let server = TestServer::start().await;
    let request = SubscribeRequest {
        rooms: vec![ROOM.into()],
        since: Default::default(),
    };
    let (head, mut stream) = call(
        server.addr,
        SUBSCRIBE,
        Some(&user_token("u1")),
        None,
        &request,
    )
    .await;
    assert_eq!(head.headers.get(CONTENT_TYPE).unwrap(), GRPC_WEB_PROTO);
    assert_eq!(
        head.headers
            .get(http::header::TRANSFER_ENCODING)
            .map(|v| v.to_str().unwrap()),
        Some("chunked"),
        "an HTTP/1.1 server stream is chunked"
    );

    // `Subscribed` arrives while the stream stays open: the server flushes each message.
    let first: SubscribeResponse = stream.message().await;
    match first.kind {
        Some(Kind::Subscribed(s)) => {
            assert_eq!(s.rooms.len(), 1);
            assert_eq!(s.rooms[0].room, ROOM);
        }
        other => panic!("first message must be Subscribed, got {other:?}"),
    }

    // Published meanwhile, on another HTTP/1.1 connection.
    let id = publish_web(server.addr, "42").await;
    let event = loop {
        let msg: SubscribeResponse = stream.message().await;
        match msg.kind {
            Some(Kind::Heartbeat(_)) => continue,
            Some(Kind::Event(e)) => break e,
            other => panic!("expected the event, got {other:?}"),
        }
    };
    assert_eq!(event.id, id);
    assert_eq!(event.room, ROOM);
    assert_eq!(event.r#type, "task.created");
    assert_eq!(event.publisher_id, "svc");
    match event.payload {
        Some(Payload::Task(task)) => {
            assert_eq!(task.id, "42");
            assert_eq!(task.title, "Write the README");
        }
        other => panic!("expected a task payload, got {other:?}"),
    }

    // On shutdown the stream ends with UNAVAILABLE in the trailer frame (after data frames, so not in
    // the headers).
    server.shutdown.cancel();
    let (_, trailers) = stream.finish().await;
    let trailers = trailers.expect("a server stream ends with a trailer frame");
    let (code, message) = grpc_status(&head.headers, Some(&trailers));
    assert_eq!(code, 14, "UNAVAILABLE on shutdown: {message}");
    assert!(
        message.contains(&format!(r#"resume with since={{"{ROOM}":"{id}"}}"#)),
        "the status names the last event delivered: {message}"
    );
}

#[tokio::test]
async fn missing_token_is_unauthenticated() {
    let server = TestServer::start().await;
    let (head, mut body) = call(server.addr, PUBLISH, None, None, &publish_request("1")).await;
    let (data, trailers) = body.finish().await;
    assert!(data.is_empty(), "no message on error");
    let (code, message) = grpc_status(&head.headers, trailers.as_deref());
    assert_eq!(code, 16, "UNAUTHENTICATED: {message}");
    assert!(
        message.contains("send `authorization: Bearer <JWT>`"),
        "message: {message}"
    );

    // Same for a stream.
    let request = SubscribeRequest {
        rooms: vec![ROOM.into()],
        since: Default::default(),
    };
    let (head, mut body) = call(server.addr, SUBSCRIBE, None, None, &request).await;
    let (data, trailers) = body.finish().await;
    assert!(data.is_empty());
    assert_eq!(grpc_status(&head.headers, trailers.as_deref()).0, 16);
}

#[tokio::test]
async fn denied_room_is_permission_denied() {
    let server = TestServer::start().await;
    // u1 belongs to tenant t1, project p1.
    let token = user_token("u1");
    for room in ["tenant:t2:project:p1", "tenant:t1:project:p9"] {
        let request = SubscribeRequest {
            rooms: vec![room.into()],
            since: Default::default(),
        };
        let (head, mut body) = call(server.addr, SUBSCRIBE, Some(&token), None, &request).await;
        let (data, trailers) = body.finish().await;
        assert!(data.is_empty(), "a denied stream sends no message");
        let (code, message) = grpc_status(&head.headers, trailers.as_deref());
        assert_eq!(code, 7, "PERMISSION_DENIED for {room}: {message}");
        assert!(
            message.contains(room),
            "the message names the room: {message}"
        );
    }
    // A user may not publish at all.
    let (head, mut body) = call(
        server.addr,
        PUBLISH,
        Some(&token),
        None,
        &publish_request("1"),
    )
    .await;
    let (_, trailers) = body.finish().await;
    assert_eq!(grpc_status(&head.headers, trailers.as_deref()).0, 7);
}

/// Decodes a grpc-web-text body: a concatenation of base64 chunks, each padded on its own (tonic-web
/// encodes every HTTP chunk separately), so it is decoded in 4-character quanta.
fn decode_web_text(body: &[u8]) -> Vec<u8> {
    let text: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    assert_eq!(
        text.len() % 4,
        0,
        "base64 body length must be a multiple of 4"
    );
    text.chunks(4)
        .flat_map(|quantum| {
            base64::engine::general_purpose::STANDARD
                .decode(quantum)
                .expect("valid base64 quantum")
        })
        .collect()
}

#[tokio::test]
async fn unary_publish_in_grpc_web_text_mode() {
    let server = TestServer::start().await;
    let mut sender = connect(server.addr).await;
    let frame = data_frame(&publish_request("42"));
    let body = base64::engine::general_purpose::STANDARD.encode(&frame);
    let token = publisher_token();
    let req = grpc_web_request(
        server.addr,
        PUBLISH,
        GRPC_WEB_TEXT,
        Some(&token),
        None,
        Bytes::from(body),
    );
    let resp = within("text-mode response", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(
        resp.headers().get(CONTENT_TYPE).unwrap(),
        "application/grpc-web-text+proto"
    );
    let headers = resp.headers().clone();
    let raw = within("text-mode body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        raw.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)),
        "a grpc-web-text body is base64 only"
    );
    let mut decoded = BytesMut::from(&decode_web_text(&raw)[..]);
    let response = match parse_frame(&mut decoded) {
        Some(WebFrame::Data(bytes)) => PublishResponse::decode(bytes).unwrap(),
        other => panic!("expected a data frame, got {other:?}"),
    };
    assert!(!response.id.is_empty());
    let trailers = match parse_frame(&mut decoded) {
        Some(WebFrame::Trailers(t)) => t,
        other => panic!("expected the trailer frame, got {other:?}"),
    };
    assert!(decoded.is_empty(), "nothing after the trailer frame");
    assert_eq!(grpc_status(&headers, Some(&trailers)), (0, String::new()));
}

// ---------------------------------------------------------------------------------------------------
// CORS.

/// A CORS preflight for a grpc-web call from `origin`.
async fn preflight(addr: SocketAddr, origin: &str) -> http::response::Parts {
    let mut sender = connect(addr).await;
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri(PUBLISH)
        .header(HOST, addr.to_string())
        .header(ORIGIN, origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within("preflight response", sender.send_request(req))
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    within("preflight body", body.collect()).await.unwrap();
    parts
}

/// A header's comma-separated values, lowercased.
fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::test]
async fn cors_preflight_answers_only_listed_origins() {
    let server = TestServer::start_with(|c| c.cors_origins = vec![APP_ORIGIN.into()]).await;

    let allowed = preflight(server.addr, APP_ORIGIN).await;
    assert!(
        allowed.status.is_success(),
        "preflight status {}",
        allowed.status
    );
    assert_eq!(
        allowed.headers.get("access-control-allow-origin"),
        Some(&HeaderValue::from_static(APP_ORIGIN))
    );
    let allow_headers = header_list(&allowed.headers, "access-control-allow-headers");
    for needed in ["authorization", "x-grpc-web", "content-type"] {
        assert!(
            allow_headers.iter().any(|h| h == needed),
            "{needed} not in allowed headers {allow_headers:?}"
        );
    }
    let allow_methods = header_list(&allowed.headers, "access-control-allow-methods");
    assert!(
        allow_methods.iter().any(|m| m == "post"),
        "POST not allowed: {allow_methods:?}"
    );

    let denied = preflight(server.addr, "http://evil.example").await;
    assert!(
        denied.headers.get("access-control-allow-origin").is_none(),
        "an unlisted origin must get no allow-origin: {:?}",
        denied.headers
    );

    // The real call from the allowed origin: the browser may read grpc-status and grpc-message.
    let (head, mut body) = call(
        server.addr,
        PUBLISH,
        Some(&publisher_token()),
        Some(APP_ORIGIN),
        &publish_request("42"),
    )
    .await;
    assert_eq!(
        head.headers.get("access-control-allow-origin"),
        Some(&HeaderValue::from_static(APP_ORIGIN))
    );
    // The page may read how its calls travelled (Resource Timing's nextHopProtocol).
    assert_eq!(
        head.headers.get("timing-allow-origin"),
        Some(&HeaderValue::from_static(APP_ORIGIN))
    );
    let exposed = header_list(&head.headers, "access-control-expose-headers");
    for needed in ["grpc-status", "grpc-message"] {
        assert!(
            exposed.iter().any(|h| h == needed),
            "{needed} not in exposed headers {exposed:?}"
        );
    }
    let (_, trailers) = body.finish().await;
    assert_eq!(grpc_status(&head.headers, trailers.as_deref()).0, 0);

    // An error sent as headers (trailers-only) is exposed the same way.
    let (head, mut body) = call(
        server.addr,
        PUBLISH,
        None,
        Some(APP_ORIGIN),
        &publish_request("1"),
    )
    .await;
    let exposed = header_list(&head.headers, "access-control-expose-headers");
    assert!(exposed.iter().any(|h| h == "grpc-status"), "{exposed:?}");
    let (_, trailers) = body.finish().await;
    assert_eq!(grpc_status(&head.headers, trailers.as_deref()).0, 16);
}

#[tokio::test]
async fn cors_default_config_allows_no_origin() {
    let server = TestServer::start().await;
    for origin in [APP_ORIGIN, "http://evil.example"] {
        let parts = preflight(server.addr, origin).await;
        assert!(
            parts.headers.get("access-control-allow-origin").is_none(),
            "no origin is allowed by default, yet {origin} got {:?}",
            parts.headers
        );
    }
}

/// Plain HTTP/1.1 that is not grpc-web (here a GET) is refused, so the port does not pretend to be a web
/// server.
#[tokio::test]
async fn plain_http1_that_is_not_grpc_web_is_refused() {
    let server = TestServer::start().await;
    let tcp = within("connect", tokio::net::TcpStream::connect(server.addr))
        .await
        .unwrap();
    let (mut sender, conn) = within("handshake", http1::handshake(TokioIo::new(tcp)))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::GET)
        .uri("/")
        .header(HOST, server.addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within("GET /", sender.send_request(req)).await.unwrap();
    assert!(
        resp.status().is_client_error(),
        "GET / over HTTP/1.1 answered {}",
        resp.status()
    );
}
