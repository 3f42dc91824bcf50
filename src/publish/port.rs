//! One connection on the publish port (a Unix stream socket): newline-delimited JSON
//! commands in, one reply line out per command that carries an `id`.
//!
//! This module owns line framing and the order of execution; [`command`](super::command)
//! parses and renders, the [`Sink`] (the fan-out) executes. It knows nothing of WebSockets.
//!
//! Invariants: lines are executed in the order received; the sink's budget is checked before
//! every line, and lines read but not executed wait for the next pass; a connection's own
//! buffer holds at most one partial line of at most `max_line` bytes plus the rest of one read
//! chunk, and keeps at most a few KiB of capacity once drained; a line longer than `max_line`
//! is refused and the connection closed, since the rest of the stream can no longer be framed
//! with confidence.

use std::io::{self, Read, Write};

use mio::net::UnixStream;

use super::command::{Action, Command, Sink, error_reply, ok_reply, parse_command};
/// How a read pass over a publisher ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// The socket has no more data for now.
    Pending,
    /// The pass's fan-out budget is spent and the socket may hold more: call again next pass.
    Paused,
    /// The publisher closed its side; every line was executed.
    Finished,
    /// The stream broke (I/O error, or a line over the limit); close now, after flushing
    /// replies.
    Broken,
}

/// One publish-port connection.
pub struct PublisherConn {
    /// Serial number, for logs.
    pub serial: u64,
    socket: UnixStream,
    /// Bytes received and not yet executed: one partial line, or, when the fan-out budget ran
    /// out in the middle of a read, the lines after it. Usually empty.
    pending: Vec<u8>,
    /// `pending[..scanned]` holds no newline, so a search resumes there.
    scanned: usize,
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
    pub fn new(serial: u64, socket: UnixStream) -> PublisherConn {
        PublisherConn {
            serial,
            socket,
            pending: Vec::new(),
            scanned: 0,
            output: Vec::new(),
            written: 0,
            errors: 0,
            is_finished: false,
        }
    }

    /// The socket, for (de)registration.
    pub fn socket(&mut self) -> &mut UnixStream {
        &mut self.socket
    }

    /// Executes complete lines in order until the socket would block or the sink's budget is
    /// spent. The budget is checked before every line, so a pass never executes more than its
    /// share; what was read but not executed waits in `pending` for the next pass. Reads go
    /// through `chunk`, a buffer the reactor shares between publishers.
    pub fn read_and_execute(
        &mut self,
        max_line: usize,
        chunk: &mut [u8],
        sink: &mut impl Sink,
    ) -> ReadStatus {
        let status = self.read_lines(max_line, chunk, sink);
        if self.pending.capacity() > STEADY_CAPACITY.max(2 * self.pending.len()) {
            self.pending
                .shrink_to(STEADY_CAPACITY.max(self.pending.len()));
        }
        status
    }

    fn read_lines(
        &mut self,
        max_line: usize,
        chunk: &mut [u8],
        sink: &mut impl Sink,
    ) -> ReadStatus {
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
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match parse_command(line) {
            Ok(Command {
                id,
                action: Action::Publish { target, data },
            }) => {
                let published = sink.publish(&target, data);
                if let Some(id) = id {
                    self.output
                        .extend_from_slice(ok_reply(id, &target, &published).as_bytes());
                }
            }
            Ok(Command {
                id,
                action: Action::DisconnectUser(user),
            }) => {
                let closed = sink.disconnect_user(&user);
                if let Some(id) = id {
                    let line = format!(
                        "{{\"id\":{},\"ok\":true,\"disconnected\":{closed}}}\n",
                        id.get()
                    );
                    self.output.extend_from_slice(line.as_bytes());
                }
            }
            Err(error) => {
                self.errors += 1;
                match error.id {
                    Some(id) => {
                        self.output
                            .extend_from_slice(error_reply(Some(id), &error.message).as_bytes());
                    }
                    None => log::warn!("publisher={}: {}", self.serial, error.message),
                }
            }
        }
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

    /// Unsent reply bytes.
    pub fn queued(&self) -> usize {
        self.output.len() - self.written
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
    use crate::publish::command::{Published, Seqs, Target};
    use serde_json::value::RawValue;

    /// Counts publishes; has capacity for `budget` more.
    struct Budgeted {
        executed: Vec<String>,
        budget: usize,
    }

    impl Sink for Budgeted {
        fn publish(&mut self, _target: &Target<'_>, data: &RawValue) -> Published {
            self.executed.push(data.get().to_string());
            self.budget = self.budget.saturating_sub(1);
            Published {
                seqs: Seqs::One(self.executed.len() as u64),
                delivered: 1,
            }
        }

        fn disconnect_user(&mut self, _user: &str) -> usize {
            0
        }

        fn has_capacity(&self) -> bool {
            self.budget > 0
        }
    }

    #[test]
    fn a_spent_budget_pauses_before_the_next_line_and_the_next_pass_resumes_in_order() {
        let (server_side, mut worker) = UnixStream::pair().unwrap();
        let mut publisher = PublisherConn::new(1, server_side);
        let mut chunk = vec![0; 64 * 1024];
        let mut sink = Budgeted {
            executed: Vec::new(),
            budget: 0,
        };
        assert_eq!(
            publisher.read_and_execute(1024, &mut chunk, &mut sink),
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
            publisher.read_and_execute(1024, &mut chunk, &mut sink),
            ReadStatus::Paused
        );
        assert_eq!(sink.executed, ["0"]);
        sink.budget = 1;
        assert_eq!(
            publisher.read_and_execute(1024, &mut chunk, &mut sink),
            ReadStatus::Paused
        );
        assert_eq!(sink.executed, ["0", "1"]);
        worker.write_all(b"\"data\":3}\n").unwrap();
        sink.budget = 10;
        assert_eq!(
            publisher.read_and_execute(1024, &mut chunk, &mut sink),
            ReadStatus::Pending
        );
        assert_eq!(sink.executed, ["0", "1", "2", "3"]);
        drop(worker);
        assert_eq!(
            publisher.read_and_execute(1024, &mut chunk, &mut sink),
            ReadStatus::Finished
        );
    }

    #[test]
    fn a_drained_publisher_gives_back_the_capacity_of_a_burst() {
        let (server_side, mut worker) = UnixStream::pair().unwrap();
        let mut publisher = PublisherConn::new(1, server_side);
        let mut chunk = vec![0; 64 * 1024];
        let mut sink = Budgeted {
            executed: Vec::new(),
            budget: usize::MAX,
        };
        // A 200 KiB line arrives in pieces, so it passes through `pending`.
        let line = format!(
            "{{\"channel\":\"a\",\"data\":\"{}\"}}\n",
            "x".repeat(200 * 1024)
        );
        for piece in line.as_bytes().chunks(16 * 1024) {
            worker.write_all(piece).unwrap();
            publisher.read_and_execute(1024 * 1024, &mut chunk, &mut sink);
        }
        assert_eq!(sink.executed.len(), 1);
        assert!(publisher.pending.is_empty());
        assert!(
            publisher.pending.capacity() <= STEADY_CAPACITY,
            "{} bytes kept",
            publisher.pending.capacity()
        );
    }
}
