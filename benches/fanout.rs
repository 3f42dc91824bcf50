//! What does the fan-out cost per subscriber, in user space? Encodes one event frame, queues
//! a shared handle to it on N output queues, then flushes every queue into a sink (a `Write`
//! that takes everything, keeping the kernel out). This is the work `Fanout::publish_to` and
//! the flush pass do per event, minus the syscalls; compare the per-element time with the
//! ~4.3 µs a loopback write costs on our machine.

use std::io;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use sidecast::ws::OutQueue;
use sidecast::ws::wire::{EventTarget, event_frame};

fn encode_enqueue_flush(c: &mut Criterion) {
    let data = RawValue::from_string(format!(
        r#"{{"jobId":"j-91","progress":40,"pad":"{}"}}"#,
        "x".repeat(160)
    ))
    .expect("valid JSON");
    let mut group = c.benchmark_group("fanout");
    for subscribers in [1_000usize, 10_000] {
        let mut queues: Vec<OutQueue> = (0..subscribers).map(|_| OutQueue::new(1 << 20)).collect();
        let mut scratch = Vec::new();
        let mut seq = 0;
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("encode_enqueue_flush", subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    seq += 1;
                    let frame =
                        event_frame(EventTarget::Channel("project:42", seq), &data, &mut scratch);
                    for queue in &mut queues {
                        queue.push(frame.clone());
                    }
                    for queue in &mut queues {
                        queue
                            .write_to(&mut io::sink())
                            .expect("a sink takes everything");
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, encode_enqueue_flush);
criterion_main!(benches);
