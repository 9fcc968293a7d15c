//! Steps at a fixed publish rate (warm-up, measured window, drain) and the `--find-max` search over them.
//!
//! In a step the publisher sends E events/s round-robin over the rooms, paced by a 1 ms tick. Events sent
//! inside the window are *expected* once per subscriber of their room; after the window the bench waits
//! until all of them arrived, until nothing arrived for 2 s, or for `--drain-secs`, and then counts.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::procfs::{self, round3, Sample};
use super::publisher::Publisher;
use super::report::{summary, Latency, StepResult};
use super::scrape::{self, Metrics};
use super::tally::{lock, Seen, Tally};
use super::BenchArgs;

/// Longest wait for a step's late deliveries to stop before the next step.
const COOLDOWN_MAX: Duration = Duration::from_secs(30);
/// The stream is quiet once nothing arrived for this long.
const QUIET: Duration = Duration::from_secs(1);

/// What is sampled at both ends of a window.
struct Samples {
    at: Instant,
    servers: Vec<Sample>,
    bench: Sample,
    machine_busy_secs: f64,
    metrics: Vec<JoinHandle<anyhow::Result<Metrics>>>,
}

impl Samples {
    fn take(args: &BenchArgs) -> Self {
        Self {
            at: Instant::now(),
            servers: args.server_pid.iter().map(|p| procfs::sample(*p)).collect(),
            bench: procfs::sample(std::process::id()),
            machine_busy_secs: procfs::machine_busy_secs(),
            metrics: scrape::start_all(&args.metrics),
        }
    }
}

/// A fan-out run: the connected subscribers, their rooms, and the publisher.
pub(super) struct FanoutRun<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) tally: Arc<Tally>,
    pub(super) publisher: Publisher,
    /// (room, what the subscriber saw) of every connected subscriber.
    pub(super) seen: Vec<(usize, Arc<Mutex<Seen>>)>,
    /// Connected subscribers per room.
    pub(super) members: Vec<u64>,
    /// Round-robin position over the rooms.
    pub(super) next_room: usize,
}

