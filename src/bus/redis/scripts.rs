//! The Lua scripts (in `lua/`) and typed calls to them.
//!
//! Every step that must be atomic is one script: publish (id + store + trim + expire + publish +
//! idempotency key), read (epoch + last id + trim point + entries), the user's connection count with
//! its ONLINE/OFFLINE transition, settling a tenant's statuses into one event, and a node's entry in the
//! node registry (refresh, a reaper's claim, its release). Scripts run by `EVALSHA` (loaded on first
//! use, and again after a Redis restart flushed the script cache). Each touches one room's keys only, or
//! the registry only (one hash slot).

use std::sync::LazyLock;

use redis::Script;

use super::conn::Conn;
use super::ids::{random_token, StreamId};
use super::keys::{nodes, RoomKeys, TenantKeys, UserKeys};
use crate::presence::Member;
use crate::rooms::Room;
use crate::statuses::{StatusSettings, MAX_STATUS_SPACING};

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

static PUBLISH: LazyLock<Script> = script!("publish.lua");
static READ: LazyLock<Script> = script!("read.lua");
static CONNECT: LazyLock<Script> = script!("connect.lua");
static DISCONNECT: LazyLock<Script> = script!("disconnect.lua");
static SETTLE: LazyLock<Script> = script!("settle.lua");
static NODE_BEAT: LazyLock<Script> = script!("node_beat.lua");
static NODE_CLAIM: LazyLock<Script> = script!("node_claim.lua");
static NODE_RELEASE: LazyLock<Script> = script!("node_release.lua");
/// Length of a new epoch.
const EPOCH_LEN: usize = 10;

/// Room settings every script that may publish or create an epoch needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoomSettings {
    /// Stream length (`MAXLEN`).
    pub(crate) history_size: usize,
    /// Idle time after which a room's stream and meta expire, in ms.
    pub(crate) ttl_ms: u64,
    /// Cluster mode: `SPUBLISH` instead of `PUBLISH`.
    pub(crate) sharded: bool,
}

/// What [`read`] found.
#[derive(Debug)]
pub(crate) struct ReadResult {
    /// The room's current epoch (created by the read if there was none).
    pub(crate) epoch: String,
    /// The room's last stored event (`0-0` when none).
    pub(crate) last: StreamId,
    /// Entries at or before this id may have been trimmed or deleted (`0-0`: none was).
    pub(crate) trimmed_through: StreamId,
    /// Entries after the requested id, oldest first: (id, encoded `Event` without id).
    pub(crate) entries: Vec<(StreamId, Vec<u8>)>,
}

fn bad_reply(what: &str, detail: impl std::fmt::Display) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected script reply",
        format!("{what}: {detail}"),
    ))
}

/// The room arguments `lamplight_emit` (`lua/common.lua`) reads, appended in the order every script that
/// emits passes them on (its `ARGV[3]` to `ARGV[7]`): history size, idle ttl, a fresh epoch in case the
/// room has none, the pub/sub channel, sharded or not.
fn emit_args<'a, 'b>(
    call: &'a mut redis::ScriptInvocation<'b>,
    settings: RoomSettings,
    channel: &str,
) -> &'a mut redis::ScriptInvocation<'b> {
    call.arg(settings.history_size)
        .arg(settings.ttl_ms)
        .arg(random_token(EPOCH_LEN))
        .arg(channel)
        .arg(if settings.sharded { "1" } else { "0" })
}

fn stream_id(what: &str, s: &str) -> Result<StreamId, redis::RedisError> {
    StreamId::parse(s).ok_or_else(|| bad_reply(what, format!("not a stream id: {s:?}")))
}

/// Publishes `payload` (an encoded `Event` without id) to `room`. Returns the event id and whether it is
/// the id of an earlier publish with the same idempotency key (then nothing was published).
pub(crate) async fn publish(
    conn: &mut Conn,
    room: &str,
    payload: &[u8],
    ephemeral: bool,
    idempotency: Option<(&str, u64)>,
    settings: RoomSettings,
) -> Result<(String, bool), redis::RedisError> {
    let keys = RoomKeys::new(room);
    let (idem_key, idem_ttl) = match idempotency {
        Some((key, ttl_ms)) => (RoomKeys::idempotency(room, key), ttl_ms.max(1)),
        // The script never reads KEYS[3] then; a key of the room's slot keeps the call single-slot.
        None => (keys.meta.clone(), 0),
    };
    let mut call = PUBLISH.prepare_invoke();
    call.key(&keys.stream)
        .key(&keys.meta)
        .key(&idem_key)
        .arg(payload)
        .arg(if ephemeral { "1" } else { "0" });
    let (id, duplicate): (String, i64) = emit_args(&mut call, settings, &keys.channel)
        .arg(idem_ttl)
        .invoke_async(conn)
        .await?;
    Ok((id, duplicate == 1))
}

