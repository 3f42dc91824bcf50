//! Counters owned by the reactor and their Prometheus text rendering. Plain fields, no
//! globals: the reactor is the only writer, on one thread.

use std::fmt::Write;

use crate::error::Close;
use crate::fanout::acks::AckCounts;
use crate::ws::deflate::compress::Queued;

/// Upper bounds of the latency buckets, in microseconds (50 µs to 1 s).
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A Prometheus histogram of publish→write latency: from the loop pass that read a publish
/// line to the moment a connection's socket took the last byte queued for it. One observation
/// per connection write that emptied its queue, measured for the oldest event in it.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: u64,
    count: u64,
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn observe(&mut self, micros: u64) {
        let bucket = LATENCY_BOUNDS_US.iter().position(|&bound| micros <= bound);
        self.buckets[bucket.unwrap_or(LATENCY_BOUNDS_US.len())] += 1;
        self.sum_us += micros;
        self.count += 1;
    }

    /// Observations per bucket so far (not cumulative); the last one is `+Inf`.
    pub fn counts(&self) -> [u64; LATENCY_BOUNDS_US.len() + 1] {
        self.buckets
    }

    fn render(&self, name: &str, out: &mut String) {
        let _ = write!(
            out,
            "# HELP {name} Publish-to-socket-write latency per connection write, oldest event.\n\
             # TYPE {name} histogram\n"
        );
        let mut cumulative = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BOUNDS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open sessions: WebSockets and event streams.
    pub connections: u64,
    /// Of them, event streams (`GET /sse`).
    pub event_streams: u64,
    /// Open publish-port connections.
    pub publishers: u64,
    /// WebSocket upgrades completed.
    pub connections_opened: u64,
    /// Events accepted from publishers (one per channel of a multi-channel publish).
    pub events_published: u64,
    /// Event frames queued to connections.
    pub frames_delivered: u64,
    /// Bytes written to WebSocket-port sockets.
    pub bytes_written: u64,
    /// Event frame bytes queued to WebSockets, plain.
    pub event_bytes_plain: u64,
    /// Event frame bytes queued to WebSockets, compressed (permessage-deflate).
    pub event_bytes_deflated: u64,
    /// Publish lines refused (bad JSON, bad channel, too long).
    pub publish_errors: u64,
    /// Publishes answered from an `idem` key already used (not published again).
    pub publish_duplicates: u64,
    /// Publishes answered `unavailable`: the engine could not store them.
    pub publish_unavailable: u64,
    /// Gaps reported to subscribers (events a shared engine could not deliver).
    pub gaps_reported: u64,
    /// Presence snapshots and `presence_diff` messages queued to pages.
    pub presence_messages: u64,
    /// TCP connections dropped before completing a request head in time.
    pub handshake_timeouts: u64,
    /// Requests refused with an HTTP error status.
    pub http_refusals: u64,
    /// Publish→write latency.
    pub latency: LatencyHistogram,
    disconnects: [u64; Close::ALL.len()],
}

/// Values sampled at render time rather than counted.
pub struct Gauges {
    /// Channels with subscribers.
    pub channels: usize,
    /// Channels the server remembers: with subscribers, or dormant (see `Hub`).
    pub known_channels: usize,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Events held in channel histories.
    pub history_events: usize,
    /// Bytes of event frames held in channel histories.
    pub history_bytes: usize,
    /// Idempotency keys the engine remembers.
    pub idempotency_keys: usize,
    /// The state of an engine shared by several nodes (Redis), when it runs one.
    pub shared: Option<crate::engine::SharedState>,
    /// Acknowledged events.
    pub acks: AckCounts,
}

impl Metrics {
    /// Counts event frames queued to `delivered` connections, and their bytes by encoding.
    pub fn count_frames(&mut self, delivered: usize, queued: Queued) {
        self.frames_delivered += delivered as u64;
        self.event_bytes_plain += queued.plain;
        self.event_bytes_deflated += queued.deflated;
    }

    /// Counts a WebSocket disconnect.
    pub fn disconnected(&mut self, close: Close) {
        self.disconnects[close as usize] += 1;
    }

    /// Disconnects counted so far for `reason`.
    pub fn disconnects(&self, close: Close) -> u64 {
        self.disconnects[close as usize]
    }

