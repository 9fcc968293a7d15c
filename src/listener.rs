//! Accepting and serving connections: the connection cap, socket options, HTTP/1.1 and HTTP/2 settings,
//! a [`ConnectionHandle`] per connection, and graceful shutdown.
//!
//! tonic's `Server` exposes no cap at accept, no HTTP/1.1 header read timeout and no handle on one
//! connection, so the routes it builds are served here with hyper-util's `auto::Builder` directly (tonic
//! does the same inside). The cap follows mini-redis: a semaphore with one permit per connection, held by
//! the connection's task. When none is left the new connection is closed at once (its client sees the
//! connection reset and can try another node) and the open ones are not disturbed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpConnectInfo;

use crate::config::{
    Config, HTTP2_MAX_LOCAL_ERROR_RESETS, HTTP2_MAX_PENDING_ACCEPT_RESETS,
    TCP_KEEPALIVE_INTERVAL_SECS, TCP_KEEPALIVE_RETRIES,
};
use crate::metrics::{CONNECTIONS_OPEN, CONNECTIONS_REFUSED};
use crate::tls::TlsAcceptor;
use crate::watchdog::ConnectionHandle;

/// After the server asked a connection to close (GOAWAY) because a stream on it could not be written, how
/// long its other streams get to send their last status before the connection is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again, so the loop does not
/// spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How connections are accepted and served.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// `--max-connections`.
    pub max_connections: usize,
    /// Idle time before TCP keepalive probes start.
    pub tcp_keepalive: Duration,
    /// `--max-streams-per-connection` (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// HTTP/2 PING interval.
    pub http2_keepalive: Duration,
    /// HTTP/2 PING acknowledgement timeout.
    pub http2_keepalive_timeout: Duration,
    /// HTTP/1.1 header read timeout.
    pub http1_header_read_timeout: Duration,
    /// How long open connections get after shutdown before they are dropped.
    pub shutdown_grace: Duration,
}

impl ConnectionSettings {
    /// The settings in `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_connections: config.max_connections,
            tcp_keepalive: Duration::from_secs(config.tcp_keepalive_secs),
            max_streams_per_connection: config.max_streams_per_connection,
            http2_keepalive: Duration::from_secs(config.http2_keepalive_secs),
            http2_keepalive_timeout: Duration::from_secs(config.http2_keepalive_timeout_secs),
            http1_header_read_timeout: Duration::from_secs(config.http1_header_read_timeout_secs),
            shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
        }
    }

    /// HTTP/1.1 (grpc-web) and HTTP/2 on one port, with every limit set explicitly.
    fn builder(&self) -> Builder<TokioExecutor> {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.http1_header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.max_streams_per_connection)
            .keep_alive_interval(self.http2_keepalive)
            .keep_alive_timeout(self.http2_keepalive_timeout)
            .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
            .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESETS);
        builder
    }
}

/// Accepts connections on `listener` and serves `app` on each until `shutdown` is cancelled; then stops
/// accepting (closing the listening socket), asks every connection to close, and returns once they have,
/// or after `shutdown_grace`. With `tls`, every connection speaks TLS first.
pub async fn serve<S, B>(
    listener: TcpListener,
    app: S,
    settings: ConnectionSettings,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(settings.builder());
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let tracker = TaskTracker::new();
    let next_id = AtomicU64::new(1);
    let local_addr = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED).increment(1);
            tracing::debug!(%peer, limit = settings.max_connections, "connection refused: --max-connections reached");
            drop(stream);
            continue;
        };
        configure(&stream, settings.tcp_keepalive);
        let handle = ConnectionHandle::new(
            next_id.fetch_add(1, Ordering::Relaxed),
            shutdown.child_token(),
        );
        let info = TcpConnectInfo {
            local_addr,
            remote_addr: Some(peer),
        };
        tracker.spawn(serve_connection(
            builder.clone(),
            stream,
            tls.clone(),
            Box::new(app.clone()),
            handle,
            info,
            permit,
            shutdown.clone(),
            settings.shutdown_grace,
            settings.http1_header_read_timeout,
        ));
    }
    // Stop accepting now: the kernel refuses new connections instead of queueing them.
    drop(listener);
    tracker.close();
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?settings.shutdown_grace, "connections still open after the grace period; exiting anyway");
    }
}

/// TCP_NODELAY (events are small and must not wait for more) and keepalive, which finds dead peers of
/// connections without HTTP/2 PINGs.
fn configure(stream: &TcpStream, keepalive: Duration) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(Duration::from_secs(TCP_KEEPALIVE_INTERVAL_SECS))
        .with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Serves one connection until it ends, or until the server closes it: then GOAWAY, and the connection is
/// dropped after [`CLOSE_GRACE`] (or the shutdown grace) if it has not ended by then. A connection that
/// sends nothing within `first_bytes` is closed.
#[allow(clippy::too_many_arguments)]
// Not an async fn, which would keep a second copy of its arguments in the task for the connection's life
// (the 448-byte service among them): see `async move` below.
#[allow(clippy::manual_async_fn)]
fn serve_connection<S, B>(
    builder: Arc<Builder<TokioExecutor>>,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    // Boxed: it moves into the connection, and its place in this task's state would stay taken.
    app: Box<S>,
    handle: ConnectionHandle,
    info: TcpConnectInfo,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
    shutdown_grace: Duration,
    first_bytes: Duration,
) -> impl std::future::Future<Output = ()> + Send
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The arguments are the block's captures, used in place.
    async move {
        let peer: Option<SocketAddr> = info.remote_addr;
        // hyper's header read timeout starts once it knows the protocol, which it learns from the first bytes:
        // a client that connects and sends nothing would hold its place for ever. It gets the same time.
        let mut first = [0u8; 1];
        match tokio::time::timeout(first_bytes, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                tracing::debug!(?peer, "connection closed: nothing received");
                return;
            }
        }
        // The handshake gets the same time as the first bytes: a client that stalls in it is closed too.
        let stream = match tls {
            None => Io::Plain(stream),
            // Boxed: a TLS handshake's state (rustls' connection, about 2 KiB) is the largest this task ever
            // holds; inline it would size every connection's task for its whole life, TLS or not.
            Some(tls) => {
                match tokio::time::timeout(first_bytes, Box::pin(tls.accept(stream))).await {
                    Ok(Ok(stream)) => Io::Tls(Box::new(stream)),
                    Ok(Err(e)) => {
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(?peer, "connection closed: TLS handshake not done in time");
                        return;
                    }
                }
            }
        };
        metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
        let closing = handle.closing().clone();
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(handle.clone());
                req.extensions_mut().insert(info.clone());
                req.map(tonic::body::Body::new)
            })
            // Out of its box, which is freed now rather than with this task.
            .service({
                let app = app;
                *app
            });
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(?peer, error = %e, "connection ended with an error");
                }
            }
            _ = closing.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let grace = if shutdown.is_cancelled() { shutdown_grace } else { CLOSE_GRACE };
                match tokio::time::timeout(grace, conn.as_mut()).await {
                    Ok(Err(e)) => tracing::debug!(?peer, error = %e, "connection ended with an error"),
                    Ok(Ok(())) => {}
                    Err(_) => tracing::debug!(?peer, "connection dropped: it did not close within its grace"),
                }
            }
        }
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
        drop(permit);
    }
}

/// A served connection: plain TCP, or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
