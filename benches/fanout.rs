//! What does the fan-out cost per subscriber, in user space? One publish through the real
//! path (`Fanout` as the publish port's `Sink`: the engine's seq, the hub's subscribers, one
//! shared frame, each connection's `OutQueue` through the `Clients` guard, the dirty list,
//! the history), then the user-space half of the flush for every listed connection, into a
//! sink that takes everything. The subscribers are real accepted sockets (their peers closed
//! at once, so 10,000 of them fit the descriptor limit); nothing is written to them, which
//! keeps the kernel out. Compare the per-element time with the ~4.3 µs a loopback write costs
//! on our machine.

use std::io;
use std::net::{TcpListener, TcpStream};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use sidecast::auth::ratelimit::Rate;
use sidecast::base::ids::ConnId;
use sidecast::base::time::Tick;
use sidecast::engine::MemoryEngine;
use sidecast::engine::history::HistoryLimits;
use sidecast::engine::idempotency::IdempotencyLimits;
use sidecast::fanout::{Fanout, SessionSettings};
use sidecast::publish::{Outcome, Published, Reach, Sink, Target};
use sidecast::ws::ClientConn;
use sidecast::ws::http::Handshake;
use sidecast::ws::session::Inbound;
use tungstenite::protocol::WebSocketConfig;

/// A fan-out with `subscribers` open WebSockets subscribed to `project:42`.
fn subscribed(subscribers: usize) -> Fanout {
    let rate = Rate::new(1e9, 1e9, 0.01);
    let settings = SessionSettings {
        instance: 1,
        heartbeat_ms: 30_000,
        sse_heartbeat_ms: 15_000,
        rate,
        rate_limit: 1e9,
        rate_burst: 1_000_000_000,
        rate_limit_strikes: 20,
        max_subscriptions: 100,
        deflate_min_size: 128,
        max_pending_acks: 10_000,
        max_unacked_per_connection: 100,
        max_ack_timeout: std::time::Duration::from_secs(60),
        ack_grace: std::time::Duration::ZERO,
    };
    let history = HistoryLimits {
        size: 100,
        max_bytes: 1 << 20,
        ttl_ticks: 30_000,
        quiet_channels: 0,
    };
    let idempotency = IdempotencyLimits {
        limit: 0,
        window: 0,
    };
    let engine = MemoryEngine::new(history, idempotency);
    let mut fanout = Fanout::new(
        Box::new(engine),
        None,
        settings,
        "bench",
        Default::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let subscribe = r#"{"type":"subscribe","channel":"project:42"}"#;
    for generation in 0..subscribers {
        let _peer = TcpStream::connect(addr).expect("connect");
        let (socket, peer) = listener.accept().expect("accept");
        socket.set_nonblocking(true).expect("non-blocking");
        let socket = mio::net::TcpStream::from_std(socket);
        let key = fanout.clients_mut().insert(|key| {
            let id = ConnId {
                key: key as u32,
                generation: generation as u32,
            };
            ClientConn::new(id, socket, peer, 1 << 20)
        });
        let mut conn = fanout.clients_mut().get_mut(key).expect("inserted");
        let config = WebSocketConfig::default().write_buffer_size(0);
        let handshake = Handshake {
            accept_key: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
            deflate: false,
        };
        conn.upgrade(&handshake, Vec::new(), config, rate, Tick(0));
        drop(conn);
        fanout.open(key, None).expect("auth is off");
        fanout.on_message(key, Inbound::Text(subscribe.into()));
    }
    flush(&mut fanout, &mut Vec::new(), &mut Vec::new());
    fanout
}

/// The user-space half of the reactor's flush.
fn flush(fanout: &mut Fanout, dirty: &mut Vec<usize>, gather: &mut Vec<u8>) {
    fanout.clients_mut().take_dirty(dirty);
    for &key in dirty.iter() {
        let mut conn = fanout.clients_mut().get_mut(key).expect("a listed client");
        conn.flush_user_space(&mut io::sink(), gather, Tick(0))
            .expect("a sink takes everything");
    }
}

fn publish_and_flush(c: &mut Criterion) {
    let data = RawValue::from_string(format!(
        r#"{{"jobId":"j-91","progress":40,"pad":"{}"}}"#,
        "x".repeat(160)
    ))
    .expect("valid JSON");
    let target = Target::Channel("project:42".into());
    let mut group = c.benchmark_group("fanout");
    for subscribers in [1_000usize, 10_000] {
        let mut fanout = subscribed(subscribers);
        let (mut dirty, mut gather) = (Vec::new(), Vec::new());
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("publish_flush", subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    fanout.begin_pass(Tick(0), 1, 0);
                    let published = fanout.serving(None).publish(&target, &data, None, None);
                    let delivered = match published {
                        Outcome::Done(Published { reach, .. }) => reach,
                        other => panic!("{other:?}"),
                    };
                    let skipped = 0;
                    assert_eq!(
                        delivered,
                        Reach::Connections {
                            delivered: subscribers,
                            skipped
                        }
                    );
                    flush(&mut fanout, &mut dirty, &mut gather);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, publish_and_flush);
criterion_main!(benches);
