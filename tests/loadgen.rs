//! `sidecast bench`'s engine against a real server: a short bounded run must see every event
//! exactly once and report consistent figures.

mod common;

use std::time::Duration;

use common::TestServer;
use sidecast::bench::{self as loadgen, Plan, Preset, Step, Target};

#[test]
fn a_short_run_delivers_every_event_once() {
    let server = TestServer::start();
    let mut plan = Plan::preset(Preset::Latency);
    plan.connections = 40;
    plan.channels = 4;
    plan.steps = vec![Step {
        rate: 200,
        duration: Duration::from_millis(500),
    }];
    let target = Target {
        addr: server.addr,
        socket: server.socket.clone(),
        pid: Some(std::process::id()),
    };
    let report = loadgen::run(&plan, &target, false).unwrap();
    assert_eq!((report.connections, report.failed_connections), (40, 0));
    assert_eq!((report.lost, report.duplicated), (0, 0));
    let step = &report.steps[0];
    assert!(step.published >= 90, "{step:?}");
    // Each event reaches the 10 subscribers of its channel; late ones arrive in the drain.
    let delivered = server.metric("sidecast_frames_delivered_total");
    assert_eq!(delivered, step.published * 10);
    assert!(step.received <= delivered && step.received > 0);
    assert!(step.latency_us.p50 > 0 && step.latency_us.p50 <= step.latency_us.max);
    assert!(report.server_rss_per_connection_bytes.is_some());
    server.wait_until("the bench's clients are closed", |s| {
        s.health()["connections"] == 0
    });
}

/// Issue 9, item 5: when the server refuses bench clients, the report says why.
#[test]
fn refused_connections_are_counted_with_their_reason() {
    let server = TestServer::start_with(|c| c.connect_rate_per_ip = Some(1.0));
    let mut plan = Plan::preset(Preset::Idle);
    plan.connections = 10;
    plan.channels = 1;
    plan.steps = vec![Step {
        rate: 0,
        duration: Duration::from_millis(10),
    }];
    let target = Target {
        addr: server.addr,
        socket: server.socket.clone(),
        pid: None,
    };
    let report = loadgen::run(&plan, &target, false).unwrap();
    let refused = report.refused_upgrades["HTTP/1.1 429 Too Many Requests"];
    assert_eq!(refused, 8, "bursts of 2 get in: {report:?}");
    assert_eq!(report.failed_connections, 8);
    assert!(
        report.render().contains("connect_rate_per_ip"),
        "{}",
        report.render()
    );
}

/// A short soak: while clients churn, stall and flood, the steady subscribers lose nothing
/// and receive nothing twice.
#[test]
fn a_short_soak_loses_nothing_among_well_behaved_clients() {
    let server = TestServer::start_with(|c| {
        // So the stalled reader is cut within the short run.
        c.write_stall_timeout = Duration::from_millis(500);
        c.max_output_buffer = 64 * 1024;
        c.send_buffer_size = 4096;
    });
    let plan = loadgen::soak::SoakPlan {
        duration: Duration::from_secs(3),
        channels: 5,
        steady: 20,
        churners: 3,
        stalled: 1,
        rate: 200,
        padding: 500,
    };
    let report =
        loadgen::soak::run(&plan, server.addr, server.socket.clone(), None, None, false).unwrap();
    assert!(report.published > 100, "{report:?}");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report:?}");
    assert_eq!(
        report.steady_received,
        report.published * 4,
        "each event to its 4 subscribers"
    );
    assert!(
        report.churn_cycles > 0 && report.resumes_recovered > 0,
        "{report:?}"
    );
    assert!(
        report.disconnects["rate_limited"] > 0,
        "the flooder was cut: {report:?}"
    );
    assert!(
        report.disconnects["slow_consumer"] > 0,
        "the stalled reader was cut: {report:?}"
    );
}
