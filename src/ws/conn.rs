//! One TCP connection on the WebSocket port: its state machine, its read side and its
//! [`OutQueue`]. It never touches other connections, the `Poll` or the hub; it returns
//! verdicts and the reactor acts on them.
//!
//! ```text
//!  accept ─► Request ──(101 / 200)──► Open ──(close: any side, error, timeout)──► Draining ─► dropped
//!               └──(HTTP response or refusal)──────────────────────────────────┘
//! ```
//! - `Request`: bytes accumulate until httparse sees a complete head (capped at
//!   `max_header_size`).
//! - `Open`, a session over one of two transports:
//!   - a WebSocket (`GET /ws`): tungstenite's `WebSocketContext` parses frames straight from
//!     the socket (through the connection's [`Inflating`] step when it agreed to
//!     permessage-deflate) and writes its own frames (pongs, close) into the `OutQueue`
//!     through `WsIo`, so the queue is the single owner of outbound byte order. Pre-encoded
//!     event frames (the compressed twin, when agreed) are appended directly;
//!   - an event stream (`GET /sse`, see [`crate::sse`]): output only. Each message is framed
//!     for this stream (its `id` is this stream's positions); input is discarded until EOF.
//! - `Draining`: nothing more is parsed or queued. Once the queue is flushed the write side is
//!   shut (FIN) and input is discarded until the peer closes, so the final bytes (a close frame
//!   or an HTTP response) are not destroyed by a reset. A deadline bounds this state.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};

use bytes::Bytes;
use mio::net::TcpStream;
use tungstenite::Message;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

use crate::auth::ratelimit::Rate;
use crate::base::ids::ConnId;
use crate::base::ids::{AckKey, ChannelId};
use crate::base::time::{Tick, TickSource};
use crate::config::Config;
use crate::error::Close;
use crate::reactor::timer::TimerKey;
use crate::sse::{self, Arena, Stream};
use crate::ws::deflate::{EventFrame, InflateError, Inflating};
use crate::ws::http::{self, Handshake, Refusal, Route, Routing};
use crate::ws::io::WsIo;
pub use crate::ws::io::{Readiness, SharedInput};
use crate::ws::outqueue::OutQueue;
use crate::ws::session::{Inbound, Session};
use crate::ws::wire::{self, Reply};

/// An open session: its transport, when it was last heard from, and its request state.
struct Open {
    transport: Transport,
    last_seen: Tick,
    session: Session,
}

/// How an open session's messages travel. `Open` is boxed already and WebSockets are the
/// common case, so the large variant stays inline rather than cost a second allocation.
#[allow(clippy::large_enum_variant)]
enum Transport {
    /// `GET /ws`: framing both ways. With permessage-deflate agreed (`deflate`), input goes
    /// through `inflating`, which exists only while a read is under way (see
    /// [`Inflating::is_at_rest`]).
    WebSocket {
        framing: WebSocketContext,
        deflate: bool,
        inflating: Option<Box<Inflating>>,
    },
    /// `GET /sse`: server to client only.
    EventStream(Stream),
}

/// What a WebSocket session leaves behind when it ends.
#[derive(Debug)]
pub struct Ended {
    /// Channels to leave.
    pub subscriptions: Vec<ChannelId>,
    /// The authenticated user, to forget.
    pub user: Option<Box<str>>,
    /// It was an event stream.
    pub event_stream: bool,
    /// Acknowledged events it had not acked.
    pub awaiting: Vec<AckKey>,
}

enum Phase {
    Request { head: Vec<u8> },
    Open(Box<Open>),
    Draining,
}

/// How a request head ended.
#[derive(Debug)]
pub enum RequestOutcome {
    /// More bytes are needed.
    Incomplete,
    /// A complete, routable request; `rest` is what followed the head.
    Routed {
        /// Where the request goes.
        route: Route,
        /// Bytes after the head (the start of the WebSocket stream).
        rest: Vec<u8>,
    },
    /// A request to refuse with an HTTP status.
    Refused(Refusal),
    /// The peer closed or reset before completing the head.
    Gone,
}

/// Why reading a WebSocket stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// The close handshake completed; the close reply is queued.
    Closed,
    /// The peer vanished without a close handshake (EOF or reset).
    Reset,
    /// The peer broke RFC 6455 or a limit.
    Violation(Close),
}

