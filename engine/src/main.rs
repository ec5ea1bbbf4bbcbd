//! The `herald` command: the server (`serve`), the edge agent (`edge`), and the admin CLI
//! (`tenants`, `subscriptions`, `events`, … — see `cli`).

mod cli;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use herald::config::{Config, LogFormat};
use herald::server::{self, TokenSource};
use std::net::SocketAddr;
use std::path::PathBuf;

/// mimalloc: the dispatcher allocates and frees small buffers on every worker thread, a
/// pattern where glibc malloc spent a sixth of the CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "herald", version, about = "Webhook and event-notification delivery engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, the log and the dispatcher (embedded log by default).
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (default ./herald-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run an edge agent: hold a connection to Herald and make the deliveries of the
    /// subscriptions that name this device, from inside this network.
    Edge {
        /// Herald's base URL, e.g. https://herald.example.com.
        #[arg(long)]
        server: String,
        /// The device token (`he.…`), shown once when the device was created.
        #[arg(long, env = "HERALD_EDGE_TOKEN", hide_env_values = true)]
        token: String,
        /// Deliveries this agent takes at once.
        #[arg(long, default_value_t = 64)]
        window: u32,
        /// Networks targets may be in (CIDR list); every network by default.
        #[arg(long, value_delimiter = ',', default_value = "0.0.0.0/0,::/0")]
        allow: Vec<ipnet::IpNet>,
        /// Request timeout where a subscription sets none.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Where subscriptions' `tls.*_file` names are read (the server's `http.tls_files_dir`,
        /// with the same files).
        #[arg(long, env = "HERALD_EDGE_TLS_FILES_DIR")]
        tls_files_dir: Option<std::path::PathBuf>,
    },
    #[command(flatten)]
    Client(cli::Client),
    /// Print shell completions for this command.
    Completions {
        /// bash, zsh, fish, powershell or elvish.
        shell: clap_complete::Shell,
    },
}

/// Log lines to stderr (filtered by `RUST_LOG` or `logging.level`) and, when configured,
/// Herald's spans to an OTLP collector (a layer with its own filter: the log level does not
/// decide which spans are exported). Returns what flushes the spans at exit.
fn init_tracing(config: &Config) -> anyhow::Result<Option<herald::telemetry::Telemetry>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // Set but empty (an env file's `RUST_LOG=`) is as if unset, and one the filter cannot read
    // or with a level misspelt is refused: either turned off nearly every line (the filter
    // takes "warning" for a target's name), the warnings Herald gives at start with them. A
    // bare target (`RUST_LOG=herald`) stays what it is, everything of that target.
    let level = match std::env::var("RUST_LOG").ok().filter(|l| !l.trim().is_empty()) {
        Some(l) => {
            herald::config::rust_log(&l).map_err(|problem| anyhow::anyhow!("RUST_LOG: {problem}"))?;
            l
        }
        None => config.logging.level.clone(),
    };
    let filter = tracing_subscriber::EnvFilter::new(herald::telemetry::log_filter(&level));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match config.logging.format {
        LogFormat::Json => lines.json().boxed(),
        LogFormat::Human => lines.boxed(),
    };
    let spans = herald::telemetry::start(&config.tracing, |k| std::env::var(k).ok())?;
    let (spans, telemetry) = spans.map_or((None, None), |(layer, t)| (Some(layer), Some(t)));
    tracing_subscriber::registry().with(lines.with_filter(filter)).with(spans).init();
    Ok(telemetry)
}

/// SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed), each asking for a drain (SIGHUP
/// killed the process on the spot, its consumers' offsets not saved, so what was in flight was
/// sent again). Listened for from the start: one arriving while an earlier one is handled is
/// kept, not lost. SIGHUP is left alone when it was ignored at start (`nohup`, or a supervisor
/// saying so): a handler over it stopped `nohup herald serve &` when its terminal closed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let on = |kind: SignalKind| signal(kind).expect("signal handler");
        let hup = (!hangup_ignored()).then(|| on(SignalKind::hangup()));
        StopSignals { term: on(SignalKind::terminate()), int: on(SignalKind::interrupt()), hup }
    }

    /// The next of them.
    async fn next(&mut self) {
        let hup = async {
            match &mut self.hup {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = hup => {}
        }
    }
}

/// Whether SIGHUP is ignored (as inherited: nothing in Herald sets it).
fn hangup_ignored() -> bool {
    // SAFETY: zeroed is a valid `sigaction` (no handler, empty mask); with no new action given,
    // `sigaction` only writes the current one into it.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    let read = unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut current) };
    read == 0 && current.sa_sigaction == libc::SIG_IGN
}

/// The allocator's two settings that are Herald's own choice (README, "Configuration").
fn tune_allocator() {
    return_freed_memory_sooner();
    turn_off_huge_pages();
}

