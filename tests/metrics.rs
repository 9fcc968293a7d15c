//! Prometheus metrics on --metrics-listen: scraped over real HTTP while streams open, deliver and close.
//! One test per binary: the recorder is process-wide.
mod support;

use std::time::Duration;

use support::*;

/// Scrapes until `check` holds (gauges fall in a spawned task after a stream is dropped).
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr).await;
        if check(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never held:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn counters_and_gauges_follow_streams_and_events() {
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = TestServer::start_with(|c| c.metrics_listen = Some(metrics_addr)).await;
    let mut user = server.client(&user_token("u1")).await;
    let mut svc = server.client(&publisher_token()).await;

    let (mut stream, _) = subscribe(&mut user, &["tenant:t1:project:p1", "tenant:t1"], &[])
        .await
        .unwrap();
    scrape_until(metrics_addr, "one open stream", |t| {
        sample(t, "lamplight_streams_open") == 1.0 && // the two rooms and the control channel
            sample(t, "lamplight_rooms_local") == 3.0
    })
    .await;

    for i in 0..3 {
        publish_task(&mut svc, "tenant:t1:project:p1", &format!("t{i}"))
            .await
            .unwrap();
        next_event(&mut stream).await;
    }
    let mut other = server.client(&user_token("u2")).await;
    let denied = other
        .publish(lamplight::proto::v1::PublishRequest {
            event: Some(task_event("tenant:t1", "x")),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let text = scrape(metrics_addr).await;
    assert_eq!(
        sample(&text, r#"lamplight_events_published_total{kind="publish"}"#),
        3.0
    );
    assert!(
        sample(&text, "lamplight_events_delivered_total") >= 3.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"lamplight_auth_failures_total{code="permission_denied"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "lamplight_publish_duration_seconds_count"),
        3.0,
        "{text}"
    );
    assert!(
        text.contains(r#"lamplight_publish_duration_seconds_bucket{le="0.001"}"#),
        "histogram has buckets:\n{text}"
    );

    drop(stream);
    scrape_until(metrics_addr, "stream closed", |t| {
        sample(t, "lamplight_streams_open") == 0.0
            && sample(t, "lamplight_rooms_local") == 1.0
            && sample(
                t,
                r#"lamplight_streams_ended_total{reason="client_closed"}"#,
            ) == 1.0
    })
    .await;
}
