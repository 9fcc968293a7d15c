//! Assembles the server: bus, auth, the gRPC services and the middleware stack, on one port.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Method;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::admin::{AdminApi, LiveStreams};
use crate::auth::{self, KeyError, Revocations, Verifier};
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{RedisBus, RedisOptions, Target};
use crate::bus::{Bus, BusError};
use crate::config::Config;
use crate::listener::ConnectionSettings;
use crate::proto::server::admin_service_server::AdminServiceServer;
use crate::proto::server::event_service_server::EventServiceServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::service::{EventApi, Limits};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A JWT key could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A CORS origin is not a valid header value.
    #[error("invalid CORS origin {0:?}")]
    CorsOrigin(String),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// `--redis-url` is not usable.
    #[error("invalid --redis-url: {0}")]
    RedisUrl(String),
    /// The bus could not start (e.g. Redis unreachable at start-up).
    #[error("cannot start the event bus: {0}")]
    Bus(#[from] BusError),
    /// TLS could not be set up (certificate, key or client CA).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Reflection could not read the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Runs lamplight on `listener` until `shutdown` is cancelled, then ends every open stream with
/// `UNAVAILABLE` (naming the last ids, so clients resume elsewhere) and returns once they are closed, or
/// after `config.shutdown_grace_secs` at the latest. Connections are accepted and limited by
/// [`crate::listener`].
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // Certificates first: a node that cannot serve TLS must not start.
    let tls = config
        .tls
        .settings()
        .map(|settings| crate::tls::TlsAcceptor::start(&settings, shutdown.clone()))
        .transpose()?;
    let verifier = Arc::new(Verifier::load(&config.jwt).await?);
    if let Some(addr) = config.metrics_listen {
        crate::metrics::install(addr)?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    if config.jwt.uses_dev_secret() {
        tracing::warn!(
            "no JWT key configured: using the built-in development secret; anyone can mint tokens. \
             Set LAMPLIGHT_JWT_SECRET (or a key file) in production"
        );
    }
    let bus = build_bus(&config).await?;
    // Membership commands: this node's revocations and open streams, kept current by the control channel
    // (loaded and subscribed before the first call is accepted).
    let revocations = Arc::new(Revocations::new());
    let live = LiveStreams::new(revocations.clone());
    crate::admin::start(bus.clone(), live.clone(), shutdown.clone()).await?;
    let api = EventApi::new(
        bus.clone(),
        Limits::from_config(&config),
        config.typing_per_sec,
        shutdown.clone(),
        live.clone(),
    );
    let cleanup = api.cleanup_tasks();
    // Bigger than the event limit, so an oversized event reaches our check and gets INVALID_ARGUMENT with
    // the limit named, instead of a transport error.
    let decode_limit = config
        .max_event_bytes
        .saturating_mul(2)
        .saturating_add(4096);
    let interceptor = auth::Interceptor::with_revocations(verifier, revocations);
    let events = InterceptedService::new(
        EventServiceServer::new(api).max_decoding_message_size(decode_limit),
        interceptor.clone(),
    );
    let revocation_ttl = Duration::from_secs(
        config
            .revocation_ttl_secs
            .saturating_add(config.jwt.jwt_leeway_secs),
    );
    let admin = InterceptedService::new(
        AdminServiceServer::new(AdminApi::new(bus.clone(), live, revocation_ttl)),
        interceptor,
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventServiceServer<EventApi>>().await;
    if let Some(bus_health) = bus.health() {
        tokio::spawn(report_bus_health(
            bus_health,
            health.clone(),
            shutdown.clone(),
        ));
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let cors = cors_layer(&config.cors_origins)?;
    let timing = timing_allow_origin(&config.cors_origins);
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        bus = bus.name(),
        tls = tls.is_some(),
        "lamplight listening (gRPC + grpc-web)"
    );

    // Middleware, outermost first: trace -> CORS -> grpc-web -> (auth interceptor) -> services.
    // Non-OK statuses are the API working as documented (expired tokens, denied rooms, streams ended for
    // slow consumers or shutdown): debug level. Real failures are logged where they happen.
    let quiet_failures = tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG);
    let routes = tonic::service::Routes::new(events)
        .add_service(admin)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let app = tower::ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_grpc().on_failure(quiet_failures))
        .layer(cors)
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("timing-allow-origin"),
            move |_: &http::Response<_>| timing.clone(),
        ))
        .layer(tonic_web::GrpcWebLayer::new())
        .service(routes);

    let stopping = shutdown.clone();
    let health_on_stop = health.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        // Both the service and the overall status (""), which is what probes and load balancers usually
        // check, so they stop sending new calls while open streams drain.
        health_on_stop
            .set_not_serving::<EventServiceServer<EventApi>>()
            .await;
        health_on_stop
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tracing::info!("shutting down: ending open streams");
    });
    // The grace period covers both: open connections get it minus a reserve, then the bus says goodbye
    // (presence) in what is left, so the node's users are OFFLINE cluster-wide before it exits.
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let reserve = (grace / 2).min(CLEANUP_RESERVE);
    let mut settings = ConnectionSettings::from_config(&config);
    settings.shutdown_grace = grace - reserve;
    crate::listener::serve(listener, app, settings, tls, shutdown).await;
    say_goodbye(&*bus, cleanup, tokio::time::Instant::now() + reserve).await;
    Ok(())
}

