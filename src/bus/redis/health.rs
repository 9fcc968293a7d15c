//! Health: a real pub/sub round trip, not a PING.
//!
//! Every [`PROBE_EVERY`] the node publishes a nonce (on the command connection) to its own probe channel
//! and waits, at most the Redis timeout, for the subscriber task to receive it. The bus is healthy while
//! probes come back: that proves Redis accepts publishes *and* the subscriber connection delivers. A
//! subscriber connection that is open but wedged fails the probe too; after [`REBUILD_AFTER`] such
//! failures in a row (publish accepted, message never seen) the subscriber is told to replace it.
//!
//! The shards that hold this node's rooms matter too: while any room with a local stream is faulted (the
//! subscriber cannot re-subscribe it or read what it missed, e.g. its shard is down) the bus is unhealthy,
//! even if the probe's own shard answers.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::conn::{bounded, Conn};
use super::rooms::Command;

/// Time between probes.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Failed round trips (with the publish accepted) before the subscriber connection is replaced.
const REBUILD_AFTER: u32 = 3;

/// Everything the probe loop needs.
pub(crate) struct Prober {
    pub(crate) conn: Conn,
    pub(crate) channel: String,
    pub(crate) sharded: bool,
    pub(crate) timeout: Duration,
    pub(crate) seen: watch::Receiver<u64>,
    /// Rooms with local streams that the subscriber cannot deliver now.
    pub(crate) rooms_down: watch::Receiver<usize>,
    pub(crate) healthy: watch::Sender<bool>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) cancel: CancellationToken,
}

impl Prober {
    /// Probes until cancelled, publishing the verdict on `healthy`.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        let mut wedged = 0u32;
        let mut verdict = Probe::Ok;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {
                    nonce += 1;
                    verdict = self.probe(nonce).await;
                    if let Probe::NotReceived = verdict {
                        wedged += 1;
                        if wedged >= REBUILD_AFTER {
                            wedged = 0;
                            let _ = self.commands.send(Command::Rebuild);
                        }
                    } else {
                        wedged = 0;
                    }
                }
                changed = self.rooms_down.changed() => if changed.is_err() { return },
            }
            let rooms_down = *self.rooms_down.borrow_and_update();
            let ok = matches!(verdict, Probe::Ok) && rooms_down == 0;
            self.healthy.send_if_modified(|h| {
                let changed = *h != ok;
                if changed {
                    if ok {
                        tracing::info!("Redis bus healthy again");
                    } else {
                        tracing::warn!(?verdict, rooms_down, "Redis bus unhealthy");
                    }
                }
                *h = ok;
                changed
            });
        }
    }

    async fn probe(&mut self, nonce: u64) -> Probe {
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        let mut cmd = redis::cmd(command);
        cmd.arg(&self.channel).arg(nonce);
        let mut conn = self.conn.clone();
        let receivers: i64 =
            match bounded(self.timeout, "health probe", cmd.query_async(&mut conn)).await {
                Ok(n) => n,
                Err(_) => return Probe::Unreachable,
            };
        if receivers == 0 {
            // Our subscriber is not (yet) subscribed: it is reconnecting.
            return Probe::NotSubscribed;
        }
        let seen =
            tokio::time::timeout(self.timeout, self.seen.wait_for(|seen| *seen >= nonce)).await;
        match seen {
            Ok(Ok(_)) => Probe::Ok,
            _ => Probe::NotReceived,
        }
    }
}

#[derive(Debug)]
enum Probe {
    Ok,
    Unreachable,
    NotSubscribed,
    NotReceived,
}