/// The connection deadlines, in ticks.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// `heartbeat_interval`: time between Pings.
    pub heartbeat_interval: u64,
    /// `heartbeat_timeout`: silence allowed.
    pub heartbeat_timeout: u64,
    /// `write_stall_timeout`: how long queued output may sit without moving.
    pub write_stall: u64,
    /// `sse_heartbeat_interval`: time between an event stream's comment lines.
    pub sse_heartbeat: u64,
}

impl Timing {
    /// The deadlines `config` sets, in `ticks`.
    pub fn new(config: &Config, ticks: TickSource) -> Timing {
        Timing {
            heartbeat_interval: ticks.ticks_in(config.heartbeat_interval),
            heartbeat_timeout: ticks.ticks_in(config.heartbeat_timeout),
            write_stall: ticks.ticks_in(config.write_stall_timeout),
            sse_heartbeat: ticks.ticks_in(config.sse_heartbeat_interval),
        }
    }
}

/// The framing limits `config` sets: no write buffering in tungstenite (the out queue is the
/// buffer), `max_output_buffer`, `max_message_size`.
pub fn websocket_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_size)
        .write_buffer_size(0)
        .max_write_buffer_size(config.max_output_buffer)
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size))
}

/// Input discarded per call of [`ClientConn::discard_input`]: a pass reads no more of one
/// connection than it would of a WebSocket.
pub const DISCARD_PER_PASS: usize = 16 * 1024;

/// How discarding input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// The peer closed (or the socket failed).
    Closed,
    /// Nothing more to read now.
    Drained,
    /// The budget ran out with input left: read on in the next pass.
    MayHaveMore,
}

/// What a connection's timer firing means.
#[derive(Debug, PartialEq, Eq)]
pub enum Deadline {
    /// The request head did not arrive in `handshake_timeout`: drop the connection.
    HandshakeTimeout,
    /// Closing took longer than `close_timeout`: drop the connection.
    CloseTimeout,
    /// End the session.
    Close(Close),
    /// A Ping (or an event stream's heartbeat) was queued; arm the timer again for this tick.
    Next(Tick),
}

/// One TCP connection on the WebSocket port.
pub struct ClientConn {
    id: ConnId,
    /// The peer's address, for logs.
    peer: SocketAddr,
    /// The timer currently armed for this connection: handshake deadline, heartbeat, or drain
    /// deadline, depending on the phase.
    timer: Option<TimerKey>,
    /// True while the connection sits in the fan-out's dirty list (see [`ClientConn::list`]).
    listed: bool,
    /// True while WRITABLE interest is registered (only while a write would block).
    wants_writable: bool,
    /// Why the connection is being closed, once that is decided.
    close: Option<Close>,
    /// When the oldest event still queued here was read from its publisher, in microseconds
    /// since the server started; 0 when no event is queued.
    event_pending_since_us: u64,
    socket: TcpStream,
    phase: Phase,
    out: OutQueue,
    write_shut: bool,
}

impl ClientConn {
    /// A freshly accepted connection, waiting for its request head; at most
    /// `max_output_buffer` unsent bytes may be queued to it.
    pub fn new(
        id: ConnId,
        socket: TcpStream,
        peer: SocketAddr,
        max_output_buffer: usize,
    ) -> ClientConn {
        ClientConn {
            id,
            peer,
            timer: None,
            listed: false,
            wants_writable: false,
            close: None,
            event_pending_since_us: 0,
            socket,
            phase: Phase::Request { head: Vec::new() },
            out: OutQueue::new(max_output_buffer),
            write_shut: false,
        }
    }

    /// This connection's identity.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer's address (the TCP peer, before any proxy header).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket, for (re)registration.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    /// Replaces the armed timer's key, returning the previous one (to cancel).
    pub fn replace_timer(&mut self, timer: Option<TimerKey>) -> Option<TimerKey> {
        std::mem::replace(&mut self.timer, timer)
    }

    /// Why the connection is closing, once decided.
    pub fn close_reason(&self) -> Option<Close> {
        self.close
    }

    /// Puts the connection on the dirty list if it has work for the next flush (bytes queued
    /// since the last one, or a write side to shut) and is not on it yet. Returns true when
    /// the caller must add it: the fan-out's `Clients` calls this whenever a borrow of the
    /// connection ends, so no path that queues output can leave it unflushed.
    pub fn list(&mut self) -> bool {
        let due = self.out.take_pushed()
            || (self.is_draining() && !self.write_shut && self.out.is_empty());
        let newly = due && !self.listed;
        self.listed |= newly;
        newly
    }

