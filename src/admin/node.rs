//! The node's end of the control channel: loads the revocations in force at start, then applies every
//! command any node sends (see [`crate::bus::control`]) to this node's revocations and open streams.
//!
//! Commands are idempotent (a room is removed once, an ending is set once, revocations merge), so one
//! delivered twice (at a resubscription) changes nothing. If the control queue overflows
//! ([`CONTROL_QUEUE`] commands not applied yet), the loop subscribes again from the last command it
//! applied and replays the rest from the bus's history; when the bus says commands may have been missed
//! (`Reset`), revocations are reloaded from the bus and a warning is logged (an `Unsubscribe` or
//! `Disconnect` missed that way is lost on this node: call it again).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::LiveStreams;
use crate::bus::control::Control;
use crate::bus::{sink, Bus, BusError, Lease, Page, Recovery, RoomItem, SinkReceiver};

/// Commands queued for the control loop, not applied yet.
pub const CONTROL_QUEUE: usize = 4096;
/// Pause before subscribing the control channel again after a failure.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Loads the revocations in force and subscribes the control channel (failing when the bus cannot), then
/// applies commands in the background until `shutdown`.
pub async fn start(
    bus: Arc<dyn Bus>,
    live: Arc<LiveStreams>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut node = Node {
        bus,
        live,
        last: None,
    };
    node.reload().await?;
    let (lease, inbox) = node.attach().await?;
    tokio::spawn(node.run(lease, inbox, shutdown));
    Ok(())
}

struct Node {
    bus: Arc<dyn Bus>,
    live: Arc<LiveStreams>,
    /// Id of the last command applied: where to resume after an overflow.
    last: Option<String>,
}

impl Node {
    /// Loads the revocations in force from the bus.
    async fn reload(&self) -> Result<(), BusError> {
        let revocations = self.bus.revocations().await?;
        let count = revocations.len();
        for r in revocations {
            if let Err(e) = self.live.revocations().insert(&r) {
                tracing::error!(error = %e, "cannot hold every revocation in force");
                break;
            }
        }
        if count > 0 {
            tracing::info!(count, "revocations loaded");
        }
        Ok(())
    }

    /// Subscribes the control channel from the last command applied, applying what it missed.
    async fn attach(&mut self) -> Result<(Lease, SinkReceiver), BusError> {
        let (sink, inbox) = sink(CONTROL_QUEUE);
        let mut feed = self
            .bus
            .subscribe_control(self.last.as_deref(), &sink)
            .await?;
        if let Recovery::Reset(reason) = &feed.recovery {
            self.missed(reason).await;
        }
        loop {
            match feed.replay.next_page().await? {
                Page::Events(events) => {
                    for event in events {
                        self.apply(&event);
                    }
                }
                Page::Reset(reason) => {
                    self.missed(&reason).await;
                    break;
                }
                Page::Done => break,
            }
        }
        if self.last.is_none() {
            self.last = Some(feed.last_event_id.clone());
        }
        Ok((feed.lease, inbox))
    }

    fn apply(&mut self, event: &crate::bus::StoredEvent) {
        self.last = Some(event.id.clone());
        let cmd = match Control::from_stored(event) {
            Ok(cmd) => cmd,
            Err(reason) => {
                tracing::warn!(%reason, id = %event.id, "ignoring a control event");
                return;
            }
        };
        if let Control::Revoke(r) = &cmd {
            if let Err(e) = self.live.revocations().insert(r) {
                tracing::error!(error = %e, tenant = %r.tenant, user = %r.user, "revocation not held on this node");
            }
        }
        let streams = self.live.apply(&cmd);
        tracing::debug!(?cmd, streams, "control command applied");
    }

    async fn missed(&self, reason: &str) {
        tracing::warn!(
            %reason,
            "control commands may have been missed: revocations are reloaded; a missed Unsubscribe or \
             Disconnect does not reach this node's streams"
        );
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "reloading revocations failed");
        }
    }

    async fn run(mut self, lease: Lease, mut inbox: SinkReceiver, shutdown: CancellationToken) {
        // Held for its drop: keeps the inbox attached to the control channel.
        let mut _lease = lease;
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = inbox.recv() => item,
            };
            match item {
                Some(RoomItem::Event(event)) => self.apply(&event),
                Some(RoomItem::Reset { reason, .. }) => self.missed(&reason).await,
                None => {
                    tracing::warn!(
                        "control queue overflowed: subscribing again from the last command"
                    );
                    loop {
                        match self.attach().await {
                            Ok((l, i)) => {
                                (_lease, inbox) = (l, i);
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "subscribing the control channel failed; retrying");
                                tokio::select! {
                                    _ = shutdown.cancelled() => return,
                                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
