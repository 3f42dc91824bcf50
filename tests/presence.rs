//! Presence against a real server: pages on `presence_channels` get a snapshot after
//! `subscribed`, then `presence_diff` messages; members are users, a member lingers after its
//! last tab, and joins are gathered into windows.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{TestServer, Ws};
use serde_json::{Value, json};
use sidecast::auth::JwtKey;
use sidecast::config::Config;

const SECRET: &str = "presence-secret";

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
}

impl View {
    fn of(snapshot: &Value) -> View {
        View {
            version: snapshot["version"].as_u64().unwrap(),
            members: ids(&snapshot["members"]),
            news: Vec::new(),
        }
    }

    /// Reads diffs from `ws` until `done` holds of the view.
    #[track_caller]
    fn follow(&mut self, ws: &mut Ws, done: impl Fn(&View) -> bool) {
        while !done(self) {
            let (joins, leaves, diff) = diff(ws);
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
