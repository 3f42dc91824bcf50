//! The stream tungstenite reads and writes: reads come from the socket through the
//! reactor's [`SharedInput`] (one buffer for every connection, and each connection's read
//! budget per pass), and on a connection that agreed to compression through its
//! [`Inflating`]; writes go to the connection's `OutQueue`, so they never block and the
//! queue stays the single owner of outbound byte order.

use std::io::{self, Read, Write};

use bytes::Bytes;
use mio::net::TcpStream;

use crate::ws::deflate::{Inflater, Inflating};
use crate::ws::outqueue::OutQueue;

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
///
/// It also holds the one inflater of compressed client messages (see [`Inflating`]).
pub struct SharedInput {
    bytes: Buffered,
    inflater: Inflater,
}

/// The shared read buffer and the current connection's budget.
struct Buffered {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The current connection has had its one socket read of this pass.
    has_read: bool,
    /// The pass's read filled the buffer: the socket may hold more.
    budget_spent: bool,
}

impl SharedInput {
    /// A shared buffer of `size` bytes, inflating messages of at most `max_message_size`.
    pub fn new(size: usize, max_message_size: usize) -> SharedInput {
        SharedInput {
            bytes: Buffered {
                buf: vec![0; size].into_boxed_slice(),
                start: 0,
                end: 0,
                has_read: false,
                budget_spent: false,
            },
            inflater: Inflater::new(max_message_size),
        }
    }

    /// Starts one connection's turn: empty, with a fresh read budget.
    pub fn begin(&mut self) {
        let bytes = &mut self.bytes;
        bytes.start = 0;
        bytes.end = 0;
        bytes.has_read = false;
        bytes.budget_spent = false;
    }

    /// Whether the connection whose turn it is may have more waiting in the kernel.
    pub fn readiness(&self) -> Readiness {
        if self.bytes.budget_spent {
            Readiness::MayHaveMore
        } else {
            Readiness::Drained
        }
    }
}

/// The stream tungstenite sees: reads come from the socket through the shared input (and
/// the connection's inflating step, when it agreed to compression), writes go to the
/// `OutQueue` (and so never block).
pub(super) struct WsIo<'a> {
    pub(super) socket: &'a mut TcpStream,
    pub(super) input: Option<&'a mut SharedInput>,
    pub(super) inflating: Option<&'a mut Inflating>,
    pub(super) out: &'a mut OutQueue,
}

impl Read for WsIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(input) = self.input.as_deref_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut raw = Raw {
            socket: &mut *self.socket,
            input: &mut input.bytes,
        };
        match self.inflating.as_deref_mut() {
            Some(inflating) => inflating.read(buf, &mut raw, &mut input.inflater),
            None => raw.read(buf),
        }
    }
}

/// The socket's bytes through the shared buffer, one socket read per connection and pass.
struct Raw<'a> {
    socket: &'a mut TcpStream,
    input: &'a mut Buffered,
}

impl Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let input = &mut *self.input;
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

/// Whether a read pass left the socket empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The socket would block: wait for the next readiness event.
    Drained,
    /// The pass's read budget ran out: the socket may hold more, read it next pass.
    MayHaveMore,
}

/// True when `frame` is exactly one unmasked Pong frame, as tungstenite writes them.
fn is_pong_frame(frame: &[u8]) -> bool {
    const FIN_PONG: u8 = 0x8A;
    matches!(frame, [FIN_PONG, len, ..] if usize::from(*len) <= 125 && frame.len() == 2 + usize::from(*len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_the_pongs_tungstenite_writes() {
        assert!(is_pong_frame(&[0x8A, 0x02, b'h', b'i']));
        assert!(!is_pong_frame(&[0x88, 0x02, 0x03, 0xE8]), "a Close frame");
        assert!(!is_pong_frame(&[0x8A, 0x05, 1]), "a truncated Pong");
    }
}
