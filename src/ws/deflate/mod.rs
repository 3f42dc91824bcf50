//! permessage-deflate (RFC 7692) without per-connection compressor state.
//!
//! - [`negotiate`]: which offers are accepted; the answer always holds both
//!   `no_context_takeover` parameters.
//! - [`compress`]: an event's compressed frame, made once per event and shared by every
//!   connection that agreed to compression.
//! - [`inflate`]: a client's compressed messages, inflated (bounded by `max_message_size`)
//!   before tungstenite reads them.
//!
//! Replies and replayed history go plain: each is built for one connection, and compressing
//! it would cost one compression per message and page.

pub mod compress;
pub mod inflate;
pub mod negotiate;

pub use compress::{Deflater, EventFrame};
pub use inflate::{InflateError, Inflater, Inflating};
