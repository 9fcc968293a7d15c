//! The publish queue: one background task per [`Client`](super::Client) sends queued events one at a time,
//! in the order they were queued.
//!
//! Each event gets its idempotency key when it is queued and keeps it across retries. A failure that may
//! be temporary (`UNAVAILABLE`: server unreachable or restarting; no answer in time; a connection lost
//! mid-call, which tonic reports as `UNKNOWN` or `INTERNAL`; `RESOURCE_EXHAUSTED`) is retried with backoff,
//! which is safe even when the first attempt did reach the server: the server answers a repeated key with
//! the first id and delivers the event once. `UNAUTHENTICATED` is retried once with a refreshed token. Any
//! other status (invalid argument, permission denied...) goes back to the caller and the queue moves on. While the head of the queue waits, later events wait behind it: at
//! most [`ClientConfig::publish_queue`](super::ClientConfig::publish_queue) of them, then
//! [`PublishError::QueueFull`] hands the event back to the caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Code, Status};

use super::backoff::BackoffState;
use super::{describe, is_transient, Shared, TokenError};
use crate::proto::v1::{Event, PublishRequest};

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The queue is full (the server has been unreachable for a while, or events come faster than it takes
    /// them): here is the event back, nothing was sent.
    #[error("publish queue is full; the event was not queued")]
    QueueFull(Box<Event>),
    /// The server refused the event (invalid argument, permission denied, token refused twice...):
    /// retrying the same event will not help.
    #[error("publish refused: {}", describe(.0))]
    Rejected(Status),
    /// The server stayed unreachable for [`ClientConfig::publish_retry_for`](super::ClientConfig); the last
    /// failure. The event may have been delivered if an attempt reached the server but its answer was lost;
    /// publishing it again with the same key (see [`Client::publish_with_key`](super::Client)) is safe.
    #[error("server unavailable, gave up: {}", describe(.0))]
    Unavailable(Status),
    /// The token source failed.
    #[error("cannot get a token: {0}")]
    Token(#[from] TokenError),
    /// The client's background task is gone (its runtime is shutting down).
    #[error("the client is shut down")]
    Closed,
}

impl PublishError {
    /// The gRPC code behind the error, if any.
    pub fn code(&self) -> Option<Code> {
        match self {
            PublishError::Rejected(s) | PublishError::Unavailable(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// The outcome of one queued publish: resolves to the id the server assigned.
#[must_use = "the receipt resolves to the id; dropping it does not cancel the publish"]
pub struct PublishReceipt(oneshot::Receiver<Result<String, PublishError>>);

impl Future for PublishReceipt {
    type Output = Result<String, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(PublishError::Closed)))
    }
}

/// A random 128-bit key in hex.
pub(crate) fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

struct Queued {
    request: PublishRequest,
    /// When to stop retrying, from `publish_retry_for`.
    give_up_at: Option<Instant>,
    reply: oneshot::Sender<Result<String, PublishError>>,
}

/// The sending side of the queue; the task ends once every handle is dropped and the queue is drained.
#[derive(Clone)]
pub(crate) struct Handle {
    queue: mpsc::Sender<Queued>,
    shared: Arc<Shared>,
}

impl Handle {
    pub(crate) fn spawn(shared: Arc<Shared>) -> Self {
        let (queue, rx) = mpsc::channel(shared.config.publish_queue.max(1));
        tokio::spawn(run(shared.clone(), rx));
        Self { queue, shared }
    }

    pub(crate) fn publish(
        &self,
        event: Event,
        idempotency_key: String,
    ) -> Result<PublishReceipt, PublishError> {
        let (reply, receipt) = oneshot::channel();
        let give_up_at = self
            .shared
            .config
            .publish_retry_for
            .map(|d| Instant::now() + d);
        let item = Queued {
            request: PublishRequest {
                event: Some(event),
                idempotency_key,
            },
            give_up_at,
            reply,
        };
        match self.queue.try_send(item) {
            Ok(()) => Ok(PublishReceipt(receipt)),
            Err(mpsc::error::TrySendError::Full(item)) => Err(PublishError::QueueFull(Box::new(
                item.request.event.unwrap_or_default(),
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PublishError::Closed),
        }
    }
}

async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Queued>) {
    let mut backoff = BackoffState::new(shared.config.backoff.clone());
    while let Some(item) = queue.recv().await {
        let result = deliver(&shared, &mut backoff, &item).await;
        // The caller may have dropped the receipt: the event was still sent.
        let _ = item.reply.send(result);
    }
}

async fn deliver(
    shared: &Shared,
    backoff: &mut BackoffState,
    item: &Queued,
) -> Result<String, PublishError> {
    let mut refreshed = false;
    let mut refresh = false;
    loop {
        let request = shared.request(item.request.clone(), refresh).await?;
        refresh = false;
        let timeout = shared.config.request_timeout;
        let (generation, mut grpc) = shared.grpc();
        let status = match tokio::time::timeout(timeout, grpc.publish(request)).await {
            Ok(Ok(response)) => {
                backoff.reset();
                return Ok(response.into_inner().id);
            }
            Ok(Err(status)) => status,
            Err(_) => {
                shared.reconnect(generation);
                Status::deadline_exceeded(format!("no answer within {timeout:?}"))
            }
        };
        if status.code() == Code::Unauthenticated && !refreshed {
            refreshed = true;
            refresh = true;
            continue;
        }
        if !is_transient(&status) {
            return Err(PublishError::Rejected(status));
        }
        let mut delay = backoff.next_delay();
        if let Some(at) = item.give_up_at {
            let now = Instant::now();
            if now >= at {
                return Err(PublishError::Unavailable(status));
            }
            delay = delay.min(at - now);
        }
        tracing::debug!(error = %describe(&status), ?delay, "publish failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_128_bit_hex_and_differ() {
        let a = new_idempotency_key();
        let b = new_idempotency_key();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
