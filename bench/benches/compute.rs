//! Per-attempt CPU work besides signing: building the envelope, and the retry policy's
//! backoff and `pendingRetries` computation.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use herald::model::{Delivery, PayloadFormat};
use herald::retry::policy::{seed, Policy};

fn delivery(size: usize) -> Delivery {
    Delivery {
        event_id: "evt_0192f0c3a1b27c3d8e9f".into(),
        subscription: "sub_0192f0c3a1b27c3d8e9f0011".into(),
        tenant: "acme".into(),
        event_type: "OrderCreated".into(),
        attempt: 3,
        accepted_ms: 1_700_000_000_000,
        due_ms: 1_700_000_000_000,
        budget_ms: 1_700_000_000_000,
        generation: 0,
        data: Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(10)))),
        changes: None,
        trace: None,
        ordering_key: None,
        as_sent: false,
    }
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for size in [256usize, 1024, 16 * 1024] {
        let d = delivery(size);
        group.bench_with_input(BenchmarkId::new("build", size), &d, |b, d| {
            b.iter(|| herald::payload::build(PayloadFormat::Envelope, d, 182, 1_700_000_001_000))
        });
    }
    let d = delivery(1024);
    group.bench_function("record_encode_decode_1024", |b| b.iter(|| Delivery::decode(d.encode()).unwrap()));
    group.finish();
}

fn backoff(c: &mut Criterion) {
    let policy = Policy::from_spec(None);
    let s = seed("evt_0192f0c3a1b27c3d8e9f", "sub_0192f0c3a1b27c3d8e9f0011", 0);
    let start = 1_700_000_000_000i64;
    let mut group = c.benchmark_group("backoff");
    group.bench_function("next_due_default_policy", |b| {
        b.iter(|| policy.next_due(std::hint::black_box(40), start, start + 3_600_000, s, None))
    });
    group.bench_function("pending_retries_early", |b| {
        b.iter(|| policy.pending_retries(std::hint::black_box(3), start, start + 30_000, s))
    });
    group.bench_function("pending_retries_near_max_age", |b| {
        b.iter(|| policy.pending_retries(std::hint::black_box(150), start, start + 20 * 3_600_000, s))
    });
    group.finish();
}

criterion_group!(benches, envelope, backoff);
criterion_main!(benches);
