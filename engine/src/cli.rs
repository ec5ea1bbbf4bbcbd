//! `herald tenants|keys|subscriptions|events|attempts|dlq|edge-devices|event-types`: the admin
//! CLI, a thin client of the public `/v1` API through `herald-client` (so it can do exactly what
//! the API lets its token do).
//! Tables for people, `--json` for scripts. Exit codes a script can rely on: 0 done, 1 the API
//! refused (4xx, its error on stderr) or answered that what was asked did not happen (a test
//! delivery that failed, a replay that skipped entries), 2 bad usage, 3 the server failed or
//! could not be reached, 130 interrupted (`events send --stdin`, having said what went).

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use herald_client::query;
use serde_json::{json, Value};
use std::io::{BufRead, Read};
use std::path::PathBuf;

/// Where the API is and who is calling.
#[derive(Args, Clone)]
pub struct Conn {
    /// Herald's base URL.
    #[arg(long, global = true, env = "HERALD_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The admin token or a tenant API key; else the file `$XDG_CONFIG_HOME/herald/token`
    /// (or `~/.config/herald/token`).
    #[arg(long, global = true, env = "HERALD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Certificate authorities (PEM) to trust as well as the public ones: an internal one
    /// that signed the server's certificate.
    #[arg(long, global = true, env = "HERALD_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// The client subcommands; each takes the connection flags (`--server`, `--token`, `--json`)
/// anywhere after its name.
#[derive(Subcommand)]
pub enum Client {
    /// Tenants (admin).
    Tenants {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: Tenants,
    },
    /// Tenants' API keys (admin).
    Keys {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: Keys,
    },
    /// Subscriptions.
    Subscriptions {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: Subscriptions,
    },
    /// Publish and read events.
    Events {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: Events,
    },
    /// Delivery attempts, newest first.
    Attempts {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        paging: Paging,
    },
    /// Dead letters.
    Dlq {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: Dlq,
    },
    /// Edge devices.
    #[command(name = "edge-devices")]
    EdgeDevices {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: EdgeDevices,
    },
    /// The event-type catalogue.
    #[command(name = "event-types")]
    EventTypes {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: EventTypes,
    },
}

impl Client {
    fn conn(&self) -> &Conn {
        match self {
            Client::Tenants { conn, .. }
            | Client::Keys { conn, .. }
            | Client::Subscriptions { conn, .. }
            | Client::Events { conn, .. }
            | Client::Attempts { conn, .. }
            | Client::Dlq { conn, .. }
            | Client::EdgeDevices { conn, .. }
            | Client::EventTypes { conn, .. } => conn,
        }
    }
}

#[derive(Subcommand)]
pub enum Tenants {
    /// List tenants and their keys' ids.
    List {
        /// Only those whose name holds this, in any case.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Create a tenant.
    Create { name: String },
    /// Mint a tenant portal link.
    Portal {
        id: String,
        /// How long it works (`1h`, `2d`); default the server's `api.portal_ttl`.
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum Keys {
    /// Issue an API key (shown once).
    Issue { tenant: String },
    /// Revoke an API key.
    Revoke { tenant: String, key_id: String },
}

/// Where a listing starts: every paged listing takes it.
#[derive(clap::Args)]
pub struct Paging {
    /// Start after an earlier page's end: the cursor its "more" line named.
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(Subcommand)]
pub enum Subscriptions {
    /// List subscriptions (filtered by the server).
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Only those delivered this way: webhook, amqp or edge.
        #[arg(long)]
        transport: Option<String>,
        /// Only the enabled (true) or disabled (false) ones.
        #[arg(long)]
        enabled: Option<String>,
        /// Only those whose breaker is closed, open or half_open (in the answering process).
        #[arg(long)]
        breaker: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Read one subscription.
    Get { id: String },
    /// Create one, from flags or a JSON file (`-` for stdin); flags override the file.
    Create {
        #[arg(long)]
        url: Option<String>,
        /// Event types, comma-separated (none: all).
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Change one with a JSON Merge Patch from a file (`-` for stdin) or `--set '{"…"}'`.
    Patch {
        id: String,
        #[arg(long, conflicts_with = "set")]
        file: Option<PathBuf>,
        #[arg(long)]
        set: Option<String>,
    },
    /// Delete one.
    Delete { id: String },
    /// Rotate its signing secret (the new one is shown).
    Rotate { id: String },
    /// Send it a signed test event now.
    Test { id: String },
}

#[derive(Subcommand)]
pub enum Events {
    /// Publish: one event from flags or a file, or one JSON event per line of stdin (`--stdin`).
    Send {
        #[arg(long = "type", conflicts_with = "stdin")]
        event_type: Option<String>,
        /// The event's `data`, JSON.
        #[arg(long, conflicts_with = "stdin")]
        data: Option<String>,
        #[arg(long, conflicts_with = "stdin")]
        id: Option<String>,
        /// The event's tenant (with `--stdin`, that of every line that names none).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, conflicts_with = "stdin")]
        file: Option<PathBuf>,
        #[arg(long)]
        stdin: bool,
    },
    /// An event and where each of its deliveries stands.
    Get {
        id: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Recent events.
    List {
        #[arg(long = "type")]
        event_type: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        paging: Paging,
    },
}

#[derive(Subcommand)]
pub enum Dlq {
    /// List dead letters.
    List {
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Deliver dead letters again: these ids, or every one of a subscription (with `--ids`:
    /// those ids, looked for among that subscription's entries alone).
    Replay {
        #[arg(long, value_delimiter = ',', required_unless_present = "subscription")]
        ids: Vec<String>,
        #[arg(long)]
        subscription: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum EdgeDevices {
    /// List edge devices.
    List,
    /// Create one (its token is shown once).
    Create {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete one; its token stops working.
    Delete { id: String },
}

#[derive(Subcommand)]
pub enum EventTypes {
    /// List the catalogue.
    List,
    /// Show one event type with its schema and example.
    Get { name: String },
    /// Add one from a JSON file (`-` for stdin): `{name, description, schema, example, validate}`.
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    /// Change one: a JSON object of the fields to replace (`null` clears one).
    Patch {
        name: String,
        #[arg(long)]
        set: String,
    },
    /// Remove one.
    Delete { name: String },
}

/// How a command failed, as its exit code tells.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    /// The API refused the request (4xx).
    #[error("{0}")]
    Refused(String),
    /// The server failed or could not be reached: the request may or may not have been done.
    #[error("{0}")]
    Unavailable(String),
    /// The server asked to slow down (`429`): for a publish, nothing of it was accepted, and
    /// the same request later is taken.
    #[error("{0}")]
    Throttled(String),
    /// What answered is not Herald's API (`--server` is wrong): nothing was done, and the
    /// same command later will not be either.
    #[error("{0}")]
    NotHerald(String),
    /// Ctrl-C stopped the command: what it says was done was done, the rest was not.
    #[error("{0}")]
    Interrupted(String),
}

impl Failed {
    /// The exit code: 1 refused, 2 not Herald's API (as a `--server` that is no URL), 3
    /// unavailable or throttled (try again later), 130 interrupted (as a shell reports Ctrl-C).
    pub fn code(&self) -> i32 {
        match self {
            Failed::Refused(_) => 1,
            Failed::NotHerald(_) => 2,
            Failed::Unavailable(_) | Failed::Throttled(_) => 3,
            Failed::Interrupted(_) => 130,
        }
    }
}

/// The API, through the client library.
struct Api(herald_client::Client);

impl Api {
    fn new(conn: &Conn) -> anyhow::Result<Api> {
        // A usage error (exit 2), told before anything is sent: a URL without its scheme went
        // out as a request and came back as "server unreachable" (exit 3).
        // Held to what the client sends it as (`http::Uri`), which is stricter than a URL parser:
        // `http:localhost:8080` or a stray space passed one and failed as an "unexpected answer".
        let server =
            conn.server.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
            });
        if server.is_none() {
            bail!("--server {:?} is not an http:// or https:// URL (for example http://127.0.0.1:8080)", conn.server);
        }
        let token = match &conn.token {
            Some(t) => t.clone(),
            None => {
                let dir = std::env::var_os("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
                    .ok_or_else(|| anyhow!("no token: pass --token or set HERALD_TOKEN"))?;
                let path = dir.join("herald/token");
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .with_context(|| format!("no token: pass --token, set HERALD_TOKEN or write {}", path.display()))?
            }
        };
        // Told before anything is sent, without the token: a stray `\r` from a file written on
        // Windows made the header unbuildable, said as an unexpected answer (exit 3, "try again").
        if http::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            bail!("the token holds characters an HTTP header cannot carry (a line break or a control character?)");
        }
        let Some(ca_file) = &conn.ca_file else { return Ok(Api(herald_client::Client::new(&conn.server, &token))) };
        let pem = std::fs::read(ca_file).with_context(|| format!("--ca-file {}", ca_file.display()))?;
        let client = herald_client::Client::with_ca(&conn.server, &token, &pem)
            .with_context(|| format!("--ca-file {}", ca_file.display()))?;
        Ok(Api(client))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failed> {
        let method = http::Method::from_bytes(method.as_bytes()).map_err(|e| Failed::Refused(e.to_string()))?;
        self.0.call(method, path, body.as_ref()).await.map_err(Failed::from)
    }

    /// A POST of events serialised as they were written (see [`Fields`]).
    async fn publish(&self, path: &str, body: &impl serde::Serialize) -> Result<Value, Failed> {
        self.publish_raw(path, body).await.map_err(Failed::from)
    }

    /// [`Api::publish`], its error as the client's (the field it names).
    async fn publish_raw(&self, path: &str, body: &impl serde::Serialize) -> Result<Value, herald_client::Error> {
        let body = serde_json::to_vec(body).map_err(|e| herald_client::Error::Decode(e.to_string()))?;
        self.0.send(http::Method::POST, path, Some(body.into())).await
    }
}

impl From<herald_client::Error> for Failed {
    /// Its words carry the wait the server asked for and a publish's `ids` to send it again
    /// under, where the server named them.
    fn from(e: herald_client::Error) -> Failed {
        match e {
            _ if e.is_refusal() => Failed::Refused(e.to_string()),
            herald_client::Error::Api { status: 429, .. } => Failed::Throttled(e.to_string()),
            herald_client::Error::NotHerald { .. } => Failed::NotHerald(e.to_string()),
            _ => Failed::Unavailable(e.to_string()),
        }
    }
}

/// An event's fields, each kept as the JSON text it was written in: parsed into a
/// `serde_json::Value` and written out again, `data` reached the server with its keys
/// sorted, its whitespace gone and an integer past 2^64 rounded — not what a `raw_bytes`
/// receiver should get, nor what Herald keeps (its own form keeps keys in their order).
type Fields = std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>;

/// `text` as an event's [`Fields`]; `what` names where it came from when it is no object.
fn fields(text: &str, what: &str) -> anyhow::Result<Fields> {
    // A byte-order mark a Windows editor puts first is no JSON, and no part of the event.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str::<Fields>(text).map_err(|e| match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => anyhow!("{what} holds no JSON object"),
        Err(_) => anyhow::Error::from(e).context(format!("{what} is not JSON")),
    })
}

/// Sets `name` in `fields` to `value`.
fn set(fields: &mut Fields, name: &str, value: impl serde::Serialize) {
    let raw = serde_json::value::to_raw_value(&value).expect("a string or JSON text serialises");
    fields.insert(name.to_string(), raw);
}

/// Bytes of lines a batch holds at most: with its commas and brackets it stays within the
/// server's largest request body (a line alone may be larger: it goes as a batch of one).
const BATCH_BYTES: usize = herald::api::MAX_BODY_BYTES / 2;

/// Events, one JSON per line, sent a batch of up to 1,000 (and [`BATCH_BYTES`]) as they are
/// read (input of any length is held a batch at a time; one line alone goes as a single event).
/// A batch refused or lost says which lines were accepted before it and that nothing after it
/// was sent, since a script that sends the whole input again publishes those again
/// (deduplicated only by their ids) — and lists the events accepted, their ids generated ones
/// too, before saying it. The answer is a list (`{"items":[…]}`) however many lines there are.
///
/// Ctrl-C is how `tail -f … | herald events send --stdin` ends, and it killed the command with
/// the events accepted never listed: it stops reading, lets a batch being sent have its answer
/// (a second Ctrl-C does not wait), lists what was accepted and says from where nothing was sent.
async fn send_lines(api: &Api, mut lines: Incoming, tenant: Option<&str>) -> anyhow::Result<(Value, Shown)> {
    let (mut items, mut accepted) = (Vec::new(), 0usize);
    let mut first = true;
    // The last line of the last batch accepted, for what an interruption says.
    let mut sent_to = 0usize;
    let mut interrupt: Interrupt = Box::pin(tokio::signal::ctrl_c());
    let mut interrupted = false;
    // A batch past the tenant's fan-out quota goes again in halves, from here (its lines, their
    // events and sizes), and later batches no larger: a tenant whose events match many
    // subscriptions had every batch refused, the same input failing on every run.
    let mut again: std::collections::VecDeque<(usize, Fields, usize)> = std::collections::VecDeque::new();
    let mut most = herald::api::MAX_BATCH;
    loop {
        // Ctrl-C while a batch was sent: it had its answer, and nothing more goes (not even
        // the halves of a batch past the quota).
        if interrupted {
            return sent_then(items, interrupted_after(accepted, sent_to).into());
        }
        let mut batch = Vec::new();
        let mut numbers = Vec::new();
        let mut sizes = Vec::new();
        let mut bytes = 0;
        // When the batch's lines are sent at the latest: a pause is timed from its first line,
        // so that a steady trickle (a line every 150 ms) is not held for its 1,000th.
        let mut send_by = None;
        while batch.len() < most {
            if let Some((n, event, size)) = again.pop_front() {
                if !batch.is_empty() && bytes + size > BATCH_BYTES {
                    again.push_front((n, event, size));
                    break;
                }
                bytes += size;
                batch.push(event);
                numbers.push(n);
                sizes.push(size);
                continue;
            }
            // Large events close a batch early: 1,000 lines of 20 KB are past the largest body.
            // So does a pause in the input, once a batch has lines.
            let by = (!batch.is_empty()).then(|| *send_by.get_or_insert_with(|| tokio::time::Instant::now() + PAUSE));
            let peeked = tokio::select! {
                // Ctrl-C first: it comes with the end of input when it also stopped the writer
                // (`tail -f … |`), and that is an interruption, not the input's end.
                biased;
                _ = interrupt.as_mut() => {
                    return sent_then(items, interrupted_after(accepted, sent_to).into());
                }
                peeked = lines.peek(by) => peeked,
            };
            let next = match peeked {
                Peeked::End | Peeked::Quiet => break,
                Peeked::Line((_, Ok(l))) => l.len(),
                Peeked::Line((_, Err(_))) => 0,
            };
            if !batch.is_empty() && bytes + next > BATCH_BYTES {
                break;
            }
            bytes += next;
            let (n, line) = lines.next().expect("peeked");
            let event = line.map_err(anyhow::Error::from).and_then(|l| fields(&l, &format!("line {n}")));
            match event {
                Ok(mut event) => {
                    if let Some(t) = tenant {
                        if !event.contains_key("tenant") {
                            set(&mut event, "tenant", t);
                        }
                    }
                    batch.push(event)
                }
                // What went before it was sent: say so, as for a batch refused.
                Err(e) => {
                    let before = accepted_before(accepted, numbers.first().copied().unwrap_or(n));
                    let e = e.context(format!("line {n} was not sent; {before}; nothing after it was sent"));
                    return sent_then(items, e);
                }
            }
            numbers.push(n);
            sizes.push(next);
        }
        let (Some(&from), Some(&to)) = (numbers.first(), numbers.last()) else {
            if first {
                return Err(anyhow!("no events on stdin"));
            }
            return Ok((json!({ "items": items }), Shown::List(&["id", "deliveries"])));
        };
        // One line in all, not one in the first batch: a line closing the batch early (the
        // two past BATCH_BYTES) sent the first alone, and the rest were never sent.
        if std::mem::take(&mut first) && batch.len() == 1 && lines.ended() {
            let one = batch.pop().expect("one line");
            let Some(answer) = answer_of(api.publish("/v1/events", &one), &mut interrupt, &mut interrupted).await
            else {
                return Err(Failed::Interrupted(format!(
                    "interrupted while the event of line {from} was being sent: it may or may not have been \
                     accepted (an event with an id can be sent again safely)"
                ))
                .into());
            };
            // Its answer came; Ctrl-C meanwhile still reads as one (the input's end may be the
            // writer it stopped too), as after a batch: listed, then said, exit 130.
            let items = vec![answer?];
            if interrupted {
                return sent_then(items, interrupted_after(1, to).into());
            }
            return Ok((json!({ "items": items }), Shown::List(&["id", "deliveries"])));
        }
        let count = batch.len();
        let sending = api.publish_raw("/v1/events/batch", &batch);
        let Some(sent) = answer_of(sending, &mut interrupt, &mut interrupted).await else {
            let e = Failed::Interrupted(format!(
                "interrupted while the batch of lines {from}–{to} was being sent: it may or may not have been \
                 accepted; {}; nothing after it was sent (events with an id can be sent again safely)",
                accepted_before(accepted, from)
            ));
            return sent_then(items, e.into());
        };
        if let Err(herald_client::Error::Api { status: 413, code, .. }) = &sent {
            if code == "QUOTA_EXCEEDED" && count > 1 {
                most = count / 2;
                for line in numbers.into_iter().zip(batch).zip(sizes).rev() {
                    let ((n, event), size) = line;
                    again.push_front((n, event, size));
                }
                continue;
            }
        }
        let answer = sent.map_err(|e| {
            let before = accepted_before(accepted, from);
            let range = format!("the batch of lines {from}–{to}");
            // The item a refusal names (`[3].data`) by its line: blank lines are skipped.
            let item = match &e {
                herald_client::Error::Api { field: Some(f), .. } => f
                    .strip_prefix('[')
                    .and_then(|f| f.split_once(']'))
                    .and_then(|(i, _)| i.parse::<usize>().ok())
                    .and_then(|i| numbers.get(i).map(|n| format!(" (item [{i}] is line {n})"))),
                _ => None,
            };
            match Failed::from(e) {
                Failed::Refused(m) => Failed::Refused(format!(
                    "{range} was refused, none of it accepted{}: {m}; {before}; nothing after it was sent",
                    item.unwrap_or_default()
                )),
                Failed::Unavailable(m) => Failed::Unavailable(format!(
                    "{range} may or may not have been accepted: {m}; {before}; nothing after it was sent \
                     (events with an id can be sent again safely)"
                )),
                Failed::Throttled(m) => Failed::Throttled(format!(
                    "{range} was not accepted, the server asked to slow down: {m}; {before}; nothing after \
                     it was sent"
                )),
                Failed::NotHerald(m) => {
                    Failed::NotHerald(format!("{range} was not taken: {m}; {before}; nothing after it was sent"))
                }
                Failed::Interrupted(m) => Failed::Interrupted(m),
            }
        });
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return sent_then(items, e.into()),
        };
        accepted += count;
        sent_to = to;
        items.extend(answer["items"].as_array().cloned().unwrap_or_default());
    }
}

/// The events accepted before `e` (none: `e` alone), listed before it is said.
fn sent_then(items: Vec<Value>, e: anyhow::Error) -> anyhow::Result<(Value, Shown)> {
    if items.is_empty() {
        return Err(e);
    }
    Ok((json!({ "items": items }), Shown::ListThen(&["id", "deliveries"], e)))
}

/// Ctrl-C, as [`send_lines`] listens for it (once listened for, it no longer ends the process).
type Interrupt = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

/// `sending`'s answer. Ctrl-C meanwhile is noted in `interrupted` and waited through (the answer
/// says whether what was sent was taken); a second one gives up on it: `None`.
async fn answer_of<T>(
    sending: impl std::future::Future<Output = T>,
    interrupt: &mut Interrupt,
    interrupted: &mut bool,
) -> Option<T> {
    let mut sending = std::pin::pin!(sending);
    tokio::select! {
        sent = &mut sending => return Some(sent),
        _ = interrupt.as_mut() => {}
    }
    *interrupted = true;
    *interrupt = Box::pin(tokio::signal::ctrl_c());
    tokio::select! {
        sent = &mut sending => Some(sent),
        _ = interrupt.as_mut() => None,
    }
}

/// What [`send_lines`] says when Ctrl-C stopped it, `accepted` events (up to line `to`) taken.
fn interrupted_after(accepted: usize, to: usize) -> Failed {
    Failed::Interrupted(match accepted {
        0 => "interrupted before any event was sent".to_string(),
        n => format!("interrupted; the {n} events up to line {to} were accepted; nothing after line {to} was sent"),
    })
}

/// What [`send_lines`] says was accepted before the lines from `line` on.
fn accepted_before(accepted: usize, line: usize) -> String {
    match accepted {
        0 => "no event was accepted before it".to_string(),
        n => format!("the {n} events before line {line} were accepted"),
    }
}

/// The text of `path` (`-`: stdin).
/// The most input a command reads as one request or one line: the largest request body
/// Herald takes. Read past it, a line without end (or a large file named by mistake) was
/// held in memory whole, however long, only to be refused by the server.
const MOST_INPUT: usize = herald::api::MAX_BODY_BYTES;

/// Told when input is past [`MOST_INPUT`].
fn past_most_input() -> String {
    format!("is over {} MiB, the largest request Herald takes", MOST_INPUT >> 20)
}

/// How long input may pause before the lines read are sent: a batch waited for its 1,000th
/// line or the end of input, and `tail -f events.jsonl | herald events send --stdin` held
/// every event it read.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Numbered lines of stdin (blank ones skipped), read on a thread of their own so that
/// [`send_lines`] can tell a pause in them; one is read ahead at most.
struct Incoming {
    rx: tokio::sync::mpsc::Receiver<(usize, std::io::Result<String>)>,
    held: Option<(usize, std::io::Result<String>)>,
    ended: bool,
}

/// What [`Incoming::peek`] found.
enum Peeked<'a> {
    /// The next line, left to [`Incoming::next`].
    Line(&'a (usize, std::io::Result<String>)),
    /// None for [`PAUSE`].
    Quiet,
    /// The end of input.
    End,
}

impl Incoming {
    fn stdin() -> Incoming {
        // One line read ahead (up to 16 MiB), as the batch loop looks one ahead.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::spawn(move || {
            let lines = bounded_lines(std::io::stdin().lock()).enumerate().filter_map(|(n, line)| match line {
                Ok(l) if l.trim().is_empty() => None,
                other => Some((n + 1, other)),
            });
            for line in lines {
                let failed = line.1.is_err();
                if tx.blocking_send(line).is_err() || failed {
                    break;
                }
            }
        });
        Incoming { rx, held: None, ended: false }
    }

    /// The next line, waiting for it until `by` at most.
    async fn peek(&mut self, by: Option<tokio::time::Instant>) -> Peeked<'_> {
        if self.held.is_none() && !self.ended {
            let next = if let Some(by) = by {
                match tokio::time::timeout_at(by, self.rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => return Peeked::Quiet,
                }
            } else {
                self.rx.recv().await
            };
            match next {
                Some(line) => self.held = Some(line),
                None => self.ended = true,
            }
        }
        match &self.held {
            Some(line) => Peeked::Line(line),
            None => Peeked::End,
        }
    }

    /// The line [`Incoming::peek`] found.
    fn next(&mut self) -> Option<(usize, std::io::Result<String>)> {
        self.held.take()
    }

    /// Whether the input is known to have ended, with no line held.
    fn ended(&self) -> bool {
        self.ended && self.held.is_none()
    }
}

/// The lines of `input` (without their `\n` or `\r\n`), each read only up to
/// [`MOST_INPUT`]: one longer is an error, the rest of it unread.
fn bounded_lines(mut input: impl BufRead) -> impl Iterator<Item = std::io::Result<String>> {
    std::iter::from_fn(move || {
        let mut line = Vec::new();
        match (&mut input).take(MOST_INPUT as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) if line.len() > MOST_INPUT && !line.ends_with(b"\n") => {
                Some(Err(std::io::Error::other(format!("the line {}", past_most_input()))))
            }
            Ok(_) => {
                if line.ends_with(b"\n") {
                    line.pop();
                    if line.ends_with(b"\r") {
                        line.pop();
                    }
                }
                Some(String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
            }
            Err(e) => Some(Err(e)),
        }
    })
}

fn read_text(path: &PathBuf) -> anyhow::Result<String> {
    let input: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?)
    };
    let mut text = String::new();
    input
        .take(MOST_INPUT as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() > MOST_INPUT {
        let name = if path.as_os_str() == "-" { "stdin".into() } else { path.display().to_string() };
        bail!("{name} {}", past_most_input());
    }
    Ok(text)
}

fn read_json(path: &PathBuf) -> anyhow::Result<Value> {
    serde_json::from_str(&read_text(path)?).with_context(|| format!("{} is not JSON", path.display()))
}

/// A table of `items` with these columns (a column is a JSON pointer or a top-level key).
fn table(items: &[Value], columns: &[&str]) -> String {
    let cell = |item: &Value, col: &str| -> String {
        let v = if col.starts_with('/') { item.pointer(col) } else { item.get(col) };
        printable(match v {
            None | Some(Value::Null) => "-".into(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.is_empty() => "-".into(),
            // Lists of strings, or of objects named by their ids (a tenant's keys).
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().or_else(|| x["id"].as_str()).map_or_else(|| x.to_string(), String::from))
                .collect::<Vec<_>>()
                .join(","),
            Some(other) => other.to_string(),
        })
    };
    let header: Vec<String> =
        columns.iter().map(|c| c.trim_start_matches('/').replace('/', ".").to_uppercase()).collect();
    let rows: Vec<Vec<String>> = items.iter().map(|i| columns.iter().map(|c| cell(i, c)).collect()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &[String]| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let mut out = vec![line(&header)];
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

/// `text` with its control characters escaped (`\u{1b}`): names and errors come from tenants
/// and brokers, and a terminal runs the escape sequences it is sent (clearing the screen,
/// faking rows, writing the clipboard).
fn printable(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// One object as `key: value` lines.
fn facts(v: &Value) -> String {
    match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| format!("{k}: {}", printable(v.as_str().map_or_else(|| v.to_string(), String::from))))
            .collect::<Vec<_>>()
            .join("\n"),
        None => v.to_string(),
    }
}

enum Shown {
    List(&'static [&'static str]),
    One,
    Done(&'static str),
    /// Shown as `One`, then a failure (exit code 1) when the answer, a 200, says the thing
    /// asked for did not happen: what it says then.
    Outcome(fn(&Value) -> Option<String>),
    /// Shown as `List` — what was done before it failed — then this error, with its exit code.
    ListThen(&'static [&'static str], anyhow::Error),
}

/// A test delivery's answer: a failure unless it was delivered.
fn undelivered(answer: &Value) -> Option<String> {
    (answer["delivered"] != true).then(|| format!("the test delivery failed: {}", answer["outcome"]))
}

/// A replay's answer: a failure when entries were skipped.
fn skipped(answer: &Value) -> Option<String> {
    let skipped = answer["skipped"].as_array().map_or(0, Vec::len);
    (skipped > 0).then(|| format!("{skipped} dead letters were not replayed"))
}

/// Runs a client command; the error's [`Failed::code`] is the exit code.
pub async fn run(command: Client) -> anyhow::Result<()> {
    let conn = command.conn().clone();
    let api = Api::new(&conn)?;
    let (answer, shown) = match command {
        Client::Tenants { cmd, .. } => match cmd {
            Tenants::List { name, paging } => (
                api.call(
                    "GET",
                    &format!(
                        "/v1/tenants{}",
                        query(&[("name", name), ("cursor", paging.cursor), ("limit", Some("500".into()))])
                    ),
                    None,
                )
                .await?,
                Shown::List(&["id", "name", "created_at", "keys"]),
            ),
            Tenants::Create { name } => {
                (api.call("POST", "/v1/tenants", Some(json!({ "name": name }))).await?, Shown::One)
            }
            Tenants::Portal { id, ttl } => {
                let body = ttl.map_or_else(|| json!({}), |t| json!({ "ttl": t }));
                (api.call("POST", &format!("/v1/tenants/{}/portal", seg(&id)), Some(body)).await?, Shown::One)
            }
        },
        Client::Keys { cmd, .. } => match cmd {
            Keys::Issue { tenant } => {
                (api.call("POST", &format!("/v1/tenants/{}/keys", seg(&tenant)), Some(json!({}))).await?, Shown::One)
            }
            Keys::Revoke { tenant, key_id } => (
                api.call("DELETE", &format!("/v1/tenants/{}/keys/{}", seg(&tenant), seg(&key_id)), None).await?,
                Shown::Done("revoked"),
            ),
        },
        Client::Subscriptions { cmd, .. } => match cmd {
            Subscriptions::List { tenant, transport, enabled, breaker, paging } => (
                api.call(
                    "GET",
                    &format!(
                        "/v1/subscriptions{}",
                        query(&[
                            ("tenant", tenant),
                            ("transport", transport),
                            ("enabled", enabled),
                            ("breaker", breaker),
                            ("cursor", paging.cursor),
                            ("limit", Some("500".into())),
                        ])
                    ),
                    None,
                )
                .await?,
                Shown::List(&["id", "tenant", "url", "events", "enabled", "/health/breaker"]),
            ),
            Subscriptions::Get { id } => {
                (api.call("GET", &format!("/v1/subscriptions/{}", seg(&id)), None).await?, Shown::One)
            }
            Subscriptions::Create { url, events, tenant, file } => {
                let mut body = match &file {
                    Some(f) => read_json(f)?,
                    None => json!({}),
                };
                if !body.is_object() {
                    bail!(
                        "--file {} holds no JSON object",
                        file.as_ref().map_or_else(String::new, |f| f.display().to_string())
                    );
                }
                if let Some(u) = url {
                    body["url"] = u.into();
                }
                if !events.is_empty() {
                    body["events"] = events.into();
                }
                if let Some(t) = tenant {
                    body["tenant"] = t.into();
                }
                (api.call("POST", "/v1/subscriptions", Some(body)).await?, Shown::One)
            }
            Subscriptions::Patch { id, file, set } => {
                let body = match (file, set) {
                    (Some(f), _) => read_json(&f)?,
                    (None, Some(s)) => serde_json::from_str(&s).context("--set is not JSON")?,
                    (None, None) => return Err(anyhow!("give the patch with --file or --set")),
                };
                (api.call("PATCH", &format!("/v1/subscriptions/{}", seg(&id)), Some(body)).await?, Shown::One)
            }
            Subscriptions::Delete { id } => {
                (api.call("DELETE", &format!("/v1/subscriptions/{}", seg(&id)), None).await?, Shown::Done("deleted"))
            }
            Subscriptions::Rotate { id } => (
                api.call("POST", &format!("/v1/subscriptions/{}/rotate-secret", seg(&id)), Some(json!({}))).await?,
                Shown::One,
            ),
            Subscriptions::Test { id } => {
                let path = format!("/v1/subscriptions/{}/test", seg(&id));
                (api.call("POST", &path, Some(json!({}))).await?, Shown::Outcome(undelivered))
            }
        },
        Client::Events { cmd, .. } => match cmd {
            Events::Send { event_type, data, id, tenant, file, stdin } => {
                if stdin {
                    send_lines(&api, Incoming::stdin(), tenant.as_deref()).await?
                } else {
                    let mut event = match &file {
                        Some(f) => fields(&read_text(f)?, &format!("--file {}", f.display()))?,
                        None => Fields::new(),
                    };
                    if let Some(t) = event_type {
                        set(&mut event, "type", t);
                    }
                    if let Some(d) = data {
                        let d = serde_json::value::RawValue::from_string(d).context("--data is not JSON")?;
                        event.insert("data".into(), d);
                    }
                    if let Some(i) = id {
                        set(&mut event, "id", i);
                    }
                    if let Some(t) = tenant {
                        set(&mut event, "tenant", t);
                    }
                    (api.publish("/v1/events", &event).await?, Shown::One)
                }
            }
            Events::Get { id, tenant } => (
                api.call("GET", &format!("/v1/events/{}{}", seg(&id), query(&[("tenant", tenant)])), None).await?,
                Shown::One,
            ),
            Events::List { event_type, tenant, limit, paging } => (
                api.call(
                    "GET",
                    &format!(
                        "/v1/events{}",
                        query(&[
                            ("type", event_type),
                            ("tenant", tenant),
                            ("limit", Some(limit.to_string())),
                            ("cursor", paging.cursor),
                        ])
                    ),
                    None,
                )
                .await?,
                Shown::List(&["id", "type", "tenant", "accepted_at"]),
            ),
        },
        Client::Attempts { event, subscription, outcome, tenant, limit, paging, .. } => {
            let q = query(&[
                ("event", event),
                ("subscription", subscription),
                ("outcome", outcome),
                ("tenant", tenant),
                ("limit", Some(limit.to_string())),
                ("cursor", paging.cursor),
            ]);
            (
                api.call("GET", &format!("/v1/attempts{q}"), None).await?,
                Shown::List(&[
                    "at",
                    "event_id",
                    "subscription",
                    "attempt",
                    "outcome",
                    "status",
                    "duration_ms",
                    "error",
                ]),
            )
        }
        Client::Dlq { cmd, .. } => match cmd {
            Dlq::List { subscription, tenant, paging } => (
                api.call(
                    "GET",
                    &format!(
                        "/v1/dlq{}",
                        query(&[
                            ("subscription", subscription),
                            ("tenant", tenant),
                            ("cursor", paging.cursor),
                            ("limit", Some("500".into())),
                        ])
                    ),
                    None,
                )
                .await?,
                Shown::List(&["id", "event_id", "subscription", "attempts", "last_status", "last_error"]),
            ),
            Dlq::Replay { ids, subscription } => {
                let body = match (ids.is_empty(), subscription) {
                    (true, s) => json!({ "subscription": s }),
                    (false, None) => json!({ "ids": ids }),
                    (false, Some(s)) => json!({ "ids": ids, "subscription": s }),
                };
                (api.call("POST", "/v1/dlq/replay", Some(body)).await?, Shown::Outcome(skipped))
            }
        },
        Client::EdgeDevices { cmd, .. } => match cmd {
            EdgeDevices::List => (
                api.call("GET", "/v1/edge-devices", None).await?,
                Shown::List(&["id", "tenant", "name", "connected", "created_at"]),
            ),
            EdgeDevices::Create { name, tenant } => (
                api.call("POST", "/v1/edge-devices", Some(json!({ "name": name, "tenant": tenant }))).await?,
                Shown::One,
            ),
            EdgeDevices::Delete { id } => {
                (api.call("DELETE", &format!("/v1/edge-devices/{}", seg(&id)), None).await?, Shown::Done("deleted"))
            }
        },
        Client::EventTypes { cmd, .. } => {
            let path = |name: &str| format!("/v1/event-types/{}", seg(name));
            match cmd {
                EventTypes::List => (
                    api.call("GET", "/v1/event-types", None).await?,
                    Shown::List(&["name", "description", "validate", "deprecated", "updated_at"]),
                ),
                EventTypes::Get { name } => (api.call("GET", &path(&name), None).await?, Shown::One),
                EventTypes::Create { file } => {
                    (api.call("POST", "/v1/event-types", Some(read_json(&file)?)).await?, Shown::One)
                }
                EventTypes::Patch { name, set } => {
                    let patch = serde_json::from_str(&set).context("--set is not JSON")?;
                    (api.call("PATCH", &path(&name), Some(patch)).await?, Shown::One)
                }
                EventTypes::Delete { name } => (api.call("DELETE", &path(&name), None).await?, Shown::Done("deleted")),
            }
        }
    };
    if conn.json {
        print(&serde_json::to_string_pretty(&answer)?);
    } else {
        match &shown {
            Shown::List(columns) | Shown::ListThen(columns, _) => {
                let items = answer["items"].as_array().cloned().unwrap_or_default();
                print(&table(&items, columns));
                if let Some(next) = answer["next"].as_str() {
                    eprintln!("(more: the next page is the same command with --cursor '{next}')");
                }
            }
            Shown::One | Shown::Outcome(_) => print(&facts(&answer)),
            Shown::Done(what) => print(what),
        }
    }
    match shown {
        Shown::Outcome(failure) => match failure(&answer) {
            Some(said) => Err(Failed::Refused(said).into()),
            None => Ok(()),
        },
        Shown::ListThen(_, e) => Err(e),
        _ => Ok(()),
    }
}

/// Prints `text` and a newline. Output piped into a reader that has gone (`| head -1`) ends
/// the command quietly, exit 0 — the request was made; `println!` panicked (exit 101). Only
/// stdout: the API's connection keeps its own handling (a broken upload is an error, said).
fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("herald: writing the answer: {e}");
            std::process::exit(2);
        }
    }
}

/// An id or name as one path segment: `a b` or `sub#x` must reach the server as written (a
/// `#` cut the path short; a space made no request at all), not something else.
fn seg(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}
