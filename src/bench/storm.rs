//! The connect storm: N users of one tenant open their streams as fast as the server accepts them (every
//! user in its `user:` room, the tenant room and a project room), and optionally a mass reconnect (the
//! servers restarted under the N open streams by `--restart-cmd`).
//!
//! Why a watcher: every member of the tenant receives the tenant's status diffs (`user.status`,
//! `PresenceDiff`), but a set of N users kept by each of N clients is N² memory in the bench. One more
//! member of the tenant, the *watcher*, subscribes to `tenant:t1` before the storm, takes `GetPresence`
//! as its starting point whenever it (re)subscribes, and applies every diff; the storm passes when its
//! view equals the truth (the N users and itself). The other clients count the status events and
//! changes they receive, which is what the statuses cost.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::Request;

use super::procfs::{self, round3, Sample};
use super::scrape::{self, Metrics};
use super::subscriber::connect;
use super::tally::{lock, Tally};
use super::workload::{TENANT, WATCHER_SUB};
use super::BenchArgs;
use crate::metrics::{EVENTS_DELIVERED, STATUS_CHANGES, STATUS_EVENTS, STREAMS_OPEN};
use crate::proto::v1::event_service_client::EventServiceClient;
use crate::proto::v1::{
    event::Payload, subscribe_response::Kind, user_status, GetPresenceRequest, SubscribeRequest,
};
use crate::statuses;

/// Pause before the watcher subscribes again after its stream ended.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);
/// The status deliveries are over once none arrived for this long.
const QUIET: Duration = Duration::from_secs(1);
/// Ids of missing or extra users shown in the report at most.
const SHOWN_IDS: usize = 10;

fn tenant_room() -> String {
    format!("tenant:{TENANT}")
}

/// What the watcher knows.
#[derive(Default)]
struct View {
    online: HashSet<String>,
    /// Streams the watcher opened (1 + its reconnects).
    subscriptions: u64,
}

