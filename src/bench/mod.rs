//! `lamplight bench`: a load generator for a running deployment (cargo feature `client`).
//!
//! It opens S subscriber connections (one HTTP/2 connection with one `Subscribe` stream each, as browser
//! tabs do), publishes through one service connection, and reports per run one JSON line on standard
//! output plus a human summary and progress on standard error:
//! offered and delivered rates, expected / delivered / lost / duplicated deliveries (counted per
//! subscriber, by the sequence number every event carries), end-to-end latency percentiles (the send time
//! travels in the event: task id `ev-{seq}-{sent_ns}`), and, with `--server-pid`, the server's RSS and CPU
//! seconds from `/proc`, with `--metrics`, the server's own Prometheus counters.
//!
//! Workloads (same users, rooms and payload as the Socket.IO peer's load generator in `peers/loadgen`):
//! - `fanout`: S subscribers over R project rooms (each also in its `user:` and `tenant:` room), the
//!   publisher at E events/s round-robin over the rooms;
//! - `two-node`: the same over two servers on one Redis (`--addr A,B`): every room has members on both,
//!   the publisher talks to the first, so half of the deliveries cross the bus;
//! - `idle`: S subscribers in 4 rooms each, doing nothing: server RSS per connection;
//! - `storm`: S users of one tenant connect at once (see [`storm`]): time until all are subscribed,
//!   server CPU and peak RSS, status deliveries, and whether a watcher's online set ends equal to the
//!   truth; `--restart-cmd` adds the mass reconnect.
//!
//! `--find-max` raises E by `--factor` until delivered/expected < 99 % or p99 > 200 ms (or the publisher
//! falls behind, or a stream ends), then bisects, and reports the highest sustained deliveries/s.
//!
//! Modules: [`workload`] (who subscribes to what), [`subscriber`], [`publisher`], [`tally`] (what
//! arrived), [`step`] (fixed-rate steps and the search), [`storm`] (the connect storm and the mass
//! reconnect), [`procfs`], [`scrape`], [`report`].

mod procfs;
mod publisher;
mod report;
mod scrape;
mod step;
mod storm;
mod subscriber;
mod tally;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};

use crate::client::{bearer, with_scheme};
use crate::config::JwtConfig;
use procfs::round3;
use publisher::Publisher;
use report::{emit, summary};
use step::FanoutRun;
use subscriber::Subscriber;
use tally::{Seen, Tally};

/// What the bench does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// S subscribers over R rooms on one server, a publisher at E events/s.
    Fanout,
    /// The same with subscribers over two servers sharing one Redis (`--addr A,B`), publishing to the
    /// first.
    TwoNode,
    /// S idle subscribers in 4 rooms each: the server's memory per connection.
    Idle,
    /// S users of one tenant connecting at once (one or two `--addr`): time until all are subscribed,
    /// server CPU and peak RSS, status deliveries, and a watcher's online set against the truth.
    Storm,
}

