//! The Redis engine against real Redis: `redis-server` processes started here, on ephemeral
//! ports in temp dirs; sidecast nodes as child processes of the real binary.

mod common;

use common::redis::{Node, RedisServer};
use serde_json::json;

#[test]
fn a_publish_on_one_node_reaches_subscribers_on_both_once_in_one_order() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let (a, b) = (Node::start(&urls, &[]), Node::start(&urls, &[]));
    let mut on_a = a.ws();
    let mut on_b = b.ws();
    let sub_a = on_a.subscribe("project:42");
    let sub_b = on_b.subscribe("project:42");
    assert_eq!(sub_a["seq"], 0);
    assert_eq!(sub_a["epoch"], sub_b["epoch"], "one epoch across nodes");
    let reply = a.publish(&json!({"id": 1, "channel": "project:42", "data": {"p": 1}}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["seq"], 1);
    assert_eq!(reply["nodes"], 2, "both nodes subscribed: {reply}");
    assert_eq!(on_a.expect_event("project:42", 1), json!({"p": 1}));
    assert_eq!(on_b.expect_event("project:42", 1), json!({"p": 1}));
    // Publishes on both nodes interleave into one order that every subscriber sees.
    let mut pa = a.publisher();
    let mut pb = b.publisher();
    for n in 0..50 {
        pa.send(
            &json!({"id": n, "channel": "project:42", "data": {"from": "a", "n": n}}).to_string(),
        );
        pb.send(
            &json!({"id": n, "channel": "project:42", "data": {"from": "b", "n": n}}).to_string(),
        );
    }
    for _ in 0..50 {
        assert_eq!(pa.reply()["ok"], true);
        assert_eq!(pb.reply()["ok"], true);
    }
    let seen_a: Vec<_> = (2..=101)
        .map(|seq| on_a.expect_event("project:42", seq))
        .collect();
    let seen_b: Vec<_> = (2..=101)
        .map(|seq| on_b.expect_event("project:42", seq))
        .collect();
    assert_eq!(seen_a, seen_b, "one order");
}
