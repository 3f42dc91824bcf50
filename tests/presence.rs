//! Presence against a real server: pages on `presence_channels` get a snapshot after
//! `subscribed`, then `presence_diff` messages; members are users, a member lingers after its
//! last tab, and joins are gathered into windows.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::redis::{Node, RedisServer, wait_for};
use common::{PATIENCE, TestServer, Ws};
use serde_json::{Value, json};
use sidecast::auth::JwtKey;
use sidecast::config::Config;

const SECRET: &str = "presence-secret-of-at-least-32-bytes";

fn presence_config(c: &mut Config) {
    c.jwt = Some(JwtKey::Secret(SECRET.into()));
    c.presence_channels = vec!["doc:*".into()];
    c.presence_linger = Duration::from_millis(400);
    c.presence_window = Duration::from_millis(50);
    c.max_connections_per_user = 10;
}

/// A token for `sub`, with `claims` besides.
fn token(sub: &str, claims: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut all = json!({"sub": sub, "exp": exp, "channels": ["doc:*"]});
    all.as_object_mut()
        .unwrap()
        .extend(claims.as_object().unwrap().clone());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &all,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A page of `sub` (with its `presence` claim, if any).
#[track_caller]
fn page(server: &TestServer, sub: &str, info: Option<Value>) -> Ws {
    let claims = info.map_or(json!({}), |info| json!({"presence": info}));
    let bearer = format!("Bearer {}", token(sub, claims));
    let mut ws = (server.ws_with_headers("/ws", &[("Authorization", &bearer)])).expect("upgrade");
    assert_eq!(ws.recv()["type"], "connected");
    ws
}

/// Subscribes `ws` to `channel` and returns the snapshot that follows `subscribed`.
#[track_caller]
fn join(ws: &mut Ws, channel: &str) -> Value {
    ws.subscribe(channel);
    let snapshot = ws.recv();
    assert_eq!(
        (&snapshot["type"], &snapshot["channel"]),
        (&json!("presence"), &json!(channel)),
        "{snapshot}"
    );
    snapshot
}

fn ids(members: &Value) -> BTreeSet<String> {
    (members.as_array().unwrap().iter())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// The next `presence_diff`: its joins' ids and its leaves.
#[track_caller]
fn diff(ws: &mut Ws) -> (BTreeSet<String>, BTreeSet<String>, Value) {
    let diff = ws.recv();
    assert_eq!(diff["type"], "presence_diff", "{diff}");
    parse_diff(diff)
}

/// A `presence_diff`'s joins' ids and leaves.
fn parse_diff(diff: Value) -> (BTreeSet<String>, BTreeSet<String>, Value) {
    let leaves = (diff["leaves"].as_array().unwrap().iter())
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    (ids(&diff["joins"]), leaves, diff)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(ToString::to_string).collect()
}

/// What a page knows of a channel's members, kept as `sidecast.js` keeps it: the snapshot,
/// then each diff newer than what it has; `news` lists the real changes, in order.
struct View {
    version: u64,
    members: BTreeSet<String>,
    news: Vec<String>,
    /// Every leave read, newer or not: a leave announced twice shows here.
    leaves_read: Vec<String>,
}

impl View {
    fn of(snapshot: &Value) -> View {
        View {
            version: snapshot["version"].as_u64().unwrap(),
            members: ids(&snapshot["members"]),
            news: Vec::new(),
            leaves_read: Vec::new(),
        }
    }

    /// Reads presence messages from `ws` until `done` holds of the view: diffs newer than
    /// what it has, and snapshots (a resync), which replace it.
    #[track_caller]
    fn follow(&mut self, ws: &mut Ws, done: impl Fn(&View) -> bool) {
        while !done(self) {
            let message = ws.recv();
            if message["type"] == "presence" {
                let members = ids(&message["members"]);
                for id in members.difference(&self.members) {
                    self.news.push(format!("+{id}"));
                }
                for id in self.members.difference(&members) {
                    self.news.push(format!("-{id}"));
                }
                *self = View {
                    news: std::mem::take(&mut self.news),
                    leaves_read: std::mem::take(&mut self.leaves_read),
                    ..View::of(&message)
                };
                continue;
            }
            if message["type"] != "presence_diff" {
                continue; // a gap, after Redis lost the channel's events too
            }
            let (joins, leaves, diff) = parse_diff(message);
            self.leaves_read.extend(leaves.iter().cloned());
            let version = diff["version"].as_u64().unwrap();
            if version <= self.version {
                continue;
            }
            self.version = version;
            for id in joins {
                if self.members.insert(id.clone()) {
                    self.news.push(format!("+{id}"));
                }
            }
            for id in leaves {
                if self.members.remove(&id) {
                    self.news.push(format!("-{id}"));
                }
            }
        }
    }
}

#[test]
fn a_member_is_a_user_whatever_its_tabs_and_leaves_once_after_the_linger() {
    let server = TestServer::start_with(presence_config);
    let mut ann = page(&server, "ann", Some(json!({"name": "Ann"})));
    let snapshot = join(&mut ann, "doc:1");
    let mut anns_view = View::of(&snapshot);
    assert_eq!(snapshot["count"], json!({"members": 1, "connections": 1}));
    let me = &snapshot["members"][0];
    assert_eq!((&me["id"], &me["user"]), (&json!("ann"), &json!("ann")));
    assert_eq!(
        me["info"],
        json!({"name": "Ann"}),
        "from the token's presence claim"
    );
    assert_eq!(me["clients"].as_array().unwrap().len(), 1);

    let mut bob = page(&server, "bob", None);
    let snapshot = join(&mut bob, "doc:1");
    assert_eq!(ids(&snapshot["members"]), set(&["ann", "bob"]));
    let mut bobs_view = View::of(&snapshot);
    anns_view.follow(&mut ann, |v| v.members.contains("bob"));
    assert_eq!(anns_view.news, ["+bob"]);

    // Ann's second tab is no join; Cid's arrival shows what the others were told meanwhile.
    let mut ann_again = page(&server, "ann", None);
    let both = join(&mut ann_again, "doc:1");
    assert_eq!(both["count"], json!({"members": 2, "connections": 3}));
    let mut cid = page(&server, "cid", None);
    let mut cids_view = View::of(&join(&mut cid, "doc:1"));
    bobs_view.follow(&mut bob, |v| v.members.contains("cid"));
    assert_eq!(bobs_view.news, ["+cid"], "not Ann again");

    // Ann closes one tab, then the other: she leaves once, a linger after the last.
    drop(ann_again);
    let closed = Instant::now();
    drop(ann);
    bobs_view.follow(&mut bob, |v| !v.members.contains("ann"));
    let waited = closed.elapsed();
    assert_eq!(bobs_view.news, ["+cid", "-ann"]);
    assert!(
        waited >= Duration::from_millis(400),
        "after the linger: {waited:?}"
    );

    // Bob reloads within the linger: nobody hears of it.
    drop(bob);
    let mut bob = page(&server, "bob", None);
    join(&mut bob, "doc:1");
    let mut dan = page(&server, "dan", None);
    join(&mut dan, "doc:1");
    cids_view.follow(&mut cid, |v| v.members.contains("dan"));
    assert_eq!(cids_view.news, ["-ann", "+dan"], "Bob's reload unseen");
}

#[test]
fn a_mass_join_costs_each_page_a_few_gathered_messages_and_past_the_cap_only_counts() {
    let server = TestServer::start_with(|c| {
        presence_config(c);
        c.max_presence_members = 150;
    });
    let mut watcher = page(&server, "watcher", None);
    join(&mut watcher, "doc:big");
    let started = server.metric("sidecast_presence_messages_total");
    let pages: Vec<Ws> = (0..200)
        .map(|n| {
            let mut ws = page(&server, &format!("u{n}"), None);
            ws.subscribe("doc:big");
            ws
        })
        .collect();
    // The watcher hears of all 200 in gathered windows, far fewer messages than joins.
    let (mut seen, mut messages) = (BTreeSet::new(), 0);
    while seen.len() < 200 {
        let (joins, leaves, diff) = diff(&mut watcher);
        assert!(leaves.is_empty(), "{diff}");
        if diff["truncated"] == true {
            break; // more than 150 in one window: counts only
        }
        seen.extend(joins);
        messages += 1;
    }
    eprintln!("200 joins reached the watcher in {messages} messages");
    assert!(messages < 50, "{messages} messages for 200 joins");
    // Each page got one snapshot, and the diffs of the windows after it: O(pages).
    let sent = server.metric("sidecast_presence_messages_total") - started;
    eprintln!("{sent} presence messages in all for 200 joins");
    assert!(sent < 200 * 30, "{sent}");
    // A page arriving now sees the counts, not a list of 201.
    let mut late = page(&server, "late", None);
    let snapshot = join(&mut late, "doc:big");
    assert_eq!(snapshot["truncated"], true, "{snapshot}");
    assert_eq!(snapshot.get("members"), None);
    assert_eq!(
        snapshot["count"],
        json!({"members": 202, "connections": 202})
    );
    drop(pages);
}

#[test]
fn presence_is_shown_only_where_the_token_allows_and_workers_can_ask() {
    let server = TestServer::start_with(presence_config);
    let mut ann = page(&server, "ann", None);
    join(&mut ann, "doc:1");
    ann.send(json!({"type": "presence_stats", "channel": "doc:1", "id": 1}));
    assert_eq!(
        ann.recv(),
        json!({"type": "presence_stats", "channel": "doc:1", "members": 1, "connections": 1, "id": 1})
    );
    ann.send(json!({"type": "presence_stats", "channel": "user:ann", "id": 2}));
    let refused = ann.recv();
    assert_eq!(
        (&refused["code"], &refused["id"]),
        (&json!("no_presence"), &json!(2)),
        "{refused}"
    );
    // A token whose channels claim does not cover doc:2 sees nothing of it.
    let bearer = format!("Bearer {}", token("eve", json!({"channels": ["doc:1"]})));
    let mut eve = server
        .ws_with_headers("/ws", &[("Authorization", &bearer)])
        .unwrap();
    eve.recv();
    eve.send(json!({"type": "presence_stats", "channel": "doc:2", "id": 3}));
    assert_eq!(eve.recv()["code"], "forbidden");
    eve.send(json!({"type": "subscribe", "channel": "doc:2"}));
    assert_eq!(eve.recv()["code"], "forbidden");

    // A worker asks over the publish port (and over HTTP alike, through the same commands).
    let reply = server.publish(json!({"id": 7, "op": "presence", "channel": "doc:1"}));
    assert_eq!(
        (&reply["id"], &reply["ok"]),
        (&json!(7), &json!(true)),
        "{reply}"
    );
    assert_eq!(ids(&reply["members"]), set(&["ann"]));
    assert_eq!(reply["count"], json!({"members": 1, "connections": 1}));
    let refused = server.publish(json!({"id": 8, "op": "presence", "channel": "other"}));
    assert_eq!(refused["ok"], false, "{refused}");
    let malformed =
        server.publish(json!({"id": 9, "op": "presence", "channel": "doc:1", "data": 1}));
    assert_eq!(malformed["ok"], false, "{malformed}");
}

#[test]
fn without_authentication_each_connection_is_a_member_and_event_streams_are_not() {
    let server = TestServer::start_with(|c| {
        c.presence_channels = vec!["room:*".into()];
        c.presence_window = Duration::from_millis(20);
        c.presence_linger = Duration::ZERO;
    });
    let mut first = server.ws();
    let mine = join(&mut first, "room:1");
    let me = mine["members"][0].clone();
    assert_eq!(me["id"], me["clients"][0], "{me}");
    assert_eq!(me.get("user"), None);
    // An event stream on the channel gets its events but is no member: it cannot be seen.
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"GET /sse?channels=room:1 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    server.wait_until("the stream is open", |s| {
        s.metric("sidecast_event_streams") == 1
    });
    let mut second = server.ws();
    let snapshot = join(&mut second, "room:1");
    assert_eq!(
        snapshot["count"],
        json!({"members": 2, "connections": 2}),
        "{snapshot}"
    );
    let mut view = View::of(&mine);
    view.follow(&mut first, |v| v.members.len() == 2);
    drop(second);
    view.follow(&mut first, |v| v.members.len() == 1);
    assert_eq!(view.news.len(), 2, "one join, one leave: {:?}", view.news);
}

