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
//! - [`sse`]: Server-Sent Events (`GET /sse`), the fallback transport for networks that
//!   refuse WebSockets: the request's channels and resume positions, the stream's framing.
//! - [`fanout`]: one event to every subscriber's queue: the engine's answers carried out in
//!   one place (`Fanout::apply`), one delivery loop, one subscribe path; the hub (channel →
//!   local subscribers), the per-user index, the connection slab and its dirty list;
//!   sessions and their verdicts; publishes in flight.
//! - [`engine`]: where sequence numbers are assigned, events kept for resuming and answers
//!   come from: the [`Engine`](engine::Engine) interface, which the in-memory engine and the
//!   Redis engine ([`engine::redis`], shared by several nodes) both implement, answering with
//!   [`Happening`](engine::Happening)s.
//! - [`base`]: the ground floor: ticks, connection and channel ids, channel names, `Since`,
//!   HTTP responses as bytes. It imports nothing of the crate.
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
//! [`fanout::Serving`] (the port's [`Sink`](publish::Sink)) asks the engine to publish it →
//! the engine answers `Deliver` (the memory engine within the call, Redis when the event
//! comes back on the subscription) → `Fanout::deliver_event` encodes one frame, queues it to
//! each subscriber's [`OutQueue`](ws::OutQueue) and hands it to the engine's history → the
//! engine's `Done` answers the worker → the reactor flushes every connection the fan-out
//! listed as dirty, its queued frames gathered into one write, and writes the worker's reply
//! line.
//! `docs/architecture.md` walks it, and one subscribe, file by file.
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
pub mod sse;
pub mod ws;

pub use config::Config;
pub use publish::Publisher;
pub use reactor::{Clock, Listeners, Server, ShutdownHandle};
