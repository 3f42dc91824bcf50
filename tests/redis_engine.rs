//! The Redis engine against real Redis: `redis-server` processes started here, on ephemeral
//! ports in temp dirs; sidecast nodes as child processes of the real binary.

mod common;

use common::PATIENCE;
use common::redis::{Node, RedisCluster, RedisServer, View, Views, wait_for};
use serde_json::{Value, json};

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

    // Several channels at once, and a broadcast: both reach every node.
    on_b.subscribe("order:7");
    let reply = b.publish(&json!({"id": 2, "channels": ["project:42", "order:7"], "data": 2}));
    assert_eq!(
        reply["seqs"],
        json!({"project:42": 102, "order:7": 1}),
        "{reply}"
    );
    assert_eq!(reply["nodes"], 3, "two nodes on project:42, one on order:7");
    on_b.expect_event("project:42", 102);
    on_b.expect_event("order:7", 1);
    on_a.expect_event("project:42", 102);
    let reply = b.publish(&json!({"id": 3, "broadcast": true, "data": "all"}));
    assert_eq!(
        (reply["ok"].clone(), reply["nodes"].clone()),
        (json!(true), json!(2)),
        "{reply}"
    );
    for page in [&mut on_a, &mut on_b] {
        let event = page.recv();
        assert_eq!(
            (event["broadcast"].clone(), event["data"].clone()),
            (json!(true), json!("all"))
        );
    }
    // An idempotent retry on the other node publishes nothing.
    let first = a.publish(&json!({"id": 4, "channel": "order:7", "idem": "k1", "data": 4}));
    let retry = b.publish(&json!({"id": 5, "channel": "order:7", "idem": "k1", "data": 4}));
    assert_eq!(retry["seq"], first["seq"]);
    assert_eq!(retry["duplicate"], true, "{retry}");
    on_b.expect_event("order:7", 2);
    on_b.send(json!({"type": "ping"}));
    assert_eq!(on_b.recv()["type"], "pong", "the retry was not delivered");

    // A Redis that forgot the scripts (a restart, a failover) answers NOSCRIPT: the node
    // sends the script itself.
    assert!(
        redis
            .command(&["SCRIPT", "FLUSH"])
            .unwrap()
            .starts_with("+OK")
    );
    let reply = a.publish(&json!({"id": 6, "channel": "order:7", "data": 6}));
    assert_eq!(reply["seq"], 3, "{reply}");
    on_b.expect_event("order:7", 3);
}

/// Subscribes with `since` and returns the `subscribed` reply.
#[track_caller]
fn resume(ws: &mut common::Ws, channel: &str, seq: u64, epoch: &Value) -> Value {
    ws.send(
        json!({"type": "subscribe", "channel": channel, "since": {"seq": seq, "epoch": epoch}}),
    );
    let reply = ws.recv();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

#[test]
fn a_page_that_moves_to_another_node_resumes_every_missed_event_once_even_racing_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    // Enough history that a page hopping while the worker runs ahead never falls off it.
    let flags = ["--history-size", "1000"];
    let (a, b) = (Node::start(&urls, &flags), Node::start(&urls, &flags));
    let mut page = a.ws();
    let epoch = page.subscribe("order:7")["epoch"].clone();
    for n in 1..=3 {
        assert_eq!(
            a.publish(&json!({"id": n, "channel": "order:7", "data": n}))["seq"],
            n
        );
        page.expect_event("order:7", n);
    }
    drop(page);
    for n in 4..=8 {
        assert_eq!(
            b.publish(&json!({"id": n, "channel": "order:7", "data": n}))["seq"],
            n
        );
    }
    let mut page = b.ws();
    let reply = resume(&mut page, "order:7", 3, &epoch);
    assert_eq!(reply["recovered"], true, "{reply}");
    for n in 4..=8 {
        assert_eq!(page.expect_event("order:7", n), json!(n));
    }
    a.publish(&json!({"id": 9, "channel": "order:7", "data": 9}));
    page.expect_event("order:7", 9);

    // Publishes racing the resume: a worker publishes without pause while pages hop
    // between the nodes; each sees every seq after its `since` exactly once, in order.
    let socket = a.socket.clone();
    let worker = std::thread::spawn(move || {
        let mut publisher = common::RawPublisher::connect(&socket);
        for n in 10..=400 {
            publisher.send(&json!({"id": n, "channel": "order:7", "data": n}).to_string());
        }
        for _ in 10..=400 {
            assert_eq!(publisher.reply()["ok"], true);
        }
    });
    let mut last = 9;
    let mut node = 0;
    while last < 400 {
        let target = if node % 2 == 0 { &a } else { &b };
        node += 1;
        let mut page = target.ws();
        let reply = resume(&mut page, "order:7", last, &epoch);
        assert_eq!(reply["recovered"], true, "{reply}");
        // Read a few events, then hop.
        for _ in 0..25 {
            if last == 400 {
                break;
            }
            let event = page.recv();
            assert_eq!(event["type"], "event", "{event}");
            assert_eq!(
                event["seq"],
                last + 1,
                "gap-free and duplicate-free: {event}"
            );
            last += 1;
        }
    }
    worker.join().unwrap();
}

