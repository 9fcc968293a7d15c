//! Connections to Redis: one standalone server or a cluster, behind one type.
//!
//! The bus holds two: a *command* connection (publish, reads, presence) that never waits for a
//! reconnect (a refused connection fails the call at once, a silent one after the timeout), and a
//! *subscriber* connection (RESP3 pub/sub, pushes delivered to [`PushQueue`]) owned by the subscriber
//! task. Standalone uses redis-rs's `ConnectionManager` (it reconnects in the background); cluster uses
//! its `ClusterConnection` with `SSUBSCRIBE`, so a room's messages stay on the room's shard.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisError, RedisFuture, Value};
use tokio::sync::mpsc;

use super::target::Nodes;
// Re-exported: the subscriber names the target through this module.
pub(super) use super::target::Target;
use crate::bus::BusError;

/// A connection to Redis, standalone or cluster. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub(crate) enum Conn {
    /// Standalone server.
    Standalone(ConnectionManager),
    /// Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// The command connection: no waiting for reconnects, every call bounded by `timeout`.
    pub(crate) async fn commands(target: &Target, timeout: Duration) -> Result<Self, RedisError> {
        match &target.nodes {
            Nodes::Standalone(url) => {
                let config = ConnectionManagerConfig::new()
                    // A call during an outage tries one connection and fails: never a queue of waiters.
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout));
                let client = target.client(url.as_str().into_connection_info()?)?;
                Ok(Conn::Standalone(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Nodes::Cluster(urls) => {
                let client = target
                    .cluster_builder(urls)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// The subscriber connection (RESP3): pushes (messages, disconnections) go to `queue`.
    pub(crate) async fn subscriber(
        target: &Target,
        timeout: Duration,
        queue: PushQueue,
    ) -> Result<Self, RedisError> {
        match &target.nodes {
            Nodes::Standalone(url) => {
                let info = url.as_str().into_connection_info()?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = target.client(info.set_redis_settings(settings))?;
                // The subscriber task resubscribes itself after a reconnect (and then reads what it
                // missed), so the manager's automatic resubscription is not used.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(8)
                    .set_max_delay(Duration::from_secs(2))
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_push_sender(queue);
                Ok(Conn::Standalone(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Nodes::Cluster(urls) => {
                let client = target
                    .cluster_builder(urls)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(queue)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Subscribes to `channels` (sharded in a cluster, one call per channel there since a sharded
    /// subscription names channels of one slot). Returns once Redis confirmed.
    pub(crate) async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        match self {
            Conn::Standalone(c) => {
                for chunk in channels.chunks(256) {
                    c.subscribe(chunk).await?;
                }
            }
            Conn::Cluster(c) => {
                let calls: Vec<BoxFuture<'static, Result<(), RedisError>>> = channels
                    .iter()
                    .map(|channel| {
                        let (mut c, channel) = (c.clone(), channel.clone());
                        async move { c.ssubscribe(channel).await }.boxed()
                    })
                    .collect();
                let results: Vec<Result<(), RedisError>> = futures::stream::iter(calls)
                    .buffer_unordered(64)
                    .collect()
                    .await;
                results.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
        }
        Ok(())
    }

    /// Sends `cmd` to the one server, or to every master of a cluster. Returns each server's address
    /// (`redis` for a standalone server) with its answer or the error it returned; fails only when the
    /// command could not be sent at all.
    pub(crate) async fn on_every_master(
        &mut self,
        cmd: Cmd,
    ) -> Result<Vec<(String, Result<Value, String>)>, RedisError> {
        match self {
            Conn::Standalone(c) => {
                let answer = match cmd.query_async::<Value>(c).await {
                    Ok(Value::ServerError(e)) => Err(format!("{e:?}")),
                    Ok(v) => Ok(v),
                    Err(e) if e.code().is_some() => Err(e.to_string()),
                    Err(e) => return Err(e),
                };
                Ok(vec![("redis".to_owned(), answer)])
            }
            Conn::Cluster(c) => {
                use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let Value::Map(answers) = c.route_command(cmd, routing).await? else {
                    return Ok(Vec::new());
                };
                Ok(answers
                    .into_iter()
                    .map(|(node, answer)| {
                        let node = redis::from_redis_value::<String>(node).unwrap_or_default();
                        let answer = match answer {
                            Value::ServerError(e) => Err(format!("{e:?}")),
                            v => Ok(v),
                        };
                        (node, answer)
                    })
                    .collect())
            }
        }
    }

    /// Unsubscribes from one channel.
    pub(crate) async fn unsubscribe(&mut self, channel: &str) -> Result<(), RedisError> {
        match self {
            Conn::Standalone(c) => c.unsubscribe(channel).await,
            Conn::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

/// Opens the command connection at start-up. A failure says what to change: the credentials, the
/// certificates, or the scheme (a TLS port answers a plain client by closing the connection; a plain port
/// never completes a TLS handshake, so that shows as a timeout).
pub(crate) async fn connect(target: &Target, timeout: Duration) -> Result<Conn, BusError> {
    match tokio::time::timeout(timeout, Conn::commands(target, timeout)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(start_error(target, &e)),
        Err(_) => Err(BusError::Unavailable(format!(
            "Redis did not answer within {} ms (--redis-timeout-ms){}",
            timeout.as_millis(),
            if target.is_tls() {
                "; if that port does not speak TLS, use a redis:// URL"
            } else {
                ""
            }
        ))),
    }
}

/// What a failed start-up connection means, for the operator.
fn start_error(target: &Target, e: &RedisError) -> BusError {
    let text = e.to_string();
    // NOPERM, also as redis-rs words it when set-up commands fail ("... has no permissions to run").
    if e.code() == Some("NOPERM") || text.contains("no permissions") {
        return BusError::Misconfigured(format!(
            "Redis's ACL denies the user a command lamplight needs: {e}. Allow it lamplight's \
             commands, keys (~lamplight:*) and channels (&lamplight:*)"
        ));
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        return BusError::Misconfigured(format!(
            "Redis refused the credentials: {e}. Give the ACL user and its password in --redis-url \
             (rediss://user:password@host:port, special characters percent-encoded; \
             rediss://:password@host:port for requirepass)"
        ));
    }
    if target.is_tls() && text.contains("CertificateRequired") {
        return BusError::Misconfigured(format!(
            "Redis asks for a client certificate: {e}. Give --redis-client-cert-file and \
             --redis-client-key-file (a certificate of a CA the server trusts)"
        ));
    }
    if target.is_tls() && text.contains("invalid peer certificate") {
        return BusError::Misconfigured(format!(
            "TLS with Redis failed: {e}. The server's certificate must be signed by a CA in the \
             system's roots or in --redis-ca-file, and name the host of --redis-url"
        ));
    }
    if target.is_tls() && text.to_ascii_lowercase().contains("certificate") {
        return BusError::Misconfigured(format!(
            "TLS with Redis failed: {e}. Check --redis-ca-file, --redis-client-cert-file and \
             --redis-client-key-file"
        ));
    }
    if target.is_tls() && e.is_timeout() {
        return BusError::Unavailable(format!(
            "Redis did not complete the TLS set-up in time: {e}. If that port does not speak TLS, \
             use a redis:// URL"
        ));
    }
    // Reset, EOF, broken pipe (a refused connection is not that: nothing listens there).
    let closed = e.is_connection_dropped() && !e.is_connection_refusal();
    if !target.is_tls() && closed {
        return BusError::Unavailable(format!(
            "Redis closed the connection during set-up: {e}. If that port speaks TLS, use a \
             rediss:// URL"
        ));
    }
    classify("connect", e)
}

/// Runs `fut` (a Redis call) for at most `timeout`, mapping failures to [`BusError`].
pub(crate) async fn bounded<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(what, &e)),
        Err(_) => Err(BusError::Unavailable(format!(
            "Redis did not answer {what} within {} ms (--redis-timeout-ms)",
            timeout.as_millis()
        ))),
    }
}

/// Connection trouble is `Unavailable` (retry, maybe elsewhere); anything else is a bug on our side.
pub(crate) fn classify(what: &str, e: &RedisError) -> BusError {
    let transient = e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_cluster_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY")
        );
    if transient {
        BusError::Unavailable(format!("Redis unreachable during {what}: {e}"))
    } else {
        BusError::Internal(format!("Redis {what} failed: {e}"))
    }
}

/// Where the subscriber connection delivers pushes: a queue bounded in pushes and in bytes that never
/// blocks the connection. When a push does not fit it is dropped and [`PushQueue::take_overflow`] turns
/// true; the subscriber task then treats its subscription as lagging, like a disconnection, and reads
/// what it missed from the rooms' streams. A push larger than the whole byte bound never fits: its event
/// always arrives that slower way.
#[derive(Clone)]
pub(crate) struct PushQueue {
    tx: mpsc::Sender<PushInfo>,
    overflowed: Arc<AtomicBool>,
    /// Bytes of the pushes queued (see [`push_bytes`]).
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The receiving end of a [`PushQueue`].
pub(crate) struct PushReceiver {
    rx: mpsc::Receiver<PushInfo>,
    bytes: Arc<AtomicUsize>,
}

/// What a push weighs against the byte bound: the bytes of its strings (channel and message).
fn push_bytes(info: &PushInfo) -> usize {
    info.data
        .iter()
        .map(|v| match v {
            Value::BulkString(b) => b.len(),
            _ => 16,
        })
        .sum::<usize>()
        + 64
}

impl PushQueue {
    /// A queue of at most `capacity` pushes and `max_bytes` bytes, and its receiving end.
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> (Self, PushReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
        let bytes = Arc::new(AtomicUsize::new(0));
        (
            Self {
                tx,
                overflowed: Arc::new(AtomicBool::new(false)),
                bytes: bytes.clone(),
                max_bytes,
            },
            PushReceiver { rx, bytes },
        )
    }

    /// True (once) if pushes were dropped since the last call.
    pub(crate) fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }
}

impl PushReceiver {
    /// The next push; `None` once the connection dropped its sender.
    pub(crate) async fn recv(&mut self) -> Option<PushInfo> {
        let push = self.rx.recv().await?;
        self.bytes.fetch_sub(push_bytes(&push), Ordering::AcqRel);
        Some(push)
    }
}

impl redis::aio::AsyncPushSender for PushQueue {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        let size = push_bytes(&info);
        if self.bytes.fetch_add(size, Ordering::AcqRel) + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            self.overflowed.store(true, Ordering::Release);
            return Ok(());
        }
        match self.tx.try_send(info) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                self.overflowed.store(true, Ordering::Release);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                Err(redis::aio::SendError)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: usize) -> PushInfo {
        PushInfo {
            kind: redis::PushKind::Message,
            data: vec![
                Value::BulkString(b"ch".to_vec()),
                Value::BulkString(vec![b'x'; bytes]),
            ],
        }
    }

    #[tokio::test]
    async fn the_push_queue_overflows_at_its_byte_bound_and_frees_what_is_taken() {
        use redis::aio::AsyncPushSender as _;
        let (queue, mut rx) = PushQueue::new(1000, 10_000);
        assert!(queue.send(message(4000)).is_ok());
        assert!(queue.send(message(4000)).is_ok());
        assert!(!queue.take_overflow(), "8 KiB of 10 fit");
        assert!(queue.send(message(4000)).is_ok());
        assert!(queue.take_overflow(), "a third 4 KiB push does not fit");
        assert!(rx.recv().await.is_some());
        assert!(queue.send(message(4000)).is_ok());
        assert!(!queue.take_overflow(), "taking one made room");
        assert!(queue.send(message(20_000)).is_ok());
        assert!(queue.take_overflow(), "larger than the whole bound");
    }
}