// ---- across nodes, with a real Redis ----

const NODE_FLAGS: [&str; 12] = [
    "--jwt-secret",
    SECRET,
    "--presence-channels",
    "doc:*",
    "--presence-linger",
    "1s",
    "--presence-window",
    "50ms",
    "--user-lease-ttl",
    "3s",
    "--max-connections-per-user",
    "10",
];

/// A page of `sub` on `node`.
#[track_caller]
fn page_on(node: &Node, sub: &str) -> Ws {
    node.ws_path(&format!("/ws?token={}", token(sub, json!({}))))
}

/// Connections in `channel`'s roster in Redis.
fn roster_connections(redis: &RedisServer, channel: &str) -> Option<usize> {
    let reply = redis.command(&["ZCARD", &format!("sidecast:{{{channel}}}:pc")])?;
    reply.trim().strip_prefix(':')?.parse().ok()
}

#[test]
fn nodes_share_one_roster_and_a_killed_nodes_members_leave_once() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let (a, mut b, c) = (
        Node::start(&urls, &NODE_FLAGS),
        Node::start(&urls, &NODE_FLAGS),
        Node::start(&urls, &NODE_FLAGS),
    );
    let mut ann = page_on(&a, "ann");
    let mut view = View::of(&join(&mut ann, "doc:1"));
    let mut bob = page_on(&b, "bob");
    let mut cid = page_on(&b, "cid");
    let mut eve = page_on(&c, "eve");
    join(&mut bob, "doc:1");
    join(&mut cid, "doc:1");
    let union = join(&mut eve, "doc:1");
    assert_eq!(
        ids(&union["members"]),
        set(&["ann", "bob", "cid", "eve"]),
        "{union}"
    );
    view.follow(&mut ann, |v| v.members.len() == 4);
    assert_eq!(view.news, ["+bob", "+cid", "+eve"]);

    // B dies without a word: its connections' leases expire (3 s), Bob and Cid linger (1 s),
    // and each leaves once, whichever of A and C reaps first.
    let killed = Instant::now();
    b.kill();
    drop((bob, cid));
    view.follow(&mut ann, |v| v.members.len() == 2);
    let waited = killed.elapsed();
    eprintln!("a killed node's members left {waited:?} after the kill");
    assert!(
        waited < Duration::from_secs(3 + 1) + PATIENCE / 2,
        "{waited:?}"
    );
    let mut left = view.leaves_read.clone();
    left.sort();
    assert_eq!(left, ["bob", "cid"], "each leave announced once");
    // C's page saw the same.
    let mut evs = View::of(&union);
    evs.follow(&mut eve, |v| v.members.len() == 2);
    let mut left = evs.leaves_read.clone();
    left.sort();
    assert_eq!(left, ["bob", "cid"]);
    assert_eq!(roster_connections(&redis, "doc:1"), Some(2));

    // A worker on any node reads the same roster.
    let reply = c.publish(&json!({"id": 1, "op": "presence", "channel": "doc:1"}));
    assert_eq!(ids(&reply["members"]), set(&["ann", "eve"]), "{reply}");
}