#[test]
fn a_page_with_an_unknown_epoch_or_seq_is_told_it_missed_events() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let node = Node::start(&[redis.url()], &[]);
    node.publish(&json!({"id": 1, "channel": "c", "data": 1}));
    let mut page = node.ws();
    let reply = resume(&mut page, "c", 0, &json!("not-the-epoch"));
    assert_eq!(reply["recovered"], false, "{reply}");
    let epoch = reply["epoch"].clone();
    // Another epoch than its own: the channel's whole epoch follows, from seq 1.
    assert_eq!(reply["seq"], 0);
    assert_eq!(page.expect_event("c", 1), json!(1));
    let mut other = node.ws();
    let reply = resume(&mut other, "c", 99, &epoch);
    assert_eq!(
        reply["recovered"], false,
        "a seq the channel never reached: {reply}"
    );
}

#[test]
fn redis_killed_mid_stream_fails_publishes_loudly_and_heals_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let (a, b) = (Node::start(&urls, &[]), Node::start(&urls, &[]));
    let mut page = b.ws();
    let epoch = page.subscribe("c")["epoch"].clone();
    let mut publisher = a.publisher();
    let mut publish = |n: u64| {
        publisher.send(&json!({"id": n, "channel": "c", "data": n}).to_string());
        publisher.reply()
    };
    for n in 1..=20 {
        assert_eq!(publish(n)["seq"], n);
    }
    for n in 1..=20 {
        page.expect_event("c", n);
    }

    redis.kill();
    wait_for("node A sees Redis down", PATIENCE, || {
        a.health().is_some_and(|h| h["status"] == "unavailable")
    });
    let refused = publish(21);
    assert_eq!(
        refused,
        json!({"id": 21, "ok": false, "error": "unavailable", "retry": true})
    );
    // The page stays connected and served.
    page.send(json!({"type": "ping", "id": 1}));
    assert_eq!(page.recv()["type"], "pong");

    // Restarted with its data (AOF): seqs go on, nothing acknowledged is lost.
    redis.restart();
    wait_for("both nodes heal", PATIENCE, || {
        [&a, &b]
            .iter()
            .all(|n| n.health().is_some_and(|h| h["status"] == "ok"))
    });
    for n in 21..=30 {
        assert_eq!(publish(n)["seq"], n, "the seq survived the restart");
    }
    for n in 21..=30 {
        assert_eq!(page.expect_event("c", n), json!(n));
    }

    // Restarted empty: a new epoch. The page is told of the gap, then gets the new events;
    // a resume in the old epoch is not recovered.
    redis.kill();
    redis.wipe();
    redis.restart();
    wait_for("both nodes heal", PATIENCE, || {
        [&a, &b]
            .iter()
            .all(|n| n.health().is_some_and(|h| h["status"] == "ok"))
    });
    let gap = page.recv();
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_ne!(gap["epoch"], epoch);
    let new_epoch = gap["epoch"].clone();
    let reply = publish(31);
    assert_eq!(reply["seq"], 1, "{reply}");
    page.expect_event("c", 1);
    let mut late = a.ws();
    assert_eq!(resume(&mut late, "c", 30, &epoch)["recovered"], false);
    assert_eq!(resume(&mut a.ws(), "c", 1, &new_epoch)["recovered"], true);
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

fn token(sub: &str) -> String {
    common::hs256_token(SECRET, sub)
}

