//! Does sidecast meet its end-to-end goals on this machine? Runs the `sidecast bench` presets
//! (latency, throughput, channels, idle) against a freshly spawned release server, pinned to
//! CPU 0 with taskset, and prints each report. Run it pinned to the other core:
//!
//! ```sh
//! taskset -c 1 cargo bench --bench e2e            # every preset, about 2 minutes
//! taskset -c 1 cargo bench --bench e2e -- latency # only the presets named
//! ```

use std::net::TcpListener;

use clap::ValueEnum;
use sidecast::bench::spawn::SpawnedServer;
use sidecast::bench::{self as loadgen, Plan, Preset, Target};

fn main() {
    let named: Vec<Preset> = std::env::args()
        .skip(1)
        .filter_map(|a| Preset::from_str(&a, true).ok())
        .collect();
    let presets = if named.is_empty() {
        Preset::value_variants().to_vec()
    } else {
        named
    };
    let pinned = std::process::Command::new("taskset")
        .arg("-V")
        .output()
        .is_ok()
        .then_some(0);
    for preset in presets {
        let plan = Plan::preset(preset);
        let dir = tempfile::tempdir().expect("a temp dir");
        let socket = dir.path().join("bench.sock");
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_sidecast"));
        let server = SpawnedServer::start(exe, addr, &socket, pinned, plan.connections + 100, &[])
            .expect("the server starts");
        let target = Target {
            addr,
            socket: socket.clone(),
            pid: Some(server.pid()),
        };
        match loadgen::run(&plan, &target, false) {
            Ok(report) => print!("{}", report.render()),
            Err(e) => eprintln!("{preset:?}: {e}"),
        }
    }
}
