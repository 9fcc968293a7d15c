//! Cluster-wide presence: who is connected to which room, across every node.
//!
//! Each open stream of a user is a *connection* `{node}/{id}` (ids are `{boot}-{n}`, unique across
//! restarts of the node). It is recorded once, when it opens (and again only if Redis forgot it):
//! - in each room's sorted set (`{node}/{id}/{user}`), which `GetPresence` reads;
//! - in the user's sorted set in the tenant room's slot, whose count decides ONLINE/OFFLINE: the connect
//!   and disconnect scripts change it and decide the transition atomically, once per transition whichever
//!   nodes the user's streams are on, and mark the user dirty in the tenant; this node then settles the
//!   tenant's statuses into one `user.status` event a window later ([`crate::statuses`]);
//! - in the node's hash of connections, read by whoever reaps the node after it died.
//!
//! Entries do not expire one by one: they live as long as their node. Liveness is the node's entry in the
//! node registry, which the node refreshes every `ttl / 6` and which lives `ttl / 2`. So the periodic cost
//! of a node is O(1) (one script on the registry, one read for dead nodes), whatever its connections; the
//! rest is O(changes):
//! - `GetPresence` reads the live nodes with the room (O(nodes) more) and leaves out the entries of nodes
//!   that are not live, at once when a node's entry expires, also with no live node left to reap it.
//! - The ONLINE/OFFLINE count does count the connections of a dead node until a live node reaps it (at
//!   most `2 * ttl / 3` after its last refresh, as below): that is what decides their users' OFFLINE,
//!   once, and a user with a stream on a live node as well simply stays online.
//! - When the registry refresh finds no entry for the node (Redis restarted without persistence or was
//!   flushed, or a live node took this one for dead and reaped it), the node registers again and records
//!   all its connections again (users Redis forgot go ONLINE again). While a reaper is still removing the
//!   node's connections the node waits for it (its claim is in the registry): recording them meanwhile
//!   could be undone by the reaper.
//! - Keys expire [`PRESENCE_KEY_TTL`] (a day) after a connection was last recorded in them (the
//!   registry: after the last refresh of any node); every [`upkeep::RENEW_EVERY`] (an hour) a node
//!   renews the keys its connections use, one `PEXPIRE` per distinct key (room, user, tenant), not per
//!   connection. So what is left when every node died without a goodbye, and none came back to reap it,
//!   is gone within a day. A key found missing at a renewal (evicted, deleted) makes the node record its
//!   connections again.
//!
//! A connection is tracked locally before anything is written, so a disconnect always undoes a connect,
//! even one that was cancelled or failed half-way.
//!
//! How a node's connections end:
//! - **Graceful shutdown**: [`Presence::shutdown`] removes them all (OFFLINE for users with no other
//!   connection) and takes the node out of the registry, within the shutdown grace period.
//! - **Crash** (SIGKILL, lost host): the first live node that sees the registry entry expired claims it
//!   (atomically: one reaper wins), removes its connections, deciding OFFLINE (published by its next
//!   settle), and drops the entry: at most `2 * ttl / 3` after the node's last refresh (a node whose own
//!   refreshes were interrupted, e.g. by a Redis outage, reaps nobody until it has refreshed for a period,
//!   so that the others had their chance too). A reaper renews its claim as it goes; a claim not renewed
//!   for a lease (the TTL, at least four Redis timeouts) is taken over by another live node, or by the
//!   node itself if it was alive after all (it then records its connections again).
//! - **Restart under the same node id**: the new run's first upkeep removes the entries it does not know,
//!   those of the earlier run.
//!
//! Expiries use each node's wall clock: keep node clocks within a few seconds (NTP). Node ids must be
//! unique among running nodes.

mod registry;
mod upkeep;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::registry::Refreshes;
use super::conn::{bounded, Conn};
use super::keys::{self, RoomKeys, PRESENCE_KEY_TTL};
use super::scripts;
use crate::bus::BusError;
use crate::presence::{Member, PageRequest, PresenceSnapshot};
use crate::statuses::StatusWindow;

/// Redis calls presence runs at once (recording again, removing, renewing).
const CONCURRENCY: usize = 64;
/// Closed connections whose removal failed (Redis down), retried by the upkeep. Past it the oldest are
/// forgotten, and the node compares its hash of connections with the ones it knows once Redis answers
/// again (removing the rest).
const MAX_PENDING_REMOVALS: usize = 100_000;

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

