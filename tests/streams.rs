//! Long-lived stream behaviour through the real server: heartbeats, a token expiring mid-stream, and a
//! slow consumer that is cut off without slowing anyone else, each followed by a lossless resume.
mod support;

use std::time::SystemTime;

use lamplight::proto::v1::{event::Payload, subscribe_response::Kind};
use support::*;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";
const CHANNEL: &str = "tenant:t1:channel:c1";

fn since_pairs(since: &std::collections::BTreeMap<String, String>) -> Vec<(&str, &str)> {
    since
        .iter()
        .map(|(room, id)| (room.as_str(), id.as_str()))
        .collect()
}

#[tokio::test]
async fn heartbeats_arrive_every_interval_and_events_still_flow() {
    let server = TestServer::start_with(|c| c.heartbeat_secs = 1).await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[PROJECT], &[]).await.unwrap();
    let mut svc = server.client(&publisher_token()).await;

    let heartbeat_time = |kind: Kind| match kind {
        Kind::Heartbeat(h) => SystemTime::try_from(h.time.expect("heartbeat has a time")).unwrap(),
        other => panic!("expected a heartbeat, got {other:?}"),
    };
    // Nothing is published yet: the next messages must be heartbeats.
    let first = heartbeat_time(next(&mut stream).await.unwrap());
    let second = heartbeat_time(next(&mut stream).await.unwrap());
    assert!(
        first < second,
        "heartbeat times must increase: {first:?} then {second:?}"
    );

    let id = publish_event(&mut svc, task_event(PROJECT, "between heartbeats")).await;
    assert_eq!(next_event(&mut stream).await.id, id);

    let third = heartbeat_time(next(&mut stream).await.unwrap());
    assert!(second < third, "{second:?} then {third:?}");
}

