//! Configuration: built-in defaults, then a TOML file, then `HERALD_*` environment
//! variables, then command-line flags; validated once at start-up.

mod automation;
mod duration;

pub use automation::AutomationWebHook;
pub use duration::{DurationError, HumanDuration};

use figment::providers::{Format, Json, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `herald serve` can be told. `Debug` shows every setting but secrets
/// ([`redacted`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Where the embedded log and local state live.
    pub data_dir: PathBuf,
    /// The URL other Herald processes reach this one at (to forward edge deliveries to the
    /// agents connected here); `http://<listen address>` by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,
    /// Admin bearer token; generated and stored in the data dir when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// The key secrets are sealed with in the catalog (32 bytes, base64; `HERALD_SECRET_KEY`).
    /// Without one they are stored as text, and Herald says so at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
    /// A file holding `secret_key` instead (its first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_file: Option<PathBuf>,
    /// Keys secrets were sealed with before a rotation: they still open them, and Herald
    /// rewrites every subscription sealed with one at start.
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "list_or_csv")]
    pub previous_secret_keys: Vec<String>,
    /// The key some subscriptions' secrets were sealed with is lost for good: delete them at
    /// start (their tenants create them again). Without it a start with such subscriptions is
    /// refused: they would be left out, their events accepted and never delivered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret_key_lost: bool,
    /// The log backend and topics.
    pub log: LogConfig,
    /// Which private networks webhook targets may be in.
    pub network: NetworkConfig,
    /// What events may be.
    pub ingest: IngestConfig,
    /// Limits of the API's edge: connections, timeouts, request rates.
    pub api: ApiConfig,
    /// What one tenant may use.
    pub quotas: QuotaConfig,
    /// Delivery history.
    pub history: HistoryConfig,
    /// Dispatcher tuning.
    pub dispatch: DispatchConfig,
    /// HTTP transport defaults.
    pub http: HttpConfig,
    /// Endpoint health: circuit breaker and auto-disable.
    pub health: HealthConfig,
    /// Signing secrets.
    pub signing: SigningConfig,
    /// Edge relay between processes.
    pub edge: EdgeConfig,
    /// Webhooks declared in the file rather than through the API.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<StaticWebhook>,
    /// The Automation API's own `webHook` section, as its guide writes it.
    #[serde(rename = "webHook", skip_serializing_if = "Option::is_none")]
    pub web_hook: Option<AutomationWebHook>,
    /// Log output.
    pub logging: LoggingConfig,
    /// OpenTelemetry traces.
    pub tracing: TracingConfig,
}

/// Which log backend and how topics are named and sized.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `embedded` (default) or `kafka`.
    pub backend: Backend,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Partitions of the deliveries, retry and dead-letter topics.
    pub partitions: u32,
    /// Embedded log: seal a segment past this size.
    pub segment_bytes: u64,
    /// Embedded log: how often consumer offsets are persisted (and consumed or expired
    /// segments reclaimed).
    pub flush_interval: HumanDuration,
    /// How long dead letters are kept (both backends); replay them before.
    pub dlq_retention: HumanDuration,
    /// Kafka: the most a delivery or retry record is kept unconsumed (`retention.ms` of those
    /// topics). Herald consumes them continuously; this bounds a long outage of every process.
    pub retention: HumanDuration,
    /// Kafka: `min.insync.replicas` of the topics Herald creates, so `acks=all` means this many
    /// copies (applied when `replication` is at least 2; at most `replication`).
    pub min_insync_replicas: u32,
    /// Kafka: bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Kafka: replication factor of the topics Herald creates (-1: the broker's default).
    pub replication: i32,
    /// Kafka: librdkafka settings passed through to every client, such as
    /// `security.protocol` or `sasl.password`; nested tables join their keys with dots.
    #[serde(skip_serializing_if = "KafkaProperties::is_empty")]
    pub kafka: KafkaProperties,
}

/// librdkafka settings by name. Values are never shown by `Debug` (they may be passwords).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub std::collections::BTreeMap<String, String>);

impl KafkaProperties {
    /// Whether no setting is given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One `http.no_proxy` entry: NO_PROXY's forms, as curl reads them. Read once, here, for the
/// start's check and for the proxy that goes by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoProxy {
    /// `*`: every host.
    Every,
    /// An address range (`10.0.0.0/8`): a URL naming an address in it.
    Range(IpNet),
    /// A name and every name under it; `.domain` and `*.domain` the same (lower case, the
    /// leading `.` or `*.` taken off).
    Under(String),
}

impl NoProxy {
    /// The entry's form, or `None` for an empty entry (left out) or none of NO_PROXY's forms
    /// (a `*` but as all of it or before a domain, a `/` but in a range).
    pub fn parse(entry: &str) -> Option<NoProxy> {
        let entry = entry.trim().to_ascii_lowercase();
        if entry.is_empty() {
            return None;
        }
        if entry == "*" {
            return Some(NoProxy::Every);
        }
        if let Ok(net) = entry.parse::<IpNet>() {
            return Some(NoProxy::Range(net));
        }
        let name = entry.strip_prefix("*.").or_else(|| entry.strip_prefix('.')).unwrap_or(&entry);
        (!name.contains(['*', '/'])).then(|| NoProxy::Under(name.to_string()))
    }

    /// Whether `host` (lower case, unbracketed; `address` if it is one) is reached directly.
    pub fn matches(&self, host: &str, address: Option<std::net::IpAddr>) -> bool {
        match self {
            NoProxy::Every => true,
            NoProxy::Range(net) => address.is_some_and(|a| net.contains(&a)),
            NoProxy::Under(name) => {
                host.strip_suffix(name.as_str()).is_some_and(|head| head.is_empty() || head.ends_with('.'))
            }
        }
    }
}

/// The range of an attempt's timeout, the default's (`http.timeout`, and the connect timeout
/// within it) and a subscription's own (`timeout`, see `model::range`).
pub const ATTEMPT_TIMEOUT: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(300));

/// `HERALD_*` variables of the CLI and the edge agent (`herald --server`, `--token`, `herald
/// edge --token`), and of the test suite (`./scripts/test`), which `herald serve` leaves alone.
const CLIENT_VARIABLES: [&str; 9] = [
    "SERVER",
    "TOKEN",
    "EDGE_TOKEN",
    "EDGE_TLS_FILES_DIR",
    "TANSU",
    "CHROMIUM",
    "TEST_BACKEND",
    "PROPTEST_SEED",
    "URL",
];

/// Whether `name` (past `HERALD_`) with `value` is one of the variables Kubernetes sets in
/// every pod for a Service of its namespace, for one called `herald` or `herald-…`
/// (`{S}_SERVICE_HOST`, `{S}_SERVICE_PORT[_{NAME}]`, `{S}_PORT=tcp://…`,
/// `{S}_PORT_{N}_{TCP|UDP|SCTP}[_PROTO|_PORT|_ADDR]`): read as settings, they were refused as
/// unknown and the pod never started. No setting's name has those shapes, and a misspelt one
/// (`HERALD_LISTEN_PORT=9000`) still does not pass for them.
fn kubernetes_service_variable(name: &str, value: &str) -> bool {
    let parts: Vec<&str> = name.split('_').collect();
    let service = parts.windows(2).any(|w| w[0] == "SERVICE" && matches!(w[1], "HOST" | "PORT"));
    let link = parts.last() == Some(&"PORT") && ["tcp://", "udp://", "sctp://"].iter().any(|p| value.starts_with(p));
    let port = parts.windows(3).any(|w| {
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "TCP" | "UDP" | "SCTP")
    });
    service || link || port
}

/// What is wrong with an admin token, if anything: too short to be hard to guess, or a
/// character no HTTP header carries as it is (past ASCII, a control character) — taken,
/// every request with it was refused `401` and the admin locked out. Spaces and tabs inside
/// are carried (and worked before this check: not refused, so no deployment is locked out).
pub fn admin_token_problem(token: &str) -> Option<&'static str> {
    if token.len() < 16 {
        return Some("must be at least 16 characters");
    }
    if !token.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        return Some("must be printable ASCII characters only, as an HTTP header carries them");
    }
    None
}

impl Config {
    /// Bytes of delivery records one tenant's publishes may have being written at once.
    pub fn tenant_pending_bytes(&self) -> u64 {
        self.quotas.pending_bytes.unwrap_or(self.quotas.fanout_bytes)
    }

    /// Bytes of delivery records all publishes together may have being written at once.
    pub fn pending_bytes(&self) -> u64 {
        self.ingest.pending_bytes.unwrap_or((1 << 30).max(self.tenant_pending_bytes()))
    }

    /// Bytes of a secret key (XChaCha20-Poly1305's), written in base64.
    pub const SECRET_KEY_BYTES: usize = 32;

