//! Where the memory of an idle connection goes: a heap census of the server with N idle subscribers.
//!
//! Issue 13 asks for every byte of an idle connection (one HTTP/2 connection with one `Subscribe` stream
//! of 4 rooms) to be accounted for. This runs the server in-process under dhat's counting allocator,
//! connects N subscribers from a child process (this same executable running `lamplight bench --workload
//! idle`, so the clients' allocations are not counted), and once they are all subscribed writes a dhat
//! profile whose "at end" bytes are the heap live at that moment. It prints the heap bytes and blocks per
//! connection, then those bytes by component (tasks by their future, other blocks by their allocation
//! site, named by the rules in [`COMPONENTS`]) and the largest allocation sites.
//!
//! Heap bytes are what was asked of the allocator; the RSS a connection costs also depends on the
//! allocator (which pages of a block are touched, size-class rounding, fragmentation) and is measured
//! from outside with the peers' loadgen (`--mode idle`) or `lamplight bench --workload idle`.
//!
//! ```text
//! CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo run --release --example idle_memory -- --subs 2000
//! ```
//!
//! The profile is left in `target/idle-memory-dhat.json` (open it with dhat's `dh_view.html`).
//! Release with line tables: the task sizes (which hold the futures) are those of the shipped binary,
//! and the call chains have names.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use lamplight::bench::BenchArgs;
use lamplight::Config;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The secret the server checks and the child mints its tokens with.
const SECRET: &str = "idle-memory-census";

/// Allocation sites by component: the first rule whose pattern occurs in a site's first own frame (the
/// first one, from the allocation outwards, whose file is not in [`PLUMBING`]) names it. dhat writes
/// frames as `addr: name (file:line:col)`, the file cut to its last three path components.
const COMPONENTS: &[(&str, &str)] = &[
    ("framed_write.rs", "h2: write buffer (FramedWrite, 16 KiB)"),
    (
        "framed_impl.rs",
        "h2: read buffer (tokio-util FramedRead, 8 KiB)",
    ),
    (
        "hpack/decoder.rs",
        "h2: HPACK decoder (4 KiB scratch + dynamic table)",
    ),
    ("hpack/", "h2: HPACK encoder table"),
    (
        "proto/streams/",
        "h2: stream store (slabs: streams, queued frames, recv events)",
    ),
    ("h2-0.", "h2: other"),
    ("runtime/io/", "tokio: I/O registration (ScheduledIo)"),
    (
        "cancellation_token",
        "tokio-util: cancellation tokens (connection, stream)",
    ),
    ("ProstEncoder", "tonic: encode buffer (BufferSettings)"),
    ("EncodeBody", "tonic: response body (boxed)"),
    ("tonic-0.", "tonic: other"),
    ("bus/sink.rs", "lamplight: inbox (bus::sink)"),
    (
        "bus/memory.rs",
        "lamplight: memory bus (room sinks, leases)",
    ),
    ("presence.rs", "lamplight: presence table"),
    (
        "admin/streams.rs",
        "lamplight: live-stream registry (admin)",
    ),
    ("watchdog.rs", "lamplight: watchdog registration"),
    ("limits.rs", "lamplight: streams per user"),
    ("auth/", "lamplight: principal (auth)"),
    (
        "subscribe.rs",
        "lamplight: Subscribe stream (state, resume map, leases, presence guard)",
    ),
    ("listener.rs", "lamplight: listener"),
    ("hyper-util", "hyper-util"),
    ("hyper-1", "hyper"),
    ("proto/h2/", "hyper"),
    ("cors/", "tower-http"),
    ("tower-http", "tower-http"),
];

/// Files of frames that say nothing about who allocated (the allocator, std, collections, buffers).
const PLUMBING: &[&str] = &[
    "src/backtrace",
    "dhat-",
    "examples/idle_memory.rs",
    "alloc/",
    "src/raw_vec",
    "src/vec/",
    "src/boxed",
    "collections/",
    "btree/",
    "src/raw/",
    "bytes-",
    "slab-",
    "src/sync.rs",
    "src/string.rs",
    "src/str/",
    "src/fmt/",
    "src/alloc.rs",
    "ops/function.rs",
    "src/ops/",
    "iter/",
    "src/slice",
    "src/borrow",
    "src/map.rs",
    "src/clone.rs",
    "src/option.rs",
    "adapters/",
    "traits/",
    "src/rc.rs",
    "src/hash/",
    "hash/map.rs",
    "src/set.rs",
    "set.rs",
    "src/result.rs",
    "src/convert/",
    "src/ptr/",
    "src/mem/",
];

/// The frame of a task's allocation: the future's type follows.
const TASK_CELL: &str = "new<tokio::runtime::task::core::Cell<";

#[derive(Parser)]
#[command(about = "Heap census of the server with N idle subscribers (issue 13)")]
struct Cli {
    /// Idle subscribers (one connection and one 4-room Subscribe each).
    #[arg(long, default_value_t = 2000)]
    subs: usize,
    /// Where the dhat profile goes.
    #[arg(long, default_value = "target/idle-memory-dhat.json")]
    out: std::path::PathBuf,
    /// Allocation sites listed.
    #[arg(long, default_value_t = 25)]
    top: usize,
    /// Seconds to wait after the last subscriber joined before counting.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
}

