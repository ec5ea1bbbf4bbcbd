//! OpenTelemetry traces: a span per accepted event (`herald.ingest`), per attempt
//! (`herald.attempt`) and per dead-lettering (`herald.dead_letter`), each a child of the
//! producer's span when the event carried a `traceparent`, exported over OTLP/HTTP
//! (`tracing-opentelemetry` + `opentelemetry-otlp`). Off by default, and then free: no span is
//! made. Receivers of a traced event get a `traceparent` of the producer's trace either way
//! (unless `tracing.propagate` is off; see [`headers`]), so their own spans join it.

use crate::config::TracingConfig;
use crate::model::TraceContext;
use http::HeaderValue;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `tracing` target of Herald's spans: the only ones exported, and not log lines.
pub const TARGET: &str = "herald::otel";

static EXPORTING: AtomicBool = AtomicBool::new(false);
static PROPAGATE: AtomicBool = AtomicBool::new(true);

/// Why spans cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a bad endpoint, say).
    #[error("tracing: the OTLP exporter: {0}")]
    Exporter(String),
}

/// The layer that exports Herald's spans.
pub type SpanLayer<S> = Box<dyn Layer<S> + Send + Sync>;

/// The exporter's handle: [`Telemetry::shutdown`] exports what is still buffered (dropping it
/// does not).
pub struct Telemetry(SdkTracerProvider);

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("herald: flushing traces: {e}");
        }
    }
}

/// Applies `config` (whether receivers get a `traceparent`), and when spans are to be exported
/// builds the layer that exports them, filtered to Herald's own spans. Needs a Tokio runtime.
pub fn start<S>(
    config: &TracingConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<(SpanLayer<S>, Telemetry)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    use opentelemetry_otlp::WithExportConfig;
    configure(config);
    if !config.exporting(&env) {
        return Ok(None);
    }
    // This build's exporter speaks plain HTTP (hyper without TLS): given an https endpoint it
    // started cleanly and exported nothing, its errors unheard.
    let endpoint = config
        .otlp_endpoint
        .clone()
        .filter(|e| !e.is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").filter(|e| !e.is_empty()))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty()));
    if endpoint.is_some_and(|e| e.trim_start().to_ascii_lowercase().starts_with("https:")) {
        return Err(TelemetryError::Exporter(
            "https endpoints are not supported: spans go over plain HTTP (send them to a collector beside Herald, http://…:4318)".into(),
        ));
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = &config.otlp_endpoint {
        // Given like OTEL_EXPORTER_OTLP_ENDPOINT: the base URL, to which the signal's path is added.
        let base = base.trim_end_matches('/');
        let url = if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") };
        exporter = exporter.with_endpoint(url);
    }
    let exporter = exporter.build().map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        Told::new(exporter),
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let service = env("OTEL_SERVICE_NAME").filter(|s| !s.is_empty()).unwrap_or_else(|| config.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    let tracer = provider.tracer("herald");
    let only_ours = tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO);
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_ours).boxed();
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some((layer, Telemetry(provider))))
}

