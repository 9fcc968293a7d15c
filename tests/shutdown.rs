//! Graceful shutdown: in process (cancelling `serve`'s token) and as a real process receiving SIGTERM. Open
//! streams end with UNAVAILABLE naming where to resume; the server then stops on its own, well before its
//! grace period. The process test also checks that `lamplight token` mints tokens the server accepts.
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lamplight::proto::v1::event_service_client::EventServiceClient;
use support::*;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

const PROJECT: &str = "tenant:t1:project:p1";
const CHANNEL: &str = "tenant:t1:channel:c1";
const BIN: &str = env!("CARGO_BIN_EXE_lamplight");

/// Asserts that `status` is the shutdown end of a stream that had reached `since`.
fn assert_shutdown_status(status: &tonic::Status, since: &BTreeMap<String, String>) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("server shutting down"),
        "{status:?}"
    );
    for id in since.values() {
        assert!(
            status.message().contains(id.as_str()),
            "message names {id}: {status:?}"
        );
    }
    assert_eq!(&resume_since(status), since);
}

#[tokio::test]
async fn stop_ends_every_open_stream_with_unavailable_and_serve_returns_ok() {
    // A long grace period: `serve` must return because the streams closed, not because the grace ran out.
    let server = TestServer::start_with(|c| c.shutdown_grace_secs = 60).await;
    let mut svc = server.client(&publisher_token()).await;
    let mut u1 = server.client(&user_token("u1")).await;
    let mut u2 = server.client(&user_token("u2")).await;
    let (mut one, _) = subscribe(&mut u1, &[PROJECT], &[]).await.unwrap();
    let (mut two, subscribed) = subscribe(&mut u2, &[PROJECT, CHANNEL], &[]).await.unwrap();
    let channel_position = subscribed
        .rooms
        .iter()
        .find(|r| r.room == CHANNEL)
        .unwrap()
        .last_event_id
        .clone();

    let id = publish_event(&mut svc, task_event(PROJECT, "before shutdown")).await;
    assert_eq!(next_event(&mut one).await.id, id);
    assert_eq!(next_event(&mut two).await.id, id);

    let stopping = tokio::spawn(tokio::time::timeout(Duration::from_secs(10), server.stop()));

    let (events, status) = drain_until_status(&mut one).await;
    assert!(events.is_empty(), "{events:?}");
    assert_shutdown_status(&status, &[(PROJECT.to_owned(), id.clone())].into());
    let (events, status) = drain_until_status(&mut two).await;
    assert!(events.is_empty(), "{events:?}");
    assert_shutdown_status(
        &status,
        &[
            (PROJECT.to_owned(), id.clone()),
            (CHANNEL.to_owned(), channel_position),
        ]
        .into(),
    );

    stopping
        .await
        .expect("stop panicked")
        .expect("serve did not return within 10 s of the shutdown (grace is 60 s)")
        .expect("serve returned an error");
}

/// The `lamplight` binary running as a child process. Killed (SIGKILL) on drop unless it has exited.
struct Process {
    pid: u32,
    addr: SocketAddr,
    exit: Option<oneshot::Receiver<std::io::Result<ExitStatus>>>,
    exited: Arc<AtomicBool>,
    logs: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `lamplight --listen 127.0.0.1:<free port>` with `LAMPLIGHT_JWT_SECRET` = [`SECRET`].
    fn start() -> Self {
        // Bind port 0 to learn a free port, then release it for the child.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut child = Command::new(BIN)
            .args(["--listen", &addr.to_string()])
            .env_clear()
            .env("LAMPLIGHT_JWT_SECRET", SECRET)
            // Exiting within 5 s below must come from the streams closing, not from the grace period.
            .env("LAMPLIGHT_SHUTDOWN_GRACE_SECS", "30")
            // The binary builds its own runtime: one worker thread must serve streams and shutdown alike.
            .env("LAMPLIGHT_WORKER_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let pid = child.id();
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let exited = Arc::new(AtomicBool::new(false));
        let (tx, rx) = oneshot::channel();
        let flag = exited.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(status);
        });
        Self {
            pid,
            addr,
            exit: Some(rx),
            exited,
            logs,
        }
    }

    /// Threads of the process named as tokio names its runtime workers (the server spawns no blocking
    /// threads, so these are the workers).
    fn runtime_workers(&self) -> usize {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .expect("read /proc/<pid>/task (Linux)");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "tokio-rt-worker")
            .count()
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until the server accepts connections; fails early if it exits.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(status)) = self.exit.as_mut().map(|rx| rx.try_recv()) {
                panic!(
                    "lamplight exited before accepting connections: {status:?}\n{}",
                    self.logs()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lamplight did not accept connections on {} within 10 s\n{}",
                self.addr,
                self.logs()
            );
            // Nothing to await until the port is open: retry shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self, token: &str) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the lamplight process");
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        EventServiceClient::with_interceptor(
            channel,
            Box::new(move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            }),
        )
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status()
            .expect("run `kill` (procps) to signal the server");
        assert!(status.success(), "kill {signal} {} failed", self.pid);
    }

    /// The exit status, failing the test if the process is still running after `within`.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let rx = self.exit.take().expect("exit already awaited");
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(Ok(status))) => status,
            Ok(other) => panic!("cannot wait for lamplight: {other:?}"),
            Err(_) => panic!(
                "lamplight still running {within:?} after SIGTERM\n{}",
                self.logs()
            ),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.exited.load(Ordering::SeqCst) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
    }
}

/// Runs `lamplight token ...` with `secret` and returns the printed token.
fn cli_token(secret: &str, args: &[&str]) -> String {
    let output = Command::new(BIN)
        .arg("token")
        .args(args)
        .env_clear()
        .env("LAMPLIGHT_JWT_SECRET", secret)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN} token: {e}"));
    assert!(
        output.status.success(),
        "lamplight token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).expect("UTF-8 token");
    let token = token.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    token
}

#[tokio::test]
async fn sigterm_ends_streams_with_unavailable_and_the_process_exits_zero() {
    let mut process = Process::start();
    process.wait_ready().await;
    assert_eq!(
        process.runtime_workers(),
        1,
        "LAMPLIGHT_WORKER_THREADS=1 gives the runtime one worker thread"
    );

    // `lamplight token` with the server's secret mints a token the server accepts ...
    let token = cli_token(SECRET, &["--sub", "u1", "--tid", "t1", "--projects", "p1"]);
    let mut user = process.client(&token).await;
    let (mut stream, subscribed) = subscribe(&mut user, &[PROJECT], &[])
        .await
        .unwrap_or_else(|s| panic!("CLI token refused: {s:?}\n{}", process.logs()));
    assert_eq!(subscribed.rooms.len(), 1);
    // ... and one signed with another secret is refused.
    let forged = cli_token(
        "another-secret",
        &["--sub", "u1", "--tid", "t1", "--projects", "p1"],
    );
    let mut intruder = process.client(&forged).await;
    let err = subscribe(&mut intruder, &[PROJECT], &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut svc = process.client(&publisher_token()).await;
    let id = publish_event(&mut svc, task_event(PROJECT, "before SIGTERM")).await;
    assert_eq!(next_event(&mut stream).await.id, id);

    process.signal("-TERM");
    let (events, status) = drain_until_status(&mut stream).await;
    assert!(events.is_empty(), "{events:?}");
    assert_shutdown_status(&status, &[(PROJECT.to_owned(), id.clone())].into());

    let exit = process.wait_exit(Duration::from_secs(5)).await;
    assert!(
        exit.success(),
        "lamplight exited with {exit:?}\n{}",
        process.logs()
    );
}