#[test]
fn the_per_user_limit_holds_across_nodes_and_a_crashed_nodes_leases_expire() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let flags = ["--jwt-secret", SECRET, "--user-lease-ttl", "3s"];
    let (mut a, b) = (Node::start(&urls, &flags), Node::start(&urls, &flags));
    let path = format!("/ws?token={}", token("u1"));
    let mut tabs: Vec<_> = (0..3).map(|_| a.ws_path(&path)).collect();
    let mut fourth = b.ws_raw(&path);
    let close = fourth.expect_close();
    assert_eq!(u16::from(close.code), 4008, "{close:?}");

    // A user publish reaches the user's tabs on every node; a disconnect closes them all.
    let mut tab_b = b.ws_path(&format!("/ws?token={}", token("u2")));
    let mut tabs_u2 = vec![a.ws_path(&format!("/ws?token={}", token("u2")))];
    let reply = b.publish(&json!({"id": 1, "user": "u2", "data": "hi"}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(tab_b.expect_event("user:u2", 1), json!("hi"));
    assert_eq!(tabs_u2[0].expect_event("user:u2", 1), json!("hi"));
    for tab in &mut tabs {
        tab.send(json!({"type": "ping", "id": 1}));
        assert_eq!(tab.recv()["type"], "pong", "u1 got nothing of u2's");
    }
    let reply = a.publish(&json!({"id": 2, "op": "disconnect", "user": "u2"}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(u16::from(tab_b.expect_close().code), 4003);
    assert_eq!(u16::from(tabs_u2.remove(0).expect_close().code), 4003);

    // Node A dies without closing anything: its three leases still count, until they expire.
    a.kill();
    let killed = std::time::Instant::now();
    let mut refused = b.ws_raw(&path);
    assert_eq!(
        u16::from(refused.expect_close().code),
        4008,
        "A's leases still held"
    );
    wait_for("A's leases expire", PATIENCE, || {
        let mut ws = b.ws_raw(&path);
        let first = ws.recv_or_close();
        first.is_some_and(|message| message["type"] == "connected")
    });
    let admitted = killed.elapsed();
    // The leases expire 3 s after their last renewal; the rest is this loop's polling and a
    // loaded machine's scheduling.
    assert!(
        admitted <= std::time::Duration::from_millis(4500),
        "admitted {admitted:?} after the kill; the lease time is 3s"
    );
}

#[test]
fn a_cluster_of_three_masters_serves_channels_on_every_slot_and_a_migrated_slot_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start(dir.path());
    let urls = cluster.urls();
    let flags = ["--history-size", "1000"];
    let (a, b) = (Node::start(&urls, &flags), Node::start(&urls, &flags));
    wait_for("both nodes see three shards", PATIENCE, || {
        [&a, &b].iter().all(|n| {
            n.health()
                .is_some_and(|h| h["status"] == "ok" && h["redis"]["shards"] == 3)
        })
    });
    // Channels spread over the three masters.
    let channels: Vec<String> = (0..12).map(|i| format!("project:{i}")).collect();
    let owners: std::collections::HashSet<usize> = channels
        .iter()
        .map(|c| cluster.owner_of(redis_protocol::redis_keyslot(c.as_bytes())))
        .collect();
    assert_eq!(owners.len(), 3, "the channels are on every master");
    let mut page_a = a.ws();
    let mut page_b = b.ws();
    for channel in &channels {
        page_a.subscribe(channel);
        page_b.subscribe(channel);
    }
    for (i, channel) in channels.iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        let reply = node.publish(&json!({"id": i, "channel": channel, "data": i}));
        assert_eq!(
            (reply["seq"].clone(), reply["nodes"].clone()),
            (json!(1), json!(2)),
            "{reply}"
        );
    }
    for (i, channel) in channels.iter().enumerate() {
        assert_eq!(page_a.expect_event(channel, 1), json!(i));
        assert_eq!(page_b.expect_event(channel, 1), json!(i));
    }

    // Migrate the slot of `moving` while a worker publishes to it: MOVED and ASK for the
    // scripts, a sunsubscribe for the shard channel. Every acknowledged event arrives once.
    let moving = "project:0";
    let slot = redis_protocol::redis_keyslot(moving.as_bytes());
    let source = cluster.owner_of(slot);
    let target = (source + 1) % 3;
    let socket = a.socket.clone();
    let stored = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&stored);
    let worker = std::thread::spawn(move || {
        let mut publisher = common::RawPublisher::connect(&socket);
        let mut acknowledged = Vec::new();
        for n in 0..300u64 {
            // A retry keeps its idem key, so an unavailable publish is never doubled.
            loop {
                let line = json!({"id": n, "channel": moving, "idem": format!("e{n}"), "data": n});
                publisher.send(&line.to_string());
                let reply = publisher.reply();
                if reply["ok"] == true {
                    acknowledged.push(reply["seq"].as_u64().unwrap());
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                assert_eq!(reply["retry"], true, "{reply}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        acknowledged
    });
    let (source_id, target_id) = (cluster.id_of(source), cluster.id_of(target));
    let slot_text = slot.to_string();
    let target_port = cluster.nodes[target].port.to_string();
    wait_for("the worker publishes", PATIENCE, || {
        stored.load(std::sync::atomic::Ordering::SeqCst) >= 20
    });
    cluster.nodes[target]
        .command(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id])
        .unwrap();
    cluster.nodes[source]
        .command(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id])
        .unwrap();
    loop {
        let keys = cluster.nodes[source]
            .command(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"])
            .unwrap();
        let keys: Vec<&str> = keys
            .split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
            .collect();
        if keys.is_empty() {
            break;
        }
        let mut args = vec![
            "MIGRATE",
            "127.0.0.1",
            &target_port,
            "",
            "0",
            "5000",
            "KEYS",
        ];
        args.extend(keys.iter().copied());
        let reply = cluster.nodes[source].command(&args).unwrap();
        assert!(reply.starts_with("+OK"), "{reply}");
    }
    for node in [target, source, (source + 2) % 3] {
        cluster.nodes[node]
            .command(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id])
            .unwrap();
    }
    let acknowledged = worker.join().unwrap();
    assert_eq!(
        acknowledged,
        (2..=301).collect::<Vec<u64>>(),
        "one seq per event"
    );
    for page in [&mut page_a, &mut page_b] {
        for seq in 2..=301 {
            let event = page.recv();
            assert_eq!(
                (event["channel"].clone(), event["seq"].clone()),
                (json!(moving), json!(seq)),
                "{event}"
            );
        }
    }
    assert_eq!(cluster.owner_of(slot), target, "the slot moved");
}

/// A small deterministic generator, seeded per run (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn randomized_publishes_on_two_nodes_and_pages_hopping_at_random_see_no_duplicate_and_no_unreported_gap()
 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("randomized test seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    // A short history, so that pages that stay away long are told of gaps too.
    let flags = ["--history-size", "30"];
    let nodes = std::sync::Arc::new([Node::start(&urls, &flags), Node::start(&urls, &flags)]);
    let channels = ["r:0", "r:1", "r:2"];
    let stored = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let socket = nodes[w].socket.clone();
            let stored = std::sync::Arc::clone(&stored);
            std::thread::spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(w as u64 + 7) | 1);
                let mut publisher = common::RawPublisher::connect(&socket);
                for n in 0..400 {
                    let channel = channels[rng.below(3) as usize];
                    let idem = format!("w{w}-{n}");
                    let line = json!({"id": n, "channel": channel, "idem": idem, "data": [w, n]});
                    // Redis restarts meanwhile: retried under the same key until stored.
                    loop {
                        publisher.send(&line.to_string());
                        let reply = publisher.reply();
                        if reply["ok"] == true {
                            stored.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        assert_eq!(reply["retry"], true, "{reply}");
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(rng.below(5)));
                }
            })
        })
        .collect();
    let pages: Vec<_> = (0..6)
        .map(|p| {
            let nodes = std::sync::Arc::clone(&nodes);
            std::thread::spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(p as u64 + 101) | 1);
                let mut views = Views::default();
                let started = std::time::Instant::now();
                while started.elapsed() < std::time::Duration::from_secs(3) {
                    let which = rng.below(2) as usize;
                    let node = &nodes[which];
                    views.note(format!("--- hop to node {which}"));
                    let mut ws = node.ws();
                    for channel in channels {
                        let mut subscribe = json!({"type": "subscribe", "channel": channel});
                        if let Some(View { epoch, seq, .. }) = views.channels.get(channel) {
                            subscribe["since"] = json!({"seq": seq, "epoch": epoch});
                        }
                        views.note(format!("> {subscribe}"));
                        ws.send(subscribe);
                    }
                    ws.0.get_ref()
                        .set_read_timeout(Some(std::time::Duration::from_millis(30)))
                        .unwrap();
                    for _ in 0..rng.below(60) {
                        match ws.0.read() {
                            Ok(tungstenite::Message::Text(text)) => {
                                views.apply(&serde_json::from_str(&text).unwrap());
                            }
                            Ok(_) => {}
                            Err(_) => break, // quiet for a moment: hop
                        }
                    }
                    // Hop: sometimes stay away a while, so history runs out.
                    if rng.below(5) == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(rng.below(300)));
                    }
                }
                views
            })
        })
        .collect();
    // Redis restarts with its data in the middle of it all, with one node (chosen at random)
    // held back until the other has healed and published again: the nodes reconnect in a
    // forced order.
    let acknowledged = || stored.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("a hundred publishes stored", PATIENCE, || {
        acknowledged() >= 100
    });
    let held = Rng(seed).below(2) as usize;
    nodes[held].set_running(false);
    redis.kill();
    let at_kill = acknowledged();
    assert!(
        at_kill < 800,
        "the restart comes mid-stream: {at_kill} of 800 stored"
    );
    redis.restart();
    wait_for("the other node publishes again", PATIENCE, || {
        acknowledged() >= at_kill + 20
    });
    nodes[held].set_running(true);
    for worker in workers {
        worker.join().unwrap();
    }
    let mut finals = std::collections::HashMap::new();
    for channel in channels {
        let mut ws = nodes[0].ws();
        finals.insert(channel, ws.subscribe(channel)["seq"].as_u64().unwrap());
    }
    assert_eq!(
        finals.values().sum::<u64>(),
        800,
        "every publish took one seq"
    );
    let mut total_gaps = 0;
    for page in pages {
        let mut views = page.join().unwrap();
        // A last visit catches up to the end, through resumes or reported gaps.
        let mut ws = nodes[1].ws();
        for channel in channels {
            let mut subscribe = json!({"type": "subscribe", "channel": channel});
            if let Some(View { epoch, seq, .. }) = views.channels.get(channel) {
                subscribe["since"] = json!({"seq": seq, "epoch": epoch});
            }
            ws.send(subscribe);
        }
        while channels
            .iter()
            .any(|c| views.channels.get(*c).is_none_or(|v| v.seq < finals[c]))
        {
            views.apply(&ws.recv());
        }
        total_gaps += views.gaps;
    }
    eprintln!("seed {seed}: {total_gaps} gaps reported to pages that stayed away");
}

