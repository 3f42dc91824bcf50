//! sidecast: a single-threaded real-time fan-out server.
//!
//! Workers write newline-delimited JSON events to a Unix socket (the publish port); browsers
//! hold WebSocket connections, subscribe to channels and receive each event as it is published.
//! `docs/protocol.md` is the wire contract and `docs/architecture.md` the design.
//!
//! # Layout
//! - [`assets`]: the browser client and the dashboard, compiled in and served over HTTP.
//! - [`auth`]: JWT verification and channel permissions.
//! - [`reactor`]: the `mio` event loop ([`Server`]): accept, dispatch, timers, flush, shutdown.
//! - [`client`]: one TCP connection on the WebSocket port: phases, read side, output queue.
//! - [`http`]: request heads (httparse) → routes and canned responses.
//! - [`wire`]: the WebSocket JSON protocol: requests, replies, event frames.
//! - [`hub`]: channels, their subscribers, sequence numbers and epochs.
//! - [`history`]: each channel's recent event frames, for resuming clients.
//! - [`publish`]: one publish-port connection: line framing, commands, replies.
//! - [`publisher`]: a blocking [`Publisher`] client for Rust workers.
//! - [`timer`]: the hashed timer wheel behind heartbeats and deadlines.
//! - [`ratelimit`]: token buckets for client messages and connections per IP.
//! - [`token`]: `mio::Token` ↔ event source.
//! - [`metrics`]: counters and their Prometheus rendering.
//! - [`stats`]: the once-a-second stats feed the dashboard watches.
//! - [`loadgen`]: the `sidecast bench` load generator.
//! - [`config`], [`error`]: settings and the errors that leave a module.
//!
//! Everything runs on the thread that calls [`Server::run`]; the only cross-thread object is
//! the [`ShutdownHandle`].
#![warn(missing_docs)]

pub mod assets;
pub mod auth;
pub mod client;
pub mod config;
pub mod error;
pub mod history;
pub mod http;
pub mod hub;
pub mod loadgen;
pub mod metrics;
pub mod publish;
pub mod publisher;
pub mod ratelimit;
pub mod reactor;
pub mod stats;
pub mod timer;
pub mod token;
pub mod wire;

pub use config::Config;
pub use publisher::Publisher;
pub use reactor::{Server, ShutdownHandle};
