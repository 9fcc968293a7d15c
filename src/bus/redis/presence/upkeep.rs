//! The upkeep: what a node does for its connections besides recording them as they change, and only
//! when there is something to do (an idle node sends Redis nothing here): removing its entries it does not
//! know, recording every connection again when its registry entry was gone, retrying failed removals, and
//! renewing the expiry of the keys its connections use.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use redis::AsyncCommands as _;

use super::{lock, now_ms, LocalConnection, Presence, CONCURRENCY};
use crate::bus::redis::conn::Conn;
use crate::bus::redis::keys::{self, RoomKeys, TenantKeys, UserKeys, PRESENCE_KEY_TTL};
use crate::rooms::Room;

/// How often a node renews the expiry of the keys its connections use (see the module docs).
pub(crate) const RENEW_EVERY: Duration = Duration::from_secs(3600);

impl Presence {
    /// The node's chores, when there are any (an idle node sends Redis nothing here): removes the
    /// entries of its hash it does not know (at start, and after forgotten removals), records every
    /// connection again when the registry refresh asks for it, retries failed removals, and renews the
    /// expiry of the keys its connections use every [`RENEW_EVERY`].
    pub(super) async fn upkeep(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        if self.reconcile.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.clear_unknown_entries(conn).await {
                self.reconcile.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        let wanted = self.wanted.load(Ordering::Relaxed);
        let renewed = *lock(&self.renewed);
        // Renewals failed for so long that keys may have expired: write them all again.
        let stale = renewed.elapsed() > PRESENCE_KEY_TTL / 2;
        if wanted != self.recorded.load(Ordering::Relaxed) || stale {
            let started = Instant::now();
            self.record_all(conn).await?;
            self.recorded.store(wanted, Ordering::Relaxed);
            *lock(&self.renewed) = started;
        } else if renewed.elapsed() >= RENEW_EVERY {
            let started = Instant::now();
            if self.renew_keys(conn).await? {
                *lock(&self.renewed) = started;
            } else {
                tracing::warn!(node = %self.node, "keys of this node's connections are missing in Redis: recording its connections again");
                self.wanted.fetch_add(1, Ordering::Relaxed);
                self.wake.notify_one();
            }
        }
        self.retry_removals(conn).await;
        Ok(())
    }

    /// Records every local connection again, stopping at the first failure (the upkeep tries again).
    async fn record_all(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        let ids: Vec<String> = lock(&self.local).keys().cloned().collect();
        let count = ids.len();
        let now = now_ms();
        let records: Vec<BoxFuture<'_, Result<(), redis::RedisError>>> = ids
            .into_iter()
            .map(|id| self.record_again(conn, id, now).boxed())
            .collect();
        let _: Vec<()> = futures::stream::iter(records)
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        tracing::info!(node = %self.node, connections = count, "recorded this node's connections again");
        Ok(())
    }

    /// Records local connection `id` again, as it is now.
    async fn record_again(
        &self,
        conn: &Conn,
        id: String,
        now: u64,
    ) -> Result<(), redis::RedisError> {
        let Some(local) = lock(&self.local).get(&id).cloned() else {
            return Ok(());
        };
        self.record(conn, &local, now).await?;
        // The stream ended, or left rooms, while it was being recorded: that removal may have reached
        // Redis before this record and been undone by it. Remove again (removal is idempotent).
        let now_rooms = lock(&self.local).get(&id).map(|l| l.rooms.clone());
        match now_rooms {
            None => {
                self.remove(conn, &self.node, &local.member, &local.rooms)
                    .await
            }
            Some(rooms) => {
                let member = self.room_member(&local.member);
                let mut c = conn.clone();
                let mut left = false;
                for room in local.rooms.iter().filter(|r| !rooms.contains(r)) {
                    let _: () = c.zrem(RoomKeys::new(room).presence, &member).await?;
                    left = true;
                }
                if left {
                    let current = LocalConnection {
                        member: local.member.clone(),
                        rooms,
                    };
                    let _: () = c
                        .hset(
                            keys::node_connections(&self.node),
                            &id,
                            current.stored_json(),
                        )
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// Renews the expiry of every key the local connections use, one `PEXPIRE` per distinct key. Returns
    /// false if one that must exist (a room's set, a user's set or flag, the node's hash) is missing.
    async fn renew_keys(&self, conn: &Conn) -> Result<bool, redis::RedisError> {
        let statuses = self.statuses.enabled();
        // Key -> whether it must exist while a local connection uses it.
        let mut keys: HashMap<String, bool> = HashMap::new();
        {
            let local = lock(&self.local);
            if !local.is_empty() {
                keys.insert(keys::node_connections(&self.node), true);
            }
            for l in local.values() {
                for room in &l.rooms {
                    keys.insert(RoomKeys::new(room).presence, true);
                }
                let tenant_room = Room::tenant_room(&l.member.tenant);
                let user = UserKeys::new(&tenant_room, &l.member.user_id);
                keys.insert(user.connections, true);
                keys.insert(user.online, true);
                if statuses {
                    let tenant = TenantKeys::new(&tenant_room);
                    keys.entry(tenant.online).or_insert(false);
                    keys.entry(tenant.told).or_insert(false);
                }
            }
        }
        let ttl = Self::key_ttl_ms() as i64;
        let renewals: Vec<BoxFuture<'_, Result<bool, redis::RedisError>>> = keys
            .into_iter()
            .map(|(key, must_exist)| {
                let mut c = conn.clone();
                async move {
                    let renewed: bool = c.pexpire(&key, ttl).await?;
                    Ok(renewed || !must_exist)
                }
                .boxed()
            })
            .collect();
        futures::stream::iter(renewals)
            .buffer_unordered(CONCURRENCY)
            .try_fold(true, |all, there| async move { Ok(all && there) })
            .await
    }

    /// Removes this node's entries that it does not know: those of an earlier run under the same node id
    /// (killed before it could say goodbye, and not reaped because this run keeps the node id alive), and
    /// those whose removal was forgotten. Safe at any time: a connection is tracked locally before its
    /// entry is written, and removal is idempotent.
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
        tracing::info!(node = %self.node, connections = removed, "removed connections of this node it no longer has (an earlier run's, or forgotten removals)");
        Ok(())
    }
}
