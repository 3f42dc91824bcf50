//! The `sidecast` binary: graceful shutdown on a real SIGTERM, exit codes, `--help`,
//! `sidecast publish` and `sidecast config`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PATIENCE, RawPublisher, Ws};
use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;

const BIN: &str = env!("CARGO_BIN_EXE_sidecast");

/// The binary running `serve` on an ephemeral port.
struct Process {
    child: Child,
    addr: SocketAddr,
    socket: PathBuf,
    /// Every log line after the first, as the server writes them.
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Process {
    fn serve(extra: &[&str]) -> Process {
        Process::serve_with_env(extra, &[])
    }

    fn serve_with_env(extra: &[&str], env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sidecast.sock");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--publish-socket"])
            .arg(&socket)
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("SIDECAST_JWT_SECRET")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The first log line names the bound address.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let addr = line
            .split("ws://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        // Keep draining the log so the server never blocks on a full pipe.
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            addr,
            socket,
            log,
            _dir: dir,
        }
    }

    /// Waits until a log line contains `needle`, and returns every such line.
    #[track_caller]
    fn wait_for_log(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found: Vec<String> = self
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|line| line.contains(needle))
                .cloned()
                .collect();
            if !found.is_empty() {
                return found;
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ws(&self) -> Ws {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let (ws, _) = tungstenite::client(format!("ws://{}/ws", self.addr), stream).unwrap();
        let mut ws = Ws(ws);
        assert_eq!(ws.recv()["type"], "connected");
        ws
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
        assert!(status.unwrap().success());
    }

    /// Waits for the process to exit and returns its exit code.
    fn wait(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("exited, not killed");
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_delivers_received_lines_closes_every_client_with_1001_and_exits_0() {
    let mut server = Process::serve(&["--shutdown-timeout", "3s"]);
    let mut clients: Vec<Ws> = (0..3).map(|_| server.ws()).collect();
    for ws in &mut clients {
        ws.subscribe("jobs");
    }
    // A client that never answers the close handshake must not hold up the exit.
    let mut mute = server.ws();
    mute.subscribe("jobs");

    let mut publisher = RawPublisher::connect(&server.socket);
    for n in 1..=50 {
        publisher.send(&json!({"channel": "jobs", "data": n}).to_string());
    }
    // The lines are in the server's socket buffer; the signal must not lose them.
    server.signal("TERM");
    for ws in &mut clients {
        for seq in 1..=50 {
            assert_eq!(ws.expect_event("jobs", seq), seq);
        }
        let close = ws.expect_close();
        assert_eq!(
            (close.code, close.reason.as_str()),
            (CloseCode::Away, "server shutting down")
        );
    }
    assert_eq!(server.wait(Duration::from_secs(6)), 0);
    assert!(!server.socket.exists(), "the socket file is removed");
    drop(mute);
}

#[test]
fn sigint_also_shuts_down_gracefully() {
    let mut server = Process::serve(&[]);
    let mut ws = server.ws();
    server.signal("INT");
    assert_eq!(ws.expect_close().code, CloseCode::Away);
    assert_eq!(server.wait(PATIENCE), 0);
}

fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SIDECAST_JWT_SECRET")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap(), text)
}

#[test]
fn bad_configuration_exits_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecast.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nheartbeat_intervall = \"5s\"\n",
    )
    .unwrap();
    let (code, text) = run(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(text.contains("heartbeat_intervall"), "{text}");

    let (code, text) = run(&["serve", "--heartbeat-interval", "soon"]);
    assert_eq!(code, 2);
    assert!(text.contains("--heartbeat-interval"), "{text}");

    let (code, text) = run(&[
        "serve",
        "--heartbeat-interval",
        "30s",
        "--heartbeat-timeout",
        "5s",
    ]);
    assert_eq!(code, 2);
    assert!(text.contains("heartbeat_timeout"), "{text}");

    let (code, _) = run(&["serve", "--config", "/nonexistent/sidecast.toml"]);
    assert_eq!(code, 2);
}