    /// The key `text` writes in base64 (surrounding whitespace ignored), if it is one: what
    /// the settings are checked against and what seals secrets, decided here alone.
    pub fn secret_key_bytes(text: &str) -> Option<Vec<u8>> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).ok()?;
        (bytes.len() == Self::SECRET_KEY_BYTES).then_some(bytes)
    }

    /// The key secrets are sealed with: `secret_key`, else the first line of
    /// `secret_key_file`.
    pub fn sealing_key(&self) -> Result<Option<String>, ConfigError> {
        if let Some(k) = &self.secret_key {
            return Ok(Some(k.clone()));
        }
        let Some(path) = &self.secret_key_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Rejected {
            field: "secret_key_file",
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        // A file that holds no key (a secret mount that came up empty) is not "no key": that
        // would store new secrets as text and leave the sealed ones unreadable.
        match text.lines().next().map(str::trim).filter(|k| !k.is_empty()) {
            Some(key) => Ok(Some(key.to_string())),
            None => Err(ConfigError::Rejected {
                field: "secret_key_file",
                message: format!("{} holds no key", path.display()),
            }),
        }
    }
}

/// Whether a setting named `name` holds a secret: its value is never shown by `Debug`.
fn secret_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["secret", "password", "token", "sasl.", "ssl.key"].iter().any(|s| name.contains(s)) || name == "key"
}

/// Writes `value` as `name { … }`, every secret setting in it (at any depth) shown as
/// `********` — only whether it is set. A derived `Debug` printed the admin token, the secret
/// keys and static webhooks' secrets in any `{:?}` of the settings (a test's failure message,
/// a log line added later).
pub fn redacted(name: &str, value: &impl Serialize, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    fn hide(v: &mut serde_json::Value) {
        match v {
            // A URL's credentials (a proxy's `http://user:password@proxy:3128`, or a token
            // given as the user, an AMQP URI's).
            serde_json::Value::String(text) => {
                if let Ok(mut url) = url::Url::parse(text) {
                    if !url.username().is_empty() || url.password().is_some() {
                        let user = if url.username().is_empty() { "" } else { "********" };
                        if url.set_username(user).is_ok() && url.set_password(Some("********")).is_ok() {
                            *text = url.to_string();
                        }
                    }
                }
            }
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if secret_setting(k) && !v.is_null() {
                        *v = serde_json::Value::from("********");
                    } else {
                        hide(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(hide),
            _ => {}
        }
    }
    // A value JSON cannot hold (a path that is not UTF-8) is said, not an error: `format!`
    // panics on one.
    let Ok(mut shown) = serde_json::to_value(value) else { return write!(f, "{name} {{ (not shown) }}") };
    hide(&mut shown);
    write!(f, "{name} {shown}")
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        redacted("Config", self, f)
    }
}

impl std::fmt::Debug for StaticWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        redacted("StaticWebhook", self, f)
    }
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn flatten(prefix: &str, v: serde_json::Value, out: &mut std::collections::BTreeMap<String, String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                        flatten(&key, v, out);
                    }
                }
                serde_json::Value::String(s) => {
                    out.insert(prefix.to_string(), s);
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        flatten("", serde_json::Value::deserialize(d)?, &mut out);
        Ok(KafkaProperties(out))
    }
}

/// The least `log.retention`: twice the longest retry tier (`retry::tiers::TIERS`, whose test
/// holds it to that), since a retry waits unread in its tier until it is due.
pub const MIN_LOG_RETENTION: Duration = Duration::from_secs(8 * 3600);

/// The log backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Segment files in the data directory.
    Embedded,
    /// A Kafka cluster.
    Kafka,
}

/// Network guard for webhook targets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Private, loopback or link-local ranges that targets may nevertheless be in.
    #[serde(deserialize_with = "nets_from_list_or_csv")]
    pub allow: Vec<IpNet>,
    /// Ranges targets may never be in, whatever `allow` says: the operator's own public
    /// addresses the refused ranges do not cover (a dual-stack host's global IPv6 addresses,
    /// a VPC's, the Kafka brokers').
    #[serde(deserialize_with = "nets_from_list_or_csv")]
    pub deny: Vec<IpNet>,
}

/// Limits of the API's edge, so no client can exhaust it: slow clients are cut off, connections
/// are capped, and each tenant key gets a request rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Connections open at once at most; more are closed at once.
    pub max_connections: usize,
    /// A client must send its request headers within this.
    pub header_read_timeout: HumanDuration,
    /// A request (body included) must be answered within this, or gets `408`.
    pub request_timeout: HumanDuration,
    /// Requests per second one tenant key may make (twice as many in a burst); `429` with
    /// `Retry-After` beyond. The admin token is not limited.
    pub key_rate_limit: f64,
    /// The URL people reach this deployment at (`https://herald.example.com`), which portal
    /// links start with; unset, a link starts with the `Host` the admin's request came to.
    pub public_url: Option<String>,
    /// How long a tenant portal link works unless the request says otherwise.
    pub portal_ttl: HumanDuration,
    /// Requests of one tenant (its keys' and portal links' together) under way at once,
    /// bodies included; `429` at once past it. A console page makes a few at a time; raise it
    /// for a tenant's automation that keeps many requests open.
    pub tenant_requests: usize,
}

impl ApiConfig {
    /// How long a tenant portal link may work: `portal_ttl` and a mint's `ttl`.
    pub const PORTAL_TTL: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(7 * 86_400));
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10).into(),
            request_timeout: Duration::from_secs(60).into(),
            key_rate_limit: 100.0,
            public_url: None,
            portal_ttl: Duration::from_secs(3600).into(),
            tenant_requests: 16,
        }
    }
}

/// What one tenant may use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Subscriptions one tenant may have.
    pub subscriptions_per_tenant: usize,
    /// Bytes one publish request may fan out to: each event's delivery record (its data,
    /// changes, ids and trace) times the subscriptions it matches, summed.
    pub fanout_bytes: u64,
    /// Bytes of delivery records one tenant's publishes may have being written at once (a
    /// write outlives a request the API cut off); past it a publish waits, then gets `429`.
    /// Unset: `fanout_bytes`, so one request of the largest fan-out passes.
    pub pending_bytes: Option<u64>,
    /// `POST /v1/subscriptions/{id}/test` calls per subscription per minute.
    pub tests_per_minute: u32,
    /// Edge devices one tenant may have (each a catalog record every process holds).
    pub edge_devices_per_tenant: usize,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            subscriptions_per_tenant: 1000,
            fanout_bytes: 256 << 20,
            pending_bytes: None,
            tests_per_minute: 12,
            edge_devices_per_tenant: 100,
        }
    }
}

/// What events may be.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// The largest event, `data` and `changes` together, in bytes: larger ones are refused
    /// with `413`. Every record Herald writes stays below this plus
    /// [`IngestConfig::RECORD_OVERHEAD`], which both backends are set to take.
    pub max_event_bytes: usize,
    /// Check every event whose type has a schema in the event-type catalogue against it (off:
    /// only types that ask for it with their own `validate`).
    pub validate: bool,
    /// What happens to a subscription naming an event type the catalogue does not hold.
    pub unknown_types: UnknownTypes,
    /// Bytes of delivery records every tenant's publishes together may have being written
    /// at once; past it a publish waits, then gets `503`. Unset: 1 GiB, or a tenant's
    /// `quotas.pending_bytes` if that is more.
    pub pending_bytes: Option<u64>,
}

/// What a subscription naming an event type missing from the catalogue gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTypes {
    /// Created or changed, with a `warnings` entry in the answer (the catalogue is optional).
    #[default]
    Warn,
    /// Refused with `400` naming the `events` entry.
    Reject,
}

impl DispatchConfig {
    /// `tenant_in_flight_bytes` as used: at least twice the largest record `ingest` lets in.
    /// Below one, a tenant's large events went only while it had nothing else in flight
    /// anywhere in the process; raised, not refused, so that a larger `ingest.max_event_bytes`
    /// never stops a start whose settings named no bound (the default is 64 MiB).
    pub fn tenant_in_flight_bytes(&self, ingest: &IngestConfig) -> usize {
        self.tenant_in_flight_bytes.max(2 * ingest.max_record_bytes())
    }
}

impl IngestConfig {
    /// Room a record needs beyond its event: delivery metadata, a dead letter's fields.
    pub const RECORD_OVERHEAD: usize = 64 * 1024;

    /// The largest record Herald writes.
    pub fn max_record_bytes(&self) -> usize {
        self.max_event_bytes + Self::RECORD_OVERHEAD
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_event_bytes: 1 << 20,
            validate: false,
            unknown_types: UnknownTypes::Warn,
            pending_bytes: None,
        }
    }
}

/// Dispatcher tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Deliveries started within the last second and in flight, per partition, at most (and
    /// twice this in flight in all: `dispatch::window`).
    pub window: usize,
    /// Offsets per partition held back from the commit point at most; finished deliveries
    /// behind a slow one wait here (a crash re-delivers them).
    pub max_uncommitted: usize,
    /// Records read from the log at a time.
    pub batch: usize,
    /// Keys with something outstanding per partition of the ordered topic at most: past it
    /// a partition reads on only as its keys settle, so memory is bounded however many
    /// distinct keys a tenant fails on.
    pub ordered_max_keys: usize,
    /// Bytes of one tenant's records in flight in the process at most (beside its first):
    /// see `dispatch::window::InFlightBytes`.
    pub tenant_in_flight_bytes: usize,
}

