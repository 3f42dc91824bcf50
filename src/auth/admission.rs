//! Verdicts on a WebSocket upgrade: may this client address connect now (`connect_rate_per_ip`),
//! and who is it (the token, `max_connections_per_user`). Also the advice logged when a
//! refusal is one an operator must hear of, rate-limited so a page retrying forever does not
//! flood the log.
//!
//! No I/O and no clock: the caller passes `now` (ticks) and the Unix time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use super::jwt::{Identity, Verifier};
use super::ratelimit::{self, Rate, TokenBucket};
use crate::base::time::{Tick, TickSource};
use crate::error::Close;
use crate::ws::http::Refusal;

/// New WebSockets per client address, when `connect_rate_per_ip` is on.
pub struct ConnectRate {
    rate: Option<Rate>,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl ConnectRate {
    /// A limit of `rate`; `None` admits everyone.
    pub fn new(rate: Option<Rate>) -> ConnectRate {
        ConnectRate {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// Charges a new WebSocket to `client`'s bucket (IPv6 per /64); always true while the
    /// limit is off.
    pub fn admit(&mut self, client: IpAddr, now: Tick) -> bool {
        const SWEEP_ABOVE: usize = 4096;
        let Some(rate) = self.rate else {
            return true;
        };
        if self.buckets.len() > SWEEP_ABOVE {
            // Full buckets carry no information: forget those peers.
            self.buckets.retain(|_, bucket| !bucket.is_full(rate, now));
        }
        self.buckets
            .entry(ratelimit::address_key(client))
            .or_insert_with(|| TokenBucket::full(rate, now))
            .try_take(rate, now)
    }
}

/// A connection [`Auth::admit`] refused.
#[derive(Debug)]
pub struct Refused {
    /// How it is closed.
    pub close: Close,
    /// Why, for the log.
    pub detail: String,
}

/// Authentication at the upgrade, when a JWT key is configured.
pub struct Auth {
    verifier: Verifier,
    leeway: Duration,
    max_per_user: usize,
    ticks: TickSource,
}

impl Auth {
    /// Checks tokens with `verifier`, allowing `max_per_user` connections per user.
    pub fn new(
        verifier: Verifier,
        leeway: Duration,
        max_per_user: usize,
        ticks: TickSource,
    ) -> Auth {
        Auth {
            verifier,
            leeway,
            max_per_user,
            ticks,
        }
    }

    /// The verifier, for refreshed tokens.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// `max_connections_per_user`.
    pub fn max_per_user(&self) -> usize {
        self.max_per_user
    }

    /// Checks an upgrade's token, and its user's `open` connections.
    ///
    /// # Errors
    /// The close verdict, and a detail for the log.
    pub fn admit(
        &self,
        token: Option<&str>,
        open: impl Fn(&str) -> usize,
    ) -> Result<Identity, Refused> {
        let identity = token
            .ok_or_else(|| "no token".to_string())
            .and_then(|t| self.verifier.verify(t))
            .map_err(|detail| Refused {
                close: Close::Unauthorized,
                detail,
            })?;
        if open(&identity.user) >= self.max_per_user {
            let detail = format!("user {} is at max_connections_per_user", identity.user);
            let close = Close::UserLimit;
            return Err(Refused { close, detail });
        }
        Ok(identity)
    }

    /// The tick at which `identity`'s token stops being accepted (`exp` + leeway), given the
    /// current tick and Unix time.
    pub fn expiry_tick(&self, identity: &Identity, now: Tick, unix_now: u64) -> Tick {
        // Saturating: a validly signed token may carry any `exp`, up to u64::MAX.
        let expires = identity.expires_at.saturating_add(self.leeway.as_secs());
        let left = expires.saturating_sub(unix_now);
        now.after(self.ticks.ticks_in(Duration::from_secs(left)))
    }
}

/// What an operator should be told about a refusal that a page will retry until they act;
/// `None` for refusals that are the client's own business.
pub fn advice(refusal: &Refusal, peer: IpAddr, connect_rate: Option<f64>) -> Option<String> {
    match refusal {
        Refusal::Forbidden(Some(origin)) => Some(format!(
            "refused a WebSocket from a page at origin {origin}: not allowed (allow it with \
             --allowed-origin {origin}, or allowed_origin in the config file)"
        )),
        Refusal::Forbidden(None) => {
            Some("refused a WebSocket without an Origin header: require_origin is on".to_string())
        }
        Refusal::TooManyRequests => Some(format!(
            "refused a WebSocket from {peer}: over connect_rate_per_ip ({}/s); behind a proxy, \
             list it in trusted_proxies",
            connect_rate.unwrap_or_default()
        )),
        _ => None,
    }
}

/// Rate-limits the advice lines: at most one per `interval` ticks, saying how many were held
/// back.
#[derive(Default)]
pub struct RefusalLog {
    quiet_until: Tick,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether a line may be logged now; if so, how many were held back since the last one.
    pub fn admit(&mut self, now: Tick, interval: u64) -> Option<u64> {
        if now < self.quiet_until {
            self.suppressed += 1;
            return None;
        }
        self.quiet_until = now.after(interval);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_rate_is_per_address_and_off_by_default() {
        let mut off = ConnectRate::new(None);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| off.admit(ip, Tick(0))));
        let mut on = ConnectRate::new(Some(Rate::new(1.0, 2.0, 0.01)));
        assert!(on.admit(ip, Tick(0)) && on.admit(ip, Tick(0)));
        assert!(!on.admit(ip, Tick(0)), "a burst of two");
        assert!(
            on.admit("10.0.0.2".parse().unwrap(), Tick(0)),
            "another address"
        );
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(on.admit(a, Tick(0)) && on.admit(b, Tick(0)));
        assert!(!on.admit(a, Tick(0)), "one /64, one bucket");
        assert!(on.admit(ip, Tick(100)), "refilled after a second");
    }

    #[test]
    fn refusal_lines_are_held_back_within_the_interval() {
        let mut log = RefusalLog::default();
        assert_eq!(log.admit(Tick(0), 1000), Some(0));
        assert_eq!(log.admit(Tick(5), 1000), None);
        assert_eq!(log.admit(Tick(999), 1000), None);
        assert_eq!(log.admit(Tick(1000), 1000), Some(2));
    }
}
