//! The node registry: this node's entry in it, and reaping the nodes whose entry expired.
//!
//! A node refreshes its entry (`lua/node_beat.lua`); the answer says whether the node must record its
//! connections again (its entry was gone) or wait (a reaper is at work on it). A live node claims a dead
//! node (`lua/node_claim.lua`: one reaper wins), removes its connections a chunk at a time, renewing the
//! claim before each, and drops the entry (`lua/node_release.lua`); see the parent module's docs.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use redis::AsyncCommands as _;

use super::{lock, now_ms, Presence};
use crate::bus::redis::conn::Conn;
use crate::bus::redis::keys;
use crate::bus::redis::scripts::{self, Beat};

/// Dead nodes reaped per round.
const REAP_PER_BEAT: isize = 8;
/// Connections a reaper removes between two renewals of its claim.
const REAP_CHUNK: usize = 512;

/// This node's successful registry refreshes (monotonic clock).
#[derive(Default)]
pub(super) struct Refreshes {
    /// The last one.
    last: Option<Instant>,
    /// The first of the current run of refreshes, none more than the entry's lifetime after the one
    /// before.
    since: Option<Instant>,
}

/// How a reap of a claimed node ended.
enum Reaped {
    /// All its connections removed, its entry gone.
    Done(usize),
    /// The claim was taken over (it had gone stale) or dropped (the node said goodbye).
    Lost,
    /// This node is shutting down: the claim is left for another.
    Stopped,
}

impl Presence {
    /// Refreshes this node's registry entry. If it was gone (see the module docs), the node registered
    /// again and the upkeep records every connection again; while a reaper is at work on the node,
    /// nothing (and this node reaps nobody).
    pub(super) async fn refresh(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        let now = now_ms();
        let beat = scripts::node_beat(
            &mut conn.clone(),
            &self.node,
            now,
            now + self.node_ttl().as_millis() as u64,
            self.lease_ms(),
            Self::key_ttl_ms(),
        )
        .await?;
        let at = Instant::now();
        match beat {
            Beat::BeingReaped => {
                *lock(&self.refreshes) = Refreshes::default();
                if !self.being_reaped.swap(true, Ordering::Relaxed) {
                    tracing::warn!(node = %self.node, "this node was taken for dead: its connections are being removed, and will be recorded again once that is done");
                }
                return Ok(());
            }
            Beat::Registered => {
                self.being_reaped.store(false, Ordering::Relaxed);
                if self.registered.swap(true, Ordering::Relaxed) {
                    let connections = self.local_count();
                    tracing::warn!(node = %self.node, connections, "this node's registry entry was gone (Redis lost its data, or the node was taken for dead): recording its connections again");
                }
                self.wanted.fetch_add(1, Ordering::Relaxed);
                self.wake.notify_one();
            }
            Beat::Refreshed => {
                self.being_reaped.store(false, Ordering::Relaxed);
                self.registered.store(true, Ordering::Relaxed);
            }
        }
        let mut refreshes = lock(&self.refreshes);
        let continuous = refreshes
            .last
            .is_some_and(|last| at.duration_since(last) < self.node_ttl());
        if !continuous {
            refreshes.since = Some(at);
        }
        refreshes.last = Some(at);
        Ok(())
    }

    /// Whether this node may take others for dead: its own last refresh is recent, and it has refreshed
    /// without a gap for about a period. After an outage of Redis every node's entry has expired, and the
    /// node that gets through first must leave the others a period to refresh theirs.
    fn may_reap(&self) -> bool {
        let refreshes = lock(&self.refreshes);
        refreshes
            .last
            .is_some_and(|at| at.elapsed() < self.node_ttl())
            && refreshes
                .since
                .is_some_and(|at| at.elapsed() >= self.period() / 2)
    }

    /// Reaps nodes whose registry entry expired (or whose reaper's claim went stale): one live node wins
    /// each claim.
    pub(super) async fn reap(&self, conn: &Conn) -> Result<(), redis::RedisError> {
        if !self.may_reap() {
            return Ok(());
        }
        let now = now_ms() as i64;
        let lease = self.lease_ms();
        let mut c = conn.clone();
        // Expired entries (0..=now) and claims renewed a lease ago or more (lease-now..0).
        let dead: Vec<String> = c
            .zrangebyscore_limit(keys::nodes(), lease as i64 - now, now, 0, REAP_PER_BEAT)
            .await?;
        for node in dead {
            if *node == *self.node {
                continue;
            }
            if let Some(claim) = scripts::node_claim(&mut c, &node, now_ms(), lease, None).await? {
                self.reap_node(conn, &node, claim).await?;
            }
        }
        Ok(())
    }

    /// Removes the connections of `node`, claimed with score `claim`, and its entry; leaves the claim
    /// stale for the next reaper if that fails or this node is shutting down.
    async fn reap_node(
        &self,
        conn: &Conn,
        node: &str,
        claim: i64,
    ) -> Result<(), redis::RedisError> {
        let mut claim = claim;
        let reaped = self.reap_claimed(conn, node, &mut claim).await;
        let mut c = conn.clone();
        match reaped {
            Ok(Reaped::Done(connections)) => {
                tracing::info!(node = %node, connections, "reaped a node that stopped refreshing its registry entry");
                Ok(())
            }
            Ok(Reaped::Lost) => {
                tracing::info!(node = %node, "stopped reaping a node: the claim on it was lost");
                Ok(())
            }
            Ok(Reaped::Stopped) => scripts::node_release(&mut c, node, claim, false).await,
            Err(e) => {
                let _: Result<(), _> = scripts::node_release(&mut c, node, claim, false).await;
                Err(e)
            }
        }
    }

    async fn reap_claimed(
        &self,
        conn: &Conn,
        node: &str,
        claim: &mut i64,
    ) -> Result<Reaped, redis::RedisError> {
        let mut c = conn.clone();
        let lease = self.lease_ms();
        let hash = keys::node_connections(node);
        let stored: HashMap<String, String> = c.hgetall(&hash).await?;
        let stored: Vec<(String, String)> = stored.into_iter().collect();
        let mut removed = 0;
        // Renewed before each chunk and before the end: a reaper that stopped (or lost its claim) writes
        // at most one chunk after.
        for chunk in stored
            .chunks(REAP_CHUNK)
            .map(Some)
            .chain(std::iter::once(None))
        {
            if self.closing.is_cancelled() {
                return Ok(Reaped::Stopped);
            }
            match scripts::node_claim(&mut c, node, now_ms(), lease, Some(*claim)).await? {
                Some(renewed) => *claim = renewed,
                None => return Ok(Reaped::Lost),
            }
            match chunk {
                Some(chunk) => removed += self.remove_stored(conn, node, chunk.to_vec()).await?,
                None => {
                    // What is left is unreadable, or written by the node itself if it is alive after
                    // all (it records all its connections again once the reap is over).
                    let _: () = c.del(&hash).await?;
                    scripts::node_release(&mut c, node, *claim, true).await?;
                }
            }
        }
        Ok(Reaped::Done(removed))
    }
}