/// `dispatch.tenant_in_flight_bytes` by default: 64 MiB.
pub const DEFAULT_TENANT_IN_FLIGHT_BYTES: usize = 64 << 20;

/// HTTP transport defaults, used where a subscription does not say otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Whole-request timeout.
    pub timeout: HumanDuration,
    /// TCP and TLS connect timeout.
    pub connect_timeout: HumanDuration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: HumanDuration,
    /// Idle connections kept per host; set it near the concurrency one host sees, since
    /// closing busy connections between bursts cost more than half the throughput in tests.
    pub pool_max_idle_per_host: usize,
    /// A directory of TLS files subscriptions may name (`tls.ca_file`, …); without it, tenants
    /// give certificates and keys as content only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_files_dir: Option<PathBuf>,
    /// An HTTP proxy every webhook goes through (`http://user:password@proxy:3128`), so that
    /// receivers see a fixed set of addresses: an HTTP CONNECT tunnel per connection, to the
    /// address the network guard checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Hosts reached directly even with a proxy: names (`hooks.internal`), domains
    /// (`.corp.example`, every name under it) or IP addresses.
    #[serde(deserialize_with = "list_or_csv")]
    pub no_proxy: Vec<String>,
    /// More egress proxies, by name, that a subscription may choose with its `proxy` field
    /// (say, one per region's fixed addresses); `no_proxy` applies to them too.
    pub proxies: std::collections::BTreeMap<String, String>,
}

/// What a subscription's `proxy` names to go direct, around `http.proxy` (so no proxy in
/// `http.proxies` may have this name).
pub const DIRECT_EGRESS: &str = "none";

/// Endpoint health: when to stop hammering a failing endpoint, and when to give up on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failed attempts that open a subscription's circuit breaker.
    pub breaker_failures: u32,
    /// First pause while the breaker is open; doubles after each failed probe.
    pub breaker_pause: HumanDuration,
    /// Longest pause.
    pub breaker_max_pause: HumanDuration,
    /// Disable a subscription after failing continuously this long (`0s`: never).
    pub disable_after: HumanDuration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            breaker_failures: 10,
            breaker_pause: Duration::from_secs(30).into(),
            breaker_max_pause: Duration::from_secs(600).into(),
            disable_after: Duration::from_secs(5 * 86_400).into(),
        }
    }
}

/// A webhook declared in the config file (`[[webhooks]]`): kept as subscription
/// `static-<name>`, created or updated at start and deleted when it leaves the file. `Debug`
/// shows no secret ([`redacted`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticWebhook {
    /// Stable name; the subscription id is `static-<name>`.
    pub name: String,
    /// Tenant (default `default`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Whether deliveries are made.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Target URL.
    pub endpoint: String,
    /// Sent as the `key` query parameter.
    #[serde(default)]
    pub key: Option<String>,
    /// Request timeout (default 30 s).
    #[serde(default)]
    pub connection_timeout: Option<HumanDuration>,
    /// HMAC-SHA256 secret, signed into `X-Signature`; no signature when absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// `X-Signature` encoding: `base64` (default) or `hex`.
    #[serde(default)]
    pub signature_encoding: Option<String>,
    /// Event types delivered (absent: all).
    #[serde(default)]
    pub events: Vec<String>,
    /// Accept any server certificate.
    #[serde(default)]
    pub trust_all: bool,
    /// PEM CA certificates to trust.
    #[serde(default)]
    pub trust_file: Option<String>,
    /// Client certificate (PEM, or PKCS#12 with `key_password`).
    #[serde(default)]
    pub client_cert: Option<String>,
    /// Client key (PEM).
    #[serde(default)]
    pub key_file: Option<String>,
    /// PKCS#12 password.
    #[serde(default)]
    pub key_password: Option<String>,
    /// How the file spells its settings, for error messages.
    #[serde(skip)]
    pub spelling: Spelling,
}

/// Which section of the file a static webhook came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Spelling {
    /// Herald's `[[webhooks]]`.
    #[default]
    Webhooks,
    /// The Automation API's `webHook`.
    AutomationApi,
}

impl StaticWebhook {
    /// The file's name for a subscription field (`url` → `webhooks[0].endpoint`), so an error
    /// names the line the operator wrote.
    pub fn setting(&self, index: usize, field: &str) -> String {
        match self.spelling {
            Spelling::AutomationApi => format!("webHook.{}", automation::setting(field)),
            Spelling::Webhooks => {
                let key = match field {
                    "url" => "endpoint",
                    "timeout" => "connection_timeout",
                    "tls.ca_file" => "trust_file",
                    "tls.client_cert_file" => "client_cert",
                    "tls.client_key_file" => "key_file",
                    "tls.key_password" => "key_password",
                    "tls.trust_all" => "trust_all",
                    other => other,
                };
                format!("webhooks[{index}].{key}")
            }
        }
    }
}

fn yes() -> bool {
    true
}

/// Edge relay between Herald processes: an agent connects to one process, and the others
/// forward its subscriptions' attempts to that one.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// The secret processes authenticate those forwards with (all processes must share it);
    /// derived from the admin token when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_secret: Option<String>,
}

impl std::fmt::Debug for EdgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeConfig")
            .field("forward_secret", &self.forward_secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Delivery history: every attempt, and each event's state, kept for a while.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// How long attempts and events are kept (and with them, what resend and recover can
    /// send again); `0s` turns the history off.
    pub retention: HumanDuration,
    /// Bytes of a receiver's answer kept per attempt.
    pub response_bytes: usize,
    /// How long indexing may wait while deliveries keep the workers busy, so that a burst is
    /// indexed after it rather than during it (lists see its attempts up to this much later;
    /// a lookup of an event not found, a resend and a recover wait for the index instead, and
    /// nothing is held back while they do); `0s` indexes at once.
    pub index_defer: HumanDuration,
}

/// Most of a receiver's answer an attempt may keep (`history.response_bytes`): also what the
/// HTTP transport reads of a body at most.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

impl HistoryConfig {
    /// Whether history is kept at all.
    pub fn enabled(&self) -> bool {
        !self.retention.0.is_zero()
    }

    /// Bytes of a receiver's answer each attempt keeps, for every transport (`None`: no
    /// history, nothing kept).
    pub fn kept_response_bytes(&self) -> Option<usize> {
        self.enabled().then_some(self.response_bytes)
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            retention: Duration::from_secs(14 * 86_400).into(),
            response_bytes: 1024,
            index_defer: Duration::from_secs(30).into(),
        }
    }
}

/// Signing secrets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// After a secret rotation, how long the old secret keeps signing beside the new one.
    pub rotation_overlap: HumanDuration,
}

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig { rotation_overlap: Duration::from_secs(24 * 3600).into() }
    }
}

/// Log output settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `human` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `herald=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("./herald-data"),
            admin_token: None,
            secret_key: None,
            secret_key_file: None,
            previous_secret_keys: Vec::new(),
            secret_key_lost: false,
            advertise_url: None,
            log: LogConfig::default(),
            network: NetworkConfig::default(),
            ingest: IngestConfig::default(),
            api: ApiConfig::default(),
            quotas: QuotaConfig::default(),
            history: HistoryConfig::default(),
            dispatch: DispatchConfig::default(),
            http: HttpConfig::default(),
            health: HealthConfig::default(),
            signing: SigningConfig::default(),
            edge: EdgeConfig::default(),
            webhooks: Vec::new(),
            web_hook: None,
            logging: LoggingConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: Backend::Embedded,
            topic_prefix: "herald.".into(),
            partitions: 8,
            segment_bytes: 64 << 20,
            flush_interval: Duration::from_millis(200).into(),
            dlq_retention: Duration::from_secs(14 * 86_400).into(),
            retention: Duration::from_secs(7 * 86_400).into(),
            min_insync_replicas: 2,
            brokers: "localhost:9092".into(),
            replication: -1,
            kafka: KafkaProperties::default(),
        }
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            window: 512,
            max_uncommitted: 100_000,
            batch: 256,
            ordered_max_keys: 10_000,
            tenant_in_flight_bytes: DEFAULT_TENANT_IN_FLIGHT_BYTES,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Duration::from_secs(30).into(),
            connect_timeout: Duration::from_secs(10).into(),
            pool_idle_timeout: Duration::from_secs(90).into(),
            pool_max_idle_per_host: 1024,
            tls_files_dir: None,
            proxy: None,
            no_proxy: Vec::new(),
            proxies: std::collections::BTreeMap::new(),
        }
    }
}

/// OpenTelemetry traces: spans of ingest, attempts and dead-lettering, exported over OTLP/HTTP.
/// Off unless an endpoint is set here or in `OTEL_EXPORTER_OTLP_ENDPOINT` /
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the other `OTEL_*` variables are honoured too).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Where spans go: the collector's OTLP/HTTP base URL (`http://collector:4318`).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
    /// Send `traceparent` (and `tracestate`) to receivers for events that carry a trace
    /// context, whether or not spans are exported.
    pub propagate: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig { otlp_endpoint: None, service_name: "herald".into(), propagate: true }
    }
}