/// One of the loops of [`Presence::run`].
struct Every<'a> {
    period: Duration,
    what: &'static str,
    /// Dropped when shutdown begins (else shutdown waits for it).
    interruptible: bool,
    /// Bound on one step, so that a wedged Redis cannot stall the next ones; `None` for steps whose
    /// Redis calls are each bounded and which stop at the first failure.
    limit: Option<Duration>,
    /// Runs a step at once when notified, besides the period.
    wake: Option<&'a Notify>,
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
    /// Held by a periodic step while it writes, and by [`Presence::shutdown`], which sets it: nothing
    /// periodic writes after the node said goodbye.
    closed: tokio::sync::RwLock<bool>,
    /// Cancelled by [`Presence::shutdown`] to stop the upkeep and reaping in flight rather than wait.
    closing: CancellationToken,
    refreshes: Mutex<Refreshes>,
    /// Bumped whenever every local connection must be recorded again; `recorded` is the value the last
    /// complete recording started from (so a recording cut short is done again).
    wanted: AtomicU64,
    recorded: AtomicU64,
    /// The node's hash must be compared with the local connections (at start: an earlier run's entries;
    /// after forgotten removals).
    reconcile: AtomicBool,
    /// Wakes the upkeep (for a recording).
    wake: Notify,
    /// When the keys of every local connection were last renewed or written.
    renewed: Mutex<Instant>,
    /// Whether the node was registered once (a later new registration means it was forgotten).
    registered: AtomicBool,
    /// Whether the last refresh found a reaper at work on this node (logged once).
    being_reaped: AtomicBool,
}