/// The room's epoch and last id and, with `after`, its stored events after that id (as many as the
/// history holds).
pub(crate) async fn read(
    conn: &mut Conn,
    room: &str,
    after: Option<StreamId>,
    settings: RoomSettings,
) -> Result<ReadResult, redis::RedisError> {
    let page = Bounds {
        events: settings.history_size.saturating_add(1),
        bytes: None,
        upto: None,
    };
    read_page(conn, room, after, page, settings).await
}

/// Which entries one [`read_page`] returns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// At most this many.
    pub(crate) events: usize,
    /// Ending with the first entry whose payload makes their sum exceed this (at least one entry).
    pub(crate) bytes: Option<usize>,
    /// None after this id.
    pub(crate) upto: Option<StreamId>,
}

/// [`read`], returning at most one page of entries after `after`.
pub(crate) async fn read_page(
    conn: &mut Conn,
    room: &str,
    after: Option<StreamId>,
    bounds: Bounds,
    settings: RoomSettings,
) -> Result<ReadResult, redis::RedisError> {
    let keys = RoomKeys::new(room);
    type Reply = (String, String, String, String, Vec<(String, Vec<Vec<u8>>)>);
    let (epoch, last, trimmed, deleted, raw): Reply = READ
        .key(&keys.stream)
        .key(&keys.meta)
        .arg(random_token(EPOCH_LEN))
        .arg(settings.ttl_ms)
        .arg(after.map(|a| a.to_string()).unwrap_or_default())
        .arg(bounds.events.max(1))
        .arg(bounds.bytes.map(|b| b.to_string()).unwrap_or_default())
        .arg(bounds.upto.map(|u| u.to_string()).unwrap_or_default())
        .invoke_async(conn)
        .await?;
    let mut entries = Vec::with_capacity(raw.len());
    for (id, mut fields) in raw {
        // Fields come as [name, value]; we only ever write `e`.
        if fields.len() != 2 || fields[0] != b"e" {
            return Err(bad_reply(
                "read",
                format!("entry {id} has unexpected fields"),
            ));
        }
        let payload = fields.pop().unwrap_or_default();
        entries.push((stream_id("read", &id)?, payload));
    }
    Ok(ReadResult {
        epoch,
        last: stream_id("read", &last)?,
        trimmed_through: stream_id("read", &trimmed)?.max(stream_id("read", &deleted)?),
        entries,
    })
}

/// The member string of a connection in a user's set: `{node}/{connection}`.
pub(crate) fn connection_member(node: &str, member: &Member) -> String {
    format!("{node}/{}", member.connection_id)
}