impl TracingConfig {
    /// Whether spans are exported: an endpoint is configured here or in the environment.
    pub fn exporting(&self, env: impl Fn(&str) -> Option<String>) -> bool {
        self.otlp_endpoint.as_deref().is_some_and(|e| !e.is_empty())
            || ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
                .iter()
                .any(|k| env(k).is_some_and(|v| !v.is_empty()))
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { format: LogFormat::Human, level: "info".into() }
    }
}

/// A list given as a list (files) or as comma-separated text (environment variables).
fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Items {
        List(Vec<String>),
        Csv(String),
    }
    let items = match Items::deserialize(d)? {
        Items::List(v) => v,
        Items::Csv(s) => s.split(',').map(str::to_string).collect(),
    };
    Ok(items.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

fn nets_from_list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    list_or_csv(d)?
        .iter()
        .map(|s| {
            s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from)).map_err(|_| {
                // The setting (network.allow or network.deny) is named by the loader's error.
                serde::de::Error::custom(format!("{s:?} is not a CIDR range such as 127.0.0.0/8"))
            })
        })
        .collect()
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value did not fit.
    #[error("configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// Values parsed but are not usable together.
    #[error("configuration: {field}: {message}")]
    Rejected {
        /// The offending setting.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Sections whose environment variables use one underscore after the section name,
/// e.g. `HERALD_NETWORK_ALLOW` → `network.allow`.
const SECTIONS: &[&str] = &[
    "log", "network", "ingest", "api", "quotas", "history", "dispatch", "http", "health", "signing", "edge", "logging",
    "tracing",
];

/// One environment variable's setting, named as the operator wrote it in errors (figment's
/// own name for a value given in code was a place in this file).
struct Variable {
    name: String,
    setting: Serialized<String>,
}

impl figment::Provider for Variable {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.setting.data()
    }
}

/// `e` with the values it quotes left out, each named by its type only: a value of the wrong
/// type may be a secret (a proxy URL with its password where a table was due, a key password
/// of digits), and this error is printed.
fn without_values(e: figment::Error) -> figment::Error {
    use figment::error::{Actual, Kind};
    let hide = |actual: &mut Actual| {
        let kind = match actual {
            Actual::Bool(_) => "a boolean",
            Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
            Actual::Float(_) => "a number",
            Actual::Char(_) | Actual::Str(_) => "a string",
            Actual::Bytes(_) => "bytes",
            _ => return,
        };
        *actual = Actual::Other(kind.into());
    };
    let mut all: Vec<figment::Error> = e.into_iter().collect();
    for one in &mut all {
        match &mut one.kind {
            Kind::InvalidType(a, _) | Kind::InvalidValue(a, _) | Kind::Unsupported(a) | Kind::UnsupportedKey(a, _) => {
                hide(a)
            }
            _ => {}
        }
    }
    // Chained back in the order they came (the first of `into_iter` is the newest).
    let mut oldest_first = all.into_iter().rev();
    let first = oldest_first.next().expect("an error is at least one");
    oldest_first.fold(first, figment::Error::chain)
}

/// Checks a log filter (`logging.level`, or `RUST_LOG`, which wins): levels, or target=level,
/// comma-separated. `warning` is no level: the filter reads it as a target's name, and logs
/// nothing else — nor does an empty one.
fn log_levels(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err("name a level (error, warn, info, debug, trace, off)".into());
    }
    for (directive, level) in directives(filter) {
        if level.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?}: each of its parts is a level (error, warn, info, debug, trace, off) or target=level"
            ));
        }
    }
    Ok(())
}

/// A log filter's comma-separated directives, each with its level part (after the last `=`,
/// or the whole of it).
fn directives(filter: &str) -> impl Iterator<Item = (&str, &str)> {
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| (d, d.rsplit_once('=').map_or(d, |(_, level)| level)))
}

/// Checks `RUST_LOG`, which the filter reads more loosely than `logging.level` (a bare word
/// is a target, all its levels): what it cannot read, and a level misspelt as such a word
/// (`warning`, `err`…), which would log nothing but a target of that name.
pub fn rust_log(filter: &str) -> Result<(), String> {
    const MISSPELT: [&str; 8] = ["warning", "err", "fatal", "critical", "information", "notice", "verbose", "all"];
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    for (directive, level) in directives(filter) {
        if MISSPELT.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{directive:?}: {level:?} is no level (error, warn, info, debug, trace, off)"));
        }
    }
    Ok(())
}

/// Refuses a settings file that is not TOML, saying where but not what is there: the parser's
/// own message (which figment passes on) quotes the line, and the line may hold a secret — a
/// password with a stray backslash, a token left unquoted.
fn not_toml(file: &Path) -> Result<(), ConfigError> {
    let rejected = |message: String| ConfigError::Rejected { field: "--config", message };
    let text = std::fs::read_to_string(file).map_err(|e| rejected(format!("reading {}: {e}", file.display())))?;
    let Err(e) = toml::from_str::<toml::Table>(&text) else { return Ok(()) };
    let at = e.span().map_or(0, |span| span.start).min(text.len());
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Err(rejected(format!(
        "{} is not valid TOML at line {line}, column {column}: {}",
        file.display(),
        e.message().trim_end()
    )))
}

fn env_key(key: &str) -> String {
    let key = key.to_ascii_lowercase();
    if key.contains("__") {
        return key.replace("__", ".");
    }
    for section in SECTIONS {
        if let Some(rest) = key.strip_prefix(section).and_then(|r| r.strip_prefix('_')) {
            return format!("{section}.{rest}");
        }
    }
    key
}

