//! The Redis bus over TLS as an ACL user, as managed Redis services require: a private `redis-server`
//! that speaks only TLS (`--port 0 --tls-port P`) with a certificate from a CA made at run time, its
//! `default` user switched off and an application user limited to lamplight's keys and channels.
//! Two nodes publish, subscribe and resume across each other; a wrong password, an untrusted
//! certificate and a plain `redis://` URL against the TLS port each stop start-up with a message that
//! says what to change. Client certificates, and a TLS Redis Cluster, too.

#[path = "support/redis.rs"]
mod redis_support;
mod support;
#[path = "support/tls.rs"]
mod tls_support;

use std::time::Duration;

use redis_support::{TlsFiles, TlsRedisCluster, TlsRedisServer};
use support::*;
use tls_support::{TempDir, TestCa};

const ROOM: &str = "tenant:t1:project:p1";
/// The application's ACL user: lamplight's keys and channels only, no admin commands (CONFIG, INFO,
/// ...: `-@dangerous`), as on a managed Redis.
const APP_USER: &[&str] = &[
    "--user",
    "app",
    "on",
    ">app-secret",
    "~lamplight:*",
    "&lamplight:*",
    "+@all",
    "-@dangerous",
];
/// An administrator for the test helper (cluster set-up), and the `default` user switched off, so every
/// connection lamplight makes must log in with the URL's user.
const ADMIN_AND_NO_DEFAULT: &[&str] = &[
    "--user",
    "admin",
    "on",
    ">admin-secret",
    "~*",
    "&*",
    "+@all",
    "--user",
    "default",
    "off",
];

/// A CA, a server certificate for 127.0.0.1 it signed, and the files.
struct Pki {
    dir: TempDir,
    ca: TestCa,
    files: TlsFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = TempDir::new("redis-tls");
        let ca = TestCa::new();
        let server = ca.issue(&["127.0.0.1", "localhost"]);
        let files = TlsFiles {
            cert_file: dir.write("server.pem", &server.cert_pem),
            key_file: dir.write("server.key", &server.key_pem),
            ca_file: dir.write("ca.pem", &ca.cert_pem()),
        };
        Self { dir, ca, files }
    }
}

fn args() -> Vec<&'static str> {
    [APP_USER, ADMIN_AND_NO_DEFAULT].concat()
}