    /// Renders everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        metric(
            "sidecast_connections",
            "gauge",
            "Open sessions: WebSockets and Server-Sent Events streams.",
            self.connections,
        );
        metric(
            "sidecast_event_streams",
            "gauge",
            "Open Server-Sent Events streams (counted in sidecast_connections too).",
            self.event_streams,
        );
        metric(
            "sidecast_channels",
            "gauge",
            "Channels with subscribers.",
            gauges.channels as u64,
        );
        metric(
            "sidecast_channels_known",
            "gauge",
            "Channels remembered: with subscribers, or dormant with their seq, epoch and history.",
            gauges.known_channels as u64,
        );
        metric(
            "sidecast_publishers",
            "gauge",
            "Open publish-port connections.",
            self.publishers,
        );
        metric(
            "sidecast_uptime_seconds",
            "gauge",
            "Seconds since start.",
            gauges.uptime_secs,
        );
        metric(
            "sidecast_history_events",
            "gauge",
            "Events held in channel histories for resuming clients.",
            gauges.history_events as u64,
        );
        metric(
            "sidecast_history_bytes",
            "gauge",
            "Bytes of event frames held in channel histories.",
            gauges.history_bytes as u64,
        );
        metric(
            "sidecast_idempotency_keys",
            "gauge",
            "Publish idempotency keys remembered (idem, CloudEvent ids).",
            gauges.idempotency_keys as u64,
        );
        metric(
            "sidecast_connections_opened_total",
            "counter",
            "WebSocket upgrades completed.",
            self.connections_opened,
        );
        metric(
            "sidecast_events_published_total",
            "counter",
            "Events accepted on the publish port, one per channel.",
            self.events_published,
        );
        metric(
            "sidecast_frames_delivered_total",
            "counter",
            "Event frames queued to WebSocket connections.",
            self.frames_delivered,
        );
        metric(
            "sidecast_bytes_written_total",
            "counter",
            "Bytes written to WebSocket-port sockets.",
            self.bytes_written,
        );
        metric(
            "sidecast_publish_errors_total",
            "counter",
            "Publish lines refused.",
            self.publish_errors,
        );
        metric(
            "sidecast_publish_duplicates_total",
            "counter",
            "Publishes answered from an idempotency key already used, not published again.",
            self.publish_duplicates,
        );
        metric(
            "sidecast_publish_unavailable_total",
            "counter",
            "Publishes answered unavailable (retry): the engine could not store them.",
            self.publish_unavailable,
        );
        metric(
            "sidecast_gaps_reported_total",
            "counter",
            "Gaps reported to subscribers: events that could not be delivered or recovered.",
            self.gaps_reported,
        );
        metric(
            "sidecast_presence_messages_total",
            "counter",
            "Presence snapshots and presence_diff messages queued to pages.",
            self.presence_messages,
        );
        if let Some(redis) = &gauges.shared {
            metric(
                "sidecast_redis_up",
                "gauge",
                "1 when every Redis shard is connected and the slot map is known.",
                u64::from(redis.up),
            );
            metric(
                "sidecast_redis_shards_up",
                "gauge",
                "Redis shards (masters) connected.",
                redis.shards_up as u64,
            );
            metric(
                "sidecast_redis_shards",
                "gauge",
                "Redis shards (masters) known.",
                redis.shards as u64,
            );
            metric(
                "sidecast_redis_in_flight",
                "gauge",
                "Publishes waiting for Redis's answer.",
                redis.in_flight as u64,
            );
            metric(
                "sidecast_redis_held_events",
                "gauge",
                "Events held while a gap is filled from the stream.",
                redis.held as u64,
            );
            metric(
                "sidecast_redis_unsubscribed_channels",
                "gauge",
                "Channels with local subscribers that no Redis connection carries (health is 503 while above 0).",
                redis.unsubscribed as u64,
            );
            metric(
                "sidecast_redis_repairs_total",
                "counter",
                "Events and gaps the periodic position check delivered because the subscription had not (a lost message or a bug).",
                redis.repairs,
            );
            metric(
                "sidecast_redis_disconnects_total",
                "counter",
                "Redis connections lost.",
                redis.disconnects,
            );
            if redis.primary.is_some() {
                metric(
                    "sidecast_redis_primary_switches_total",
                    "counter",
                    "Under Sentinel: times the primary this node uses changed (announced by +switch-master, or found by asking after the old one failed).",
                    redis.switches,
                );
            }
        }
        metric(
            "sidecast_handshake_timeouts_total",
            "counter",
            "Connections dropped for not completing their request in time.",
            self.handshake_timeouts,
        );
        metric(
            "sidecast_http_refusals_total",
            "counter",
            "Requests answered with an HTTP error status.",
            self.http_refusals,
        );
        metric(
            "sidecast_acks_pending",
            "gauge",
            "Reports awaited by this node's workers, for events published with ack (at most max_pending_acks).",
            gauges.acks.pending as u64,
        );
        metric(
            "sidecast_acks_received_total",
            "counter",
            "Acks from pages that counted toward a report.",
            gauges.acks.received,
        );
        metric(
            "sidecast_ack_reports_total",
            "counter",
            "ack_report lines made, one per event published with ack.",
            gauges.acks.reports,
        );
        metric(
            "sidecast_ack_timeouts_total",
            "counter",
            "Acknowledged events whose wait on this node ended at the timeout, with pages that did not answer.",
            gauges.acks.timeouts,
        );
        metric(
            "sidecast_ack_tallies",
            "gauge",
            "Acknowledged events this node delivered or replayed whose pages' acks it is counting.",
            gauges.acks.tallies as u64,
        );
        metric(
            "sidecast_ack_nodes_lost_total",
            "counter",
            "Nodes that sent no final count for a report of this node before its deadline.",
            gauges.acks.nodes_lost,
        );
        let name = "sidecast_event_bytes_total";
        let _ = write!(
            out,
            "# HELP {name} Live event frame bytes queued to WebSockets, by encoding (deflate: permessage-deflate, compressed once per event).\n\
             # TYPE {name} counter\n{name}{{encoding=\"identity\"}} {}\n{name}{{encoding=\"deflate\"}} {}\n",
            self.event_bytes_plain, self.event_bytes_deflated
        );
        let name = "sidecast_disconnects_total";
        let _ = write!(
            out,
            "# HELP {name} WebSocket connections and event streams closed, by reason.\n# TYPE {name} counter\n"
        );
        for reason in Close::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.label(),
                self.disconnects(reason)
            );
        }
        if let Some(primary) = gauges.shared.as_ref().and_then(|r| r.primary.as_ref()) {
            let name = "sidecast_redis_primary";
            let _ = write!(
                out,
                "# HELP {name} Under Sentinel: the primary the Sentinels named last.\n\
                 # TYPE {name} gauge\n{name}{{addr=\"{primary}\"}} 1\n"
            );
        }
        self.latency
            .render("sidecast_publish_write_latency_seconds", &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut metrics = Metrics {
            connections: 3,
            ..Metrics::default()
        };
        metrics.disconnected(Close::SlowConsumer);
        let text = metrics.render(&Gauges {
            channels: 2,
            known_channels: 2,
            uptime_secs: 9,
            history_events: 0,
            history_bytes: 0,
            idempotency_keys: 0,
            shared: None,
            acks: Default::default(),
        });
        assert!(text.contains("# TYPE sidecast_connections gauge\nsidecast_connections 3\n"));
        assert!(text.contains("sidecast_channels 2\n"));
        assert!(text.contains("sidecast_disconnects_total{reason=\"slow_consumer\"} 1\n"));
        assert!(text.contains("sidecast_disconnects_total{reason=\"reset\"} 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn latency_buckets_are_cumulative() {
        let mut metrics = Metrics::default();
        for micros in [10, 50, 51, 3_000, 2_000_000] {
            metrics.latency.observe(micros);
        }
        let text = metrics.render(&Gauges {
            channels: 0,
            known_channels: 0,
            uptime_secs: 0,
            history_events: 0,
            history_bytes: 0,
            idempotency_keys: 0,
            shared: None,
            acks: Default::default(),
        });
        let name = "sidecast_publish_write_latency_seconds";
        for (le, count) in [
            ("0.00005", 2),
            ("0.0001", 3),
            ("0.005", 4),
            ("1", 4),
            ("+Inf", 5),
        ] {
            assert!(
                text.contains(&format!("{name}_bucket{{le=\"{le}\"}} {count}\n")),
                "{le}\n{text}"
            );
        }
        assert!(text.contains(&format!("{name}_count 5\n")));
        assert!(text.contains(&format!("{name}_sum 2.003111\n")));
    }
}
