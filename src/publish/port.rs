//! One connection on the publish port (the Unix socket, or the TCP `publish_listen`): either
//! newline-delimited JSON commands in, one reply line out per command that carries an `id`;
//! or HTTP/1.1 requests (see [`http`]), told apart by the first byte (a method
//! is upper-case letters, a command begins with `{`). The TCP listener speaks HTTP only.
//!
//! This module owns framing and the order of execution; [`command`] parses
//! and renders, the [`Sink`] (the fan-out) executes. It knows nothing of WebSockets.
//!
//! HTTP requests are served one at a time, in order: the next is not read until the
//! response to the previous one has left, so a connection holds at most one request (a head
//! of at most `max_header_size`, a body of at most `max_publish_line`) and one response.
//! The lines of a `POST /publish` body, and the events of a Dapr delivery, are executed under
//! the same per-pass budget as NDJSON lines.
//!
//! Invariants: lines are executed in the order received; the sink's budget is checked before
//! every line, and lines read but not executed wait for the next pass; a connection's own
//! buffer holds at most one partial line of at most `max_line` bytes plus the rest of one read
//! chunk, and keeps at most a few KiB of capacity once drained; a line longer than `max_line`
//! is refused and the connection closed, since the rest of the stream can no longer be framed
//! with confidence.

use std::io::{self, Read, Write};

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};

use super::command::{self, Outcome, Sink, error_reply};
use super::dapr;
use super::http::{self, Ask, Head, HttpRules};
use super::replies::{Lines, Replies, Reply, run_lines};
/// How a read pass over a publisher ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// The socket has no more data for now.
    Pending,
    /// The pass's fan-out budget is spent and the socket may hold more: call again next pass.
    Paused,
    /// Its unread replies reached `reply_backlog`: reading stops until the publisher reads
    /// them (its socket turns writable) and the socket may hold more.
    Backlogged,
    /// An HTTP request waits for the engine's answers: [`PublisherConn::complete`] resumes it.
    Waiting,
    /// The publisher closed its side; every line was executed.
    Finished,
    /// The stream broke (I/O error, or a line over the limit); close now, after flushing
    /// replies.
    Broken,
}

/// A publish-port socket.
pub enum Stream {
    /// On the Unix socket: NDJSON or HTTP.
    Unix(UnixStream),
    /// On `publish_listen`: HTTP only.
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a publish-port connection is judged by.
#[derive(Clone, Copy)]
pub struct PortRules<'a> {
    /// `max_publish_line`.
    pub max_line: usize,
    /// Unread reply bytes past which a line-mode publisher is not read until it reads them
    /// (half of `max_output_buffer`, past which it is closed), so a worker that pipelines
    /// faster than it reads is slowed down, not cut off.
    pub reply_backlog: usize,
    /// The HTTP side; its `key` applies to the TCP listener only.
    pub http: HttpRules<'a>,
}

/// How the bytes of a connection are framed, once its first byte decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Undecided,
    Lines,
    Http,
}

/// A request whose work goes on over passes, under the fan-out budget.
struct Job {
    head: Head,
    work: Work,
}

/// What a request's work is.
enum Work {
    /// The lines of a `POST /publish` body.
    Lines(Lines),
    /// The events of a Dapr delivery.
    Dapr {
        route: usize,
        body: serde_json::Value,
        progress: dapr::Progress,
    },
}

/// One publish-port connection.
pub struct PublisherConn {
    /// Serial number, for logs.
    pub serial: u64,
    socket: Stream,
    framing: Framing,
    job: Option<Job>,
    /// Bytes received and not yet executed: one partial line, or, when the fan-out budget ran
    /// out in the middle of a read, the lines after it. Usually empty.
    pending: Vec<u8>,
    /// `pending[..scanned]` holds no newline, so a search resumes there.
    scanned: usize,
    /// NDJSON replies behind one that awaits the engine; usually empty.
    replies: Replies,
    output: Vec<u8>,
    written: usize,
    /// Commands refused since the reactor last collected the count (for metrics).
    pub errors: u64,
    /// True once the publisher closed its side; remaining replies are being written.
    pub is_finished: bool,
}

/// Capacity a publisher's buffers may keep between reads; a burst that needed more gives it
/// back, so an idle publisher costs a few hundred bytes whatever it once sent.
const STEADY_CAPACITY: usize = 4 * 1024;

