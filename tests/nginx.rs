//! sidecast behind a real nginx (Debian's), configured with `docs/deploy/nginx.conf` as
//! documented: a WebSocket and a Server-Sent Events stream through it, each event on time,
//! heartbeats through an idle stream, a resume by `Last-Event-ID`, and an access log that
//! never holds the token from a query string.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};

use common::redis::{free_port, wait_for};
use common::sse::{Item, Sse};
use common::{PATIENCE, TestServer, Ws};
use serde_json::json;

const TOKEN: &str = "a-secret-token-in-the-query";

/// nginx in the foreground, one process, everything in a temp dir; killed on drop.
struct Nginx {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Runs the documented config in front of `upstream`.
    fn start(upstream: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root = env!("CARGO_MANIFEST_DIR");
        let documented = std::fs::read_to_string(format!("{root}/docs/deploy/nginx.conf")).unwrap();
        let log = dir.path().join("access.log");
        let replaced = [
            ("server 127.0.0.1:3001;", format!("server {upstream};")),
            ("listen 8080;", format!("listen 127.0.0.1:{port};")),
            (
                "/var/log/nginx/sidecast.access.log",
                log.display().to_string(),
            ),
        ];
        let mut site = documented.clone();
        for (from, to) in &replaced {
            assert!(
                site.contains(from),
                "docs/deploy/nginx.conf no longer has {from:?}"
            );
            site = site.replace(from, to);
        }
        std::fs::write(dir.path().join("sidecast.conf"), site).unwrap();
        let d = dir.path().display();
        let main = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             access_log off;\n  include {d}/sidecast.conf;\n}}\n"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, main).unwrap();
        // Debian puts it in /usr/sbin, which a user's PATH may not hold.
        let binary = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|b| !b.starts_with('/') || std::path::Path::new(b).exists())
            .unwrap();
        let child = Command::new(binary)
            .args(["-p", &d.to_string(), "-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx runs (Debian: apt-get install nginx; tests/run installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("nginx listens", PATIENCE, || {
            TcpStream::connect(addr).is_ok()
        });
        Nginx { addr, child, dir }
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn websockets_and_event_streams_pass_through_nginx_as_documented() {
    let server = TestServer::start_with(|c| {
        c.sse_heartbeat_interval = std::time::Duration::from_millis(100);
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    });
    let nginx = Nginx::start(server.addr);
    let mut publisher = server.publisher();
    let mut publish = |n: u64| {
        publisher.send(&json!({"id": n, "channel": "job:1", "data": n}).to_string());
        assert_eq!(publisher.reply()["ok"], true);
    };

    let stream = TcpStream::connect(nginx.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let url = format!("ws://{}/ws?token={TOKEN}", nginx.addr);
    let (ws, _) = tungstenite::client(url, stream).expect("the upgrade passes nginx");
    let mut ws = Ws(ws);
    assert_eq!(ws.recv()["type"], "connected");
    ws.subscribe("job:1");

    let path = format!("/sse?channels=job:1&token={TOKEN}");
    let mut sse = Sse::connect(nginx.addr, &path);
    assert!(sse.head.contains("text/event-stream"), "{}", sse.head);
    assert_eq!(sse.recv()["type"], "connected");
    assert_eq!(sse.recv()["type"], "subscribed");
    assert_eq!(
        sse.next_item(),
        Some(Item::Comment),
        "heartbeats come through"
    );

    publish(1);
    ws.expect_event("job:1", 1);
    sse.expect_event("job:1", 1);
    let id = sse.last_id.clone().unwrap();
    drop(sse);
    publish(2);
    ws.expect_event("job:1", 2);
    let mut back = Sse::open(nginx.addr, &path, &[("Last-Event-ID", id.as_str())]).unwrap();
    assert_eq!(back.recv()["type"], "connected");
    assert_eq!(back.recv()["recovered"], true);
    back.expect_event("job:1", 2);

    // nginx logs a request when it ends.
    ws.close_cleanly();
    drop(back);
    wait_for("nginx logged both", PATIENCE, || {
        let log = nginx.access_log();
        log.contains("\"GET /sse\" 200") && log.contains("\"GET /ws\" 101")
    });
    let log = nginx.access_log();
    assert!(
        !log.contains(TOKEN),
        "the token reached the access log:\n{log}"
    );
}