/// Counts a connection of `member` (again, if it was counted). Returns true if the user was not online
/// (a decided ONLINE; with `statuses`, the user is now dirty in the tenant, for [`settle`]). The user's
/// keys (and the tenant's, with `statuses`) expire `key_ttl_ms` after this unless renewed.
pub(crate) async fn connect(
    conn: &mut Conn,
    node: &str,
    member: &Member,
    now_ms: u64,
    key_ttl_ms: u64,
    statuses: bool,
) -> Result<bool, redis::RedisError> {
    let tenant_room = Room::tenant_room(&member.tenant);
    let user = UserKeys::new(&tenant_room, &member.user_id);
    let tenant = TenantKeys::new(&tenant_room);
    let decided: i64 = CONNECT
        .key(&user.connections)
        .key(&user.online)
        .key(&tenant.online)
        .key(&tenant.dirty)
        .key(&tenant.told)
        .arg(connection_member(node, member))
        .arg(now_ms)
        .arg(key_ttl_ms)
        .arg(&member.user_id)
        .arg(if statuses { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    Ok(decided == 1)
}

/// Removes a connection of `member`. Returns true if it was the user's last one (a decided OFFLINE;
/// with `statuses`, the user is now dirty in the tenant, for [`settle`]).
pub(crate) async fn disconnect(
    conn: &mut Conn,
    node: &str,
    member: &Member,
    key_ttl_ms: u64,
    statuses: bool,
) -> Result<bool, redis::RedisError> {
    let tenant_room = Room::tenant_room(&member.tenant);
    let user = UserKeys::new(&tenant_room, &member.user_id);
    let tenant = TenantKeys::new(&tenant_room);
    let decided: i64 = DISCONNECT
        .key(&user.connections)
        .key(&user.online)
        .key(&tenant.online)
        .key(&tenant.dirty)
        .key(&tenant.told)
        .arg(connection_member(node, member))
        .arg(&member.user_id)
        .arg(if statuses { "1" } else { "0" })
        .arg(key_ttl_ms)
        .invoke_async(conn)
        .await?;
    Ok(decided == 1)
}

/// What [`node_beat`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The node's entry was there: refreshed.
    Refreshed,
    /// There was no entry (or only a stale claim): registered anew; the node must record its
    /// connections again.
    Registered,
    /// A reaper is removing the node's connections: not refreshed.
    BeingReaped,
}

/// Refreshes `node`'s registry entry to expire at `expiry_ms` (see `lua/node_beat.lua`).
pub(crate) async fn node_beat(
    conn: &mut Conn,
    node: &str,
    now_ms: u64,
    expiry_ms: u64,
    lease_ms: u64,
    registry_ttl_ms: u64,
) -> Result<Beat, redis::RedisError> {
    let result: i64 = NODE_BEAT
        .key(nodes())
        .arg(node)
        .arg(now_ms)
        .arg(expiry_ms)
        .arg(lease_ms)
        .arg(registry_ttl_ms)
        .invoke_async(conn)
        .await?;
    match result {
        0 => Ok(Beat::Refreshed),
        1 => Ok(Beat::Registered),
        2 => Ok(Beat::BeingReaped),
        other => Err(bad_reply("node beat", other)),
    }
}

/// Claims dead `node` for reaping (`renewing` = `None`), or renews the claim scored `renewing`. Returns
/// the claim's new score (`-now_ms`) if the caller holds it (see `lua/node_claim.lua`).
pub(crate) async fn node_claim(
    conn: &mut Conn,
    node: &str,
    now_ms: u64,
    lease_ms: u64,
    renewing: Option<i64>,
) -> Result<Option<i64>, redis::RedisError> {
    let held: i64 = NODE_CLAIM
        .key(nodes())
        .arg(node)
        .arg(now_ms)
        .arg(lease_ms)
        .arg(renewing.map(|c| c.to_string()).unwrap_or_default())
        .invoke_async(conn)
        .await?;
    Ok((held == 1).then(|| -(now_ms as i64)))
}

/// Lets go of the claim scored `claim` on `node`: its entry goes when `done`, else the claim is left
/// stale for the next reaper (see `lua/node_release.lua`).
pub(crate) async fn node_release(
    conn: &mut Conn,
    node: &str,
    claim: i64,
    done: bool,
) -> Result<(), redis::RedisError> {
    let _: i64 = NODE_RELEASE
        .key(nodes())
        .arg(node)
        .arg(claim)
        .arg(if done { "done" } else { "retry" })
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// What one [`settle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settled {
    /// Dirty users taken.
    pub(crate) taken: usize,
    /// Changes published (in one event, or none when 0).
    pub(crate) published: usize,
    /// Users still dirty in the tenant: settle again.
    pub(crate) remaining: usize,
    /// Users the tenant room has been told are online.
    pub(crate) told_online: usize,
    /// A gated settle came before the tenant's next event may be published: it took nothing; wait
    /// this long (ms). 0 otherwise.
    pub(crate) wait_ms: u64,
}

/// Takes up to `max` dirty users of the tenant and publishes, as one `PresenceDiff` event built on `head`
/// (the encoded event without id and payload), those whose state differs from what its room was told.
/// `gated` (the first settle of a round): nothing is taken before the tenant's spacing since its last
/// event, cluster-wide, has passed (see `lua/settle.lua`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn settle(
    conn: &mut Conn,
    tenant: &str,
    head: &[u8],
    max: usize,
    told_ttl_ms: u64,
    settings: RoomSettings,
    statuses: StatusSettings,
    gated: bool,
) -> Result<Settled, redis::RedisError> {
    let tenant_room = Room::tenant_room(tenant);
    let keys = TenantKeys::new(&tenant_room);
    let room = RoomKeys::new(&tenant_room);
    let mut call = SETTLE.prepare_invoke();
    call.key(&keys.dirty)
        .key(&keys.online)
        .key(&keys.told)
        .key(&room.stream)
        .key(&room.meta)
        .key(&keys.next_settle)
        .arg(head)
        .arg(max.max(1));
    let (taken, published, remaining, told_online, wait_ms): (usize, usize, usize, usize, u64) =
        emit_args(&mut call, settings, &room.channel)
            .arg(told_ttl_ms)
            .arg(statuses.window.as_millis() as u64)
            .arg(statuses.deliveries_per_sec)
            .arg(MAX_STATUS_SPACING.as_millis() as u64)
            .arg(if gated { "1" } else { "0" })
            .invoke_async(conn)
            .await?;
    Ok(Settled {
        taken,
        published,
        remaining,
        told_online,
        wait_ms,
    })
}
