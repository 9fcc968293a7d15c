//! Reads a server's Prometheus endpoint (`--metrics-listen`), so the report can put the server's own
//! counts (events written to streams, events dropped, slow consumers) next to what the clients saw.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::metrics::{
    EVENTS_DELIVERED, EVENTS_DROPPED, EVENTS_PUBLISHED, SLOW_CONSUMER_DISCONNECTS, STREAMS_OPEN,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Metric name -> value, summed over label sets.
pub(super) type Metrics = HashMap<String, f64>;

/// Starts scraping every endpoint in the background (so a paced publisher keeps its pace); see [`gather`].
pub(super) fn start_all(urls: &[String]) -> Vec<JoinHandle<anyhow::Result<Metrics>>> {
    urls.iter()
        .map(|url| {
            let url = url.clone();
            tokio::spawn(async move { scrape(&url).await })
        })
        .collect()
}

/// The results of [`start_all`], in order; an endpoint that failed is reported on standard error and is
/// `None`.
pub(super) async fn gather(
    handles: Vec<JoinHandle<anyhow::Result<Metrics>>>,
) -> Vec<Option<Metrics>> {
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(match handle.await {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => {
                eprintln!("bench: {e:#}");
                None
            }
            Err(_) => None,
        });
    }
    out
}

/// `GET` the metrics at `url` (`http://host:port[/path]` or `host:port`).
pub(super) async fn scrape(url: &str) -> anyhow::Result<Metrics> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let body = tokio::time::timeout(TIMEOUT, get(authority, path))
        .await
        .with_context(|| format!("metrics endpoint {url} did not answer within {TIMEOUT:?}"))?
        .with_context(|| format!("cannot read metrics from {url}"))?;
    Ok(parse(&body))
}

async fn get(authority: &str, path: &str) -> anyhow::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(authority).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        anyhow::bail!("HTTP status {status:?}");
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok(if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    })
}

/// Decodes a chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Prometheus text format: `name{labels} value`; comments skipped, values summed per name.
fn parse(text: &str) -> Metrics {
    let mut metrics = Metrics::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if let Ok(value) = value.trim().parse::<f64>() {
            *metrics.entry(name.to_owned()).or_default() += value;
        }
    }
    metrics
}

/// The server's view of a window, from two scrapes.
#[derive(Clone, Debug, Serialize)]
pub(super) struct ServerCounts {
    pub(super) url: String,
    /// `lamplight_events_published_total` during the window.
    pub(super) published: f64,
    /// `lamplight_events_delivered_total` during the window (events written to streams).
    pub(super) delivered: f64,
    /// The same per second.
    pub(super) delivered_per_sec: f64,
    /// `lamplight_events_dropped_total` during the window.
    pub(super) dropped: f64,
    /// `lamplight_slow_consumer_disconnects_total` during the window.
    pub(super) slow_consumer_disconnects: f64,
    /// `lamplight_streams_open` at the end.
    pub(super) streams_open: f64,
}

pub(super) fn counts(url: &str, before: &Metrics, after: &Metrics, secs: f64) -> ServerCounts {
    let delta = |name: &str| {
        after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
    };
    ServerCounts {
        url: url.to_owned(),
        published: delta(EVENTS_PUBLISHED),
        delivered: delta(EVENTS_DELIVERED),
        delivered_per_sec: super::procfs::round3(delta(EVENTS_DELIVERED) / secs.max(1e-9)),
        dropped: delta(EVENTS_DROPPED),
        slow_consumer_disconnects: delta(SLOW_CONSUMER_DISCONNECTS),
        streams_open: after.get(STREAMS_OPEN).copied().unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_label_sets_and_skips_comments() {
        let m = parse(
            "# HELP x y\n# TYPE lamplight_events_dropped_total counter\n\
             lamplight_events_dropped_total{reason=\"slow_consumer\"} 2\n\
             lamplight_events_dropped_total{reason=\"stream_closed\"} 3\n\
             lamplight_streams_open 7\n",
        );
        assert_eq!(m["lamplight_events_dropped_total"], 5.0);
        assert_eq!(m["lamplight_streams_open"], 7.0);
    }

    #[test]
    fn decodes_chunked_bodies() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
