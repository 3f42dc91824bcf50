//! What does the timer wheel cost per connection? Inserts 100k timers spread over a minute of
//! 10 ms ticks (as 100k heartbeats would be), then advances tick by tick until all fired.
//! Reported per timer, so the figure is the insert + expire cost of one heartbeat.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sidecast::reactor::timer::{Tick, TimerWheel};

const TIMERS: u64 = 100_000;
const SPREAD_TICKS: u64 = 6_000;

fn insert_and_expire(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer_wheel");
    group.throughput(Throughput::Elements(TIMERS));
    // A fixed multiplicative sequence spreads deadlines like random ones, reproducibly.
    let deadlines: Vec<Tick> = (0..TIMERS)
        .map(|i| Tick(1 + (i * 2_654_435_761) % SPREAD_TICKS))
        .collect();
    group.bench_function("insert_100k", |b| {
        b.iter_batched_ref(
            || TimerWheel::new(Tick(0)),
            |wheel| {
                for (i, &at) in deadlines.iter().enumerate() {
                    wheel.insert(at, i);
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("expire_100k", |b| {
        b.iter_batched_ref(
            || {
                let mut wheel = TimerWheel::new(Tick(0));
                for (i, &at) in deadlines.iter().enumerate() {
                    wheel.insert(at, i);
                }
                (wheel, Vec::with_capacity(TIMERS as usize))
            },
            |(wheel, fired)| {
                for now in 1..=SPREAD_TICKS {
                    wheel.advance(Tick(now), fired);
                }
                assert_eq!(fired.len(), TIMERS as usize);
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, insert_and_expire);
criterion_main!(benches);
