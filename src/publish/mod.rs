//! The worker side: the publish port and the Rust client that talks to it.
//!
//! - [`port`]: one publish-port connection: line framing, execution order, budgets, replies.
//! - [`command`]: a command line parsed, and the reply lines rendered; the [`Sink`] that
//!   executes commands (the fan-out).
//! - `replies`: a connection's replies in command order, some awaiting the engine; the
//!   lines of a `POST /publish` body.
//! - [`http`]: HTTP/1.1 on the publish port: request heads, routes, responses.
//! - [`dapr`]: Dapr subscriptions: CloudEvents from a broker → channels.
//! - [`publisher`]: [`Publisher`], a blocking client for Rust workers.
//!
//! Must not know WebSocket framing: what a publish becomes on the wire is the fan-out's
//! business.

pub mod command;
pub mod dapr;
pub mod http;
pub mod port;
pub mod publisher;
mod replies;
#[cfg(test)]
pub(crate) mod testing;

pub use command::{AckAsk, Outcome, Published, Reach, Seqs, Sink, Target};
pub use port::{PublisherConn, ReadStatus};
pub use publisher::Publisher;
