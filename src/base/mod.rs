//! The ground floor: small types that many modules share, in files that import nothing above
//! them (dependencies point down; nothing here names a folder of the crate).
//!
//! - [`time`]: [`Tick`](time::Tick), time as data, and the [`TickSource`](time::TickSource).
//! - [`http`]: complete HTTP/1.1 responses as bytes.
//! - [`ids`]: [`ConnId`](ids::ConnId) and [`ChannelId`](ids::ChannelId).
//! - [`channel`]: channel names, their checks, the reserved and per-user channels, and
//!   [`Since`](channel::Since).

pub mod channel;
pub mod http;
pub mod ids;
pub mod time;
