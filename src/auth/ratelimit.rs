//! Token buckets, counted in timer-wheel ticks so they never read the clock themselves.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` tokens per second; taking one
//! succeeds while at least one is left. Used per connection (client messages) and per peer
//! IP (new connections).

use std::net::IpAddr;

use crate::base::time::Tick;

/// The key a client address is rate-limited under: an IPv4 address as it is, an IPv6
/// address by its /64, since one subscriber line usually owns a whole /64 and could
/// otherwise take a fresh bucket per connection.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// How fast a bucket refills and how much it holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per tick.
    per_tick: f64,
    /// Capacity.
    burst: f64,
}

impl Rate {
    /// `per_second` tokens per second, at most `burst` stored, with ticks of `tick_secs`.
    pub fn new(per_second: f64, burst: f64, tick_secs: f64) -> Rate {
        Rate {
            per_tick: per_second * tick_secs,
            burst,
        }
    }
}

/// One bucket: 16 bytes.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    updated: Tick,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Tick) -> TokenBucket {
        TokenBucket {
            tokens: rate.burst,
            updated: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, rate: Rate, now: Tick) -> bool {
        self.try_take_n(rate, now, 1)
    }

    /// Takes `n` tokens if there are that many; takes nothing otherwise.
    pub fn try_take_n(&mut self, rate: Rate, now: Tick, n: usize) -> bool {
        self.refill(rate, now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// True when the bucket has refilled completely: its owner has calmed down.
    pub fn is_full(&mut self, rate: Rate, now: Tick) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.burst
    }

    fn refill(&mut self, rate: Rate, now: Tick) {
        let elapsed = now.since(self.updated) as f64;
        self.tokens = (self.tokens + elapsed * rate.per_tick).min(rate.burst);
        self.updated = self.updated.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_share_a_bucket_per_64() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::");
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
    }

    #[test]
    fn bursts_then_refills_at_the_rate() {
        // 20 per second, burst 5, 10 ms ticks.
        let rate = Rate::new(20.0, 5.0, 0.01);
        let mut bucket = TokenBucket::full(rate, Tick(0));
        assert_eq!(
            (0..10).filter(|_| bucket.try_take(rate, Tick(0))).count(),
            5
        );
        assert!(!bucket.try_take(rate, Tick(4)), "0.8 tokens after 40 ms");
        assert!(bucket.try_take(rate, Tick(5)), "1 token after 50 ms");
        assert!(!bucket.is_full(rate, Tick(20)));
        assert!(bucket.is_full(rate, Tick(1000)));
        assert_eq!(
            (0..10)
                .filter(|_| bucket.try_take(rate, Tick(1000)))
                .count(),
            5,
            "capped at burst"
        );
    }
}
