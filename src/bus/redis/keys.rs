//! Every Redis key and channel name the bus uses, in one place (the README's "What is in Redis" lists them
//! for operators).
//!
//! Everything about a room carries the hash tag `{room}`, so in a Redis Cluster a room's stream, metadata,
//! channel, presence set and idempotency keys live on one shard and one Lua script can touch them
//! together. A user's online bookkeeping is tagged with their tenant room (`{tenant:T}`), where their
//! ONLINE/OFFLINE statuses are published, for the same reason. Room names are validated before they get
//! here (`[A-Za-z0-9_.:-]`), so they never contain braces.

use std::time::Duration;

use base64::Engine as _;

/// Prefix of every key and channel.
pub(crate) const PREFIX: &str = "lamplight";

/// How long a presence key (a room's presence set, a user's connections and online flag, a tenant's
/// status sets, a node's hash, the node registry) outlives its last write or renewal. Nodes renew the
/// keys of their connections much more often (see `presence/mod.rs`), so this only bounds what is left when
/// every node died without a goodbye and none came back.
pub(crate) const PRESENCE_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The keys of one room.
#[derive(Clone, Debug)]
pub(crate) struct RoomKeys {
    /// Stream of stored events (`XADD ... MAXLEN history_size`), field `e` = the encoded `Event` without
    /// its id.
    pub(crate) stream: String,
    /// Hash: `epoch`, `last` (last stream id), `stored` (1 once an event was stored in this epoch),
    /// `eph` (ephemeral events since the last stored one).
    pub(crate) meta: String,
    /// Pub/sub channel (sharded in cluster mode). Message: `{event id}\n{encoded Event without id}`.
    pub(crate) channel: String,
    /// Sorted set of the room's connections `{node}/{connection}/{user}`, scored by when they were
    /// recorded (ms). An entry counts while its node is live in [`nodes`].
    pub(crate) presence: String,
}

impl RoomKeys {
    /// The keys of `room`.
    pub(crate) fn new(room: &str) -> Self {
        Self {
            stream: format!("{PREFIX}:{{{room}}}:stream"),
            meta: format!("{PREFIX}:{{{room}}}:meta"),
            channel: format!("{PREFIX}:{{{room}}}:events"),
            presence: format!("{PREFIX}:{{{room}}}:presence"),
        }
    }

    /// String key remembering the id published under an idempotency key, in the room's slot.
    pub(crate) fn idempotency(room: &str, key: &str) -> String {
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key);
        format!("{PREFIX}:{{{room}}}:idem:{key}")
    }

    /// The room a channel belongs to (the text between the braces), if it is one of ours.
    pub(crate) fn room_of_channel(channel: &[u8]) -> Option<&str> {
        let s = std::str::from_utf8(channel).ok()?;
        let rest = s.strip_prefix(PREFIX)?.strip_prefix(":{")?;
        let (room, tail) = rest.rsplit_once('}')?;
        (tail == ":events").then_some(room)
    }
}

/// Keys of a user's online state, in their tenant room's slot.
#[derive(Clone, Debug)]
pub(crate) struct UserKeys {
    /// Sorted set of the user's connections `{node}/{connection}`, scored by when they were recorded
    /// (ms).
    pub(crate) connections: String,
    /// Present while the user is announced ONLINE.
    pub(crate) online: String,
}

impl UserKeys {
    /// The keys of `user` in `tenant`.
    pub(crate) fn new(tenant_room: &str, user: &str) -> Self {
        let user = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user);
        Self {
            connections: format!("{PREFIX}:{{{tenant_room}}}:user:{user}:connections"),
            online: format!("{PREFIX}:{{{tenant_room}}}:user:{user}:online"),
        }
    }
}

/// A tenant's status bookkeeping (see `lua/settle.lua`), in its tenant room's slot.
#[derive(Clone, Debug)]
pub(crate) struct TenantKeys {
    /// Set of the users whose ONLINE was decided and OFFLINE not yet.
    pub(crate) online: String,
    /// Set of the users with a decided transition not yet settled.
    pub(crate) dirty: String,
    /// Set of the users the tenant room was last told are online.
    pub(crate) told: String,
    /// When (Redis's clock, ms) the tenant's next status event may be published, cluster-wide.
    pub(crate) next_settle: String,
}

impl TenantKeys {
    /// The keys of the tenant whose room is `tenant_room`.
    pub(crate) fn new(tenant_room: &str) -> Self {
        Self {
            online: format!("{PREFIX}:{{{tenant_room}}}:online"),
            dirty: format!("{PREFIX}:{{{tenant_room}}}:status-dirty"),
            told: format!("{PREFIX}:{{{tenant_room}}}:status-told"),
            next_settle: format!("{PREFIX}:{{{tenant_room}}}:status-next"),
        }
    }
}

/// Sorted set of nodes, scored by the expiry of their entry (ms); a negative score is a reaper's claim
/// on a dead node (see `lua/node_claim.lua`).
pub(crate) fn nodes() -> String {
    format!("{PREFIX}:nodes")
}

/// Hash of a node's open connections (connection id -> JSON), read by whoever reaps the node after it
/// died.
pub(crate) fn node_connections(node: &str) -> String {
    format!("{PREFIX}:node:{{{node}}}:connections")
}

/// The revocations hash and its by-expiry sorted set, in the control room's slot (see
/// [`super::revocations`]).
pub(crate) fn revocations() -> (String, String) {
    let room = crate::bus::control::CONTROL_ROOM;
    (
        format!("{PREFIX}:{{{room}}}:revoked"),
        format!("{PREFIX}:{{{room}}}:revoked:expiry"),
    )
}

/// The channel a node sends its health probes through (to itself).
pub(crate) fn health_channel(node: &str) -> String {
    format!("{PREFIX}:node:{{{node}}}:health")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_keys_share_one_hash_tag_and_channels_map_back() {
        let k = RoomKeys::new("tenant:t1:channel:c1");
        for key in [&k.stream, &k.meta, &k.channel, &k.presence] {
            assert!(key.contains("{tenant:t1:channel:c1}"), "{key}");
        }
        assert_eq!(
            RoomKeys::room_of_channel(k.channel.as_bytes()),
            Some("tenant:t1:channel:c1")
        );
        assert_eq!(RoomKeys::room_of_channel(k.stream.as_bytes()), None);
        assert_eq!(RoomKeys::room_of_channel(b"other:{x}:events"), None);
        assert!(RoomKeys::idempotency("user:u", "svc\nkey").starts_with("lamplight:{user:u}:idem:"));
        assert!(UserKeys::new("tenant:t1", "u/1")
            .online
            .starts_with("lamplight:{tenant:t1}:"));
    }
}
