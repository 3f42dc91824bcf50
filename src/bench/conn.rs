//! One load-generator client, over a WebSocket or a Server-Sent Events stream: non-blocking,
//! messages parsed in place from the reactor's shared read buffer. A connection keeps bytes
//! of its own only while a frame (or an SSE message) is split across reads, and an event in
//! sidecast's field order is read at fixed offsets, so receiving one allocates nothing; any
//! other server's messages are parsed as JSON, whatever the order of their fields.
//!
//! It understands exactly what sidecast sends: over a WebSocket, a 101 response, then
//! unmasked frames whose text payloads are `connected`, `subscribed` and `event` messages
//! (Pings are answered with Pongs), compressed ones (RSV1) inflated into the runner's shared
//! buffer when it offered permessage-deflate; over `/sse`, a 200 response, then messages whose
//! `data:` line holds the same JSON (comment heartbeats are skipped).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read, Write};

use mio::net::TcpStream;

use crate::ws::deflate::Inflater;

/// What a connection reports to the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// `subscribed`, with the channel's sequence number at that moment.
    Subscribed(u64),
    /// An ack of this seq of its channel was queued, to be written at the end of this read.
    Acked(u64),
    /// A presence snapshot (`snapshot`) or diff of its channel: its version, and the members
    /// it lists (a diff: those that joined).
    Presence {
        /// A snapshot, not a diff.
        snapshot: bool,
        /// Its version.
        version: u64,
        /// Members listed.
        members: usize,
    },
    /// An event with the publish timestamp `t` from its data.
    Event {
        /// Microseconds since the bench started, written by the publisher.
        sent_us: u64,
        /// Events skipped before this one (a gap in the sequence numbers).
        skipped: u64,
        /// True when this sequence number was already received.
        repeated: bool,
    },
}

/// How a client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `GET /ws`, a subscribe message.
    #[value(name = "websocket")]
    WebSocket,
    /// `GET /sse?channels=...`.
    Sse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the response head.
    Upgrading,
    /// Reading frames.
    Open,
}

/// One benchmark client.
pub struct BenchConn {
    /// The socket.
    pub socket: TcpStream,
    /// The channel this client subscribes to.
    pub channel: usize,
    /// The next sequence number expected on the channel.
    pub next_seq: u64,
    phase: Phase,
    /// Bytes of an incomplete response head or frame.
    partial: Vec<u8>,
    /// Bytes the socket did not take yet.
    pending: Vec<u8>,
    /// The subscribe frame, sent once the upgrade is answered (RFC 6455 4.1: a client sends
    /// nothing more before the server's response; tungstenite servers refuse what does).
    subscribe: Vec<u8>,
    /// `{"type":"event","channel":"<channel>","seq":`: events are parsed at fixed offsets
    /// after it rather than searched, which keeps the generator off the critical path.
    event_prefix: Box<[u8]>,
    /// `{"type":"presence","channel":"<channel>","version":`, and the same for diffs.
    presence_prefixes: [Box<[u8]>; 2],
    channel_name: Box<str>,
    transport: Transport,
    /// It offered permessage-deflate, and needs the server to agree.
    deflate: bool,
}

/// The runner's inflater of compressed frames. Every subscriber of a channel gets the same
/// compressed bytes for an event, so each distinct frame is inflated once and its text kept
/// for the others (a few thousand recent frames at most), looked up with a cheap
/// multiply-rotate hash: the generator then spends per delivery about what it spends on a
/// plain frame, and stays off the critical path.
pub struct Inflate {
    inflater: Inflater,
    inflated: HashMap<Box<[u8]>, Box<[u8]>, BuildHasherDefault<Quick>>,
    out: Vec<u8>,
}

/// Inflated frames kept at most; the cache starts over past it.
const INFLATED_KEPT: usize = 4096;

impl Default for Inflate {
    fn default() -> Inflate {
        Inflate {
            inflater: Inflater::new(16 << 20),
            inflated: HashMap::default(),
            out: Vec::with_capacity(64 * 1024),
        }
    }
}

