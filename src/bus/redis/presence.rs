//! Cluster-wide presence: who is connected to which room, across every node.
//!
//! Each open stream of a user is a *connection* `{node}/{id}` (ids are `{boot}-{n}`, unique across
//! restarts of the node). It is recorded
//! - in each room's sorted set (`{node}/{id}/{user}`), scored by its expiry, which `GetPresence` reads;
//! - in the user's sorted set in the tenant room's slot, whose count decides ONLINE/OFFLINE: the connect
//!   and disconnect scripts change it and decide the transition atomically, once per transition whichever
//!   nodes the user's streams are on, and mark the user dirty in the tenant; this node then settles the
//!   tenant's statuses into one `user.status` event a window later ([`crate::statuses`]);
//! - in the node's hash of connections, read by whoever reaps the node after it died.
//!
//! A connection is tracked locally before anything is written, so a disconnect always undoes a connect,
//! even one that was cancelled or failed half-way. Every node refreshes the expiry of all its connections
//! every `ttl / 3` (which also restores them after Redis lost its data), and, on its own timer, its entry
//! in the node registry every `ttl / 6`, which lives `ttl / 2`.
//!
//! How a node's connections end:
//! - **Graceful shutdown**: [`Presence::shutdown`] removes them all (OFFLINE for users with no other
//!   connection) and takes the node out of the registry, within the shutdown grace period.
//! - **Crash** (SIGKILL, lost host): the first live node that sees the registry entry expired reaps it:
//!   removes its connections and decides OFFLINE (published by its next settle), at most `2 * ttl / 3` after the node's last refresh
//!   (a node whose own previous refresh is not recent, e.g. after a Redis outage, reaps nobody yet);
//!   without any live node, the room entries still drop out of `GetPresence` `ttl` after the last
//!   heartbeat.
//! - **Restart under the same node id**: the new run's first heartbeat removes the entries it does not
//!   know, those of the earlier run.
//!
//! Expiries use each node's wall clock: keep node clocks within a few seconds (NTP). Node ids must be
//! unique among running nodes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::conn::{bounded, Conn};
use super::keys::{self, RoomKeys};
use super::scripts;
use crate::bus::BusError;
use crate::presence::{Member, PageRequest, PresenceSnapshot};
use crate::statuses::StatusWindow;

/// Redis calls the heartbeat runs at once.
const CONCURRENCY: usize = 64;
/// Closed connections whose removal failed (Redis down), retried on each heartbeat. Past it the oldest
/// are forgotten: their entries still expire by themselves.
const MAX_PENDING_REMOVALS: usize = 100_000;
/// Dead nodes reaped per heartbeat.
const REAP_PER_BEAT: isize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch, by this node's clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A connection as stored in the node's hash, for the reaper.
#[derive(Debug, Serialize, Deserialize)]
struct StoredConnection {
    user: String,
    tenant: String,
    rooms: Vec<String>,
}

#[derive(Clone)]
struct LocalConnection {
    member: Member,
    rooms: Vec<String>,
}

impl LocalConnection {
    /// Its record in the node's hash (for whoever cleans up after the node).
    fn stored_json(&self) -> String {
        serde_json::to_string(&StoredConnection {
            user: self.member.user_id.clone(),
            tenant: self.member.tenant.clone(),
            rooms: self.rooms.clone(),
        })
        .unwrap_or_default()
    }
}

/// This node's share of the presence state.
pub(crate) struct Presence {
    node: Arc<str>,
    ttl: Duration,
    timeout: Duration,
    /// Where decided transitions are marked for the tenant's next status event.
    statuses: Arc<StatusWindow>,
    local: Mutex<HashMap<String, LocalConnection>>,
    pending_removals: Mutex<Vec<LocalConnection>>,
    /// Held by a heartbeat while it writes, and by [`Presence::shutdown`], which sets it: no heartbeat
    /// writes after the node said goodbye.
    closed: tokio::sync::RwLock<bool>,
    /// Cancelled by [`Presence::shutdown`] to stop a connection refresh in flight rather than wait for it.
    closing: CancellationToken,
    /// When this node last refreshed its registry entry (monotonic clock).
    last_refresh: Mutex<Option<std::time::Instant>>,
}

