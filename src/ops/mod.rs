//! What operators and the dashboard see: counters, the stats feed, health, served assets.
//!
//! - [`metrics`]: counters and gauges, rendered for Prometheus.
//! - [`stats`]: the once-a-second snapshot published to `sidecast:stats`.
//! - [`health`]: the `/health` document.
//! - [`assets`]: the browser client and the dashboard, compiled in and served over HTTP.
//!
//! Plain values owned by the reactor's thread: no globals, no thread-locals.

pub mod assets;
pub mod health;
pub mod metrics;
pub mod stats;