/// The child: `lamplight bench` as the clients.
#[derive(Parser)]
struct Child {
    #[command(flatten)]
    bench: BenchArgs,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args();
    if std::env::args().nth(1).as_deref() == Some("bench-child") {
        let child =
            Child::parse_from(std::iter::once(args.next().unwrap_or_default()).chain(args.skip(1)));
        return lamplight::bench::main(child.bench);
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(census(cli))
}

async fn census(cli: Cli) -> anyhow::Result<()> {
    let profiler = dhat::Profiler::builder()
        .file_name(&cli.out)
        .trim_backtraces(None)
        .build();
    let mut config = Config::new("127.0.0.1:0".parse()?);
    config.jwt.jwt_secret = Some(SECRET.into());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(lamplight::serve(listener, config, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = dhat::HeapStats::get();

    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench-child", "--workload", "idle", "--addr"])
        .arg(format!("http://{addr}"))
        .args(["--subs", &cli.subs.to_string(), "--jwt-secret", SECRET])
        .args(["--settle-secs", "0.1", "--duration-secs", "86400"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    // The bench says "holding" once every subscriber has joined (or given up).
    let ready = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return false };
            eprintln!("  child: {line}");
            if line.contains("holding") {
                return true;
            }
        }
        false
    })
    .await?;
    if !ready {
        let _ = child.kill();
        anyhow::bail!("the clients ended before subscribing");
    }
    tokio::time::sleep(Duration::from_secs_f64(cli.settle_secs)).await;
    let after = dhat::HeapStats::get();
    // Writes the profile: its "at end" figures are the heap live now, with every subscriber idle.
    drop(profiler);
    let _ = child.kill();
    let _ = child.wait();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;

    let n = cli.subs as f64;
    let bytes = after.curr_bytes as f64 - before.curr_bytes as f64;
    let blocks = after.curr_blocks as f64 - before.curr_blocks as f64;
    println!(
        "heap per idle connection (S={}): {:.0} bytes in {:.1} blocks (server heap {:.1} -> {:.1} MiB)",
        cli.subs,
        bytes / n,
        blocks / n,
        before.curr_bytes as f64 / 1048576.0,
        after.curr_bytes as f64 / 1048576.0
    );
    report(&cli, n)
}

/// Reads the profile back and prints the live bytes per connection by component and by site.
fn report(cli: &Cli, n: f64) -> anyhow::Result<()> {
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&cli.out)?)?;
    let ftbl: Vec<&str> = profile["ftbl"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    // (component, site) -> (bytes, blocks) live at the census.
    let mut sites: Vec<((String, String), (u64, u64))> = Vec::new();
    for pp in profile["pps"].as_array().into_iter().flatten() {
        let (eb, ebk) = (
            pp["eb"].as_u64().unwrap_or(0),
            pp["ebk"].as_u64().unwrap_or(0),
        );
        if eb == 0 {
            continue;
        }
        let frames: Vec<&str> = pp["fs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| ftbl.get(usize::try_from(i.as_u64()?).ok()?).copied())
            .map(|f| f.split_once(": ").map_or(f, |(_, rest)| rest))
            .collect();
        let key = classify(&frames);
        match sites.iter_mut().find(|(k, _)| *k == key) {
            Some((_, (b, k))) => {
                *b += eb;
                *k += ebk;
            }
            None => sites.push((key, (eb, ebk))),
        }
    }
    let mut by_component: Vec<(&str, u64, u64)> = Vec::new();
    for ((component, _), (eb, ebk)) in &sites {
        match by_component.iter_mut().find(|(c, ..)| c == component) {
            Some(entry) => {
                entry.1 += eb;
                entry.2 += ebk;
            }
            None => by_component.push((component, *eb, *ebk)),
        }
    }
    by_component.sort_by_key(|c| std::cmp::Reverse(c.1));
    println!("\n| component | bytes per connection | blocks per connection |\n|---|---:|---:|");
    let mut total = 0.0;
    for (component, eb, ebk) in &by_component {
        let per = *eb as f64 / n;
        total += per;
        if per >= 8.0 {
            println!("| {component} | {per:.0} | {:.2} |", *ebk as f64 / n);
        }
    }
    println!("| (all live heap / S) | {total:.0} | |");
    sites.sort_by_key(|s| std::cmp::Reverse(s.1 .0));
    println!("\nlargest allocation sites (bytes and blocks per connection, live at the census):");
    for ((component, site), (eb, ebk)) in sites.iter().take(cli.top) {
        println!(
            "{:>7.0} B {:>5.2} blk  {component}  @ {site}",
            *eb as f64 / n,
            *ebk as f64 / n
        );
    }
    Ok(())
}

/// (component, site) of an allocation from its frames (the allocation first): a task by its future,
/// anything else by its first own frame.
fn classify(frames: &[&str]) -> (String, String) {
    if let Some(task) = frames
        .iter()
        .take(24)
        .find_map(|f| f.strip_prefix(TASK_CELL))
    {
        let future = task.trim_start_matches("tokio_util::task::task_tracker::TrackedFuture<");
        let end = future.find(['<', '{', ',']).unwrap_or(future.len());
        let future = future[..end].trim_end_matches(':');
        return (format!("task: {future}"), "tokio::spawn".into());
    }
    for frame in frames {
        let Some(file) = file_of(frame) else { continue };
        if PLUMBING
            .iter()
            .any(|p| file.starts_with(p) || file.contains(&format!("/{p}")))
        {
            continue;
        }
        let component = COMPONENTS
            .iter()
            .find(|(pattern, _)| frame.contains(pattern))
            .map_or_else(|| format!("other: {file}"), |(_, name)| (*name).to_owned());
        let site = frame
            .rsplit_once(" (")
            .map_or(*frame, |(_, at)| at.trim_end_matches(')'));
        return (component, site.to_owned());
    }
    ("other".into(), String::new())
}

/// `name (file:line:col)` -> `file`.
fn file_of(frame: &str) -> Option<&str> {
    let at = frame.rsplit_once(" (")?.1.trim_end_matches(')');
    let mut parts = at.rsplitn(3, ':');
    parts.next()?;
    parts.next()?;
    parts.next()
}
