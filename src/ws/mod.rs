//! The browser side: one TCP connection on the WebSocket port, from its HTTP request to its
//! last byte.
//!
//! - [`conn`]: one connection's state machine (request → WebSocket → draining) and its read
//!   side; it returns verdicts, the reactor acts on them.
//! - [`io`]: the stream tungstenite sees: the shared read buffer in, the out queue out.
//! - [`outqueue`]: the connection's bounded queue of outbound bytes, the single owner of their
//!   order.
//! - [`http`]: request heads (httparse) → routes and canned responses.
//! - [`wire`]: the JSON protocol: requests, replies, event frames.
//! - [`session`]: one client request in, a verdict out (permissions, limits, resume, refresh);
//!   no I/O.
//!
//! Must not touch other connections or the `Poll`.

pub mod conn;
pub mod deflate;
pub mod http;
pub mod io;
pub mod outqueue;
pub mod session;
pub mod wire;

pub use conn::ClientConn;
pub use outqueue::OutQueue;
