//! Cluster-wide presence: who is connected to which room, across every node.
//!
//! Each open stream of a user is a *connection* `{node}/{id}`. It is recorded
//! - in each room's sorted set (`{node}/{id}/{user}`), scored by its expiry, which `GetPresence` reads;
//! - in the user's sorted set in the tenant room's slot, whose count decides ONLINE/OFFLINE: the connect
//!   and disconnect scripts change it and publish the status atomically, so a status is published once
//!   per transition, whichever nodes the user's streams are on;
//! - in the node's hash of connections, read by whoever reaps the node after it died.
//!
//! Every node heartbeats every `ttl / 3`: it pushes the expiry of all its connections forward (which also
//! restores them after Redis lost its data) and of its own entry in the node registry. A node that dies
//! without warning stops doing so: its connections drop out of `GetPresence` when their expiry passes
//! (at most `ttl` after its last heartbeat), and the first live node that sees its registry entry
//! expired reaps it: removes its connections and publishes OFFLINE for users who have no other
//! connection. Expiries use each node's wall clock: keep node clocks within a few seconds (NTP).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use prost::Message as _;
use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::conn::{bounded, Conn};
use super::keys::{self, RoomKeys};
use super::scripts::{self, RoomSettings};
use crate::bus::BusError;
use crate::presence::{status_event, Member, PresenceSnapshot};

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
    /// The encoded ONLINE event (the heartbeat re-announces a user Redis forgot).
    online: Arc<[u8]>,
}

/// This node's share of the presence state.
pub(crate) struct Presence {
    node: Arc<str>,
    ttl: Duration,
    timeout: Duration,
    settings: RoomSettings,
    local: Mutex<HashMap<u64, LocalConnection>>,
    pending_removals: Mutex<Vec<LocalConnection>>,
}

fn encoded_status(member: &Member, online: bool) -> Vec<u8> {
    status_event(member, online).encode_to_vec()
}

impl Presence {
    /// Presence of node `node`, whose entries expire `ttl` after the last heartbeat.
    pub(crate) fn new(
        node: Arc<str>,
        ttl: Duration,
        timeout: Duration,
        settings: RoomSettings,
    ) -> Self {
        Self {
            node,
            ttl,
            timeout,
            settings,
            local: Mutex::new(HashMap::new()),
            pending_removals: Mutex::new(Vec::new()),
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    fn room_member(&self, member: &Member) -> String {
        format!("{}/{}/{}", self.node, member.connection_id, member.user_id)
    }

    /// Records a connection everywhere (see the module docs); ONLINE if it is the user's first.
    pub(crate) async fn connect(
        &self,
        conn: &Conn,
        member: &Member,
        rooms: &[String],
    ) -> Result<(), BusError> {
        let local = LocalConnection {
            member: member.clone(),
            rooms: rooms.to_vec(),
            online: encoded_status(member, true).into(),
        };
        bounded(
            self.timeout,
            "presence connect",
            self.record(conn, &local, now_ms()),
        )
        .await?;
        lock(&self.local).insert(member.connection_id, local);
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
        let stored = serde_json::to_string(&StoredConnection {
            user: local.member.user_id.clone(),
            tenant: local.member.tenant.clone(),
            rooms: local.rooms.clone(),
        })
        .unwrap_or_default();
        let (node_key, id, mut c) = (
            keys::node_connections(&self.node),
            local.member.connection_id,
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
                scripts::connect(
                    &mut c,
                    &self.node,
                    &local.member,
                    &local.online,
                    now,
                    self.ttl_ms(),
                    self.settings,
                )
                .await
                .map(|_| ())
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
            remove(conn, &self.node, &local.member, &local.rooms, self.settings),
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
            serde_json::to_string(&StoredConnection {
                user: member.user_id.clone(),
                tenant: member.tenant.clone(),
                rooms: connection.rooms.clone(),
            })
            .unwrap_or_default()
        };
        let mut c = conn.clone();
        let mut pipe = redis::pipe();
        pipe.zrem(RoomKeys::new(room).presence, self.room_member(member))
            .ignore()
            .hset(
                keys::node_connections(&self.node),
                member.connection_id,
                stored,
            )
            .ignore();
        bounded(self.timeout, "presence leave", pipe.exec_async(&mut c)).await
    }

    /// Users and connections in `room`, across all nodes.
    pub(crate) async fn snapshot(
        &self,
        conn: &Conn,
        room: &str,
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
        Ok(PresenceSnapshot {
            user_ids: users.into_iter().collect(),
            connections,
        })
    }

    /// Heartbeats every `ttl / 3` until `cancel`; see the module docs.
    pub(crate) async fn run(self: Arc<Self>, conn: Conn, cancel: CancellationToken) {
        let every = self.ttl / 3;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Bounded so a wedged Redis cannot stall the next beats forever.
            let beat = tokio::time::timeout(every.max(self.timeout), self.beat(&conn)).await;
            match beat {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "presence heartbeat failed"),
                Err(_) => tracing::warn!("presence heartbeat timed out"),
            }
        }
    }

    async fn beat(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        let now = now_ms();
        let mut c = conn.clone();
        let _: () = c
            .zadd(keys::nodes(), &*self.node, now + self.ttl_ms())
            .await?;
        let locals: Vec<LocalConnection> = lock(&self.local).values().cloned().collect();
        let beats: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> = locals
            .into_iter()
            .map(|l| async move { self.record(conn, &l, now).await }.boxed())
            .collect();
        let results: Vec<_> = futures::stream::iter(beats)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e);
        }
        self.retry_removals(conn).await;
        self.reap(conn, now).await
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
                    match remove(conn, node, &l.member, &l.rooms, self.settings).await {
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
            let hash = keys::node_connections(&node);
            let connections: HashMap<u64, String> = c.hgetall(&hash).await?;
            let mut offline = 0usize;
            for (id, json) in &connections {
                let Ok(stored) = serde_json::from_str::<StoredConnection>(json) else {
                    continue;
                };
                let member = Member {
                    user_id: stored.user,
                    tenant: stored.tenant,
                    connection_id: *id,
                };
                remove(conn, &node, &member, &stored.rooms, self.settings).await?;
                offline += 1;
            }
            let _: () = c.del(&hash).await?;
            tracing::info!(node = %node, connections = offline, "reaped a node that stopped heartbeating");
        }
        Ok(())
    }

    /// This node's connections (for tests and metrics).
    pub(crate) fn local_count(&self) -> usize {
        lock(&self.local).len()
    }
}

/// Removes one connection of `node` from its rooms, the user's set (OFFLINE if last) and the node hash.
async fn remove(
    conn: &Conn,
    node: &str,
    member: &Member,
    rooms: &[String],
    settings: RoomSettings,
) -> Result<(), redis::RedisError> {
    let room_member = format!("{node}/{}/{}", member.connection_id, member.user_id);
    let mut c = conn.clone();
    for room in rooms {
        let _: () = c.zrem(RoomKeys::new(room).presence, &room_member).await?;
    }
    let offline = encoded_status(member, false);
    scripts::disconnect(&mut c, node, member, &offline, now_ms(), settings).await?;
    let _: () = c
        .hdel(keys::node_connections(node), member.connection_id)
        .await?;
    Ok(())
}
