//! A client's compressed messages, inflated before tungstenite sees them (tungstenite 0.30
//! knows no extensions and fails every frame with RSV1 set).
//!
//! [`Inflating`] sits between the socket's bytes and tungstenite on a connection that agreed
//! to permessage-deflate. Frames pass through untouched, except those of a compressed message
//! (RSV1 on its first frame): their payloads are unmasked and gathered until its last frame,
//! inflated in one go by the reactor's one [`Inflater`], and handed on as one final, plain
//! frame masked with a zero key, so tungstenite checks it as any client frame (UTF-8, size,
//! its order among control frames).
//!
//! Invariants: the gathered compressed bytes and the inflated message are each capped at
//! `max_message_size` (over it: 1009), and both are freed once the message is handed on. The
//! client agreed to `client_no_context_takeover`, so no inflater state outlives a message and
//! one inflater serves every connection. An [`Inflating`] exists only while a connection is
//! being read, and is dropped once [at rest](Inflating::is_at_rest): an idle connection that
//! agreed to compression holds nothing more than one that did not.

use std::fmt;
use std::io::{self, Cursor, Read};

use flate2::{Decompress, FlushDecompress, Status};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// The longest frame header: 2 bytes, 8 of length, 4 of mask.
const MAX_HEADER: usize = 14;
/// What RFC 7692 7.2.2 appends to a message's payload before inflating it.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Compressed payload read per step, so a large frame grows its buffer as it arrives.
const GATHER_STEP: usize = 16 * 1024;
/// A handed-on buffer up to this size is kept for the next frame; a larger one is freed.
const KEEP: usize = 256;

/// Why a compressed message ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// Compressed or inflated, it is larger than `max_message_size` (1009).
    TooBig,
    /// Not a valid deflate stream, or a data frame in the middle of a compressed message
    /// (1002).
    Invalid,
}

impl fmt::Display for InflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InflateError::TooBig => "compressed message over max_message_size",
            InflateError::Invalid => "invalid compressed message",
        })
    }
}

impl std::error::Error for InflateError {}