    /// Lists the connection whatever it holds: the socket became writable.
    pub fn relist(&mut self) -> bool {
        let newly = !self.listed;
        self.listed = true;
        newly
    }

    /// Records that an event frame was queued in a pass that began at `pass_started_us`.
    pub fn note_event(&mut self, pass_started_us: u64) {
        if self.event_pending_since_us == 0 {
            self.event_pending_since_us = pass_started_us.max(1);
        }
    }

    /// After a flush that emptied the queue: when its oldest event was read, if it held one.
    pub fn take_event_start(&mut self) -> Option<u64> {
        if self.out.is_empty() && self.event_pending_since_us != 0 {
            Some(std::mem::take(&mut self.event_pending_since_us))
        } else {
            None
        }
    }

    /// Whether WRITABLE interest should change: `Some(wanted)` when the queue started or
    /// stopped holding bytes the kernel would not take.
    pub fn interest_change(&mut self) -> Option<bool> {
        let wanted = !self.out.is_empty();
        (wanted != self.wants_writable).then(|| {
            self.wants_writable = wanted;
            wanted
        })
    }

    /// True while the session is open and accepts messages.
    pub fn is_open(&self) -> bool {
        match &self.phase {
            Phase::Open(open) => match &open.transport {
                Transport::WebSocket { framing, .. } => framing.can_write(),
                Transport::EventStream(_) => true,
            },
            _ => false,
        }
    }

    /// True while the session is an event stream.
    pub fn is_event_stream(&self) -> bool {
        matches!(&self.phase, Phase::Open(open) if matches!(open.transport, Transport::EventStream(_)))
    }

    /// True once the connection only drains.
    pub fn is_draining(&self) -> bool {
        matches!(self.phase, Phase::Draining)
    }

    /// Unsent bytes queued.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// True when output was refused for going over `max_output_buffer`, or has not moved for
    /// `stall` ticks: either way the peer does not keep up, and the connection is a slow
    /// consumer.
    pub fn is_slow(&self, now: Tick, stall: u64) -> bool {
        self.out.is_overflowed() || self.out.is_stalled(now, stall)
    }

    /// When a frame was last received, for an open WebSocket.
    pub fn last_seen(&self) -> Option<Tick> {
        match &self.phase {
            Phase::Open(s) => Some(s.last_seen),
            _ => None,
        }
    }

    /// True when this WebSocket is subscribed to `channel`.
    pub fn is_subscribed(&self, channel: ChannelId) -> bool {
        self.session()
            .is_some_and(|s| s.subscriptions().contains(&channel))
    }

    /// The request state of an open WebSocket.
    pub fn session(&self) -> Option<&Session> {
        match &self.phase {
            Phase::Open(open) => Some(&open.session),
            _ => None,
        }
    }

