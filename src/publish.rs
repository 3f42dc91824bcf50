//! One connection on the publish port (a Unix stream socket): newline-delimited JSON
//! commands in, one reply line out per command that carries an `id`.
//!
//! This module owns line framing, command parsing and reply rendering. It knows nothing of
//! WebSockets: executing a command is the [`Sink`]'s job (the reactor's fan-out).
//!
//! Invariants: lines are executed in the order received; the sink's budget is checked before
//! every line, and lines read but not executed wait for the next pass; a connection's own
//! buffer holds at most one partial line of at most `max_line` bytes plus the rest of one read
//! chunk, and keeps at most a few KiB of capacity once drained; a line longer than `max_line`
//! is refused and the connection closed, since the rest of the stream can no longer be framed
//! with confidence.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Read, Write};

use mio::net::UnixStream;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::{RESERVED_PREFIX, check_channel};

/// What a command publishes to.
#[derive(Debug, PartialEq)]
pub enum Target<'a> {
    /// `"channel": "..."`
    Channel(Cow<'a, str>),
    /// `"channels": [...]`, each with its own sequence number.
    Channels(Vec<Cow<'a, str>>),
    /// `"broadcast": true`: every open WebSocket.
    Broadcast,
    /// `"user": "u1"`: every connection of that user, as an event on `user:u1`.
    User(Cow<'a, str>),
}

/// What a command does.
#[derive(Debug)]
pub enum Action<'a> {
    /// Publish `data` to `target`.
    Publish {
        /// Where the event goes.
        target: Target<'a>,
        /// The event payload, byte for byte as the publisher wrote it.
        data: &'a RawValue,
    },
    /// `{"op":"disconnect","user":"u1"}`: close every connection of that user (4003).
    DisconnectUser(Cow<'a, str>),
}

/// A parsed publish command.
#[derive(Debug)]
pub struct Command<'a> {
    /// Present when the publisher wants a reply: a JSON number or string, echoed verbatim.
    pub id: Option<&'a RawValue>,
    /// What to do.
    pub action: Action<'a>,
}

/// A refused command.
#[derive(Debug)]
pub struct CommandError<'a> {
    /// The command's id, when it could be read.
    pub id: Option<&'a RawValue>,
    /// Why it was refused.
    pub message: String,
}

/// Sequence numbers taken by one publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Seqs {
    /// A broadcast has none.
    None,
    /// A single-channel publish.
    One(u64),
    /// A multi-channel publish, in the command's channel order.
    Many(Vec<u64>),
}

/// The result of executing one command.
#[derive(Debug, PartialEq, Eq)]
pub struct Published {
    /// Sequence numbers taken.
    pub seqs: Seqs,
    /// Connections the event was queued to.
    pub delivered: usize,
}

/// Executes publish commands: the reactor's fan-out.
pub trait Sink {
    /// Publishes `data` to `target`.
    fn publish(&mut self, target: &Target<'_>, data: &RawValue) -> Published;

    /// Closes every connection of `user`; returns how many.
    fn disconnect_user(&mut self, user: &str) -> usize;

    /// False once this loop pass has done its share of fan-out: the publisher stops reading
    /// and resumes in the next pass, after the queued frames were flushed.
    fn has_capacity(&self) -> bool;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channels: Option<Vec<Cow<'a, str>>>,
    broadcast: Option<bool>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: DataField<'a>,
}

/// `data` as written, telling a missing field from `null` (which `Option` cannot).
#[derive(Default)]
enum DataField<'a> {
    #[default]
    Missing,
    Present(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for DataField<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(deserializer).map(DataField::Present)
    }
}

