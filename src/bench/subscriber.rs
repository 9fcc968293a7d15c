//! One subscriber connection: its own HTTP/2 connection with one `Subscribe` stream (as a browser tab
//! has), counting what arrives. When the stream ends (e.g. `RESOURCE_EXHAUSTED` after falling behind) it
//! counts a disconnect and subscribes again, fresh, so later steps of a search still have every member.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Streaming};

use super::tally::{Seen, Tally};
use super::workload::{parse_task_id, SubscriberSpec};
use crate::proto::v1::event_service_client::EventServiceClient;
use crate::proto::v1::{
    event::Payload, subscribe_response::Kind, SubscribeRequest, SubscribeResponse,
};

/// Pause before subscribing again after a stream ended.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);

/// Everything one subscriber task needs.
pub(super) struct Subscriber {
    pub(super) spec: SubscriberSpec,
    pub(super) url: String,
    pub(super) authorization: MetadataValue<Ascii>,
    /// The fan-out room's name, when it listens to one.
    pub(super) fanout_room: Option<String>,
    pub(super) seen: Arc<Mutex<Seen>>,
    pub(super) tally: Arc<Tally>,
}

/// Opens an HTTP/2 connection to `url`.
pub(super) async fn connect(url: &str, timeout: Duration) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .connect()
        .await?)
}

impl Subscriber {
    /// Connects (at most `gate`'s permits at a time), reports readiness once `Subscribed` arrived, then
    /// counts events until the task is aborted.
    pub(super) async fn run(
        self,
        ready: mpsc::UnboundedSender<Result<usize, String>>,
        gate: Arc<Semaphore>,
        timeout: Duration,
    ) {
        let opened = {
            let _permit = gate.acquire().await;
            tokio::time::timeout(timeout, self.open()).await
        };
        let (mut client, mut stream) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                let _ = ready.send(Err(format!("{e:#}")));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(format!("not subscribed within {timeout:?}")));
                return;
            }
        };
        let _ = ready.send(Ok(self.spec.idx));
        drop(ready);
        loop {
            match stream.message().await {
                Ok(Some(message)) => self.on_message(message),
                Ok(None) | Err(_) => {
                    self.tally.disconnects.fetch_add(1, Relaxed);
                    stream = loop {
                        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(timeout, self.subscribe(&mut client)).await
                        {
                            break stream;
                        }
                    };
                    self.tally.resubscribed.fetch_add(1, Relaxed);
                }
            }
        }
    }

    async fn open(
        &self,
    ) -> anyhow::Result<(EventServiceClient<Channel>, Streaming<SubscribeResponse>)> {
        let mut client =
            EventServiceClient::new(connect(&self.url, Duration::from_secs(10)).await?);
        let stream = self.subscribe(&mut client).await?;
        Ok((client, stream))
    }

    /// Opens the stream and reads up to `Subscribed`.
    async fn subscribe(
        &self,
        client: &mut EventServiceClient<Channel>,
    ) -> anyhow::Result<Streaming<SubscribeResponse>> {
        let mut request = Request::new(SubscribeRequest {
            rooms: self.spec.rooms.clone(),
            since: Default::default(),
        });
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        let mut stream = client.subscribe(request).await?.into_inner();
        loop {
            match stream.message().await? {
                Some(SubscribeResponse {
                    kind: Some(Kind::Subscribed(_)),
                }) => return Ok(stream),
                Some(message) => self.on_message(message),
                None => anyhow::bail!("the stream ended before Subscribed"),
            }
        }
    }

    fn on_message(&self, message: SubscribeResponse) {
        match message.kind {
            Some(Kind::Event(event)) => {
                let task = match &event.payload {
                    Some(Payload::Task(task)) => task,
                    Some(Payload::PresenceDiff(diff)) => {
                        self.tally.status_events.fetch_add(1, Relaxed);
                        let n = crate::statuses::diff_changes(diff).count() as u64;
                        self.tally.status_changes.fetch_add(n, Relaxed);
                        return;
                    }
                    Some(Payload::UserStatus(_)) => {
                        self.tally.status_events.fetch_add(1, Relaxed);
                        self.tally.status_changes.fetch_add(1, Relaxed);
                        return;
                    }
                    _ => return, // presence (ONLINE/OFFLINE) and the like
                };
                match (parse_task_id(&task.id), &self.fanout_room) {
                    (Some((seq, sent_ns)), Some(room)) if *room == event.room => {
                        self.tally.on_event(
                            &self.seen,
                            self.spec.idx,
                            self.spec.server,
                            seq,
                            sent_ns,
                        );
                    }
                    _ => {
                        self.tally.foreign.fetch_add(1, Relaxed);
                    }
                }
            }
            Some(Kind::Reset(_)) => {
                self.tally.resets.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
}
