//! What a bench run found, and how it is printed.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Preset;

/// Figures for one rate step.
#[derive(Debug, Serialize)]
pub struct StepReport {
    /// Publishes per second asked for.
    pub rate: u64,
    /// Publishes written.
    pub published: u64,
    /// Events received during the step.
    pub received: u64,
    /// Deliveries per second achieved.
    pub deliveries_per_sec: f64,
    /// Bytes the clients read per delivery (frames, compressed or not, and their headers).
    pub bytes_per_delivery: Option<f64>,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: Percentiles,
    /// Server CPU seconds per million deliveries, when the pid is known.
    pub server_cpu_s_per_million: Option<f64>,
    /// The server's CPU use as a fraction of one core.
    pub server_cpu_fraction: Option<f64>,
    /// The generator's CPU use as a fraction of one core.
    pub bench_cpu_fraction: f64,
    /// True when the generator itself was the bottleneck.
    pub bench_saturated: bool,
    /// For acknowledged publishes: how soon their reports came, and what they counted.
    pub acks: Option<AckFigures>,
    /// True when p99 stayed under 100 ms, nothing was lost and no client failed.
    pub passed: bool,
}

/// What the `ack_report`s of a step's acknowledged publishes said.
#[derive(Debug, Serialize)]
pub struct AckFigures {
    /// Publish → report percentiles, in microseconds.
    pub report_us: Percentiles,
    /// From the write of the last page's ack to the report, in microseconds.
    pub after_last_ack_us: Percentiles,
    /// Deliveries the pages acked.
    pub acked: u64,
    /// Deliveries not acked (timed out or disconnected).
    pub unacked: u64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The scenario.
    pub preset: Preset,
    /// How the clients received.
    pub transport: super::Transport,
    /// Clients opened.
    pub connections: usize,
    /// Channels used.
    pub channels: usize,
    /// Upgrade + subscribe round trips per second during the connect phase.
    pub handshakes_per_sec: f64,
    /// Server CPU microseconds per handshake (connect phase), when the pid is known.
    pub server_cpu_us_per_handshake: Option<f64>,
    /// Server RSS before connecting, in KiB.
    pub server_rss_before_kib: Option<u64>,
    /// Server RSS with every client connected and subscribed, in KiB.
    pub server_rss_connected_kib: Option<u64>,
    /// (connected − before) / connections, in bytes.
    pub server_rss_per_connection_bytes: Option<f64>,
    /// Server RSS at the end, in KiB.
    pub server_rss_end_kib: Option<u64>,
    /// Each rate step.
    pub steps: Vec<StepReport>,
    /// Highest rate whose step passed (throughput preset).
    pub best_passing_deliveries_per_sec: Option<f64>,
    /// Events published but never received, over all clients.
    pub lost: u64,
    /// Events received twice.
    pub duplicated: u64,
    /// Clients whose connection failed.
    pub failed_connections: usize,
    /// Of those, upgrades the server refused, by HTTP status line.
    pub refused_upgrades: BTreeMap<String, usize>,
}

impl Report {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let mut out = format!(
            "preset {:?}: {} {:?} connections over {} channel(s)\n  connect: {:.0} handshakes/s",
            self.preset, self.connections, self.transport, self.channels, self.handshakes_per_sec
        );
        if let Some(us) = self.server_cpu_us_per_handshake {
            out += &format!(", {us:.1} µs server CPU per handshake");
        }
        if let (Some(before), Some(connected), Some(per)) = (
            self.server_rss_before_kib,
            self.server_rss_connected_kib,
            self.server_rss_per_connection_bytes,
        ) {
            out += &format!(
                "\n  server RSS: {before} KiB → {connected} KiB connected ({per:.0} B per connection)"
            );
        }
        if let Some(end) = self.server_rss_end_kib {
            out += &format!(", {end} KiB at the end");
        }
        for s in &self.steps {
            if s.rate == 0 {
                if let Some(fraction) = s.server_cpu_fraction {
                    out += &format!(
                        "\n  holding, no events: server {:.2}% core",
                        fraction * 100.0
                    );
                }
                continue;
            }
            let l = &s.latency_us;
            let ms = |us: u64| us as f64 / 1000.0;
            out += &format!(
                "\n  {:>6} publishes/s: {:>10.0} deliveries/s  p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                s.rate,
                s.deliveries_per_sec,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
            if let (Some(per_million), Some(fraction)) =
                (s.server_cpu_s_per_million, s.server_cpu_fraction)
            {
                out += &format!(
                    "  server {per_million:.2} CPU-s/M ({:.0}% core)",
                    fraction * 100.0
                );
            }
            if let Some(bytes) = s.bytes_per_delivery {
                out += &format!("  {bytes:.0} B/delivery");
            }
            out += &format!("  bench {:.0}% core", s.bench_cpu_fraction * 100.0);
            if let Some(acks) = &s.acks {
                let r = &acks.report_us;
                let a = &acks.after_last_ack_us;
                out += &format!(
                    "\n         ack reports: p50 {:.2} ms  p90 {:.2}  p99 {:.2}  max {:.2} after the publish, \
                     p50 {:.2} ms  p99 {:.2} after the last ack; {} deliveries acked, {} not",
                    ms(r.p50),
                    ms(r.p90),
                    ms(r.p99),
                    ms(r.max),
                    ms(a.p50),
                    ms(a.p99),
                    acks.acked,
                    acks.unacked
                );
            }
            if s.bench_saturated {
                out += "  [BENCH SATURATED: figures are a floor]";
            }
            if !s.passed {
                out += "  [FAILED: p99 ≥ 100 ms or loss]";
            }
        }
        if let Some(best) = self.best_passing_deliveries_per_sec {
            out += &format!("\n  best passing step: {best:.0} deliveries/s");
        }
        out += &format!(
            "\n  lost {}  duplicated {}  failed connections {}\n",
            self.lost, self.duplicated, self.failed_connections
        );
        for (status, count) in &self.refused_upgrades {
            out += &format!(
                "  {count} upgrade(s) refused with {status}: {}\n",
                why_refused(status)
            );
        }
        out
    }
}

/// What a refusal the bench met means, and which server setting governs it.
fn why_refused(status: &str) -> &'static str {
    match status.split_whitespace().nth(1) {
        Some("429") => {
            "the server's connect_rate_per_ip (every bench client comes from one address); \
             raise it or leave it off for a load test"
        }
        Some("503") => "the server's max_connections is reached; raise it (and ulimit -n)",
        Some("403") => "the server's origin check (allowed_origin, require_origin)",
        _ => "see docs/protocol.md, \"HTTP on the WebSocket port\"",
    }
}
