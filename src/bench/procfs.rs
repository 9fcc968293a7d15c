//! CPU time and memory of a process (the server under test, and the bench itself) from `/proc`, and the
//! whole machine's busy time, to tell a noisy run from a real result.

use std::sync::OnceLock;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` (`getconf CLK_TCK`; 100 on every usual Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of every thread of `pid` (fields 14 and 15 of `/proc/PID/stat`).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / clock_ticks())
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One look at a process.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Sample {
    pub(super) cpu_secs: Option<f64>,
    pub(super) rss_kib: Option<u64>,
}

pub(super) fn sample(pid: u32) -> Sample {
    Sample {
        cpu_secs: cpu_secs(pid),
        rss_kib: status_kib(pid, "VmRSS"),
    }
}

/// True when `/proc/PID` exists.
pub(super) fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A process over a window.
#[derive(Clone, Debug, Serialize)]
pub(super) struct ProcessReport {
    pub(super) pid: u32,
    /// Resident memory at the end of the window, MiB.
    pub(super) rss_mib: Option<f64>,
    /// Peak resident memory of the process's life, MiB.
    pub(super) rss_peak_mib: Option<f64>,
    /// CPU seconds (user + system, all threads) spent in the window.
    pub(super) cpu_secs: Option<f64>,
    /// `cpu_secs` / window seconds: 1.0 is one core busy.
    pub(super) cpu_cores: Option<f64>,
}

pub(super) fn report(pid: u32, start: Sample, end: Sample, window_secs: f64) -> ProcessReport {
    let cpu = start.cpu_secs.zip(end.cpu_secs).map(|(a, b)| b - a);
    ProcessReport {
        pid,
        rss_mib: end.rss_kib.map(|k| round3(k as f64 / 1024.0)),
        rss_peak_mib: status_kib(pid, "VmHWM").map(|k| round3(k as f64 / 1024.0)),
        cpu_secs: cpu.map(round3),
        cpu_cores: cpu.map(|c| round3(c / window_secs.max(1e-9))),
    }
}

/// Busy seconds of the whole machine (all CPUs: user, nice, system, irq, softirq) from `/proc/stat`.
pub(super) fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let field = |i: usize| v.get(i).copied().unwrap_or(0.0);
    (field(0) + field(1) + field(2) + field(5) + field(6)) / clock_ticks()
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = sample(std::process::id());
        assert!(me.cpu_secs.is_some_and(|c| c >= 0.0));
        assert!(me.rss_kib.is_some_and(|k| k > 0));
        assert!(exists(std::process::id()));
        assert!(machine_busy_secs() > 0.0);
    }
}
