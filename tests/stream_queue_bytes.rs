//! A stream's inbox is bounded in bytes (`--stream-queue-bytes`), not only in events: a client that stops
//! reading large events is cut off with `RESOURCE_EXHAUSTED` long before `--stream-queue` events pile up,
//! and resumes from its status without a gap.
mod support;

use support::*;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holding_more_bytes_than_its_bound_ends_and_resumes_without_a_gap() {
    // 1000 x 16 KiB = 16 MiB: more than the client's HTTP/2 windows and socket buffers (a few MiB) plus a
    // 256 KiB inbox, while far fewer events than the (here huge) --stream-queue.
    const EVENTS: usize = 1000;
    const PAYLOAD: usize = 16 * 1024;
    let server = TestServer::start_with(|c| {
        c.stream_queue = 1_000_000;
        c.stream_queue_bytes = 256 * 1024;
        c.history_size = EVENTS + 100;
    })
    .await;
    let mut slow_client = server.client(&user_token("slow")).await;
    let mut svc = server.client(&publisher_token()).await;
    // Read the Subscribed message, then stop reading.
    let (mut slow, _) = subscribe(&mut slow_client, &[PROJECT], &[]).await.unwrap();
    let mut published = Vec::with_capacity(EVENTS);
    for n in 0..EVENTS {
        published.push(publish_event(&mut svc, blob_event(PROJECT, n as u64, PAYLOAD)).await);
    }

    let (delivered, status) = drain_until_status(&mut slow).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--stream-queue-bytes"),
        "the message names the bound: {status:?}"
    );
    let delivered: Vec<String> = delivered.into_iter().map(|e| e.id).collect();
    assert!(
        !delivered.is_empty() && delivered.len() < EVENTS,
        "{}",
        delivered.len()
    );
    assert_eq!(
        delivered,
        published[..delivered.len()],
        "gap before the cut"
    );

    let since = resume_since(&status);
    let since: Vec<(&str, &str)> = since
        .iter()
        .map(|(r, i)| (r.as_str(), i.as_str()))
        .collect();
    let mut resumed_client = server.client(&user_token("slow")).await;
    let (mut resumed, subscribed) = subscribe(&mut resumed_client, &[PROJECT], &since)
        .await
        .unwrap();
    assert!(subscribed.rooms[0].recovered, "{subscribed:?}");
    for expected in &published[delivered.len()..] {
        assert_eq!(
            &next_event(&mut resumed).await.id,
            expected,
            "gap or duplicate"
        );
    }
}