impl Inflate {
    /// The text of a compressed frame's `payload`.
    fn text(&mut self, payload: &[u8]) -> Result<&[u8], ConnFailure> {
        if !self.inflated.contains_key(payload) {
            if self.inflated.len() >= INFLATED_KEPT {
                self.inflated.clear();
            }
            self.out.clear();
            if let Err(e) = self.inflater.inflate(payload, &mut self.out) {
                return Err(ConnFailure::Protocol(format!("compressed frame: {e}")));
            }
            self.inflated
                .insert(payload.into(), self.out.as_slice().into());
        }
        Ok(&self.inflated[payload])
    }
}

/// A hash for the generator's own frames that reads only their length and three 8-byte
/// samples (start, middle, end): no adversary here, and hashing every byte would cost more
/// than the rest of a delivery. Frames that collide are told apart by the map's full compare.
#[derive(Default)]
pub struct Quick(u64);

impl Hasher for Quick {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut mix = |word: u64| self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        mix(bytes.len() as u64);
        if bytes.len() < 8 {
            bytes.iter().for_each(|&b| mix(u64::from(b)));
            return;
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        mix(word(0));
        mix(word((bytes.len() - 8) / 2));
        mix(word(bytes.len() - 8));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Why a connection is unusable.
#[derive(Debug)]
pub enum ConnFailure {
    /// An I/O error or EOF.
    Io(io::Error),
    /// The server answered the upgrade with this HTTP status line instead of 101.
    Refused(String),
    /// The server answered something unexpected (a close frame, a broken frame).
    Protocol(String),
}

impl BenchConn {
    /// Starts a connection: the request is queued at once, and for a WebSocket the subscribe
    /// message once the 101 has come.
    pub fn new(
        socket: TcpStream,
        host: &str,
        channel: usize,
        channel_name: &str,
        transport: Transport,
        deflate: bool,
    ) -> BenchConn {
        let mut subscribe = Vec::new();
        let pending = match transport {
            Transport::WebSocket => {
                let request = format!(r#"{{"type":"subscribe","channel":"{channel_name}"}}"#);
                masked_frame(0x81, request.as_bytes(), &mut subscribe);
                let offer = if deflate {
                    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                } else {
                    ""
                };
                format!(
                    "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: c2lkZWNhc3QtYmVuY2gtMQ==\r\n{offer}\r\n"
                )
                .into_bytes()
            }
            Transport::Sse => format!(
                "GET /sse?channels={channel_name} HTTP/1.1\r\nHost: {host}\r\n\
                 Accept: text/event-stream\r\n\r\n"
            )
            .into_bytes(),
        };
        let event_prefix = format!(r#"{{"type":"event","channel":"{channel_name}","seq":"#);
        let presence_prefix = |kind: &str| {
            let prefix = format!(r#"{{"type":"{kind}","channel":"{channel_name}","version":"#);
            prefix.into_bytes().into_boxed_slice()
        };
        BenchConn {
            presence_prefixes: [
                presence_prefix("presence"),
                presence_prefix("presence_diff"),
            ],
            event_prefix: event_prefix.into_bytes().into_boxed_slice(),
            channel_name: channel_name.into(),
            socket,
            channel,
            next_seq: 0,
            phase: Phase::Upgrading,
            partial: Vec::new(),
            pending,
            subscribe,
            transport,
            deflate,
        }
    }

    /// Writes queued bytes until done or the socket would block.
    ///
    /// # Errors
    /// A fatal socket error.
    pub fn flush(&mut self) -> Result<(), ConnFailure> {
        while !self.pending.is_empty() {
            match self.socket.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnFailure::Io(e)),
            }
        }
        self.pending = Vec::new();
        Ok(())
    }

    /// Reads until the socket would block, reporting each message to `seen`; returns the
    /// bytes read. `buf` is the runner's shared read buffer, `inflate` its inflater.
    ///
    /// # Errors
    /// The connection failed or the server closed it.
    pub fn on_readable(
        &mut self,
        buf: &mut [u8],
        inflate: &mut Inflate,
        seen: &mut impl FnMut(Seen),
    ) -> Result<usize, ConnFailure> {
        let mut read = 0;
        loop {
            let n = match self.socket.read(buf) {
                Ok(0) if self.phase == Phase::Upgrading => {
                    return Err(ConnFailure::Protocol(
                        "the server closed the connection without answering the request".into(),
                    ));
                }
                Ok(0) => return Err(ConnFailure::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnFailure::Io(e)),
            };
            read += n;
            if self.partial.is_empty() {
                let used = self.consume(&buf[..n], inflate, seen)?;
                self.partial.extend_from_slice(&buf[used..n]);
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(&buf[..n]);
                let used = self.consume(&joined, inflate, seen)?;
                joined.drain(..used);
                self.partial = joined;
            }
        }
        if self.partial.is_empty() {
            self.partial = Vec::new();
        }
        self.flush()?;
        Ok(read)
    }

    /// Parses as much of `bytes` as is complete; returns how many bytes were used.
    fn consume(
        &mut self,
        bytes: &[u8],
        inflate: &mut Inflate,
        seen: &mut impl FnMut(Seen),
    ) -> Result<usize, ConnFailure> {
        let mut at = 0;
        if self.phase == Phase::Upgrading {
            let Some(end) = find(bytes, b"\r\n\r\n") else {
                return Ok(0);
            };
            let expected: &[u8] = match self.transport {
                Transport::WebSocket => b"HTTP/1.1 101",
                Transport::Sse => b"HTTP/1.1 200",
            };
            if !bytes.starts_with(expected) {
                let line = String::from_utf8_lossy(&bytes[..end])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                return Err(ConnFailure::Refused(line));
            }
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            if self.deflate && !head.contains("sec-websocket-extensions: permessage-deflate") {
                return Err(ConnFailure::Protocol(
                    "the server did not agree to permessage-deflate (--deflate)".into(),
                ));
            }
            self.phase = Phase::Open;
            at = end + 4;
            let subscribe = std::mem::take(&mut self.subscribe);
            self.pending.extend_from_slice(&subscribe);
        }
        if self.transport == Transport::Sse {
            // Messages end with a blank line; the JSON is on the `data:` line.
            while let Some(end) = find(&bytes[at..], b"\n\n") {
                let message = &bytes[at..at + end];
                if let Some(data) = message
                    .split(|&b| b == b'\n')
                    .find_map(|line| line.strip_prefix(b"data: "))
                {
                    self.on_text(data, seen);
                }
                at += end + 2;
            }
            return Ok(at);
        }
        while let Some(FrameAt {
            first,
            payload,
            len,
        }) = parse_frame(&bytes[at..])?
        {
            let payload = &bytes[at + payload.start..at + payload.end];
            match first & 0x4f {
                0x1 => self.on_text(payload, seen),
                0x41 if self.deflate => {
                    let text = inflate.text(payload)?;
                    self.on_text(text, seen);
                }
                0x9 => masked_frame(0x8A, payload, &mut self.pending),
                0xA => {}
                0x8 => {
                    let code = payload
                        .get(..2)
                        .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                    return Err(ConnFailure::Protocol(format!("server closed with {code}")));
                }
                other => {
                    let why = format!("unexpected opcode or RSV bits {other:#x}");
                    return Err(ConnFailure::Protocol(why));
                }
            }
            at += len;
        }
        Ok(at)
    }

    fn on_text(&mut self, text: &[u8], seen: &mut impl FnMut(Seen)) {
        // The fast path, for sidecast's field order:
        // {"type":"event","channel":"bench:N","seq":<seq>,"data":{"t":<t>,...}}
        if let Some(rest) = text.strip_prefix(&*self.event_prefix) {
            let Some((seq, rest)) = leading_number(rest) else {
                return;
            };
            let (ack, rest) = match rest.strip_prefix(br#","ack":true"#) {
                Some(rest) => (true, rest),
                None => (false, rest),
            };
            let Some((sent_us, _)) = rest
                .strip_prefix(br#","data":{"t":"#)
                .and_then(leading_number)
            else {
                return;
            };
            if ack {
                self.ack(seq);
                seen(Seen::Acked(seq));
            }
            return self.on_event(seq, sent_us, seen);
        }
        // Presence: the version, and the members listed (one `"clients":[` each), counted
        // without parsing lists that may hold thousands.
        for (prefix, snapshot) in self.presence_prefixes.iter().zip([true, false]) {
            if let Some((version, rest)) = text.strip_prefix(&**prefix).and_then(leading_number) {
                let members = count(rest, br#""clients":["#);
                return seen(Seen::Presence {
                    snapshot,
                    version,
                    members,
                });
            }
        }
        // Anything else is parsed as JSON: a server may order an object's fields as it likes.
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(text) else {
            return;
        };
        let seq = message["seq"].as_u64();
        match message["type"].as_str() {
            Some("subscribed") => {
                let seq = seq.unwrap_or(0);
                self.next_seq = seq + 1;
                seen(Seen::Subscribed(seq));
            }
            Some("event") if message["channel"].as_str() == Some(&self.channel_name) => {
                if let (Some(seq), Some(sent_us)) = (seq, message["data"]["t"].as_u64()) {
                    if message["ack"] == true {
                        self.ack(seq);
                        seen(Seen::Acked(seq));
                    }
                    self.on_event(seq, sent_us, seen);
                }
            }
            _ => {}
        }
    }

    /// Acknowledges event `seq` of its channel, as a page that handled it would.
    fn ack(&mut self, seq: u64) {
        // Channel names are at most 128 bytes: the message fits, and costs no allocation.
        let mut message = [0u8; 200];
        let mut rest = &mut message[..];
        let _ = write!(
            rest,
            r#"{{"type":"ack","channel":"{}","seq":{seq}}}"#,
            self.channel_name
        );
        let len = 200 - rest.len();
        masked_frame(0x81, &message[..len], &mut self.pending);
    }

    fn on_event(&mut self, seq: u64, sent_us: u64, seen: &mut impl FnMut(Seen)) {
        let repeated = seq < self.next_seq;
        let skipped = seq.saturating_sub(self.next_seq);
        self.next_seq = self.next_seq.max(seq + 1);
        seen(Seen::Event {
            sent_us,
            skipped,
            repeated,
        });
    }
}

/// Occurrences of `needle` in `haystack`.
fn count(haystack: &[u8], needle: &[u8]) -> usize {
    let mut found = 0;
    let mut at = 0;
    while let Some(i) = find(&haystack[at..], needle) {
        found += 1;
        at += i + needle.len();
    }
    found
}

/// A complete frame at the start of a buffer.
struct FrameAt {
    /// FIN, RSV bits and opcode.
    first: u8,
    payload: std::ops::Range<usize>,
    len: usize,
}

/// Parses the server frame at the start of `bytes`, or `None` when it is incomplete.
fn parse_frame(bytes: &[u8]) -> Result<Option<FrameAt>, ConnFailure> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    if bytes[0] & 0x80 == 0 || bytes[1] & 0x80 != 0 {
        return Err(ConnFailure::Protocol(
            "fragmented or masked server frame".into(),
        ));
    }
    let (len, header) = match bytes[1] & 0x7f {
        126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
        127 if bytes.len() >= 10 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(&bytes[2..10]);
            (u64::from_be_bytes(be) as usize, 10)
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    if bytes.len() < header + len {
        return Ok(None);
    }
    Ok(Some(FrameAt {
        first: bytes[0],
        payload: header..header + len,
        len: header + len,
    }))
}

/// Appends a masked client frame (RFC 6455 5.3) whose first byte (FIN, RSV bits, opcode) is
/// `first`. The fixed mask is fine for a load generator: masking protects intermediaries, not
/// the benchmark.
pub fn masked_frame(first: u8, payload: &[u8], out: &mut Vec<u8>) {
    const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x2e];
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The unsigned integer at the start of `bytes`, and what follows it.
fn leading_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut value: u64 = 0;
    for &d in &bytes[..digits] {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    (digits > 0).then_some((value, &bytes[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_of_each_length_format() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let frame = crate::ws::wire::text_frame(&payload);
            let at = parse_frame(&frame).unwrap().unwrap();
            assert_eq!(
                (at.first, at.payload.len(), at.len),
                (0x81, len, frame.len())
            );
            assert!(parse_frame(&frame[..frame.len() - 1]).unwrap().is_none() || len == 0);
        }
    }

    #[test]
    fn masked_frames_unmask_to_the_payload() {
        let mut out = Vec::new();
        masked_frame(0x81, b"hello", &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 5);
        let mask = [out[2], out[3], out[4], out[5]];
        let unmasked: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, b"hello");
    }

    /// A client of bench:0, connected to a listener nobody accepts on.
    fn client() -> (std::net::TcpListener, BenchConn) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let conn = BenchConn::new(socket, "x", 0, "bench:0", Transport::WebSocket, true);
        (listener, conn)
    }

    #[test]
    fn compressed_events_are_inflated_and_counted() {
        let (_listener, mut conn) = client();
        conn.phase = Phase::Open;
        conn.next_seq = 1;
        let plain = crate::ws::wire::event_frame(
            crate::ws::wire::EventTarget::Channel("bench:0", 1),
            format!(r#"{{"t":7,"pad":"{}"}}"#, "x".repeat(300)).as_bytes(),
            &mut Vec::new(),
        );
        let mut deflater = crate::ws::deflate::Deflater::new(16);
        let compressed = deflater.deflate(&plain).unwrap();
        let mut wire = compressed.to_vec();
        wire.extend_from_slice(&plain);
        let mut seen = Vec::new();
        let used = conn
            .consume(&wire, &mut Inflate::default(), &mut |s| seen.push(s))
            .unwrap();
        assert_eq!(used, wire.len());
        let event = |repeated| Seen::Event {
            sent_us: 7,
            skipped: 0,
            repeated,
        };
        assert_eq!(seen, vec![event(false), event(true)]);
    }

    #[test]
    fn gaps_and_repeats_are_counted() {
        let (_listener, mut conn) = client();
        let mut seen = Vec::new();
        let mut record = |s| seen.push(s);
        conn.on_text(
            br#"{"type":"subscribed","channel":"bench:0","seq":4}"#,
            &mut record,
        );
        for seq in [5, 6, 8, 8, 9] {
            let text =
                format!(r#"{{"type":"event","channel":"bench:0","seq":{seq},"data":{{"t":7}}}}"#);
            conn.on_text(text.as_bytes(), &mut record);
        }
        let event = |skipped, repeated| Seen::Event {
            sent_us: 7,
            skipped,
            repeated,
        };
        assert_eq!(
            seen,
            vec![
                Seen::Subscribed(4),
                event(0, false),
                event(0, false),
                event(1, false),
                event(0, true),
                event(0, false)
            ]
        );
    }

    #[test]
    fn another_servers_field_order_is_understood() {
        let (_listener, mut conn) = client();
        let mut seen = Vec::new();
        let mut record = |s| seen.push(s);
        conn.on_text(
            br#"{"channel":"bench:0","seq":4,"type":"subscribed"}"#,
            &mut record,
        );
        let event = br#"{"channel":"bench:0","data":{"t":7},"seq":5,"type":"event"}"#;
        conn.on_text(event, &mut record);
        let other = br#"{"channel":"bench:1","data":{"t":7},"seq":9,"type":"event"}"#;
        conn.on_text(other, &mut record);
        let event = Seen::Event {
            sent_us: 7,
            skipped: 0,
            repeated: false,
        };
        assert_eq!(seen, vec![Seen::Subscribed(4), event]);
    }
}