/// Reads just the id of a command that failed to parse, so its error reply can carry it.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Parses one command line (without its line terminator).
///
/// # Errors
/// Why the line is not a valid command, with its id when it has a readable one.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError<'_>> {
    let raw: RawCommand<'_> = serde_json::from_slice(line).map_err(|e| CommandError {
        id: serde_json::from_slice::<IdOnly<'_>>(line)
            .ok()
            .and_then(|c| c.id)
            .filter(|id| is_valid_id(id)),
        message: format!("invalid command: {e}"),
    })?;
    let id = raw.id;
    let fail = |message: String| Err(CommandError { id, message });
    if id.is_some_and(|id| !is_valid_id(id)) {
        return Err(CommandError {
            id: None,
            message: "id must be a number or a string".into(),
        });
    }
    let check_user = |user: &str| {
        check_channel(&format!("user:{user}"))
            .map_err(|why| format!("invalid user {user:?}: {why}"))
    };
    match raw.op.as_deref() {
        None => {}
        Some("disconnect") => {
            let (Some(user), None, None, None, DataField::Missing) =
                (raw.user, raw.channel, raw.channels, raw.broadcast, raw.data)
            else {
                return fail("disconnect takes exactly a user".into());
            };
            if let Err(why) = check_user(&user) {
                return fail(why);
            }
            return Ok(Command {
                id,
                action: Action::DisconnectUser(user),
            });
        }
        Some(other) => return fail(format!("unknown op {other:?}")),
    }
    let target = match (raw.channel, raw.channels, raw.broadcast, raw.user) {
        (Some(channel), None, None, None) => Target::Channel(channel),
        (None, Some(channels), None, None) => Target::Channels(channels),
        (None, None, Some(true), None) => Target::Broadcast,
        (None, None, None, Some(user)) => Target::User(user),
        (None, None, Some(false), None) => {
            return fail("broadcast must be true when present".into());
        }
        _ => return fail("give exactly one of channel, channels, broadcast or user".into()),
    };
    let check_publishable = |name: &str| match check_channel(name) {
        Err(why) => Err(format!("invalid channel {name:?}: {why}")),
        Ok(()) if name.starts_with(RESERVED_PREFIX) => Err(format!(
            "channel {name:?} is reserved: {RESERVED_PREFIX}* channels are the server's own"
        )),
        Ok(()) => Ok(()),
    };
    match &target {
        Target::Channel(name) => {
            if let Err(why) = check_publishable(name) {
                return fail(why);
            }
        }
        Target::Channels(names) => {
            if names.is_empty() {
                return fail("channels is empty".into());
            }
            for (i, name) in names.iter().enumerate() {
                if let Err(why) = check_publishable(name) {
                    return fail(why);
                }
                if names[..i].contains(name) {
                    return fail(format!("channel {name:?} is listed twice"));
                }
            }
        }
        Target::User(user) => {
            if let Err(why) = check_user(user) {
                return fail(why);
            }
        }
        Target::Broadcast => {}
    }
    let DataField::Present(data) = raw.data else {
        return fail("missing field `data`".into());
    };
    Ok(Command {
        id,
        action: Action::Publish { target, data },
    })
}

