//! sidecast: a single-threaded real-time fan-out server.
//!
//! Workers write newline-delimited JSON events to a Unix socket (the publish port); browsers
//! hold WebSocket connections, subscribe to channels and receive each event as it is published.
//! `docs/protocol.md` is the wire contract and `docs/architecture.md` the design.
//!
//! # The crate map
//! - [`reactor`]: the loop only: poll, dispatch by token, act on verdicts, flush, reap; the
//!   listeners, the timer wheel, the clock, shutdown. It knows sockets and phases, not
//!   channels, users or JSON. Start at [`Server::run`].
//! - [`ws`]: the browser side: one connection's state machine and output queue, HTTP
//!   routing, the JSON wire types, and [`ws::session`], which judges a client's request and
//!   returns a verdict.
//! - [`fanout`]: one publish to every subscriber's queue, whole, in `fanout/mod.rs`; the hub
//!   (channel → local subscribers), the per-user index, the connection slab and its dirty
//!   list. It carries out session verdicts.
//! - [`engine`]: where sequence numbers are assigned, events kept for resuming and
//!   idempotency keys remembered: the [`Engine`](engine::Engine) interface and the in-memory
//!   engine; and the Redis engine ([`engine::redis`]), shared by several nodes, whose answers
//!   come back later as happenings the fan-out carries out.
//! - [`publish`]: the worker side: publish-port connections (NDJSON or HTTP, on the Unix
//!   socket or the keyed TCP listener), commands and replies, Dapr subscriptions, and the
//!   Rust [`Publisher`].
//! - [`auth`]: JWT verification, upgrade admission (per-IP rate, token, per-user limit), token
//!   buckets.
//! - [`ops`]: metrics, the stats feed, health, the served assets.
//! - [`config`]: every setting declared once; [`error`]: errors that leave a module, and
//!   [`Close`](error::Close), the verdict for every way a WebSocket ends.
//!
//! # The path of one event
//! `publish::port` reads a line from a worker and `publish::command` parses it →
//! [`fanout::Fanout`] (as the port's [`Sink`](publish::Sink)) takes the next seq from the
//! engine, encodes one frame, queues it to each subscriber's [`OutQueue`](ws::OutQueue) and
//! hands it to the engine's history → the reactor flushes every connection the fan-out listed
//! as dirty, one `write_vectored` each, and writes the worker's reply line.
//!
//! Everything runs on the thread that calls [`Server::run`]; the only cross-thread object is
//! the [`ShutdownHandle`].
#![warn(missing_docs)]

pub mod auth;
pub mod base;
#[doc(hidden)]
pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod fanout;
pub mod ops;
pub mod publish;
pub mod reactor;
pub mod ws;

pub use config::Config;
pub use publish::Publisher;
pub use reactor::{Clock, Listeners, Server, ShutdownHandle};