/// An exporter whose failures an operator hears of: the SDK drops a batch it could not
/// export without a word (its own logs are a build feature, and would say so once a batch —
/// dozens of lines a second under load). Each lost span is counted
/// ([`SPANS_UNEXPORTED`]) and the failure logged at most once a minute,
/// with how many were lost since it was last said.
#[derive(Debug)]
struct Told<E> {
    exporter: E,
    /// When a failure was last logged, and the spans lost since.
    said: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// Spans the OTLP collector did not take (refused, unreachable): dropped. Named here, where
/// they are counted (`metrics` lists it with the rest, reading it from here).
pub const SPANS_UNEXPORTED: &str = "herald_trace_spans_unexported_total";

/// How often a failing exporter is said to fail.
const TELL_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl<E> Told<E> {
    fn new(exporter: E) -> Self {
        Told { exporter, said: std::sync::Mutex::new((None, 0)) }
    }

    fn lost(&self, spans: usize, error: &dyn std::fmt::Display) {
        metrics::counter!(SPANS_UNEXPORTED).increment(spans as u64);
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        said.1 += spans as u64;
        if said.0.is_none_or(|at| at.elapsed() >= TELL_EVERY) {
            tracing::warn!(lost = said.1, error = %error, "spans could not be exported to the OTLP collector; dropped (said at most once a minute)");
            *said = (Some(std::time::Instant::now()), 0);
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter for Told<E> {
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.exporter.export(batch).await;
        if let Err(e) = &result {
            self.lost(spans, e);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.exporter.set_resource(resource)
    }
}

/// Applies what does not need an exporter: whether receivers get a `traceparent`. The server
/// calls this at start, so it holds for embedded servers too.
pub fn configure(config: &TracingConfig) {
    PROPAGATE.store(config.propagate, Ordering::Relaxed);
}

/// Whether spans are being exported (else none is made).
fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The producer's span as the remote parent of ours.
fn parent(trace: &TraceContext) -> opentelemetry::Context {
    let state = trace.state.parse::<TraceState>().unwrap_or_default();
    let remote = SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(trace.parent_id),
        TraceFlags::new(trace.flags),
        true,
        state,
    );
    opentelemetry::Context::new().with_remote_span_context(remote)
}

/// `span`, a child of the producer's span when there is one.
fn child_of(span: tracing::Span, trace: Option<&TraceContext>) -> tracing::Span {
    if let Some(trace) = trace {
        let _ = span.set_parent(parent(trace));
    }
    span
}

/// The span of accepting one event (none when not exporting).
pub fn ingest_span(event_id: &str, event_type: &str, tenant: &str, trace: Option<&TraceContext>) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "herald.ingest", otel.kind = "server", event.id = event_id, event.type = event_type, tenant = tenant);
    child_of(span, trace)
}

/// The span of one attempt; its outcome is added by [`attempted`].
pub fn attempt_span(
    event_id: &str,
    subscription: &str,
    transport: &str,
    attempt: u32,
    trace: Option<&TraceContext>,
) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "herald.attempt",
        otel.kind = "client",
        event.id = event_id,
        subscription = subscription,
        transport = transport,
        attempt = attempt,
        outcome = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    child_of(span, trace)
}

/// Adds an attempt's outcome to its span.
pub fn attempted(span: &tracing::Span, outcome: &str, status: Option<u16>, ok: bool) {
    span.record("outcome", outcome);
    if let Some(status) = status {
        span.record("http.response.status_code", status);
    }
    span.record("otel.status_code", if ok { "OK" } else { "ERROR" });
}

/// A span marking that the delivery went to the dead-letter topic, inside the attempt's.
pub fn dead_lettered(span: &tracing::Span, reason: &str) {
    if exporting() {
        let _ = tracing::info_span!(target: TARGET, parent: span, "herald.dead_letter", reason = reason).entered();
    }
}

/// The `traceparent` (and `tracestate`) a receiver gets for an attempt of a delivery that
/// carries `trace`. When spans are exported, its parent is the attempt's span — the current
/// span, since transports sign inside it — with the sampling decision made for that span;
/// otherwise a fresh span id no exported span has, which still puts the receiver's spans in the
/// producer's trace. (Edge agents sign in their own process and send none.)
pub fn headers(trace: Option<&TraceContext>) -> Option<(HeaderValue, Option<HeaderValue>)> {
    let trace = trace.filter(|_| PROPAGATE.load(Ordering::Relaxed))?;
    let current = if exporting() {
        tracing::Span::current().context().span().span_context().clone()
    } else {
        SpanContext::empty_context()
    };
    let (span_id, flags) = if current.is_valid() && current.trace_id().to_bytes() == trace.trace_id {
        (current.span_id().to_bytes(), current.trace_flags().to_u8())
    } else {
        (rand::random::<[u8; 8]>(), trace.flags)
    };
    let parent = HeaderValue::from_str(&trace.child(span_id, flags)).ok()?;
    let state = (!trace.state.is_empty()).then(|| HeaderValue::from_str(&trace.state).ok()).flatten();
    Some((parent, state))
}

