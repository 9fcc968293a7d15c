//! The subscriber task: one Redis subscription per room per node (see [`super::rooms`]), fanned out in
//! memory.
//!
//! The [`Subscriber`] task owns the pub/sub connection. It turns each message into one shared
//! [`StoredEvent`] and offers it to every local sink of the room (offers never wait). When the connection
//! drops (a `Disconnection` push), overflows its queue or stops answering health probes, it reconnects
//! with backoff, re-subscribes every active room, then reads each room's stream from the last event it
//! fanned out: missed events are delivered in order, duplicates dropped by id, and when the history cannot
//! cover the gap (trimmed, or Redis lost it) the room's streams get a `Reset`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::conn::{bounded, Conn, PushQueue, PushReceiver, Target};
use super::ids::StreamId;
use super::keys::RoomKeys;
use super::rooms::{lock, Command, Gap, RoomTable, SlotState};
use super::scripts::{self, RoomSettings};
use crate::bus::BusError;
use crate::metrics::{REDIS_RECONNECTS, REDIS_SUBSCRIPTIONS, ROOMS_LOCAL};

/// Pushes queued between the subscriber connection and its task (also bounded in bytes: see
/// `SubscriberParts::push_queue_bytes`); past it the task re-reads the streams.
const PUSH_QUEUE: usize = 65_536;
/// Most pending rooms subscribed in one batch.
const SUBSCRIBE_BATCH: usize = 1024;
/// History reads in flight at once when a batch of rooms is subscribed.
const CONCURRENT_READS: usize = 64;
/// Longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The task that owns the pub/sub connection. See the module docs.
pub(crate) struct Subscriber {
    parts: SubscriberParts,
    sub: Conn,
    queue: PushQueue,
    pushes: PushReceiver,
    /// Commands taken off the queue while batching subscriptions, handled next.
    backlog: VecDeque<Command>,
}

/// Everything the subscriber task needs besides its connection.
pub(crate) struct SubscriberParts {
    pub(crate) table: Arc<RoomTable>,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) target: Target,
    pub(crate) timeout: Duration,
    /// The command connection, for reading streams.
    pub(crate) cmd: Conn,
    pub(crate) settings: RoomSettings,
    /// This node's probe channel; the nonces received go to `probe_seen`.
    pub(crate) health_channel: String,
    pub(crate) probe_seen: watch::Sender<u64>,
    /// Bound on the pushes queued, in bytes (`--redis-push-queue-bytes`).
    pub(crate) push_queue_bytes: usize,
    pub(crate) cancel: CancellationToken,
}

impl Subscriber {
    /// Connects the subscriber and subscribes to the probe channel.
    pub(crate) async fn connect(parts: SubscriberParts) -> Result<Self, BusError> {
        let (queue, pushes) = PushQueue::new(PUSH_QUEUE, parts.push_queue_bytes);
        let mut sub = bounded(
            parts.timeout,
            "connect (subscriber)",
            Conn::subscriber(&parts.target, parts.timeout, queue.clone()),
        )
        .await?;
        let channel = [parts.health_channel.clone()];
        bounded(parts.timeout, "subscribe (health)", sub.subscribe(&channel)).await?;
        Ok(Self {
            parts,
            sub,
            queue,
            pushes,
            backlog: VecDeque::new(),
        })
    }

