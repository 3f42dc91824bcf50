//! One TCP connection on the WebSocket port: its state machine, its read side and its
//! [`OutQueue`]. It never touches other connections, the `Poll` or the hub; it returns
//! verdicts and the reactor acts on them.
//!
//! ```text
//!  accept ─► Request ──(101)──► WebSocket ──(close: any side, error, timeout)──► Draining ─► dropped
//!               └──(HTTP response or refusal)──────────────────────────────────────┘
//! ```
//! - `Request`: bytes accumulate until httparse sees a complete head (capped at
//!   `max_header_size`).
//! - `WebSocket`: tungstenite's `WebSocketContext` parses frames straight from the socket and
//!   writes its own frames (pongs, close, replies) into the `OutQueue` through `WsIo`, so the
//!   queue is the single owner of outbound byte order. Pre-encoded event frames are appended
//!   directly.
//! - `Draining`: nothing more is parsed or queued. Once the queue is flushed the write side is
//!   shut (FIN) and input is discarded until the peer closes, so the final bytes (a close frame
//!   or an HTTP response) are not destroyed by a reset. A deadline bounds this state.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};

use bytes::Bytes;
use mio::net::TcpStream;
use tungstenite::Message;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

use crate::auth::Identity;
use crate::http::{self, OriginPolicy, Refusal, Route};
use crate::hub::ChannelId;
use crate::metrics::DisconnectReason;
use crate::ratelimit::{Rate, TokenBucket};
use crate::timer::{Tick, TimerKey};
use crate::wire::{self, Reply};

/// Identifies a connection across slab-key reuse: `generation` is unique per accepted
/// connection, so a stale id (in a timer or subscriber list) is detectable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// The key in the client slab.
    pub key: u32,
    /// Unique per accepted connection.
    pub generation: u32,
}

/// Most chunks handed to one `write_vectored` call (Linux's `UIO_MAXIOV` is 1024).
const MAX_IOVECS: usize = 64;

/// Bytes waiting to be written to one socket, in order. Chunks are shared, reference-counted
/// buffers: an event frame queued to 10k connections exists once in memory.
///
/// Every chunk counts against `limit` (`max_output_buffer`): events, replies, Pings and Pongs.
/// A push past it is refused and marks the queue *overflowed*, which makes the connection a
/// slow consumer. Only the last words of a connection, one Close frame or one HTTP response,
/// go in unchecked, so that a slow consumer can still be told why it is closed.
///
/// Fields are packed (32-bit offset, limit and tick) because every connection holds one:
/// chunks are at most a frame of `max_publish_line` or an HTTP response, far below 4 GiB
/// (`Config` caps the sizes at 1 GiB).
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    /// Unsent bytes in total.
    len: usize,
    /// Bytes of the front chunk already written.
    offset: u32,
    /// Unsent bytes allowed.
    limit: u32,
    /// While `is_stalled`: the tick (its low 32 bits) since which queued bytes have not moved.
    stalled_since: u32,
    /// Bytes are queued and the last flush wrote none of them.
    is_stalled: bool,
    /// A push was refused for going over `limit`.
    overflowed: bool,
    /// The last chunk is a Pong that has not started to leave: a newer Pong replaces it.
    pong_at_tail: bool,
}

impl OutQueue {
    /// An empty queue holding at most `limit` unsent bytes.
    pub fn new(limit: usize) -> OutQueue {
        OutQueue {
            chunks: VecDeque::new(),
            len: 0,
            offset: 0,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            stalled_since: 0,
            is_stalled: false,
            overflowed: false,
            pong_at_tail: false,
        }
    }

    /// Appends a chunk if it fits within the limit. Returns false, and marks the queue
    /// overflowed, when it does not.
    pub fn push(&mut self, chunk: Bytes) -> bool {
        if self.overflowed || self.len + chunk.len() > self.limit as usize {
            self.overflowed = true;
            return false;
        }
        self.push_unchecked(chunk);
        true
    }

