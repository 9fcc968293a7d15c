//! A flood from one user against the real binary: thousands of `Subscribe` attempts over many
//! connections, then more connections than the node allows. Another user's events must keep arriving
//! promptly (a generous bound: this is not a benchmark) and the server's memory must stay bounded.
mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lamplight::proto::v1::event_service_client::EventServiceClient;
use lamplight::proto::v1::SubscribeRequest;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lamplight");
const PROJECT: &str = "tenant:t1:project:p1";
/// The attacker's connections and streams per connection: 3,000 `Subscribe` attempts.
const FLOOD_CONNECTIONS: usize = 30;
const STREAMS_PER_CONNECTION: usize = 100;
/// Projects in the attacker's token; each stream subscribes to all of them and three more rooms.
const ATTACKER_PROJECTS: usize = 12;
/// `--max-connections` of the server, and the idle connections the attacker opens on top.
const MAX_CONNECTIONS: usize = 100;
const EXTRA_CONNECTIONS: usize = 150;
/// The victim's publish -> receive latency bound: generous, a loaded machine must pass.
const LATENCY_BOUND: Duration = Duration::from_secs(5);
/// How much the server's resident memory may grow under the flood. Unbounded, 3,000 streams of 15 rooms
/// each cost well over this; bounded, the attacker holds 64 streams and at most MAX_CONNECTIONS
/// connections (most of the growth is then the allocator keeping what the refused calls used).
const RSS_GROWTH_BOUND_KIB: u64 = 24 * 1024;

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc (Linux)");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

async fn start_server() -> (tokio::process::Child, SocketAddr) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = tokio::process::Command::new(BIN)
        .args(["--listen", &addr.to_string()])
        .env_clear()
        .env("LAMPLIGHT_JWT_SECRET", SECRET)
        .env("LAMPLIGHT_JWT_LEEWAY_SECS", "0")
        .env("LAMPLIGHT_MAX_CONNECTIONS", MAX_CONNECTIONS.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, addr)
}

async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

fn with_token(channel: Channel, token: &str) -> Client {
    let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    EventServiceClient::with_interceptor(
        channel,
        Box::new(move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", header.clone());
            Ok(req)
        }),
    )
}

/// One attacker connection: `STREAMS_PER_CONNECTION` concurrent `Subscribe` calls on 15 rooms, each
/// held open unread. Returns the streams opened and the refusals seen.
async fn flood_one_connection(addr: SocketAddr, token: String) -> (Vec<impl Send>, usize) {
    let channel = connect(addr).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..STREAMS_PER_CONNECTION {
        let mut client = with_token(channel.clone(), &token);
        calls.spawn(async move {
            let mut rooms: Vec<String> = (1..=ATTACKER_PROJECTS)
                .map(|n| format!("tenant:t1:project:p{n}"))
                .collect();
            rooms.extend([
                "tenant:t1".into(),
                "tenant:t1:channel:c1".into(),
                "user:mallory".into(),
            ]);
            let req = SubscribeRequest {
                rooms,
                since: Default::default(),
            };
            client.subscribe(req).await.map(|r| r.into_inner())
        });
    }
    let mut open = Vec::new();
    let mut refused = 0;
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(stream) => open.push(stream),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    (open, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_user_leaves_others_served_and_memory_bounded() {
    let started = Instant::now();
    let (child, addr) = start_server().await;
    let pid = child.id().expect("server pid");

    let mut victim_client = with_token(connect(addr).await, &user_token("victim"));
    let (mut victim, _) = subscribe(&mut victim_client, &[PROJECT], &[])
        .await
        .unwrap();
    let mut svc = with_token(connect(addr).await, &publisher_token());
    // Warm up, then the baseline.
    for n in 0..20 {
        let id = publish_event(&mut svc, task_event(PROJECT, &format!("warm-up {n}"))).await;
        assert_eq!(next_event(&mut victim).await.id, id);
    }
    let baseline = vm_rss_kib(pid);

    // Thousands of streams from one user over many connections.
    let token = sign(&lamplight::auth::DevToken {
        projects: (1..=ATTACKER_PROJECTS).map(|n| format!("p{n}")).collect(),
        ..user_claims("mallory")
    });
    let floods: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|_| tokio::spawn(flood_one_connection(addr, token.clone())))
        .collect();
    let mut held = Vec::new();
    let mut refused = 0;
    for flood in floods {
        let (open, r) = flood.await.unwrap();
        held.extend(open);
        refused += r;
    }

    // Then more idle connections than the node allows (HTTP/2 preface, then nothing).
    let mut idle = Vec::new();
    let mut closed_at_accept = 0;
    for _ in 0..EXTRA_CONNECTIONS {
        let Ok(mut socket) = TcpStream::connect(addr).await else {
            closed_at_accept += 1;
            continue;
        };
        let _ = socket
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await;
        idle.push(socket);
    }
    for socket in &mut idle {
        let mut buf = [0u8; 256];
        // Served connections get the server's SETTINGS; refused ones are closed.
        match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed_at_accept += 1,
            _ => {}
        }
    }

    // The victim is still served promptly, on the connection it already had.
    for n in 0..20 {
        let sent = Instant::now();
        let id = publish_event(&mut svc, task_event(PROJECT, &format!("during {n}"))).await;
        assert_eq!(next_event(&mut victim).await.id, id);
        let latency = sent.elapsed();
        assert!(
            latency < LATENCY_BOUND,
            "publish -> receive took {latency:?} during the flood"
        );
    }

    let during = vm_rss_kib(pid);
    let growth = during.saturating_sub(baseline);
    eprintln!(
        "flood: {} streams held, {refused} refused, {closed_at_accept} connections refused; RSS {baseline} -> {during} KiB",
        held.len()
    );
    // Checked after the victim's latency, so a run of the unbounded server shows all three.
    let attempts = FLOOD_CONNECTIONS * STREAMS_PER_CONNECTION;
    assert_eq!(held.len() + refused, attempts);
    assert!(
        held.len() <= lamplight::config::DEFAULT_MAX_STREAMS_PER_USER,
        "one user holds {} streams of {attempts} attempted",
        held.len()
    );
    // The victim's two connections are open (and those of the attacker that hold streams).
    let served = EXTRA_CONNECTIONS - closed_at_accept;
    assert!(
        served + 2 <= MAX_CONNECTIONS,
        "{served} of {EXTRA_CONNECTIONS} more connections were served with --max-connections {MAX_CONNECTIONS}"
    );
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB ({baseline} -> {during} KiB) under the flood"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    drop(held);
    drop(idle);
    drop(child);
}