/// Sends one HTTP request on the publish socket and returns (status line, body).
fn http_publish(socket: &std::path::Path, path: &str, body: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn while_redis_is_down_http_publishes_fail_and_dapr_is_asked_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(&dir.path().join("redis"));
    let config = dir.path().join("sidecast.toml");
    std::fs::write(
        &config,
        "[[dapr.subscription]]\npubsubname = \"p\"\ntopic = \"t\"\nroute = \"/dapr/t\"\nchannel = \"job:{data.id}\"\n",
    )
    .unwrap();
    let node = Node::start(&[redis.url()], &["--config", config.to_str().unwrap()]);
    let mut page = node.ws();
    page.subscribe("job:7");
    let event = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "s", "type": "t", "data": {"id": 7}})
            .to_string()
    };
    let (status, body) = http_publish(&node.socket, "/dapr/t", &event("e1"));
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", r#"{"status":"SUCCESS"}"#)
    );
    page.expect_event("job:7", 1);

    redis.kill();
    wait_for("the node sees Redis down", PATIENCE, || {
        node.health().is_some_and(|h| h["status"] == "unavailable")
    });
    let (status, body) = http_publish(&node.socket, "/dapr/t", &event("e2"));
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", r#"{"status":"RETRY"}"#)
    );
    let (status, body) = http_publish(&node.socket, "/publish", r#"{"channel":"job:7","data":1}"#);
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"id": null, "ok": false, "error": "unavailable", "retry": true})
    );

    // Dapr redelivers after the heal: published once.
    redis.restart();
    wait_for("the node heals", PATIENCE, || {
        node.health().is_some_and(|h| h["status"] == "ok")
    });
    let (_, body) = http_publish(&node.socket, "/dapr/t", &event("e2"));
    assert_eq!(body, r#"{"status":"SUCCESS"}"#);
    page.expect_event("job:7", 2);
}