    /// The request state of an open WebSocket, to change it.
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.phase {
            Phase::Open(open) => Some(&mut open.session),
            _ => None,
        }
    }

    /// Reads the request head until it is complete, refused, or the socket is drained.
    pub fn read_request(&mut self, routing: &Routing) -> RequestOutcome {
        let Phase::Request { head } = &mut self.phase else {
            return RequestOutcome::Incomplete;
        };
        let mut chunk = [0u8; 2048];
        loop {
            match self.socket.read(&mut chunk) {
                Ok(0) => return RequestOutcome::Gone,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return RequestOutcome::Incomplete;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return RequestOutcome::Gone,
            }
            match http::parse_request(head, routing) {
                Ok(None) => {}
                Ok(Some((route, head_len))) => {
                    let rest = head.split_off(head_len);
                    return RequestOutcome::Routed { route, rest };
                }
                Err(refusal) => return RequestOutcome::Refused(refusal),
            }
        }
    }

    /// Queues a complete HTTP response and closes once it is written.
    pub fn respond(&mut self, response: Vec<u8>) {
        self.out.push_final(Bytes::from(response));
        self.phase = Phase::Draining;
    }

    /// Queues the 101 response and opens the WebSocket (compressed when the handshake
    /// accepted the client's offer); `rest` holds bytes the client sent after its request
    /// head.
    pub fn upgrade(
        &mut self,
        handshake: &Handshake,
        rest: Vec<u8>,
        config: WebSocketConfig,
        rate: Rate,
        now: Tick,
    ) {
        // The first chunk of an empty queue: it always fits (`max_output_buffer` ≥ 1 KiB).
        let pushed = self.out.push(Bytes::from(handshake.response()));
        debug_assert!(pushed);
        let deflate = handshake.deflate;
        let (framing, inflating) = if deflate && !rest.is_empty() {
            // The inflating step reads `rest` first, so tungstenite starts empty.
            let mut inflating = Box::<Inflating>::default();
            inflating.prepend(rest);
            let framing = WebSocketContext::new(Role::Server, Some(config));
            (framing, Some(inflating))
        } else {
            let framing = WebSocketContext::from_partially_read(rest, Role::Server, Some(config));
            (framing, None)
        };
        self.phase = Phase::Open(Box::new(Open {
            transport: Transport::WebSocket {
                framing,
                deflate,
                inflating,
            },
            last_seen: now,
            session: Session::new(rate, now),
        }));
    }

    /// Opens an event stream. Nothing is queued yet: until the first message the stream can
    /// still be refused with an HTTP status (see [`end`](Self::end)).
    pub fn open_event_stream(&mut self, stream: Stream, rate: Rate, now: Tick) {
        self.phase = Phase::Open(Box::new(Open {
            transport: Transport::EventStream(stream),
            last_seen: now,
            session: Session::new(rate, now),
        }));
    }

    /// The next complete message, or `None` once the socket would block or this pass's read
    /// budget (one fill of `input`, see [`SharedInput::readiness`]) is spent. The reactor
    /// acts on each message before asking for the next, so a flood is judged (rate limit,
    /// slow consumer) as it is parsed, not after. Call [`SharedInput::begin`] first.
    ///
    /// # Errors
    /// How reading ended for good; the reactor closes the connection accordingly.
    pub fn next_message(
        &mut self,
        now: Tick,
        input: &mut SharedInput,
    ) -> Result<Option<Inbound>, ReadEnd> {
        let Phase::Open(session) = &mut self.phase else {
            return Ok(None);
        };
        let Transport::WebSocket {
            framing,
            deflate,
            inflating,
        } = &mut session.transport
        else {
            return Ok(None);
        };
        if *deflate && inflating.is_none() {
            *inflating = Some(Box::default());
        }
        let mut io = WsIo {
            socket: &mut self.socket,
            input: Some(input),
            inflating: inflating.as_deref_mut(),
            out: &mut self.out,
        };
        let read = loop {
            let message = match framing.read(&mut io) {
                Ok(message) => message,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(read_end(e)),
            };
            // Any frame counts as life (RFC 6455 pings, pongs, data).
            session.last_seen = now;
            match message {
                Message::Text(text) => break Ok(Some(Inbound::Text(text))),
                Message::Binary(_) => break Ok(Some(Inbound::Binary)),
                // tungstenite queues the Pong on its next read or write.
                Message::Ping(_) => break Ok(Some(Inbound::Ping)),
                // A close is answered on the next read.
                Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
            }
        };
        if inflating.as_ref().is_some_and(|i| i.is_at_rest()) {
            *inflating = None;
        }
        read
    }

    /// Queues a reply, if the session still accepts messages. WebSocket replies are framed
    /// here rather than by tungstenite so its internal write buffer is never allocated for
    /// them.
    pub fn send_reply(&mut self, reply: &Reply<'_>) {
        let bytes = match self.event_stream() {
            Some(stream) => stream.reply(reply),
            None => wire::text_frame(reply.to_json().as_bytes()),
        };
        self.send(bytes);
    }

    /// Queues a frame encoded once for many WebSockets (a presence message); false when the
    /// connection is closing or over `max_output_buffer` (then closed as a slow consumer).
    pub fn send_frame(&mut self, frame: Bytes) -> bool {
        self.send(frame)
    }

    /// Queues a keepalive: a protocol-level Ping with an empty payload, or an event stream's
    /// comment line; static bytes, no allocation.
    pub fn send_heartbeat(&mut self) {
        const PING: &[u8] = &[0x89, 0x00];
        let beat = match self.event_stream() {
            Some(_) => sse::stream::HEARTBEAT,
            None => PING,
        };
        self.send(Bytes::from_static(beat));
    }

    /// Queues an event: the shared, pre-encoded WebSocket frame itself (its compressed twin
    /// when compression was agreed), or for an event stream its message, built in `arena`;
    /// `at` is the event's channel and seq (`None` for a broadcast). Returns false when the
    /// session no longer accepts messages, or the message would go over
    /// `max_output_buffer` (see [`is_slow`](Self::is_slow)).
    pub fn send_event(
        &mut self,
        frame: &mut EventFrame<'_>,
        at: Option<(&str, u64)>,
        arena: &mut Arena,
    ) -> bool {
        let (bytes, deflated) = match self.event_stream() {
            Some(stream) => (
                stream.event(wire::text_payload(frame.plain()), at, arena),
                false,
            ),
            None => {
                let (bytes, deflated) = frame.for_connection(self.is_deflating());
                (bytes.clone(), deflated)
            }
        };
        let len = bytes.len();
        let sent = self.send(bytes);
        if sent && !self.is_event_stream() {
            frame.note_queued(len, deflated);
        }
        sent
    }

    /// True when this WebSocket agreed to permessage-deflate.
    pub fn is_deflating(&self) -> bool {
        matches!(&self.phase, Phase::Open(open) if matches!(&open.transport, Transport::WebSocket { deflate: true, .. }))
    }

    /// The event stream, when the session is one, with its head queued first if it is not
    /// yet.
    fn event_stream(&mut self) -> Option<&mut Stream> {
        let Phase::Open(open) = &mut self.phase else {
            return None;
        };
        let Transport::EventStream(stream) = &mut open.transport else {
            return None;
        };
        if let Some(head) = stream.start() {
            // The first chunk of an empty queue: it always fits (`max_output_buffer` ≥ 1 KiB).
            let pushed = self.out.push(head);
            debug_assert!(pushed);
        }
        Some(stream)
    }

    fn send(&mut self, bytes: Bytes) -> bool {
        self.is_open() && self.out.push(bytes)
    }

    /// Ends the session for `close` (the first reason given sticks), queuing its Close frame
    /// if the connection can still send one: for an event stream, the closing message, or
    /// the HTTP refusal when its head is not out yet. Returns what the session held when it
    /// was open, `None` if it had already ended (or never opened).
    pub fn end(&mut self, close: Close) -> Option<Ended> {
        self.close.get_or_insert(close);
        if let Phase::Open(open) = &mut self.phase
            && let Transport::EventStream(stream) = &mut open.transport
        {
            if stream.is_started() {
                if let Some(closing) = stream.closing(close) {
                    self.out.push_final(closing);
                }
            } else if close.frame().is_some() {
                self.out
                    .push_final(Bytes::from(sse::stream::refusal(close)));
            }
        } else if let Some((code, reason)) = close.frame() {
            self.send_close(code, reason);
        }
        self.end_session()
    }

    fn send_close(
        &mut self,
        code: tungstenite::protocol::frame::coding::CloseCode,
        reason: &'static str,
    ) {
        if let Phase::Open(open) = &mut self.phase
            && let Transport::WebSocket { framing, .. } = &mut open.transport
            && framing.can_write()
        {
            let mut io = WsIo {
                socket: &mut self.socket,
                input: None,
                inflating: None,
                out: &mut self.out,
            };
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let sent = framing.close(&mut io, Some(frame));
            debug_assert!(sent.is_ok(), "{sent:?}");
        }
    }

    /// Moves to `Draining`. Returns what the session held when the connection was an open
    /// WebSocket, `None` otherwise.
    fn end_session(&mut self) -> Option<Ended> {
        match std::mem::replace(&mut self.phase, Phase::Draining) {
            Phase::Open(open) => {
                let mut session = open.session;
                Some(Ended {
                    subscriptions: session.take_subscriptions(),
                    awaiting: session.take_awaiting(),
                    user: session.take_identity().map(|identity| identity.user),
                    event_stream: matches!(open.transport, Transport::EventStream(_)),
                })
            }
            Phase::Request { .. } | Phase::Draining => None,
        }
    }

    /// Drops queued frames that have not started to leave (slow consumer), keeping the byte
    /// stream valid.
    pub fn discard_output(&mut self) {
        self.out.keep_partial_only();
    }

    /// Writes queued output (`gather` is the reactor's buffer for writing several chunks at
    /// once). When draining and everything is written, shuts the write side. Returns the
    /// bytes written.
    ///
    /// # Errors
    /// A fatal socket error; the connection must be dropped.
    pub fn flush(&mut self, gather: &mut Vec<u8>, now: Tick) -> io::Result<usize> {
        self.listed = false;
        let written = self.out.flush_into(&mut self.socket, gather, now)?;
        if self.out.is_empty() && self.is_draining() && !self.write_shut {
            self.write_shut = true;
            // The peer may already be gone; dropping the connection then is right anyway.
            let _ = self.socket.shutdown(Shutdown::Write);
        }
        Ok(written)
    }

    /// The part of a flush above the kernel: writes queued output into `sink` (the socket,
    /// or for benchmarks any `Write`), takes the connection off the dirty list and records
    /// whether its output moved.
    ///
    /// # Errors
    /// What `sink` returns, but `WouldBlock`.
    pub fn flush_user_space(
        &mut self,
        sink: &mut impl Write,
        gather: &mut Vec<u8>,
        now: Tick,
    ) -> io::Result<usize> {
        self.listed = false;
        self.out.flush_into(sink, gather, now)
    }

    /// Discards input (a draining connection's, or an event stream's, whose reader has
    /// nothing to say), at most [`DISCARD_PER_PASS`] bytes per call, so a peer that floods
    /// cannot hold the loop.
    pub fn discard_input(&mut self) -> Discarded {
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < DISCARD_PER_PASS {
            match self.socket.read(&mut sink) {
                Ok(0) => return Discarded::Closed,
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Discarded::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Discarded::Closed,
            }
        }
        Discarded::MayHaveMore
    }

    /// Decides what the connection's timer firing at `now` means: for an open session, the
    /// silence deadline (a WebSocket's), a slow consumer, the token's expiry, or the next
    /// heartbeat (queued here). One timer per connection: the earliest of the next heartbeat,
    /// the silence deadline and the token's expiry (a refresh moves the expiry later; the
    /// early wake re-arms). An event stream cannot be heard from: a vanished reader shows as
    /// output that stops moving, or as a socket error.
    pub fn on_deadline(&mut self, now: Tick, timing: &Timing) -> Deadline {
        if self.is_handshaking() {
            return Deadline::HandshakeTimeout;
        }
        let Some(last_seen) = self.last_seen() else {
            return Deadline::CloseTimeout;
        };
        let stream = self.is_event_stream();
        if !stream && now.since(last_seen) >= timing.heartbeat_timeout {
            return Deadline::Close(Close::HeartbeatTimeout);
        }
        if self.is_slow(now, timing.write_stall) {
            return Deadline::Close(Close::SlowConsumer);
        }
        let expires = self.session().and_then(|s| s.identity()).map(|(_, at)| *at);
        if expires.is_some_and(|expires| expires <= now) {
            return Deadline::Close(Close::TokenExpired);
        }
        self.send_heartbeat();
        let next = if stream {
            now.after(timing.sse_heartbeat)
        } else {
            now.after(timing.heartbeat_interval)
                .min(last_seen.after(timing.heartbeat_timeout))
        };
        Deadline::Next(expires.map_or(next, |expires| expires.min(next)))
    }

    /// When the next heartbeat is due after the session opened at `now`: the first Ping (or
    /// comment line), or the token's expiry if that comes first.
    pub fn first_deadline(&self, now: Tick, timing: &Timing) -> Tick {
        let interval = if self.is_event_stream() {
            timing.sse_heartbeat
        } else {
            timing.heartbeat_interval
        };
        let next_ping = now.after(interval);
        let expires = self.session().and_then(|s| s.identity()).map(|(_, at)| *at);
        expires.map_or(next_ping, |e| e.min(next_ping))
    }

    /// True when the request phase is still running (the handshake deadline applies).
    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Request { .. })
    }
}

fn read_end(error: WsError) -> ReadEnd {
    match error {
        WsError::ConnectionClosed | WsError::AlreadyClosed => ReadEnd::Closed,
        WsError::Io(e) if InflateError::of(&e) == Some(InflateError::TooBig) => {
            ReadEnd::Violation(Close::MessageTooBig)
        }
        WsError::Io(e) if InflateError::of(&e).is_some() => {
            ReadEnd::Violation(Close::ProtocolError)
        }
        WsError::Io(_) | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ReadEnd::Reset
        }
        WsError::Capacity(_) => ReadEnd::Violation(Close::MessageTooBig),
        WsError::Utf8(_) => ReadEnd::Violation(Close::InvalidUtf8),
        _ => ReadEnd::Violation(Close::ProtocolError),
    }
}
