//! Confirmed publishes per second to the local RabbitMQ (`scripts/test` starts it): the AMQP
//! transport publishing 1 KB envelopes to a topic exchange bound to a queue, each publish
//! waiting for its own confirm, up to 512 in flight.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::stream::{FuturesUnordered, StreamExt};
use herald::model::{AmqpTarget, Delivery, Outcome, Secret, Subscription, SubscriptionSpec, TransportKind};
use herald::target::Target;
use herald::transport::amqp::AmqpTransport;
use herald::transport::NetworkGuard;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PUBLISHES: usize = 2000;
const IN_FLIGHT: usize = 512;

fn amqp(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (_conn, ch) = rt.block_on(async {
        let conn = Connection::connect(BROKER, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (./scripts/test starts it)");
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            "herald-bench".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare("herald-bench".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
        ch.queue_bind(
            "herald-bench".into(),
            "herald-bench".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        (conn, ch)
    });
    let transport = AmqpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]));
    let amqp =
        AmqpTarget { uri: Secret(BROKER.into()), exchange: "herald-bench".into(), routing_keys: Default::default() };
    let sub = Subscription::unchecked(
        "sub_bench".into(),
        "bench".into(),
        SubscriptionSpec {
            url: "amqp://127.0.0.1/herald-bench".into(),
            transport: TransportKind::Amqp,
            amqp: Some(amqp),
            ..SubscriptionSpec::default()
        },
        herald::signing::generate_secret(),
    );
    let target = Arc::new(Target::compile(sub).unwrap());
    let data = Bytes::from(format!(r#"{{"pad":"{}"}}"#, "x".repeat(1000)));
    let mut group = c.benchmark_group("amqp");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PUBLISHES as u64));
    group.bench_function("confirmed_publishes_1k", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (transport, target, data, ch) = (transport.clone(), target.clone(), data.clone(), ch.clone());
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let mut pending = FuturesUnordered::new();
                    for i in 0..PUBLISHES {
                        let d = Delivery {
                            event_id: format!("evt_bench_{i}"),
                            subscription: "sub_bench".into(),
                            tenant: "bench".into(),
                            event_type: "BenchEvent".into(),
                            attempt: 1,
                            accepted_ms: 0,
                            due_ms: 0,
                            budget_ms: 0,
                            generation: 0,
                            data: data.clone(),
                            changes: None,
                            trace: None,
                            ordering_key: None,
                            as_sent: false,
                        };
                        let signed = target.sign(&d, 0, 0);
                        let (transport, target) = (transport.clone(), target.clone());
                        pending
                            .push(async move { transport.publish(&target, &d, signed, Duration::from_secs(30)).await });
                        if pending.len() >= IN_FLIGHT {
                            let outcome = pending.next().await.unwrap();
                            assert!(matches!(outcome, Outcome::Delivered { .. }), "{outcome:?}");
                        }
                    }
                    while let Some(outcome) = pending.next().await {
                        assert!(matches!(outcome, Outcome::Delivered { .. }), "{outcome:?}");
                    }
                    total += started.elapsed();
                    ch.queue_purge("herald-bench".into(), QueuePurgeOptions::default()).await.unwrap();
                }
                total
            }
        })
    });
    group.finish();
}

criterion_group!(benches, amqp);
criterion_main!(benches);