    /// Runs until the bus is dropped.
    pub(crate) async fn run(mut self) {
        loop {
            if let Some(command) = self.backlog.pop_front() {
                self.on_command(command).await;
                continue;
            }
            tokio::select! {
                _ = self.parts.cancel.cancelled() => return,
                push = self.pushes.recv() => match push {
                    Some(push) => self.on_push(push).await,
                    // The connection dropped its sender: it is gone for good. Replace it.
                    None => self.recover(true).await,
                },
                command = self.parts.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => return,
                },
            }
            if self.queue.take_overflow() {
                tracing::warn!("pub/sub queue overflowed: re-reading the rooms' streams");
                self.recover(false).await;
            }
        }
    }

    async fn on_push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let [Value::BulkString(channel), Value::BulkString(message)] = &push.data[..]
                else {
                    return;
                };
                if channel.as_slice() == self.parts.health_channel.as_bytes() {
                    if let Some(nonce) = std::str::from_utf8(message)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        self.parts.probe_seen.send_if_modified(|seen| {
                            let newer = nonce > *seen;
                            if newer {
                                *seen = nonce;
                            }
                            newer
                        });
                    }
                } else if let Some(room) = RoomKeys::room_of_channel(channel) {
                    self.parts.table.deliver(room, message);
                }
            }
            PushKind::Disconnection => {
                tracing::warn!("Redis pub/sub connection lost: reconnecting");
                self.recover(false).await;
            }
            // A cluster node moved a sharded subscription away (resharding): subscribe again.
            PushKind::SUnsubscribe if self.parts.target.is_cluster() => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    let live = RoomKeys::room_of_channel(channel).is_some_and(|room| {
                        self.parts.table.live_rooms().iter().any(|r| &**r == room)
                    });
                    if live {
                        self.recover(false).await;
                    }
                }
            }
            _ => {}
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe(room) => self.subscribe(room).await,
            Command::Unsubscribe(room) => {
                if lock(&self.parts.table.slots).contains_key(&room) {
                    return; // Joined again meanwhile; its Subscribe follows.
                }
                let channel = RoomKeys::new(&room).channel;
                if let Err(e) = bounded(
                    self.parts.timeout,
                    "unsubscribe",
                    self.sub.unsubscribe(&channel),
                )
                .await
                {
                    // A broken connection loses its subscriptions anyway; recovery resubscribes live rooms only.
                    tracing::debug!(room = %room, error = %e, "unsubscribe failed");
                }
                self.count_subscriptions();
            }
            Command::Rebuild => {
                tracing::warn!("health probes are published but not received: replacing the pub/sub connection");
                self.recover(true).await;
            }
        }
    }

    /// Subscribes pending rooms (`first` and the subscriptions queued right behind it, in one batch, so a
    /// burst of streams joining many rooms costs few round trips), reads where each room stands (the
    /// base for catching up later) and releases the streams waiting for them.
    async fn subscribe(&mut self, first: Arc<str>) {
        let mut rooms = vec![first];
        while rooms.len() < SUBSCRIBE_BATCH {
            match self.parts.commands.try_recv() {
                Ok(Command::Subscribe(room)) => rooms.push(room),
                Ok(other) => {
                    self.backlog.push_back(other);
                    break;
                }
                Err(_) => break,
            }
        }
        rooms.retain(|room| {
            matches!(
                lock(&self.parts.table.slots).get(room).map(|s| &s.state),
                Some(SlotState::Pending(_))
            )
        });
        if rooms.is_empty() {
            return;
        }
        let channels: Vec<String> = rooms.iter().map(|r| RoomKeys::new(r).channel).collect();
        let budget = self.parts.timeout * (2 + (channels.len() / 256) as u32);
        let subscribed = bounded(budget, "subscribe", self.sub.subscribe(&channels)).await;
        let reads: Vec<Result<scripts::ReadResult, BusError>> = match subscribed {
            Ok(()) => {
                let (timeout, settings) = (self.parts.timeout, self.parts.settings);
                let reads: Vec<BoxFuture<'static, Result<scripts::ReadResult, BusError>>> = rooms
                    .iter()
                    .map(|room| {
                        let (mut conn, room) = (self.parts.cmd.clone(), room.clone());
                        async move {
                            bounded(
                                timeout,
                                "read",
                                scripts::read(&mut conn, &room, None, settings),
                            )
                            .await
                        }
                        .boxed()
                    })
                    .collect();
                futures::stream::iter(reads)
                    .buffered(CONCURRENT_READS)
                    .collect()
                    .await
            }
            Err(e) => {
                let message = e.to_string();
                rooms
                    .iter()
                    .map(|_| Err(BusError::Unavailable(message.clone())))
                    .collect()
            }
        };
        // Decide under the lock, await after it.
        let mut unsubscribe = Vec::new();
        {
            let mut slots = lock(&self.parts.table.slots);
            for ((room, channel), result) in rooms.iter().zip(channels).zip(reads) {
                let waiters = match slots.get_mut(room).map(|slot| &mut slot.state) {
                    // Everyone left while we subscribed.
                    None => {
                        unsubscribe.push(channel);
                        continue;
                    }
                    Some(SlotState::Pending(waiters)) => std::mem::take(waiters),
                    Some(SlotState::Live { .. }) => continue,
                };
                match result {
                    Ok(read) => {
                        if let Some(slot) = slots.get_mut(room) {
                            slot.state = SlotState::Live {
                                epoch: read.epoch.into(),
                                delivered: read.last,
                            };
                        }
                        for w in waiters {
                            let _ = w.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        // The waiting streams fail with UNAVAILABLE; their leases find no slot.
                        slots.remove(room);
                        metrics::gauge!(ROOMS_LOCAL).decrement(1.0);
                        let message = e.to_string();
                        for w in waiters {
                            let _ = w.send(Err(message.clone()));
                        }
                        unsubscribe.push(channel);
                    }
                }
            }
        }
        for channel in unsubscribe {
            let _ = bounded(
                self.parts.timeout,
                "unsubscribe",
                self.sub.unsubscribe(&channel),
            )
            .await;
        }
        self.count_subscriptions();
    }

    fn count_subscriptions(&self) {
        metrics::gauge!(REDIS_SUBSCRIPTIONS).set(self.parts.table.live_rooms().len() as f64);
    }

    /// Re-subscribes every live room and fills each room's gap from its stream, retrying with backoff
    /// until it succeeds (or the bus is dropped). With `fresh`, first replaces the connection.
    async fn recover(&mut self, mut fresh: bool) {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            if self.parts.cancel.is_cancelled() {
                return;
            }
            attempt += 1;
            match self.try_recover(fresh).await {
                Ok(rooms) => {
                    metrics::counter!(REDIS_RECONNECTS).increment(1);
                    self.count_subscriptions();
                    tracing::info!(
                        rooms,
                        attempt,
                        "Redis pub/sub recovered: rooms resubscribed and caught up"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "Redis pub/sub recovery failed; retrying");
                    // After two failed attempts on the old connection, start from a new one.
                    fresh = fresh || attempt >= 2;
                    tokio::select! {
                        _ = self.parts.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn try_recover(&mut self, fresh: bool) -> Result<usize, BusError> {
        if fresh {
            let (queue, pushes) = PushQueue::new(PUSH_QUEUE, self.parts.push_queue_bytes);
            let sub = bounded(
                self.parts.timeout,
                "connect (subscriber)",
                Conn::subscriber(&self.parts.target, self.parts.timeout, queue.clone()),
            )
            .await?;
            // Pushes of the old connection are stale now: the catch-up below covers them.
            self.sub = sub;
            self.queue = queue;
            self.pushes = pushes;
        }
        let rooms = self.parts.table.live_rooms();
        let mut channels = Vec::with_capacity(rooms.len() + 1);
        channels.push(self.parts.health_channel.clone());
        channels.extend(rooms.iter().map(|r| RoomKeys::new(r).channel));
        let budget = self.parts.timeout * (2 + (channels.len() / 256) as u32);
        bounded(budget, "resubscribe", self.sub.subscribe(&channels)).await?;
        self.catch_up(&rooms).await?;
        Ok(rooms.len())
    }

    /// Offers what each live room missed since the last event it fanned out, or a `Reset` when history
    /// cannot cover it. Live messages still queued are dropped by id when they arrive.
    async fn catch_up(&mut self, rooms: &[Arc<str>]) -> Result<(), BusError> {
        let mut bases = Vec::with_capacity(rooms.len());
        {
            let slots = lock(&self.parts.table.slots);
            for room in rooms {
                if let Some(SlotState::Live { epoch, delivered }) =
                    slots.get(room).map(|s| &s.state)
                {
                    bases.push((room.clone(), epoch.clone(), *delivered));
                }
            }
        }
        let (timeout, settings) = (self.parts.timeout, self.parts.settings);
        let reads: Vec<BoxFuture<'static, Result<Gap, BusError>>> = bases
            .into_iter()
            .map(|(room, epoch, delivered)| {
                let conn = self.parts.cmd.clone();
                read_gap(conn, timeout, settings, room, epoch, delivered).boxed()
            })
            .collect();
        let gaps: Vec<Result<Gap, BusError>> = futures::stream::iter(reads)
            .buffered(CONCURRENT_READS)
            .collect()
            .await;
        for gap in gaps {
            self.parts.table.fill(gap?);
        }
        Ok(())
    }
}

/// Reads `room`'s stream after `delivered`. When the room's epoch changed (Redis lost it), reads the new
/// epoch's whole stream instead: exactly what was accepted since.
async fn read_gap(
    mut conn: Conn,
    timeout: Duration,
    settings: RoomSettings,
    room: Arc<str>,
    epoch: Arc<str>,
    delivered: StreamId,
) -> Result<Gap, BusError> {
    let what = "catch-up read";
    let mut read = bounded(
        timeout,
        what,
        scripts::read(&mut conn, &room, Some(delivered), settings),
    )
    .await?;
    let reset = if *read.epoch != *epoch {
        read = bounded(
            timeout,
            what,
            scripts::read(&mut conn, &room, Some(StreamId::default()), settings),
        )
        .await?;
        Some("Redis lost this room's history while this node was disconnected from it; events may have been missed")
    } else if read.trimmed_through > delivered {
        Some("more events were published while this node was disconnected from Redis than the room's history keeps")
    } else {
        None
    };
    Ok(Gap {
        room,
        base: (epoch, delivered),
        reset,
        read,
    })
}
