//! How expensive is subscription churn? 10,000 connections each subscribe to one of 100
//! channels and unsubscribe again, through the hub and the in-memory engine as the fan-out
//! drives them (channel creation and release, watch and unwatch included). Reported per
//! subscribe + unsubscribe pair.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sidecast::base::channel::ChannelName;
use sidecast::base::ids::ConnId;
use sidecast::base::time::Tick;
use sidecast::engine::MemoryEngine;
use sidecast::fanout::Hub;
use sidecast::fanout::hub::Joined;

const CONNECTIONS: u32 = 10_000;
const CHANNELS: u32 = 100;

fn churn(c: &mut Criterion) {
    let names: Vec<ChannelName> = (0..CHANNELS)
        .map(|i| ChannelName::parse(&format!("project:{i}")).expect("valid"))
        .collect();
    let mut hub = Hub::new();
    let mut engine = MemoryEngine::default();
    let mut held = Vec::with_capacity(CONNECTIONS as usize);
    let mut group = c.benchmark_group("registry");
    group.throughput(Throughput::Elements(u64::from(CONNECTIONS)));
    group.bench_function("subscribe_unsubscribe_10k", |b| {
        b.iter(|| {
            for key in 0..CONNECTIONS {
                let conn = ConnId {
                    key,
                    generation: key,
                };
                // A multiplicative step scatters connections over channels.
                let name = &names[(key.wrapping_mul(2_654_435_761) % CHANNELS) as usize];
                let (channel, joined) = hub.subscribe(name, conn);
                if joined == Joined::First {
                    engine.watch(name.as_str());
                }
                held.push((channel, conn));
            }
            for (channel, conn) in held.drain(..) {
                if let Some(name) = hub.unsubscribe(channel, conn) {
                    engine.unwatch(&name, Tick(0));
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, churn);
criterion_main!(benches);
