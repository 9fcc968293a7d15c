//! The Redis bus: rooms, history and presence shared by every node pointed at the same Redis.
//!
//! - **Publish** runs one Lua script (see [`scripts`]): it assigns the id (the stream id, prefixed with
//!   the room's epoch: see [`ids`]), `XADD`s the event to the room's stream (trimmed to `history_size`,
//!   expiring after `history_ttl` without events), publishes it on the room's channel and records the
//!   idempotency key, atomically. It returns once Redis accepted it; a refused connection fails at once
//!   with `Unavailable`, a silent Redis after `--redis-timeout-ms`.
//! - **Subscribe**: the node holds one Redis subscription per room however many local streams share it
//!   ([`subscriber`]); a stream attaches its sink first, then reads where the room stands, so nothing falls
//!   between the replay and live delivery, and duplicates at the seam are dropped by id (`skip_through`).
//!   The replay up to that point is read in bounded pages as the stream sends it (`RedisReplay`).
//! - **Eviction**: a node refuses an evicting Redis at start ([`eviction`]).
//! - **Outages**: the subscriber reconnects with backoff, re-subscribes and fills each room's gap from its
//!   stream (or sends `Reset`); [`health`] reports a real pub/sub round trip.
//! - **Presence** is kept in Redis: connections are written when they change, and live as long as their
//!   node's entry in the node registry, which each node refreshes ([`presence`]).
//! - **Cluster**: sharded pub/sub and hash-tagged keys ([`keys`]), so a room lives on one shard.
//! - **TLS and ACL**: `rediss://` URLs with the user and password in them, certificates from
//!   `--redis-ca-file` and the client certificate flags ([`target`]); start-up failures name what to
//!   change ([`conn::connect`]).

mod conn;
mod eviction;
mod health;
mod ids;
mod keys;
mod presence;
mod revocations;
mod rooms;
mod scripts;
mod subscriber;
mod target;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BufMut as _;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use health::PROBE_EVERY;
pub(crate) use ids::random_token;
pub use target::{Target, TlsFiles};

use self::conn::{bounded, Conn};
use self::ids::{EventId, StreamId};
use self::presence::Presence;
use self::rooms::RoomTable;
use self::scripts::RoomSettings;
use self::subscriber::{Subscriber, SubscriberParts};
use super::{
    is_ephemeral, Bus, BusError, Page, Position, Recovery, Replay, ReplayPages, RoomFeed, Sink,
    StoredEvent, REPLAY_PAGE_BYTES, REPLAY_PAGE_EVENTS,
};
use crate::auth::{Revocation, MAX_REVOCATIONS};
use crate::bus::IDEMPOTENCY_TTL;
use crate::presence::{Member, PageRequest, PresenceSnapshot};
use crate::proto::v1::Event;
use crate::statuses::{
    diff_event, Outcome, Settle, StatusSettings, StatusWindow, MAX_CHANGES_PER_EVENT,
};
use crate::wire::SharedResponse;

/// Settings of a [`RedisBus`].
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Where Redis is.
    pub target: Target,
    /// Certificates for a `rediss://` target (read at connect).
    pub tls: TlsFiles,
    /// Bound on every Redis call a request waits for (publish, history read, presence).
    pub timeout: Duration,
    /// A node that stops refreshing its registry entry (every sixth of this) is taken for dead half of
    /// this after its last refresh, and reaped by a live node within two thirds of it.
    pub presence_ttl: Duration,
    /// This node's id in presence entries; `None` for a random one.
    pub node_id: Option<String>,
    /// Events kept per room.
    pub history_size: usize,
    /// A room's history expires after this long without events.
    pub history_ttl: Duration,
    /// Start even if Redis may evict keys (see [`eviction`]).
    pub allow_eviction: bool,
    /// Bound on the pub/sub messages queued for the subscriber task, in bytes.
    pub push_queue_bytes: usize,
    /// Coalesced statuses (see [`crate::statuses`]). Set the same on every node.
    pub statuses: StatusSettings,
}

/// [`Bus`] over Redis. See the module docs.
pub struct RedisBus {
    cmd: Conn,
    settings: RoomSettings,
    timeout: Duration,
    table: Arc<RoomTable>,
    presence: Arc<Presence>,
    statuses: Arc<StatusWindow>,
    settler: Arc<Settler>,
    healthy: watch::Receiver<bool>,
    node: Arc<str>,
    /// Stops the background tasks when the bus is dropped.
    _stop: DropGuard,
}