fn is_valid_id(id: &RawValue) -> bool {
    matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

/// Renders the success reply of a command with an id.
pub fn ok_reply(id: &RawValue, target: &Target<'_>, published: &Published) -> String {
    let mut line = format!("{{\"id\":{},\"ok\":true", id.get());
    match (&published.seqs, target) {
        (Seqs::One(seq), _) => {
            let _ = write!(line, ",\"seq\":{seq}");
        }
        (Seqs::Many(seqs), Target::Channels(names)) => {
            line.push_str(",\"seqs\":{");
            for (i, (name, seq)) in names.iter().zip(seqs).enumerate() {
                let comma = if i == 0 { "" } else { "," };
                // Validated channel names need no escaping.
                let _ = write!(line, "{comma}\"{name}\":{seq}");
            }
            line.push('}');
        }
        _ => {}
    }
    let _ = writeln!(line, ",\"delivered\":{}}}", published.delivered);
    line
}

/// Renders an error reply; `id` is `null` when the command had none that could be read.
pub fn error_reply(id: Option<&RawValue>, message: &str) -> String {
    let id = id.map_or("null", RawValue::get);
    let message = serde_json::to_string(message).expect("strings always serialize");
    format!("{{\"id\":{id},\"ok\":false,\"error\":{message}}}\n")
}

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

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    fn error_of(line: &str) -> (Option<String>, String) {
        let e = parse_command(line.as_bytes()).unwrap_err();
        (e.id.map(|id| id.get().to_string()), e.message)
    }

    #[test]
    fn parses_each_target() {
        let publish = |line: &'static [u8]| match parse_command(line).unwrap() {
            Command {
                id,
                action: Action::Publish { target, data },
            } => (
                id.map(|i| i.get().to_string()),
                target,
                data.get().to_string(),
            ),
            other => panic!("not a publish: {other:?}"),
        };
        let (id, target, data) = publish(br#"{"channel":"project:42","data":{"p":1}}"#);
        assert_eq!(
            (id, target, data.as_str()),
            (None, Target::Channel("project:42".into()), r#"{"p":1}"#)
        );
        let (id, target, data) = publish(br#"{"id":"x","channels":["a","b"],"data":[1, 2]}"#);
        assert_eq!(target, Target::Channels(vec!["a".into(), "b".into()]));
        assert_eq!((id.as_deref(), data.as_str()), (Some(r#""x""#), "[1, 2]"));
        let (_, target, data) = publish(br#"{"id":7,"broadcast":true,"data":null}"#);
        assert_eq!((target, data.as_str()), (Target::Broadcast, "null"));
        assert_eq!(
            publish(br#"{"user":"u1","data":1}"#).1,
            Target::User("u1".into())
        );
        assert_eq!(
            publish(br#"{"channel":"\u0061","data":1}"#).1,
            Target::Channel("a".into()),
            "escapes decoded"
        );
        let disconnect = parse_command(br#"{"id":1,"op":"disconnect","user":"u1"}"#).unwrap();
        assert!(matches!(disconnect.action, Action::DisconnectUser(user) if user == "u1"));
    }

    #[test]
    fn refuses_bad_commands_keeping_the_id() {
        assert_eq!(error_of("not json").0, None);
        let (id, message) = error_of(r#"{"id":3,"chanel":"a","data":1}"#);
        assert_eq!(id.as_deref(), Some("3"));
        assert!(message.contains("unknown field `chanel`"), "{message}");
        assert!(
            error_of(r#"{"id":3,"channel":"a"}"#)
                .1
                .contains("missing field `data`")
        );
        assert!(
            error_of(r#"{"id":3,"channel":"a","broadcast":true,"data":1}"#)
                .1
                .contains("exactly one")
        );
        assert!(error_of(r#"{"id":3,"data":1}"#).1.contains("exactly one"));
        assert!(
            error_of(r#"{"id":3,"user":"a b","data":1}"#)
                .1
                .contains("invalid user")
        );
        assert!(
            error_of(r#"{"id":3,"op":"disconnect","user":"u1","data":1}"#)
                .1
                .contains("exactly a user")
        );
        assert!(
            error_of(r#"{"id":3,"op":"explode","user":"u1"}"#)
                .1
                .contains("unknown op")
        );
        assert!(
            error_of(r#"{"id":3,"broadcast":false,"data":1}"#)
                .1
                .contains("must be true")
        );
        assert!(
            error_of(r#"{"id":3,"channel":"a b","data":1}"#)
                .1
                .contains("invalid channel")
        );
        for reserved in [
            r#"{"id":3,"channel":"sidecast:stats","data":1}"#,
            r#"{"id":3,"channels":["a","sidecast:x"],"data":1}"#,
        ] {
            assert!(error_of(reserved).1.contains("reserved"), "{reserved}");
        }
        assert!(
            error_of(r#"{"id":3,"channels":[],"data":1}"#)
                .1
                .contains("empty")
        );
        assert!(
            error_of(r#"{"id":3,"channels":["a","a"],"data":1}"#)
                .1
                .contains("twice")
        );
        assert_eq!(error_of(r#"{"id":{},"channel":"a","data":1}"#).0, None);
    }

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

    #[test]
    fn replies_are_single_json_lines() {
        let id = raw("7");
        let one = Published {
            seqs: Seqs::One(18),
            delivered: 1000,
        };
        assert_eq!(
            ok_reply(&id, &Target::Channel("a".into()), &one),
            "{\"id\":7,\"ok\":true,\"seq\":18,\"delivered\":1000}\n"
        );
        let many = Published {
            seqs: Seqs::Many(vec![18, 3]),
            delivered: 2,
        };
        let target = Target::Channels(vec!["project:42".into(), "order:7".into()]);
        assert_eq!(
            ok_reply(&id, &target, &many),
            "{\"id\":7,\"ok\":true,\"seqs\":{\"project:42\":18,\"order:7\":3},\"delivered\":2}\n"
        );
        let all = Published {
            seqs: Seqs::None,
            delivered: 5,
        };
        assert_eq!(
            ok_reply(&id, &Target::Broadcast, &all),
            "{\"id\":7,\"ok\":true,\"delivered\":5}\n"
        );
        assert_eq!(
            error_reply(None, "bad \"x\""),
            "{\"id\":null,\"ok\":false,\"error\":\"bad \\\"x\\\"\"}\n"
        );
    }
}