/// The events `f` logs on this thread that `filter` lets through: their levels, targets and
/// text (message and fields), for tests of what is logged.
#[cfg(test)]
pub(crate) fn logged(filter: &str, f: impl FnOnce()) -> Vec<(tracing::Level, String, String)> {
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(tracing::Level, String, String)>>>);
    struct Text(String);
    impl tracing::field::Visit for Text {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    impl<S: tracing::Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let m = event.metadata();
            let mut text = Text(String::new());
            event.record(&mut text);
            self.0.lock().unwrap().push((*m.level(), m.target().to_string(), text.0));
        }
    }
    let seen = Seen::default();
    let subscriber =
        tracing_subscriber::registry().with(seen.clone().with_filter(tracing_subscriber::EnvFilter::new(filter)));
    tracing::subscriber::with_default(subscriber, f);
    let seen = seen.0.lock().unwrap().clone();
    seen
}

/// The log lines' filter for `level` (`RUST_LOG`, else `logging.level`), with the libraries
/// that log what a tenant's receiver or broker sends, at the rate it sends it, kept quiet
/// unless the level names them.
pub fn log_filter(level: &str) -> String {
    // h2 warns of each PING acknowledgement a receiver sends unasked, and rustls of each TLS
    // warning alert: only their errors are logged. lapin logs each message a broker returns
    // at `warn`, payload and headers whole (a tenant's unroutable subscription would copy its
    // events into this log), and each channel a broker closes at `error` (a publish to an
    // exchange the broker does not have closes one: a line per attempt, at the tenant's
    // delivery rate): none of it is logged — Herald records each of those attempts itself,
    // with the broker's reason.
    const QUIET: [(&str, &str); 3] = [("h2", "error"), ("rustls", "error"), ("lapin", "off")];
    // A directive's target names the library, or one of its modules (`tokio_rustls` does not).
    let names = |lib: &str| {
        level.split(',').any(|directive| {
            let target = directive.split(['=', '[']).next().unwrap_or("").trim();
            target == lib || target.starts_with(&format!("{lib}::"))
        })
    };
    let mut filter = level.to_string();
    for (lib, level) in QUIET.iter().filter(|(lib, _)| !names(lib)) {
        filter.push_str(&format!(",{lib}={level}"));
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a tenant's receiver or broker can make a library log, once per frame or message,
    /// is not logged: a receiver speaking HTTP/2 sent PING acknowledgements nobody asked for,
    /// each a warning from h2 (600,000 lines a second from 10 MB/s), and one sending TLS
    /// warning alerts had rustls warn once per connection. Herald's own lines still are.
    #[test]
    fn libraries_logging_what_a_tenant_sends_are_kept_quiet() {
        let seen = logged(&log_filter("info"), || {
            tracing::warn!(target: "h2::proto::ping_pong", "recv PING ack that we never sent");
            tracing::warn!(target: "rustls::common_state", "TLS alert warning received");
            tracing::warn!(target: "lapin::channel", "a returned message");
            // Each channel a tenant's broker closes (a publish to an exchange it does not
            // have closes one): an error line per attempt, at the tenant's delivery rate.
            tracing::error!(target: "lapin::channel", "channel closed");
            tracing::error!(target: "h2::proto", "an h2 error");
            tracing::warn!(target: "herald::dispatch", "Herald's own");
        });
        let seen: Vec<&str> = seen.iter().map(|(_, target, _)| target.as_str()).collect();
        assert_eq!(seen, ["h2::proto", "herald::dispatch"]);
        assert_eq!(log_filter("info,h2=debug"), "info,h2=debug,rustls=error,lapin=off", "a level naming one keeps it");
        assert_eq!(log_filter("lapin::channel=warn"), "lapin::channel=warn,h2=error,rustls=error");
        assert_eq!(log_filter("info,tokio_rustls=debug"), "info,tokio_rustls=debug,h2=error,rustls=error,lapin=off");
    }

    /// An https collector (most hosted ones) was taken, and not one span reached it: this
    /// build's exporter has no TLS, and its errors were not logged. Refused at start instead.
    #[test]
    fn an_https_endpoint_is_refused_at_start() {
        type Registry = tracing_subscriber::Registry;
        let config =
            TracingConfig { otlp_endpoint: Some("https://collector.example.com".into()), ..Default::default() };
        let refused = start::<Registry>(&config, |_| None).err().expect("refused").to_string();
        assert!(refused.contains("https"), "{refused}");
        let from_env = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "HTTPS://collector:4318".to_string());
        assert!(start::<Registry>(&TracingConfig::default(), from_env).is_err());
    }
}