impl RedisBus {
    /// Connects (failing fast with the reason when Redis cannot be reached) and starts the subscriber,
    /// the health probe and the presence upkeep. Must be called inside a tokio runtime.
    pub async fn connect(options: RedisOptions) -> Result<Self, BusError> {
        let node: Arc<str> = match &options.node_id {
            Some(id) => id.as_str().into(),
            None => random_token(12).into(),
        };
        let target = options
            .target
            .clone()
            .with_tls(&options.tls)
            .map_err(BusError::Misconfigured)?;
        if target.is_tls() {
            // redis-rs builds its rustls configs with the process's default provider: make it ring (the
            // one this crate builds rustls with), whatever else may be linked in. Already set is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let settings = RoomSettings {
            history_size: options.history_size.max(1),
            ttl_ms: (options.history_ttl.as_millis() as u64).max(1000),
            sharded: target.is_cluster(),
        };
        let timeout = options.timeout;
        let cmd = conn::connect(&target, timeout).await?;
        eviction::check(&cmd, timeout, options.allow_eviction).await?;
        let cancel = CancellationToken::new();
        let (table, commands) = RoomTable::new();
        let (seen_tx, seen_rx) = watch::channel(0u64);
        let (rooms_down_tx, rooms_down) = watch::channel(0usize);
        let health_channel = keys::health_channel(&node);
        let subscriber = Subscriber::connect(SubscriberParts {
            table: table.clone(),
            commands,
            target: target.clone(),
            timeout,
            cmd: cmd.clone(),
            settings,
            health_channel: health_channel.clone(),
            probe_seen: seen_tx,
            push_queue_bytes: options.push_queue_bytes,
            rooms_down: rooms_down_tx,
            cancel: cancel.clone(),
        })
        .await?;
        tokio::spawn(subscriber.run());

        let (healthy_tx, healthy) = watch::channel(true);
        tokio::spawn(
            health::Prober {
                conn: cmd.clone(),
                channel: health_channel,
                sharded: settings.sharded,
                timeout,
                seen: seen_rx,
                rooms_down,
                healthy: healthy_tx,
                commands: table.command_sender(),
                cancel: cancel.clone(),
            }
            .run(),
        );

        let statuses = StatusWindow::new(options.statuses);
        let settler = Arc::new(Settler {
            conn: cmd.clone(),
            settings,
            statuses: options.statuses,
            timeout,
        });
        tokio::spawn(
            statuses
                .clone()
                .run(Arc::downgrade(&settler), cancel.clone()),
        );
        let presence = Arc::new(Presence::new(
            node.clone(),
            options.presence_ttl,
            timeout,
            statuses.clone(),
        ));
        tokio::spawn(presence.clone().run(cmd.clone(), cancel.clone()));
        tracing::info!(
            node = %node,
            cluster = settings.sharded,
            tls = target.is_tls(),
            "connected to Redis"
        );
        Ok(Self {
            cmd,
            settings,
            timeout,
            table,
            presence,
            statuses,
            settler,
            healthy,
            node,
            _stop: cancel.drop_guard(),
        })
    }

    /// This node's id in presence entries.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Rooms this node is subscribed to (for tests and metrics).
    pub fn subscribed_rooms(&self) -> usize {
        self.table.room_count()
    }

    /// Connections of this node counted in presence (for tests and metrics).
    pub fn local_connections(&self) -> usize {
        self.presence.local_count()
    }
}

/// Settles a tenant's statuses with `lua/settle.lua`.
struct Settler {
    conn: Conn,
    settings: RoomSettings,
    statuses: StatusSettings,
    timeout: Duration,
}

#[async_trait]
impl Settle for Settler {
    /// One round: settles until no dirty user is left, each settle publishing at most one event. Only
    /// its first settle is gated by the tenant's cluster-wide spacing (the rest belong to this round).
    async fn settle(&self, tenant: &str, spaced: bool) -> Result<Outcome, BusError> {
        let mut head = diff_event(tenant, &[]);
        head.payload = None;
        let head = head.encode_to_vec();
        let mut gated = spaced;
        loop {
            let mut conn = self.conn.clone();
            let settled = bounded(
                self.timeout,
                "publish statuses",
                scripts::settle(
                    &mut conn,
                    tenant,
                    &head,
                    MAX_CHANGES_PER_EVENT,
                    keys::PRESENCE_KEY_TTL.as_millis() as u64,
                    self.settings,
                    self.statuses,
                    std::mem::replace(&mut gated, false),
                ),
            )
            .await?;
            if settled.wait_ms > 0 {
                return Ok(Outcome::Wait(Duration::from_millis(settled.wait_ms)));
            }
            if settled.published > 0 {
                crate::statuses::count_published(settled.published);
            }
            if settled.remaining == 0 || settled.taken == 0 {
                return Ok(Outcome::Settled {
                    audience: settled.told_online,
                });
            }
        }
    }
}