    /// Appends a Pong. RFC 6455 §5.5.3 lets an endpoint answer only the most recent Ping, so
    /// a Pong still waiting at the tail is replaced: a client that pings without reading
    /// holds one Pong here, not one per Ping.
    pub fn push_pong(&mut self, pong: Bytes) -> bool {
        let started = self.chunks.len() == 1 && self.offset > 0;
        if self.pong_at_tail && !started {
            let last = self.chunks.pop_back().expect("a Pong at the tail");
            self.len -= last.len();
        }
        let pushed = self.push(pong);
        self.pong_at_tail = pushed;
        pushed
    }

    /// Appends a connection's last chunk (its Close frame or HTTP response) whatever the
    /// limit: nothing may follow it, so it costs at most one chunk per connection.
    pub fn push_final(&mut self, chunk: Bytes) {
        self.push_unchecked(chunk);
    }

    fn push_unchecked(&mut self, chunk: Bytes) {
        self.pong_at_tail = false;
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// True once a push was refused for going over the limit.
    pub fn is_overflowed(&self) -> bool {
        self.overflowed
    }

    /// True when queued bytes have not moved for `stall` ticks.
    pub fn is_stalled(&self, now: Tick, stall: u64) -> bool {
        // Wrapping 32-bit ticks: exact for stalls under 497 days.
        let stalled_for = (now.0 as u32).wrapping_sub(self.stalled_since);
        self.is_stalled && u64::from(stalled_for) >= stall
    }

    /// Records how a flush at `now` went: a stall begins when bytes stay queued and none
    /// moved, and ends when some do.
    fn note_flush(&mut self, written: usize, now: Tick) {
        if self.is_empty() {
            self.is_stalled = false;
        } else if written > 0 || !self.is_stalled {
            self.is_stalled = true;
            self.stalled_since = now.0 as u32;
        }
    }

    /// Unsent bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when everything was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes as much as the socket takes, several chunks per `write_vectored` call. Returns
    /// the bytes written; `WouldBlock` is not an error, it just leaves bytes queued.
    ///
    /// # Errors
    /// Any other I/O error, or a zero-length write.
    pub fn write_to(&mut self, sink: &mut impl Write) -> io::Result<usize> {
        let mut written = 0;
        while !self.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let start = if i == 0 { self.offset as usize } else { 0 };
                slices[i] = IoSlice::new(&chunk[start..]);
                count += 1;
            }
            match sink.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    self.consume(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Drops every chunk not yet started, keeping a partially written one so that the byte
    /// stream stays valid frame by frame.
    pub fn keep_partial_only(&mut self) {
        let keep = usize::from(self.offset > 0);
        self.chunks.truncate(keep);
        self.pong_at_tail = false;
        self.len = self
            .chunks
            .front()
            .map_or(0, |c| c.len() - self.offset as usize);
        if keep == 0 {
            self.offset = 0;
        }
    }

    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let front = self
                .chunks
                .front()
                .expect("consumed more than queued")
                .len();
            let left = front - self.offset as usize;
            if n < left {
                self.offset += n as u32;
                return;
            }
            n -= left;
            self.offset = 0;
            self.chunks.pop_front();
            if self.chunks.is_empty() {
                self.pong_at_tail = false;
            }
        }
    }
}

/// The reactor's read buffer, shared by every connection (one thread, one reader at a time).
/// A socket is read into it in large chunks; tungstenite then copies out only what it needs,
/// so a connection's own buffer holds at most a partial frame.
///
/// It is also each connection's read budget for one loop pass: one socket read of at most
/// its size. A connection that filled it may have more waiting in the kernel, which stays
/// there until the next pass, so a flooding client costs one buffer of parsing per pass and
/// everyone else gets their turn.
///
/// Invariant: empty between connections. A connection's pass starts with
/// [`begin`](SharedInput::begin) and reads messages until `next_message` returns `None`,
/// which drains it completely, or stops early because the connection is closing anyway.
pub struct SharedInput {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The current connection has had its one socket read of this pass.
    has_read: bool,
    /// The pass's read filled the buffer: the socket may hold more.
    budget_spent: bool,
}

