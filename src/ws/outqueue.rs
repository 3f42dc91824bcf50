//! A connection's outbound bytes: a bounded queue of shared chunks, the single owner of their
//! order (events, replies, Pings, Pongs, the Close frame or HTTP response).
//!
//! Invariants: `len` is the sum of unsent bytes; only [`OutQueue::push_final`] may go over
//! `limit`; a refused push marks the queue overflowed for good (the connection is a slow
//! consumer); every push sets `fresh`, which the fan-out's dirty list reads (see
//! `fanout::Clients`), so no path can queue bytes without the connection being flushed.

use std::collections::VecDeque;
use std::io::{self, Write};

use bytes::Bytes;

use crate::base::time::Tick;

/// Most bytes gathered for one write: about a TCP send window's worth, so a connection that
/// keeps up takes everything queued in one or two calls.
pub const GATHER_BYTES: usize = 64 * 1024;

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
    /// Bytes were pushed since [`take_pushed`](OutQueue::take_pushed) last looked.
    pushed: bool,
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
            pushed: false,
        }
    }

    /// Appends a chunk if it fits within the limit. Returns false, and marks the queue
    /// overflowed, when it does not.
    pub fn push(&mut self, chunk: Bytes) -> bool {
        if self.overflowed || self.len + chunk.len() > self.limit as usize {
            self.overflowed = true;
            self.pushed = true;
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
        self.pushed = true;
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Whether anything was pushed (or refused) since the last call: the connection has work
    /// for the next flush, or a slow consumer to be found.
    pub fn take_pushed(&mut self) -> bool {
        std::mem::take(&mut self.pushed)
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

    /// Writes what `sink` takes ([`write_to`](OutQueue::write_to)) and records how the flush
    /// at `now` went for the stall check.
    ///
    /// # Errors
    /// As `write_to`.
    pub fn flush_into(
        &mut self,
        sink: &mut impl Write,
        gather: &mut Vec<u8>,
        now: Tick,
    ) -> io::Result<usize> {
        let written = self.write_to(sink, gather)?;
        self.note_flush(written, now);
        Ok(written)
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

    /// Writes as much as the socket takes: a lone chunk (or one of [`GATHER_BYTES`] or more)
    /// as it is, several copied together into `gather` (up to [`GATHER_BYTES`], so `gather`
    /// never grows past it) and written in one call. One contiguous write
    /// costs the kernel far less than a `writev` of many small frames (its per-segment copy
    /// and bookkeeping): at saturation this doubled deliveries per second (performance.md).
    /// A write the socket takes only part of ends the flush: its buffer is full, and
    /// WRITABLE readiness brings the rest, without a call that would only return
    /// `WouldBlock`. Returns the bytes written; `WouldBlock` is not an error, it just leaves
    /// bytes queued.
    ///
    /// # Errors
    /// Any other I/O error, or a zero-length write.
    pub fn write_to(&mut self, sink: &mut impl Write, gather: &mut Vec<u8>) -> io::Result<usize> {
        let mut written = 0;
        while !self.is_empty() {
            let front = &self.chunks[0][self.offset as usize..];
            let (result, offered) = if self.chunks.len() == 1 || front.len() >= GATHER_BYTES {
                (sink.write(front), front.len())
            } else {
                self.gather(gather);
                (sink.write(gather), gather.len())
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    self.consume(n);
                    if n < offered {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Copies the queued bytes into `gather`, in order, as many whole chunks as fit in
    /// [`GATHER_BYTES`] (the first, smaller than that, always does).
    fn gather(&self, gather: &mut Vec<u8>) {
        gather.clear();
        for (i, chunk) in self.chunks.iter().enumerate() {
            let start = if i == 0 { self.offset as usize } else { 0 };
            let rest = &chunk[start..];
            if gather.len() + rest.len() > GATHER_BYTES {
                break;
            }
            gather.extend_from_slice(rest);
        }
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
            if self.calls == 3 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls += 1;
            let take = buf.len().min(self.limit);
            self.taken.extend_from_slice(&buf[..take]);
            Ok(take)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn gathered_and_partial_writes_keep_order() {
        let mut queue = OutQueue::new(usize::MAX);
        for chunk in ["abc", "defg", "h", "ijkl"] {
            queue.push(Bytes::from_static(chunk.as_bytes()));
        }
        let mut sink = Trickle {
            taken: Vec::new(),
            limit: 5,
            calls: 0,
        };
        let mut gather = Vec::new();
        for (flush, left) in [(5, 7), (5, 2), (2, 0)] {
            assert_eq!(
                queue.write_to(&mut sink, &mut gather).unwrap(),
                flush,
                "a short write ends a flush"
            );
            assert_eq!(queue.len(), left);
            sink.calls = 0;
        }
        assert_eq!(sink.taken, b"abcdefghijkl");
        assert!(queue.is_empty());

        // Gathering stops at GATHER_BYTES (a larger first chunk goes whole).
        let big = Bytes::from(vec![b'x'; GATHER_BYTES - 2]);
        for chunk in [big.clone(), Bytes::from_static(b"abc"), big] {
            queue.push(chunk);
        }
        let mut all = Trickle {
            taken: Vec::new(),
            limit: usize::MAX,
            calls: 0,
        };
        assert_eq!(
            queue.write_to(&mut all, &mut gather).unwrap(),
            2 * GATHER_BYTES - 1
        );
        assert_eq!(all.calls, 3, "the big chunk, the small one, the big one");

        // A chunk of GATHER_BYTES or more is written as it is: `gather` never grows past it.
        let mut gather = Vec::new();
        queue.push(Bytes::from(vec![b'y'; 3 * GATHER_BYTES]));
        queue.push(Bytes::from_static(b"z"));
        all.calls = 0;
        let written = queue.write_to(&mut all, &mut gather).unwrap();
        assert_eq!((written, all.calls), (3 * GATHER_BYTES + 1, 2));
        assert!(gather.capacity() < GATHER_BYTES, "{}", gather.capacity());

        queue.push(Bytes::from_static(b"0123456789"));
        queue.push(Bytes::from_static(b"xyz"));
        let mut sink = Trickle {
            taken: Vec::new(),
            limit: 2,
            calls: 2,
        };
        assert_eq!(
            queue.write_to(&mut sink, &mut gather).unwrap(),
            2,
            "one short write"
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
        queue.write_to(&mut sink, &mut Vec::new()).unwrap();
        assert_eq!(&sink.taken[9..], &pong(b"b")[..]);
    }
}
