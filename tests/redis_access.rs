//! Reaching Redis as managed services require: TLS (`rediss://`) against a CA the test makes
//! with openssl, a certificate from another CA refused loudly at every attempt, mutual TLS,
//! and an ACL user limited to the commands, keys and channels docs/scaling.md lists, running
//! the engine's core cases. Real `redis-server` processes, real nodes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::PATIENCE;
use common::redis::{
    Node, RedisCluster, RedisServer, free_port, http_get, start_sentinel, wait_for,
};
use serde_json::json;

/// A CA, and a certificate it signed for `localhost` and 127.0.0.1 (server and client use).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes `<name>-ca.crt` and, signed by it, `<name>-server.crt` and `<name>-client.crt`
    /// (with their keys) in `dir`.
    fn make(dir: &Path, name: &str) -> Pki {
        let run = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(status.success(), "openssl {args:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let (ca_key, ca_crt) = (format!("{name}-ca.key"), format!("{name}-ca.crt"));
        let subject = format!("/CN=sidecast test CA {name}");
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject];
        args.extend(["-keyout", &ca_key, "-out", &ca_crt]);
        args.extend(ec);
        run(&args);
        for who in ["server", "client"] {
            let base = format!("{name}-{who}");
            let (key, csr, crt) = (
                format!("{base}.key"),
                format!("{base}.csr"),
                format!("{base}.crt"),
            );
            let mut request = vec![
                "req",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &key,
                "-out",
                &csr,
            ];
            request.extend(ec);
            run(&request);
            let ext = format!("{base}.ext");
            std::fs::write(
                dir.join(&ext),
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
            )
            .unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ]);
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The `redis-server` arguments that make it speak TLS on `tls_port` with the `good`
/// server certificate; `clients`: whether it asks for client certificates.
fn tls_args(pki: &Pki, tls_port: u16, clients: &str) -> Vec<String> {
    [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.path("good-server.crt"),
        "--tls-key-file",
        &pki.path("good-server.key"),
        "--tls-ca-cert-file",
        &pki.path("good-ca.crt"),
        "--tls-auth-clients",
        clients,
    ]
    .map(String::from)
    .to_vec()
}

/// A Redis that speaks TLS on `tls_port` (and plain on its own port, for the test alone).
fn tls_redis(dir: &Path, pki: &Pki, tls_port: u16, clients: &str) -> RedisServer {
    let args = tls_args(pki, tls_port, clients);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::start_with(&dir.join("redis"), &args)
}