impl FanoutRun<'_> {
    /// One step at `rate` events/s.
    pub(super) async fn step(&mut self, rate: f64) -> anyhow::Result<StepResult> {
        let args = self.args;
        let tally = self.tally.clone();
        let rooms = self.members.len();
        tally.close_window();
        for (k, seen) in &self.seen {
            lock(seen).reset(self.publisher.next_seq(*k));
        }
        let disconnects0 = tally.disconnects.load(Relaxed);
        let resets0 = tally.resets.load(Relaxed);
        let foreign0 = tally.foreign.load(Relaxed);
        let errors0 = tally.publish_errors.load(Relaxed);
        *lock(&tally.first_publish_error) = None;

        let warmup = Duration::from_secs_f64(args.warmup_secs);
        let window = Duration::from_secs_f64(args.duration_secs);
        let t0 = Instant::now();
        let window_start = tally.now_ns() + warmup.as_nanos() as u64;
        let window_end = window_start + window.as_nanos() as u64;
        tally.open_window(window_start, window_end);

        let mut sent_in_window = vec![0u64; rooms];
        let mut sent = 0u64;
        let mut max_in_flight = 0;
        let mut start: Option<Samples> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut progress = Progress::new(&tally, args.quiet);
        'pace: loop {
            tick.tick().await;
            let elapsed = t0.elapsed();
            if start.is_none() && elapsed >= warmup {
                start = Some(Samples::take(args));
            }
            if elapsed >= warmup + window {
                break;
            }
            let due = (elapsed.as_secs_f64() * rate) as u64;
            while sent < due {
                let k = self.next_room % rooms;
                self.next_room += 1;
                let sent_ns = self.publisher.send(k).await?;
                sent += 1;
                if tally.in_window(sent_ns) {
                    sent_in_window[k] += 1;
                }
                if t0.elapsed() >= warmup + window {
                    break 'pace;
                }
            }
            max_in_flight = max_in_flight.max(self.publisher.in_flight());
            let phase = if elapsed < warmup {
                "warm-up"
            } else {
                "window"
            };
            progress.maybe(phase, elapsed, sent, self.publisher.in_flight());
        }
        let end = Samples::take(args);
        let start = start.unwrap_or_else(|| Samples::take(args));

        let expected: u64 = (0..rooms)
            .map(|k| sent_in_window[k].saturating_sub(tally.failed_in(k)) * self.members[k])
            .sum();
        let drain_started = Instant::now();
        drain(&tally, expected, args.drain_secs).await;
        let drain_secs = drain_started.elapsed().as_secs_f64();
        // Late deliveries of window events counted until here; nothing after.
        tally.close_window();

        let (mut delivered, mut lost, mut duplicated) = (0u64, 0u64, 0u64);
        for (k, seen) in &self.seen {
            let count = lock(seen).count();
            let expected_here = sent_in_window[*k].saturating_sub(tally.failed_in(*k));
            delivered += count.distinct;
            lost += expected_here.saturating_sub(count.distinct);
            duplicated += count.duplicates;
        }
        let events: u64 = sent_in_window.iter().sum();
        let window_secs = args.duration_secs;
        let measured_secs = end.at.duration_since(start.at).as_secs_f64();
        let servers: Vec<_> = args
            .server_pid
            .iter()
            .enumerate()
            .map(|(i, pid)| procfs::report(*pid, start.servers[i], end.servers[i], measured_secs))
            .collect();
        let server_cpu: Option<f64> = if servers.is_empty() {
            None
        } else {
            servers.iter().map(|s| s.cpu_secs).sum()
        };
        let bench = procfs::report(std::process::id(), start.bench, end.bench, measured_secs);
        let busy = (end.machine_busy_secs - start.machine_busy_secs) / measured_secs.max(1e-9);
        let known: f64 = servers
            .iter()
            .chain([&bench])
            .filter_map(|p| p.cpu_cores)
            .sum();
        let before = scrape::gather(start.metrics).await;
        let after = scrape::gather(end.metrics).await;
        let server_metrics = args
            .metrics
            .iter()
            .zip(before.iter().zip(&after))
            .filter_map(|(url, (b, a))| {
                Some(scrape::counts(url, b.as_ref()?, a.as_ref()?, measured_secs))
            })
            .collect();
        let latency = Latency::from_micros(&tally.latency(None));
        let ratio = if expected > 0 {
            delivered as f64 / expected as f64
        } else {
            0.0
        };
        let mut result = StepResult {
            offered_events_per_sec: round3(rate),
            sent_events_per_sec: round3(events as f64 / window_secs),
            window_secs,
            events,
            expected,
            delivered,
            delivered_per_sec: round3(delivered as f64 / window_secs),
            lost,
            duplicated,
            delivery_ratio: (ratio * 1e6).round() / 1e6,
            latency_ms: latency,
            latency_ms_by_server: if args.addr.len() > 1 {
                (0..args.addr.len())
                    .map(|i| Latency::from_micros(&tally.latency(Some(i))))
                    .collect()
            } else {
                Vec::new()
            },
            publish_ack_ms: Latency::from_micros(&tally.ack_latency()),
            publish_errors: tally.publish_errors.load(Relaxed) - errors0,
            first_publish_error: lock(&tally.first_publish_error).clone(),
            max_in_flight,
            disconnects: tally.disconnects.load(Relaxed) - disconnects0,
            resets: tally.resets.load(Relaxed) - resets0,
            foreign: tally.foreign.load(Relaxed) - foreign0,
            drain_secs: round3(drain_secs),
            server_cpu_us_per_delivery: server_cpu
                .filter(|_| delivered > 0)
                .map(|cpu| round3(cpu * 1e6 / delivered as f64)),
            servers,
            server_metrics,
            bench: Some(bench),
            machine_busy_cores: round3(busy),
            other_cores: round3((busy - known).max(0.0)),
            pass: false,
            fail_reason: String::new(),
        };
        judge(args, &mut result);
        cooldown(&tally).await;
        Ok(result)
    }

    /// A step, run again (up to `--noise-retries` times) when it failed while other processes were busy.
    async fn checked_step(
        &mut self,
        rate: f64,
        steps: &mut Vec<StepResult>,
    ) -> anyhow::Result<StepResult> {
        let mut tries = 0;
        loop {
            let result = self.step(rate).await?;
            eprintln!("{}", summary(&format!("step {}", steps.len() + 1), &result));
            steps.push(result.clone());
            if result.pass
                || result.other_cores <= self.args.noise_cores
                || tries >= self.args.noise_retries
            {
                return Ok(result);
            }
            tries += 1;
            eprintln!(
                "  other processes used {:.2} cores during that window: running the step again",
                result.other_cores
            );
        }
    }

    /// Raises the rate by `--factor` until a step fails, then bisects `--refine` times between the last
    /// pass and the first failure. Returns the best passing step (if any), the first failing rate and
    /// every step.
    pub(super) async fn find_max(&mut self) -> anyhow::Result<Search> {
        let args = self.args;
        let mut steps = Vec::new();
        let mut best: Option<StepResult> = None;
        let mut first_fail: Option<f64> = None;
        let mut rate = args.start_rate;
        loop {
            let st = self.checked_step(rate, &mut steps).await?;
            if st.pass {
                best = Some(st);
                if rate >= args.max_rate {
                    break;
                }
                rate = (rate * args.factor).min(args.max_rate);
            } else {
                first_fail = Some(first_fail.map_or(rate, |f: f64| f.min(rate)));
                if best.is_some() || rate < 1.0 || steps.len() >= 8 {
                    break;
                }
                rate /= args.factor * args.factor; // the first step failed: start lower
            }
        }
        for _ in 0..args.refine {
            let (Some(b), Some(f)) = (&best, first_fail) else {
                break;
            };
            if (f - b.offered_events_per_sec) / b.offered_events_per_sec < 0.05 {
                break;
            }
            let mid = (b.offered_events_per_sec + f) / 2.0;
            let st = self.checked_step(mid, &mut steps).await?;
            if st.pass {
                best = Some(st);
            } else {
                first_fail = Some(mid);
            }
        }
        Ok(Search {
            best,
            first_fail,
            steps,
        })
    }
}

