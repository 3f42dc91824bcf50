//! Server-Sent Events: `GET /sse` on the WebSocket port, a read-only stream for pages whose
//! network refuses or breaks the WebSocket upgrade. The messages are the WebSocket's, one
//! JSON object per SSE message; what the page would send (its channels, where each resumes)
//! is in the request.
//!
//! - [`request`]: the query and `Last-Event-ID` → the channels to subscribe, with their
//!   `since` and `rewind`, or the 400 that refuses them.
//! - [`position`]: where the stream stands in each of its channels, and the SSE `id` that
//!   says so: what a plain `EventSource` sends back as `Last-Event-ID` to resume every
//!   channel at once.
//! - [`stream`]: one stream's framing: the response head, `data:` lines, `id:` lines,
//!   comment heartbeats, the closing message.
//!
//! No I/O: the connection (`ws::conn`) queues what these return.

pub mod position;
pub mod request;
pub mod stream;

pub use position::Positions;
pub use request::Opening;
pub use stream::{Arena, Stream};
