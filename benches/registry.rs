//! How expensive is subscription churn? 10,000 connections each subscribe to one of 100
//! channels and unsubscribe again, through the hub's real code (channel creation and release
//! included). Reported per subscribe + unsubscribe pair.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sidecast::client::ConnId;
use sidecast::hub::Hub;
use sidecast::timer::Tick;
use sidecast::wire::ChannelName;

const CONNECTIONS: u32 = 10_000;
const CHANNELS: u32 = 100;

fn churn(c: &mut Criterion) {
    let names: Vec<ChannelName> = (0..CHANNELS)
        .map(|i| ChannelName::parse(&format!("project:{i}")).expect("valid"))
        .collect();
    let mut hub = Hub::new();
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
                held.push((hub.subscribe(name, conn).0, conn));
            }
            for (channel, conn) in held.drain(..) {
                hub.unsubscribe(channel, conn, Tick(0));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, churn);
criterion_main!(benches);
