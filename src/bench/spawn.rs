//! Starting a sidecast server for a benchmark run, optionally pinned to one CPU with
//! `taskset`, and stopping it with SIGTERM when done; and, for the cross-node runs, a
//! `redis-server` for the nodes to share.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// SIGTERM, and wait for the exit.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Polls `ready` every 20 ms for 10 s at most.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > deadline {
            let message = format!("{what} never answered");
            return Err(io::Error::new(io::ErrorKind::TimedOut, message));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A command running `program`, pinned to `cpu` with `taskset` when one is given.
fn pinned(cpu: Option<usize>, program: &std::ffi::OsStr) -> Command {
    match cpu {
        Some(cpu) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &cpu.to_string()]).arg(program);
            taskset
        }
        None => Command::new(program),
    }
}

/// A `sidecast serve` child process; SIGTERM and wait on drop.
pub struct SpawnedServer {
    child: Child,
}

impl SpawnedServer {
    /// Starts `exe serve` on `addr` and `socket` and waits until the publish socket answers.
    ///
    /// # Errors
    /// The process cannot start, or its socket does not answer within 10 s.
    pub fn start(
        exe: &Path,
        addr: SocketAddr,
        socket: &Path,
        cpu: Option<usize>,
        max_connections: usize,
        extra: &[String],
    ) -> io::Result<SpawnedServer> {
        let mut command = pinned(cpu, exe.as_os_str());
        // Pings would only add noise to a bounded run.
        let child = command
            .args([
                "serve",
                "--log-level",
                "warn",
                "--heartbeat-interval",
                "10m",
                "--heartbeat-timeout",
                "20m",
            ])
            .args([
                "--listen",
                &addr.to_string(),
                "--max-connections",
                &max_connections.to_string(),
            ])
            .arg("--publish-socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()?;
        let server = SpawnedServer { child };
        wait_until("the spawned server", || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        })?;
        Ok(server)
    }

    /// The server's pid (taskset execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// A `redis-server` without persistence on a free loopback port; SIGTERM and wait on drop.
pub struct SpawnedRedis {
    child: Child,
    /// Its URL, for `--redis-url`.
    pub url: String,
}

impl SpawnedRedis {
    /// Starts it, pinned to `cpu` when given, and waits until it answers.
    ///
    /// # Errors
    /// `redis-server` cannot start or does not answer within 10 s.
    pub fn start(cpu: Option<usize>) -> io::Result<SpawnedRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = pinned(cpu, "redis-server".as_ref());
        let child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stdin(Stdio::null())
            .spawn()?;
        let redis = SpawnedRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        wait_until("redis-server", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(redis)
    }
}

impl Drop for SpawnedRedis {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}
