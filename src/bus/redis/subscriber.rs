//! The subscriber task: one Redis subscription per room per node (see [`super::rooms`]), fanned out in
//! memory.
//!
//! The [`Subscriber`] task owns the pub/sub connection. It turns each message into one shared
//! [`StoredEvent`](crate::bus::StoredEvent) and offers it to every local sink of the room (offers never
//! wait). Everything that waits for Redis (subscribing a room and reading where it stands, catching a
//! room up after a fault, unsubscribing) runs as a *job* beside the task, at most one per room, so one
//! slow or dead shard never stops the other rooms, nor new `Subscribe`s on healthy shards.
//!
//! A fault (the connection dropped, its push queue overflowed, or it was replaced because health probes
//! stopped coming back) marks every live room *faulted*: its live messages are held, and a job
//! re-subscribes it and reads its stream from the last event fanned out, a bounded page at a time
//! ([`CATCH_UP_PAGE_EVENTS`], about [`CATCH_UP_PAGE_BYTES`]; at most [`CATCH_UP_PAGES`] pages in flight
//! on the node), offering each page as it is read: missed events are delivered in order, duplicates
//! dropped by id, and a catch-up holds pages, never a room's whole history. When history cannot cover the
//! gap (trimmed, or Redis lost it) the room's streams get a `Reset`. A room that cannot be caught up
//! within [`RESET_AFTER`] (its shard is down) gets a `Reset` then, and is retried with backoff until it
//! recovers or its streams leave. Health (see [`super::health`]) is down while any local room is faulted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{bounded, Conn, PushQueue, PushReceiver, Target};
use super::ids::StreamId;
use super::keys::RoomKeys;
use super::rooms::{CatchUp, Command, Filled, RoomState, RoomTable};
use super::scripts::{self, RoomSettings};
use crate::bus::BusError;
use crate::metrics::{REDIS_RECONNECTS, REDIS_SUBSCRIPTIONS};

/// Pushes queued between the subscriber connection and its task (also bounded in bytes: see
/// `SubscriberParts::push_queue_bytes`); past it the task re-reads the streams.
const PUSH_QUEUE: usize = 65_536;
/// Most rooms subscribed (or caught up) in one job on a standalone Redis. In a cluster each room has its
/// own job, so that a dead shard delays only its rooms.
const SUBSCRIBE_BATCH: usize = 1024;
/// History reads in flight at once within a job.
const CONCURRENT_READS: usize = 64;
/// Most events in one page of a catch-up read.
const CATCH_UP_PAGE_EVENTS: usize = 256;
/// Bytes (stored events' encoded size) after which a catch-up page ends; a page holds at least one event,
/// so it may exceed this by one event (`--max-event-bytes`).
const CATCH_UP_PAGE_BYTES: usize = 256 * 1024;
/// Catch-up pages read (and not yet offered) at once on the node, across all jobs: what a catch-up holds
/// in memory is at most this many pages, whatever the history size and the number of rooms.
const CATCH_UP_PAGES: usize = 64;
/// Jobs in flight at once; further rooms wait their turn.
const MAX_JOBS: usize = 64;
/// Longest pause between two attempts at a room (or at a new connection).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A faulted room not caught up after this long gets a `Reset` (its streams may have missed events);
/// it is still retried, and delivers again once its shard answers.
pub(crate) const RESET_AFTER: Duration = Duration::from_secs(10);
/// Why such a room is reset.
const RESET_REASON: &str =
    "this room's Redis shard has not answered for a while; events may have been missed";