/// Part of `--shutdown-grace-secs` (at most half of it) kept for the bus's goodbye after the streams.
const CLEANUP_RESERVE: Duration = Duration::from_secs(2);

/// Waits for the presence clean-up of the streams that ended, then lets the bus remove what is left
/// ([`Bus::shutdown`]), both until `deadline`.
async fn say_goodbye(bus: &dyn Bus, cleanup: TaskTracker, deadline: tokio::time::Instant) {
    cleanup.close();
    if tokio::time::timeout_at(deadline, cleanup.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = cleanup.len(),
            "presence clean-up of ended streams still running at the deadline"
        );
    }
    match tokio::time::timeout_at(deadline, bus.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the bus could not clean up before exit"),
        Err(_) => tracing::warn!("the bus did not finish cleaning up within the grace period"),
    }
}

/// The embedded bus, or the Redis bus with `--redis-url` (which must be reachable now: fail fast, so a
/// misconfigured node never joins a load balancer).
async fn build_bus(config: &Config) -> Result<Arc<dyn Bus>, ServeError> {
    let history_ttl = Duration::from_secs(config.history_ttl_secs);
    let Some(url) = &config.redis.redis_url else {
        return Ok(Arc::new(MemoryBus::with_statuses(
            config.history_size,
            history_ttl,
            config.statuses(),
        )));
    };
    let target = Target::parse(url, config.redis.redis_cluster).map_err(ServeError::RedisUrl)?;
    let bus = RedisBus::connect(RedisOptions {
        target,
        tls: config.redis.tls_files(),
        timeout: Duration::from_millis(config.redis.redis_timeout_ms),
        presence_ttl: Duration::from_secs(config.redis.redis_presence_ttl_secs),
        node_id: config.redis.redis_node_id.clone(),
        history_size: config.history_size,
        history_ttl,
        allow_eviction: config.redis.redis_allow_eviction,
        push_queue_bytes: config.redis.redis_push_queue_bytes,
        statuses: config.statuses(),
    })
    .await?;
    Ok(Arc::new(bus))
}

/// Mirrors the bus's health into the gRPC health service (the EventService and the overall "" status)
/// until shutdown, which sets both to NOT_SERVING itself.
async fn report_bus_health(
    mut healthy: tokio::sync::watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    loop {
        let ok = *healthy.borrow_and_update();
        if shutdown.is_cancelled() {
            return;
        }
        let status = if ok {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter
            .set_service_status(
                <EventServiceServer<EventApi> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        reporter.set_service_status("", status).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = healthy.changed() => if changed.is_err() { return },
        }
    }
}

/// `Timing-Allow-Origin` for the CORS origins, so their pages may read how their calls travelled
/// (Resource Timing's `nextHopProtocol`, e.g. "h2" over TLS) as they can for same-origin calls. None
/// without origins.
fn timing_allow_origin(origins: &[String]) -> Option<HeaderValue> {
    let list: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if list.is_empty() {
        return None;
    }
    HeaderValue::from_str(&list.join(", ")).ok()
}

/// CORS for browsers (grpc-web): only listed origins, and the grpc headers exposed so a client can read a
/// status sent as headers.
fn cors_layer(origins: &[String]) -> Result<CorsLayer, ServeError> {
    let origins = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .map(|o| HeaderValue::from_str(o).map_err(|_| ServeError::CorsOrigin(o.to_owned())))
        .collect::<Result<Vec<_>, _>>()?;
    let header = HeaderName::from_static;
    Ok(CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header("content-type"),
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
            header("authorization"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
            header(crate::error::RESUME_METADATA_KEY),
        ])
        .max_age(Duration::from_secs(24 * 3600)))
}
