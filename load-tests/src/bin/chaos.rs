//! `herald-chaos`: the fault-injection suite. Publishes a steady stream while SIGKILLing Herald
//! at random moments (on Kafka, one of two processes), taking receivers down and up, with small
//! segments; then proves every acknowledged event reached every subscription. Exits non-zero
//! on any loss or bad signature.

use clap::Parser;
use herald_load_tests::chaos::{self, Chaos};
use herald_load_tests::scenario::Options;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Kill Herald and its receivers at random while publishing; prove nothing acknowledged is lost")]
struct Args {
    /// Seconds of faults.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Events per second meanwhile.
    #[arg(long, default_value_t = 400)]
    rate: u64,
    /// A fault every MIN..MAX milliseconds.
    #[arg(long, default_value = "1000", value_delimiter = ',')]
    every_ms: Vec<u64>,
    /// Segment size of the embedded log.
    #[arg(long, default_value_t = 64 * 1024)]
    segment_bytes: u64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The herald binary; by default the one next to this program.
    #[arg(long)]
    herald: Option<PathBuf>,
    /// Run two Herald processes on Kafka at these brokers instead of one on its embedded log.
    #[arg(long)]
    kafka: Option<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let herald = args.herald.unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("herald"));
    let opts = Options {
        herald,
        short: false,
        kafka: args.kafka,
        rate: None,
        batch: None,
        concurrency: None,
        progress: false,
    };
    let every = match args.every_ms[..] {
        [one] => (one / 2, one * 3 / 2),
        [min, max, ..] => (min, max),
        [] => (500, 1500),
    };
    let chaos = Chaos {
        duration: Duration::from_secs(args.seconds),
        rate: args.rate,
        every_ms: every,
        segment_bytes: args.segment_bytes,
        seed: args.seed,
    };
    let report = chaos::run(&opts, &chaos).await?;
    println!("{}", chaos::summary(&report));
    if let Some(out) = args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)?;
    }
    anyhow::ensure!(report.lost == 0 && report.bad_signatures == 0, "deliveries were lost or badly signed");
    Ok(())
}
