//! The `lamplight subscribe | publish | presence | admin` subcommands: the real binary against a real
//! server. The README's two-terminal demo, the JSON line shape, `--since`, `Reset` and `removed` lines,
//! presence, admin calls, tokens from `--token`/`LAMPLIGHT_TOKEN` or minted, and the exit status of each
//! kind of failure.
mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, Command};

const PROJECT: &str = "tenant:t1:project:p1";
const WAIT: Duration = Duration::from_secs(20);

/// `lamplight` with a clean environment (no token, secret, address or Redis from the caller's shell).
fn lamplight(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lamplight"));
    cmd.args(args)
        .env_remove("LAMPLIGHT_TOKEN")
        .env_remove("LAMPLIGHT_JWT_SECRET")
        .env_remove("LAMPLIGHT_ADDR")
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The flags that point a client subcommand at `server` with the test secret.
fn at(server: &TestServer) -> Vec<String> {
    vec![
        "--addr".into(),
        server.url(),
        "--jwt-secret".into(),
        SECRET.into(),
    ]
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `lamplight args...` to the end (failing the test after [`WAIT`]).
async fn run(args: &[&str], extra: &[String]) -> Run {
    let mut cmd = lamplight(args);
    cmd.args(extra);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("lamplight {args:?} did not finish within {WAIT:?}"))
        .expect("run target/debug/lamplight");
    Run {
        code: out.status.code().expect("exited normally"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Publishes a task with the CLI and returns the id it printed.
async fn publish(server: &TestServer, task_json: &str) -> String {
    let out = run(
        &[
            "publish",
            "--room",
            PROJECT,
            "--type",
            "task.created",
            "--task-json",
            task_json,
        ],
        &at(server),
    )
    .await;
    assert_eq!(out.code, 0, "publish failed: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    out.stdout.trim().to_owned()
}

/// A running `lamplight subscribe`, with its output read line by line.
struct Subscriber {
    child: Child,
    stdout: Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: Lines<BufReader<tokio::process::ChildStderr>>,
}

impl Subscriber {
    /// Starts it and waits for its "connected" line.
    async fn start(args: &[&str], extra: &[String]) -> Self {
        let mut cmd = lamplight(&[&["subscribe"], args].concat());
        cmd.args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run target/debug/lamplight");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut sub = Self {
            child,
            stdout,
            stderr,
        };
        let line = next_line(&mut sub.stderr).await;
        assert!(line.contains("connected to"), "{line}");
        sub
    }

    async fn json_line(&mut self) -> Value {
        let line = next_line(&mut self.stdout).await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    }

    /// Waits for the exit status and returns it with the rest of stderr.
    async fn finish(mut self) -> (i32, String) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("subscriber did not exit")
            .unwrap();
        let mut rest = String::new();
        while let Some(line) = self.stderr.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        (status.code().expect("exited normally"), rest)
    }
}

async fn next_line<R: AsyncRead + Unpin>(lines: &mut Lines<BufReader<R>>) -> String {
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("no line in time")
        .unwrap()
        .expect("output ended")
}

#[tokio::test]
async fn two_terminals_subscribe_and_publish_json_lines() {
    let server = TestServer::start().await;
    // Terminal 1: a user of tenant t1 with project p1 (a minted token).
    let mut sub = Subscriber::start(
        &[
            "--room",
            PROJECT,
            "--count",
            "2",
            "--sub",
            "u1",
            "--tid",
            "t1",
            "--projects",
            "p1",
        ],
        &at(&server),
    )
    .await;
    // Terminal 2: publish as the default CLI service identity.
    let id = publish(&server, r#"{"id":"42","title":"Ship"}"#).await;
    let file = std::env::temp_dir().join(format!("lamplight-cli-{}.txt", std::process::id()));
    std::fs::write(&file, b"hello \xff").unwrap();
    let custom = run(
        &[
            "publish",
            "--room",
            PROJECT,
            "--type",
            "note.added",
            "--custom-file",
            file.to_str().unwrap(),
            "--content-type",
            "text/plain",
        ],
        &at(&server),
    )
    .await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(custom.code, 0, "{}", custom.stderr);
    let custom_id = custom.stdout.trim();

    let first = sub.json_line().await;
    let time = first["time"].as_str().expect("time is a string").to_owned();
    assert!(
        time.ends_with('Z') && time.contains('T'),
        "RFC 3339: {time}"
    );
    assert_eq!(
        first,
        json!({"id": id, "room": PROJECT, "type": "task.created", "time": time,
               "publisher_id": "lamplight-cli",
               "task": {"id": "42", "project_id": "", "tenant_id": "", "title": "Ship",
                        "status": "", "priority": "", "created_by_id": ""}})
    );
    let second = sub.json_line().await;
    assert_eq!(second["id"], custom_id);
    assert_eq!(second["type"], "note.added");
    assert_eq!(
        second["custom"],
        json!({"content_type": "text/plain", "data": "aGVsbG8g/w=="})
    );
    let (code, stderr) = sub.finish().await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("--since {PROJECT}={custom_id}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn since_replays_and_a_reset_is_a_json_line() {
    let server = TestServer::start().await;
    let a = publish(&server, r#"{"id":"a"}"#).await;
    let b = publish(&server, r#"{"id":"b"}"#).await;
    let since = format!("{PROJECT}={a}");
    let replay = run(
        &[
            "subscribe",
            "--room",
            PROJECT,
            "--since",
            &since,
            "--count",
            "1",
        ],
        &at(&server),
    )
    .await;
    assert_eq!(replay.code, 0, "{}", replay.stderr);
    let line: Value = serde_json::from_str(replay.stdout.trim()).unwrap();
    assert_eq!(
        (line["id"].as_str(), &line["task"]["id"]),
        (Some(b.as_str()), &json!("b"))
    );

    // An id from another run of the server cannot be replayed: a reset line, then live events.
    let stale = format!("{PROJECT}=zzz-1");
    let mut sub = Subscriber::start(
        &["--room", PROJECT, "--since", &stale, "--count", "1"],
        &at(&server),
    )
    .await;
    let reset = sub.json_line().await;
    assert_eq!(reset["reset"]["room"], PROJECT);
    assert!(
        reset["reset"]["reason"]
            .as_str()
            .unwrap()
            .contains("earlier run"),
        "{reset}"
    );
    let c = publish(&server, r#"{"id":"c"}"#).await;
    assert_eq!(sub.json_line().await["id"], c);
    assert_eq!(sub.finish().await.0, 0);
}

#[tokio::test]
async fn presence_prints_json() {
    let server = TestServer::start().await;
    let user = ["--sub", "u1", "--tid", "t1", "--projects", "p1"];
    let _sub = Subscriber::start(&[&["--room", PROJECT][..], &user].concat(), &at(&server)).await;
    let out = run(
        &[&["presence", "--room", PROJECT][..], &user].concat(),
        &at(&server),
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let presence: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        presence,
        json!({"room": PROJECT, "user_count": 1, "connection_count": 1, "user_ids": ["u1"],
               "next_page_token": ""})
    );

    // Pages: `--limit`, and `--page-token` from the previous page's `next_page_token`.
    let other = ["--sub", "u2", "--tid", "t1", "--projects", "p1"];
    let _sub2 = Subscriber::start(&[&["--room", PROJECT][..], &other].concat(), &at(&server)).await;
    let page = |token: String| {
        let args: Vec<String> = [
            "presence",
            "--room",
            PROJECT,
            "--limit",
            "1",
            "--page-token",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([token])
        .chain(user.iter().map(|a| a.to_string()))
        .collect();
        let server = &server;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run(&args, &at(server)).await;
            assert_eq!(out.code, 0, "{}", out.stderr);
            serde_json::from_str::<Value>(out.stdout.trim()).unwrap()
        }
    };
    let first = page(String::new()).await;
    assert_eq!(
        (&first["user_ids"], &first["user_count"]),
        (&json!(["u1"]), &json!(2))
    );
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty(), "{first}");
    let second = page(token).await;
    assert_eq!(
        (&second["user_ids"], &second["next_page_token"]),
        (&json!(["u2"]), &json!(""))
    );
}

#[tokio::test]
async fn tokens_come_from_the_token_subcommand_flag_or_environment() {
    let server = TestServer::start().await;
    let minted = run(
        &[
            "token",
            "--sub",
            "billing",
            "--roles",
            "publisher",
            "--jwt-secret",
            SECRET,
        ],
        &[],
    )
    .await;
    assert_eq!(minted.code, 0, "{}", minted.stderr);
    let token = minted.stdout.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let args = [
        "publish",
        "--room",
        PROJECT,
        "--type",
        "task.created",
        "--task-json",
        "{}",
    ];
    let url = server.url();
    let with_flag = run(
        &args,
        &["--addr".into(), url.clone(), "--token".into(), token.into()],
    )
    .await;
    assert_eq!(with_flag.code, 0, "{}", with_flag.stderr);

    let mut cmd = lamplight(&args);
    cmd.args(["--addr", &url]).env("LAMPLIGHT_TOKEN", token);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        String::from_utf8(out.stdout).unwrap().trim(),
        with_flag.stdout.trim()
    );
}

/// Asserts a failed run: its exit status, one `lamplight: ` line on stderr containing `needle`, nothing
/// on stdout.
fn assert_fails(out: &Run, code: i32, needle: &str) {
    assert_eq!(out.code, code, "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {:?}", out.stderr);
    assert!(lines[0].starts_with("lamplight: "), "{:?}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{:?} should contain {needle:?}",
        lines[0]
    );
}

#[tokio::test]
async fn failures_have_friendly_messages_and_distinct_exit_statuses() {
    let server = TestServer::start().await;
    let publish_args = |room: &'static str| {
        vec![
            "publish",
            "--room",
            room,
            "--type",
            "task.created",
            "--task-json",
            r#"{"id":"1"}"#,
        ]
    };
    let as_user = [
        "--sub".to_owned(),
        "u1".into(),
        "--tid".into(),
        "t1".into(),
        "--projects".into(),
        "p1".into(),
    ];

    // 3: the server says the request is invalid.
    let out = run(&publish_args("not a room"), &at(&server)).await;
    assert_fails(&out, 3, "InvalidArgument");
    // 4: token refused.
    let wrong_secret = [
        "--addr".to_owned(),
        server.url(),
        "--jwt-secret".into(),
        "other".into(),
    ];
    let out = run(&publish_args(PROJECT), &wrong_secret).await;
    assert_fails(&out, 4, "--jwt-secret");
    let out = run(
        &["presence", "--room", PROJECT, "--token", "garbage"],
        &["--addr".to_owned(), server.url()],
    )
    .await;
    assert_fails(&out, 4, "Unauthenticated");
    // 5: users may not publish; nor subscribe to another tenant's rooms.
    let out = run(
        &publish_args(PROJECT),
        &[at(&server), as_user.to_vec()].concat(),
    )
    .await;
    assert_fails(&out, 5, "publisher");
    let out = run(
        &["subscribe", "--room", "tenant:t2:project:p1"],
        &[at(&server), as_user.to_vec()].concat(),
    )
    .await;
    assert_fails(&out, 5, "tenant:t2:project:p1");
    // 6: nobody listens.
    let dead = {
        let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", probe.local_addr().unwrap())
    };
    let nowhere = ["--addr".to_owned(), dead.clone()];
    let out = run(
        &[&publish_args(PROJECT)[..], &["--timeout-secs", "1"]].concat(),
        &nowhere,
    )
    .await;
    assert_fails(&out, 6, &format!("cannot reach the server at {dead}"));
    let out = run(
        &[
            "subscribe",
            "--room",
            PROJECT,
            "--connect-timeout-secs",
            "1",
        ],
        &nowhere,
    )
    .await;
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(
        out.stderr
            .lines()
            .last()
            .unwrap()
            .starts_with("lamplight: cannot reach"),
        "{}",
        out.stderr
    );
    // 2: usage: bad payload JSON, no payload, both payloads, bad --since.
    let out = run(
        &[
            "publish",
            "--room",
            PROJECT,
            "--type",
            "t",
            "--task-json",
            r#"{"name":"x"}"#,
        ],
        &at(&server),
    )
    .await;
    assert_fails(&out, 2, "unknown field \"name\"");
    let out = run(&["publish", "--room", PROJECT, "--type", "t"], &at(&server)).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    let out = run(
        &[
            "publish",
            "--room",
            PROJECT,
            "--type",
            "t",
            "--task-json",
            "{}",
            "--bug-json",
            "{}",
        ],
        &at(&server),
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    let out = run(
        &["subscribe", "--room", PROJECT, "--since", "nope"],
        &at(&server),
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    let out = run(
        &[
            "publish",
            "--room",
            PROJECT,
            "--type",
            "t",
            "--custom-file",
            "/nonexistent/x",
        ],
        &at(&server),
    )
    .await;
    assert_fails(&out, 2, "cannot read --custom-file");
}

#[tokio::test]
async fn help_lists_the_client_subcommands() {
    let out = run(&["--help"], &[]).await;
    assert_eq!(out.code, 0);
    for sub in [
        "serve",
        "token",
        "subscribe",
        "publish",
        "presence",
        "admin",
    ] {
        assert!(
            out.stdout.contains(sub),
            "{sub} missing from\n{}",
            out.stdout
        );
    }
}

const CHANNEL: &str = "tenant:t1:channel:c1";

/// `--sub u1 --tid t1 --projects p1 --channels c1`: the user the admin tests act on.
fn as_u1() -> Vec<String> {
    [
        "--sub",
        "u1",
        "--tid",
        "t1",
        "--projects",
        "p1",
        "--channels",
        "c1",
    ]
    .map(String::from)
    .to_vec()
}

/// `lamplight admin ACTION --user u1 --tenant t1 args...` as the default CLI identity (role publisher).
async fn admin(server: &TestServer, action: &str, args: &[&str]) -> Run {
    let out = run(
        &[&["admin", action, "--user", "u1", "--tenant", "t1"], args].concat(),
        &at(server),
    )
    .await;
    assert_eq!(out.code, 0, "admin {action}: {}", out.stderr);
    out
}

#[tokio::test]
async fn subscribe_prints_removed_rooms_and_exits_5_when_an_administrator_disconnects() {
    let server = TestServer::start().await;
    let room_flags = ["--room", PROJECT, "--room", CHANNEL];
    let mut sub = Subscriber::start(&room_flags, &[at(&server), as_u1()].concat()).await;
    let out = admin(
        &server,
        "unsubscribe",
        &["--room", PROJECT, "--reason", "left the project"],
    )
    .await;
    assert!(
        out.stderr.contains("removed tenant:t1:project:p1 from u1"),
        "{}",
        out.stderr
    );
    assert_eq!(
        sub.json_line().await,
        json!({"removed": {"room": PROJECT, "reason": "left the project"}})
    );
    admin(&server, "disconnect", &["--reason", "account closed"]).await;
    let (code, stderr) = sub.finish().await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("account closed"), "{stderr}");
    assert!(stderr.contains("not reconnecting"), "{stderr}");
    assert!(
        !stderr.contains("reconnecting in"),
        "no reconnect attempt: {stderr}"
    );

    // Every room removed: nothing left to print, exit 5 naming the last one.
    let mut sub = Subscriber::start(&["--room", CHANNEL], &[at(&server), as_u1()].concat()).await;
    admin(&server, "unsubscribe", &["--room", CHANNEL]).await;
    assert_eq!(
        sub.json_line().await,
        json!({"removed": {"room": CHANNEL, "reason": ""}})
    );
    let (code, stderr) = sub.finish().await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("every room was removed"), "{stderr}");
}

#[tokio::test]
async fn revoked_tokens_end_subscribe_and_admin_calls_check_their_input_and_caller() {
    let server = TestServer::start().await;
    let mut claims = user_claims("u1");
    claims.iat = now() - 60;
    let token = sign(&claims);
    let sub = Subscriber::start(
        &["--room", PROJECT, "--token", &token],
        &["--addr".to_owned(), server.url()],
    )
    .await;
    let cutoff =
        prost_types::Timestamp::from(std::time::SystemTime::now() - Duration::from_secs(30))
            .to_string();
    admin(&server, "revoke", &["--issued-before", &cutoff]).await;
    // The same token again after the refresh: refused, so it gives up.
    let (code, stderr) = sub.finish().await;
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("revoked"), "{stderr}");

    let out = run(
        &[
            "admin",
            "revoke",
            "--user",
            "u1",
            "--issued-before",
            "yesterday",
        ],
        &at(&server),
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("RFC 3339"), "{}", out.stderr);
    // A user may not disconnect another.
    let out = run(
        &["admin", "disconnect", "--user", "u2", "--reason", "x"],
        &[at(&server), as_u1()].concat(),
    )
    .await;
    assert_fails(&out, 5, "PermissionDenied");
}
