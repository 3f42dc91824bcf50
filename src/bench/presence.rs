//! `sidecast bench presence`: N pages join one presence channel at once (spread over one or
//! two nodes), and each follows the member list as sidecast.js does (the snapshot after
//! `subscribed`, then each `presence_diff` newer than it). Reported: how long until every
//! page lists all N, counted from the last page's `subscribed`; the presence messages and
//! bytes the pages read in all and per page (O(pages) is the goal, not O(pages²)); the
//! servers' CPU.
//!
//! Invariants: bounded (a connect deadline and a deadline for the lists); a page's count is
//! its snapshot's members plus the joins of newer diffs, which in a mass join without leaves
//! is the length of its list.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use super::conn::{BenchConn, Inflate, Seen, Transport};
use super::probe;

/// The channel every page joins.
pub const CHANNEL: &str = "bench:presence";
/// Connection attempts in flight at once.
const CONNECT_WINDOW: usize = 256;
/// How long the joins, and then the lists, may take at most.
const DEADLINE: Duration = Duration::from_secs(60);

/// What a presence run measured.
#[derive(Debug, Serialize)]
pub struct PresenceReport {
    /// Pages.
    pub connections: usize,
    /// Nodes they were spread over.
    pub nodes: usize,
    /// From the first connection attempt to the last page's `subscribed`, in ms.
    pub join_ms: f64,
    /// From the last page's `subscribed` until every page listed every page, in ms (`None`:
    /// not within the deadline).
    pub full_list_after_last_join_ms: Option<f64>,
    /// Pages that listed everyone.
    pub pages_complete: usize,
    /// Presence messages (snapshots and diffs) the pages read.
    pub messages: u64,
    /// Of them, per page.
    pub messages_per_page: f64,
    /// Bytes the pages read (presence messages mostly).
    pub bytes: u64,
    /// The servers' CPU time over the run, in seconds.
    pub server_cpu_s: Option<f64>,
    /// Pages that failed (connection refused or closed).
    pub failed: usize,
}

impl PresenceReport {
    /// The report as text.
    pub fn render(&self) -> String {
        let full = self
            .full_list_after_last_join_ms
            .map_or("not within 60 s".into(), |ms| format!("{ms:.0} ms"));
        let cpu = self
            .server_cpu_s
            .map_or(String::new(), |s| format!(", server CPU {s:.2} s"));
        format!(
            "presence: {} pages on {} node(s) joined in {:.0} ms; every page listed all {} \
             {} after the last join ({} complete); {} presence messages ({:.1} per page), \
             {:.1} MB read{cpu}; {} failed\n",
            self.connections,
            self.nodes,
            self.join_ms,
            self.connections,
            full,
            self.pages_complete,
            self.messages,
            self.messages_per_page,
            self.bytes as f64 / 1e6,
            self.failed,
        )
    }
}

/// One page's view of the list.
#[derive(Default, Clone, Copy)]
struct View {
    /// A snapshot came.
    listed: bool,
    version: u64,
    members: usize,
    /// It lists everyone.
    complete: bool,
}

/// Opens `connections` pages on `addrs` (round robin), each joining [`CHANNEL`], and follows
/// their lists until each has all of them. `pids`: the servers, for their CPU time.
///
/// # Errors
/// A node cannot be reached at all.
pub fn run(
    connections: usize,
    addrs: &[SocketAddr],
    pids: &[u32],
    progress: bool,
) -> io::Result<PresenceReport> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<BenchConn>> = Vec::with_capacity(connections);
    let mut views = vec![View::default(); connections];
    let mut buf = vec![0; 256 * 1024];
    let mut inflate = Inflate::default();
    let cpu =
        |pids: &[u32]| -> Option<u64> { pids.iter().map(|&pid| probe::cpu_ns(Some(pid))).sum() };
    let cpu_before = cpu(pids);
    let started = Instant::now();
    let (mut subscribed, mut failed, mut complete) = (0, 0, 0);
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut last_join: Option<Instant> = None;
    let mut all_listed: Option<Instant> = None;
    let mut shown = (usize::MAX, usize::MAX);
    while all_listed.is_none() && started.elapsed() < DEADLINE * 2 {
        while conns.len() < connections && conns.len() - subscribed - failed < CONNECT_WINDOW {
            let addr = addrs[conns.len() % addrs.len()];
            let mut socket = TcpStream::connect(addr)?;
            socket.set_nodelay(true)?;
            let token = Token(conns.len());
            poll.registry().register(
                &mut socket,
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let host = addr.to_string();
            let conn = BenchConn::new(socket, &host, 0, CHANNEL, Transport::WebSocket, false);
            conns.push(Some(conn));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in &events {
            let key = event.token().0;
            let Some(Some(conn)) = conns.get_mut(key) else {
                continue;
            };
            let view = &mut views[key];
            let mut seen = |seen: Seen| match seen {
                Seen::Subscribed(_) => {
                    subscribed += 1;
                    if subscribed == connections {
                        last_join = Some(Instant::now());
                    }
                }
                Seen::Presence {
                    snapshot,
                    version,
                    members,
                } => {
                    messages += 1;
                    if snapshot {
                        view.listed = true;
                        view.version = version;
                        view.members = members;
                    } else if view.listed && version > view.version {
                        view.version = version;
                        view.members += members;
                    }
                    if !view.complete && view.members >= connections {
                        view.complete = true;
                        complete += 1;
                    }
                }
                Seen::Acked(_) | Seen::Event { .. } => {}
            };
            let result = conn
                .flush()
                .and_then(|()| conn.on_readable(&mut buf, &mut inflate, &mut seen));
            match result {
                Ok(read) => bytes += read as u64,
                Err(e) => {
                    failed += 1;
                    log::warn!("page {key}: {e:?}");
                    conns[key] = None;
                }
            }
        }
        if complete + failed >= connections {
            all_listed = Some(Instant::now());
        }
        if progress && shown != (subscribed, complete) {
            shown = (subscribed, complete);
            eprint!("\r  {subscribed}/{connections} joined, {complete} list everyone   ");
        }
        if last_join.is_none() && started.elapsed() > DEADLINE {
            break;
        }
    }
    if progress {
        eprintln!();
    }
    let cpu_after = cpu(pids);
    let join_ms = last_join.map_or(f64::NAN, |t| (t - started).as_secs_f64() * 1000.0);
    Ok(PresenceReport {
        connections,
        nodes: addrs.len(),
        join_ms,
        full_list_after_last_join_ms: last_join
            .zip(all_listed.filter(|_| complete == connections))
            .map(|(joined, listed)| {
                listed.saturating_duration_since(joined).as_secs_f64() * 1000.0
            }),
        pages_complete: complete,
        messages,
        messages_per_page: messages as f64 / connections.max(1) as f64,
        bytes,
        server_cpu_s: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| (after - before) as f64 / 1e9),
        failed,
    })
}
