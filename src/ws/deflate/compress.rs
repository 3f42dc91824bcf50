//! Events compressed once: [`Deflater`] turns an event's plain frame into its
//! permessage-deflate twin, and [`EventFrame`] has that twin made at most once per event,
//! when the first connection that agreed to compression is sent it. Every such connection
//! shares it, as the others share the plain frame: no compressor per connection, no
//! compression per subscriber.
//!
//! The payload is deflated on its own (the agreed `server_no_context_takeover`) and ends with
//! a sync flush whose `00 00 ff ff` is left out (RFC 7692 7.2.1). A payload under
//! `deflate_min_size`, or one that would not shrink, goes plain.

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::ws::wire;

/// zlib's default level: the seeds' events shrink nearly as much as at 9, at half the CPU.
const LEVEL: u32 = 6;
/// What a sync flush ends with, and the frame leaves out.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The node's one compressor, reset for every event.
pub struct Deflater {
    compress: Compress,
    min_size: usize,
    scratch: Vec<u8>,
}

impl Deflater {
    /// A compressor for payloads of at least `min_size` bytes.
    pub fn new(min_size: usize) -> Deflater {
        Deflater {
            compress: Compress::new(Compression::new(LEVEL), false),
            min_size,
            scratch: Vec::new(),
        }
    }

    /// The compressed twin of `plain` (a frame [`wire::text_frame`] made), or `None` when its
    /// payload is too small to bother or would not shrink.
    pub fn deflate(&mut self, plain: &[u8]) -> Option<Bytes> {
        let payload = wire::text_payload(plain);
        if payload.len() < self.min_size.max(1) {
            return None;
        }
        self.compress.reset();
        self.scratch.clear();
        let mut consumed = 0;
        loop {
            self.scratch.reserve(payload.len() / 2 + 64);
            let before = self.compress.total_in();
            self.compress
                .compress_vec(&payload[consumed..], &mut self.scratch, FlushCompress::Sync)
                .expect("deflating into a Vec cannot fail");
            consumed += (self.compress.total_in() - before) as usize;
            if consumed == payload.len() && self.scratch.len() < self.scratch.capacity() {
                break;
            }
        }
        debug_assert!(self.scratch.ends_with(&TAIL));
        let body = &self.scratch[..self.scratch.len() - TAIL.len()];
        let header = FrameHeader {
            rsv1: true,
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        };
        let len = body.len() as u64;
        if header.len(len) + body.len() >= plain.len() {
            return None;
        }
        let mut frame = Vec::with_capacity(header.len(len) + body.len());
        header
            .format(len, &mut frame)
            .expect("writing to a Vec cannot fail");
        frame.extend_from_slice(body);
        Some(Bytes::from(frame))
    }
}

/// Event bytes queued to WebSockets, by encoding.
#[derive(Debug, Default, Clone, Copy)]
pub struct Queued {
    /// Plain frames.
    pub plain: u64,
    /// Compressed frames.
    pub deflated: u64,
}

/// One event's frame, for every connection it goes to: the plain frame, and its compressed
/// twin, made at most once.
pub struct EventFrame<'a> {
    plain: Bytes,
    /// `None` until a connection that agreed to compression asks; then the twin, or `None`
    /// when the event goes plain anyway.
    deflated: Option<Option<Bytes>>,
    deflater: Option<&'a mut Deflater>,
    /// What was queued of it.
    pub queued: Queued,
}

impl<'a> EventFrame<'a> {
    /// `plain`, compressed by `deflater` for connections that agreed to compression.
    pub fn new(plain: Bytes, deflater: &'a mut Deflater) -> EventFrame<'a> {
        EventFrame {
            plain,
            deflated: None,
            deflater: Some(deflater),
            queued: Queued::default(),
        }
    }

    /// `plain` for every connection (history replayed to one page: compressing it would
    /// cost one compression per event and page).
    pub fn plain_only(plain: Bytes) -> EventFrame<'static> {
        EventFrame {
            plain,
            deflated: Some(None),
            deflater: None,
            queued: Queued::default(),
        }
    }

    /// The plain frame.
    pub fn plain(&self) -> &Bytes {
        &self.plain
    }

    /// The frame for a connection: compressed when it agreed to compression and the event
    /// shrinks. The second value says whether it is compressed.
    pub fn for_connection(&mut self, deflate: bool) -> (&Bytes, bool) {
        if !deflate {
            return (&self.plain, false);
        }
        let deflated = self.deflated.get_or_insert_with(|| {
            let deflater = self.deflater.as_mut().expect("made with a deflater");
            deflater.deflate(&self.plain)
        });
        match deflated {
            Some(frame) => (frame, true),
            None => (&self.plain, false),
        }
    }

    /// Counts `len` bytes queued in one encoding.
    pub fn note_queued(&mut self, len: usize, deflated: bool) {
        let counter = match deflated {
            true => &mut self.queued.deflated,
            false => &mut self.queued.plain,
        };
        *counter += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflated(frame: &[u8]) -> Vec<u8> {
        assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
        let mut input = wire::text_payload(frame).to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 17);
        Decompress::new(false)
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn an_event_is_compressed_once_and_inflates_to_its_payload() {
        let data = br#"{"task":{"id":"t-1","title":"Render","status":"running","progress":42,"steps":["a","b","c","a","b","c"]}}"#;
        let plain = wire::event_frame(
            wire::EventTarget::Channel("project:42", 7),
            data,
            &mut Vec::new(),
        );
        let mut deflater = Deflater::new(16);
        let mut frame = EventFrame::new(plain.clone(), &mut deflater);
        let (first, deflated) = frame.for_connection(true);
        assert!(deflated);
        let first = first.clone();
        assert!(first.len() < plain.len());
        assert_eq!(inflated(&first), wire::text_payload(&plain));
        let (again, _) = frame.for_connection(true);
        assert_eq!(
            again.as_ptr(),
            first.as_ptr(),
            "shared, not compressed again"
        );
        assert_eq!(frame.for_connection(false).0, &plain);
    }

    #[test]
    fn small_or_incompressible_payloads_go_plain() {
        let mut deflater = Deflater::new(128);
        let small = wire::text_frame(&[b'a'; 100]);
        assert_eq!(deflater.deflate(&small), None);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..400)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert_eq!(deflater.deflate(&wire::text_frame(&noise)), None);
        let long = wire::text_frame(&vec![b'x'; 70_000]);
        let twin = deflater.deflate(&long).unwrap();
        assert_eq!(inflated(&twin), vec![b'x'; 70_000]);
        let mut replay = EventFrame::plain_only(long.clone());
        assert_eq!(replay.for_connection(true), (&long, false));
    }
}
