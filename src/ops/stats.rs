//! The stats feed behind the dashboard: once a second, while the dashboard is on, the server
//! publishes a snapshot of its gauges and counters, and the rates since the previous snapshot,
//! to [`STATS_CHANNEL`](crate::base::channel::STATS_CHANNEL). The feed is not counted in the event and
//! frame counters it reports.

use std::fmt::Write;
use std::time::Instant;

use crate::error::Close;
use crate::ops::metrics::{Gauges, LATENCY_BOUNDS_US, Metrics};

/// Counters at the previous snapshot, to turn totals into rates.
#[derive(Debug)]
pub struct StatsFeed {
    at: Instant,
    events: u64,
    frames: u64,
    bytes: u64,
    latency: [u64; LATENCY_BOUNDS_US.len() + 1],
}

impl StatsFeed {
    /// Starts measuring rates from `now` and the current counters.
    pub fn new(metrics: &Metrics, now: Instant) -> StatsFeed {
        StatsFeed {
            at: now,
            events: metrics.events_published,
            frames: metrics.frames_delivered,
            bytes: metrics.bytes_written,
            latency: metrics.latency.counts(),
        }
    }

    /// The next snapshot, as the JSON object documented in `docs/protocol.md`.
    pub fn snapshot(&mut self, metrics: &Metrics, gauges: &Gauges, now: Instant) -> String {
        let seconds = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let rate = |now: u64, before: u64| ((now - before) as f64 / seconds).round() as u64;
        let latency = metrics.latency.counts();
        let p99 = p99_upper_bound_us(&latency, &self.latency)
            .map_or("null".to_string(), |us| format!("{}", us as f64 / 1000.0));
        let mut json = format!(
            "{{\"connections\":{},\"channels\":{},\"publishers\":{},\"uptimeSecs\":{},\
             \"eventsInPerSec\":{},\"framesOutPerSec\":{},\"bytesOutPerSec\":{},\
             \"latencyP99Ms\":{p99},\"eventsIn\":{},\"framesOut\":{},\
             \"historyEvents\":{},\"historyBytes\":{},\"disconnects\":{{",
            metrics.connections,
            gauges.channels,
            metrics.publishers,
            gauges.uptime_secs,
            rate(metrics.events_published, self.events),
            rate(metrics.frames_delivered, self.frames),
            rate(metrics.bytes_written, self.bytes),
            metrics.events_published,
            metrics.frames_delivered,
            gauges.history_events,
            gauges.history_bytes,
        );
        for (i, reason) in Close::ALL.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            let _ = write!(
                json,
                "{separator}\"{}\":{}",
                reason.label(),
                metrics.disconnects(*reason)
            );
        }
        json.push_str("}}");
        *self = StatsFeed::new(metrics, now);
        json
    }
}

/// The upper bound of the bucket holding the 99th percentile of the observations made between
/// two snapshots of the latency histogram; `None` without observations or past the last bound.
fn p99_upper_bound_us(now: &[u64], before: &[u64]) -> Option<u64> {
    let counts: Vec<u64> = now.iter().zip(before).map(|(n, b)| n - b).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = total - total / 100;
    let mut seen = 0;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return LATENCY_BOUNDS_US.get(i).copied();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gauges() -> Gauges {
        Gauges {
            channels: 2,
            known_channels: 2,
            uptime_secs: 7,
            history_events: 3,
            history_bytes: 300,
            idempotency_keys: 0,
            shared: None,
            acks: Default::default(),
        }
    }

    #[test]
    fn rates_are_per_second_since_the_previous_snapshot() {
        let start = Instant::now();
        let mut metrics = Metrics::default();
        metrics.events_published = 100;
        let mut feed = StatsFeed::new(&metrics, start);
        metrics.events_published += 50;
        metrics.frames_delivered += 5000;
        metrics.disconnected(Close::SlowConsumer);
        for _ in 0..200 {
            metrics.latency.observe(400);
        }
        metrics.latency.observe(40_000);
        let later = start + Duration::from_millis(500);
        let json: serde_json::Value =
            serde_json::from_str(&feed.snapshot(&metrics, &gauges(), later)).unwrap();
        assert_eq!(json["eventsInPerSec"], 100);
        assert_eq!(json["framesOutPerSec"], 10_000);
        assert_eq!(json["eventsIn"], 150);
        assert_eq!(json["channels"], 2);
        assert_eq!(
            json["latencyP99Ms"], 0.5,
            "99% of 201 observations are ≤ 500 µs"
        );
        assert_eq!(json["disconnects"]["slow_consumer"], 1);
        assert_eq!(json["disconnects"]["heartbeat_timeout"], 0);
        let json: serde_json::Value = serde_json::from_str(&feed.snapshot(
            &metrics,
            &gauges(),
            later + Duration::from_secs(1),
        ))
        .unwrap();
        assert_eq!(json["eventsInPerSec"], 0);
        assert_eq!(json["latencyP99Ms"], serde_json::Value::Null);
    }
}
