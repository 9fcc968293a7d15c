mod support;

use lamplight::proto::v1::{event::Payload, subscribe_response::Kind, Event, PublishRequest, Task};
use support::*;

#[tokio::test]
async fn publish_reaches_a_subscriber() {
    let server = TestServer::start().await;
    let mut user = server.client(&user_token("u1")).await;
    let (mut stream, subscribed) = subscribe(&mut user, &["tenant:t1:project:p1"], &[])
        .await
        .unwrap();
    assert_eq!(subscribed.rooms.len(), 1);
    let mut svc = server.client(&publisher_token()).await;
    let id = svc
        .publish(PublishRequest {
            event: Some(Event {
                room: "tenant:t1:project:p1".into(),
                r#type: "task.created".into(),
                payload: Some(Payload::Task(Task {
                    id: "task-1".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    match next_non_heartbeat(&mut stream).await.unwrap() {
        Kind::Event(e) => assert_eq!(e.id, id),
        other => panic!("{other:?}"),
    }
}
