//! OpenTelemetry, tested against a real OTLP/HTTP receiver (the protobuf messages of
//! `opentelemetry-proto`, served on loopback): a producer's trace id shows up on the ingest
//! span and on every attempt's span, a retry included, and each receiver request carries a
//! `traceparent` naming its attempt's span as the parent.

use crate::support::{serve_http1, spawn_herald_with, until, Api, Behaviour, Receiver, TestHerald, TOKEN};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP trace receiver: keeps every span exported to it.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        serve_http1(listener, move |req: http::Request<hyper::body::Incoming>| {
            let kept = kept.clone();
            async move {
                let path = req.uri().path().to_string();
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                if path == "/v1/traces" {
                    if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                        let mut kept = kept.lock().unwrap();
                        for r in export.resource_spans {
                            kept.extend(r.scope_spans.into_iter().flat_map(|s| s.spans));
                        }
                    }
                }
                http::Response::new(Full::new(Bytes::new()))
            }
        });
        Collector { url, spans }
    }

    fn named(&self, name: &str) -> Vec<Span> {
        self.spans.lock().unwrap().iter().filter(|s| s.name == name).cloned().collect()
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

#[tokio::test]
async fn a_producer_s_trace_reaches_every_attempt_span_and_the_receiver() {
    let collector = Collector::start().await;
    let rx = Receiver::start().await;
    rx.behave("/traced", Behaviour::FailFirst { n: 1, status: 503 });
    let dir = tempfile::tempdir().unwrap();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let (_herald, addr) = spawn_herald_with(dir.path(), &env);
    let api = Api::new(addr, TOKEN);
    let retry = json!({ "policy": "fixed", "interval": "200ms", "max_attempts": 3 });
    api.subscribe(json!({ "url": rx.url("/traced"), "retry": retry })).await;

    let traceparent = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
    let body = Bytes::from(json!({ "id": "traced-1", "type": "order.created", "data": {} }).to_string());
    let headers = [("traceparent", traceparent.as_str()), ("tracestate", "vendor=abc")];
    let (status, _, _) = api.request_with("POST", "/v1/events", Some(body), Some(TOKEN), &headers).await.unwrap();
    assert_eq!(status, 202);

    // The receiver: both attempts (the 503 and the retry) carry the producer's trace, each
    // with a parent of its own, and the tracestate.
    let got = rx.wait_on("/traced", 2).await;
    let parents: Vec<String> = got
        .iter()
        .map(|r| {
            let tp = r.header("traceparent");
            assert!(tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with("-01"), "{tp}");
            assert_eq!(r.header("tracestate"), "vendor=abc");
            tp[36..52].to_string()
        })
        .collect();
    assert_ne!(parents[0], parents[1], "each attempt is a span of its own");
    assert!(!parents.contains(&PRODUCER_SPAN.to_string()));

    // The collector: the ingest span and both attempt spans are in the producer's trace, the
    // attempts' ids are the parents the receiver was given, and they say what happened.
    let attempts = until("two attempt spans exported", Duration::from_secs(20), || {
        let spans: Vec<Span> = collector
            .named("herald.attempt")
            .into_iter()
            .filter(|s| attribute(s, "event.id").as_deref() == Some("traced-1"))
            .collect();
        async move { (spans.len() >= 2).then_some(spans) }
    })
    .await;
    for span in &attempts {
        assert_eq!(hex::encode(&span.trace_id), TRACE);
        assert_eq!(hex::encode(&span.parent_span_id), PRODUCER_SPAN);
    }
    let mut exported: Vec<String> = attempts.iter().map(|s| hex::encode(&s.span_id)).collect();
    let mut sent = parents.clone();
    exported.sort();
    sent.sort();
    assert_eq!(exported, sent, "the receiver's parent is the attempt's exported span");
    let mut outcomes: Vec<(String, String, String)> = attempts
        .iter()
        .map(|s| {
            let a = |k| attribute(s, k).unwrap_or_default();
            (a("attempt"), a("outcome"), a("http.response.status_code"))
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [("1".into(), "failed".into(), "503".into()), ("2".into(), "delivered".into(), "200".into())],
        "{attempts:?}"
    );
    let ingest = until("the ingest span exported", Duration::from_secs(20), || {
        let spans = collector.named("herald.ingest");
        async move { spans.into_iter().next() }
    })
    .await;
    assert_eq!(
        (hex::encode(&ingest.trace_id), hex::encode(&ingest.parent_span_id)),
        (TRACE.into(), PRODUCER_SPAN.into())
    );
    assert_eq!(attribute(&ingest, "event.id").as_deref(), Some("traced-1"));

    // Dead-lettering shows in the trace too, inside the attempt that gave up.
    rx.respond_on("/dead", 500);
    let once = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 1 });
    api.subscribe(json!({ "url": rx.url("/dead"), "events": ["doomed"], "retry": once })).await;
    let body = Bytes::from(json!({ "id": "traced-2", "type": "doomed", "data": {} }).to_string());
    let headers = [("traceparent", traceparent.as_str())];
    api.request_with("POST", "/v1/events", Some(body), Some(TOKEN), &headers).await.unwrap();
    let parked = until("the dead-letter span exported", Duration::from_secs(20), || {
        let spans = collector.named("herald.dead_letter");
        async move { spans.into_iter().next() }
    })
    .await;
    assert_eq!(hex::encode(&parked.trace_id), TRACE);
    assert_eq!(attribute(&parked, "reason").as_deref(), Some("exhausted"));
    let attempt = collector.named("herald.attempt").into_iter().find(|s| s.span_id == parked.parent_span_id);
    assert_eq!(attempt.and_then(|a| attribute(&a, "event.id")).as_deref(), Some("traced-2"));
}