/// The task that owns the pub/sub connection. See the module docs.
pub(crate) struct Subscriber {
    parts: SubscriberParts,
    sub: Conn,
    queue: PushQueue,
    pushes: PushReceiver,
    jobs: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Rooms with a job in flight.
    busy: HashSet<Arc<str>>,
    /// Busy rooms hit by a fault after their job started: once it is applied they are caught up again.
    again: HashSet<Arc<str>>,
    /// Rooms to look at (subscribe, catch up or unsubscribe) when a job slot is free.
    todo: HashSet<Arc<str>>,
    /// Rooms (possibly) subscribed on the current connection.
    subscribed: HashSet<Arc<str>>,
    /// Faulted rooms that failed to catch up: attempts so far and when to try next.
    retry: HashMap<Arc<str>, (u32, Instant)>,
    /// Whether the health channel is subscribed on the current connection (or being subscribed).
    health: Step,
    /// Failed attempts at subscribing the health channel in a row, and when to try next.
    health_retry: (u32, Instant),
    /// Failed attempts at a new connection, or at subscribing on a standalone one, in a row.
    failures: u32,
    /// The connection must be replaced (at `wake`).
    broken: bool,
    /// When to look at retries, overdue resets and the connection again.
    wake: Option<Instant>,
    /// Permits for catch-up pages in flight (see [`CATCH_UP_PAGES`]).
    pages: Arc<Semaphore>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Needed,
    Running,
    Done,
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
    /// Local rooms that cannot be delivered now (faulted), for health.
    pub(crate) rooms_down: watch::Sender<usize>,
    pub(crate) cancel: CancellationToken,
}

/// How a room's catch-up ended (see [`catch_up_room`]).
type CatchUpResult = Result<Option<CatchUp>, BusError>;

/// A finished job.
enum Done {
    Joined(Vec<(Arc<str>, Result<scripts::ReadResult, BusError>)>),
    /// Per room: where its catch-up ended (`None`: the room no longer stands where it started).
    CaughtUp(Vec<(Arc<str>, CatchUpResult)>),
    Unsubscribed(Vec<Arc<str>>),
    Health(Result<(), BusError>),
}

