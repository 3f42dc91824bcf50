//! Who may connect and how often: JWT verification, admission at the upgrade, rate limits.
//!
//! - [`jwt`]: tokens → an [`Identity`] and its channel permissions.
//! - [`admission`]: the upgrade's verdicts: per-IP connect rate, token and per-user limit.
//! - [`ratelimit`]: token buckets counted in timer ticks.
//!
//! Must not do I/O: callers pass the time in and act on the verdicts.

pub mod admission;
pub mod jwt;
pub mod ratelimit;

pub use jwt::{Identity, JwtKey, Verifier};