/// Flags of `lamplight bench`.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Server URL (`http://host:port`); two, comma-separated, for `--workload two-node`.
    #[arg(
        long,
        env = "LAMPLIGHT_ADDR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: Vec<String>,
    /// fanout, two-node, idle or storm.
    #[arg(long, value_enum, default_value_t = Workload::Fanout)]
    pub workload: Workload,
    /// S: subscriber connections (one stream each).
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// R: fan-out rooms; subscriber i listens to room i % R (not used by idle).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// E: events/s published, over all rooms.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Measured seconds per run (per step with --find-max; idle: seconds to hold the connections).
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// Seconds of publishing before the measured window.
    #[arg(long, default_value_t = 5.0)]
    pub warmup_secs: f64,
    /// Longest wait for late deliveries after the window.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Raise E from --start-rate until a step fails; report the highest sustained deliveries/s.
    #[arg(long)]
    pub find_max: bool,
    /// --find-max: first rate, events/s.
    #[arg(long, default_value_t = 500.0)]
    pub start_rate: f64,
    /// --find-max: rate multiplier between steps.
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// --find-max: bisection steps between the last pass and the first failure.
    #[arg(long, default_value_t = 2)]
    pub refine: usize,
    /// --find-max: highest rate tried, events/s.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// A step fails below this delivered/expected ratio.
    #[arg(long, default_value_t = 0.99)]
    pub min_delivery: f64,
    /// A step fails above this end-to-end p99, ms.
    #[arg(long, default_value_t = 200.0)]
    pub max_p99_ms: f64,
    /// A step fails when the publisher sent less than this share of E.
    #[arg(long, default_value_t = 0.95)]
    pub min_sent_ratio: f64,
    /// --find-max: a failed step is run again when other processes used more cores than this.
    #[arg(long, default_value_t = 0.3)]
    pub noise_cores: f64,
    /// --find-max: how often a noisy failed step is run again.
    #[arg(long, default_value_t = 2)]
    pub noise_retries: usize,
    /// idle: seconds to wait after every subscriber joined before measuring.
    #[arg(long, default_value_t = 10.0)]
    pub settle_secs: f64,
    /// storm: longest wait for the watcher's online set to equal the truth (and for status deliveries to
    /// stop) after the storm and after the reconnect.
    #[arg(long, default_value_t = 60.0)]
    pub status_timeout_secs: f64,
    /// storm: after the storm, run this shell command, which must restart the servers under the open
    /// streams and print their new PIDs (comma-separated, `--addr` order); then measure the reconnect.
    #[arg(long)]
    pub restart_cmd: Option<String>,
    /// PIDs of the servers (same order as --addr) whose RSS and CPU are reported, from /proc.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// The servers' --metrics-listen endpoints (`http://host:port`), read before and after the window.
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Size of the event's task as JSON (the same field values go into the protobuf task).
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Subscriber handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Give up on a subscriber that is not subscribed within this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout_secs: f64,
    /// Unanswered publishes at most.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Runtime threads of the bench (1: a single-threaded runtime, the leanest; it shares the machine).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Free text copied into the JSON line.
    #[arg(long, default_value = "")]
    pub label: String,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// The server's secret (and iss/aud) to mint the subscribers' and the publisher's tokens with.
    #[command(flatten)]
    pub jwt: JwtConfig,
}

/// Runs the bench on its own runtime (`--threads`) and prints its results. For the binary.
pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(run(args));
    // Thousands of connections need not be closed one by one.
    runtime.shutdown_background();
    result.map(|_| ())
}