impl SharedInput {
    /// A shared buffer of `size` bytes.
    pub fn new(size: usize) -> SharedInput {
        SharedInput {
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            has_read: false,
            budget_spent: false,
        }
    }

    /// Starts one connection's turn: empty, with a fresh read budget.
    pub fn begin(&mut self) {
        self.start = 0;
        self.end = 0;
        self.has_read = false;
        self.budget_spent = false;
    }

    /// Whether the connection whose turn it is may have more waiting in the kernel.
    pub fn readiness(&self) -> Readiness {
        if self.budget_spent {
            Readiness::MayHaveMore
        } else {
            Readiness::Drained
        }
    }
}

/// The stream tungstenite sees: reads come from the socket through the shared input, writes
/// go to the `OutQueue` (and so never block).
struct WsIo<'a> {
    socket: &'a mut TcpStream,
    input: Option<&'a mut SharedInput>,
    out: &'a mut OutQueue,
}

impl Read for WsIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(input) = self.input.as_deref_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if input.start == input.end {
            if input.has_read {
                // One read per connection and pass; the rest waits in the kernel. A read that
                // filled the buffer may have left more there; a short one emptied the socket,
                // and new bytes bring a new readiness event.
                input.budget_spent = input.end == input.buf.len();
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.socket.read(&mut input.buf)?;
            input.has_read = true;
            input.start = 0;
            input.end = n;
        }
        let n = buf.len().min(input.end - input.start);
        buf[..n].copy_from_slice(&input.buf[input.start..input.start + n]);
        input.start += n;
        Ok(n)
    }
}

impl Write for WsIo<'_> {
    /// tungstenite writes only Pongs and Close frames (everything else is pre-framed and
    /// queued directly), one frame per call. A Pong over the limit is refused by the queue,
    /// which makes the connection a slow consumer; tungstenite is told it was written, so it
    /// keeps no copy either.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let chunk = Bytes::copy_from_slice(buf);
        if is_pong_frame(buf) {
            self.out.push_pong(chunk);
        } else {
            self.out.push_final(chunk);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An open WebSocket.
struct Session {
    ws: WebSocketContext,
    subscriptions: Vec<ChannelId>,
    last_seen: Tick,
    /// Client messages allowed (`rate_limit`, `rate_burst`).
    messages: TokenBucket,
    /// Messages dropped by the limit since the bucket was last full.
    strikes: u32,
    /// The authenticated user and when their token expires; `None` with auth off.
    auth: Option<Box<(Identity, Tick)>>,
}

/// What a WebSocket session leaves behind when it ends.
#[derive(Debug)]
pub struct Ended {
    /// Channels to leave.
    pub subscriptions: Vec<ChannelId>,
    /// The authenticated user, to forget.
    pub user: Option<Box<str>>,
}

/// The rate limit's verdict on one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the limit.
    Accepted,
    /// Over the limit: drop it. `strikes` counts drops since the client last calmed down.
    Limited {
        /// Drops so far.
        strikes: u32,
    },
}

enum Phase {
    Request { head: Vec<u8> },
    WebSocket(Box<Session>),
    Draining,
}

/// What the client sent, handed to the reactor.
#[derive(Debug)]
pub enum Inbound {
    /// A text message.
    Text(tungstenite::Utf8Bytes),
    /// A binary message (refused with an error reply).
    Binary,
    /// A protocol Ping (already answered): it counts toward the message rate limit.
    Ping,
}

/// Whether a read pass left the socket empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The socket would block: wait for the next readiness event.
    Drained,
    /// The pass's read budget ran out: the socket may hold more, read it next pass.
    MayHaveMore,
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
    /// The peer broke RFC 6455 or a limit: close with this code.
    Violation(CloseCode, &'static str, DisconnectReason),
}

