//! The publishing service: unary `Publish` calls multiplexed on one HTTP/2 connection, at most
//! `--max-in-flight` unanswered, each event numbered within its room.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::Request;

use super::tally::{lock, Tally};
use super::workload::{project_room, TaskTemplate};
use crate::proto::v1::event_service_client::EventServiceClient;
use crate::proto::v1::PublishRequest;

pub(super) struct Publisher {
    client: EventServiceClient<Channel>,
    authorization: MetadataValue<Ascii>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    template: TaskTemplate,
    rooms: Vec<String>,
    /// Next sequence number per room.
    next_seq: Vec<u64>,
    tally: Arc<Tally>,
}

impl Publisher {
    pub(super) async fn connect(
        url: &str,
        authorization: MetadataValue<Ascii>,
        rooms: usize,
        payload_bytes: usize,
        max_in_flight: usize,
        tally: Arc<Tally>,
    ) -> anyhow::Result<Self> {
        let channel = super::subscriber::connect(url, Duration::from_secs(10)).await?;
        Ok(Self {
            client: EventServiceClient::new(channel),
            authorization,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            template: TaskTemplate::new(payload_bytes),
            rooms: (0..rooms).map(project_room).collect(),
            next_seq: vec![0; rooms],
            tally,
        })
    }

    /// The sequence number the next event of room `k` gets.
    pub(super) fn next_seq(&self, k: usize) -> u64 {
        self.next_seq[k]
    }

    /// Publishes the next event of room `k` without waiting for the answer (but for a free in-flight
    /// slot first). Returns its send time.
    pub(super) async fn send(&mut self, k: usize) -> anyhow::Result<u64> {
        let permit = self.in_flight.clone().acquire_owned().await?;
        let seq = self.next_seq[k];
        self.next_seq[k] += 1;
        let sent_ns = self.tally.now_ns();
        let mut request = Request::new(PublishRequest {
            event: Some(self.template.event(&self.rooms[k], k, seq, sent_ns)),
            idempotency_key: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        let mut client = self.client.clone();
        let tally = self.tally.clone();
        tokio::spawn(async move {
            let result = client.publish(request).await;
            if let Err(status) = &result {
                lock(&tally.first_publish_error).get_or_insert_with(|| status.to_string());
            }
            tally.on_ack(k, seq, sent_ns, result.is_ok());
            drop(permit);
        });
        Ok(sent_ns)
    }

    /// Publishes sent and not answered yet.
    pub(super) fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }
}