/// The [`StoredEvent`] for `payload` (an `Event` encoded without id) with id `id`. The id is appended
/// as field 1: protobuf lets fields come in any order, so this is the encoding of the event with its id.
pub(crate) fn stored_event(
    room: Arc<str>,
    id: String,
    pos: Position,
    payload: &[u8],
) -> StoredEvent {
    let mut event = Vec::with_capacity(payload.len() + id.len() + 2);
    event.put_slice(payload);
    prost::encoding::string::encode(1, &id, &mut event);
    StoredEvent {
        id,
        pos,
        room,
        frame: SharedResponse::from_encoded_event(&event),
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(
        &self,
        mut event: Event,
        idempotency_key: Option<String>,
    ) -> Result<String, BusError> {
        event.id.clear();
        let payload = event.encode_to_vec();
        let ttl = IDEMPOTENCY_TTL.as_millis() as u64;
        let mut conn = self.cmd.clone();
        let (id, _duplicate) = bounded(
            self.timeout,
            "publish",
            scripts::publish(
                &mut conn,
                &event.room,
                &payload,
                is_ephemeral(&event),
                idempotency_key.as_deref().map(|k| (k, ttl)),
                self.settings,
            ),
        )
        .await?;
        Ok(id)
    }

    async fn subscribe(
        &self,
        room: &str,
        since: Option<&str>,
        sink: &Sink,
    ) -> Result<RoomFeed, BusError> {
        // "" is what a stream reports for a room it saw no id of: the same as no `since`.
        let cursor = since
            .filter(|s| !s.is_empty())
            .map(|s| {
                EventId::parse(s).map_err(|reason| BusError::InvalidCursor {
                    room: room.to_owned(),
                    id: s.chars().take(64).collect(),
                    reason,
                })
            })
            .transpose()?;
        let (lease, wait) = self.table.attach(room, sink);
        if let Some(wait) = wait {
            match tokio::time::timeout(self.timeout * 2, wait).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(reason))) => return Err(BusError::Unavailable(reason)),
                Ok(Err(_)) | Err(_) => {
                    return Err(BusError::Unavailable(format!(
                        "Redis did not confirm the subscription to {room} within {} ms",
                        (self.timeout * 2).as_millis()
                    )))
                }
            }
        }
        // Where the room stands (no entries yet): everything up to `read.last` is replayed from the
        // stream, page by page as the stream sends it; everything after reaches the sink attached above.
        let mut conn = self.cmd.clone();
        let read = bounded(
            self.timeout,
            "history read",
            scripts::read(&mut conn, room, None, self.settings),
        )
        .await?;
        let room_name: Arc<str> = room.into();
        let recovery = match &cursor {
            None => Recovery::Fresh,
            Some(c) => recovery(c, &read, self.settings.history_size),
        };
        let replay = match &cursor {
            Some(c) if recovery == Recovery::Recovered && c.stream < read.last => {
                Replay::paged(Box::new(RedisReplay {
                    conn,
                    timeout: self.timeout,
                    settings: self.settings,
                    room: room_name,
                    epoch: read.epoch.clone(),
                    after: c.stream,
                    through: read.last,
                }))
            }
            _ => Replay::none(),
        };
        Ok(RoomFeed {
            // Always a valid `since`, even for a room without events ("{epoch}:0-0"): resuming from it
            // is exact.
            last_event_id: format!("{}:{}", read.epoch, read.last),
            recovery,
            replay,
            skip_through: Some(read.last.position(false)),
            lease: Box::new(lease),
        })
    }

    async fn connect(&self, member: &Member, rooms: &[String]) -> Result<(), BusError> {
        self.presence.connect(&self.cmd, member, rooms).await
    }

    async fn leave(&self, member: &Member, room: &str) -> Result<(), BusError> {
        self.presence.leave(&self.cmd, member, room).await
    }

    async fn disconnect(&self, member: &Member, _rooms: &[String]) -> Result<(), BusError> {
        self.presence.disconnect(&self.cmd, member).await
    }

    async fn presence(&self, room: &str, page: &PageRequest) -> Result<PresenceSnapshot, BusError> {
        self.presence.snapshot(&self.cmd, room, page).await
    }

    async fn shutdown(&self) -> Result<(), BusError> {
        let removed = self.presence.shutdown(&self.cmd).await;
        // The OFFLINEs this node decided are published now, not a window later.
        let _ = self.statuses.flush(&*self.settler).await;
        tracing::info!(node = %self.node, connections = removed?, "left presence");
        Ok(())
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn store_revocation(&self, revocation: &Revocation) -> Result<(), BusError> {
        let mut conn = self.cmd.clone();
        match tokio::time::timeout(self.timeout, revocations::store(&mut conn, revocation)).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                Err(BusError::Unavailable(format!(
                    "{MAX_REVOCATIONS} users already have revoked tokens held in Redis: try again when \
                     older revocations expire"
                )))
            }
            Ok(Err(e)) => Err(conn::classify("revocation write", &e)),
            Err(_) => Err(BusError::Unavailable(format!(
                "Redis did not answer the revocation write within {} ms (--redis-timeout-ms)",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, BusError> {
        let mut conn = self.cmd.clone();
        match tokio::time::timeout(self.timeout, revocations::load(&mut conn)).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Unavailable(format!(
                "Redis did not answer the revocations read within {} ms (--redis-timeout-ms)",
                self.timeout.as_millis()
            ))),
        }
    }

    fn health(&self) -> Option<watch::Receiver<bool>> {
        Some(self.healthy.clone())
    }
}

/// A room's replay after `since`, read from its stream a page at a time (at most
/// [`REPLAY_PAGE_EVENTS`], about [`REPLAY_PAGE_BYTES`]) when the stream is ready to send it.
struct RedisReplay {
    conn: Conn,
    timeout: Duration,
    settings: RoomSettings,
    room: Arc<str>,
    /// The epoch the replay started in: a page of another one means the room's history was lost.
    epoch: String,
    /// Last entry replayed (or `since`).
    after: StreamId,
    /// The room's last entry when the stream attached: later ones arrive live.
    through: StreamId,
}

#[async_trait]
impl ReplayPages for RedisReplay {
    async fn next_page(&mut self) -> Result<Page, BusError> {
        if self.after >= self.through {
            return Ok(Page::Done);
        }
        let bounds = scripts::Bounds {
            events: REPLAY_PAGE_EVENTS,
            bytes: Some(REPLAY_PAGE_BYTES),
            upto: Some(self.through),
        };
        let read = bounded(
            self.timeout,
            "history read",
            scripts::read_page(
                &mut self.conn,
                &self.room,
                Some(self.after),
                bounds,
                self.settings,
            ),
        )
        .await?;
        if read.epoch != self.epoch {
            return Ok(Page::Reset(
                "the room's history in Redis was lost while it was being replayed".into(),
            ));
        }
        if read.trimmed_through > self.after {
            return Ok(Page::Reset(format!(
                "history was trimmed past the replay while it was being read (it keeps the last {} \
                 events per room)",
                self.settings.history_size
            )));
        }
        let Some((last, _)) = read.entries.last() else {
            // Nothing between `after` and `through` any more (deleted): nothing left to replay.
            self.after = self.through;
            return Ok(Page::Done);
        };
        self.after = *last;
        let events = read
            .entries
            .iter()
            .map(|(id, payload)| {
                Arc::new(stored_event(
                    self.room.clone(),
                    format!("{}:{id}", self.epoch),
                    id.position(false),
                    payload,
                ))
            })
            .collect();
        Ok(Page::Events(events))
    }
}

/// Whether the history read covers everything after `since`.
fn recovery(since: &EventId<'_>, read: &scripts::ReadResult, history_size: usize) -> Recovery {
    if since.epoch != read.epoch {
        return Recovery::Reset(
            "the room's history in Redis was lost since that event id was issued (Redis restarted without \
             persistence, the room expired, or it was flushed)"
                .into(),
        );
    }
    if since.stream > read.last {
        return Recovery::Reset("the event id is newer than any event of this room".into());
    }
    if read.trimmed_through > since.stream {
        return Recovery::Reset(format!(
            "history no longer reaches back to that event (it keeps the last {history_size} events per room)"
        ));
    }
    Recovery::Recovered
}