impl Presence {
    /// Presence of node `node`, taken for dead `ttl / 2` after its last registry refresh.
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
            refreshes: Mutex::new(Refreshes::default()),
            wanted: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            reconcile: AtomicBool::new(true),
            wake: Notify::new(),
            renewed: Mutex::new(Instant::now()),
            registered: AtomicBool::new(false),
            being_reaped: AtomicBool::new(false),
        }
    }

    /// How long the node's registry entry outlives its last refresh: half the TTL, refreshed every sixth
    /// of it ([`Self::run`]), so two refreshes may be missed before live nodes take this one for dead.
    fn node_ttl(&self) -> Duration {
        self.ttl / 2
    }

    /// How often the registry is refreshed, dead nodes looked for and the upkeep run.
    fn period(&self) -> Duration {
        self.ttl / 6
    }

    /// How long a reaper's claim holds without renewal: it renews it every [`REAP_CHUNK`] connections,
    /// each removal bounded by the Redis timeout.
    fn lease_ms(&self) -> u64 {
        self.ttl.max(self.timeout * 4).as_millis() as u64
    }

    fn key_ttl_ms() -> u64 {
        PRESENCE_KEY_TTL.as_millis() as u64
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

    /// Writes one connection's entries (again: writing twice is harmless), each key expiring
    /// [`PRESENCE_KEY_TTL`] later. The room's set and the node's hash are in different slots of a
    /// cluster, so each is its own call, and the user's set is in a third.
    async fn record(
        &self,
        conn: &Conn,
        local: &LocalConnection,
        now: u64,
    ) -> Result<(), redis::RedisError> {
        let member = self.room_member(&local.member);
        let ttl = Self::key_ttl_ms() as i64;
        let mut steps: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> =
            Vec::with_capacity(local.rooms.len() + 2);
        for room in &local.rooms {
            let (key, member, mut c) = (RoomKeys::new(room).presence, member.clone(), conn.clone());
            steps.push(
                async move {
                    redis::pipe()
                        .zadd(&key, &member, now)
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
                    .pexpire(&node_key, ttl)
                    .ignore()
                    .exec_async(&mut c)
                    .await
            }
            .boxed(),
        );
        let mut c = conn.clone();
        steps.push(
            async move {
                // Recorded again after Redis forgot the user: ONLINE again.
                let decided = scripts::connect(
                    &mut c,
                    &self.node,
                    &local.member,
                    now,
                    Self::key_ttl_ms(),
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
    /// removal is retried by the upkeep.
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
                // Its record stays in the node's hash: the upkeep finds it there.
                self.reconcile.store(true, Ordering::Relaxed);
            }
            pending.push(local);
        }
        result
    }

    /// The connection left `room`: out of the room's set and of the node hash's record. On failure its
    /// entry stays until the connection ends.
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

    /// Users and connections in `room`, across all live nodes, and the page of users `page` asks for.
    ///
    /// Reads the room's entries and the live nodes (two commands: different slots of a cluster) and pages
    /// them here: the totals need every entry anyway (users are distinct across connections and nodes),
    /// so this costs O(connections in the room + nodes) in Redis and on the wire to this node, O(page) in
    /// the response.
    pub(crate) async fn snapshot(
        &self,
        conn: &Conn,
        room: &str,
        page: &PageRequest,
    ) -> Result<PresenceSnapshot, BusError> {
        let key = RoomKeys::new(room).presence;
        let (mut c, mut n) = (conn.clone(), conn.clone());
        let live_after = format!("({}", now_ms());
        let (members, live): (Vec<String>, Vec<String>) = bounded(
            self.timeout,
            "presence read",
            futures::future::try_join(
                c.zrange(&key, 0, -1),
                n.zrangebyscore(keys::nodes(), live_after, "+inf"),
            ),
        )
        .await?;
        let live: HashSet<&str> = live.iter().map(String::as_str).collect();
        let mut users = BTreeSet::new();
        let mut connections = 0u32;
        for m in &members {
            // `{node}/{connection}/{user}`: node ids and connection ids contain no '/'.
            let mut parts = m.splitn(3, '/');
            let (Some(node), Some(_), Some(user)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if live.contains(node) {
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

    /// Until `cancel` or [`Self::shutdown`], every sixth of the TTL, side by side (so that neither a long
    /// reap nor a long recording delays the registry entry): refreshes the node's registry entry; reaps
    /// dead nodes; and the upkeep (see [`Self::upkeep`]), which the refresh also wakes when the node's
    /// connections must be recorded again.
    pub(crate) async fn run(self: Arc<Self>, conn: Conn, cancel: CancellationToken) {
        let this: &Self = &self;
        let conn = &conn;
        let period = self.period();
        tokio::join!(
            this.repeat(
                Every {
                    period,
                    what: "node registry refresh",
                    interruptible: false,
                    limit: Some(period.max(self.timeout)),
                    wake: None,
                },
                &cancel,
                || this.refresh(conn).boxed()
            ),
            // Not dropped by shutdown: it stops between two chunks and leaves its claim to another node.
            this.repeat(
                Every {
                    period,
                    what: "reaping dead nodes",
                    interruptible: false,
                    limit: None,
                    wake: None,
                },
                &cancel,
                || this.reap(conn).boxed()
            ),
            // Dropped by shutdown: commands already sent reach Redis before the shutdown's removals (one
            // connection per shard keeps the order), and those not sent never will be.
            this.repeat(
                Every {
                    period,
                    what: "presence upkeep",
                    interruptible: true,
                    limit: None,
                    wake: Some(&this.wake),
                },
                &cancel,
                || this.upkeep(conn).boxed()
            ),
        );
    }

    /// Runs `step` as `every` says until `cancel` or shutdown.
    async fn repeat<'a>(
        &'a self,
        every: Every<'_>,
        cancel: &CancellationToken,
        mut step: impl FnMut() -> BoxFuture<'a, Result<(), redis::RedisError>>,
    ) {
        let mut tick = tokio::time::interval(every.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let woken = || async {
            match every.wake {
                Some(wake) => wake.notified().await,
                None => std::future::pending().await,
            }
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                _ = woken() => {}
            }
            let closed = self.closed.read().await;
            if *closed {
                return;
            }
            let step = async {
                match every.limit {
                    Some(limit) => tokio::time::timeout(limit, step()).await,
                    None => Ok(step().await),
                }
            };
            let outcome = if every.interruptible {
                tokio::select! {
                    outcome = step => outcome,
                    _ = self.closing.cancelled() => return,
                }
            } else {
                step.await
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "{} failed", every.what),
                Err(_) => tracing::warn!("{} timed out", every.what),
            }
        }
    }

    /// Says goodbye: removes every connection of this node (OFFLINE for users with no other) and its
    /// registry entry, and stops the periodic work. If Redis fails part of it, the node's registry entry
    /// is marked expired instead, so that live nodes reap the rest at once. Returns the connections
    /// removed.
    pub(crate) async fn shutdown(&self, conn: &Conn) -> Result<usize, BusError> {
        self.closing.cancel();
        let mut closed = self.closed.write().await;
        *closed = true;
        let mut gone: Vec<LocalConnection> = lock(&self.local).drain().map(|(_, l)| l).collect();
        gone.append(&mut lock(&self.pending_removals));
        let count = gone.len();
        // Every removal is tried, also after one failed (in a cluster, one shard may be down).
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
    /// that ended during the recording that shutdown interrupted may have been written back by it.
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

    /// This node's connections (for tests and metrics).
    pub(crate) fn local_count(&self) -> usize {
        lock(&self.local).len()
    }

    /// Removes connections of `node` as stored in its hash (`id -> JSON`), concurrently, each tried also
    /// after one failed (the first failure is returned). Returns how many.
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
        if scripts::disconnect(&mut c, node, member, Self::key_ttl_ms(), enabled).await? {
            self.statuses.mark(&member.tenant);
        }
        let _: () = c
            .hdel(keys::node_connections(node), &member.connection_id)
            .await?;
        Ok(())
    }
}