#[tokio::test]
async fn trace_context_is_checked_carried_per_event_and_propagated_without_export() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(json!({ "url": rx.url("/t") })).await;
    // Bad contexts are refused, naming the field (in a batch, the event's).
    let (status, err) = h.api.post("/v1/events", json!({ "type": "t", "data": {}, "traceparent": "00-abc-01" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("traceparent")), "{err}");
    let bad = json!([{ "type": "t", "data": {} }, { "type": "t", "data": {}, "traceparent": format!("00-{TRACE}-{PRODUCER_SPAN}-01"), "tracestate": "\u{1}" }]);
    let (status, err) = h.api.post("/v1/events/batch", bad).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("[1].tracestate")), "{err}");

    // Each event of a batch keeps its own context; one without any sends none.
    let other = "0af7651916cd43dd8448eb211c80319c";
    let batch = json!([
        { "id": "b-1", "type": "t", "data": {}, "traceparent": format!("00-{TRACE}-{PRODUCER_SPAN}-01") },
        { "id": "b-2", "type": "t", "data": {}, "traceparent": format!("00-{other}-b7ad6b7169203331-00") },
        { "id": "b-3", "type": "t", "data": {} },
    ]);
    assert_eq!(h.api.post("/v1/events/batch", batch).await.0, 202);
    let got = rx.wait_on("/t", 3).await;
    let by_id = |id: &str| got.iter().find(|r| r.header("webhook-id") == id).unwrap();
    assert!(by_id("b-1").header("traceparent").starts_with(&format!("00-{TRACE}-")));
    assert!(by_id("b-2").header("traceparent").starts_with(&format!("00-{other}-")));
    assert!(by_id("b-2").header("traceparent").ends_with("-00"), "the sampled flag travels as given");
    assert_eq!(by_id("b-3").header("traceparent"), "", "no context, no header");

    // The trace-context headers are Herald's: a subscription cannot set its own.
    let (status, err) =
        h.api.post("/v1/subscriptions", json!({ "url": rx.url("/x"), "headers": { "traceparent": "00-x" } })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("headers.traceparent")), "{err}");

    // A malformed header is ignored, as the spec says of headers: the event is accepted untraced.
    let body = Bytes::from(json!({ "id": "h-1", "type": "t", "data": {} }).to_string());
    let headers = [("traceparent", "00-nonsense-01")];
    let (status, _, _) = h.api.request_with("POST", "/v1/events", Some(body), Some(TOKEN), &headers).await.unwrap();
    assert_eq!(status, 202);
    let got = rx.wait_on("/t", 4).await;
    assert_eq!(got.iter().find(|r| r.header("webhook-id") == "h-1").unwrap().header("traceparent"), "");
}

/// A collector that refuses every export: Herald says so in its log (once, not per batch) and
/// counts the spans it could not export, so an operator can tell "no traces" from "no events".
#[tokio::test]
async fn spans_a_collector_refuses_are_counted_and_logged() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    serve_http1(listener, |_req: http::Request<hyper::body::Incoming>| async {
        let mut refused = http::Response::new(Full::new(Bytes::from_static(b"collector down")));
        *refused.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        refused
    });
    let dir = tempfile::tempdir().unwrap();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let (_herald, addr, log) = crate::support::spawn_herald_logged(dir.path(), &env);
    let api = Api::new(addr, TOKEN);
    let rx = Receiver::start().await;
    api.subscribe(json!({ "url": rx.url("/t") })).await;
    for i in 0..3 {
        let event = json!({ "id": format!("lost-{i}"), "type": "t", "data": {} });
        assert_eq!(api.post("/v1/events", event).await.0, 202);
    }
    rx.wait_on("/t", 3).await;
    let lost = until("the refused spans counted", Duration::from_secs(20), || {
        let api = api.clone();
        async move {
            let n = crate::support::metrics::scrape(&api).await.value("herald_trace_spans_unexported_total", &[]);
            (n >= 6.0).then_some(n)
        }
    })
    .await;
    assert!(lost >= 6.0, "three ingest and three attempt spans: {lost}");
    // More events after that batch was refused: another batch, refused too, and not said again.
    let event = json!({ "id": "lost-later", "type": "t", "data": {} });
    assert_eq!(api.post("/v1/events", event).await.0, 202);
    rx.wait_on("/t", 4).await;
    until("the later batch's spans counted", Duration::from_secs(20), || {
        let api = api.clone();
        async move {
            let n = crate::support::metrics::scrape(&api).await.value("herald_trace_spans_unexported_total", &[]);
            (n >= lost + 2.0).then_some(())
        }
    })
    .await;
    let told = log.lock().unwrap().lines().filter(|l| l.contains("spans could not be exported")).count();
    assert_eq!(told, 1, "said once, not per batch: {}", log.lock().unwrap());
}