#[test]
fn config_prints_every_default_and_checks_a_file() {
    let output = Command::new(BIN).arg("config").output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    for key in [
        "listen = \"127.0.0.1:3001\"",
        "heartbeat_interval = \"30s\"",
        "max_connections = 10000",
    ] {
        assert!(printed.contains(key), "{key} in {printed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecast.toml");
    std::fs::write(&file, &printed).unwrap();
    let (code, text) = run(&["config", "--check", file.to_str().unwrap()]);
    assert_eq!(code, 0, "the printed file is valid: {text}");
    std::fs::write(
        &file,
        printed.replace("max_connections = 10000", "max_connections = 0"),
    )
    .unwrap();
    let (code, text) = run(&["config", "--check", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(text.contains("max_connections"), "{text}");
}

#[test]
fn unusable_addresses_and_sockets_exit_1_with_a_clear_message() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let socket = socket.to_str().unwrap();
    let (code, text) = run(&["serve", "--listen", &addr, "--publish-socket", socket]);
    assert_eq!(code, 1);
    assert!(text.contains(&format!("cannot listen on {addr}")), "{text}");

    let live = Process::serve(&[]);
    let (code, text) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--publish-socket",
        live.socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        text.contains(live.socket.to_str().unwrap()) && text.contains("in use"),
        "{text}"
    );
}

#[test]
fn serve_help_lists_every_flag_with_its_default() {
    let (code, text) = run(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--listen",
        "--publish-socket",
        "--config",
        "--heartbeat-interval",
        "--heartbeat-timeout",
        "--handshake-timeout",
        "--shutdown-timeout",
        "--max-connections",
        "--max-message-size",
        "--max-subscriptions",
        "--max-output-buffer",
        "--log-level",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
    assert!(text.contains("[default: 127.0.0.1:3001]"));
}

fn publish_cli(socket: &Path, args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(["publish", "--socket", socket.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[test]
fn publish_with_ack_prints_the_report() {
    let server = Process::serve(&[]);
    let mut ws = server.ws();
    ws.subscribe("job:7");
    let (code, out) = publish_cli(&server.socket, &["--ack", "200ms", "job:7", "1"], "");
    assert_eq!(
        (code, out.trim()),
        (
            0,
            r#"{"type":"ack_report","seq":1,"delivered":1,"acked":0,"timedOut":1,"disconnected":0,"lost":0,"nodes":1,"nodesLost":0}"#
        )
    );
}

#[test]
fn publish_command_with_arguments_and_from_stdin() {
    let server = Process::serve(&[]);
    let mut ws = server.ws();
    ws.subscribe("project:42");
    let (code, out) = publish_cli(&server.socket, &["project:42", r#"{"progress":40}"#], "");
    assert_eq!(
        (code, out.trim()),
        (0, r#"{"ok":true,"seq":1,"delivered":1}"#)
    );
    assert_eq!(ws.expect_event("project:42", 1), json!({"progress": 40}));

    let lines = "{\"id\":1,\"channel\":\"project:42\",\"data\":2}\n{\"channel\":\"project:42\",\"data\":3}\n\
                 {\"id\":2,\"channel\":\"bad name\",\"data\":4}\n";
    let (code, out) = publish_cli(&server.socket, &[], lines);
    assert_eq!(code, 1, "a refused command makes the exit code non-zero");
    let replies: Vec<&str> = out.lines().collect();
    assert_eq!(replies[0], r#"{"id":1,"ok":true,"seq":2,"delivered":1}"#);
    assert!(replies[1].starts_with(r#"{"id":2,"ok":false"#), "{out}");
    assert_eq!(ws.expect_event("project:42", 2), 2);
    assert_eq!(ws.expect_event("project:42", 3), 3);

    let (code, _) = publish_cli(&server.socket, &["project:42", "{not json"], "");
    assert_eq!(code, 2);
}

#[test]
fn bench_refuses_to_guess_a_target_or_load_a_remote_one() {
    let (code, text) = run(&["bench", "latency"]);
    assert_eq!(code, 2);
    assert!(
        text.contains("--url") && text.contains("--socket"),
        "{text}"
    );
    let (code, text) = run(&[
        "bench",
        "latency",
        "--url",
        "ws://10.20.30.40:3001/ws",
        "--socket",
        "/tmp/x.sock",
    ]);
    assert_eq!(code, 2);
    assert!(
        text.contains("not a loopback address") && text.contains("--allow-remote"),
        "{text}"
    );
    let (code, text) = run(&[
        "bench",
        "latency",
        "--url",
        "http://127.0.0.1:3001/ws",
        "--socket",
        "/tmp/x.sock",
    ]);
    assert_eq!(code, 2);
    assert!(text.contains("ws://"), "{text}");
}

#[test]
fn the_jwt_secret_can_come_from_the_environment() {
    let server = Process::serve_with_env(
        &[],
        &[("SIDECAST_JWT_SECRET", "an-environment-secret-of-32-bytes!")],
    );
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{}/ws", server.addr), stream).unwrap();
    let close = Ws(ws).expect_close();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4001, "unauthorized")
    );
}

/// Issue 9, item 12: a page refused by the origin check retries forever; the operator learns
/// of it at the default log level, once per interval, with the setting that fixes it.
#[test]
fn refused_origins_are_logged_at_info_with_the_fix_and_rate_limited() {
    let server = Process::serve(&[]);
    for _ in 0..5 {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(
            stream,
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Origin: https://app.example.com\r\n\r\n",
            server.addr
        )
        .unwrap();
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    }
    let lines = server.wait_for_log("origin https://app.example.com");
    assert!(
        lines[0].contains("--allowed-origin https://app.example.com"),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 1, "five refusals, one line: {lines:?}");
}

/// Issue 9, item 15: a publish that cannot reach the socket says whether a server runs there.
#[test]
fn publish_explains_a_missing_or_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let stderr_of = |socket: &Path| {
        let output = Command::new(BIN)
            .args(["publish", "--socket", socket.to_str().unwrap(), "a", "1"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        String::from_utf8(output.stderr).unwrap()
    };
    let missing = dir.path().join("missing.sock");
    assert!(
        stderr_of(&missing).contains("is `sidecast serve` running"),
        "{}",
        stderr_of(&missing)
    );
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stderr_of(&stale).contains("no server listens on it"));
}