impl Config {
    /// Loads defaults, then `file` (if given), then `HERALD_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Rejected {
                    field: "--config",
                    message: format!("{} does not exist", file.display()),
                });
            }
            fig = if file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
                fig.merge(Json::file(file))
            } else {
                not_toml(file)?;
                fig.merge(Toml::file(file))
            };
        }
        // Read from the given variables (not the process's) so tests are hermetic; the CLI's
        // and the edge agent's own are not the server's settings (one shell or env file
        // often serves both).
        let vars: Vec<(String, String, String)> = env
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("HERALD_").map(|k| (k, v)))
            .filter(|(k, v)| !CLIENT_VARIABLES.contains(k) && !kubernetes_service_variable(k, v))
            .map(|(k, v)| (format!("HERALD_{k}"), env_key(k), v.clone()))
            .collect();
        for (name, key, value) in vars {
            // Kept as text and read as what the setting is (`extract_lossy`): typed by its
            // looks, as figment's own Env provider does, a token of digits became a number,
            // failed to load as a string, and the error echoed it.
            fig = fig.merge(Variable { name, setting: Serialized::default(&key, value) });
        }
        let mut config: Config = fig.extract_lossy().map_err(|e| Box::new(without_values(e)))?;
        // A token from a secret mount often ends in a newline, which no client can send.
        for token in [&mut config.admin_token, &mut config.edge.forward_secret].into_iter().flatten() {
            *token = token.trim().to_string();
        }
        // A record is its event and up to 64 KiB of ids and metadata: a fan-out quota set to
        // the largest event (the documented least) refused such an event to one subscription
        // `413`, so it is taken as that much more.
        let record = config.ingest.max_record_bytes() as u64;
        if (config.ingest.max_event_bytes as u64..record).contains(&config.quotas.fanout_bytes) {
            config.quotas.fanout_bytes = record;
        }
        config.validate()?;
        Ok(config)
    }

    /// Every webhook the file declares: `[[webhooks]]`, then the `webHook` section.
    pub fn static_webhooks(&self) -> Vec<StaticWebhook> {
        let mut all = self.webhooks.clone();
        all.extend(self.web_hook.as_ref().map(AutomationWebHook::to_static));
        all
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let reject = |field, message: &str| Err(ConfigError::Rejected { field, message: message.to_string() });
        if self.log.partitions == 0 || self.log.partitions > 4096 {
            return reject("log.partitions", "must be between 1 and 4096");
        }
        if self.log.backend == Backend::Kafka && self.log.brokers.trim().is_empty() {
            return reject("log.brokers", "is required with log.backend = \"kafka\"");
        }
        if self.log.replication == 0 || self.log.replication < -1 {
            return reject("log.replication", "must be at least 1, or -1 for the broker's default");
        }
        let prefix = &self.log.topic_prefix;
        if prefix.len() > 200 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            // Kafka's topic alphabet, and the embedded log's folder names under the data directory.
            return reject("log.topic_prefix", "must be at most 200 of the characters a-z A-Z 0-9 . _ -");
        }
        if self.log.segment_bytes < 4096 {
            return reject("log.segment_bytes", "must be at least 4096");
        }
        // On the embedded log the same tick retains, compacts and frees the disk (and a crash
        // sends again what it had not persisted): a day of it kept a day of expired dead
        // letters and segments. Kafka does not use it.
        let flush = self.log.flush_interval.0;
        if flush < Duration::from_millis(1)
            || (self.log.backend == Backend::Embedded && flush > Duration::from_secs(300))
        {
            return reject("log.flush_interval", "must be from 1ms to 5m");
        }
        if self.log.dlq_retention.0 < Duration::from_secs(60) {
            return reject("log.dlq_retention", "must be at least 1m");
        }
        if self.log.retention.0 < MIN_LOG_RETENTION {
            // A retry waits unread in its tier until due, up to the longest tier's delay: a
            // broker deleting it before then loses it.
            return reject("log.retention", "must be at least 8h, twice the longest retry tier (4h)");
        }
        if self.history.response_bytes > MAX_RESPONSE_BYTES {
            return reject("history.response_bytes", &format!("must be at most {MAX_RESPONSE_BYTES}"));
        }
        if self.history.index_defer.0 > Duration::from_secs(600) {
            // For bursts: an index that trails longer would keep stale answers for long, and
            // come near the embedded log's shortest keep of the topic (an hour).
            return reject("history.index_defer", "must be at most 10m");
        }
        if !(1024..=12 << 20).contains(&self.ingest.max_event_bytes) {
            return reject("ingest.max_event_bytes", "must be between 1024 and 12582912 (12 MiB)");
        }
        let named = self.http.proxies.iter().map(|(name, url)| ("http.proxies", format!("{name}: "), url));
        for (field, name, proxy) in self.http.proxy.iter().map(|p| ("http.proxy", String::new(), p)).chain(named) {
            match url::Url::parse(proxy) {
                Ok(u) if u.scheme() == "http" && u.host_str().is_some() => {}
                Ok(_) => {
                    let why = "must be an http:// URL with a host (https targets are tunnelled)";
                    return reject(field, &format!("{name}{why}"));
                }
                Err(e) => return reject(field, &format!("{name}not a URL: {e}")),
            }
        }
        for name in self.http.proxies.keys() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name != DIRECT_EGRESS
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return reject(
                    "http.proxies",
                    &format!("{name:?}: names are 1 to 64 of A-Z a-z 0-9 - _ . and not \"none\""),
                );
            }
        }
        if let Some(url) = &self.api.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.parse::<http::Uri>().is_err() {
                return reject("api.public_url", "must be an http:// or https:// URL");
            }
            // The console's and portal's pages load their assets from the host's root, and the
            // page tells the portal by its path: served under a prefix, a link signed nobody in.
            let bare = url
                .parse::<http::Uri>()
                .is_ok_and(|u| matches!(u.path_and_query().map(|p| p.as_str()), None | Some("" | "/")));
            if !bare {
                return reject(
                    "api.public_url",
                    "must be the root of a host (scheme, host and port: no path or query); Herald is served at the root of the host it is reached at",
                );
            }
        }
        let (min, max) = ApiConfig::PORTAL_TTL;
        if !(min..=max).contains(&self.api.portal_ttl.0) {
            return reject("api.portal_ttl", "must be from 1 minute to 7 days");
        }
        if self.api.max_connections == 0 {
            return reject("api.max_connections", "must be more than zero");
        }
        if self.api.tenant_requests == 0 {
            return reject("api.tenant_requests", "must be at least 1");
        }
        if !(self.api.key_rate_limit > 0.0 && self.api.key_rate_limit.is_finite()) {
            return reject("api.key_rate_limit", "must be more than zero");
        }
        // Below these no client's request is read, or answered, in time.
        if self.api.header_read_timeout.0 < Duration::from_millis(100) {
            return reject("api.header_read_timeout", "must be at least 100ms");
        }
        if self.api.request_timeout.0 < Duration::from_secs(1) {
            return reject("api.request_timeout", "must be at least 1s");
        }
        if self.quotas.subscriptions_per_tenant == 0 {
            return reject("quotas.subscriptions_per_tenant", "must be at least 1");
        }
        if self.quotas.tests_per_minute == 0 {
            return reject("quotas.tests_per_minute", "must be at least 1");
        }
        // One event of the largest size to one subscription must fit a request's fan-out, or
        // every such publish is refused `413` at run time (see `Config::load`, which raises
        // it to a whole record).
        if self.quotas.fanout_bytes < self.ingest.max_event_bytes as u64 {
            let least = self.ingest.max_event_bytes;
            return reject("quotas.fanout_bytes", &format!("must be at least ingest.max_event_bytes ({least} bytes)"));
        }
        // A request of the largest fan-out must fit a tenant's share, and that everyone's.
        if self.tenant_pending_bytes() < self.quotas.fanout_bytes {
            return reject("quotas.pending_bytes", "must be at least quotas.fanout_bytes");
        }
        if self.pending_bytes() < self.tenant_pending_bytes() {
            return reject("ingest.pending_bytes", "must be at least quotas.pending_bytes");
        }
        if self.quotas.edge_devices_per_tenant == 0 {
            return reject("quotas.edge_devices_per_tenant", "must be at least 1");
        }
        if self.log.min_insync_replicas == 0 {
            return reject("log.min_insync_replicas", "must be at least 1");
        }
        if self.dispatch.window == 0 {
            return reject("dispatch.window", "must be at least 1");
        }
        if self.dispatch.batch == 0 {
            return reject("dispatch.batch", "must be at least 1");
        }
        // Far past any use, and short of the arithmetic on them (twice the window, a
        // semaphore's permits) overflowing.
        for (field, n) in [
            ("api.max_connections", self.api.max_connections),
            ("dispatch.window", self.dispatch.window),
            ("dispatch.batch", self.dispatch.batch),
            ("dispatch.max_uncommitted", self.dispatch.max_uncommitted),
            ("dispatch.ordered_max_keys", self.dispatch.ordered_max_keys),
        ] {
            if n > 100_000_000 {
                return reject(field, "must be at most 100000000");
            }
        }
        // Past half of it, attempts holding the commit point are ended (see `window::Cut`):
        // below twice what may be in flight (twice the window), ordinary ones would be.
        if self.dispatch.max_uncommitted < 4 * self.dispatch.window {
            return reject("dispatch.max_uncommitted", "must be at least 4 × dispatch.window");
        }
        if self.dispatch.ordered_max_keys == 0 {
            return reject("dispatch.ordered_max_keys", "must be at least 1");
        }
        if self.dispatch.tenant_in_flight_bytes < 1 << 20 {
            return reject("dispatch.tenant_in_flight_bytes", "must be at least 1048576 (1 MiB)");
        }
        if self.health.breaker_failures == 0 {
            return reject("health.breaker_failures", "must be at least 1");
        }
        // Counted in milliseconds: below one the pause was none.
        if self.health.breaker_pause.0 < Duration::from_millis(1)
            || self.health.breaker_max_pause < self.health.breaker_pause
        {
            return reject("health.breaker_pause", "must be at least 1ms and at most health.breaker_max_pause");
        }
        if let Some(bad) = self.http.no_proxy.iter().find(|e| !e.trim().is_empty() && NoProxy::parse(e).is_none()) {
            return reject(
                "http.no_proxy",
                &format!("{bad:?} is not a name, a .domain or *.domain, an address, a range such as 10.0.0.0/8, or *"),
            );
        }
        let (shortest, longest) = ATTEMPT_TIMEOUT;
        for (field, timeout) in
            [("http.timeout", self.http.timeout.0), ("http.connect_timeout", self.http.connect_timeout.0)]
        {
            if !(shortest..=longest).contains(&timeout) {
                return reject(field, &format!("must be from {shortest:?} to {longest:?}"));
            }
        }
        // Keys checked with the other settings, each by its name: found only as the catalog
        // opened, the admin token was already generated and written (the next start never
        // printed it) and the log open, and a bad previous key was called `secret_key`.
        let is_key = |text: &str| Self::secret_key_bytes(text).is_some();
        let (key_field, key) = match (&self.secret_key, &self.secret_key_file) {
            (None, Some(_)) => ("secret_key_file", self.sealing_key()?),
            _ => ("secret_key", self.secret_key.clone()),
        };
        if key.is_some_and(|k| !is_key(&k)) {
            return reject(key_field, "must be 32 bytes, base64 (openssl rand -base64 32)");
        }
        if !self.previous_secret_keys.iter().all(|k| is_key(k)) {
            return reject("previous_secret_keys", "each must be 32 bytes, base64");
        }
        // A secret mount that did not come up: refused here, not at each attempt naming a file.
        if let Some(dir) = &self.http.tls_files_dir {
            if !dir.is_dir() {
                return reject("http.tls_files_dir", &format!("{} is not a directory", dir.display()));
            }
        }
        if let Err(problem) = log_levels(&self.logging.level) {
            return reject("logging.level", &problem);
        }
        if let Some(url) = &self.advertise_url {
            let usable = url::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()));
            if !usable {
                return reject("advertise_url", "must be an http:// or https:// URL with a host");
            }
        }
        if let Some(problem) = self.admin_token.as_deref().and_then(admin_token_problem) {
            return reject("admin_token", problem);
        }
        // It lets any caller of the public API push a subscription (its secrets with it) to
        // an agent: as hard to guess as the admin token.
        if self.edge.forward_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return reject("edge.forward_secret", "must be at least 16 characters");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_takes_environment_variables_with_one_underscore() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        for (key, value) in defaults.as_object().unwrap() {
            if value.is_object() {
                assert!(SECTIONS.contains(&key.as_str()), "section {key} is missing from SECTIONS");
            }
        }
        let env = vec![("HERALD_HISTORY_RETENTION".to_string(), "0s".to_string())];
        assert!(!Config::load(None, &env).unwrap().history.enabled());
        let env = vec![("HERALD_TRACING_OTLP_ENDPOINT".to_string(), "http://collector:4318".to_string())];
        assert!(Config::load(None, &env).unwrap().tracing.exporting(|_| None));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The README has the CLI's users `export HERALD_SERVER=… HERALD_TOKEN=…`, and an edge
    /// host has `HERALD_EDGE_TOKEN`: a `herald serve` started in that shell (or with that env
    /// file) must not refuse them as unknown settings.
    #[test]
    fn the_cli_s_and_the_agent_s_variables_are_not_settings() {
        let vars = env(&[
            ("HERALD_TOKEN", "x"),
            ("HERALD_SERVER", "http://h"),
            ("HERALD_EDGE_TOKEN", "he.x.y"),
            ("HERALD_EDGE_TLS_FILES_DIR", "/etc/herald/tls"),
        ]);
        assert!(Config::load(None, &vars).is_ok(), "{:?}", Config::load(None, &vars).err());
    }

    /// Kubernetes gives every pod variables for each Service of its namespace: a Service
    /// called `herald` (or `herald-edge`) made `HERALD_SERVICE_HOST`, `HERALD_PORT`, … in every
    /// pod, refused as unknown settings — the pod never started. A misspelt setting is still
    /// refused.
    #[test]
    fn kubernetes_service_variables_are_not_settings() {
        let vars = env(&[
            ("HERALD_SERVICE_HOST", "10.0.0.1"),
            ("HERALD_SERVICE_PORT", "8080"),
            ("HERALD_SERVICE_PORT_HTTP", "8080"),
            ("HERALD_PORT", "tcp://10.0.0.1:8080"),
            ("HERALD_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
            ("HERALD_PORT_8080_TCP_PROTO", "tcp"),
            ("HERALD_PORT_8080_TCP_PORT", "8080"),
            ("HERALD_PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("HERALD_EDGE_SERVICE_HOST", "10.0.0.2"),
            ("HERALD_EDGE_PORT_9000_TCP_ADDR", "10.0.0.2"),
            ("HERALD_TRACING_SERVICE_NAME", "herald-eu"),
        ]);
        let loaded = Config::load(None, &vars);
        assert!(loaded.is_ok(), "{:?}", loaded.err());
        assert_eq!(loaded.unwrap().tracing.service_name, "herald-eu", "a setting with SERVICE in its name is read");
        for misspelt in [("HERALD_ADMN_TOKEN", "x"), ("HERALD_LISTEN_PORT", "9000"), ("HERALD_API_PORT_8080", "1")] {
            assert!(Config::load(None, &env(&[misspelt])).is_err(), "{misspelt:?}");
        }
    }

    /// Settings past any use are refused, not wrapped in the arithmetic they reach.
    #[test]
    fn durations_and_counts_past_any_use_are_refused() {
        for (var, value) in [
            ("HERALD_LOG_DLQ_RETENTION", "18446744073709551615"),
            ("HERALD_LOG_DLQ_RETENTION", "P999999999999D"),
            ("HERALD_HEALTH_DISABLE_AFTER", "200 years"),
            ("HERALD_API_MAX_CONNECTIONS", "2305843009213693952"),
            ("HERALD_DISPATCH_WINDOW", "9223372036854775807"),
        ] {
            assert!(Config::load(None, &env(&[(var, value)])).is_err(), "{var}={value}");
        }
        assert!(Config::load(None, &env(&[("HERALD_LOG_DLQ_RETENTION", "P3650D")])).is_ok());
        // A tenant's requests under way: at least one.
        let e = Config::load(None, &env(&[("HERALD_API_TENANT_REQUESTS", "0")])).unwrap_err();
        assert!(e.to_string().contains("api.tenant_requests"), "{e}");
        let c = Config::load(None, &env(&[("HERALD_API_TENANT_REQUESTS", "64")])).unwrap();
        assert_eq!(c.api.tenant_requests, 64);
    }

    /// Past half of `max_uncommitted`, attempts holding the commit point are ended: below
    /// twice what a partition may have in flight (twice the window), ordinary ones would be.
    /// A larger `ingest.max_event_bytes` raises the bound on a tenant's bytes in flight to
    /// twice the largest record, rather than refusing a start that named no bound.
    #[test]
    fn a_tenant_s_bytes_in_flight_are_at_least_twice_the_largest_record() {
        let mut c = Config::default();
        assert_eq!(c.dispatch.tenant_in_flight_bytes(&c.ingest), 64 << 20);
        c.ingest.max_event_bytes = 50 << 20;
        assert_eq!(c.dispatch.tenant_in_flight_bytes(&c.ingest), 2 * ((50 << 20) + (64 << 10)));
    }

    #[test]
    fn max_uncommitted_below_four_windows_is_refused() {
        let with = |n: &str| {
            Config::load(None, &env(&[("HERALD_DISPATCH_WINDOW", "64"), ("HERALD_DISPATCH_MAX_UNCOMMITTED", n)]))
        };
        let err = with("255").expect_err("refused").to_string();
        assert!(err.contains("dispatch.max_uncommitted"), "{err}");
        assert!(with("256").is_ok());
    }

    /// An attempt's timeouts within the range a subscription's own may have: a connect
    /// timeout of zero failed every connection, a default timeout of a millisecond every
    /// attempt, one of weeks let a silent receiver hold a slot for as long.
    #[test]
    fn http_timeouts_out_of_range_are_refused_naming_them() {
        for (var, value, field) in [
            ("HERALD_HTTP_CONNECT_TIMEOUT", "0s", "http.connect_timeout"),
            ("HERALD_HTTP_CONNECT_TIMEOUT", "1000h", "http.connect_timeout"),
            ("HERALD_HTTP_TIMEOUT", "1ms", "http.timeout"),
            ("HERALD_HTTP_TIMEOUT", "1000h", "http.timeout"),
        ] {
            match Config::load(None, &env(&[(var, value)])) {
                Err(ConfigError::Rejected { field: f, .. }) => assert_eq!(f, field, "{var}={value}"),
                other => panic!("{var}={value}: {other:?}"),
            }
        }
        assert!(Config::load(None, &env(&[("HERALD_HTTP_TIMEOUT", "45s")])).is_ok());
    }

    /// The shares of deliveries being written must each take one request of the largest
    /// fan-out; unset, they follow `quotas.fanout_bytes`.
    #[test]
    fn pending_bytes_fit_the_largest_request() {
        for (vars, field) in [
            (vec![("HERALD_QUOTAS_PENDING_BYTES", "1000")], "quotas.pending_bytes"),
            (
                vec![("HERALD_QUOTAS_PENDING_BYTES", "2000000000"), ("HERALD_INGEST_PENDING_BYTES", "1000000000")],
                "ingest.pending_bytes",
            ),
        ] {
            match Config::load(None, &env(&vars)) {
                Err(ConfigError::Rejected { field: f, .. }) => assert_eq!(f, field, "{vars:?}"),
                other => panic!("{vars:?}: {other:?}"),
            }
        }
        let raised = Config::load(None, &env(&[("HERALD_QUOTAS_FANOUT_BYTES", "2000000000")])).unwrap();
        assert_eq!((raised.tenant_pending_bytes(), raised.pending_bytes()), (2_000_000_000, 2_000_000_000));
        let default = Config::load(None, &env(&[])).unwrap();
        assert_eq!((default.tenant_pending_bytes(), default.pending_bytes()), (256 << 20, 1 << 30));
    }

    /// A level that is not one (`warning`) read as a target name: nothing was logged at all.
    #[test]
    fn a_logging_level_that_is_no_level_is_refused() {
        for bad in ["warning", "herald=loud", "info,lapin=verbose", ""] {
            let got = Config::load(None, &env(&[("HERALD_LOGGING_LEVEL", bad)]));
            assert!(matches!(got, Err(ConfigError::Rejected { field: "logging.level", .. })), "{bad}: {got:?}");
        }
        for good in ["warn", "info,herald=debug", "herald::dispatch=trace,off"] {
            assert!(Config::load(None, &env(&[("HERALD_LOGGING_LEVEL", good)])).is_ok(), "{good}");
        }
    }

    /// A value of the wrong type is named by its type, not shown: it may be a secret (a proxy
    /// URL with its password given where a table was due, a key password of digits).
    #[test]
    fn a_value_of_the_wrong_type_is_not_shown_in_the_error() {
        let got = Config::load(None, &env(&[("HERALD_HTTP_PROXIES", "http://herald:s3cret@egress:3128")]));
        let text = got.expect_err("a map was due").to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("proxies") && text.contains("string"), "still says where and what: {text}");
    }

    /// A settings file that is not valid TOML is refused saying where, not showing the line:
    /// the parser's message quoted it, and the line may hold a secret (a password with a stray
    /// backslash, a token left unquoted).
    #[test]
    fn a_file_that_is_not_toml_is_refused_without_showing_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:8080\"\n[log.kafka]\n\"sasl.password\" = \"pa\\ss-s3cret\"\n")
            .unwrap();
        let text = Config::load(Some(&file), &[]).expect_err("not TOML").to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("line 3"), "still says where: {text}");
    }

    /// A check that compares two settings names the one whose value is out of range, not the
    /// other; and a fan-out budget smaller than one event's record is refused at start (every
    /// publish matching a subscription was then `413` at run time).
    #[test]
    fn a_setting_out_of_range_is_the_one_named() {
        for (var, value, field) in [
            ("HERALD_API_KEY_RATE_LIMIT", "0", "api.key_rate_limit"),
            ("HERALD_API_HEADER_READ_TIMEOUT", "0s", "api.header_read_timeout"),
            ("HERALD_QUOTAS_TESTS_PER_MINUTE", "0", "quotas.tests_per_minute"),
            ("HERALD_DISPATCH_BATCH", "0", "dispatch.batch"),
            ("HERALD_DISPATCH_TENANT_IN_FLIGHT_BYTES", "1048575", "dispatch.tenant_in_flight_bytes"),
            ("HERALD_QUOTAS_FANOUT_BYTES", "0", "quotas.fanout_bytes"),
            ("HERALD_QUOTAS_FANOUT_BYTES", "1048575", "quotas.fanout_bytes"),
        ] {
            let got = Config::load(None, &env(&[(var, value)]));
            assert!(
                matches!(&got, Err(ConfigError::Rejected { field: f, .. }) if *f == field),
                "{var}={value}: {got:?}"
            );
        }
    }

    /// A TLS files directory that is not there (a secret mount that did not come up) is
    /// refused at start: every subscription naming a file under it failed its attempts until
    /// they were dead letters, and tenants were told their file was not under it.
    #[test]
    fn a_tls_files_directory_that_is_not_there_is_refused() {
        let got = Config::load(None, &env(&[("HERALD_HTTP_TLS_FILES_DIR", "/nonexistent/herald-tls")]));
        assert!(matches!(got, Err(ConfigError::Rejected { field: "http.tls_files_dir", .. })), "{got:?}");
        let dir = tempfile::tempdir().unwrap();
        assert!(Config::load(None, &env(&[("HERALD_HTTP_TLS_FILES_DIR", dir.path().to_str().unwrap())])).is_ok());
    }

    /// A secret key that is no key is refused with the other settings, naming the one that is
    /// wrong: it was found only as the catalog opened — the admin token already generated and
    /// written (so the next start never printed it), the log open — and a bad previous key
    /// was named `secret_key`.
    #[test]
    fn a_secret_key_that_is_no_key_is_refused_naming_it() {
        use base64::Engine;
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        for (vars, field) in [
            (vec![("HERALD_SECRET_KEY", "c2hvcnQ=")], "secret_key"),
            (
                vec![("HERALD_SECRET_KEY", good.as_str()), ("HERALD_PREVIOUS_SECRET_KEYS", "bad")],
                "previous_secret_keys",
            ),
        ] {
            let got = Config::load(None, &env(&vars));
            assert!(matches!(&got, Err(ConfigError::Rejected { field: f, .. }) if *f == field), "{vars:?}: {got:?}");
        }
        assert!(Config::load(None, &env(&[("HERALD_SECRET_KEY", good.as_str())])).is_ok());
    }

    /// An admin token no HTTP header can carry (a character past ASCII, a space inside) was
    /// taken at start, and every request with it was then refused `401`: the admin locked out.
    #[test]
    fn an_admin_token_no_header_can_carry_is_refused() {
        for bad in ["geheimnis-für-herald-0123", "0123456789abcdef\u{7f}", "0123456789\nabcdef"] {
            let got = Config::load(None, &env(&[("HERALD_ADMIN_TOKEN", bad)]));
            assert!(matches!(got, Err(ConfigError::Rejected { field: "admin_token", .. })), "{bad:?}: {got:?}");
        }
        // Spaces inside are carried, and were taken before: still taken.
        assert!(Config::load(None, &env(&[("HERALD_ADMIN_TOKEN", "correct horse battery staple")])).is_ok());
    }

    /// A token from a secret mount often ends in a newline, which no client can send: taken
    /// without the whitespace around it.
    #[test]
    fn tokens_are_taken_without_surrounding_whitespace() {
        let vars = env(&[
            ("HERALD_ADMIN_TOKEN", "0123456789abcdef0123\n"),
            ("HERALD_EDGE_FORWARD_SECRET", " fedcba9876543210fedcba \n"),
        ]);
        let config = Config::load(None, &vars).unwrap();
        assert_eq!(config.admin_token.as_deref(), Some("0123456789abcdef0123"));
        assert_eq!(config.edge.forward_secret.as_deref(), Some("fedcba9876543210fedcba"));
    }

    /// Other processes forward edge attempts to this URL: a wrong one failed every such
    /// attempt at run time, not at start.
    #[test]
    fn an_advertise_url_that_is_no_http_url_is_refused() {
        for bad in ["herald-2:8080", "htps://herald-2:8080", "http://"] {
            let got = Config::load(None, &env(&[("HERALD_ADVERTISE_URL", bad)]));
            assert!(matches!(got, Err(ConfigError::Rejected { field: "advertise_url", .. })), "{bad}: {got:?}");
        }
        assert!(Config::load(None, &env(&[("HERALD_ADVERTISE_URL", "https://herald-2.internal:8443")])).is_ok());
    }

    /// Herald's pages and their assets are at the root of its host: a public URL with a path
    /// made portal links to `…/herald/portal`, whose page loaded its assets from the root and
    /// signed nobody in.
    #[test]
    fn a_public_url_with_a_path_is_refused() {
        for bad in ["https://platform.example.com/herald", "https://x.example.com/?a=1", "ftp://x.example.com"] {
            let got = Config::load(None, &env(&[("HERALD_API_PUBLIC_URL", bad)]));
            assert!(matches!(got, Err(ConfigError::Rejected { field: "api.public_url", .. })), "{bad}: {got:?}");
        }
        for good in ["https://hooks.example.com", "https://hooks.example.com/", "http://10.0.0.5:8080"] {
            assert!(Config::load(None, &env(&[("HERALD_API_PUBLIC_URL", good)])).is_ok(), "{good}");
        }
    }

    /// No secret of the settings is in their `Debug`, at any depth; the rest is.
    #[test]
    fn the_settings_debug_shows_no_secret() {
        let mut config = Config {
            admin_token: Some("admin-s3cret".into()),
            secret_key: Some("key-s3cret".into()),
            previous_secret_keys: vec!["old-s3cret".into()],
            ..Config::default()
        };
        config.log.kafka.0.insert("sasl.password".into(), "sasl-s3cret".into());
        config.http.proxy = Some("http://proxy-s3cret@proxy.internal:3128".into());
        config.http.proxies.insert("eu".into(), "http://user:eu-s3cret@proxy.eu.internal:3128".into());
        let toml = r#"
            [[webhooks]]
            name = "w"
            endpoint = "https://hooks.example.com/x"
            key = "query-s3cret"
            secret = "hmac-s3cret"
            key_password = "p12-s3cret"
        "#;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(&file, toml).unwrap();
        config.webhooks = Config::load(Some(&file), &env(&[])).unwrap().webhooks;
        let shown = format!("{config:?} {:?}", config.webhooks[0]);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("hooks.example.com") && shown.contains("********"), "{shown}");
    }

    /// A range that is not one is refused naming the setting it was given for.
    #[test]
    fn a_range_that_is_none_is_refused_naming_its_setting() {
        for name in ["allow", "deny"] {
            let var = format!("HERALD_NETWORK_{}", name.to_uppercase());
            let got = Config::load(None, &env(&[(var.as_str(), "not-a-net")])).unwrap_err().to_string();
            let other = if name == "allow" { "network.deny" } else { "network.allow" };
            assert!(got.contains(&format!("network.{name}")) && got.contains("not a CIDR"), "{got}");
            assert!(!got.contains(other), "{got}");
        }
    }

    #[test]
    fn a_short_forward_secret_is_refused() {
        let short = Config::load(None, &env(&[("HERALD_EDGE_FORWARD_SECRET", "herald")]));
        assert!(matches!(short, Err(ConfigError::Rejected { field: "edge.forward_secret", .. })));
    }

    /// A key file that holds no key (a secret mount that came up empty) is an error, not a
    /// quiet start storing secrets as text and leaving sealed ones unreadable.
    #[test]
    fn an_empty_secret_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "\n").unwrap();
        let c = Config { secret_key_file: Some(path), ..Config::default() };
        assert!(matches!(c.sealing_key(), Err(ConfigError::Rejected { field: "secret_key_file", .. })));
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./herald-data"));
        assert_eq!(c.log.backend, Backend::Embedded);
        assert_eq!(c.log.topic_prefix, "herald.");
    }

    #[test]
    fn the_log_keeps_a_retry_longer_than_its_longest_wait() {
        match Config::load(None, &env(&[("HERALD_LOG_RETENTION", "2h")])) {
            Err(ConfigError::Rejected { field, .. }) => assert_eq!(field, "log.retention"),
            other => panic!("2h accepted: {other:?}"),
        }
        match Config::load(None, &env(&[("HERALD_LOG_DLQ_RETENTION", "10s")])) {
            Err(ConfigError::Rejected { field, .. }) => assert_eq!(field, "log.dlq_retention"),
            other => panic!("10s accepted: {other:?}"),
        }
        assert!(Config::load(None, &env(&[("HERALD_LOG_RETENTION", "8h")])).is_ok());
    }

    #[test]
    fn indexing_defers_30s_by_default_and_never_past_ten_minutes() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.history.index_defer.0, std::time::Duration::from_secs(30));
        let c = Config::load(None, &env(&[("HERALD_HISTORY_INDEX_DEFER", "0s")])).unwrap();
        assert!(c.history.index_defer.0.is_zero());
        match Config::load(None, &env(&[("HERALD_HISTORY_INDEX_DEFER", "11m")])) {
            Err(ConfigError::Rejected { field, .. }) => assert_eq!(field, "history.index_defer"),
            other => panic!("11m accepted: {other:?}"),
        }
        match Config::load(None, &env(&[("HERALD_HISTORY_RESPONSE_BYTES", "65537")])) {
            Err(ConfigError::Rejected { field, .. }) => assert_eq!(field, "history.response_bytes"),
            other => panic!("more than the transport reads accepted: {other:?}"),
        }
    }

    #[test]
    fn file_then_environment_override() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9000\"\n[network]\nallow = [\"10.0.0.0/8\"]\n[http]\ntimeout = \"PT45S\"\n[dispatch]\nwindow = 64\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            &env(&[
                ("HERALD_NETWORK_ALLOW", "127.0.0.0/8,::1/128"),
                ("HERALD_DISPATCH_WINDOW", "32"),
                ("HERALD_ADMIN_TOKEN", "0123456789abcdef0123"),
                ("HERALD_HTTP__CONNECT_TIMEOUT", "2s"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.network.allow.len(), 2);
        assert_eq!(c.network.allow[1].to_string(), "::1/128");
        assert_eq!(c.dispatch.window, 32);
        assert_eq!(c.http.timeout.0, Duration::from_secs(45));
        assert_eq!(c.http.connect_timeout.0, Duration::from_secs(2));
        assert_eq!(c.admin_token.as_deref(), Some("0123456789abcdef0123"));
    }

    #[test]
    fn a_json_file_with_the_automation_apis_section_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.json");
        std::fs::write(
            &file,
            r#"{"listen": "127.0.0.1:9100", "webHook": {"enabled": true, "endpoint": "https://erp.example/n",
                "key": "k", "connectionTimeout": 30000, "secret": "s", "useSslTrustAll": false}}"#,
        )
        .unwrap();
        let c = Config::load(Some(&file), &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9100");
        let hooks = c.static_webhooks();
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].setting(0, "timeout"), "webHook.connectionTimeout");
        assert_eq!(hooks[0].connection_timeout, Some(HumanDuration(Duration::from_secs(30))));
        std::fs::write(&file, r#"{"webHook": {"endpoint": "https://x/", "unknownSetting": 1}}"#).unwrap();
        let err = Config::load(Some(&file), &[]).unwrap_err();
        assert!(err.to_string().contains("unknownSetting"), "{err}");
    }

    #[test]
    fn environment_values_keep_the_type_of_their_setting() {
        // A token or prefix made of digits (or reading "true") is still text: figment's own
        // value rules typed it as a number, the load failed, and its message echoed the secret.
        let c = Config::load(
            None,
            &env(&[
                ("HERALD_ADMIN_TOKEN", "12345678901234567890123"),
                ("HERALD_LOG_TOPIC_PREFIX", "true"),
                ("HERALD_EDGE_FORWARD_SECRET", "2024202420242024"),
                ("HERALD_LOG__KAFKA__LINGER_MS", "1.10"),
                ("HERALD_DISPATCH_WINDOW", "32"),
                ("HERALD_HTTP_TIMEOUT", "45"),
            ]),
        )
        .unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("12345678901234567890123"));
        assert_eq!(c.log.topic_prefix, "true");
        assert_eq!(c.edge.forward_secret.as_deref(), Some("2024202420242024"));
        assert_eq!(c.log.kafka.0.get("linger_ms").map(String::as_str), Some("1.10"));
        assert_eq!(c.dispatch.window, 32);
        assert_eq!(c.http.timeout.0, Duration::from_secs(45));
        let err = Config::load(None, &env(&[("HERALD_DISPATCH_WINDOW", "many")])).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
    }

    #[test]
    fn settings_that_would_break_herald_later_are_refused_at_start_naming_them() {
        let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
        for (vars, field) in [
            // The same tick retains, compacts and frees disk.
            (vec![("HERALD_LOG_FLUSH_INTERVAL", "1h")], "log.flush_interval"),
            (vec![("HERALD_API_REQUEST_TIMEOUT", "1ms")], "api.request_timeout"),
            (vec![("HERALD_API_HEADER_READ_TIMEOUT", "1ms")], "api.header_read_timeout"),
            // Below a millisecond the breaker's pause was none.
            (vec![("HERALD_HEALTH_BREAKER_PAUSE", "500us")], "health.breaker_pause"),
            // No form of NO_PROXY's.
            (vec![("HERALD_HTTP_NO_PROXY", "10.0.0.0/33")], "http.no_proxy"),
            (vec![("HERALD_HTTP_NO_PROXY", "a*b.corp")], "http.no_proxy"),
            // A misspelt variable is named as the operator wrote it.
            (vec![("HERALD_ADMN_TOKEN", "x")], "HERALD_ADMN_TOKEN"),
        ] {
            let err = Config::load(None, &env(&vars)).unwrap_err().to_string();
            assert!(err.contains(field), "{vars:?}: {err}");
        }
        // The test suite's own variables, exported in a shell, do not stop a start.
        assert!(Config::load(None, &env(&[("HERALD_TANSU", "/usr/bin/tansu"), ("HERALD_CHROMIUM", "/x")])).is_ok());
        // What an older version took still starts: a fan-out quota of the largest event (taken
        // as a whole record: the event and 64 KiB), a long flush on Kafka (unused there), both
        // secret keys (`secret_key` wins), NO_PROXY's ranges and wildcards (matched now), more
        // of a tenant's requests than connections.
        let c = Config::load(None, &env(&[("HERALD_QUOTAS_FANOUT_BYTES", "1048576")])).unwrap();
        assert_eq!(c.quotas.fanout_bytes, (1 << 20) + (64 << 10));
        let kafka = [("HERALD_LOG_BACKEND", "kafka"), ("HERALD_LOG_FLUSH_INTERVAL", "1h")];
        assert!(Config::load(None, &env(&kafka)).is_ok());
        let both = [("HERALD_SECRET_KEY", key), ("HERALD_SECRET_KEY_FILE", "/run/secrets/k")];
        assert!(Config::load(None, &env(&both)).is_ok());
        let no_proxy = [("HERALD_HTTP_NO_PROXY", "localhost,127.0.0.1,10.0.0.0/8,*.corp,.svc.cluster.local")];
        assert!(Config::load(None, &env(&no_proxy)).is_ok());
        let few = [("HERALD_API_MAX_CONNECTIONS", "8")];
        assert!(Config::load(None, &env(&few)).is_ok());
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Config::load(None, &env(&[("HERALD_NETWORK_ALLOW", "not-a-net")])).unwrap_err();
        assert!(err.to_string().contains("network.allow"), "{err}");
        let err = Config::load(None, &env(&[("HERALD_LOG_PARTITIONS", "0")])).unwrap_err();
        assert!(err.to_string().contains("log.partitions"), "{err}");
        let err = Config::load(None, &env(&[("HERALD_HTTP_TIMEOUT", "soon")])).unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
        let err = Config::load(None, &env(&[("HERALD_LOG_FLUSH_INTERVAL", "0s")])).unwrap_err();
        assert!(err.to_string().contains("log.flush_interval"), "{err}");
        // Topic names are Kafka's and the embedded log's folder names: `../x` or `/tmp/` put a
        // data directory's topics outside it, a space failed at the broker after start.
        for prefix in ["../x.", "/tmp/", "my topics.", &"p".repeat(201)] {
            let err = Config::load(None, &env(&[("HERALD_LOG_TOPIC_PREFIX", prefix)])).unwrap_err();
            assert!(err.to_string().contains("log.topic_prefix"), "{prefix}: {err}");
        }
        for prefix in ["", "acme_prod-herald."] {
            assert_eq!(
                Config::load(None, &env(&[("HERALD_LOG_TOPIC_PREFIX", prefix)])).unwrap().log.topic_prefix,
                prefix
            );
        }
    }
}