#[tokio::test]
async fn expired_token_ends_the_stream_and_a_fresh_token_resumes_without_loss() {
    let server = TestServer::start().await;
    let mut svc = server.client(&publisher_token()).await;
    let mut claims = user_claims("u1");
    claims.exp = now() + 3;
    let mut short = server.client(&sign(&claims)).await;
    let (mut stream, _) = subscribe(&mut short, &[PROJECT, CHANNEL], &[])
        .await
        .unwrap();

    let a1 = publish_event(&mut svc, task_event(PROJECT, "a1")).await;
    let a2 = publish_event(&mut svc, task_event(PROJECT, "a2")).await;
    assert_eq!(next_event(&mut stream).await.id, a1);
    assert_eq!(next_event(&mut stream).await.id, a2);

    // The channel room had no events: it still has a position to resume from.
    let (more, status) = drain_until_status(&mut stream).await;
    assert!(more.is_empty(), "nothing else was published: {more:?}");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("token expired"), "{status:?}");
    assert!(
        status.message().contains(&a2),
        "message names the last id: {status:?}"
    );
    let since = resume_since(&status);
    assert_eq!(since.get(PROJECT), Some(&a2), "{since:?}");
    assert_eq!(since.len(), 2, "one position per room: {since:?}");
    assert!(
        since.get(CHANNEL).is_some_and(|id| !id.is_empty()),
        "{since:?}"
    );

    // Published while the client had no stream.
    let b1 = publish_event(&mut svc, task_event(PROJECT, "b1")).await;
    let c1 = publish_event(&mut svc, task_event(CHANNEL, "c1")).await;
    let b2 = publish_event(&mut svc, task_event(PROJECT, "b2")).await;

    let mut fresh = server.client(&user_token("u1")).await;
    let (mut stream, subscribed) = subscribe(&mut fresh, &[PROJECT, CHANNEL], &since_pairs(&since))
        .await
        .expect("resubscribe with the resume position of the ended stream");
    assert!(
        subscribed.rooms.iter().all(|r| r.recovered),
        "{subscribed:?}"
    );
    let replayed = [
        next_event(&mut stream).await,
        next_event(&mut stream).await,
        next_event(&mut stream).await,
    ];
    let in_room = |room: &str| -> Vec<String> {
        replayed
            .iter()
            .filter(|e| e.room == room)
            .map(|e| e.id.clone())
            .collect()
    };
    assert_eq!(in_room(PROJECT), vec![b1, b2]);
    assert_eq!(in_room(CHANNEL), vec![c1]);
    let live = publish_event(&mut svc, task_event(CHANNEL, "live")).await;
    assert_eq!(
        next_event(&mut stream).await.id,
        live,
        "no duplicate before live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_without_slowing_others_and_resumes_from_its_status() {
    // 3000 x 4 KiB = 12 MiB: far more than the slow client's HTTP/2 windows (a few MiB) and socket buffers
    // can absorb, so the server must drop it rather than buffer or wait.
    const EVENTS: usize = 3000;
    const PAYLOAD: usize = 4096;
    const QUEUE: usize = 16;
    // The fast subscriber is read after every BATCH publishes, so it never has more than BATCH queued.
    const BATCH: usize = 8;
    let server = TestServer::start_with(|c| {
        c.stream_queue = QUEUE;
        c.history_size = EVENTS + 100;
    })
    .await;
    // Each `client` call opens its own connection (Channel): the slow stream's flow control cannot stall
    // the others.
    let mut fast_client = server.client(&user_token("fast")).await;
    let mut slow_client = server.client(&user_token("slow")).await;
    let mut svc = server.client(&publisher_token()).await;
    let (mut fast, _) = subscribe(&mut fast_client, &[PROJECT], &[]).await.unwrap();
    // Read the Subscribed message, then stop reading.
    let (mut slow, _) = subscribe(&mut slow_client, &[PROJECT], &[]).await.unwrap();

    let mut published = Vec::with_capacity(EVENTS);
    for batch_start in (0..EVENTS).step_by(BATCH) {
        let batch_end = (batch_start + BATCH).min(EVENTS);
        for n in batch_start..batch_end {
            // publish_event fails the test if a publish does not complete within 10 s.
            published.push(publish_event(&mut svc, blob_event(PROJECT, n as u64, PAYLOAD)).await);
        }
        for expected in &published[batch_start..batch_end] {
            let got = next_event(&mut fast).await;
            assert_eq!(&got.id, expected, "fast subscriber: gap or reorder");
        }
    }
    assert_eq!(published.len(), EVENTS);

    // Now read the slow one: what it had in flight, then RESOURCE_EXHAUSTED.
    let (delivered, status) = drain_until_status(&mut slow).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        !delivered.is_empty() && delivered.len() < EVENTS,
        "the slow stream should yield some but not all events, got {}",
        delivered.len()
    );
    let delivered_ids: Vec<String> = delivered.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        delivered_ids,
        published[..delivered.len()],
        "slow subscriber: gap or reorder before the cut"
    );
    let last = delivered_ids.last().unwrap();
    assert!(
        status.message().contains(last.as_str()),
        "the message names the last id delivered: {status:?}"
    );
    let since = resume_since(&status);
    assert_eq!(since.get(PROJECT), Some(last), "{since:?}");

    // Resume (on a new connection) from the status: exactly the rest, then live.
    let mut resumed_client = server.client(&user_token("slow")).await;
    let (mut resumed, subscribed) =
        subscribe(&mut resumed_client, &[PROJECT], &since_pairs(&since))
            .await
            .unwrap();
    assert!(subscribed.rooms[0].recovered, "{subscribed:?}");
    for expected in &published[delivered.len()..] {
        let got = next_event(&mut resumed).await;
        assert_eq!(&got.id, expected, "resumed stream: gap or duplicate");
        match got.payload {
            Some(Payload::Custom(c)) => assert_eq!(c.data.len(), PAYLOAD),
            other => panic!("unexpected payload {other:?}"),
        }
    }
    let live = publish_event(&mut svc, blob_event(PROJECT, EVENTS as u64, 16)).await;
    assert_eq!(next_event(&mut resumed).await.id, live);
}
