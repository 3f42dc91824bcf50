//! Real Redis for the Redis engine's tests: `redis-server` processes on ephemeral ports in
//! temp dirs, a Redis Cluster of three masters made with `redis-cli --cluster create`, and
//! sidecast nodes as child processes (so a test can SIGKILL one). Everything is stopped by
//! PID on drop.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{PATIENCE, RawPublisher, Ws};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port for a cluster node: free, with its cluster bus port (+10000) free and valid too
/// (an ephemeral port above 55535 would put the bus past 65535, and redis-server would not
/// start).
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// Polls `condition` until it holds, for `patience` at most.
#[track_caller]
pub fn wait_for(what: &str, patience: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone Redis with its data in `dir` (AOF with `appendfsync always`, so what it
    /// acknowledged survives a SIGKILL).
    pub fn start(dir: &Path) -> RedisServer {
        RedisServer::start_with(dir, &[])
    }

    /// Like `start`, with extra `redis-server` arguments.
    pub fn start_with(dir: &Path, extra: &[&str]) -> RedisServer {
        std::fs::create_dir_all(dir).unwrap();
        let cluster = extra.contains(&"--cluster-enabled");
        let mut server = RedisServer {
            port: if cluster {
                free_cluster_port()
            } else {
                free_port()
            },
            dir: dir.to_path_buf(),
            extra: extra.iter().map(ToString::to_string).collect(),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and dir (after `kill`), and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(&self.extra)
            .args(["--logfile", self.dir.join("redis.log").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (tests/run installs it)");
        self.child = Some(child);
        let port = self.port;
        let deadline = Instant::now() + PATIENCE;
        // With requirepass, NOAUTH is an answer too.
        while !command(port, &["PING"])
            .is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
        {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                panic!("redis-server on port {port} does not answer PING; its log ends: {tail:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a Redis that hangs, then comes back.
    pub fn set_running(&self, running: bool) {
        set_running(self.child.as_ref().expect("running"), running);
    }

    /// Deletes its data files, so the next `restart` is an empty Redis.
    pub fn wipe(&self) {
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            } else if path.file_name().is_some_and(|n| n != "nodes.conf") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    /// Runs one command and returns the raw RESP2 reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command(self.port, args)
    }

    /// A connection subscribed (`SSUBSCRIBE`) to `shard_channel`, once Redis confirmed it.
    pub fn subscriber(&self, shard_channel: &str) -> Subscriber {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let request = format!(
            "*2\r\n$10\r\nSSUBSCRIBE\r\n${}\r\n{shard_channel}\r\n",
            shard_channel.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut subscriber = Subscriber {
            stream,
            seen: String::new(),
        };
        subscriber.next_message(|line| line == shard_channel);
        subscriber
    }
}

/// A raw RESP2 subscription: the lines Redis sends on it.
pub struct Subscriber {
    stream: TcpStream,
    seen: String,
}

impl Subscriber {
    /// Reads until a line that `matches` arrives, and returns it (and forgets what came
    /// before it).
    #[track_caller]
    pub fn next_message(&mut self, matches: impl Fn(&str) -> bool) -> String {
        loop {
            if let Some(at) = self.seen.find("\r\n") {
                let line: String = self.seen.drain(..at + 2).collect();
                let line = line.trim_end();
                if matches(line) {
                    return line.to_string();
                }
                continue;
            }
            let mut buffer = [0; 4096];
            let n = self
                .stream
                .read(&mut buffer)
                .expect("a message within PATIENCE");
            assert!(n > 0, "Redis closed the subscription");
            self.seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGSTOP (`false`) or SIGCONT (`true`) to `child`.
fn set_running(child: &Child, running: bool) {
    let signal = if running { "-CONT" } else { "-STOP" };
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Sends one command in RESP2 to `port` and returns the raw reply read in one go.
pub fn command(port: u16, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = vec![0; 64 * 1024];
    let n = stream.read(&mut reply).ok()?;
    Some(String::from_utf8_lossy(&reply[..n]).into_owned())
}

/// The whole response to `GET path` on a loopback port (`None` while nothing answers).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// A Redis Cluster: three masters, slots spread by `redis-cli --cluster create`, each with
/// `replicas` replicas (ready for a failover when the call returns).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(dir: &Path) -> RedisCluster {
        RedisCluster::start_with_replicas(dir, 0)
    }

    pub fn start_with_replicas(dir: &Path, replicas: usize) -> RedisCluster {
        RedisCluster::start_with_args(dir, replicas, |_| Vec::new())
    }

    /// Like `start_with_replicas`, node `i` started with `args(i)` besides.
    pub fn start_with_args(
        dir: &Path,
        replicas: usize,
        args: impl Fn(usize) -> Vec<String>,
    ) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|i| {
                let mut all = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
                let extra = args(i);
                all.extend(extra.iter().map(String::as_str));
                RedisServer::start_with(&dir.join(format!("node{i}")), &all)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs (apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create");
        for node in &nodes {
            wait_for("the cluster is ok", Duration::from_secs(30), || {
                node.command(&["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            });
            wait_for("every replica is in sync", Duration::from_secs(30), || {
                node.command(&["INFO", "replication"]).is_some_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
            });
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node serving `slot`, as the first node still running says.
    pub fn owner_of(&self, slot: u16) -> usize {
        let reply = self
            .nodes
            .iter()
            .find_map(|n| {
                n.child
                    .as_ref()
                    .and_then(|_| n.command(&["CLUSTER", "SLOTS"]))
            })
            .expect("a node answers");
        // Each range is `*N :start :end *M $len host :port ...`: find ours.
        let numbers: Vec<i64> = reply
            .split("\r\n")
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|n| n.parse().ok())
            .collect();
        for window in numbers.windows(3) {
            if let [start, end, port] = window
                && (*start..=*end).contains(&i64::from(slot))
                && let Some(i) = self.nodes.iter().position(|n| i64::from(n.port) == *port)
            {
                return i;
            }
        }
        panic!("no owner for slot {slot} in {reply}");
    }

    /// The node id of node `i`.
    pub fn id_of(&self, i: usize) -> String {
        let reply = self.nodes[i].command(&["CLUSTER", "MYID"]).unwrap();
        reply.lines().nth(1).unwrap().to_string()
    }
}

/// Two sidecast nodes over one standalone Redis, all stopped on drop (nodes first).
pub struct TwoNodes {
    pub a: Node,
    pub b: Node,
    pub redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl TwoNodes {
    /// A fresh Redis in a temp dir, and two nodes on it with `flags`.
    pub fn start(flags: &[&str]) -> TwoNodes {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start(dir.path());
        let urls = [redis.url()];
        let (a, b) = (Node::start(&urls, flags), Node::start(&urls, flags));
        TwoNodes {
            a,
            b,
            redis,
            _dir: dir,
        }
    }
}

/// A primary, its replica and three Sentinels (quorum 2) watching it as `mymaster`, each
/// Sentinel a `redis-server --sentinel` with its own config file (Sentinels rewrite it).
pub struct SentinelSetup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Child>,
    pub sentinel_ports: Vec<u16>,
}

impl SentinelSetup {
    /// Starts all five and waits until every Sentinel knows the replica and the other two.
    pub fn start(dir: &Path) -> SentinelSetup {
        // Without the delay Redis gives other replicas to join a sync (5 s).
        let primary =
            RedisServer::start_with(&dir.join("primary"), &["--repl-diskless-sync-delay", "0"]);
        let port = primary.port.to_string();
        let replica =
            RedisServer::start_with(&dir.join("replica"), &["--replicaof", "127.0.0.1", &port]);
        wait_for("the replica is in sync", PATIENCE, || {
            replica
                .command(&["INFO", "replication"])
                .is_some_and(|info| info.contains("master_link_status:up"))
        });
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let conf = "sentinel down-after-milliseconds mymaster 1000\n\
                        sentinel failover-timeout mymaster 10000\n";
            let (child, sentinel_port) =
                start_sentinel(&dir.join(format!("sentinel{i}")), primary.port, 2, conf);
            sentinels.push(child);
            sentinel_ports.push(sentinel_port);
        }
        for &sentinel in &sentinel_ports {
            wait_for(
                "each Sentinel knows the replica and the others",
                Duration::from_secs(30),
                || {
                    let known = |what: &str| {
                        command(sentinel, &["SENTINEL", what, "mymaster"])
                            .is_some_and(|r| r.starts_with('*') && !r.starts_with("*0"))
                    };
                    let others = command(sentinel, &["SENTINEL", "sentinels", "mymaster"]);
                    known("replicas") && others.is_some_and(|r| r.starts_with("*2"))
                },
            );
        }
        SentinelSetup {
            primary,
            replica,
            sentinels,
            sentinel_ports,
        }
    }

    /// The flags that point a node at these Sentinels.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = vec!["--redis-master-name".to_string(), "mymaster".into()];
        for port in &self.sentinel_ports {
            flags.extend(["--redis-sentinel".to_string(), format!("127.0.0.1:{port}")]);
        }
        flags
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `redis-server --sentinel` on a free port, watching the primary on `primary` as
/// `mymaster` with `quorum`, `extra` appended to its config file (which it rewrites, so it
/// lives in `dir`). Returns it and its port once it answers.
pub fn start_sentinel(dir: &Path, primary: u16, quorum: u8, extra: &str) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let conf = dir.join("sentinel.conf");
    let base = format!(
        "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {primary} {quorum}\n",
        dir.display()
    );
    std::fs::write(&conf, base + extra).unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .args(["--logfile", dir.join("sentinel.log").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs as a Sentinel");
    wait_for("the Sentinel answers", PATIENCE, || {
        command(port, &["PING"]).is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
    });
    (child, port)
}

/// A sidecast node in its own process.
pub struct Node {
    pub port: u16,
    pub socket: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// `sidecast serve --engine redis` against `urls`, with extra flags; waits for /health.
    pub fn start(urls: &[String], extra: &[&str]) -> Node {
        Node::start_on(free_port(), urls, extra)
    }

    /// The same on `port`, which other nodes may share (`--reuse-port`): waits for /health on
    /// the port and for this node's own publish socket.
    pub fn start_on(port: u16, urls: &[String], extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sidecast.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidecast"));
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--publish-socket", socket.to_str().unwrap()])
            .args(["--engine", "redis", "--log-level", "warn"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for url in urls {
            command.args(["--redis-url", url]);
        }
        let child = command.spawn().unwrap();
        let node = Node {
            port,
            socket,
            child: Some(child),
            _dir: dir,
        };
        wait_for("the node is healthy", PATIENCE, || {
            node.health().is_some_and(|h| h["status"] == "ok")
                && std::os::unix::net::UnixStream::connect(&node.socket).is_ok()
        });
        node
    }

    /// The `/health` document (`None` while it does not answer).
    pub fn health(&self) -> Option<Value> {
        let response = http_get(self.port, "/health")?;
        serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
    }

    /// A WebSocket client that received `connected`.
    #[track_caller]
    pub fn ws(&self) -> Ws {
        self.ws_path("/ws")
    }

    /// A client on `path` (e.g. with `?token=`), after `connected`.
    #[track_caller]
    pub fn ws_path(&self, path: &str) -> Ws {
        let mut ws = self.ws_raw(path);
        let connected = ws.recv();
        assert_eq!(connected["type"], "connected", "{connected}");
        ws
    }

    /// A client right after the upgrade.
    #[track_caller]
    pub fn ws_raw(&self, path: &str) -> Ws {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let url = format!("ws://127.0.0.1:{}{path}", self.port);
        let (ws, _) = tungstenite::client(url, stream).unwrap();
        Ws(ws)
    }

    pub fn publisher(&self) -> RawPublisher {
        RawPublisher::connect(&self.socket)
    }

    /// Publishes one command (with an id) and returns the reply.
    #[track_caller]
    pub fn publish(&self, command: &Value) -> Value {
        let mut publisher = self.publisher();
        publisher.send(&command.to_string());
        publisher.reply()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a node held back, then let go.
    pub fn set_running(&self, running: bool) {
        set_running(self.child.as_ref().expect("running"), running);
    }

    /// One series of `/metrics` (0 when absent).
    pub fn metric(&self, series: &str) -> u64 {
        let response = http_get(self.port, "/metrics").unwrap_or_default();
        response
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM, then SIGKILL if it does not stop in time.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One page's record of its channels, checked as messages arrive: events come in seq order
/// with no duplicate, and every seq skipped is declared lost by a `gap` or by a resume that
/// was not recovered. Panics (with the page's last messages) on anything else.
#[derive(Default)]
pub struct Views {
    pub channels: HashMap<String, View>,
    /// Losses reported: `gap` messages and resumes that were not recovered.
    pub gaps: u64,
    log: VecDeque<String>,
}

/// A page's view of one channel.
#[derive(Clone, Default)]
pub struct View {
    pub epoch: Value,
    pub seq: u64,
    /// The data of every event delivered in `epoch`, by seq.
    pub events: BTreeMap<u64, Value>,
    /// The seqs of `epoch` declared lost.
    pub lost: Vec<u64>,
}

impl View {
    /// Moves to `seq` of `epoch` without the events between: they are lost.
    fn skip_to(&mut self, epoch: &Value, seq: u64) {
        if *epoch != self.epoch {
            *self = View {
                epoch: epoch.clone(),
                ..View::default()
            };
        }
        self.lost.extend(self.seq + 1..=seq);
        self.seq = self.seq.max(seq);
    }
}

impl Views {
    /// Records a line of context, shown if a later check fails.
    pub fn note(&mut self, line: String) {
        self.log.push_back(line);
        if self.log.len() > 40 {
            self.log.pop_front();
        }
    }

    /// Applies one message from the server.
    #[track_caller]
    pub fn apply(&mut self, message: &Value) {
        self.note(message.to_string());
        let channel = message["channel"].as_str().unwrap_or_default().to_string();
        let seq = message["seq"].as_u64();
        match message["type"].as_str() {
            Some("subscribed") => {
                let view = self.channels.entry(channel).or_default();
                match message["recovered"].as_bool() {
                    Some(true) => {}
                    Some(false) => {
                        self.gaps += 1;
                        view.skip_to(&message["epoch"], seq.unwrap());
                    }
                    None => {
                        *view = View {
                            epoch: message["epoch"].clone(),
                            seq: seq.unwrap(),
                            ..View::default()
                        };
                    }
                }
            }
            Some("gap") => {
                self.gaps += 1;
                let view = self.channels.entry(channel).or_default();
                view.skip_to(&message["epoch"], seq.unwrap());
            }
            Some("event") => {
                let view = self
                    .channels
                    .get_mut(&channel)
                    .expect("an event on a subscribed channel");
                let seq = seq.unwrap();
                if seq != view.seq + 1 {
                    eprintln!("{}", Vec::from(self.log.clone()).join("\n"));
                    panic!("gap-free, duplicate-free, in order: {message}");
                }
                view.seq = seq;
                view.events.insert(seq, message["data"].clone());
            }
            _ => {}
        }
    }
}