/// mimalloc 3 keeps freed memory for a second before handing it back to the system (its
/// `purge_delay` is 1,000 ms; mimalloc 2's was 10 ms). Herald frees in bursts — the history
/// index's memtables once flushed, the buffers of a draining backlog — and that second held
/// 100 MiB and more: RSS high-water while a backlog of 1 M records drained with history on was
/// 394 and 402 MiB at the default, 308 and 310 MiB at 10 ms, at the same drain rate (builds
/// alternated; see BENCHMARKS.md, "Backlog"). An operator's own `MIMALLOC_PURGE_DELAY` still
/// decides.
fn return_freed_memory_sooner() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: the C signature below is mimalloc's; it sets one integer that mimalloc
        // reads on each purge.
        unsafe { mi_option_set(MI_PURGE_DELAY, 10) };
    }
}

/// mimalloc 3 also asks the kernel for transparent huge pages on its arenas (`MADV_HUGEPAGE`,
/// its `allow_thp` option, on by default), and a 2 MiB page stays resident whole while any part
/// of it is in use. At the end of a 1 M drain (history on) 100 MiB of Herald's 243 MiB resident
/// were huge pages (`AnonHugePages`); without them the high-water mark fell from 269–389 to
/// 183–193 MiB, with no cost in drain rate or CPU beyond this machine's noise (BENCHMARKS.md,
/// "Backlog"). mimalloc reads its option before `main`, so Herald turns huge pages off for its
/// process itself (`PR_SET_THP_DISABLE`, which holds for the whole process and what it
/// starts); an operator's own `MIMALLOC_ALLOW_THP` still decides.
fn turn_off_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Only a kernel without the flag (before 3.15) refuses; huge pages then stay as they were.
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

// mimalloc's own functions, linked in by the `mimalloc` crate (whose bindings for them need a
// crate this build does not have).
extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the version Cargo.lock pins; a test
/// checks that the number still names that option).
const MI_PURGE_DELAY: std::ffi::c_int = 15;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Client(command) => match cli::run(command).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Exit codes a script can rely on: 1 refused, 3 unavailable, 2 anything else
                // the caller got wrong (usage, files, token).
                eprintln!("herald: {e:#}");
                let code = e.downcast_ref::<cli::Failed>().map_or(2, cli::Failed::code);
                std::process::exit(code);
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "herald", &mut std::io::stdout());
            Ok(())
        }
        Command::Serve { config, listen, data_dir } => {
            // Everything Herald writes (the log, the history index, the token) is its user's
            // alone, whatever the umask it was started with.
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            let env: Vec<(String, String)> = std::env::vars().collect();
            let mut config = Config::load(config.as_deref(), &env)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            let telemetry = init_tracing(&config)?;
            let herald = server::start(config.clone()).await.context("starting herald")?;
            if herald.token_source == TokenSource::Generated {
                println!(
                    "Generated admin token (stored in {}): {}",
                    config.data_dir.join("admin-token").display(),
                    herald.admin_token
                );
            }
            let mut signals = StopSignals::new();
            println!("herald listening on http://{}", herald.addr);
            signals.next().await;
            tracing::info!("shutting down");
            // A second signal during the drain ends the process at once (the first waited out
            // its drain however many followed): nothing acknowledged is lost, as after a
            // SIGKILL; deliveries in flight are sent again.
            tokio::spawn(async move {
                signals.next().await;
                tracing::warn!("shutting down at once: a second signal during the drain");
                std::process::exit(130);
            });
            herald.stop().await;
            if let Some(t) = telemetry {
                // Blocks until the last spans are exported: off the runtime's worker threads.
                tokio::task::spawn_blocking(move || t.shutdown()).await?;
            }
            Ok(())
        }
        Command::Edge { server, token, window, allow, timeout, tls_files_dir } => {
            let _spans = init_tracing(&Config::default())?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let config =
                herald::agent::AgentConfig { server, token, window, allow, default_timeout: timeout, tls_files_dir };
            let mut agent = tokio::spawn(herald::agent::run(config, stopped));
            let mut signals = StopSignals::new();
            let ended = tokio::select! {
                _ = signals.next() => {
                    stop.send_replace(true);
                    (&mut agent).await?
                }
                ended = &mut agent => ended?,
            };
            // What the agent stops for is how it was started (a flag, the token): exit 2,
            // as the CLI's usage errors.
            if let Err(e) = ended {
                eprintln!("herald edge: {e}");
                std::process::exit(2);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_goes_back_to_the_system_after_10_ms_unless_the_operator_says_otherwise() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the operator's value stands, whatever it is
        }
        // SAFETY: mimalloc's signature; reads one integer option.
        let get = || unsafe { mi_option_get(MI_PURGE_DELAY) };
        // mimalloc 3's default for `purge_delay`, which no other option has: the number still
        // names that option.
        assert_eq!(get(), 1000);
        return_freed_memory_sooner();
        assert_eq!(get(), 10);
    }

    #[test]
    fn transparent_huge_pages_are_off_unless_the_operator_says_otherwise() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return; // the operator's value stands, whatever it is
        }
        turn_off_huge_pages();
        assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap());
    }
}
