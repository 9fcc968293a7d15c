//! `lamplight bench` in a tiny configuration: the real binary against a real server started here. Checks
//! that the run completes, that its JSON line parses and that every expected delivery is accounted for.
//! No speed is asserted: the figures belong in BENCHMARKS.md.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Runs `lamplight bench ARGS` (against `server`, signing with the test secret) and returns its exit
/// status, standard output and standard error.
async fn bench(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lamplight"))
        .arg("bench")
        .args(["--addr", &server.url(), "--jwt-secret", SECRET])
        .args(args)
        .env_remove("LAMPLIGHT_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the lamplight binary");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("lamplight bench did not finish within 60 s")
        .expect("wait for lamplight bench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_line(stdout: &str, stderr: &str) -> Value {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "one JSON line expected\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    serde_json::from_str(lines[0]).expect("the line is JSON")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_run_accounts_for_every_delivery() {
    let metrics = free_addr();
    let server = TestServer::start_with(|c| c.metrics_listen = Some(metrics)).await;
    let pid = std::process::id().to_string();
    let metrics_url = format!("http://{metrics}");
    let (ok, stdout, stderr) = bench(
        &server,
        &[
            "--subs",
            "20",
            "--rooms",
            "2",
            "--rate",
            "200",
            "--duration-secs",
            "2",
            "--warmup-secs",
            "0.5",
            "--server-pid",
            &pid,
            "--metrics",
            &metrics_url,
            "--label",
            "smoke",
        ],
    )
    .await;
    assert!(ok, "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let line = json_line(&stdout, &stderr);

    assert_eq!(line["workload"], "fanout");
    assert_eq!(line["label"], "smoke");
    assert_eq!(u(&line, "connections"), 20);
    let events = u(&line, "events");
    assert!(events > 0, "nothing was published in the window: {line}");
    // 20 subscribers over 2 rooms: every event is expected by the 10 members of its room.
    assert_eq!(u(&line, "expected"), events * 10);
    assert_eq!(u(&line, "delivered"), u(&line, "expected"), "{line}");
    assert_eq!(u(&line, "lost"), 0);
    assert_eq!(u(&line, "duplicated"), 0);
    assert_eq!(u(&line, "publish_errors"), 0);
    assert_eq!(
        line["latency_ms"]["count"].as_u64(),
        Some(u(&line, "delivered"))
    );
    assert!(line["latency_ms"]["p99"].as_f64().is_some_and(|p| p > 0.0));
    // The server's own view: /proc for --server-pid, and its Prometheus counters.
    let server_proc = &line["servers"][0];
    assert_eq!(
        server_proc["pid"].as_u64(),
        Some(u64::from(std::process::id()))
    );
    assert!(server_proc["rss_mib"].as_f64().is_some_and(|r| r > 0.0));
    assert!(server_proc["cpu_secs"].as_f64().is_some());
    let counts = &line["server_metrics"][0];
    // The Prometheus recorder is per process: the other tests of this file count in it too.
    assert!(
        counts["streams_open"].as_f64().is_some_and(|n| n >= 20.0),
        "{counts}"
    );
    assert!(
        counts["delivered"].as_f64().is_some_and(|d| d > 0.0),
        "{counts}"
    );
    assert!(
        stderr.contains("delivered"),
        "human summary on stderr:\n{stderr}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_reports_the_search_and_idle_reports_memory() {
    let server = TestServer::start().await;
    let (ok, stdout, stderr) = bench(
        &server,
        &[
            "--subs",
            "10",
            "--rooms",
            "2",
            "--find-max",
            "--start-rate",
            "50",
            "--factor",
            "2",
            "--max-rate",
            "100",
            "--duration-secs",
            "1",
            "--warmup-secs",
            "0.2",
            "--quiet",
            // Latency is not what this checks (a busy CI machine must not fail it): only loss does.
            "--max-p99-ms",
            "60000",
            "--noise-retries",
            "0",
        ],
    )
    .await;
    assert!(
        ok,
        "bench --find-max failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = json_line(&stdout, &stderr);
    let steps = line["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "50/s then 100/s (the maximum): {line}");
    for step in steps {
        assert_eq!(step["lost"], 0, "{step}");
        assert_eq!(step["delivered"], step["expected"], "{step}");
    }
    assert_eq!(line["max_sustained_events_per_sec"].as_f64(), Some(100.0));
    assert!(line["max_sustained_deliveries_per_sec"]
        .as_f64()
        .is_some_and(|d| d > 0.0));

    let pid = std::process::id().to_string();
    let (ok, stdout, stderr) = bench(
        &server,
        &[
            "--workload",
            "idle",
            "--subs",
            "10",
            "--settle-secs",
            "0.2",
            "--duration-secs",
            "0.5",
            "--server-pid",
            &pid,
            "--quiet",
        ],
    )
    .await;
    assert!(
        ok,
        "bench --workload idle failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = json_line(&stdout, &stderr);
    assert_eq!(line["workload"], "idle");
    assert_eq!(u(&line, "connections"), 10);
    assert_eq!(u(&line, "rooms_per_subscriber"), 4);
    assert!(
        line["servers"][0]["rss_per_connection_kib"].is_number(),
        "{line}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn impossible_flags_fail_before_connecting() {
    let server = TestServer::start().await;
    let (ok, stdout, stderr) = bench(&server, &["--workload", "two-node", "--quiet"]).await;
    assert!(!ok, "two-node with one --addr must fail");
    assert!(stdout.is_empty(), "no JSON line on failure: {stdout}");
    assert!(stderr.contains("two --addr"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reports_the_storm_and_the_watchers_online_set_is_the_truth() {
    // No --metrics here: the Prometheus recorder is installed once per process, and the fan-out test
    // owns it; the restart test below reads a real server process's metrics.
    let server = TestServer::start().await;
    let pid = std::process::id().to_string();
    let (ok, stdout, stderr) = bench(
        &server,
        &[
            "--workload",
            "storm",
            "--subs",
            "50",
            "--status-timeout-secs",
            "20",
            "--server-pid",
            &pid,
            "--quiet",
        ],
    )
    .await;
    assert!(
        ok,
        "bench --workload storm failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = json_line(&stdout, &stderr);
    assert_eq!(line["workload"], "storm");
    assert_eq!(u(&line, "connections"), 50);
    assert_eq!(u(&line, "connect_failures"), 0);
    assert!(line["connect_secs"].as_f64().is_some_and(|s| s > 0.0));
    assert_eq!(line["online_set_ok"], true, "{line}");
    assert_eq!(u(&line, "online_missing"), 0);
    assert_eq!(u(&line, "online_extra"), 0);
    assert!(line["statuses_converged_secs"].as_f64().is_some(), "{line}");
    // The users announced themselves: status diffs reached the watcher and the members.
    assert!(u(&line, "watcher_diffs") > 0, "{line}");
    assert!(u(&line, "status_changes_received") > 0, "{line}");
    assert!(line["server_cpu_secs"].as_f64().is_some(), "{line}");
    assert!(
        line["server_rss_peak_mib"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{line}"
    );
    assert!(line.get("reconnect").is_none(), "no --restart-cmd: {line}");
    server.stop().await.unwrap();
}

/// The mass reconnect: a real `lamplight` process (with its metrics endpoint), restarted by the bench's
/// `--restart-cmd` under 30 open streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_restart_reconnects_every_stream_and_statuses_converge() {
    let addr = free_addr();
    let metrics = free_addr();
    let dir = std::env::temp_dir().join(format!(
        "lamplight-storm-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("pid");
    let exe = env!("CARGO_BIN_EXE_lamplight");
    // Starts the server in the background (its output to a file, so the command's stdout closes), prints
    // its pid.
    let start = format!(
        "env -u REDIS_URL '{exe}' --listen {addr} --metrics-listen {metrics} --jwt-secret {SECRET} >>'{log}' 2>&1 </dev/null & echo $! > '{pid}'; cat '{pid}'",
        log = dir.join("server.log").display(),
        pid = pidfile.display(),
    );
    let restart = format!(
        "old=$(cat '{pid}'); kill $old; while kill -0 $old 2>/dev/null; do sleep 0.05; done; {start}",
        pid = pidfile.display(),
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &start])
        .output()
        .unwrap();
    assert!(out.status.success());
    let url = format!("http://{addr}");
    // Up when it answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let first_pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
    let child = tokio::process::Command::new(exe)
        .arg("bench")
        .args(["--addr", &url, "--jwt-secret", SECRET])
        .args(["--server-pid", first_pid.trim()])
        .args(["--metrics", &format!("http://{metrics}")])
        .args(["--workload", "storm", "--subs", "30", "--quiet"])
        .args([
            "--status-timeout-secs",
            "20",
            "--connect-timeout-secs",
            "30",
        ])
        .args(["--restart-cmd", &restart])
        .env_remove("LAMPLIGHT_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the lamplight binary");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("lamplight bench did not finish within 120 s")
        .expect("wait for lamplight bench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let server_pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
    let _ = std::process::Command::new("kill")
        .arg(server_pid.trim())
        .status();
    assert!(
        out.status.success(),
        "bench storm --restart-cmd failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = json_line(&stdout, &stderr);
    assert_eq!(line["online_set_ok"], true, "{line}");
    // The server's own count of what it announced: 30 users and the watcher came online.
    let counts = &line["server_metrics"][0];
    assert_eq!(counts["status_changes"].as_f64(), Some(31.0), "{line}");
    assert!(
        counts["status_events"].as_f64().is_some_and(|n| n >= 1.0),
        "{line}"
    );
    assert!(line["server_rss_peak_mib"]
        .as_f64()
        .is_some_and(|r| r > 0.0));
    let reconnect = &line["reconnect"];
    assert_eq!(reconnect["all_back"], true, "{line}");
    assert!(u(reconnect, "streams_ended") >= 30, "{line}");
    assert!(u(reconnect, "streams_back") >= u(reconnect, "streams_ended"));
    assert_eq!(reconnect["online_set_ok"], true, "{line}");
    assert!(u(reconnect, "watcher_subscriptions") >= 2, "{line}");
    assert_eq!(
        reconnect["new_server_pids"][0].as_u64(),
        server_pid.trim().parse::<u64>().ok(),
        "{line}"
    );
    assert!(reconnect["server_cpu_secs"].as_f64().is_some(), "{line}");
    // The fresh server announced everyone again (its counters start at zero).
    assert!(
        reconnect["server_metrics"][0]["status_changes"]
            .as_f64()
            .is_some_and(|n| n >= 31.0),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
