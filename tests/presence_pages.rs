//! `GetPresence` on a big room: totals on every page, user ids a bounded page at a time, in id order,
//! every member exactly once across the pages; a malformed cursor is INVALID_ARGUMENT. On the memory bus
//! and on Redis (a private redis-server).

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::collections::BTreeSet;

use lamplight::proto::v1::{
    event_service_client::EventServiceClient, GetPresenceRequest, GetPresenceResponse,
    SubscribeRequest, SubscribeResponse,
};
use redis_support::*;
use support::*;
use tonic::{Code, Streaming};

const ROOM: &str = "tenant:t1:project:p1";
/// Members of the room; `u00000` has a second stream, so connections are one more.
const USERS: usize = 2_500;
/// Streams per HTTP/2 connection in these tests.
const STREAMS_PER_CHANNEL: usize = 500;

fn user(n: usize) -> String {
    format!("u{n:05}")
}

fn request(limit: u32, page_token: &str) -> GetPresenceRequest {
    GetPresenceRequest {
        room: ROOM.into(),
        limit,
        page_token: page_token.into(),
    }
}

/// Opens one stream on [`ROOM`] per user (and a second for the first user), each with its own token.
async fn fill_room(server: &TestServer) -> Vec<Streaming<SubscribeResponse>> {
    let mut streams = Vec::new();
    let mut opening = Vec::new();
    let mut channel = server.channel().await;
    for n in 0..=USERS {
        if n > 0 && n % STREAMS_PER_CHANNEL == 0 {
            channel = server.channel().await;
        }
        let mut client = EventServiceClient::new(channel.clone());
        let who = user(n % USERS);
        opening.push(async move {
            let mut req = tonic::Request::new(SubscribeRequest {
                rooms: vec![ROOM.into()],
                since: Default::default(),
            });
            let header = format!("Bearer {}", user_token(&who)).parse().unwrap();
            req.metadata_mut().insert("authorization", header);
            let mut stream = client.subscribe(req).await.unwrap().into_inner();
            // `Subscribed` comes once the stream is in presence.
            next(&mut stream).await.unwrap();
            stream
        });
        if opening.len() == 250 {
            streams.extend(futures::future::join_all(opening.drain(..)).await);
        }
    }
    streams.extend(futures::future::join_all(opening).await);
    streams
}

async fn presence(client: &mut Client, limit: u32, token: &str) -> GetPresenceResponse {
    client
        .get_presence(request(limit, token))
        .await
        .unwrap()
        .into_inner()
}

async fn pages_cover_the_room_once(server: &TestServer) {
    let _streams = fill_room(server).await;
    let mut client = server.client(&user_token("watcher")).await;
    let expected: Vec<String> = (0..USERS).map(user).collect();

    // Default: the first 100, with the totals.
    let first = presence(&mut client, 0, "").await;
    assert_eq!(first.user_count as usize, USERS);
    assert_eq!(first.connection_count as usize, USERS + 1);
    assert_eq!(first.user_ids, expected[..100]);
    assert!(!first.next_page_token.is_empty());

    // Above the maximum: clamped to 1,000.
    let big = presence(&mut client, 1_000_000, "").await;
    assert_eq!(big.user_ids, expected[..1_000]);

    // Walking the pages: each bounded, in order, every user once, totals on each.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = presence(&mut client, 700, &token).await;
        pages += 1;
        assert!(page.user_ids.len() <= 700);
        assert_eq!(
            (page.user_count as usize, page.connection_count as usize),
            (USERS, USERS + 1),
            "totals on page {pages}"
        );
        seen.extend(page.user_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, USERS.div_ceil(700));
    assert_eq!(seen, expected, "every member once, in id order");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), USERS);

    // A malformed cursor is refused, naming the field.
    for bad in ["not base64!", "AA", "=="] {
        let refused = client.get_presence(request(10, bad)).await;
        expect_status(refused, Code::InvalidArgument, &["page_token"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_of_a_big_room_on_the_memory_bus() {
    let server = TestServer::start_with(|c| c.max_streams_per_connection = 1_000).await;
    pages_cover_the_room_once(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_of_a_big_room_on_redis() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(|c| {
        use_redis(c, &redis.url());
        c.redis.redis_presence_ttl_secs = 30;
        c.max_streams_per_connection = 1_000;
    })
    .await;
    pages_cover_the_room_once(&server).await;
}