impl From<InflateError> for io::Error {
    fn from(e: InflateError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl InflateError {
    /// The inflate error an I/O error carries, if it carries one.
    pub fn of(e: &io::Error) -> Option<InflateError> {
        e.get_ref()?.downcast_ref::<InflateError>().copied()
    }
}

/// The reactor's one inflater, shared by every connection (one message at a time), and the
/// size bound of a message.
pub struct Inflater {
    decompress: Decompress,
    limit: usize,
}

impl Inflater {
    /// An inflater for messages of at most `limit` bytes, compressed or not.
    pub fn new(limit: usize) -> Inflater {
        Inflater {
            decompress: Decompress::new(false),
            limit,
        }
    }

    /// Appends the inflated `payload` (a whole compressed message, as its frames carried it)
    /// to `out`.
    ///
    /// # Errors
    /// [`InflateError::TooBig`] past the limit, [`InflateError::Invalid`] for what is not a
    /// deflate stream.
    pub fn inflate(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), InflateError> {
        self.decompress.reset(false);
        let start = out.len();
        let cap = start + self.limit + 1;
        for part in [payload, &TAIL] {
            let mut consumed = 0;
            loop {
                if out.len() == out.capacity() {
                    let grow = (out.len() - start).max(payload.len() * 2).max(1024);
                    out.reserve_exact(grow.min(cap - out.len()));
                }
                let (in_before, out_before) = (self.decompress.total_in(), out.len());
                let status = self
                    .decompress
                    .decompress_vec(&part[consumed..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Invalid)?;
                let took = (self.decompress.total_in() - in_before) as usize;
                consumed += took;
                if out.len() - start > self.limit {
                    return Err(InflateError::TooBig);
                }
                let room = out.len() < out.capacity();
                let stalled = took == 0 && out.len() == out_before;
                match status {
                    // Bytes after the final block are none of the message's.
                    Status::StreamEnd => return Ok(()),
                    _ if consumed == part.len() && room => break,
                    _ if stalled && room => return Err(InflateError::Invalid),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// The frame being read.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// Its header, not complete yet.
    Header,
    /// A passed-through frame: payload bytes still to hand on as they are.
    Pass(u64),
    /// A frame of a compressed message: payload bytes still to gather.
    Gather {
        left: u64,
        mask: [u8; 4],
        /// Payload bytes of this frame gathered so far (the mask's phase).
        done: usize,
        /// The message's last frame.
        last: bool,
    },
}

/// One connection's inbound side once permessage-deflate is agreed.
#[derive(Default)]
pub struct Inflating {
    /// Bytes the client sent right after its request head, read before the socket.
    early: Vec<u8>,
    frames: Frames,
}

impl Inflating {
    /// Reads `early` (what followed the request head) before the socket.
    pub fn prepend(&mut self, early: Vec<u8>) {
        self.early = early;
    }

    /// True between messages: nothing read that tungstenite has not been handed, no frame
    /// or message under way. The connection may then drop this state and start afresh.
    pub fn is_at_rest(&self) -> bool {
        let frames = &self.frames;
        self.early.is_empty()
            && frames.header_len == 0
            && matches!(frames.body, Body::Header)
            && frames.compressed.is_none()
            && !frames.plain_fragmented
            && frames.ready_at >= frames.ready.len()
    }

    /// Fills `buf` with what tungstenite reads, taking frames from `raw`.
    ///
    /// # Errors
    /// What `raw` returns, or an [`InflateError`] inside an `InvalidData` error.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        raw: &mut impl Read,
        inflater: &mut Inflater,
    ) -> io::Result<usize> {
        if self.early.is_empty() {
            return self.frames.read(buf, raw, inflater);
        }
        let mut source = EarlyFirst {
            early: &mut self.early,
            raw,
        };
        self.frames.read(buf, &mut source, inflater)
    }
}

/// The early bytes, then the socket's.
struct EarlyFirst<'a, R> {
    early: &'a mut Vec<u8>,
    raw: &'a mut R,
}

impl<R: Read> Read for EarlyFirst<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.early.is_empty() {
            return self.raw.read(buf);
        }
        let n = buf.len().min(self.early.len());
        buf[..n].copy_from_slice(&self.early[..n]);
        self.early.drain(..n);
        if self.early.is_empty() {
            *self.early = Vec::new();
        }
        Ok(n)
    }
}

/// The frame-by-frame state of [`Inflating`].
struct Frames {
    header: [u8; MAX_HEADER],
    header_len: usize,
    body: Body,
    /// A compressed message being gathered: its opcode and payload so far (unmasked).
    compressed: Option<(OpCode, Vec<u8>)>,
    /// A plain fragmented message is under way: its continuations pass through.
    plain_fragmented: bool,
    /// Bytes for tungstenite (a passed-through header, an inflated message as one frame)
    /// from `ready_at` on.
    ready: Vec<u8>,
    ready_at: usize,
}

impl Default for Frames {
    fn default() -> Frames {
        Frames {
            header: [0; MAX_HEADER],
            header_len: 0,
            body: Body::Header,
            compressed: None,
            plain_fragmented: false,
            ready: Vec::new(),
            ready_at: 0,
        }
    }
}

impl Frames {
    fn read(
        &mut self,
        buf: &mut [u8],
        raw: &mut impl Read,
        inflater: &mut Inflater,
    ) -> io::Result<usize> {
        loop {
            if self.ready_at < self.ready.len() {
                let n = buf.len().min(self.ready.len() - self.ready_at);
                buf[..n].copy_from_slice(&self.ready[self.ready_at..self.ready_at + n]);
                self.ready_at += n;
                if self.ready_at == self.ready.len() {
                    self.ready_at = 0;
                    self.ready.clear();
                    if self.ready.capacity() > KEEP {
                        self.ready = Vec::new();
                    }
                }
                return Ok(n);
            }
            match self.body {
                Body::Pass(left) => {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = raw.read(&mut buf[..want])?;
                    if n > 0 {
                        self.body = match left - n as u64 {
                            0 => Body::Header,
                            left => Body::Pass(left),
                        };
                    }
                    return Ok(n);
                }
                Body::Gather { .. } => {
                    if !self.gather(raw, inflater)? {
                        return Ok(0);
                    }
                }
                Body::Header => {
                    let need = header_size(&self.header[..self.header_len]);
                    if self.header_len < need {
                        let n = raw.read(&mut self.header[self.header_len..need])?;
                        if n == 0 {
                            return Ok(0);
                        }
                        self.header_len += n;
                    } else {
                        self.on_header(inflater.limit)?;
                    }
                }
            }
        }
    }

    /// A complete header: the frame is gathered (part of a compressed message) or passed on.
    fn on_header(&mut self, limit: usize) -> Result<(), InflateError> {
        let bytes = &self.header[..self.header_len];
        self.header_len = 0;
        let Ok(Some((header, len))) = FrameHeader::parse(&mut Cursor::new(bytes)) else {
            // Let tungstenite judge what it cannot parse either.
            self.ready.extend_from_slice(bytes);
            self.body = Body::Header;
            return Ok(());
        };
        let reserved = header.rsv2 || header.rsv3;
        let data = matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        let continuation = header.opcode == OpCode::Data(Data::Continue);
        let gathering = match (header.mask, &self.compressed) {
            (Some(_), None) => header.rsv1 && !reserved && data && !self.plain_fragmented,
            (Some(_), Some(_)) if data => return Err(InflateError::Invalid),
            (Some(_), Some(_)) => continuation && !header.rsv1 && !reserved,
            (None, _) => false,
        };
        if !gathering {
            if data && !header.rsv1 {
                self.plain_fragmented = !header.is_final;
            } else if continuation && self.compressed.is_none() && header.is_final {
                self.plain_fragmented = false;
            }
            self.ready.extend_from_slice(bytes);
            self.body = match len {
                0 => Body::Header,
                len => Body::Pass(len),
            };
            return Ok(());
        }
        let (_, payload) = self
            .compressed
            .get_or_insert_with(|| (header.opcode, Vec::new()));
        if payload.len() as u64 + len > limit as u64 {
            return Err(InflateError::TooBig);
        }
        self.body = Body::Gather {
            left: len,
            mask: header.mask.unwrap_or_default(),
            done: 0,
            last: header.is_final,
        };
        Ok(())
    }

    /// Reads payload of a compressed message's frame; after its last frame, inflates the
    /// message into `ready`. Returns false at EOF.
    fn gather(&mut self, raw: &mut impl Read, inflater: &mut Inflater) -> io::Result<bool> {
        let Body::Gather {
            left,
            mask,
            done,
            last,
        } = &mut self.body
        else {
            return Ok(true);
        };
        let (opcode, payload) = self.compressed.as_mut().expect("gathering a message");
        if *left > 0 {
            let start = payload.len();
            let step = GATHER_STEP.min(usize::try_from(*left).unwrap_or(usize::MAX));
            payload.resize(start + step, 0);
            let read = raw.read(&mut payload[start..]);
            let n = *read.as_ref().unwrap_or(&0);
            payload.truncate(start + n);
            read?;
            if n == 0 {
                return Ok(false);
            }
            for (i, byte) in payload[start..].iter_mut().enumerate() {
                *byte ^= mask[(*done + i) % 4];
            }
            *done += n;
            *left -= n as u64;
            if *left > 0 {
                return Ok(true);
            }
        }
        let last = *last;
        let opcode = *opcode;
        self.body = Body::Header;
        if last {
            let (_, payload) = self.compressed.take().expect("gathering a message");
            self.ready.clear();
            self.ready.resize(MAX_HEADER, 0);
            inflater.inflate(&payload, &mut self.ready)?;
            let len = (self.ready.len() - MAX_HEADER) as u64;
            let header = FrameHeader {
                opcode,
                mask: Some([0; 4]),
                ..FrameHeader::default()
            };
            self.ready_at = MAX_HEADER - header.len(len);
            header
                .format(len, &mut &mut self.ready[self.ready_at..MAX_HEADER])
                .expect("the header fits the room kept for it");
        }
        Ok(true)
    }
}

/// How long the header starting with `bytes` is (2 until its second byte is known).
fn header_size(bytes: &[u8]) -> usize {
    let Some(second) = bytes.get(1) else {
        return 2;
    };
    let length = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + length + if second & 0x80 != 0 { 4 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// A message as a browser compresses it (no context takeover).
    pub fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut compress = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(payload.len() + 64);
        compress
            .compress_vec(payload, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let header = FrameHeader {
            is_final: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            rsv2: first & 0x20 != 0,
            opcode: OpCode::from(first & 0x0f),
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Everything tungstenite would read from `wire`, in reads of `step` bytes.
    fn through(wire: &[u8], limit: usize, step: usize) -> Result<Vec<u8>, InflateError> {
        let mut raw = Chunked { bytes: wire, step };
        let mut inflating = Inflating::default();
        let mut inflater = Inflater::new(limit);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match inflating.read(&mut buf, &mut raw, &mut inflater) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(InflateError::of(&e).unwrap()),
            }
        }
    }

    struct Chunked<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    /// The payloads and opcodes of the frames in `bytes`, unmasked.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let mut cursor = Cursor::new(bytes);
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            let at = cursor.position() as usize;
            let mask = header.mask.unwrap();
            let payload = bytes[at..at + len as usize]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            out.push((bytes[0], payload));
            bytes = &bytes[at + len as usize..];
        }
        out
    }

    #[test]
    fn compressed_messages_reach_tungstenite_plain_and_the_rest_untouched() {
        let text = br#"{"type":"subscribe","channels":["a","b","c","a","b","c","a","b","c"]}"#;
        let packed = deflated(text);
        let (one, two) = packed.split_at(packed.len() / 2);
        let mut wire = frame(0x89, b"ping");
        wire.extend(frame(0xC1, &packed)); // FIN, RSV1, text
        wire.extend(frame(0x01, b"plain ")); // a plain fragmented text
        wire.extend(frame(0x80, b"message"));
        wire.extend(frame(0x41, one)); // RSV1, text, not final
        wire.extend(frame(0x89, b"")); // a Ping between fragments passes at once
        wire.extend(frame(0x80, two)); // FIN, continuation
        for step in [1, 3, 1000] {
            let seen = frames(&through(&wire, 64 * 1024, step).unwrap());
            assert_eq!(
                seen,
                vec![
                    (0x89, b"ping".to_vec()),
                    (0x81, text.to_vec()),
                    (0x01, b"plain ".to_vec()),
                    (0x80, b"message".to_vec()),
                    (0x89, vec![]),
                    (0x81, text.to_vec()),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit_compressed_or_inflated() {
        let bomb = deflated(&vec![b' '; 1 << 20]);
        assert!(bomb.len() < 2048, "{}", bomb.len());
        assert_eq!(
            through(&frame(0xC1, &bomb), 64 * 1024, 4096),
            Err(InflateError::TooBig)
        );
        let exactly = deflated(&vec![b' '; 1000]);
        assert!(through(&frame(0xC1, &exactly), 1000, 4096).is_ok());
        assert_eq!(
            through(&frame(0xC1, &exactly), 999, 4096),
            Err(InflateError::TooBig)
        );
        let long = vec![7u8; 2000];
        assert_eq!(
            through(&frame(0xC2, &long), 1000, 4096),
            Err(InflateError::TooBig),
            "compressed bytes over the limit are refused before they are read"
        );
    }

    #[test]
    fn broken_streams_and_interleaved_messages_are_invalid() {
        assert_eq!(
            through(&frame(0xC1, &[0xff; 40]), 1024, 64),
            Err(InflateError::Invalid)
        );
        let mut wire = frame(0x41, &deflated(b"half"));
        wire.extend(frame(0x81, b"a new message before the last one ended"));
        assert_eq!(through(&wire, 1024, 64), Err(InflateError::Invalid));
    }

    #[test]
    fn what_tungstenite_must_refuse_is_passed_on_for_it_to_refuse() {
        for wire in [
            frame(0xC9, b"compressed ping"),
            frame(0xE1, b"rsv2 too"),
            frame(0xC0, b"rsv1 on a stray continuation"),
        ] {
            assert_eq!(through(&wire, 1024, 64).unwrap(), wire);
        }
    }
}
