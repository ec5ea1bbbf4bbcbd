//! Metrics as Prometheus reads them after known traffic, and the deploy files that query them.

use crate::support::metrics::scrape;
use crate::support::{spawn_herald, until, Api, Behaviour, Receiver, TOKEN};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Metric families exposed, with the series names a histogram adds.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Herald metric names a PromQL expression uses.
fn herald_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("herald_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

async fn known_traffic() -> (crate::support::ChildGuard, Api, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    rx.behave("/flaky", Behaviour::FailFirst { n: 1, status: 500 });
    rx.respond_on("/dead", 500);
    let (child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let policy = |n: u32| json!({ "policy": "fixed", "interval": "100ms", "max_attempts": n });
    api.subscribe(json!({ "url": rx.url("/ok"), "events": ["A"] })).await;
    api.subscribe(json!({ "url": rx.url("/flaky"), "events": ["B"], "retry": policy(3) })).await;
    api.subscribe(json!({ "url": rx.url("/dead"), "events": ["C"], "retry": policy(2) })).await;
    for t in ["A", "A", "A", "B", "B", "C"] {
        let (status, _) = api.post("/v1/events", json!({ "type": t, "data": {} })).await;
        assert_eq!(status, 202);
    }
    // Keep the receiver alive for the test's duration.
    std::mem::forget(rx);
    (child, api, dir)
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let (mut child, api, _dir) = known_traffic().await;
    let s = until("all traffic settled in the metrics", Duration::from_secs(20), || async {
        let s = scrape(&api).await;
        let delivered = s.value("herald_deliveries_total", &[("outcome", "delivered")]);
        let dead = s.value("herald_deliveries_total", &[("outcome", "dead_lettered")]);
        let lag = s.value("herald_consumer_lag", &[]);
        (delivered == 5.0 && dead == 1.0 && lag == 0.0).then_some(s)
    })
    .await;
    let expect = |name: &str, labels: &[(&str, &str)], want: f64| {
        let got = s.value(name, labels);
        assert_eq!(got, want, "{name}{labels:?}");
    };
    expect("herald_events_ingested_total", &[], 6.0);
    // A: 3 successes; B: 2 failures then 2 successes; C: 2 failures, then dead-lettered.
    expect("herald_attempts_total", &[("transport", "webhook"), ("outcome", "success")], 5.0);
    expect("herald_attempts_total", &[("transport", "webhook"), ("outcome", "server_error")], 4.0);
    expect("herald_deliveries_total", &[("transport", "webhook"), ("outcome", "delivered")], 5.0);
    expect("herald_deliveries_total", &[("transport", "webhook"), ("outcome", "dead_lettered")], 1.0);
    expect("herald_dead_letters_total", &[], 1.0);
    // By why: a tenant's exhausted retries are not Herald's own dead letters (a bug, a record
    // it cannot read), and one tenant's failing endpoint kept the dead-letter ticket firing.
    expect("herald_dead_letters_total", &[("reason", "exhausted")], 1.0);
    expect("herald_dead_letters_total", &[("reason", "malformed")], 0.0);
    expect("herald_retries_scheduled_total", &[("tier", "retry.100ms")], 3.0);
    expect("herald_delivery_request_seconds", &[("transport", "webhook")], 9.0); // count of observations
    expect("herald_delivery_end_to_end_seconds", &[("transport", "webhook")], 5.0);
    expect("herald_subscriptions", &[], 3.0);
    expect("herald_subscriptions_disabled", &[], 0.0);
    expect("herald_circuit_breakers_open", &[], 0.0);
    expect("herald_in_flight", &[], 0.0);
    expect("herald_consumer_lag", &[("source", "deliveries")], 0.0);
    expect("herald_api_requests_total", &[("route", "/v1/events"), ("method", "POST"), ("status", "202")], 6.0);
    expect("herald_api_requests_total", &[("route", "/v1/subscriptions"), ("method", "POST"), ("status", "201")], 3.0);
    assert!(s.value("herald_log_append_seconds", &[("topic", "herald.deliveries")]) >= 1.0);
    // Every documented metric is exposed, and no label carries an id.
    let names = exposed_names(&s.text);
    for name in herald::metrics::ALL {
        // The edge round trip needs edge traffic; `edge.rs` checks it.
        if [herald::metrics::EDGE_IN_FLIGHT, herald::metrics::EDGE_RTT_SECONDS].contains(name) {
            continue;
        }
        assert!(names.contains(*name), "{name} is not exposed");
    }
    for sample in s.samples() {
        for (k, v) in sample.labels.iter() {
            assert!(!v.starts_with("sub_") && !v.starts_with("evt_"), "{} has an id in label {k}={v}", sample.metric);
        }
    }
    child.kill();
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_query_is_exposed() {
    let (mut child, api, _dir) = known_traffic().await;
    let text = until("the dead letter in the metrics", Duration::from_secs(20), || async {
        let s = scrape(&api).await;
        (s.value("herald_dead_letters_total", &[]) == 1.0).then_some(s.text)
    })
    .await;
    child.kill();
    let exposed = exposed_names(&text);

    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo().join("deploy/grafana/dashboards/herald.json")).unwrap()).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} queries nothing", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            queried.extend(herald_names(expr));
            // A stat shows one figure: with several processes a bare gauge showed one each.
            if panel["type"] == "stat" {
                let aggregated = ["sum", "max", "min", "count", "avg", "histogram_quantile"];
                assert!(aggregated.iter().any(|a| expr.starts_with(a)), "panel {}: {expr}", panel["title"]);
            }
        }
    }
    let titles: Vec<&str> =
        dashboard["panels"].as_array().unwrap().iter().map(|p| p["title"].as_str().unwrap()).collect();
    for wanted in [
        "Throughput",
        "Request latency",
        "End-to-end latency",
        "Delivery outcomes",
        "Retries",
        "Dead letters",
        "Consumer lag",
        "Circuit breakers",
    ] {
        assert!(titles.iter().any(|t| t.starts_with(wanted)), "no {wanted} panel in {titles:?}");
    }

    let rules: serde_norway::Value =
        serde_norway::from_slice(&std::fs::read(repo().join("deploy/prometheus/alerts.yml")).unwrap()).unwrap();
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            alerts.push(rule["alert"].as_str().unwrap().to_string());
            let expr = rule["expr"].as_str().unwrap();
            queried.extend(herald_names(expr));
            if rule["alert"] == "HeraldDeliveryErrorRatioHigh" {
                // Herald's own waits (an agent's window full, a tenant's broker connections at
                // their cap) are not failures to page for: one tenant's device paged.
                assert!(expr.contains(r#"outcome!~"success|edge_busy|broker_busy|tls_unready""#), "{expr}");
            }
            if rule["alert"] == "HeraldDeadLettersGrowing" {
                // Herald's own dead letters, not a tenant's receiver's doing.
                assert!(expr.contains(r#"reason=~"malformed|panicked|unschedulable""#), "{expr}");
            }
            if rule["alert"] == "HeraldLogBroken" || rule["alert"] == "HeraldDeliveryStopped" {
                // `/healthz` answers 503 for both, so a liveness probe restarts the process
                // (the gauge back at 0) within a minute, maybe: a `for` never completed.
                assert!(expr.contains("max_over_time(") && rule["for"].is_null(), "{rule:?}");
            }
            if rule["alert"] == "HeraldConsumerLagGrowing" {
                // A retry tier's lag is retries waiting for their time, as the console shows
                // it; the ordered topic's is held behind the oldest key being retried.
                assert_eq!(
                    expr.matches("herald_consumer_lag").count(),
                    expr.matches(r#"herald_consumer_lag{source!~"retry\\..*|ordered"}"#).count(),
                    "{expr}"
                );
            }
        }
    }
    for wanted in [
        "HeraldLogBroken",
        "HeraldConsumerLagGrowing",
        "HeraldDeadLettersGrowing",
        "HeraldDeadLetterRatioHigh",
        "HeraldDeliveryErrorRatioHigh",
        "HeraldCircuitBreakersOpen",
        "HeraldPartitionWorkerPanicked",
        "HeraldDeliveryStopped",
        "HeraldPartitionStalled",
        "HeraldHistoryRecordsDropped",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "no {wanted} alert");
    }
    // And the names the load tests look up (string literals) when they explain what went
    // missing.
    let scenario = std::fs::read_to_string(repo().join("load-tests/src/scenario.rs")).unwrap();
    for literal in scenario.split('"').skip(1).step_by(2) {
        queried.extend(herald_names(literal.trim()).into_iter().filter(|n| literal.trim().starts_with(n.as_str())));
    }
    assert!(queried.len() > 20);
    let missing: Vec<_> = queried.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
}

#[test]
fn docker_compose_mounts_exist_and_dependencies_are_defined() {
    let root = repo();
    let compose: serde_norway::Value =
        serde_norway::from_slice(&std::fs::read(root.join("docker-compose.yml")).unwrap()).unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<String> = services.keys().map(|k| k.as_str().unwrap().to_string()).collect();
    for wanted in ["herald", "sink", "kafka", "rabbitmq", "prometheus", "grafana"] {
        assert!(names.contains(wanted), "no {wanted} service");
    }
    let volumes: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    let mut mounts: HashMap<String, String> = HashMap::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        // `depends_on` is a list of names, or a map from name to condition.
        let deps: Vec<&serde_norway::Value> = match &svc["depends_on"] {
            serde_norway::Value::Sequence(list) => list.iter().collect(),
            serde_norway::Value::Mapping(map) => map.keys().collect(),
            _ => Vec::new(),
        };
        for dep in deps {
            assert!(names.contains(dep.as_str().unwrap()), "{name} depends on undefined {dep:?}");
        }
        if let Some(context) = svc["build"].as_str() {
            assert!(
                root.join(context).join("Dockerfile").exists(),
                "{name} builds from {context} without a Dockerfile"
            );
        }
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let spec = v.as_str().unwrap();
            let (host, container) = spec.split_once(':').unwrap();
            if host.starts_with("./") {
                assert!(root.join(host).exists(), "{name} mounts missing {host}");
                mounts.insert(container.trim_end_matches(":ro").to_string(), host.to_string());
            } else {
                assert!(volumes.contains(host), "{name} uses undeclared volume {host}");
            }
        }
    }
    // What is acknowledged survives the containers being made again: Kafka's log directory
    // and Herald's data directory are on named volumes.
    let on_volume = |svc: &str, dir: &str| {
        services[svc]["volumes"].as_sequence().into_iter().flatten().any(|v| {
            let (host, container) = v.as_str().unwrap().split_once(':').unwrap();
            volumes.contains(host) && dir.starts_with(container.trim_end_matches(":ro"))
        })
    };
    let kafka_logs = services["kafka"]["environment"]["KAFKA_LOG_DIRS"].as_str().expect("KAFKA_LOG_DIRS set");
    assert!(on_volume("kafka", kafka_logs), "Kafka's {kafka_logs} is not on a named volume");
    let config = herald::config::Config::load(Some(&root.join("deploy/herald/herald.toml")), &[]).unwrap();
    let data_dir = config.data_dir.to_str().unwrap();
    assert!(on_volume("herald", data_dir), "Herald's {data_dir} is not on a named volume");
    // Tenants' webhooks reach the sink and RabbitMQ at their fixed addresses, nothing else there.
    let fixed: BTreeSet<String> = services
        .values()
        .filter_map(|svc| svc["networks"]["default"]["ipv4_address"].as_str().map(|ip| format!("{ip}/32")))
        .collect();
    let allowed: BTreeSet<String> = config.network.allow.iter().map(|a| a.to_string()).collect();
    assert_eq!(allowed, fixed, "network.allow opens more than the sink and RabbitMQ");
    // Nothing without authentication published beyond loopback; the secret key required.
    for (name, svc) in services {
        for port in svc["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(name.as_str() == Some("herald") || port.starts_with("127.0.0.1:"), "{name:?} publishes {port}");
        }
    }
    assert!(services["herald"]["environment"]["HERALD_SECRET_KEY"].as_str().is_some_and(|v| v.contains(":?")));

    // Prometheus loads the rule file at the path it is mounted to.
    let prom: serde_norway::Value =
        serde_norway::from_slice(&std::fs::read(root.join("deploy/prometheus/prometheus.yml")).unwrap()).unwrap();
    for rule_file in prom["rule_files"].as_sequence().unwrap() {
        assert!(mounts.contains_key(rule_file.as_str().unwrap()), "rule file {rule_file:?} is not mounted");
    }
    // Grafana finds the dashboard where its provisioning says.
    let provider: serde_norway::Value = serde_norway::from_slice(
        &std::fs::read(root.join("deploy/grafana/provisioning/dashboards/herald.yml")).unwrap(),
    )
    .unwrap();
    let path = provider["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(
        mounts.get(path).is_some_and(|host| root.join(host).join("herald.json").exists()),
        "dashboard not mounted at {path}"
    );
    // The config Herald runs with in compose is one it accepts.
    let config = root.join("deploy/herald/herald.toml");
    let config = herald::config::Config::load(Some(&config), &[]).expect("compose's herald.toml loads");
    // ... and runs on the compose file's Kafka, which Herald waits for.
    assert_eq!(config.log.backend, herald::config::Backend::Kafka);
    let (host, _) = config.log.brokers.split_once(':').unwrap();
    assert!(names.contains(host), "herald's brokers {} are not a compose service", config.log.brokers);
    assert!(!services["kafka"]["healthcheck"].is_null(), "kafka has a healthcheck herald can wait on");
    assert_eq!(services["herald"]["depends_on"]["kafka"]["condition"].as_str(), Some("service_healthy"));
}