#[test]
fn a_rolling_restart_and_a_redis_that_lost_everything_send_no_leave_and_no_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path());
    let urls = [redis.url()];
    let mut stays = Node::start(&urls, &NODE_FLAGS);
    let mut a = Node::start(&urls, &NODE_FLAGS);
    let mut watcher = page_on(&stays, "wat");
    let mut view = View::of(&join(&mut watcher, "doc:1"));
    let mut ann = page_on(&a, "ann");
    join(&mut ann, "doc:1");
    view.follow(&mut watcher, |v| v.members.contains("ann"));
    assert_eq!(view.news, ["+ann"]);

    // Node A is replaced: Ann's page reconnects to the new one at once.
    a.kill();
    drop(ann);
    let a2 = Node::start(&urls, &NODE_FLAGS);
    let mut ann = page_on(&a2, "ann");
    let mut anns = View::of(&join(&mut ann, "doc:1"));
    // The dead node's connection is reaped once its lease expires: Ann stays.
    wait_for("the dead node's connection is reaped", PATIENCE, || {
        roster_connections(&redis, "doc:1") == Some(2)
    });
    // The watcher heard nothing of it: the next change it hears of is Bea's arrival.
    let mut bea = page_on(&stays, "bea");
    join(&mut bea, "doc:1");
    view.follow(&mut watcher, |v| v.members.contains("bea"));
    assert_eq!(view.news, ["+ann", "+bea"]);
    assert!(view.leaves_read.is_empty(), "{:?}", view.leaves_read);

    // Redis restarts empty: the nodes put their connections back without a word, and each
    // page gets a fresh snapshot instead.
    redis.kill();
    redis.wipe();
    redis.restart();
    let snapshot = loop {
        let message = watcher.recv();
        match message["type"].as_str() {
            Some("presence") => break message,
            Some("presence_diff") => panic!("nothing changed: {message}"),
            _ => {}
        }
    };
    assert_eq!(
        ids(&snapshot["members"]),
        set(&["ann", "bea", "wat"]),
        "{snapshot}"
    );
    let mut view = View::of(&snapshot);

    // Nothing else was said: the next change the watcher hears of is Dan's arrival.
    let mut dan = page_on(&a2, "dan");
    join(&mut dan, "doc:1");
    view.follow(&mut watcher, |v| v.members.contains("dan"));
    assert_eq!(view.news, ["+dan"]);
    assert!(view.leaves_read.is_empty(), "{:?}", view.leaves_read);

    // The other node is replaced too: its pages move to A's successor, and Ann, who stayed
    // there, sees only what really changed (Bea and Dan came; nobody left).
    stays.kill();
    drop((watcher, bea));
    let mut watcher = page_on(&a2, "wat");
    join(&mut watcher, "doc:1");
    let mut bea = page_on(&a2, "bea");
    join(&mut bea, "doc:1");
    wait_for(
        "the second dead node's connections are reaped",
        PATIENCE,
        || roster_connections(&redis, "doc:1") == Some(4),
    );
    let mut eli = page_on(&a2, "eli");
    join(&mut eli, "doc:1");
    anns.follow(&mut ann, |v| v.members.contains("eli"));
    assert_eq!(anns.news, ["+bea", "+dan", "+eli"]);
    assert!(anns.leaves_read.is_empty(), "{:?}", anns.leaves_read);
}