/// How far [`PublisherConn::execute_lines`] got.
struct Progress {
    /// Bytes executed (complete lines and their newlines).
    consumed: usize,
    /// The sink ran out of capacity before the last complete line.
    paused: bool,
}

impl Progress {
    /// How much of the `rest` left after the executed lines is known to hold no newline: all
    /// of it when the lines ran out, none when the budget did (more lines may follow).
    fn scanned(&self, rest: usize) -> usize {
        if self.paused { 0 } else { rest }
    }
}

/// A line longer than `max_publish_line`.
struct LineTooLong;

impl PublisherConn {
    /// A new connection.
    pub fn new(serial: u64, socket: Stream) -> PublisherConn {
        let framing = match socket {
            Stream::Unix(_) => Framing::Undecided,
            Stream::Tcp(_) => Framing::Http,
        };
        PublisherConn {
            serial,
            socket,
            framing,
            job: None,
            pending: Vec::new(),
            scanned: 0,
            replies: Replies::default(),
            output: Vec::new(),
            written: 0,
            errors: 0,
            is_finished: false,
        }
    }

    /// The socket, for (de)registration.
    pub fn socket(&mut self) -> &mut dyn Source {
        match &mut self.socket {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    /// Executes complete lines (or requests) in order until the socket would block or the
    /// sink's budget is spent. The budget is checked before every line, so a pass never
    /// executes more than its share; what was read but not executed waits in `pending` for
    /// the next pass. Reads go through `chunk`, a buffer the reactor shares between
    /// publishers.
    pub fn read_and_execute(
        &mut self,
        rules: &PortRules<'_>,
        chunk: &mut [u8],
        sink: &mut impl Sink,
    ) -> ReadStatus {
        if self.framing == Framing::Undecided {
            if !sink.has_capacity() {
                return ReadStatus::Paused;
            }
            if let Some(status) = self.decide(chunk) {
                return status;
            }
        }
        let status = match self.framing {
            Framing::Http => self.serve_http(rules, chunk, sink),
            _ => self.read_lines(rules, chunk, sink),
        };
        if self.pending.capacity() > STEADY_CAPACITY.max(2 * self.pending.len()) {
            self.pending
                .shrink_to(STEADY_CAPACITY.max(self.pending.len()));
        }
        status
    }

    fn read_lines(
        &mut self,
        rules: &PortRules<'_>,
        chunk: &mut [u8],
        sink: &mut impl Sink,
    ) -> ReadStatus {
        let max_line = rules.max_line;
        // Lines a spent budget left over from the previous pass go first.
        if !self.pending.is_empty() {
            let executed = self.execute_pending(max_line, sink);
            if let Some(status) = self.stop_after(executed, max_line) {
                return status;
            }
        }
        loop {
            if !sink.has_capacity() {
                return ReadStatus::Paused;
            }
            if self.queued() >= rules.reply_backlog {
                return ReadStatus::Backlogged;
            }
            match self.socket.read(chunk) {
                Ok(0) => {
                    let rest = std::mem::take(&mut self.pending);
                    if rest.len() > max_line {
                        return self.refuse_long_line(max_line);
                    }
                    if !rest.is_empty() {
                        self.execute(&rest, sink);
                    }
                    return ReadStatus::Finished;
                }
                Ok(n) => {
                    let executed = if self.pending.is_empty() {
                        // The common case: execute straight from the shared chunk.
                        self.execute_fresh(&chunk[..n], max_line, sink)
                    } else {
                        self.pending.extend_from_slice(&chunk[..n]);
                        self.execute_pending(max_line, sink)
                    };
                    if let Some(status) = self.stop_after(executed, max_line) {
                        return status;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStatus::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("publisher={}: read failed: {e}", self.serial);
                    return ReadStatus::Broken;
                }
            }
        }
    }

    /// What a batch of executed lines means for the read: stop (paused, or a line too long),
    /// or read on.
    fn stop_after(
        &mut self,
        executed: Result<Progress, LineTooLong>,
        max_line: usize,
    ) -> Option<ReadStatus> {
        match executed {
            Ok(progress) if progress.paused => Some(ReadStatus::Paused),
            Ok(_) => None,
            Err(LineTooLong) => Some(self.refuse_long_line(max_line)),
        }
    }

    /// Executes the complete lines of a fresh read while `pending` is empty, and keeps what
    /// follows them.
    fn execute_fresh(
        &mut self,
        fresh: &[u8],
        max_line: usize,
        sink: &mut impl Sink,
    ) -> Result<Progress, LineTooLong> {
        let progress = self.execute_lines(fresh, 0, max_line, sink)?;
        let rest = &fresh[progress.consumed..];
        self.pending.extend_from_slice(rest);
        self.scanned = progress.scanned(rest.len());
        Ok(progress)
    }

    /// Executes the complete lines in `pending`, keeping the rest.
    fn execute_pending(
        &mut self,
        max_line: usize,
        sink: &mut impl Sink,
    ) -> Result<Progress, LineTooLong> {
        let mut pending = std::mem::take(&mut self.pending);
        let progress = self.execute_lines(&pending, self.scanned, max_line, sink)?;
        pending.drain(..progress.consumed);
        self.scanned = progress.scanned(pending.len());
        self.pending = pending;
        Ok(progress)
    }

    /// Executes the complete lines of `bytes` in order while the sink has capacity; no newline
    /// lies before `search_from`. Refuses a line over `max_line`, complete or not.
    fn execute_lines(
        &mut self,
        bytes: &[u8],
        search_from: usize,
        max_line: usize,
        sink: &mut impl Sink,
    ) -> Result<Progress, LineTooLong> {
        let mut consumed = 0;
        let mut search_from = search_from;
        while let Some(pos) = bytes[search_from..].iter().position(|&b| b == b'\n') {
            if !sink.has_capacity() {
                return Ok(Progress {
                    consumed,
                    paused: true,
                });
            }
            let end = search_from + pos;
            if end - consumed > max_line {
                return Err(LineTooLong);
            }
            self.execute(&bytes[consumed..end], sink);
            consumed = end + 1;
            search_from = consumed;
        }
        // What is left is one partial line: it may not already be too long.
        if bytes.len() - consumed > max_line {
            return Err(LineTooLong);
        }
        Ok(Progress {
            consumed,
            paused: false,
        })
    }

    fn execute(&mut self, line: &[u8], sink: &mut impl Sink) {
        let Some(executed) = command::execute(line, sink) else {
            return;
        };
        self.replies.push(executed);
        self.emit_ready();
    }

    /// Sends the NDJSON replies that are ready, in order, up to the first that waits; a
    /// failure nobody asked about (no id) is logged instead.
    fn emit_ready(&mut self) {
        for Reply { line, ok, wanted } in self.replies.take_ready() {
            if !ok {
                self.errors += 1;
            }
            if wanted {
                self.output.extend_from_slice(line.as_bytes());
            } else if !ok {
                log::warn!("publisher={}: {}", self.serial, line.trim_end());
            }
        }
    }

    /// The engine answered `ticket`, a command of this connection: its reply takes its place
    /// (and an HTTP request whose last answer this was can be responded to).
    pub fn complete(&mut self, ticket: u64, outcome: &Outcome) {
        if let Some(job) = &mut self.job {
            let done = match &mut job.work {
                Work::Lines(lines) => lines.replies.complete(ticket, outcome),
                Work::Dapr { progress, .. } => {
                    progress.complete(ticket, matches!(outcome, Outcome::Done(_)))
                }
            };
            if done {
                return;
            }
        }
        if self.replies.complete(ticket, outcome) {
            self.emit_ready();
        }
    }

    /// The ack report for this connection's publish with id `id`: in an HTTP response, the
    /// place kept for it; on the socket, a line of its own after the replies already due.
    pub fn report(&mut self, id: &str, line: String) {
        if let Some(Job {
            work: Work::Lines(lines),
            ..
        }) = &mut self.job
            && lines.replies.fill_report(id, &line)
        {
            return;
        }
        self.replies.push_line(line);
        self.emit_ready();
    }

    /// Some command still awaits the engine's answer.
    pub fn is_awaiting(&self) -> bool {
        self.replies.is_waiting()
            || self.job.as_ref().is_some_and(|job| match &job.work {
                Work::Lines(lines) => lines.replies.is_waiting(),
                Work::Dapr { progress, .. } => progress.is_waiting(),
            })
    }

    /// Refuses a line over `max_line`: the rest of the stream can no longer be framed with
    /// confidence, so the connection ends after this error reply.
    fn refuse_long_line(&mut self, max_line: usize) -> ReadStatus {
        self.errors += 1;
        let message = format!("line longer than max_publish_line ({max_line} bytes); closing");
        log::warn!("publisher={}: {message}", self.serial);
        self.output
            .extend_from_slice(error_reply(None, &message).as_bytes());
        self.pending = Vec::new();
        ReadStatus::Broken
    }

    /// Reads the first bytes and decides the framing by the first one; `Some` when there is
    /// nothing to frame yet.
    fn decide(&mut self, chunk: &mut [u8]) -> Option<ReadStatus> {
        match self.read_some(chunk) {
            Ok(0) => return Some(ReadStatus::Finished),
            Ok(_) => {}
            Err(status) => return Some(status),
        }
        self.framing = match http::looks_like_http(&self.pending) {
            Some(true) => Framing::Http,
            _ => Framing::Lines,
        };
        None
    }

    /// One read into `pending`: the bytes read, 0 at the end of the stream.
    fn read_some(&mut self, chunk: &mut [u8]) -> Result<usize, ReadStatus> {
        loop {
            match self.socket.read(chunk) {
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(ReadStatus::Pending);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("publisher={}: read failed: {e}", self.serial);
                    return Err(ReadStatus::Broken);
                }
            }
        }
    }

    /// Serves HTTP requests one at a time: reads a head and its body, executes, queues the
    /// response, and returns so the response can leave before the next request is read.
    fn serve_http(
        &mut self,
        rules: &PortRules<'_>,
        chunk: &mut [u8],
        sink: &mut impl Sink,
    ) -> ReadStatus {
        if self.queued() > 0 {
            return ReadStatus::Pending; // the previous response first; WRITABLE calls again
        }
        // The key guards the TCP listener; the Unix socket's file mode guards the other.
        let http = HttpRules {
            key: match self.socket {
                Stream::Tcp(_) => rules.http.key,
                Stream::Unix(_) => None,
            },
            ..rules.http
        };
        loop {
            if let Some(job) = &mut self.job {
                let done = match &mut job.work {
                    Work::Lines(lines) => {
                        let start = job.head.head_len;
                        let body = &self.pending[start..start + job.head.body_len];
                        let executed = run_lines(lines, body, sink);
                        if executed && lines.replies.is_waiting() {
                            return ReadStatus::Waiting;
                        }
                        executed.then(|| {
                            let (body, failed) = lines.render();
                            self.errors += failed as u64;
                            let (status, content_type) = lines.status(failed);
                            (status, content_type, body)
                        })
                    }
                    Work::Dapr {
                        route,
                        body,
                        progress,
                    } => http
                        .dapr
                        .step(*route, body, progress, sink)
                        .map(|answer| ("200 OK", "application/json", answer)),
                };
                let Some((status, content_type, body)) = done else {
                    return if self.is_awaiting() {
                        ReadStatus::Waiting
                    } else {
                        ReadStatus::Paused
                    };
                };
                let head = self.job.take().expect("a job").head;
                return self.respond(head, status, content_type, &body);
            }
            let head = match http::parse_head(&self.pending, &http) {
                Ok(Some(head)) if self.pending.len() >= head.head_len + head.body_len => head,
                Ok(_) => match self.read_some(chunk) {
                    Ok(0) => return ReadStatus::Finished,
                    Ok(_) => continue,
                    Err(status) => return status,
                },
                Err(reject) => {
                    self.errors += 1;
                    let whole = reject.keep_alive && self.pending.len() >= reject.skip;
                    self.output.extend_from_slice(
                        &http::Reject {
                            keep_alive: whole,
                            ..reject.clone()
                        }
                        .response(),
                    );
                    if !whole {
                        self.pending = Vec::new();
                        return ReadStatus::Finished;
                    }
                    self.pending.drain(..reject.skip);
                    return ReadStatus::Paused;
                }
            };
            match head.ask {
                Ask::Publish => {
                    self.job = Some(Job {
                        head,
                        work: Work::Lines(Lines::default()),
                    });
                }
                Ask::DaprSubscribe => {
                    let body = http.dapr.subscribe_json();
                    return self.respond(head, "200 OK", "application/json", &body);
                }
                Ask::DaprEvent(route) => {
                    let body = &self.pending[head.head_len..head.head_len + head.body_len];
                    match serde_json::from_slice(body) {
                        Ok(body) => {
                            let progress = dapr::Progress::default();
                            let work = Work::Dapr {
                                route,
                                body,
                                progress,
                            };
                            self.job = Some(Job { head, work });
                        }
                        Err(e) => {
                            log::warn!(
                                "publisher={}: dapr: dropped a body that is not JSON: {e}",
                                self.serial
                            );
                            let drop = "{\"status\":\"DROP\"}";
                            return self.respond(head, "200 OK", "application/json", drop);
                        }
                    }
                }
            }
        }
    }

    /// Queues the response to the request `head` describes and forgets the request.
    fn respond(&mut self, head: Head, status: &str, content_type: &str, body: &str) -> ReadStatus {
        let response = crate::base::http::message(status, "", content_type, body, head.keep_alive);
        self.output.extend_from_slice(&response);
        self.pending.drain(..head.head_len + head.body_len);
        if head.keep_alive {
            // The response leaves in this pass's flush; the next request is read after it.
            ReadStatus::Paused
        } else {
            ReadStatus::Finished
        }
    }
    /// Unsent reply bytes, those waiting behind a reply the engine has not given yet
    /// included.
    pub fn queued(&self) -> usize {
        self.output.len() - self.written + self.replies.bytes
    }

    /// Writes pending replies until done or the socket would block.
    ///
    /// # Errors
    /// A fatal socket error.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.socket.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.output.shrink_to(STEADY_CAPACITY);
            self.written = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::dapr::Dapr;
    use crate::publish::testing::Recorder;

    static NO_DAPR: std::sync::LazyLock<Dapr> = std::sync::LazyLock::new(Dapr::default);

    fn rules(max_line: usize) -> PortRules<'static> {
        PortRules {
            max_line,
            reply_backlog: usize::MAX,
            http: HttpRules {
                max_head: 1024,
                max_body: max_line,
                key: None,
                dapr: &NO_DAPR,
            },
        }
    }

    #[test]
    fn a_spent_budget_pauses_before_the_next_line_and_the_next_pass_resumes_in_order() {
        let (server_side, mut worker) = UnixStream::pair().unwrap();
        let mut publisher = PublisherConn::new(1, Stream::Unix(server_side));
        let mut chunk = vec![0; 64 * 1024];
        let mut sink = Recorder::new(0);
        assert_eq!(
            publisher.read_and_execute(&rules(1024), &mut chunk, &mut sink),
            ReadStatus::Paused
        );
        for n in 0..3 {
            worker
                .write_all(format!("{{\"channel\":\"a\",\"data\":{n}}}\n").as_bytes())
                .unwrap();
        }
        worker.write_all(b"{\"channel\":\"a\",").unwrap();
        // One read takes all three lines, but the budget allows one: the rest waits.
        sink.budget = 1;
        assert_eq!(
            publisher.read_and_execute(&rules(1024), &mut chunk, &mut sink),
            ReadStatus::Paused
        );
        assert_eq!(sink.data(), ["0"]);
        sink.budget = 1;
        assert_eq!(
            publisher.read_and_execute(&rules(1024), &mut chunk, &mut sink),
            ReadStatus::Paused
        );
        assert_eq!(sink.data(), ["0", "1"]);
        worker.write_all(b"\"data\":3}\n").unwrap();
        sink.budget = 10;
        assert_eq!(
            publisher.read_and_execute(&rules(1024), &mut chunk, &mut sink),
            ReadStatus::Pending
        );
        assert_eq!(sink.data(), ["0", "1", "2", "3"]);
        drop(worker);
        assert_eq!(
            publisher.read_and_execute(&rules(1024), &mut chunk, &mut sink),
            ReadStatus::Finished
        );
    }

    #[test]
    fn a_drained_publisher_gives_back_the_capacity_of_a_burst() {
        let (server_side, mut worker) = UnixStream::pair().unwrap();
        let mut publisher = PublisherConn::new(1, Stream::Unix(server_side));
        let mut chunk = vec![0; 64 * 1024];
        let mut sink = Recorder::new(usize::MAX);
        // A 200 KiB line arrives in pieces, so it passes through `pending`.
        let line = format!(
            "{{\"channel\":\"a\",\"data\":\"{}\"}}\n",
            "x".repeat(200 * 1024)
        );
        for piece in line.as_bytes().chunks(16 * 1024) {
            worker.write_all(piece).unwrap();
            publisher.read_and_execute(&rules(1024 * 1024), &mut chunk, &mut sink);
        }
        assert_eq!(sink.published.len(), 1);
        assert!(publisher.pending.is_empty());
        assert!(
            publisher.pending.capacity() <= STEADY_CAPACITY,
            "{} bytes kept",
            publisher.pending.capacity()
        );
    }
}