#[test]
fn a_redis_that_hangs_is_given_up_after_redis_timeout_and_rejoined_when_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let node = Node::start(&[redis.url()], &["--redis-timeout", "300ms"]);
    let mut page = node.ws();
    page.subscribe("c");
    let mut publisher = node.publisher();
    publisher.send(&json!({"id": 1, "channel": "c", "data": 1}).to_string());
    assert_eq!(publisher.reply()["seq"], 1);
    page.expect_event("c", 1);

    redis.set_running(false);
    let started = std::time::Instant::now();
    publisher.send(&json!({"id": 2, "channel": "c", "data": 2}).to_string());
    let reply = publisher.reply();
    assert_eq!(reply["error"], "unavailable", "{reply}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(node.health().unwrap()["status"], "unavailable");

    redis.set_running(true);
    wait_for("the node rejoins", PATIENCE, || {
        node.health().is_some_and(|h| h["status"] == "ok")
    });
    // The publish in flight when Redis hung may have been stored: its seq is 2 if so. The
    // page hears of it either way, as an event or from the stream, never twice.
    publisher.send(&json!({"id": 3, "channel": "c", "idem": "x", "data": 3}).to_string());
    let seq = publisher.reply()["seq"].as_u64().unwrap();
    assert!(seq == 2 || seq == 3, "{seq}");
    for expected in 2..=seq {
        let event = page.recv();
        assert_eq!(
            (event["type"].clone(), event["seq"].clone()),
            (json!("event"), json!(expected)),
            "{event}"
        );
    }
}