/// End to end is timed from the event's acceptance — or, for a resend (a recover, a
/// replay), from that request: a resent event counted its whole age (a recover of last
/// week's events a week each), so one tenant's resends pushed the fleet's end-to-end p99 to a
/// day. And the request histogram reaches the longest attempt timeout, 300 s: it stopped at
/// 30 s, so the p99 of attempts hanging for minutes read 30.
#[tokio::test]
async fn a_resend_is_timed_from_the_resend_and_request_times_reach_the_longest_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let (mut child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    api.subscribe(json!({ "url": rx.url("/r") })).await;
    let (status, body) = api.post("/v1/events", json!({ "id": "aged", "type": "A", "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    rx.wait_on("/r", 1).await;
    let delivered = std::time::Instant::now();
    until("the event is over 2 s old", Duration::from_secs(10), || async {
        (delivered.elapsed() >= Duration::from_secs(2)).then_some(())
    })
    .await;
    let (status, body) = api.post("/v1/events/aged/resend", json!({})).await;
    assert_eq!(status, 202, "{body}");
    rx.wait_on("/r", 2).await;
    let buckets = |s: &crate::support::metrics::Scrape, name: &str| -> Vec<(f64, f64)> {
        s.samples()
            .iter()
            .filter(|x| x.metric == name)
            .flat_map(|x| match &x.value {
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| (b.less_than, b.count)).collect(),
                _ => Vec::new(),
            })
            .collect()
    };
    let s = until("both deliveries timed", Duration::from_secs(10), || async {
        let s = scrape(&api).await;
        (s.value("herald_delivery_end_to_end_seconds", &[]) == 2.0).then_some(s)
    })
    .await;
    let within_a_second: f64 =
        buckets(&s, "herald_delivery_end_to_end_seconds").iter().filter(|(le, _)| *le == 1.0).map(|(_, n)| n).sum();
    assert_eq!(within_a_second, 2.0, "the resend timed from the resend");
    let longest = buckets(&s, "herald_delivery_request_seconds")
        .iter()
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
        .fold(0.0, f64::max);
    assert!(longest >= 300.0, "the request histogram ends at {longest} s");
    child.kill();
}

/// Every series a dashboard or alert takes a `rate()` of is there at zero from the start:
/// one that appears with its first increment loses that increment to `rate()` — an AMQP-only
/// deployment's first burst of failures went uncounted in the error ratio, and the edge
/// connection throttle's refusals (documented beside the others) were missing until one came.
#[tokio::test]
async fn every_series_a_rate_is_taken_of_is_there_at_zero_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_herald(dir.path());
    let s = scrape(&Api::new(addr, TOKEN)).await;
    let has = |name: &str, labels: &[(&str, &str)]| {
        s.samples().iter().any(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
    };
    for reason in ["key_rate", "tests", "edge_connects", "pending_bytes"] {
        assert!(has("herald_api_throttled_total", &[("reason", reason)]), "{reason}");
    }
    for transport in ["webhook", "amqp", "edge"] {
        for outcome in ["success", "server_error", "timeout", "connect_error", "tls_error", "edge_busy", "broker_busy"]
        {
            assert!(
                has("herald_attempts_total", &[("transport", transport), ("outcome", outcome)]),
                "{transport} {outcome}"
            );
        }
        assert!(
            has("herald_deliveries_total", &[("transport", transport), ("outcome", "dead_lettered")]),
            "{transport}"
        );
    }
    assert!(has("herald_retries_scheduled_total", &[("tier", "ordered")]));
    child.kill();
}