fn backoff(attempts: u32) -> Duration {
    (Duration::from_millis(50) * 2u32.saturating_pow(attempts.min(8))).min(MAX_BACKOFF)
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
            jobs: FuturesUnordered::new(),
            busy: HashSet::new(),
            again: HashSet::new(),
            todo: HashSet::new(),
            subscribed: HashSet::new(),
            retry: HashMap::new(),
            health: Step::Done,
            health_retry: (0, Instant::now()),
            failures: 0,
            broken: false,
            wake: None,
            pages: Arc::new(Semaphore::new(CATCH_UP_PAGES)),
        })
    }

    /// Runs until the bus is dropped.
    pub(crate) async fn run(mut self) {
        loop {
            self.start_jobs();
            let wake = self.wake;
            tokio::select! {
                _ = self.parts.cancel.cancelled() => return,
                push = self.pushes.recv() => match push {
                    Some(push) => self.on_push(push),
                    // The connection dropped its sender: it is gone for good. Replace it.
                    None => self.replace_connection().await,
                },
                command = self.parts.commands.recv() => match command {
                    Some(command) => {
                        self.on_command(command).await;
                        // Take what queued behind it too, so a burst of joins is subscribed in few jobs.
                        for _ in 0..SUBSCRIBE_BATCH {
                            let Ok(command) = self.parts.commands.try_recv() else { break };
                            self.on_command(command).await;
                        }
                    }
                    None => return,
                },
                Some(done) = self.jobs.next(), if !self.jobs.is_empty() => self.finish(done),
                _ = sleep_until(wake), if wake.is_some() => self.tick().await,
            }
            if self.queue.take_overflow() {
                tracing::warn!("pub/sub queue overflowed: re-reading the rooms' streams");
                // A recovery like a reconnection: the rooms are read again from their streams.
                metrics::counter!(REDIS_RECONNECTS).increment(1);
                self.fault_all();
            }
        }
    }

    fn on_push(&mut self, push: PushInfo) {
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
                tracing::warn!("Redis pub/sub connection lost: re-subscribing and catching up");
                metrics::counter!(REDIS_RECONNECTS).increment(1);
                self.fault_all();
            }
            // A cluster node moved a sharded subscription away (resharding): subscribe that room again.
            PushKind::SUnsubscribe if self.parts.target.is_cluster() => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    if let Some(room) = RoomKeys::room_of_channel(channel) {
                        // Our own unsubscribes come back too, for rooms that are gone.
                        if matches!(self.parts.table.state_of(room), RoomState::Live) {
                            self.fault(&[room.into()]);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe(room) | Command::Unsubscribe(room) => {
                self.todo.insert(room);
            }
            Command::Rebuild => {
                tracing::warn!("health probes are published but not received: replacing the pub/sub connection");
                self.replace_connection().await;
            }
        }
    }

    /// Every live room lost (or may have lost) messages: catch them all up.
    fn fault_all(&mut self) {
        self.parts.table.fault(None);
        self.after_fault(self.parts.table.live_rooms());
    }

    fn fault(&mut self, rooms: &[Arc<str>]) {
        self.parts.table.fault(Some(rooms));
        self.after_fault(rooms.to_vec());
    }

    fn after_fault(&mut self, rooms: Vec<Arc<str>>) {
        for room in rooms {
            if self.busy.contains(&room) {
                self.again.insert(room);
            } else {
                self.retry.remove(&room);
                self.todo.insert(room);
            }
        }
        // Pending rooms whose subscription is in flight may have lost it too.
        for room in &self.busy {
            if matches!(self.parts.table.state_of(room), RoomState::Pending) {
                self.again.insert(room.clone());
            }
        }
        // A subscription in flight may have been lost too: the one after it decides.
        self.health = Step::Needed;
        self.wake_at(Instant::now() + RESET_AFTER);
        self.report();
    }

    fn wake_at(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    fn report(&self) {
        let down = self.parts.table.faulted_count();
        self.parts.rooms_down.send_if_modified(|n| {
            let changed = *n != down;
            if changed && down == 0 {
                tracing::info!("Redis pub/sub recovered: every room re-subscribed and caught up");
            }
            *n = down;
            changed
        });
        metrics::gauge!(REDIS_SUBSCRIPTIONS).set(self.subscribed.len() as f64);
    }

    /// Retries that are due, `Reset`s that are overdue, a connection to replace.
    async fn tick(&mut self) {
        self.wake = None;
        if self.broken {
            self.replace_connection().await;
        }
        let now = Instant::now();
        if let Some(next) = self.parts.table.reset_overdue(RESET_AFTER, RESET_REASON) {
            self.wake_at(next.into());
        }
        let mut later = Vec::new();
        for (room, (_, at)) in &self.retry {
            if *at <= now {
                self.todo.insert(room.clone());
            } else {
                later.push(*at);
            }
        }
        if self.health == Step::Needed {
            later.push(self.health_retry.1);
        }
        if let Some(at) = later.into_iter().min() {
            self.wake_at(at);
        }
    }

    /// Starts jobs for the rooms in `todo` (as many as free job slots allow).
    fn start_jobs(&mut self) {
        if self.broken {
            return;
        }
        let now = Instant::now();
        if self.health == Step::Needed && self.health_retry.1 <= now && self.jobs.len() < MAX_JOBS {
            self.health = Step::Running;
            let (mut sub, channel, timeout) = (
                self.sub.clone(),
                [self.parts.health_channel.clone()],
                self.parts.timeout,
            );
            self.jobs.push(
                async move {
                    Done::Health(
                        bounded(timeout, "subscribe (health)", sub.subscribe(&channel)).await,
                    )
                }
                .boxed(),
            );
        }
        if self.todo.is_empty() || self.jobs.len() >= MAX_JOBS {
            return;
        }
        let (mut joins, mut gaps, mut leaves) = (Vec::new(), Vec::new(), Vec::new());
        let todo: Vec<Arc<str>> = self.todo.drain().collect();
        for room in todo {
            if self.busy.contains(&room) {
                continue; // Looked at again when its job is done.
            }
            match self.parts.table.state_of(&room) {
                RoomState::Gone => {
                    self.retry.remove(&room);
                    if self.subscribed.remove(&room) {
                        leaves.push(room);
                    }
                }
                RoomState::Pending => {
                    self.retry.remove(&room);
                    joins.push(room);
                }
                // Not due yet: `tick` brings it back.
                RoomState::Faulted(epoch, delivered) => match self.retry.get(&room) {
                    Some((_, at)) if *at > now => {}
                    _ => gaps.push((room, epoch, delivered)),
                },
                RoomState::Live => {
                    self.retry.remove(&room);
                }
            }
        }
        let cluster = self.parts.target.is_cluster();
        let batch = if cluster { 1 } else { SUBSCRIBE_BATCH };
        for chunk in joins.chunks(batch) {
            if self.jobs.len() >= MAX_JOBS {
                self.todo.extend(chunk.iter().cloned());
                continue;
            }
            for room in chunk {
                self.subscribed.insert(room.clone());
                self.busy.insert(room.clone());
            }
            self.jobs.push(self.join_job(chunk.to_vec()));
        }
        for chunk in gaps.chunks(batch) {
            if self.jobs.len() >= MAX_JOBS {
                self.todo
                    .extend(chunk.iter().map(|(room, ..)| room.clone()));
                continue;
            }
            for (room, ..) in chunk {
                self.subscribed.insert(room.clone());
                self.busy.insert(room.clone());
            }
            self.jobs.push(self.catch_up_job(chunk.to_vec()));
        }
        for chunk in leaves.chunks(batch) {
            if self.jobs.len() >= MAX_JOBS {
                // Not subscribed any more as far as the next look is concerned: keep it so.
                self.subscribed.extend(chunk.iter().cloned());
                self.todo.extend(chunk.iter().cloned());
                continue;
            }
            self.busy.extend(chunk.iter().cloned());
            self.jobs.push(self.unsubscribe_job(chunk.to_vec()));
        }
        self.report();
    }

    /// Subscribes pending rooms and reads where each stands (the base for catching up later).
    fn join_job(&self, rooms: Vec<Arc<str>>) -> BoxFuture<'static, Done> {
        let (mut sub, cmd, timeout, settings) = (
            self.sub.clone(),
            self.parts.cmd.clone(),
            self.parts.timeout,
            self.parts.settings,
        );
        async move {
            let channels: Vec<String> = rooms.iter().map(|r| RoomKeys::new(r).channel).collect();
            let budget = timeout * (2 + (channels.len() / 256) as u32);
            if let Err(e) = bounded(budget, "subscribe", sub.subscribe(&channels)).await {
                let message = e.to_string();
                return Done::Joined(
                    rooms
                        .into_iter()
                        .map(|room| (room, Err(BusError::Unavailable(message.clone()))))
                        .collect(),
                );
            }
            let reads: Vec<BoxFuture<'static, Result<scripts::ReadResult, BusError>>> = rooms
                .iter()
                .map(|room| {
                    let (mut conn, room) = (cmd.clone(), room.clone());
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
            let results: Vec<_> = futures::stream::iter(reads)
                .buffered(CONCURRENT_READS)
                .collect()
                .await;
            Done::Joined(rooms.into_iter().zip(results).collect())
        }
        .boxed()
    }

    /// Re-subscribes faulted rooms and offers what each missed, page by page (see [`catch_up_room`]).
    fn catch_up_job(&self, rooms: Vec<(Arc<str>, Arc<str>, StreamId)>) -> BoxFuture<'static, Done> {
        let mut sub = self.sub.clone();
        let reader = PageReader {
            table: self.parts.table.clone(),
            conn: self.parts.cmd.clone(),
            timeout: self.parts.timeout,
            settings: self.parts.settings,
            pages: self.pages.clone(),
        };
        async move {
            let channels: Vec<String> = rooms
                .iter()
                .map(|(room, ..)| RoomKeys::new(room).channel)
                .collect();
            let budget = reader.timeout * (2 + (channels.len() / 256) as u32);
            if let Err(e) = bounded(budget, "resubscribe", sub.subscribe(&channels)).await {
                let message = e.to_string();
                return Done::CaughtUp(
                    rooms
                        .into_iter()
                        .map(|(room, ..)| (room, Err(BusError::Unavailable(message.clone()))))
                        .collect(),
                );
            }
            let names: Vec<Arc<str>> = rooms.iter().map(|(room, ..)| room.clone()).collect();
            let reads: Vec<BoxFuture<'static, CatchUpResult>> = rooms
                .into_iter()
                .map(|(room, epoch, delivered)| {
                    catch_up_room(reader.clone(), room, epoch, delivered).boxed()
                })
                .collect();
            let results: Vec<_> = futures::stream::iter(reads)
                .buffered(CONCURRENT_READS)
                .collect()
                .await;
            Done::CaughtUp(names.into_iter().zip(results).collect())
        }
        .boxed()
    }

    fn unsubscribe_job(&self, rooms: Vec<Arc<str>>) -> BoxFuture<'static, Done> {
        let (mut sub, timeout) = (self.sub.clone(), self.parts.timeout);
        async move {
            for room in &rooms {
                let channel = RoomKeys::new(room).channel;
                if let Err(e) = bounded(timeout, "unsubscribe", sub.unsubscribe(&channel)).await {
                    // A broken connection loses its subscriptions anyway.
                    tracing::debug!(room = %room, error = %e, "unsubscribe failed");
                }
            }
            Done::Unsubscribed(rooms)
        }
        .boxed()
    }

    /// Applies a finished job, and queues whatever its rooms need next.
    fn finish(&mut self, done: Done) {
        match done {
            Done::Health(result) => match result {
                Ok(()) => {
                    self.health_retry.0 = 0;
                    if self.health == Step::Running {
                        self.health = Step::Done;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "subscribing the health channel failed; retrying");
                    self.health = Step::Needed;
                    let attempts = self.health_retry.0 + 1;
                    let at = Instant::now() + backoff(attempts);
                    self.health_retry = (attempts, at);
                    self.wake_at(at);
                    self.subscribe_failed();
                }
            },
            Done::Joined(results) => {
                let mut failed = false;
                for (room, result) in results {
                    self.busy.remove(&room);
                    let fault = self.again.remove(&room);
                    match result {
                        Ok(read) => {
                            if self.parts.table.joined(&room, &read, fault) && fault {
                                self.wake_at(Instant::now() + RESET_AFTER);
                            }
                        }
                        Err(e) => {
                            failed |= matches!(e, BusError::Unavailable(_));
                            // The waiting streams fail with UNAVAILABLE.
                            self.parts.table.join_failed(&room, &e.to_string());
                        }
                    }
                    self.todo.insert(room);
                }
                if failed {
                    self.subscribe_failed();
                } else {
                    self.failures = 0;
                }
            }
            Done::CaughtUp(results) => {
                let mut recovered = 0usize;
                let mut failed = false;
                for (room, result) in results {
                    self.busy.remove(&room);
                    let again = self.again.remove(&room);
                    match result {
                        // A fault came in while it was read: still faulted (holding), read it again.
                        Ok(Some(_)) if again => {
                            self.retry.remove(&room);
                        }
                        Ok(Some(end)) => match self.parts.table.caught_up(&room, &end) {
                            Filled::Done => {
                                self.retry.remove(&room);
                                recovered += 1;
                            }
                            Filled::Again | Filled::Stale => {}
                        },
                        Ok(None) => {}
                        Err(e) => {
                            failed |= matches!(e, BusError::Unavailable(_));
                            let attempts = self.retry.get(&room).map_or(0, |(n, _)| *n) + 1;
                            if attempts == 1 || attempts.is_multiple_of(10) {
                                tracing::warn!(room = %room, error = %e, attempts, "room not caught up yet; retrying");
                            }
                            let at = Instant::now() + backoff(attempts);
                            self.retry.insert(room.clone(), (attempts, at));
                            self.wake_at(at);
                        }
                    }
                    self.todo.insert(room);
                }
                if recovered > 0 {
                    tracing::debug!(rooms = recovered, "rooms re-subscribed and caught up");
                }
                if failed {
                    self.subscribe_failed();
                } else {
                    self.failures = 0;
                }
            }
            Done::Unsubscribed(rooms) => {
                for room in rooms {
                    self.busy.remove(&room);
                    self.again.remove(&room);
                    self.todo.insert(room);
                }
            }
        }
        self.report();
    }

    /// On a standalone Redis every room shares the connection: after repeated failures to reach Redis
    /// replace it (its manager may have given up reconnecting). A cluster connection reconnects each node itself.
    fn subscribe_failed(&mut self) {
        if self.parts.target.is_cluster() {
            return;
        }
        self.failures += 1;
        if self.failures >= 2 {
            self.broken = true;
            self.wake_at(Instant::now() + backoff(self.failures));
        }
    }

    /// Replaces the subscriber connection; on failure, tries again later. Every live room is caught up
    /// on the new one.
    async fn replace_connection(&mut self) {
        let (queue, pushes) = PushQueue::new(PUSH_QUEUE, self.parts.push_queue_bytes);
        let connected = bounded(
            self.parts.timeout,
            "connect (subscriber)",
            Conn::subscriber(&self.parts.target, self.parts.timeout, queue.clone()),
        )
        .await;
        match connected {
            Ok(sub) => {
                // Pushes of the old connection are stale now: the catch-up covers them.
                self.sub = sub;
                self.queue = queue;
                self.pushes = pushes;
                self.broken = false;
                self.failures = 0;
                self.subscribed.clear();
                self.health_retry = (0, Instant::now());
                metrics::counter!(REDIS_RECONNECTS).increment(1);
                // Jobs in flight on the old connection are redone on this one (see `after_fault`).
                self.fault_all();
            }
            Err(e) => {
                self.failures += 1;
                tracing::warn!(error = %e, attempts = self.failures, "Redis pub/sub reconnect failed; retrying");
                self.broken = true;
                self.fault_all();
                self.wake_at(Instant::now() + backoff(self.failures));
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

/// What a catch-up job needs to read and offer pages.
#[derive(Clone)]
struct PageReader {
    table: Arc<RoomTable>,
    conn: Conn,
    timeout: Duration,
    settings: RoomSettings,
    pages: Arc<Semaphore>,
}

/// Offers what `room` missed after `delivered`, reading its stream a page at a time up to the last event
/// it had at the first read (later ones arrive live and are held until [`RoomTable::caught_up`]). When the
/// room's epoch changed (Redis lost it), the room's streams get a `Reset` and the new epoch's whole stream
/// follows: exactly what was accepted since; when history was trimmed past the room's position, a
/// `Reset` and what is left. Progress is kept in the room's slot: a retry after a failed read goes on
/// from the last page offered. `None` when the room no longer stands where a page was read from.
async fn catch_up_room(
    mut reader: PageReader,
    room: Arc<str>,
    epoch: Arc<str>,
    delivered: StreamId,
) -> CatchUpResult {
    let mut base = (epoch, delivered);
    let mut through: Option<StreamId> = None;
    let mut missed = 0usize;
    loop {
        let Ok(_permit) = reader.pages.acquire().await else {
            return Err(BusError::Unavailable("the node is shutting down".into()));
        };
        let bounds = scripts::Bounds {
            events: CATCH_UP_PAGE_EVENTS,
            bytes: Some(CATCH_UP_PAGE_BYTES),
            upto: through,
        };
        let read = bounded(
            reader.timeout,
            "catch-up read",
            scripts::read_page(
                &mut reader.conn,
                &room,
                Some(base.1),
                bounds,
                reader.settings,
            ),
        )
        .await?;
        let lost = *read.epoch != *base.0;
        let (reset, entries) = if lost {
            // Start over at the beginning of the new epoch, up to where it stands now.
            through = Some(read.last);
            (
                Some("Redis lost this room's history while this node was disconnected from it; events may have been missed"),
                &[][..],
            )
        } else {
            if through.is_none() {
                through = Some(read.last);
            }
            let trimmed = read.trimmed_through > base.1;
            (
                trimmed.then_some(
                    "more events were published while this node was disconnected from Redis than the room's history keeps",
                ),
                &read.entries[..],
            )
        };
        let Some(now) = reader
            .table
            .fill_page(&room, &base, reset, &read.epoch, entries)
        else {
            return Ok(None);
        };
        missed += entries.len();
        base = now;
        let end = through.unwrap_or_default();
        if !lost && (entries.is_empty() || base.1 >= end) {
            if missed > 0 {
                tracing::info!(room = %room, missed, "delivered events missed during a fault");
            }
            return Ok(Some(CatchUp { base, through: end }));
        }
    }
}