#[test]
fn replies_held_behind_an_unanswered_publish_are_bounded_by_max_output_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let flags = ["--max-output-buffer", "4KiB", "--redis-timeout", "10s"];
    let node = Node::start(&[redis.url()], &flags);
    let mut publisher = node.publisher();
    publisher.send(&json!({"id": 0, "channel": "c", "data": 0}).to_string());
    assert_eq!(publisher.reply()["ok"], true);
    // Redis hangs: the next publish waits for it, and every reply after it waits too.
    redis.set_running(false);
    publisher.send(&json!({"id": 1, "channel": "c", "data": 1}).to_string());
    // The node may close the connection before it has read them all.
    let lines: String = (2..200)
        .map(|n| format!("{{\"id\":{n},\"chanel\":\"typo\",\"data\":1}}\n"))
        .collect();
    publisher.send_until_closed(lines.as_bytes());
    // ~100 bytes per error reply: past 4 KiB held, the publisher is closed, not buffered.
    let started = std::time::Instant::now();
    assert_eq!(
        publisher.reply_line(),
        None,
        "closed without its held replies"
    );
    assert!(
        started.elapsed() < PATIENCE / 2,
        "closed at once, not a read timeout: {:?}",
        started.elapsed()
    );
    redis.set_running(true);
    let mut other = node.publisher();
    other.send(&json!({"id": 1, "channel": "c", "data": 2}).to_string());
    assert_eq!(
        other.reply()["ok"],
        true,
        "the node serves the next publisher"
    );
}

#[test]
fn a_password_in_the_url_authenticates_and_a_wrong_one_keeps_the_node_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_with(dir.path(), &["--requirepass", "s3cret-pw"]);
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}", redis.port);
    let node = Node::start(&[url], &[]);
    let reply = node.publish(&json!({"id": 1, "channel": "c", "data": 1}));
    assert_eq!(reply["seq"], 1, "{reply}");

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let port = common::redis::free_port();
    let wrong = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sidecast"))
        .args([
            "serve",
            "--engine",
            "redis",
            "--redis-url",
            &wrong,
            "--log-level",
            "off",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--publish-socket"])
        .arg(&socket)
        .spawn()
        .unwrap();
    wait_for("the node answers /health", PATIENCE, || {
        common::redis::http_get(port, "/health").is_some()
    });
    let health = common::redis::http_get(port, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    let _ = child.kill();
    let _ = child.wait();
}
