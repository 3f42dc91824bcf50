//! How fast is one publish line turned into a command? Parses typical lines (one channel, a
//! small progress payload; several channels; a 4 KiB payload) as the publish port does before
//! any fan-out. `data` stays borrowed, so payload size should barely matter.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sidecast::publish::command::parse_command;

fn parse(c: &mut Criterion) {
    let big = format!(
        r#"{{"channel":"project:42","data":{{"blob":"{}"}}}}"#,
        "x".repeat(4096)
    );
    let lines = [
        ("progress", r#"{"channel":"project:42","data":{"jobId":"j-91","progress":40,"message":"rendering"}}"#.to_string()),
        ("with_id", r#"{"id":7,"channel":"project:42","data":{"jobId":"j-91","progress":40}}"#.to_string()),
        ("three_channels", r#"{"channels":["project:42","order:7","user:u1"],"data":{"status":"done"}}"#.to_string()),
        ("payload_4k", big),
    ];
    let mut group = c.benchmark_group("publish_parse");
    group.throughput(Throughput::Elements(1));
    for (name, line) in &lines {
        group.bench_function(*name, |b| {
            b.iter(|| parse_command(std::hint::black_box(line.as_bytes())).expect("valid line"))
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
