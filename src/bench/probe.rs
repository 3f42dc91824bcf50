//! What the bench reads about the server process, from `/proc` and `/metrics`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `/proc/<pid>/<file>`, or this process's with no pid.
fn proc_file(pid: Option<u32>, file: &str) -> Option<String> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    };
    std::fs::read_to_string(path).ok()
}

/// CPU time of a process (this one with no pid), in nanoseconds.
pub fn cpu_ns(pid: Option<u32>) -> Option<u64> {
    proc_file(pid, "schedstat").and_then(|s| s.split_whitespace().next()?.parse().ok())
}

/// Resident memory of a process (this one with no pid), in KiB.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = proc_file(pid, "status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The server's resident memory (KiB) and open descriptors, when its pid is known.
pub fn footprint(pid: Option<u32>) -> (Option<u64>, Option<usize>) {
    let Some(pid) = pid else {
        return (None, None);
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(Iterator::count);
    (rss_kib(Some(pid)), fds)
}

/// Adds the server's `sidecast_disconnects_total` counters to `into`.
pub fn add_disconnects(into: &mut BTreeMap<String, u64>, addr: SocketAddr) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("sidecast_disconnects_total{reason=\"") else {
            continue;
        };
        if let Some((reason, value)) = rest.split_once("\"} ")
            && let Ok(value) = value.parse::<u64>()
        {
            *into.entry(reason.to_string()).or_default() += value;
        }
    }
}
