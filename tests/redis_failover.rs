//! The Redis engine through what takes Redis away: a Cluster master SIGKILLed and its replica
//! promoted, a Sentinel primary SIGKILLed and its replica promoted, a master that restarts
//! with its data, and a Redis that restarts empty while a
//! node is held back (SIGSTOP), so the order is forced. Every acknowledged event that Redis
//! still holds reaches every page once, in order; a `gap` covers only what Redis lost.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::redis::{Node, RedisCluster, RedisServer, SentinelSetup, TwoNodes, Views, wait_for};
use common::{PATIENCE, Ws};
use serde_json::{Value, json};

/// What a worker was told `ok` for: channel → seq → data.
type Acknowledged = HashMap<String, BTreeMap<u64, Value>>;

/// A worker that publishes round after round, one event per channel per round, each with an
/// `idem` key and retried while the answer is `retry:true`, until stopped.
struct Worker {
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Acknowledged>,
}

impl Worker {
    fn start(node: &Node, channels: &[String]) -> Worker {
        let (rounds, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (socket, channels) = (node.socket.clone(), channels.to_vec());
        let (done, stopped) = (Arc::clone(&rounds), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut publisher = common::RawPublisher::connect(&socket);
            let mut acknowledged = Acknowledged::new();
            let mut n = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                for channel in &channels {
                    n += 1;
                    let data = json!([channel, n]);
                    let line =
                        json!({"id": n, "channel": channel, "idem": n.to_string(), "data": data});
                    loop {
                        publisher.send(&line.to_string());
                        let reply = publisher.reply();
                        if reply["ok"] == true {
                            let seq = reply["seq"].as_u64().unwrap();
                            let first = acknowledged
                                .entry(channel.clone())
                                .or_default()
                                .insert(seq, data.clone());
                            assert_eq!(first, None, "seq {seq} of {channel} acknowledged twice");
                            break;
                        }
                        assert_eq!(reply["retry"], true, "{reply}");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            acknowledged
        });
        Worker {
            rounds,
            stop,
            thread,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Waits for `more` rounds past now, every publish of them acknowledged.
    #[track_caller]
    fn wait_rounds(&self, more: u64, patience: Duration) {
        let target = self.rounds() + more;
        wait_for("the worker's rounds", patience, || self.rounds() >= target);
    }

    fn stop(self) -> Acknowledged {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// A page subscribed to `channels`.
fn page(node: &Node, channels: &[String]) -> (Ws, Views) {
    let (mut ws, mut views) = (node.ws(), Views::default());
    for channel in channels {
        ws.send(json!({"type": "subscribe", "channel": channel}));
        views.apply(&ws.recv());
    }
    (ws, views)
}

/// Reads each page until it reached every acknowledged seq, then checks that each
/// acknowledged event was delivered with its own data, or declared lost by a gap and absent
/// from Redis (`in_redis` says whether Redis holds seq of a channel).
#[track_caller]
fn check_pages(
    pages: &mut [(Ws, Views)],
    acknowledged: &Acknowledged,
    in_redis: impl Fn(&str, u64) -> bool,
) -> u64 {
    let mut lost = 0;
    for (ws, views) in pages.iter_mut() {
        while acknowledged.iter().any(|(channel, seqs)| {
            let last = *seqs.keys().next_back().unwrap();
            views.channels.get(channel).is_none_or(|v| v.seq < last)
        }) {
            views.apply(&ws.recv());
        }
        for (channel, seqs) in acknowledged {
            let view = &views.channels[channel];
            for (seq, data) in seqs {
                if view.lost.contains(seq) {
                    assert!(
                        !in_redis(channel, *seq),
                        "{channel} seq {seq} reported lost, but Redis holds it"
                    );
                    lost += 1;
                } else {
                    assert_eq!(view.events.get(seq), Some(data), "{channel} seq {seq}");
                }
            }
        }
    }
    lost
}

/// Whether the node on `port` holds event `seq` of `channel` in its stream.
fn stream_holds(port: u16, channel: &str, seq: u64) -> bool {
    let id = format!("{seq}-0");
    let reply = common::redis::command(
        port,
        &["XRANGE", &format!("sidecast:{{{channel}}}:h"), &id, &id],
    )
    .expect("the owner answers");
    !reply.starts_with("*0")
}

/// Twelve channels spread over every master of `cluster`; the first is on `victim`'s.
fn channels_over(cluster: &RedisCluster) -> (Vec<String>, usize) {
    let channels: Vec<String> = (0..12).map(|i| format!("project:{i}")).collect();
    let owner = |c: &String| cluster.owner_of(redis_protocol::redis_keyslot(c.as_bytes()));
    let victim = owner(&channels[0]);
    let owned = channels.iter().filter(|c| owner(c) == victim).count();
    assert!((2..12).contains(&owned), "the victim owns some, not all");
    (channels, victim)
}

#[test]
fn a_cluster_failover_loses_no_acknowledged_event_on_any_page_of_any_node() {
    failover(false);
}

#[test]
fn a_node_held_back_through_a_failover_catches_up_on_the_promoted_master() {
    failover(true);
}

/// A master SIGKILLed under a worker's traffic through node A, pages on A and B; with
/// `hold_b`, B is stopped before the kill and let go only once A's worker has published 20
/// rounds on the promoted master, so B meets the new map and the new master only afterwards.
fn failover(hold_b: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = RedisCluster::start_with_replicas(dir.path(), 1);
    let urls: Vec<String> = cluster.urls();
    let flags = ["--history-size", "10000"];
    let (a, b) = (Node::start(&urls, &flags), Node::start(&urls, &flags));
    let (channels, victim) = channels_over(&cluster);
    let victim_channel = channels[0].clone();
    let mut pages = vec![page(&a, &channels), page(&b, &channels)];
    let worker = Worker::start(&a, &channels);
    worker.wait_rounds(10, PATIENCE);

    if hold_b {
        b.set_running(false);
    }
    cluster.nodes[victim].kill();
    // The replica takes over (cluster-node-timeout 2s): publishes on its channels answer
    // `unavailable` meanwhile, and the worker retries them.
    worker.wait_rounds(20, Duration::from_secs(60));
    if hold_b {
        b.set_running(true);
    }
    worker.wait_rounds(10, PATIENCE);
    let acknowledged = worker.stop();
    let slot = redis_protocol::redis_keyslot(victim_channel.as_bytes());
    let promoted = cluster.owner_of(slot);
    assert_ne!(promoted, victim, "a replica was promoted");
    let port = cluster.nodes[promoted].port;
    let lost = check_pages(&mut pages, &acknowledged, |channel, seq| {
        let owner = cluster.owner_of(redis_protocol::redis_keyslot(channel.as_bytes()));
        stream_holds(cluster.nodes[owner].port, channel, seq)
    });
    eprintln!("failover: {lost} page deliveries declared lost by Redis's own failover");
    // Both nodes are subscribed on the promoted master, and say they are healthy.
    let shard_channel = format!("sidecast:{{{victim_channel}}}");
    let reply = common::redis::command(port, &["PUBSUB", "SHARDNUMSUB", &shard_channel]).unwrap();
    assert!(reply.ends_with(":2\r\n"), "two nodes subscribed: {reply}");
    for node in [&a, &b] {
        wait_for("the node is healthy", PATIENCE, || {
            node.health().is_some_and(|h| h["status"] == "ok")
        });
    }
}

#[test]
fn a_cluster_master_that_restarts_with_its_data_serves_its_channels_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = RedisCluster::start(dir.path());
    let urls: Vec<String> = cluster.urls();
    let (a, b) = (Node::start(&urls, &[]), Node::start(&urls, &[]));
    let (channels, victim) = channels_over(&cluster);
    let mut pages = vec![page(&a, &channels), page(&b, &channels)];
    let worker = Worker::start(&b, &channels);
    worker.wait_rounds(5, PATIENCE);

    cluster.nodes[victim].kill();
    wait_for("node A sees a master down", PATIENCE, || {
        a.health().is_some_and(|h| h["status"] == "unavailable")
    });
    cluster.nodes[victim].restart();
    worker.wait_rounds(20, Duration::from_secs(60));
    let acknowledged = worker.stop();
    // Restarted with its data (AOF, fsync always): nothing may be reported lost.
    let lost = check_pages(&mut pages, &acknowledged, |_, _| true);
    assert_eq!(lost, 0);
}

#[test]
fn after_an_empty_restart_a_late_node_delivers_the_new_epochs_events_after_its_gap() {
    let mut nodes = TwoNodes::start(&[]);
    let TwoNodes { a, b, redis, .. } = &mut nodes;
    let mut page = b.ws();
    let old_epoch = page.subscribe("c")["epoch"].clone();
    for n in 1..=3 {
        assert_eq!(
            a.publish(&json!({"id": n, "channel": "c", "data": n}))["seq"],
            n
        );
        assert_eq!(page.expect_event("c", n), json!(n));
    }

    // B is held back while Redis restarts empty and A's worker gets two new events stored:
    // B can only learn of them by reading the new epoch's stream.
    b.set_running(false);
    redis.kill();
    redis.wipe();
    redis.restart();
    let mut publisher = a.publisher();
    let mut publish = |n: u64| loop {
        publisher.send(
            &json!({"id": n, "channel": "c", "idem": n.to_string(), "data": n * 10}).to_string(),
        );
        let reply = publisher.reply();
        if reply["ok"] == true {
            return reply["seq"].as_u64().unwrap();
        }
        assert_eq!(reply["retry"], true, "{reply}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!((publish(1), publish(2)), (1, 2), "a new epoch from seq 1");
    b.set_running(true);
    wait_for("node B heals", PATIENCE, || {
        b.health().is_some_and(|h| h["status"] == "ok")
    });
    assert_eq!(publish(3), 3);

    let gap = page.recv();
    assert_eq!(
        (gap["type"].clone(), gap["seq"].clone()),
        (json!("gap"), json!(0)),
        "only the old epoch's unread events are lost: {gap}"
    );
    let new_epoch = gap["epoch"].clone();
    assert_ne!(new_epoch, old_epoch);
    for n in 1..=3 {
        assert_eq!(
            page.expect_event("c", n),
            json!(n * 10),
            "stored, so delivered"
        );
    }

    // A page that resumes from the old epoch is told it lost what it cannot have, and gets
    // the new epoch's events from its start.
    let mut late = a.ws();
    late.send(
        json!({"type": "subscribe", "channel": "c", "since": {"seq": 3, "epoch": old_epoch}}),
    );
    let subscribed = late.recv();
    assert_eq!(
        (subscribed["recovered"].clone(), subscribed["seq"].clone()),
        (json!(false), json!(0)),
        "{subscribed}"
    );
    assert_eq!(subscribed["epoch"], new_epoch);
    for n in 1..=3 {
        assert_eq!(late.expect_event("c", n), json!(n * 10));
    }
}

#[test]
fn the_position_check_delivers_an_event_whose_message_never_came_and_counts_the_repair() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let node = Node::start(&[redis.url()], &["--redis-check-interval", "200ms"]);
    let mut page = node.ws();
    page.subscribe("c");
    assert_eq!(
        node.publish(&json!({"id": 1, "channel": "c", "data": 1}))["seq"],
        1
    );
    page.expect_event("c", 1);
    // Event 2 is stored as the PUBLISH script stores it, but its message is never sent: what
    // a pub/sub message lost on the way looks like to the node.
    let (meta, stream) = ("sidecast:{c}:m", "sidecast:{c}:h");
    assert!(
        redis
            .command(&["HINCRBY", meta, "s", "1"])
            .unwrap()
            .starts_with(":2")
    );
    let added = redis
        .command(&["XADD", stream, "2-0", "k", "e", "d", "\"two\""])
        .unwrap();
    assert!(added.contains("2-0"), "{added}");
    assert_eq!(page.expect_event("c", 2), json!("two"));
    assert_eq!(node.metric("sidecast_redis_repairs_total"), 1);
    // Live delivery goes on after it, with nothing repeated.
    assert_eq!(
        node.publish(&json!({"id": 3, "channel": "c", "data": 3}))["seq"],
        3
    );
    page.expect_event("c", 3);
    assert_eq!(node.metric("sidecast_redis_repairs_total"), 1);
}

#[test]
fn a_sentinel_failover_loses_no_acknowledged_event_and_the_old_primary_is_never_written() {
    sentinel_failover(false);
}

#[test]
fn a_node_held_back_through_a_sentinel_failover_follows_the_promoted_primary() {
    sentinel_failover(true);
}

/// A Sentinel primary SIGKILLed under a worker's traffic through node A, pages on A and B;
/// with `hold_b`, B is stopped before the kill and let go only once A's worker has published
/// 20 rounds on the promoted primary, so B hears of the switch (and finds its link dead) late.
fn sentinel_failover(hold_b: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = SentinelSetup::start(dir.path());
    let mut flags = setup.flags();
    flags.extend(["--history-size".to_string(), "10000".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b) = (Node::start(&[], &flags), Node::start(&[], &flags));
    let old = format!("127.0.0.1:{}", setup.primary.port);
    let new = format!("127.0.0.1:{}", setup.replica.port);
    for node in [&a, &b] {
        let health = node.health().unwrap();
        assert_eq!(health["redis"]["primary"], old.as_str(), "{health}");
    }
    let channels: Vec<String> = (0..4).map(|i| format!("job:{i}")).collect();
    let mut pages = vec![page(&a, &channels), page(&b, &channels)];
    let worker = Worker::start(&a, &channels);
    worker.wait_rounds(10, PATIENCE);

    if hold_b {
        b.set_running(false);
    }
    setup.primary.kill();
    // The Sentinels see it down after 1 s, agree and promote the replica; publishes answer
    // `unavailable` meanwhile, and the worker retries them.
    worker.wait_rounds(20, Duration::from_secs(60));
    if hold_b {
        b.set_running(true);
    }
    for node in [&a, &b] {
        wait_for("the node uses the promoted primary", PATIENCE, || {
            node.health()
                .is_some_and(|h| h["redis"]["primary"] == new.as_str() && h["status"] == "ok")
        });
        let health = node.health().unwrap();
        assert!(health["redis"]["switches"].as_u64() >= Some(1), "{health}");
    }
    // The old primary comes back with its data; the Sentinels make it a replica. No node
    // writes to it: they follow the Sentinels, and a node sent there would find ROLE slave.
    setup.primary.restart();
    worker.wait_rounds(20, PATIENCE);
    let stats = setup.primary.command(&["INFO", "commandstats"]).unwrap();
    for written in ["cmdstat_evalsha", "cmdstat_eval:", "cmdstat_xadd"] {
        assert!(
            !stats.contains(written),
            "the old primary was written: {stats}"
        );
    }
    let promoted = setup.replica.command(&["INFO", "commandstats"]).unwrap();
    assert!(
        promoted.contains("cmdstat_evalsha"),
        "the promoted one is: {promoted}"
    );
    let acknowledged = worker.stop();
    let port = setup.replica.port;
    let lost = check_pages(&mut pages, &acknowledged, |channel, seq| {
        stream_holds(port, channel, seq)
    });
    let total: usize = acknowledged.values().map(BTreeMap::len).sum();
    eprintln!("{total} acknowledged events, {lost} page deliveries declared lost by a gap");
    assert!(a.metric("sidecast_redis_primary_switches_total") >= 1);
}