/// Runs the bench described by `args`, prints progress and a summary to standard error and the JSON
/// line to standard output (and `--json-out`), and returns the JSON line.
pub async fn run(args: BenchArgs) -> anyhow::Result<Value> {
    check(&args)?;
    let urls: Vec<String> = args.addr.iter().map(|a| with_scheme(a)).collect();
    let minter = workload::Minter::new(&args.jwt)?;
    let tally = Arc::new(Tally::new(urls.len()));
    let specs = match args.workload {
        Workload::Idle => workload::idle(args.subs, urls.len()),
        Workload::Fanout | Workload::TwoNode => workload::fanout(args.subs, args.rooms, urls.len()),
        Workload::Storm => workload::storm(args.subs, args.rooms, urls.len()),
    };
    // Idle subscribers each join their own 4 rooms; --rooms shapes the fan-out workloads only.
    let rooms = if args.workload == Workload::Idle {
        4
    } else {
        args.rooms
    };
    // The storm's watcher subscribes before the storm, so that it sees every status change.
    let watcher = if args.workload == Workload::Storm {
        let token = minter.sign(&workload::watcher())?;
        Some(
            storm::Watcher::start(
                &urls[0],
                authorization(&token)?,
                Duration::from_secs_f64(args.connect_timeout_secs),
            )
            .await?,
        )
    } else {
        None
    };
    let storm_before = match watcher {
        Some(_) => Some(storm::Before::take(&args).await),
        None => None,
    };
    let storm_started = Instant::now();
    let rss_before: Vec<procfs::Sample> =
        args.server_pid.iter().map(|p| procfs::sample(*p)).collect();
    let bench_before = procfs::sample(std::process::id());
    if !args.quiet {
        eprintln!(
            "lamplight bench: {:?} S={} R={} on {} (bench threads {})",
            args.workload,
            args.subs,
            rooms,
            urls.join(","),
            args.threads
        );
    }

    let mut tasks = JoinSet::new();
    let connected = connect_all(&args, &urls, &minter, &specs, &tally, &mut tasks).await?;
    let mut line = json!({
        "tool": "lamplight bench",
        "version": env!("CARGO_PKG_VERSION"),
        "label": args.label,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "target": urls.join(","),
        "workload": args.workload,
        "find_max": args.find_max,
        "subscribers": args.subs,
        "connections": connected.seen.len(),
        "connect_failures": connected.failures,
        "connect_error": connected.first_error,
        "connect_secs": round3(connected.secs),
        "rooms": rooms,
        "rooms_per_subscriber": specs.first().map_or(0, |s| s.rooms.len()),
        "payload_bytes": args.payload_bytes,
        "bench_threads": args.threads,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    if connected.seen.is_empty() {
        anyhow::bail!(
            "no subscriber could subscribe: {}",
            connected.first_error.unwrap_or_default()
        );
    }

    let result = match args.workload {
        Workload::Idle => idle(&args, &tally, &connected, &rss_before, bench_before).await,
        Workload::Fanout | Workload::TwoNode => {
            fanout(&args, &urls[0], &minter, &tally, connected).await
        }
        Workload::Storm => match (&watcher, storm_before) {
            (Some(watcher), Some(before)) => {
                storm::run(
                    &args,
                    &tally,
                    watcher,
                    &connected.ids,
                    storm_started,
                    before,
                )
                .await
            }
            _ => anyhow::bail!("the storm has no watcher"),
        },
    };
    tasks.abort_all();
    let fields = result?;
    if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
        line.extend(fields);
    }
    emit(&line, args.json_out.as_deref())?;
    Ok(line)
}

/// Flag combinations that cannot work, refused before anything connects.
fn check(args: &BenchArgs) -> anyhow::Result<()> {
    let servers = args.addr.len();
    match args.workload {
        Workload::Fanout if servers != 1 => {
            anyhow::bail!("--workload fanout takes one --addr (two: --workload two-node)")
        }
        Workload::TwoNode if servers != 2 => {
            anyhow::bail!("--workload two-node takes two --addr (A,B) sharing one Redis")
        }
        Workload::Idle | Workload::Storm if args.find_max => {
            anyhow::bail!("--find-max needs a fan-out workload")
        }
        Workload::Storm if servers > 2 => anyhow::bail!("--workload storm takes one or two --addr"),
        _ if args.restart_cmd.is_some() && args.workload != Workload::Storm => {
            anyhow::bail!("--restart-cmd belongs to --workload storm")
        }
        _ => {}
    }
    anyhow::ensure!(args.subs > 0, "--subs must be at least 1");
    anyhow::ensure!(args.rooms > 0, "--rooms must be at least 1");
    anyhow::ensure!(
        args.rate > 0.0 && args.start_rate > 0.0,
        "rates must be positive"
    );
    anyhow::ensure!(args.factor > 1.0, "--factor must be above 1");
    anyhow::ensure!(args.duration_secs > 0.0, "--duration-secs must be positive");
    anyhow::ensure!(args.max_in_flight > 0, "--max-in-flight must be at least 1");
    anyhow::ensure!(
        args.server_pid.is_empty() || args.server_pid.len() == servers,
        "give one --server-pid per --addr"
    );
    if let Some(pid) = args.server_pid.iter().find(|p| !procfs::exists(**p)) {
        anyhow::bail!("--server-pid {pid}: no such process");
    }
    Ok(())
}

fn authorization(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    bearer(token).context("token is not a valid header value")
}

/// The subscribers that are subscribed.
struct Connected {
    /// (fan-out room, what it saw), one per connected subscriber.
    seen: Vec<(Option<usize>, Arc<Mutex<Seen>>)>,
    /// Index (user `u{i}`) of every connected subscriber.
    ids: Vec<usize>,
    failures: usize,
    first_error: Option<String>,
    secs: f64,
}

async fn connect_all(
    args: &BenchArgs,
    urls: &[String],
    minter: &workload::Minter,
    specs: &[workload::SubscriberSpec],
    tally: &Arc<Tally>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Connected> {
    let started = Instant::now();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let timeout = Duration::from_secs_f64(args.connect_timeout_secs);
    let mut seen = Vec::with_capacity(specs.len());
    for spec in specs {
        let mine = Arc::new(Mutex::new(Seen::default()));
        seen.push((spec.fanout_room, mine.clone()));
        let subscriber = Subscriber {
            url: urls[spec.server].clone(),
            authorization: authorization(&minter.sign(&spec.claims)?)?,
            fanout_room: spec.fanout_room.map(workload::project_room),
            seen: mine,
            tally: tally.clone(),
            spec: spec.clone(),
        };
        tasks.spawn(subscriber.run(ready_tx.clone(), gate.clone(), timeout));
    }
    drop(ready_tx);
    let mut ok = vec![false; specs.len()];
    let (mut subscribed, mut failures, mut first_error) = (0usize, 0usize, None);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            message = ready.recv() => match message {
                Some(Ok(idx)) => {
                    ok[idx] = true;
                    subscribed += 1;
                }
                Some(Err(e)) => {
                    failures += 1;
                    first_error.get_or_insert(e);
                }
                None => break,
            },
            _ = tick.tick(), if !args.quiet => eprintln!(
                "  connecting: {subscribed}/{} subscribed, {failures} failed ({:.1}s)",
                specs.len(),
                started.elapsed().as_secs_f64()
            ),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if !args.quiet || failures > 0 {
        eprintln!(
            "subscribed {subscribed}/{} in {secs:.2}s; {failures} failed{}",
            specs.len(),
            first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    let disconnects = tally.disconnects.swap(0, Relaxed);
    if disconnects > 0 {
        eprintln!("  {disconnects} streams ended while connecting (subscribed again)");
    }
    Ok(Connected {
        ids: ok
            .iter()
            .enumerate()
            .filter_map(|(i, ok)| ok.then_some(specs[i].idx))
            .collect(),
        seen: seen
            .into_iter()
            .zip(ok)
            .filter_map(|(s, ok)| ok.then_some(s))
            .collect(),
        failures,
        first_error,
        secs,
    })
}

/// Fan-out and two-node: one fixed-rate run, or the search.
async fn fanout(
    args: &BenchArgs,
    publish_url: &str,
    minter: &workload::Minter,
    tally: &Arc<Tally>,
    connected: Connected,
) -> anyhow::Result<Value> {
    let publisher = Publisher::connect(
        publish_url,
        authorization(&minter.publisher()?)?,
        args.rooms,
        args.payload_bytes,
        args.max_in_flight,
        tally.clone(),
    )
    .await
    .with_context(|| format!("publisher cannot connect to {publish_url}"))?;
    let mut members = vec![0u64; args.rooms];
    let mut seen = Vec::with_capacity(connected.seen.len());
    for (room, s) in connected.seen {
        if let Some(k) = room {
            members[k] += 1;
            seen.push((k, s));
        }
    }
    let mut run = FanoutRun {
        args,
        tally: tally.clone(),
        publisher,
        seen,
        members,
        next_room: 0,
    };
    if !args.find_max {
        let result = run.step(args.rate).await?;
        eprintln!("{}", summary(&format!("{:?}", args.workload), &result));
        return Ok(serde_json::to_value(&result)?);
    }
    let search = run.find_max().await?;
    let mut fields = match &search.best {
        Some(best) => {
            eprintln!(
                "{}",
                summary(
                    &format!("{:?} highest sustained (--find-max)", args.workload),
                    best
                )
            );
            serde_json::to_value(best)?
        }
        None => {
            eprintln!("--find-max: no step passed");
            json!({})
        }
    };
    if let Some(fields) = fields.as_object_mut() {
        fields.insert(
            "max_sustained_deliveries_per_sec".into(),
            json!(search.best.as_ref().map(|b| b.delivered_per_sec)),
        );
        fields.insert(
            "max_sustained_events_per_sec".into(),
            json!(search.best.as_ref().map(|b| b.offered_events_per_sec)),
        );
        fields.insert(
            "first_failing_events_per_sec".into(),
            json!(search.first_fail),
        );
        fields.insert("steps".into(), serde_json::to_value(&search.steps)?);
    }
    Ok(fields)
}

/// Idle: hold the connections and measure what they cost the servers.
async fn idle(
    args: &BenchArgs,
    tally: &Tally,
    connected: &Connected,
    rss_before: &[procfs::Sample],
    bench_before: procfs::Sample,
) -> anyhow::Result<Value> {
    if !args.quiet {
        eprintln!("  settling for {}s", args.settle_secs);
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let start: Vec<procfs::Sample> = args.server_pid.iter().map(|p| procfs::sample(*p)).collect();
    let held_from = Instant::now();
    if !args.quiet {
        eprintln!("  holding for {}s", args.duration_secs);
    }
    tokio::time::sleep(Duration::from_secs_f64(args.duration_secs)).await;
    let end: Vec<procfs::Sample> = args.server_pid.iter().map(|p| procfs::sample(*p)).collect();
    let metrics_after = scrape::gather(scrape::start_all(&args.metrics)).await;
    let held = held_from.elapsed().as_secs_f64();
    let connections = connected.seen.len() as f64;
    let per_server = connections / args.addr.len() as f64;
    let servers: Vec<Value> = args
        .server_pid
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let before = rss_before[i].rss_kib.unwrap_or(0) as f64;
            let after = end[i].rss_kib.unwrap_or(0) as f64;
            let during = procfs::report(*pid, start[i], end[i], held);
            json!({
                "pid": pid,
                "rss_before_mib": round3(before / 1024.0),
                "rss_after_mib": round3(after / 1024.0),
                "rss_per_connection_kib": round3((after - before) / per_server),
                "idle_cpu_cores": during.cpu_cores,
                "idle_cpu_secs": during.cpu_secs,
            })
        })
        .collect();
    let bench_after = procfs::sample(std::process::id());
    let bench_per_conn = (bench_after.rss_kib.unwrap_or(0) as f64
        - bench_before.rss_kib.unwrap_or(0) as f64)
        / connections;
    let streams_open: Vec<Option<f64>> = metrics_after
        .iter()
        .map(|m| {
            m.as_ref()
                .and_then(|m| m.get(crate::metrics::STREAMS_OPEN).copied())
        })
        .collect();
    let disconnects = tally.disconnects.load(Relaxed);
    for s in &servers {
        eprintln!(
            "Idle S={}: server pid {} rss {} -> {} MiB = {} KiB per connection; idle cpu {} cores; streams ended {disconnects}",
            connected.seen.len(),
            s["pid"],
            s["rss_before_mib"],
            s["rss_after_mib"],
            s["rss_per_connection_kib"],
            s["idle_cpu_cores"],
        );
    }
    Ok(json!({
        "settle_secs": args.settle_secs,
        "hold_secs": round3(held),
        "servers": servers,
        "streams_open": streams_open,
        "bench_rss_per_connection_kib": round3(bench_per_conn),
        "disconnects": disconnects,
    }))
}
