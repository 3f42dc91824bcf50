//! A small blocking client for the publish port, for Rust workers and the `sidecast publish`
//! command. One connection; commands are sent in order and replies read in order.
//!
//! ```no_run
//! let mut publisher = sidecast::Publisher::connect("./sidecast.sock")?;
//! publisher.publish("project:42", &serde_json::json!({"progress": 40}))?;
//! let ack = publisher.publish_confirmed("project:42", &serde_json::json!({"progress": 50}))?;
//! println!("seq {} reached {:?} connections", ack.seq, ack.delivered);
//! // The pages confirm the job's end within 5 s; the report says how many did.
//! let done = serde_json::json!({"type": "job_complete"});
//! let report = publisher.publish_acked("job:7", &done, std::time::Duration::from_secs(5))?;
//! println!("{} of {} pages confirmed", report.acked, report.delivered);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A connection to a sidecast publish socket.
pub struct Publisher {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

/// The server's confirmation of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Ack {
    /// The event's sequence number in its channel.
    pub seq: u64,
    /// Connections the event was queued to (the memory engine).
    pub delivered: Option<usize>,
    /// Subscribed connections it was not queued to because they were too slow, and are being
    /// closed (the memory engine; 0 when none).
    pub skipped: usize,
    /// Nodes subscribed to the channel when Redis published it (the Redis engine).
    pub nodes: Option<usize>,
}

/// What became of an acknowledged event: the server's `ack_report` (docs/protocol.md,
/// "Acknowledged events"). `delivered = acked + timed_out + disconnected + lost`; for a retry
/// under an `idem` key whose first publish was already reported, `duplicate` is set and the
/// counts (not kept) are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AckReport {
    /// The event's sequence number in its channel.
    pub seq: u64,
    /// WebSockets it was queued to, on every node.
    pub delivered: usize,
    /// Of them, pages that acknowledged it.
    pub acked: usize,
    /// Pages still connected that did not answer in time.
    #[serde(rename = "timedOut")]
    pub timed_out: usize,
    /// Pages that closed without acking, and did not resume in time.
    pub disconnected: usize,
    /// Pages on nodes that said they delivered it and sent no final count (they died).
    pub lost: usize,
    /// Nodes it went to (1 with the memory engine).
    pub nodes: usize,
    /// Of them, nodes that sent no final count before the deadline.
    #[serde(rename = "nodesLost")]
    pub nodes_lost: usize,
    /// A retry of a publish already reported: nothing was published now.
    pub duplicate: bool,
}

/// Why a confirmed publish failed.
#[derive(Debug)]
pub enum PublishError {
    /// The socket failed or the server closed it.
    Io(io::Error),
    /// The server refused the command, with its reason.
    Refused(String),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Io(e) => write!(f, "publish socket: {e}"),
            PublishError::Refused(why) => write!(f, "publish refused: {why}"),
        }
    }
}

impl std::error::Error for PublishError {}

impl From<io::Error> for PublishError {
    fn from(e: io::Error) -> PublishError {
        PublishError::Io(e)
    }
}

#[derive(Serialize)]
struct Command<'a, T: ?Sized> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    channel: &'a str,
    data: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<AckTerms>,
}

#[derive(Serialize)]
struct AckTerms {
    timeout: String,
}

#[derive(Deserialize)]
struct Reply {
    id: Option<u64>,
    ok: bool,
    seq: Option<u64>,
    delivered: Option<usize>,
    #[serde(default)]
    skipped: usize,
    nodes: Option<usize>,
    error: Option<String>,
}

impl Publisher {
    /// Connects to the publish socket at `path`.
    ///
    /// # Errors
    /// The socket cannot be reached.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Publisher> {
        let writer = UnixStream::connect(path)?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Publisher {
            reader,
            writer,
            next_id: 0,
        })
    }

    /// Publishes `data` to `channel` without waiting: fire and forget.
    ///
    /// # Errors
    /// The socket failed.
    pub fn publish<T: Serialize + ?Sized>(&mut self, channel: &str, data: &T) -> io::Result<()> {
        self.send(&Command {
            id: None,
            channel,
            data,
            ack: None,
        })
    }

    /// Publishes `data` to `channel` and waits for the server's reply.
    ///
    /// # Errors
    /// The socket failed, or the server refused the command.
    pub fn publish_confirmed<T: Serialize + ?Sized>(
        &mut self,
        channel: &str,
        data: &T,
    ) -> Result<Ack, PublishError> {
        self.confirmed(channel, data, None)
    }

    /// Publishes `data` to `channel` asking the pages to acknowledge it within `timeout`,
    /// and waits for the reply, then for the report that follows it (at the latest after
    /// `timeout`).
    ///
    /// # Errors
    /// The socket failed, or the server refused the command.
    pub fn publish_acked<T: Serialize + ?Sized>(
        &mut self,
        channel: &str,
        data: &T,
        timeout: Duration,
    ) -> Result<AckReport, PublishError> {
        let terms = AckTerms {
            timeout: format!("{}ms", timeout.as_millis().max(1)),
        };
        self.confirmed(channel, data, Some(terms))?;
        let line = self.next_line()?;
        serde_json::from_str(&line)
            .map_err(|_| io::Error::other(format!("unexpected report: {line}")).into())
    }

    fn confirmed<T: Serialize + ?Sized>(
        &mut self,
        channel: &str,
        data: &T,
        ack: Option<AckTerms>,
    ) -> Result<Ack, PublishError> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&Command {
            id: Some(id),
            channel,
            data,
            ack,
        })?;
        let line = self.next_line()?;
        let reply: Reply = serde_json::from_str(&line).map_err(io::Error::other)?;
        match reply {
            Reply {
                id: Some(got),
                ok: true,
                seq: Some(seq),
                delivered,
                skipped,
                nodes,
                ..
            } if got == id => Ok(Ack {
                seq,
                delivered,
                skipped,
                nodes,
            }),
            Reply {
                ok: false, error, ..
            } => Err(PublishError::Refused(error.unwrap_or_default())),
            _ => Err(io::Error::other(format!("unexpected reply: {line}")).into()),
        }
    }

    /// Sends one raw command line (a newline is appended).
    ///
    /// # Errors
    /// The socket failed.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes)
    }

    fn next_line(&mut self) -> io::Result<String> {
        self.read_reply()?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }

    /// Reads the next reply line, without its newline; `None` once the server closed.
    ///
    /// # Errors
    /// The socket failed.
    pub fn read_reply(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let trimmed = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(trimmed);
        Ok(Some(line))
    }

    /// Tells the server no more commands follow; it answers the pending ones and closes.
    ///
    /// # Errors
    /// The socket failed.
    pub fn finish(&mut self) -> io::Result<()> {
        self.writer.shutdown(Shutdown::Write)
    }

    fn send<T: Serialize + ?Sized>(&mut self, command: &Command<'_, T>) -> io::Result<()> {
        let mut line = serde_json::to_vec(command).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)
    }
}