/// A node that may never become healthy, its log kept in a file.
struct Watched {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Watched {
    fn start(dir: &Path, args: &[&str]) -> Watched {
        let port = free_port();
        let log = dir.join("node.log");
        let child = Command::new(env!("CARGO_BIN_EXE_sidecast"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--publish-socket", dir.join("n.sock").to_str().unwrap()])
            .args(["--engine", "redis", "--log-level", "warn"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Watched { child, log, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page on `subscriber` gets what a worker publishes through `publisher`.
#[track_caller]
fn events_cross(publisher: &Node, subscriber: &Node, channel: &str) {
    let mut ws = subscriber.ws();
    ws.subscribe(channel);
    for n in 1..=3 {
        let reply = publisher.publish(&json!({"id": n, "channel": channel, "data": n}));
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(ws.expect_event(channel, n), json!(n));
    }
}

#[test]
fn nodes_reach_a_tls_only_redis_and_refuse_a_certificate_from_another_ca_at_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let good = Pki::make(dir.path(), "good");
    Pki::make(dir.path(), "other");
    let tls_port = free_port();
    let _redis = tls_redis(dir.path(), &good, tls_port, "no");
    let url = format!("rediss://localhost:{tls_port}");
    let ca = good.path("good-ca.crt");
    let flags = ["--redis-tls-ca", ca.as_str()];
    let (a, b) = (
        Node::start(std::slice::from_ref(&url), &flags),
        Node::start(std::slice::from_ref(&url), &flags),
    );
    events_cross(&a, &b, "tls:1");
    let health = a.health().unwrap();
    assert_eq!(health["redis"]["up"], true, "{health}");

    // Signed by another CA: refused, said why, again at each retry, never healthy.
    let node_dir = dir.path().join("wrong");
    std::fs::create_dir_all(&node_dir).unwrap();
    let other = good.path("other-ca.crt");
    let wrong = Watched::start(&node_dir, &["--redis-url", &url, "--redis-tls-ca", &other]);
    wait_for("two refusals in the log", PATIENCE, || {
        wrong.log().matches("invalid peer certificate").count() >= 2
    });
    let health = http_get(wrong.port, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(wrong.log().contains("UnknownIssuer"), "{}", wrong.log());

    // The same address as plain redis:// is no TLS: it fails, it does not fall back.
    let plain = format!("redis://localhost:{tls_port}");
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let downgraded = Watched::start(&plain_dir, &["--redis-url", &plain]);
    std::thread::sleep(Duration::from_millis(500)); // a bounded look: it must never be up
    let health = http_get(downgraded.port, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");

    // A CA file that is not one stops the server at once, with the reason.
    let output = Command::new(env!("CARGO_BIN_EXE_sidecast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "redis"])
        .args([
            "--publish-socket",
            dir.path().join("x.sock").to_str().unwrap(),
        ])
        .args(["--redis-url", &url, "--redis-tls-ca", "/etc/hostname"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot set up TLS to Redis"), "{stderr}");
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path(), "good");
    let tls_port = free_port();
    let _redis = tls_redis(dir.path(), &pki, tls_port, "yes");
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let (ca, cert, key) = (
        pki.path("good-ca.crt"),
        pki.path("good-client.crt"),
        pki.path("good-client.key"),
    );

    let node_dir = dir.path().join("anonymous");
    std::fs::create_dir_all(&node_dir).unwrap();
    let anonymous = Watched::start(&node_dir, &["--redis-url", &url, "--redis-tls-ca", &ca]);
    wait_for("the refusal in the log", PATIENCE, || {
        anonymous.log().contains("redis 127.0.0.1")
    });
    std::thread::sleep(Duration::from_millis(300)); // a bounded look: it must never be up
    let health = http_get(anonymous.port, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");

    let flags = [
        "--redis-tls-ca",
        ca.as_str(),
        "--redis-tls-cert",
        cert.as_str(),
        "--redis-tls-key",
        key.as_str(),
    ];
    let (a, b) = (
        Node::start(std::slice::from_ref(&url), &flags),
        Node::start(std::slice::from_ref(&url), &flags),
    );
    events_cross(&a, &b, "mtls:1");
}

#[test]
fn a_cluster_over_tls_is_found_and_served_from_one_rediss_seed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path(), "good");
    let tls_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let ca = pki.path("good-ca.crt");
    let cluster = RedisCluster::start_with_args(dir.path(), 0, |i| {
        let mut args = tls_args(&pki, tls_ports[i], "no");
        args.extend(["--tls-cluster".into(), "yes".into()]);
        args
    });
    // One seed: the others are found through CLUSTER SLOTS, which names their TLS ports to a
    // TLS client, and reached over TLS as the seed is.
    let url = format!("rediss://127.0.0.1:{}", tls_ports[0]);
    let flags = ["--redis-tls-ca", ca.as_str()];
    let (a, b) = (
        Node::start(std::slice::from_ref(&url), &flags),
        Node::start(std::slice::from_ref(&url), &flags),
    );
    let health = a.health().unwrap();
    assert_eq!(health["redis"]["shards"], 3, "{health}");
    let channels: Vec<String> = (0..12).map(|i| format!("tls:{i}")).collect();
    let owners: std::collections::HashSet<usize> = channels
        .iter()
        .map(|c| cluster.owner_of(redis_protocol::redis_keyslot(c.as_bytes())))
        .collect();
    assert_eq!(owners.len(), 3, "the channels cover every master");
    for channel in &channels {
        events_cross(&a, &b, channel);
    }
}

#[test]
fn sentinels_with_a_password_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let primary = RedisServer::start(&dir.path().join("primary"));
    let (mut sentinel, port) = start_sentinel(
        &dir.path().join("sentinel"),
        primary.port,
        1,
        "requirepass s3ntinel\n",
    );
    let sentinel_flag = format!("127.0.0.1:{port}");
    let flags = [
        "--redis-sentinel",
        &sentinel_flag,
        "--redis-master-name",
        "mymaster",
    ];

    let mut with = flags.to_vec();
    with.extend(["--redis-sentinel-password", "s3ntinel"]);
    let node = Node::start(&[], &with);
    let health = node.health().unwrap();
    assert_eq!(
        health["redis"]["primary"],
        format!("127.0.0.1:{}", primary.port),
        "{health}"
    );
    events_cross(&node, &node, "sentinel:1");

    let node_dir = dir.path().join("without");
    std::fs::create_dir_all(&node_dir).unwrap();
    let without = Watched::start(&node_dir, &flags);
    wait_for("the refusal in the log", PATIENCE, || {
        without.log().contains("check redis_sentinel_password")
    });
    let health = http_get(without.port, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    let _ = sentinel.kill();
    let _ = sentinel.wait();
}

/// The ACL of docs/scaling.md, for user `sidecast` with password `s3cret`, and the default
/// user switched off.
fn acl_from_docs() -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/scaling.md")).unwrap();
    let rule = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER sidecast "))
        .expect("docs/scaling.md holds the ACL SETUSER line");
    rule.split_whitespace()
        .skip(2)
        .map(|s| s.replace("<password>", "s3cret"))
        .collect()
}

#[test]
fn an_acl_user_with_only_what_sidecast_needs_runs_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let mut setuser = vec!["ACL".to_string(), "SETUSER".into()];
    setuser.extend(acl_from_docs());
    let args: Vec<&str> = setuser.iter().map(String::as_str).collect();
    let reply = redis.command(&args).unwrap();
    assert!(reply.starts_with("+OK"), "{reply}: {args:?}");
    let url = format!("redis://sidecast:s3cret@127.0.0.1:{}", redis.port);
    let auth = ["--jwt-secret", "an-acl-test-secret-of-32-bytes-at-least!!"];
    let (a, b) = (
        Node::start(std::slice::from_ref(&url), &auth),
        Node::start(std::slice::from_ref(&url), &auth),
    );

    // Publish across nodes, resume, rewind, a per-user limit across nodes, a broadcast.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({"sub": "ann", "exp": exp, "channels": ["acl:*"]});
    let key = jsonwebtoken::EncodingKey::from_secret(b"an-acl-test-secret-of-32-bytes-at-least!!");
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
    let path = format!("/ws?token={token}");
    let mut page = b.ws_path(&path);
    page.subscribe("acl:1");
    for n in 1..=3 {
        let reply = a.publish(&json!({"id": n, "channel": "acl:1", "data": n}));
        assert_eq!(reply["ok"], true, "{reply}");
        page.expect_event("acl:1", n);
    }
    let epoch = {
        let mut other = a.ws_path(&path);
        other.send(json!({"type": "subscribe", "channel": "acl:1", "since": {"seq": 1, "epoch": "x"}, "rewind": 2}));
        let subscribed = other.recv();
        assert_eq!(subscribed["recovered"], false, "{subscribed}");
        other.expect_event("acl:1", 2);
        other.expect_event("acl:1", 3);
        subscribed["epoch"].clone()
    };
    let mut resumed = a.ws_path(&path);
    resumed.send(
        json!({"type": "subscribe", "channel": "acl:1", "since": {"seq": 1, "epoch": epoch}}),
    );
    assert_eq!(resumed.recv()["recovered"], true);
    resumed.expect_event("acl:1", 2);
    let reply = a.publish(&json!({"id": 9, "broadcast": true, "data": "all"}));
    assert_eq!(reply["ok"], true, "{reply}");
    let metrics = http_get(a.port, "/metrics").unwrap();
    assert!(metrics.contains("sidecast_redis_up 1"), "{metrics}");
    // Nothing was refused for want of a permission.
    let denied = redis.command(&["ACL", "LOG"]).unwrap();
    assert!(denied.starts_with("*0"), "ACL LOG: {denied}");
}
