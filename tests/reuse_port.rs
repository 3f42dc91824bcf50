//! Every core of one machine: nodes on one host share the WebSocket port (`--reuse-port`),
//! the kernel spreads the connections over them, and the Redis engine makes them one server.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::redis::{Node, RedisServer, free_port};
use serde_json::json;

#[test]
fn two_nodes_on_one_port_share_the_connections_and_every_page_gets_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let port = free_port();
    let a = Node::start_on(port, &urls, &["--reuse-port"]);
    let b = Node::start_on(port, &urls, &["--reuse-port"]);
    // 200 pages on the one port; `clientId` starts with the serving process's instance.
    let mut split: HashMap<String, usize> = HashMap::new();
    let mut pages = Vec::new();
    for _ in 0..200 {
        let mut page = a.ws_raw("/ws");
        let connected = page.recv();
        assert_eq!(connected["type"], "connected", "{connected}");
        let instance = connected["clientId"].as_str().unwrap()[..8].to_string();
        *split.entry(instance).or_default() += 1;
        page.subscribe("c");
        pages.push(page);
    }
    eprintln!("200 connections on one port, split over the nodes: {split:?}");
    assert_eq!(split.len(), 2, "both nodes took connections: {split:?}");
    // Published through either node's own socket, each event reaches every page once.
    for n in 1..=20u64 {
        let node = if n % 2 == 0 { &a } else { &b };
        let reply = node.publish(&json!({"id": n, "channel": "c", "data": n}));
        assert_eq!(
            (reply["seq"].clone(), reply["nodes"].clone()),
            (json!(n), json!(2)),
            "{reply}"
        );
    }
    for page in &mut pages {
        for n in 1..=20 {
            assert_eq!(page.expect_event("c", n), json!(n));
        }
    }
}

#[test]
fn reuse_port_with_the_memory_engine_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let output = Command::new(env!("CARGO_BIN_EXE_sidecast"))
        .args(["serve", "--reuse-port", "--listen", "127.0.0.1:0"])
        .args(["--publish-socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("reuse_port") && stderr.contains("--engine redis"),
        "{stderr}"
    );
}