/// The outcome of `--find-max`.
pub(super) struct Search {
    pub(super) best: Option<StepResult>,
    pub(super) first_fail: Option<f64>,
    pub(super) steps: Vec<StepResult>,
}

/// The `--find-max` criteria.
fn judge(args: &BenchArgs, st: &mut StepResult) {
    let mut reasons = Vec::new();
    if st.delivery_ratio < args.min_delivery {
        reasons.push(format!(
            "delivered/expected {:.4} < {}",
            st.delivery_ratio, args.min_delivery
        ));
    }
    if st.latency_ms.p99 > args.max_p99_ms {
        reasons.push(format!(
            "p99 {:.1} ms > {} ms",
            st.latency_ms.p99, args.max_p99_ms
        ));
    }
    if st.sent_events_per_sec < args.min_sent_ratio * st.offered_events_per_sec {
        reasons.push(format!(
            "the publisher sent {:.1}/s of {:.1}/s",
            st.sent_events_per_sec, st.offered_events_per_sec
        ));
    }
    if st.disconnects > 0 {
        reasons.push(format!("{} streams ended", st.disconnects));
    }
    if st.publish_errors > 0 {
        reasons.push(format!("{} publishes failed", st.publish_errors));
    }
    st.pass = reasons.is_empty();
    st.fail_reason = reasons.join("; ");
}

/// Waits until every expected delivery arrived, nothing arrived for 2 s, or `limit_secs`.
async fn drain(tally: &Tally, expected: u64, limit_secs: f64) {
    let started = Instant::now();
    let limit = Duration::from_secs_f64(limit_secs);
    let stall = limit.min(Duration::from_secs(2));
    let mut last = tally.received_in_window.load(Relaxed);
    let mut last_change = Instant::now();
    loop {
        let now = tally.received_in_window.load(Relaxed);
        if now >= expected || started.elapsed() >= limit {
            return;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until late deliveries of the last step stopped, so they do not load the next one.
async fn cooldown(tally: &Tally) {
    let started = Instant::now();
    let mut last = tally.received.load(Relaxed);
    let mut still_since = Instant::now();
    while started.elapsed() < COOLDOWN_MAX {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tally.received.load(Relaxed);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= QUIET {
            return;
        }
    }
}

/// A progress line on standard error about once a second.
pub(super) struct Progress<'a> {
    tally: &'a Tally,
    quiet: bool,
    last_at: Instant,
    last_sent: u64,
    last_received: u64,
}

impl<'a> Progress<'a> {
    pub(super) fn new(tally: &'a Tally, quiet: bool) -> Self {
        Self {
            tally,
            quiet,
            last_at: Instant::now(),
            last_sent: 0,
            last_received: tally.received.load(Relaxed),
        }
    }

    fn maybe(&mut self, phase: &str, elapsed: Duration, sent: u64, in_flight: usize) {
        let since = self.last_at.elapsed();
        if self.quiet || since < Duration::from_secs(1) {
            return;
        }
        let received = self.tally.received.load(Relaxed);
        let secs = since.as_secs_f64();
        eprintln!(
            "  [{phase} {:>5.1}s] sent {:.0}/s, received {:.0}/s, in flight {in_flight}, streams ended {}",
            elapsed.as_secs_f64(),
            (sent - self.last_sent) as f64 / secs,
            (received - self.last_received) as f64 / secs,
            self.tally.disconnects.load(Relaxed),
        );
        self.last_at = Instant::now();
        self.last_sent = sent;
        self.last_received = received;
    }
}
