//! A WebSocket client that speaks permessage-deflate (RFC 7692) over a raw TCP stream, as a
//! browser does: it offers compression, inflates frames with RSV1 set, and can send its own
//! messages compressed. tungstenite's client cannot: it knows no extensions.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::Value;

use super::PATIENCE;

/// What a sync flush ends with (RFC 7692 7.2.1): left out of frames, put back to inflate.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// `payload` deflated on its own, as a frame carries it.
pub fn deflate(payload: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 1024);
    loop {
        let before = compress.total_in() as usize;
        compress
            .compress_vec(&payload[before..], &mut out, FlushCompress::Sync)
            .unwrap();
        if compress.total_in() as usize == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

/// A compressed frame's payload, inflated.
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(input.len() * 20 + 1024);
    let mut inflater = Decompress::new(false);
    inflater
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(inflater.total_in() as usize, input.len(), "inflated whole");
    out
}

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN, RSV and opcode.
    pub first: u8,
    /// The payload as sent (compressed when RSV1 is set).
    pub payload: Vec<u8>,
}

impl Frame {
    /// RSV1: the payload is compressed.
    pub fn compressed(&self) -> bool {
        self.first & 0x40 != 0
    }

    /// The message's text: inflated when compressed.
    pub fn text(&self) -> Vec<u8> {
        if self.compressed() {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        }
    }
}

/// A client over a raw stream.
pub struct DeflateWs {
    pub stream: TcpStream,
    /// The response's `Sec-WebSocket-Extensions`, if any.
    pub agreed: Option<String>,
    buf: Vec<u8>,
}

impl DeflateWs {
    /// Upgrades on `/ws`, offering `offer` (a `Sec-WebSocket-Extensions` value) if any.
    pub fn connect(addr: SocketAddr, offer: Option<&str>) -> DeflateWs {
        DeflateWs::connect_sending(addr, offer, &[])
    }

    /// Like `connect`, sending `early` (client frames) in the same write as the request, as a
    /// client that does not wait for the 101 would.
    pub fn connect_sending(addr: SocketAddr, offer: Option<&str>, early: &[u8]) -> DeflateWs {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let offer = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let mut request = format!(
            "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
        )
        .into_bytes();
        request.extend_from_slice(early);
        stream.write_all(&request).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let agreed = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("Sec-WebSocket-Extensions")
                .then(|| value.trim().to_string())
        });
        DeflateWs {
            stream,
            agreed,
            buf: Vec::new(),
        }
    }

    /// Sends one masked frame with this first byte.
    pub fn send_frame(&mut self, first: u8, payload: &[u8]) {
        let frame = masked(first, payload);
        self.stream.write_all(&frame).unwrap();
    }
}

/// One masked client frame with this first byte (FIN, RSV bits, opcode).
pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    sidecast::bench::conn::masked_frame(first, payload, &mut frame);
    frame
}

impl DeflateWs {
    /// Sends a JSON message in one text frame, compressed or not.
    pub fn send(&mut self, value: &Value, compressed: bool) {
        let text = value.to_string();
        if compressed {
            self.send_frame(0xC1, &deflate(text.as_bytes()));
        } else {
            self.send_frame(0x81, text.as_bytes());
        }
    }

    /// The next frame, or `None` once the server closed the stream.
    pub fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, len)) = parse(&self.buf) {
                self.buf.drain(..len);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text message's frame (Pings and Pongs skipped).
    #[track_caller]
    pub fn text_frame(&mut self) -> Frame {
        loop {
            let frame = self.frame().expect("a frame");
            match frame.first & 0x0f {
                0x1 => return frame,
                0x9 | 0xA => {}
                _ => panic!("expected a text frame, got {frame:?}"),
            }
        }
    }

    /// The next JSON message, inflated if it came compressed.
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        serde_json::from_slice(&self.text_frame().text()).unwrap()
    }

    /// The code of the server's Close frame.
    #[track_caller]
    pub fn close_code(&mut self) -> u16 {
        loop {
            let frame = self.frame().expect("a close frame before EOF");
            if frame.first & 0x0f == 0x8 {
                return u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
            }
        }
    }
}

/// One unmasked server frame at the start of `bytes`, and its length.
fn parse(bytes: &[u8]) -> Option<(Frame, usize)> {
    let second = *bytes.get(1)?;
    assert_eq!(second & 0x80, 0, "server frames are unmasked");
    let (len, header) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        len => (usize::from(len), 2),
    };
    let payload = bytes.get(header..header + len)?.to_vec();
    Some((
        Frame {
            first: bytes[0],
            payload,
        },
        header + len,
    ))
}