/// The watcher's task; aborted when dropped.
pub(super) struct Watcher {
    view: Arc<Mutex<View>>,
    diffs: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Subscribes the watcher to `tenant:t1` on `url` and returns once it holds its first snapshot.
    pub(super) async fn start(
        url: &str,
        authorization: MetadataValue<Ascii>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let view = Arc::new(Mutex::new(View::default()));
        let diffs = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready) = oneshot::channel();
        let task = tokio::spawn(watch(
            url.to_owned(),
            authorization,
            view.clone(),
            diffs.clone(),
            ready_tx,
        ));
        let watcher = Self { view, diffs, task };
        tokio::time::timeout(timeout, ready)
            .await
            .with_context(|| format!("the storm's watcher was not subscribed within {timeout:?}"))?
            .context("the storm's watcher ended")?
            .map_err(|e| anyhow::anyhow!("the storm's watcher cannot subscribe: {e}"))?;
        Ok(watcher)
    }

    /// Compares the watcher's view with the truth: `users` plus the watcher itself.
    fn check(&self, users: &HashSet<String>) -> Check {
        let view = lock(&self.view);
        let mut missing: Vec<&String> =
            users.iter().filter(|u| !view.online.contains(*u)).collect();
        let mut extra: Vec<&String> = view.online.iter().filter(|u| !users.contains(*u)).collect();
        missing.sort();
        extra.sort();
        Check {
            ok: missing.is_empty() && extra.is_empty(),
            missing: missing.len(),
            extra: extra.len(),
            examples: missing
                .iter()
                .chain(&extra)
                .take(SHOWN_IDS)
                .map(|s| s.to_string())
                .collect(),
            subscriptions: view.subscriptions,
        }
    }

    /// Waits until the view equals the truth or `limit` passed; returns the last comparison and when it
    /// first matched (seconds since `since`).
    async fn converge(
        &self,
        users: &HashSet<String>,
        since: Instant,
        limit: Duration,
    ) -> (Check, Option<f64>) {
        let deadline = Instant::now() + limit;
        loop {
            let check = self.check(users);
            if check.ok {
                return (check, Some(since.elapsed().as_secs_f64()));
            }
            if Instant::now() >= deadline {
                return (check, None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The watcher's view against the truth.
struct Check {
    ok: bool,
    missing: usize,
    extra: usize,
    examples: Vec<String>,
    subscriptions: u64,
}

impl Check {
    fn json(&self, converged_secs: Option<f64>) -> Value {
        json!({
            "online_set_ok": self.ok,
            "online_missing": self.missing,
            "online_extra": self.extra,
            "online_wrong_examples": self.examples,
            "statuses_converged_secs": converged_secs.map(round3),
            "watcher_subscriptions": self.subscriptions,
        })
    }
}

/// The watcher's loop: subscribe, snapshot, apply diffs; again after the stream ends.
async fn watch(
    url: String,
    authorization: MetadataValue<Ascii>,
    view: Arc<Mutex<View>>,
    diffs: Arc<AtomicU64>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut client: Option<EventServiceClient<Channel>> = None;
    loop {
        let result = watch_once(&url, &authorization, &mut client, &view, &diffs, &mut ready).await;
        if let (Err(e), Some(tx)) = (&result, ready.take()) {
            let _ = tx.send(Err(format!("{e:#}")));
            return;
        }
        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
    }
}

/// One stream of the watcher, until it ends.
async fn watch_once(
    url: &str,
    authorization: &MetadataValue<Ascii>,
    client: &mut Option<EventServiceClient<Channel>>,
    view: &Mutex<View>,
    diffs: &AtomicU64,
    ready: &mut Option<oneshot::Sender<Result<(), String>>>,
) -> anyhow::Result<()> {
    // One HTTP/2 connection for the watcher's life: tonic reconnects it after a restart.
    if client.is_none() {
        *client = Some(EventServiceClient::new(
            connect(url, Duration::from_secs(10)).await?,
        ));
    }
    let Some(grpc) = client.as_mut() else {
        anyhow::bail!("no client");
    };
    let mut request = Request::new(SubscribeRequest {
        rooms: vec![tenant_room()],
        since: Default::default(),
    });
    request
        .metadata_mut()
        .insert("authorization", authorization.clone());
    let mut stream = grpc.subscribe(request).await?.into_inner();
    // Diffs before `Subscribed` are applied on top of the snapshot, like every later one.
    let mut early = Vec::new();
    loop {
        match stream.message().await? {
            Some(message) => match message.kind {
                Some(Kind::Subscribed(_)) => break,
                Some(Kind::Event(event)) => early.extend(changes(event.payload)),
                _ => {}
            },
            None => anyhow::bail!("the stream ended before Subscribed"),
        }
    }
    // Every page of the tenant's presence (GetPresence pages its ids).
    let mut online = Vec::new();
    let mut page_token = String::new();
    loop {
        let mut request = Request::new(GetPresenceRequest {
            room: tenant_room(),
            limit: 1000,
            page_token: std::mem::take(&mut page_token),
        });
        request
            .metadata_mut()
            .insert("authorization", authorization.clone());
        let page = grpc.get_presence(request).await?.into_inner();
        online.extend(page.user_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    {
        let mut v = lock(view);
        v.online = online.into_iter().collect();
        v.subscriptions += 1;
        apply(&mut v.online, early);
    }
    if let Some(tx) = ready.take() {
        let _ = tx.send(Ok(()));
    }
    while let Ok(Some(message)) = stream.message().await {
        if let Some(Kind::Event(event)) = message.kind {
            let changes = changes(event.payload);
            if !changes.is_empty() {
                diffs.fetch_add(1, Relaxed);
                apply(&mut lock(view).online, changes);
            }
        }
    }
    Ok(())
}

/// The (user, online) changes an event carries (none for other events).
fn changes(payload: Option<Payload>) -> Vec<(String, bool)> {
    match payload {
        Some(Payload::PresenceDiff(diff)) => statuses::diff_changes(&diff)
            .map(|(user, online)| (user.to_owned(), online))
            .collect(),
        Some(Payload::UserStatus(status)) => match status.status() {
            user_status::Status::Online => vec![(status.user_id, true)],
            user_status::Status::Offline => vec![(status.user_id, false)],
            user_status::Status::Unspecified => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn apply(online: &mut HashSet<String>, changes: Vec<(String, bool)>) {
    for (user, is_online) in changes {
        if is_online {
            online.insert(user);
        } else {
            online.remove(&user);
        }
    }
}

/// Waits until no status event reached a subscriber for [`QUIET`], at most `limit`.
async fn statuses_quiet(tally: &Tally, limit: Duration) {
    let started = Instant::now();
    let mut last = tally.status_events.load(Relaxed);
    let mut still_since = Instant::now();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tally.status_events.load(Relaxed);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= QUIET {
            return;
        }
    }
}

/// The truth: the connected users and the watcher.
pub(super) fn truth(connected: &[usize]) -> HashSet<String> {
    connected
        .iter()
        .map(|i| format!("u{i}"))
        .chain([WATCHER_SUB.to_owned()])
        .collect()
}

/// What a phase (the storm, or the reconnect) cost the servers, from `/proc` and their metrics.
fn servers_json(
    pids: &[u32],
    start: &[Sample],
    secs: f64,
    before: &[Option<Metrics>],
    after: &[Option<Metrics>],
    urls: &[String],
) -> Value {
    let procs: Vec<Value> = pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let start = start.get(i).copied().unwrap_or_default();
            serde_json::to_value(procfs::report(*pid, start, procfs::sample(*pid), secs))
                .unwrap_or_default()
        })
        .collect();
    let cpu: Option<f64> = if procs.is_empty() {
        None
    } else {
        procs.iter().map(|p| p["cpu_secs"].as_f64()).sum()
    };
    let metrics: Vec<Value> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let after = after.get(i).and_then(Option::as_ref);
            let before = before.get(i).and_then(Option::as_ref);
            let delta = |name: &str| {
                after
                    .and_then(|a| a.get(name))
                    .map(|a| a - before.and_then(|b| b.get(name)).copied().unwrap_or(0.0))
            };
            json!({
                "url": url,
                "status_events": delta(STATUS_EVENTS),
                "status_changes": delta(STATUS_CHANGES),
                "events_delivered": delta(EVENTS_DELIVERED),
                "streams_open": after.and_then(|a| a.get(STREAMS_OPEN)),
            })
        })
        .collect();
    json!({
        "server_cpu_secs": cpu.map(round3),
        "server_rss_peak_mib": procs.iter().filter_map(|p| p["rss_peak_mib"].as_f64()).reduce(f64::max),
        "servers": procs,
        "server_metrics": metrics,
    })
}

/// Everything the storm measured before it started.
pub(super) struct Before {
    pub(super) servers: Vec<Sample>,
    pub(super) metrics: Vec<Option<Metrics>>,
}

impl Before {
    pub(super) async fn take(args: &BenchArgs) -> Self {
        Self {
            servers: args.server_pid.iter().map(|p| procfs::sample(*p)).collect(),
            metrics: scrape::gather(scrape::start_all(&args.metrics)).await,
        }
    }
}

/// After every subscriber is subscribed (`connect_secs` after `started`): waits for the statuses to
/// converge, reports the storm, then runs the mass reconnect when `--restart-cmd` is given.
pub(super) async fn run(
    args: &BenchArgs,
    tally: &Tally,
    watcher: &Watcher,
    connected: &[usize],
    started: Instant,
    before: Before,
) -> anyhow::Result<Value> {
    let users = truth(connected);
    let limit = Duration::from_secs_f64(args.status_timeout_secs);
    let (check, converged) = watcher.converge(&users, started, limit).await;
    statuses_quiet(tally, limit).await;
    let secs = started.elapsed().as_secs_f64();
    let after = scrape::gather(scrape::start_all(&args.metrics)).await;
    let mut storm = servers_json(
        &args.server_pid,
        &before.servers,
        secs,
        &before.metrics,
        &after,
        &args.metrics,
    );
    let fields = storm.as_object_mut().context("storm report")?;
    fields.extend(json_map(check.json(converged)));
    fields.insert("storm_secs".into(), json!(round3(secs)));
    take_status_counts(fields, tally, watcher);
    if !args.quiet || !check.ok {
        eprintln!(
            "Storm S={}: statuses {} after {}s ({} missing, {} extra{}); {} status events / {} changes received; server cpu {} s, peak rss {} MiB",
            connected.len(),
            if check.ok { "converged" } else { "DID NOT converge" },
            converged.map_or("-".to_owned(), |s| format!("{s:.2}")),
            check.missing,
            check.extra,
            if check.examples.is_empty() { String::new() } else { format!(": {}", check.examples.join(",")) },
            fields["status_events_received"],
            fields["status_changes_received"],
            fields["server_cpu_secs"],
            fields["server_rss_peak_mib"],
        );
    }
    if let Some(cmd) = &args.restart_cmd {
        let reconnect = reconnect(args, tally, watcher, &users, connected.len(), cmd).await?;
        fields.insert("reconnect".into(), reconnect);
    }
    Ok(storm)
}

/// Moves the status counts since the last report (users' events and changes, the watcher's diffs) into
/// `fields`, starting the next phase's counts at zero.
fn take_status_counts(
    fields: &mut serde_json::Map<String, Value>,
    tally: &Tally,
    watcher: &Watcher,
) {
    fields.insert(
        "status_events_received".into(),
        json!(tally.status_events.swap(0, Relaxed)),
    );
    fields.insert(
        "status_changes_received".into(),
        json!(tally.status_changes.swap(0, Relaxed)),
    );
    fields.insert(
        "watcher_diffs".into(),
        json!(watcher.diffs.swap(0, Relaxed)),
    );
}

fn json_map(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// The mass reconnect: runs `cmd` (which restarts the servers and prints their new PIDs, comma-separated,
/// in `--addr` order), then waits until every stream that ended is open again and the statuses converged.
async fn reconnect(
    args: &BenchArgs,
    tally: &Tally,
    watcher: &Watcher,
    users: &HashSet<String>,
    connections: usize,
    cmd: &str,
) -> anyhow::Result<Value> {
    let disconnects0 = tally.disconnects.load(Relaxed);
    let resubscribed0 = tally.resubscribed.load(Relaxed);
    if !args.quiet {
        eprintln!("  restarting the servers: {cmd}");
    }
    let started = Instant::now();
    let out = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("cannot run --restart-cmd {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "--restart-cmd {cmd:?} failed: {}",
        out.status
    );
    let restart_cmd_secs = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = text
        .split([',', ' ', '\n'])
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let start: Vec<Sample> = pids.iter().map(|p| procfs::sample(*p)).collect();
    // Every stream ends (it was on a restarted server) and opens again.
    let limit = Duration::from_secs_f64(args.connect_timeout_secs);
    let deadline = Instant::now() + limit;
    let mut tick = Instant::now();
    let (mut ended, mut back);
    loop {
        ended = tally.disconnects.load(Relaxed) - disconnects0;
        back = tally.resubscribed.load(Relaxed) - resubscribed0;
        if (ended as usize >= connections && back >= ended) || Instant::now() >= deadline {
            break;
        }
        if !args.quiet && tick.elapsed() >= Duration::from_secs(1) {
            tick = Instant::now();
            eprintln!(
                "  reconnecting: {back}/{ended} streams back ({:.1}s)",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reconnect_secs = started.elapsed().as_secs_f64();
    let all_back = ended as usize >= connections && back >= ended;
    let status_limit = Duration::from_secs_f64(args.status_timeout_secs);
    let (check, converged) = watcher.converge(users, started, status_limit).await;
    statuses_quiet(tally, status_limit).await;
    let secs = started.elapsed().as_secs_f64();
    // Fresh servers: their counters start at zero, so "before" is nothing.
    let after = scrape::gather(scrape::start_all(&args.metrics)).await;
    let mut report = servers_json(&pids, &start, secs, &[], &after, &args.metrics);
    let fields = report.as_object_mut().context("reconnect report")?;
    fields.extend(json_map(check.json(converged)));
    fields.insert("restart_cmd_secs".into(), json!(round3(restart_cmd_secs)));
    fields.insert("all_back".into(), json!(all_back));
    fields.insert("reconnect_secs".into(), json!(round3(reconnect_secs)));
    // From the moment the command returned (the new servers started): the reconnect proper.
    fields.insert(
        "reconnect_after_restart_secs".into(),
        json!(round3(reconnect_secs - restart_cmd_secs)),
    );
    fields.insert("streams_ended".into(), json!(ended));
    fields.insert("streams_back".into(), json!(back));
    fields.insert("new_server_pids".into(), json!(pids));
    take_status_counts(fields, tally, watcher);
    eprintln!(
        "Reconnect: {back}/{ended} streams back in {reconnect_secs:.2}s{}; statuses {} ({} missing, {} extra); server cpu {} s",
        if all_back { "" } else { " (NOT all)" },
        if check.ok { "converged" } else { "DID NOT converge" },
        check.missing,
        check.extra,
        fields["server_cpu_secs"],
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_apply_in_order_and_the_truth_includes_the_watcher() {
        let mut online = HashSet::new();
        let diff = crate::statuses::diff_event("t1", &[("u1".into(), true), ("u2".into(), true)]);
        apply(&mut online, changes(diff.payload));
        let diff = crate::statuses::diff_event("t1", &[("u1".into(), false)]);
        apply(&mut online, changes(diff.payload));
        assert_eq!(online, HashSet::from(["u2".to_owned()]));
        let t = truth(&[0, 2]);
        assert!(t.contains("u0") && t.contains("u2") && t.contains(WATCHER_SUB));
        assert_eq!(t.len(), 3);
    }
}
