//! The results: one JSON line per run on standard output (and appended to `--json-out`), a human summary
//! and progress on standard error.

use std::io::Write;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::procfs::{round3, ProcessReport};
use super::scrape::ServerCounts;

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub(super) struct Latency {
    pub(super) count: u64,
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
    pub(super) max: f64,
    pub(super) mean: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub(super) fn from_micros(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: round3(h.mean() / 1000.0),
        }
    }
}

/// One measured step at a fixed publish rate.
#[derive(Clone, Debug, Default, Serialize)]
pub(super) struct StepResult {
    /// Events/s the publisher was asked for (all rooms together).
    pub(super) offered_events_per_sec: f64,
    /// Events/s it sent in the window.
    pub(super) sent_events_per_sec: f64,
    pub(super) window_secs: f64,
    /// Events sent in the window.
    pub(super) events: u64,
    /// Sum over those events of the subscribers of their room (failed publishes excluded).
    pub(super) expected: u64,
    /// Distinct deliveries of those events.
    pub(super) delivered: u64,
    pub(super) delivered_per_sec: f64,
    /// Expected deliveries that never arrived (by the end of the drain).
    pub(super) lost: u64,
    /// Deliveries of an event a subscriber had already received.
    pub(super) duplicated: u64,
    pub(super) delivery_ratio: f64,
    /// Publisher send -> subscriber receive, same process clock.
    pub(super) latency_ms: Latency,
    /// The same per server (`--addr` order); with two nodes, \[1\] crossed the bus.
    pub(super) latency_ms_by_server: Vec<Latency>,
    /// Publish call -> answer.
    pub(super) publish_ack_ms: Latency,
    pub(super) publish_errors: u64,
    pub(super) first_publish_error: Option<String>,
    pub(super) max_in_flight: usize,
    /// Streams that ended during the step (slow consumer, errors).
    pub(super) disconnects: u64,
    pub(super) resets: u64,
    /// Task events not from this run or in the wrong room.
    pub(super) foreign: u64,
    pub(super) drain_secs: f64,
    /// Servers given by `--server-pid`.
    pub(super) servers: Vec<ProcessReport>,
    /// Server CPU (all `--server-pid`s) per delivery, µs.
    pub(super) server_cpu_us_per_delivery: Option<f64>,
    /// From `--metrics`.
    pub(super) server_metrics: Vec<ServerCounts>,
    /// This process.
    pub(super) bench: Option<ProcessReport>,
    /// Busy cores of the whole machine, and those not used by the servers or the bench (noise).
    pub(super) machine_busy_cores: f64,
    pub(super) other_cores: f64,
    /// Whether the step met the `--find-max` criteria.
    pub(super) pass: bool,
    pub(super) fail_reason: String,
}

/// Appends `line` to standard output and to `json_out`.
pub(super) fn emit(line: &serde_json::Value, json_out: Option<&Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string(line)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    if let Some(path) = json_out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(file, "{text}")?;
    }
    Ok(())
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// A few human lines for a step.
pub(super) fn summary(tag: &str, st: &StepResult) -> String {
    let mut s = format!(
        "{tag}: E={:.0}/s (sent {:.0}/s) delivered {}/{} ({:.3}%) = {:.0}/s, lost {}, duplicated {}, disconnects {}\n  \
         latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; publish ack p99 {:.2} ms; errors {}",
        st.offered_events_per_sec,
        st.sent_events_per_sec,
        st.delivered,
        st.expected,
        st.delivery_ratio * 100.0,
        st.delivered_per_sec,
        st.lost,
        st.duplicated,
        st.disconnects,
        st.latency_ms.p50,
        st.latency_ms.p90,
        st.latency_ms.p99,
        st.latency_ms.max,
        st.publish_ack_ms.p99,
        st.publish_errors,
    );
    if st.latency_ms_by_server.len() > 1 {
        for (i, l) in st.latency_ms_by_server.iter().enumerate() {
            s.push_str(&format!(
                "\n  server {i}: p50 {:.2} p99 {:.2} ms",
                l.p50, l.p99
            ));
        }
    }
    for p in &st.servers {
        s.push_str(&format!(
            "\n  server pid {}: cpu {} cores, rss {} MiB",
            p.pid,
            opt(p.cpu_cores, 2),
            opt(p.rss_mib, 0)
        ));
    }
    if let Some(us) = st.server_cpu_us_per_delivery {
        s.push_str(&format!(" ({us:.2} µs CPU per delivery)"));
    }
    for m in &st.server_metrics {
        s.push_str(&format!(
            "\n  metrics {}: delivered {:.0}/s, dropped {}, slow consumers {}, streams open {}",
            m.url, m.delivered_per_sec, m.dropped, m.slow_consumer_disconnects, m.streams_open
        ));
    }
    if let Some(b) = &st.bench {
        s.push_str(&format!(
            "\n  bench cpu {} cores; machine busy {:.2} cores, other processes {:.2}",
            opt(b.cpu_cores, 2),
            st.machine_busy_cores,
            st.other_cores
        ));
    }
    if !st.pass {
        s.push_str(&format!("\n  FAIL: {}", st.fail_reason));
    }
    s
}
