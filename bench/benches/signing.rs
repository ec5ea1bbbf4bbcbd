//! Signing cost per request: Standard Webhooks and plain HMAC, 256 B / 1 KB / 16 KB bodies.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald::model::{Secret, SignatureEncoding, SignatureSpec};
use herald::signing::{generate_secret, Signer};

fn signing(c: &mut Criterion) {
    let secret = generate_secret();
    let hmac_secret = Secret("receiver-chosen-secret".into());
    let standard = Signer::new(&SignatureSpec::Standard, &[&secret]).unwrap();
    let hmac = Signer::new(
        &SignatureSpec::Hmac { header: "x-hook-signature".into(), encoding: SignatureEncoding::Base64 },
        &[&hmac_secret],
    )
    .unwrap();
    let mut group = c.benchmark_group("sign");
    for size in [256usize, 1024, 16 * 1024] {
        let body = [Bytes::from(vec![b'x'; size])];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("standard", size), &body, |b, body| {
            b.iter(|| standard.headers("evt_0192f0c3a1b27c3d8e9f", 1_700_000_000, body))
        });
        group.bench_with_input(BenchmarkId::new("hmac", size), &body, |b, body| {
            b.iter(|| hmac.headers("evt_0192f0c3a1b27c3d8e9f", 1_700_000_000, body))
        });
    }
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
