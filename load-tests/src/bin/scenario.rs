//! `herald-scenario`: runs load scenarios against a `herald serve` child process with a
//! verifying sink, measures this machine's HTTP baseline in the same run, prints a table and
//! writes `report.json` and `report.html`.

use clap::Parser;
use herald_load_tests::report::{html, stages_table, table};
use herald_load_tests::scenario::{self, Options, Scenario};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Run Herald load scenarios and report throughput, latency, loss and duplicates")]
struct Args {
    /// Scenarios to run (steady, burst, slow, failing, outage, sigkill), or all.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    scenario: Vec<String>,
    /// Seconds-long forms (what CI runs).
    #[arg(long)]
    short: bool,
    /// The herald binary; by default the one next to this program.
    #[arg(long)]
    herald: Option<PathBuf>,
    /// Run Herald on Kafka at these brokers instead of its embedded log.
    #[arg(long)]
    kafka: Option<String>,
    /// Events per second instead of each scenario's own rate.
    #[arg(long)]
    rate: Option<u64>,
    /// Events per publish request (1 = one event per request); by default a twentieth of a
    /// second's events, at most 100.
    #[arg(long)]
    batch: Option<u64>,
    /// Publish requests in flight at once.
    #[arg(long)]
    concurrency: Option<u64>,
    /// Where the reports go.
    #[arg(long, default_value = "load-test-report")]
    out: PathBuf,
    /// Seconds of HTTP baseline (0 to skip).
    #[arg(long, default_value_t = 5.0)]
    baseline: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenarios: Vec<Scenario> = if args.scenario.iter().any(|s| s == "all") {
        Scenario::ALL.to_vec()
    } else {
        args.scenario
            .iter()
            .map(|s| Scenario::parse(s).ok_or_else(|| anyhow::anyhow!("unknown scenario {s:?}")))
            .collect::<Result<_, _>>()?
    };
    let herald = match args.herald {
        Some(h) => h,
        None => std::env::current_exe()?.with_file_name("herald"),
    };
    anyhow::ensure!(herald.exists(), "no herald binary at {} (build it, or pass --herald)", herald.display());
    let opts = Options {
        herald,
        short: args.short,
        kafka: args.kafka,
        rate: args.rate,
        batch: args.batch,
        concurrency: args.concurrency,
        progress: true,
    };
    let baseline = if args.baseline > 0.0 {
        let b = scenario::baseline(args.baseline).await?;
        eprintln!("baseline: {b:.0} requests/s straight into the sink over loopback HTTP");
        Some(b)
    } else {
        None
    };
    let mut reports = Vec::new();
    for s in scenarios {
        eprintln!("running {} ...", s.name());
        let r = scenario::run(s, &opts, baseline).await?;
        eprint!("{}", table(std::slice::from_ref(&r)));
        eprint!("{}", stages_table(std::slice::from_ref(&r)));
        reports.push(r);
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("report.json"), serde_json::to_vec_pretty(&reports)?)?;
    std::fs::write(args.out.join("report.html"), html(&reports))?;
    println!("{}", table(&reports));
    println!("reports: {0}/report.json, {0}/report.html", args.out.display());
    let failed: Vec<_> =
        reports.iter().filter(|r| r.lost > 0 || r.bad_signatures > 0).map(|r| r.scenario.clone()).collect();
    anyhow::ensure!(failed.is_empty(), "deliveries lost or badly signed in: {}", failed.join(", "));
    Ok(())
}