/// Starts a node against `url` with `tweak`, expecting start-up to fail; returns the error text.
async fn start_up_error(url: &str, tweak: impl FnOnce(&mut lamplight::Config)) -> String {
    let url = url.to_owned();
    let mut server = TestServer::start_with(|c| {
        redis_support::use_redis(c, &url);
        tweak(c);
    })
    .await;
    let result = tokio::time::timeout(Duration::from_secs(20), server.handle.take().unwrap())
        .await
        .expect("start-up fails within 20 s")
        .expect("server task panicked");
    result.expect_err("the node must not start").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_publish_subscribe_and_resume_over_tls_as_an_acl_user() {
    let pki = Pki::new();
    let redis = TlsRedisServer::start(&pki.files, "admin:admin-secret", &args()).await;
    let url = redis.url("app:app-secret");
    let ca_file = pki.files.ca_file.clone();
    let node = || {
        let (url, ca_file) = (url.clone(), ca_file.clone());
        TestServer::start_with(move |c| {
            redis_support::use_redis(c, &url);
            c.redis.redis_ca_file = Some(ca_file);
        })
    };
    let (a, b) = (node().await, node().await);

    let mut user_b = b.client(&user_token("u1")).await;
    let (mut stream_b, first) = subscribe(&mut user_b, &[ROOM], &[]).await.unwrap();
    let start = first.rooms[0].last_event_id.clone();
    let mut svc_a = a.client(&publisher_token()).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(
            publish_task(&mut svc_a, ROOM, &format!("t{n}"))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        assert_eq!(
            &next_event(&mut stream_b).await.id,
            id,
            "delivered in order"
        );
    }
    drop(stream_b);

    // Resume on node A from an id seen on node B: replayed from the stream in Redis.
    let mut user_a = a.client(&user_token("u1")).await;
    let (mut stream_a, sub) = subscribe(&mut user_a, &[ROOM], &[(ROOM, &ids[4])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered, "{sub:?}");
    for id in &ids[5..] {
        assert_eq!(&next_event(&mut stream_a).await.id, id, "replayed in order");
    }
    let live = publish_task(&mut svc_a, ROOM, "live").await.unwrap();
    assert_eq!(next_event(&mut stream_a).await.id, live, "then live");
    let (mut from_start, sub) = subscribe(&mut user_a, &[ROOM], &[(ROOM, &start)])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered, "{sub:?}");
    assert_eq!(next_event(&mut from_start).await.id, ids[0]);

    // Every connection of the nodes logged in as the application user (the default user is off).
    let mut admin = redis.conn().await.unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    let users: Vec<&str> = clients
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .collect();
    assert!(
        users.iter().filter(|u| **u == "app").count() >= 4,
        "two nodes, a command and a subscriber connection each: {clients}"
    );
    assert!(
        users.iter().all(|u| ["app", "admin"].contains(u)),
        "{clients}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_survives_a_restart_of_the_tls_redis() {
    let pki = Pki::new();
    // Redis without the fix of redis/redis#14545 (Debian's 7.0.15 among them) re-checks each
    // MULTI/EXEC of the append-only file against the `default` user's permissions when it loads the
    // file (redis/redis#14541): with that user off, every transaction (every publish's script effects)
    // is dropped at the restart. So here the `default` user keeps its permissions behind a password,
    // as with `requirepass` (see the README).
    let mut args = [
        APP_USER,
        &[
            "--user",
            "admin",
            "on",
            ">admin-secret",
            "~*",
            "&*",
            "+@all",
        ],
        &[
            "--user",
            "default",
            "on",
            ">default-secret",
            "~*",
            "&*",
            "+@all",
        ],
    ]
    .concat();
    args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
    let mut redis = TlsRedisServer::start(&pki.files, "admin:admin-secret", &args).await;
    let url = redis.url("app:app-secret");
    let ca_file = pki.files.ca_file.clone();
    let node = TestServer::start_with(|c| {
        redis_support::use_redis(c, &url);
        c.redis.redis_ca_file = Some(ca_file);
    })
    .await;
    let mut user = node.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc = node.client(&publisher_token()).await;
    let before = publish_task(&mut svc, ROOM, "before").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, before);

    redis.kill();
    redis.start_again().await;
    // The node reconnects (over TLS, as the same user): publishes succeed again and reach the stream
    // that stayed open, in order and without a reset.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        match publish_task(&mut svc, ROOM, "after").await {
            Ok(id) => break id,
            Err(status) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "publish still failing 20 s after the restart: {status}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let more = publish_task(&mut svc, ROOM, "more").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, after);
    assert_eq!(next_event(&mut stream).await.id, more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_or_a_missing_permission_stops_start_up_with_a_clear_message() {
    let pki = Pki::new();
    let redis = TlsRedisServer::start(&pki.files, "admin:admin-secret", &args()).await;
    let ca_file = pki.files.ca_file.clone();
    let err = start_up_error(&redis.url("app:not-the-password"), |c| {
        c.redis.redis_ca_file = Some(ca_file)
    })
    .await;
    assert!(
        err.contains("refused the credentials") && err.contains("--redis-url"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-password"),
        "no password in messages: {err}"
    );

    // Right password, but the ACL denies a command the connection needs (SELECT of the URL's db).
    let mut args = args();
    args.extend([
        "--user",
        "nodb",
        "on",
        ">nodb-secret",
        "~lamplight:*",
        "&lamplight:*",
        "+@all",
        "-select",
    ]);
    let limited = TlsRedisServer::start(&pki.files, "admin:admin-secret", &args).await;
    let ca_file = pki.files.ca_file.clone();
    let err = start_up_error(&format!("{}/1", limited.url("nodb:nodb-secret")), |c| {
        c.redis.redis_ca_file = Some(ca_file)
    })
    .await;
    assert!(err.contains("ACL denies"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_server_certificate_stops_start_up_with_a_clear_message() {
    let pki = Pki::new();
    let redis = TlsRedisServer::start(&pki.files, "admin:admin-secret", &args()).await;
    let url = redis.url("app:app-secret");

    // The system's roots only: the private CA is not among them.
    let err = start_up_error(&url, |_| {}).await;
    assert!(
        err.contains("TLS with Redis failed") && err.contains("--redis-ca-file"),
        "{err}"
    );
    // Another CA in --redis-ca-file does not help either.
    let other = pki.dir.write("other-ca.pem", &TestCa::new().cert_pem());
    let err = start_up_error(&url, |c| c.redis.redis_ca_file = Some(other)).await;
    assert!(
        err.contains("TLS with Redis failed") && err.contains("--redis-ca-file"),
        "{err}"
    );
    // A certificate of the right CA for another name: the host in the URL must match.
    let wrong_name = pki.ca.issue(&["redis.example.com"]);
    let files = TlsFiles {
        cert_file: pki.dir.write("wrong-name.pem", &wrong_name.cert_pem),
        key_file: pki.dir.write("wrong-name.key", &wrong_name.key_pem),
        ca_file: pki.files.ca_file.clone(),
    };
    let misnamed = TlsRedisServer::spawn_unchecked(&files, &args());
    misnamed.wait_listening().await;
    let ca_file = pki.files.ca_file.clone();
    let err = start_up_error(&misnamed.url("app:app-secret"), |c| {
        c.redis.redis_ca_file = Some(ca_file)
    })
    .await;
    assert!(err.contains("TLS with Redis failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wrong_scheme_for_the_port_stops_start_up_with_a_clear_message() {
    let pki = Pki::new();
    let redis = TlsRedisServer::start(&pki.files, "admin:admin-secret", &args()).await;
    let plain = format!("redis://app:app-secret@127.0.0.1:{}", redis.port);
    let err = start_up_error(&plain, |_| {}).await;
    assert!(err.contains("rediss://"), "{err}");
    // And a CA file with a plain URL is a mistake, not silently ignored.
    let ca_file = pki.files.ca_file.clone();
    let err = start_up_error(&plain, |c| c.redis.redis_ca_file = Some(ca_file)).await;
    assert!(
        err.contains("--redis-ca-file") && err.contains("rediss://"),
        "{err}"
    );
    // The other way round: rediss:// against a plain port.
    let plain_redis = redis_support::RedisServer::start().await;
    let tls_url = format!("rediss://127.0.0.1:{}", plain_redis.port);
    let err = start_up_error(&tls_url, |_| {}).await;
    assert!(err.contains("TLS") && err.contains("redis://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_requires_client_certificates_gets_one() {
    let pki = Pki::new();
    let client = pki.ca.issue(&["lamplight"]);
    let cert = pki.dir.write("client.pem", &client.cert_pem);
    let key = pki.dir.write("client.key", &client.key_pem);
    let mut args = args();
    args.extend(["--tls-auth-clients", "yes"]);
    let redis = TlsRedisServer::start_with_client(
        &pki.files,
        "admin:admin-secret",
        Some((cert.clone(), key.clone())),
        &args,
    )
    .await;
    let url = redis.url("app:app-secret");
    let ca_file = pki.files.ca_file.clone();

    let without = ca_file.clone();
    let err = start_up_error(&url, |c| c.redis.redis_ca_file = Some(without)).await;
    assert!(
        err.contains("client certificate") && err.contains("--redis-client-cert-file"),
        "{err}"
    );

    let node = TestServer::start_with(|c| {
        redis_support::use_redis(c, &url);
        c.redis.redis_ca_file = Some(ca_file);
        c.redis.redis_client_cert_file = Some(cert);
        c.redis.redis_client_key_file = Some(key);
    })
    .await;
    let mut user = node.client(&user_token("u1")).await;
    let (mut stream, _) = subscribe(&mut user, &[ROOM], &[]).await.unwrap();
    let mut svc = node.client(&publisher_token()).await;
    let id = publish_task(&mut svc, ROOM, "t1").await.unwrap();
    assert_eq!(next_event(&mut stream).await.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_a_tls_cluster_as_an_acl_user() {
    let pki = Pki::new();
    let cluster = TlsRedisCluster::start(&pki.files, "admin:admin-secret", &args()).await;
    let url = cluster.url("app:app-secret");
    let ca_file = pki.files.ca_file.clone();
    let node = || {
        let (url, ca_file) = (url.clone(), ca_file.clone());
        TestServer::start_with(move |c| {
            redis_support::use_redis(c, &url);
            c.redis.redis_cluster = true;
            c.redis.redis_ca_file = Some(ca_file);
        })
    };
    let (a, b) = (node().await, node().await);
    // Rooms whose hash tags land on different shards.
    let rooms = [
        "tenant:t1:project:p1",
        "tenant:t1:channel:c1",
        "tenant:t1:user:u1",
    ];
    let mut user_b = b.client(&user_token("u1")).await;
    let (mut stream_b, _) = subscribe(&mut user_b, &rooms, &[]).await.unwrap();
    let mut svc_a = a.client(&publisher_token()).await;
    let mut ids = Vec::new();
    for room in rooms {
        ids.push(publish_task(&mut svc_a, room, "t").await.unwrap());
    }
    let mut got: Vec<String> = Vec::new();
    for _ in &rooms {
        got.push(next_event(&mut stream_b).await.id);
    }
    let mut expected = ids.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "one event per room, across shards and nodes");

    // Resume on node A from the first room's event: the one published since is replayed.
    let mut svc_b = b.client(&publisher_token()).await;
    let later = publish_task(&mut svc_b, rooms[0], "later").await.unwrap();
    let mut user_a = a.client(&user_token("u1")).await;
    let (mut stream_a, sub) = subscribe(&mut user_a, &rooms[..1], &[(rooms[0], &ids[0])])
        .await
        .unwrap();
    assert!(sub.rooms[0].recovered, "{sub:?}");
    assert_eq!(next_event(&mut stream_a).await.id, later);
}