impl Presence {
    /// Presence of node `node`, whose entries expire `ttl` after the last heartbeat.
    pub(crate) fn new(
        node: Arc<str>,
        ttl: Duration,
        timeout: Duration,
        statuses: Arc<StatusWindow>,
    ) -> Self {
        Self {
            node,
            ttl,
            timeout,
            statuses,
            local: Mutex::new(HashMap::new()),
            pending_removals: Mutex::new(Vec::new()),
            closed: tokio::sync::RwLock::new(false),
            closing: CancellationToken::new(),
            last_refresh: Mutex::new(None),
        }
    }

    /// How long the node's registry entry outlives its last refresh: half the TTL, refreshed every sixth
    /// of it ([`Self::run`]), so two refreshes may be missed before live nodes take this one for dead.
    fn node_ttl_ms(&self) -> u64 {
        self.ttl_ms() / 2
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    fn room_member(&self, member: &Member) -> String {
        format!("{}/{}/{}", self.node, member.connection_id, member.user_id)
    }

    /// Records a connection everywhere (see the module docs); ONLINE if it is the user's first.
    ///
    /// The connection is tracked locally before anything is written, so that a [`Self::disconnect`] after
    /// this future was polled once (even if it was then dropped, or failed) removes whatever it wrote.
    pub(crate) async fn connect(
        &self,
        conn: &Conn,
        member: &Member,
        rooms: &[String],
    ) -> Result<(), BusError> {
        let local = LocalConnection {
            member: member.clone(),
            rooms: rooms.to_vec(),
        };
        lock(&self.local).insert(member.connection_id.clone(), local.clone());
        bounded(
            self.timeout,
            "presence connect",
            self.record(conn, &local, now_ms()),
        )
        .await?;
        Ok(())
    }

    /// Writes (or refreshes) one connection's entries.
    async fn record(
        &self,
        conn: &Conn,
        local: &LocalConnection,
        now: u64,
    ) -> Result<(), redis::RedisError> {
        let expiry = now + self.ttl_ms();
        let member = self.room_member(&local.member);
        let ttl = self.ttl_ms() as i64;
        let mut steps: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> =
            Vec::with_capacity(local.rooms.len() + 2);
        for room in &local.rooms {
            let (key, member, mut c) = (RoomKeys::new(room).presence, member.clone(), conn.clone());
            steps.push(
                async move {
                    redis::pipe()
                        .zadd(&key, &member, expiry)
                        .ignore()
                        .pexpire(&key, ttl)
                        .ignore()
                        .exec_async(&mut c)
                        .await
                }
                .boxed(),
            );
        }
        let stored = local.stored_json();
        let (node_key, id, mut c) = (
            keys::node_connections(&self.node),
            &local.member.connection_id,
            conn.clone(),
        );
        steps.push(
            async move {
                redis::pipe()
                    .hset(&node_key, id, stored)
                    .ignore()
                    .pexpire(&node_key, ttl * 3)
                    .ignore()
                    .exec_async(&mut c)
                    .await
            }
            .boxed(),
        );
        let mut c = conn.clone();
        steps.push(
            async move {
                // A heartbeat finds the user not online when Redis forgot them: ONLINE again.
                let decided = scripts::connect(
                    &mut c,
                    &self.node,
                    &local.member,
                    now,
                    self.ttl_ms(),
                    self.statuses.enabled(),
                )
                .await?;
                if decided {
                    self.statuses.mark(&local.member.tenant);
                }
                Ok(())
            }
            .boxed(),
        );
        for result in futures::future::join_all(steps).await {
            result?;
        }
        Ok(())
    }

    /// Removes a connection; OFFLINE if it was the user's last anywhere. When Redis cannot be reached the
    /// removal is retried by the heartbeat (meanwhile the entries expire by themselves).
    pub(crate) async fn disconnect(&self, conn: &Conn, member: &Member) -> Result<(), BusError> {
        let Some(local) = lock(&self.local).remove(&member.connection_id) else {
            return Ok(());
        };
        let result = bounded(
            self.timeout,
            "presence disconnect",
            self.remove(conn, &self.node, &local.member, &local.rooms),
        )
        .await;
        if result.is_err() {
            let mut pending = lock(&self.pending_removals);
            if pending.len() >= MAX_PENDING_REMOVALS {
                pending.remove(0);
            }
            pending.push(local);
        }
        result
    }

    /// The connection left `room`: out of the room's set and of the node hash's record, and no longer
    /// refreshed there by the heartbeat. On failure its entry expires by itself.
    pub(crate) async fn leave(
        &self,
        conn: &Conn,
        member: &Member,
        room: &str,
    ) -> Result<(), BusError> {
        let stored = {
            let mut local = lock(&self.local);
            let Some(connection) = local.get_mut(&member.connection_id) else {
                return Ok(());
            };
            connection.rooms.retain(|r| r != room);
            connection.stored_json()
        };
        // Two commands, not one pipeline: the room's set and the node's hash are in different slots of a
        // cluster (as in `record`).
        let mut c = conn.clone();
        let mut room_set = redis::cmd("ZREM");
        room_set
            .arg(RoomKeys::new(room).presence)
            .arg(self.room_member(member));
        bounded(self.timeout, "presence leave", room_set.exec_async(&mut c)).await?;
        let mut record = redis::cmd("HSET");
        record
            .arg(keys::node_connections(&self.node))
            .arg(&member.connection_id)
            .arg(stored);
        bounded(self.timeout, "presence leave", record.exec_async(&mut c)).await
    }

    /// Users and connections in `room`, across all nodes, and the page of users `page` asks for.
    ///
    /// Reads the room's live entries in one command and pages them here: the totals need every entry
    /// anyway (users are distinct across connections and nodes), so this costs O(connections in the
    /// room) in Redis and on the wire to this node, O(page) in the response.
    pub(crate) async fn snapshot(
        &self,
        conn: &Conn,
        room: &str,
        page: &PageRequest,
    ) -> Result<PresenceSnapshot, BusError> {
        let key = RoomKeys::new(room).presence;
        let mut c = conn.clone();
        let members: Vec<String> = bounded(
            self.timeout,
            "presence read",
            c.zrangebyscore(&key, now_ms(), "+inf"),
        )
        .await?;
        let mut users = BTreeSet::new();
        let mut connections = 0u32;
        for m in &members {
            // `{node}/{connection}/{user}`: node ids and connection ids contain no '/'.
            if let Some(user) = m.splitn(3, '/').nth(2) {
                users.insert(user.to_owned());
                connections = connections.saturating_add(1);
            }
        }
        let from = match &page.after {
            Some(after) => users
                .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => users.range::<String, _>(..),
        };
        Ok(PresenceSnapshot::page(from, users.len(), connections, page))
    }

    /// Until `cancel` or [`Self::shutdown`]: refreshes the node's registry entry and reaps dead nodes every
    /// sixth of the TTL, and refreshes every local connection every third of it (see the module docs).
    /// The two run side by side, so a long refresh of many connections never delays the registry entry.
    pub(crate) async fn run(self: Arc<Self>, conn: Conn, cancel: CancellationToken) {
        let this: &Self = &self;
        let conn = &conn;
        let previous_run_cleared = std::sync::atomic::AtomicBool::new(false);
        let cleared = &previous_run_cleared;
        tokio::join!(
            // Not interrupted by shutdown: a reap stopped half-way would leave a dead node's users online.
            this.repeat(
                this.ttl / 6,
                &cancel,
                false,
                "node registry refresh",
                || { this.watch_nodes(conn).boxed() }
            ),
            // Interrupted by shutdown: commands already sent reach Redis before the shutdown's removals
            // (one connection per shard keeps the order), and those not sent never will be.
            this.repeat(this.ttl / 3, &cancel, true, "presence heartbeat", || {
                async move {
                    if !cleared.load(Ordering::Relaxed) {
                        this.clear_unknown_entries(conn).await?;
                        cleared.store(true, Ordering::Relaxed);
                    }
                    this.beat(conn).await
                }
                .boxed()
            }),
        );
    }

    /// Runs `step` every `every` (bounded by it, so a wedged Redis cannot stall the next ones) until
    /// `cancel` or shutdown. An `interruptible` step in flight is dropped when shutdown begins.
    async fn repeat<'a>(
        &'a self,
        every: Duration,
        cancel: &CancellationToken,
        interruptible: bool,
        what: &'static str,
        mut step: impl FnMut() -> BoxFuture<'a, Result<(), redis::RedisError>>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let closed = self.closed.read().await;
            if *closed {
                return;
            }
            let step = tokio::time::timeout(every.max(self.timeout), step());
            let outcome = if interruptible {
                tokio::select! {
                    outcome = step => outcome,
                    _ = self.closing.cancelled() => return,
                }
            } else {
                step.await
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "{what} failed"),
                Err(_) => tracing::warn!("{what} timed out"),
            }
        }
    }

    /// Refreshes this node's registry entry, then reaps the nodes whose entry expired, but only if this
    /// node's own previous refresh is recent: after an outage of Redis every node's entry has expired, and
    /// the node that gets through first must not take all the others for dead.
    async fn watch_nodes(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        let now = now_ms();
        let mut c = conn.clone();
        let _: () = c
            .zadd(keys::nodes(), &*self.node, now + self.node_ttl_ms())
            .await?;
        let previous = lock(&self.last_refresh).replace(std::time::Instant::now());
        let node_ttl = Duration::from_millis(self.node_ttl_ms());
        if previous.is_some_and(|at| at.elapsed() < node_ttl) {
            self.reap(conn, now).await?;
        }
        Ok(())
    }

    /// Refreshes every local connection, then retries failed removals.
    async fn beat(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        let now = now_ms();
        let locals: Vec<LocalConnection> = lock(&self.local).values().cloned().collect();
        let beats: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> = locals
            .into_iter()
            .map(|l| {
                async move {
                    self.record(conn, &l, now).await?;
                    // The stream ended while it was being refreshed: its removal may have run before
                    // this refresh and been undone by it. Remove it again (removal is idempotent).
                    if !lock(&self.local).contains_key(&l.member.connection_id) {
                        self.remove(conn, &self.node, &l.member, &l.rooms).await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(beats)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e);
        }
        self.retry_removals(conn).await;
        Ok(())
    }

    /// Removes this node's entries that it does not know: those of an earlier run under the same node id
    /// (killed before it could say goodbye, and not reaped because this run keeps the node id alive).
    /// Safe at any time: a connection is tracked locally before its entry is written, and removal is
    /// idempotent.
    async fn clear_unknown_entries(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        let mut c = conn.clone();
        let stored: HashMap<String, String> = c.hgetall(keys::node_connections(&self.node)).await?;
        let unknown: Vec<(String, String)> = {
            let local = lock(&self.local);
            stored
                .into_iter()
                .filter(|(id, _)| !local.contains_key(id))
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let removed = self.remove_stored(conn, &self.node, unknown).await?;
        tracing::info!(node = %self.node, connections = removed, "removed the connections of an earlier run of this node");
        Ok(())
    }

    /// Says goodbye: removes every connection of this node (OFFLINE for users with no other) and its
    /// registry entry, and stops the heartbeats. If Redis fails part of it, the node's registry entry is
    /// marked expired instead, so that live nodes reap the rest at once. Returns the connections removed.
    pub(crate) async fn shutdown(&self, conn: &Conn) -> Result<usize, BusError> {
        self.closing.cancel();
        let mut closed = self.closed.write().await;
        *closed = true;
        let mut gone: Vec<LocalConnection> = lock(&self.local).drain().map(|(_, l)| l).collect();
        gone.append(&mut lock(&self.pending_removals));
        let count = gone.len();
        let removals: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> = gone
            .iter()
            .map(|l| self.remove(conn, &self.node, &l.member, &l.rooms).boxed())
            .collect();
        let results: Vec<_> = futures::stream::iter(removals)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut c = conn.clone();
        let result = match results.into_iter().find_map(Result::err) {
            None => self.remove_the_rest(conn).await,
            Some(e) => Err(e),
        };
        let result = match result {
            // Two commands, not a pipeline: in a cluster the keys are on different slots.
            Ok(strays) => match c.zrem::<_, _, ()>(keys::nodes(), &*self.node).await {
                Ok(()) => c
                    .del::<_, ()>(keys::node_connections(&self.node))
                    .await
                    .map(|()| count + strays),
                Err(e) => Err(e),
            },
            Err(e) => {
                let _: Result<(), _> = c.zadd(keys::nodes(), &*self.node, 0).await;
                Err(e)
            }
        };
        result.map_err(|e| BusError::Unavailable(format!("presence clean-up: {e}")))
    }

    /// Removes what is still in the node's hash after the local connections were removed: a connection
    /// that ended during the heartbeat that shutdown interrupted may have been written back by it.
    async fn remove_the_rest(&self, conn: &Conn) -> Result<usize, redis::RedisError> {
        let mut c = conn.clone();
        let rest: HashMap<String, String> = c.hgetall(keys::node_connections(&self.node)).await?;
        self.remove_stored(conn, &self.node, rest.into_iter().collect())
            .await
    }

    async fn retry_removals(&self, conn: &Conn) {
        let pending = std::mem::take(&mut *lock(&self.pending_removals));
        if pending.is_empty() {
            return;
        }
        let node = &self.node;
        let retries: Vec<BoxFuture<'_, Option<LocalConnection>>> = pending
            .into_iter()
            .map(|l| {
                async move {
                    match self.remove(conn, node, &l.member, &l.rooms).await {
                        Ok(()) => None,
                        Err(_) => Some(l),
                    }
                }
                .boxed()
            })
            .collect();
        let failed: Vec<LocalConnection> = futures::stream::iter(retries)
            .buffer_unordered(CONCURRENCY)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        lock(&self.pending_removals).extend(failed);
    }

    /// Reaps nodes whose registry entry expired: one live node wins each (ZREM returns 1 to one caller).
    /// If the reaping fails half-way the node is put back, expired, for the next try.
    async fn reap(&self, conn: &Conn, now: u64) -> Result<(), redis::RedisError> {
        let mut c = conn.clone();
        let dead: Vec<String> = c
            .zrangebyscore_limit(keys::nodes(), "-inf", now, 0, REAP_PER_BEAT)
            .await?;
        for node in dead {
            if *node == *self.node {
                continue;
            }
            let won: i64 = c.zrem(keys::nodes(), &node).await?;
            if won == 0 {
                continue;
            }
            let reaped = async {
                let hash = keys::node_connections(&node);
                let connections: HashMap<String, String> = c.clone().hgetall(&hash).await?;
                let offline = self
                    .remove_stored(conn, &node, connections.into_iter().collect())
                    .await?;
                let _: () = c.clone().del(&hash).await?;
                Ok::<_, redis::RedisError>(offline)
            }
            .await;
            match reaped {
                Ok(offline) => {
                    tracing::info!(node = %node, connections = offline, "reaped a node that stopped heartbeating")
                }
                Err(e) => {
                    let _: Result<(), _> = c.zadd(keys::nodes(), &node, 0).await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// This node's connections (for tests and metrics).
    pub(crate) fn local_count(&self) -> usize {
        lock(&self.local).len()
    }

    /// Removes connections of `node` as stored in its hash (`id -> JSON`), concurrently. Returns how many.
    async fn remove_stored(
        &self,
        conn: &Conn,
        node: &str,
        stored: Vec<(String, String)>,
    ) -> Result<usize, redis::RedisError> {
        let removals: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> = stored
            .into_iter()
            .filter_map(|(id, json)| {
                let stored = serde_json::from_str::<StoredConnection>(&json).ok()?;
                let member = Member {
                    user_id: stored.user,
                    tenant: stored.tenant,
                    connection_id: id,
                };
                Some(async move { self.remove(conn, node, &member, &stored.rooms).await }.boxed())
            })
            .collect();
        let count = removals.len();
        let results: Vec<_> = futures::stream::iter(removals)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(count)
    }

    /// Removes one connection of `node` from its rooms, the user's set (OFFLINE if last) and the node hash.
    async fn remove(
        &self,
        conn: &Conn,
        node: &str,
        member: &Member,
        rooms: &[String],
    ) -> Result<(), redis::RedisError> {
        let room_member = format!("{node}/{}/{}", member.connection_id, member.user_id);
        let mut c = conn.clone();
        for room in rooms {
            let _: () = c.zrem(RoomKeys::new(room).presence, &room_member).await?;
        }
        let enabled = self.statuses.enabled();
        if scripts::disconnect(&mut c, node, member, now_ms(), self.ttl_ms(), enabled).await? {
            self.statuses.mark(&member.tenant);
        }
        let _: () = c
            .hdel(keys::node_connections(node), &member.connection_id)
            .await?;
        Ok(())
    }
}
