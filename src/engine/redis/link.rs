//! One non-blocking connection to one Redis node (TCP, or TLS over it, see [`super::tls`]),
//! in the reactor's `Poll`: commands are pipelined into one output buffer, replies are matched to what they answer in the order
//! the commands were sent, and RESP3 pushes (shard-channel messages, subscription changes)
//! come out beside them.
//!
//! Invariants: every command that expects a reply has exactly one entry in `waiting`, in
//! send order; the connection is written only once connected; a link that fails gives back
//! every entry still waiting, so each request is answered exactly once (by a reply, or as
//! failed).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::resp::{self, Frame};
use super::tls::{Tls, Wire};
use crate::base::time::Tick;

/// What came in on a link.
pub enum Incoming<T> {
    /// The reply to the command sent with `T`.
    Reply(T, Frame),
    /// A push: a shard-channel message, or a subscription change.
    Push(Frame),
}

/// What a command waiting in a link's queue needs from it.
pub trait Expected {
    /// Whether `push` is this command's answer: in RESP3 a subscribe is confirmed by a push,
    /// in order among the replies, and its failure is an ordinary error reply.
    fn answered_by(&self, push: &Frame) -> bool;
}

/// Bytes read per call.
const READ_CHUNK: usize = 64 * 1024;

/// A connection to one Redis node.
pub struct Link<T> {
    /// `host:port`, as configured or as the cluster names it.
    pub addr: String,
    wire: Wire,
    connected: bool,
    output: BytesMut,
    input: BytesMut,
    waiting: VecDeque<(T, Tick)>,
}

impl<T: Expected> Link<T> {
    /// Starts connecting to `addr` (resolved here: an address, or a name `/etc/hosts` or DNS
    /// answers at once), over TLS when `tls` is given, and registers the socket under
    /// `token`.
    ///
    /// # Errors
    /// The address does not resolve, the socket cannot be made, or the host cannot be
    /// checked against a certificate.
    pub fn connect(
        addr: &str,
        tls: Option<&Tls>,
        registry: &Registry,
        token: Token,
    ) -> Result<Link<T>, String> {
        let target: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let mut stream = TcpStream::connect(target).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
        let wire = match tls {
            Some(tls) => {
                let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
                Wire::Tls(stream, Box::new(tls.session(host)?))
            }
            None => Wire::Plain(stream),
        };
        Ok(Link {
            addr: addr.to_string(),
            wire,
            connected: false,
            output: BytesMut::new(),
            input: BytesMut::new(),
            waiting: VecDeque::new(),
        })
    }

    /// Queues a command; `tag` says what its reply answers (`None` for a command answered
    /// by a push only, like `SSUBSCRIBE` in RESP3).
    pub fn send(&mut self, args: &[&[u8]], tag: Option<T>, now: Tick) {
        self.write(args);
        if let Some(tag) = tag {
            self.expect(tag, now);
        }
    }

    /// Queues a command whose reply [`expect`](Link::expect) accounts for next.
    pub fn write(&mut self, args: &[&[u8]]) {
        resp::encode(&mut self.output, args);
    }

    /// The command just written expects a reply, which answers `tag`.
    pub fn expect(&mut self, tag: T, now: Tick) {
        self.waiting.push_back((tag, now));
    }

    /// When the oldest command still waiting was sent.
    pub fn oldest_wait(&self) -> Option<Tick> {
        self.waiting.front().map(|(_, sent)| *sent)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.output.len()
    }

    /// Readiness: writes what is queued once connected, and reads every complete frame.
    ///
    /// # Errors
    /// The connection failed or closed, or spoke something that is not RESP3.
    pub fn on_ready(&mut self, incoming: &mut Vec<Incoming<T>>) -> Result<(), String> {
        if !self.connected {
            let socket = self.wire.socket();
            if let Some(e) = socket.take_error().map_err(|e| e.to_string())? {
                return Err(e.to_string());
            }
            match socket.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
        self.flush()?;
        let mut chunk = [0u8; 16 * 1024];
        let mut read = 0;
        loop {
            match self.wire.read(&mut chunk) {
                Ok(0) => return Err("connection closed by Redis".into()),
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    read += n;
                    if read >= READ_CHUNK {
                        // Decode what we have before reading on, so input stays bounded.
                        self.decode(incoming)?;
                        read = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        self.decode(incoming)?;
        // Reading may have moved a TLS handshake on, or freed room for what waits.
        self.flush()
    }

    fn decode(&mut self, incoming: &mut Vec<Incoming<T>>) -> Result<(), String> {
        while let Some(frame) = resp::decode(&mut self.input)? {
            let confirms = matches!(frame, Frame::Push { .. })
                && self
                    .waiting
                    .front()
                    .is_some_and(|(tag, _)| tag.answered_by(&frame));
            if matches!(frame, Frame::Push { .. }) && !confirms {
                incoming.push(Incoming::Push(frame));
            } else {
                let (tag, _) = self
                    .waiting
                    .pop_front()
                    .ok_or("a reply to no command: the connection is out of step")?;
                incoming.push(Incoming::Reply(tag, frame));
            }
        }
        Ok(())
    }

    /// Writes what is queued until done or the socket would block.
    ///
    /// # Errors
    /// The connection failed.
    pub fn flush(&mut self) -> Result<(), String> {
        if !self.connected {
            return Ok(());
        }
        self.wire.push().map_err(|e| e.to_string())?;
        while !self.output.is_empty() {
            match self.wire.write(&self.output) {
                Ok(0) => return Err("Redis took no bytes".into()),
                Ok(n) => {
                    let _ = self.output.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Closes the connection, giving back what still waited for a reply, in send order.
    pub fn close(mut self, registry: &Registry) -> impl Iterator<Item = T> {
        let _ = registry.deregister(self.wire.socket());
        self.waiting.into_iter().map(|(tag, _)| tag)
    }
}