/// One TCP connection on the WebSocket port.
pub struct ClientConn {
    /// This connection's identity.
    pub id: ConnId,
    /// The peer's address, for logs.
    pub peer: SocketAddr,
    /// The timer currently armed for this connection: handshake deadline, heartbeat, or drain
    /// deadline, depending on the phase.
    pub timer: Option<TimerKey>,
    /// True while the connection sits in the reactor's dirty list.
    pub is_dirty: bool,
    /// True while WRITABLE interest is registered (only while a write would block).
    pub wants_writable: bool,
    /// Why the connection is being closed, once that is decided.
    pub close_reason: Option<DisconnectReason>,
    /// When the oldest event still queued here was read from its publisher, in microseconds
    /// since the server started; 0 when no event is queued.
    pub event_pending_since_us: u64,
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
            is_dirty: false,
            wants_writable: false,
            close_reason: None,
            event_pending_since_us: 0,
            socket,
            phase: Phase::Request { head: Vec::new() },
            out: OutQueue::new(max_output_buffer),
            write_shut: false,
        }
    }

    /// The socket, for (re)registration.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    /// True while the WebSocket is open and accepts frames.
    pub fn is_open(&self) -> bool {
        matches!(&self.phase, Phase::WebSocket(s) if s.ws.can_write())
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
            Phase::WebSocket(s) => Some(s.last_seen),
            _ => None,
        }
    }

    /// Charges one client message to the rate limit.
    pub fn admit_message(&mut self, rate: Rate, now: Tick) -> Admission {
        let Phase::WebSocket(session) = &mut self.phase else {
            return Admission::Accepted;
        };
        if session.messages.is_full(rate, now) {
            session.strikes = 0;
        }
        if session.messages.try_take(rate, now) {
            Admission::Accepted
        } else {
            session.strikes += 1;
            Admission::Limited {
                strikes: session.strikes,
            }
        }
    }

    /// True when this WebSocket is subscribed to `channel`.
    pub fn is_subscribed(&self, channel: ChannelId) -> bool {
        matches!(&self.phase, Phase::WebSocket(s) if s.subscriptions.contains(&channel))
    }

    /// The channels this WebSocket is subscribed to.
    pub fn subscriptions_mut(&mut self) -> Option<&mut Vec<ChannelId>> {
        match &mut self.phase {
            Phase::WebSocket(s) => Some(&mut s.subscriptions),
            _ => None,
        }
    }

    /// Reads the request head until it is complete, refused, or the socket is drained.
    pub fn read_request(
        &mut self,
        max_header_size: usize,
        origins: &OriginPolicy,
    ) -> RequestOutcome {
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
            match http::parse_request(head, max_header_size, origins) {
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

    /// Queues the 101 response and opens the WebSocket; `rest` holds bytes the client sent
    /// after its request head.
    pub fn upgrade(
        &mut self,
        accept_key: &str,
        rest: Vec<u8>,
        config: WebSocketConfig,
        rate: Rate,
        now: Tick,
    ) {
        // The first chunk of an empty queue: it always fits (`max_output_buffer` ≥ 1 KiB).
        let pushed = self
            .out
            .push(Bytes::from(http::switching_protocols(accept_key)));
        debug_assert!(pushed);
        let ws = WebSocketContext::from_partially_read(rest, Role::Server, Some(config));
        self.phase = Phase::WebSocket(Box::new(Session {
            ws,
            subscriptions: Vec::new(),
            last_seen: now,
            messages: TokenBucket::full(rate, now),
            strikes: 0,
            auth: None,
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
        let Phase::WebSocket(session) = &mut self.phase else {
            return Ok(None);
        };
        let mut io = WsIo {
            socket: &mut self.socket,
            input: Some(input),
            out: &mut self.out,
        };
        loop {
            let message = match session.ws.read(&mut io) {
                Ok(message) => message,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_end(e)),
            };
            // Any frame counts as life (RFC 6455 pings, pongs, data).
            session.last_seen = now;
            match message {
                Message::Text(text) => return Ok(Some(Inbound::Text(text))),
                Message::Binary(_) => return Ok(Some(Inbound::Binary)),
                // tungstenite queues the Pong on its next read or write.
                Message::Ping(_) => return Ok(Some(Inbound::Ping)),
                // A close is answered on the next read.
                Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Queues a reply, if the WebSocket still accepts frames. Replies are framed here rather
    /// than by tungstenite so its internal write buffer is never allocated for them.
    pub fn send_reply(&mut self, reply: &Reply<'_>) {
        self.send_frame(wire::text_frame(reply.to_json().as_bytes()));
    }

    /// Queues a protocol-level Ping with an empty payload: a static frame, no allocation.
    pub fn send_ping(&mut self) {
        const PING: &[u8] = &[0x89, 0x00];
        self.send_frame(Bytes::from_static(PING));
    }

    /// Queues a shared, pre-encoded frame. Returns false when the WebSocket no longer accepts
    /// frames, or the frame would go over `max_output_buffer` (see [`is_slow`](Self::is_slow)).
    pub fn send_frame(&mut self, frame: Bytes) -> bool {
        self.is_open() && self.out.push(frame)
    }

    /// Queues a Close frame, if the WebSocket can still send one. Nothing may follow it.
    pub fn send_close(&mut self, code: CloseCode, reason: &'static str) {
        if let Phase::WebSocket(session) = &mut self.phase
            && session.ws.can_write()
        {
            let mut io = WsIo {
                socket: &mut self.socket,
                input: None,
                out: &mut self.out,
            };
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let sent = session.ws.close(&mut io, Some(frame));
            debug_assert!(sent.is_ok(), "{sent:?}");
        }
    }

    /// Moves to `Draining`. Returns what the session held when the connection was an open
    /// WebSocket, `None` otherwise.
    pub fn end_session(&mut self) -> Option<Ended> {
        match std::mem::replace(&mut self.phase, Phase::Draining) {
            Phase::WebSocket(session) => {
                let Session {
                    subscriptions,
                    auth,
                    ..
                } = *session;
                Some(Ended {
                    subscriptions,
                    user: auth.map(|auth| auth.0.user),
                })
            }
            Phase::Request { .. } | Phase::Draining => None,
        }
    }

    /// Records who the client is and when its token expires.
    pub fn set_identity(&mut self, identity: Identity, expires: Tick) {
        if let Phase::WebSocket(session) = &mut self.phase {
            session.auth = Some(Box::new((identity, expires)));
        }
    }

    /// The authenticated user and their token's expiry tick.
    pub fn identity(&self) -> Option<&(Identity, Tick)> {
        match &self.phase {
            Phase::WebSocket(session) => session.auth.as_deref(),
            _ => None,
        }
    }

    /// Drops queued frames that have not started to leave (slow consumer), keeping the byte
    /// stream valid.
    pub fn discard_output(&mut self) {
        self.out.keep_partial_only();
    }

    /// Writes queued output. When draining and everything is written, shuts the write side.
    /// Returns the bytes written.
    ///
    /// # Errors
    /// A fatal socket error; the connection must be dropped.
    pub fn flush(&mut self, now: Tick) -> io::Result<usize> {
        let written = self.out.write_to(&mut self.socket)?;
        self.out.note_flush(written, now);
        if self.out.is_empty() && self.is_draining() && !self.write_shut {
            self.write_shut = true;
            // The peer may already be gone; dropping the connection then is right anyway.
            let _ = self.socket.shutdown(Shutdown::Write);
        }
        Ok(written)
    }

    /// While draining: discards input. Returns true once the peer has closed.
    pub fn discard_input(&mut self) -> bool {
        let mut sink = [0u8; 2048];
        loop {
            match self.socket.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// True when the request phase is still running (the handshake deadline applies).
    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Request { .. })
    }
}

/// True when `frame` is exactly one unmasked Pong frame, as tungstenite writes them.
fn is_pong_frame(frame: &[u8]) -> bool {
    const FIN_PONG: u8 = 0x8A;
    matches!(frame, [FIN_PONG, len, ..] if usize::from(*len) <= 125 && frame.len() == 2 + usize::from(*len))
}

fn read_end(error: WsError) -> ReadEnd {
    match error {
        WsError::ConnectionClosed | WsError::AlreadyClosed => ReadEnd::Closed,
        WsError::Io(_) | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ReadEnd::Reset
        }
        WsError::Capacity(_) => ReadEnd::Violation(
            CloseCode::Size,
            "message too big",
            DisconnectReason::MessageTooBig,
        ),
        WsError::Utf8(_) => ReadEnd::Violation(
            CloseCode::Invalid,
            "invalid UTF-8",
            DisconnectReason::InvalidUtf8,
        ),
        _ => ReadEnd::Violation(
            CloseCode::Protocol,
            "protocol error",
            DisconnectReason::ProtocolError,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `limit` bytes per call, then blocks.
    struct Trickle {
        taken: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == 3 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.limit - n);
                self.taken.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_vectored_writes_keep_order() {
        let mut queue = OutQueue::new(usize::MAX);
        for chunk in ["abc", "defg", "h", "ijkl"] {
            queue.push(Bytes::from_static(chunk.as_bytes()));
        }
        let mut sink = Trickle {
            taken: Vec::new(),
            limit: 5,
            calls: 0,
        };
        assert_eq!(queue.write_to(&mut sink).unwrap(), 12);
        assert_eq!(sink.taken, b"abcdefghijkl");
        assert!(queue.is_empty());

        queue.push(Bytes::from_static(b"0123456789"));
        queue.push(Bytes::from_static(b"xyz"));
        let mut sink = Trickle {
            taken: Vec::new(),
            limit: 2,
            calls: 2,
        };
        assert_eq!(
            queue.write_to(&mut sink).unwrap(),
            2,
            "one write, then WouldBlock"
        );
        assert_eq!(queue.len(), 11);
        queue.keep_partial_only();
        assert_eq!(
            queue.len(),
            8,
            "the started chunk stays, the rest is dropped"
        );
    }

    #[test]
    fn every_chunk_counts_against_the_limit_but_the_last_words() {
        let mut queue = OutQueue::new(10);
        assert!(queue.push(Bytes::from_static(b"12345678")));
        assert!(!queue.push(Bytes::from_static(b"abc")), "over the limit");
        assert!(queue.is_overflowed());
        assert!(
            !queue.push(Bytes::from_static(b"a")),
            "an overflowed queue takes nothing"
        );
        queue.push_final(Bytes::from_static(b"close frame"));
        assert_eq!(queue.len(), 19, "the close frame goes in regardless");
    }

    #[test]
    fn only_the_most_recent_pong_waits() {
        let pong = |payload: &'static [u8]| {
            let mut frame = vec![0x8A, payload.len() as u8];
            frame.extend_from_slice(payload);
            Bytes::from(frame)
        };
        let mut queue = OutQueue::new(1024);
        for n in 0..1000u32 {
            queue.push_pong(Bytes::from(n.to_be_bytes().to_vec()));
        }
        assert_eq!(queue.len(), 4, "1000 Pongs in a row leave one");
        assert!(is_pong_frame(&pong(b"hi")));
        assert!(!is_pong_frame(&[0x88, 0x02, 0x03, 0xE8]), "a Close frame");
        assert!(!is_pong_frame(&[0x8A, 0x05, 1]), "a truncated Pong");
        queue.push(Bytes::from_static(b"event"));
        queue.push_pong(pong(b"a"));
        queue.push_pong(pong(b"b"));
        assert_eq!(
            queue.len(),
            4 + 5 + 3,
            "an event in between keeps the earlier Pong"
        );
        let mut sink = Trickle {
            taken: Vec::new(),
            limit: 1000,
            calls: 0,
        };
        queue.write_to(&mut sink).unwrap();
        assert_eq!(&sink.taken[9..], &pong(b"b")[..]);
    }
}
