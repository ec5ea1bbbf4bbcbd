//! A scenario's result: a JSON report, a table row, and an HTML page with charts of
//! throughput and latency over time (inline SVG, no scripts).

use serde::Serialize;
use std::fmt::Write as _;

/// One point of the timeline, per second since the run started.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since start.
    pub t: u64,
    /// Events accepted in that second.
    pub accepted: u64,
    /// First arrivals at the sink in that second.
    pub delivered: u64,
    /// End-to-end latency of those arrivals, p50 and p99, ms.
    pub p50_ms: u32,
    /// See `p50_ms`.
    pub p99_ms: u32,
}

/// Everything a scenario run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// What it does.
    pub description: String,
    /// Log backend.
    pub backend: String,
    /// Subscriptions the events fan out to.
    pub subscriptions: u64,
    /// Events accepted by Herald.
    pub events_accepted: u64,
    /// Accepted events per second while publishing.
    pub events_per_second: f64,
    /// Deliveries that must arrive: accepted events × subscriptions.
    pub deliveries_expected: u64,
    /// Distinct deliveries that arrived.
    pub deliveries: u64,
    /// Distinct deliveries per second, first to last arrival.
    pub deliveries_per_second: f64,
    /// End-to-end latency (event built by the generator → first arrival), ms.
    pub latency_ms: Percentiles,
    /// Expected deliveries that never arrived (must be 0).
    pub lost: u64,
    /// Arrivals beyond the first.
    pub duplicates: u64,
    /// Signatures that did not verify (must be 0).
    pub bad_signatures: u64,
    /// Requests the sink failed on purpose.
    pub failures_sent: u64,
    /// Batches the generator had to send again.
    pub retried_batches: u64,
    /// The machine's HTTP baseline measured in the same run: requests/s straight into the sink.
    pub baseline_requests_per_second: Option<f64>,
    /// Deliveries/s as a fraction of the baseline.
    pub ratio_to_baseline: Option<f64>,
    /// Peak resident memory of Herald, MiB.
    pub herald_peak_rss_mib: Option<f64>,
    /// When deliveries are missing: what Herald itself said of them at the end (its lag,
    /// breakers, dead letters, and the last warnings it logged), to tell slow from lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
    /// Where the milliseconds went: the generator's publish round trips and the stages Herald
    /// times itself.
    pub stages: Vec<crate::stages::Stage>,
    /// Per-second timeline.
    pub timeline: Vec<Second>,
}

/// Latency percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Worst.
    pub max: u32,
}

impl Percentiles {
    /// From sorted samples.
    pub fn of(sorted: &[u32]) -> Percentiles {
        use crate::sink::percentile;
        Percentiles {
            p50: percentile(sorted, 0.5),
            p90: percentile(sorted, 0.9),
            p99: percentile(sorted, 0.99),
            max: sorted.last().copied().unwrap_or(0),
        }
    }
}

/// The table printed after a run, one row per report.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>12} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7}",
        "scenario", "events/s", "deliveries/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "lost", "dups", "ratio"
    );
    for r in reports {
        let ratio = r.ratio_to_baseline.map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            out,
            "{:<10} {:>10.0} {:>12.0} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7}",
            r.scenario,
            r.events_per_second,
            r.deliveries_per_second,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.lost,
            r.duplicates,
            ratio
        );
    }
    out
}

/// The stages of each report (where an event's milliseconds go).
pub fn stages_table(reports: &[Report]) -> String {
    let mut out = String::new();
    for r in reports.iter().filter(|r| !r.stages.is_empty()) {
        let _ = writeln!(
            out,
            "{}: where the time goes{:>w$}{:>9}{:>9}",
            r.scenario,
            "samples",
            "p50 ms",
            "p99 ms",
            w = 62 - r.scenario.len()
        );
        let sink = [(
            "end to end: event built → first byte at the sink",
            r.deliveries,
            f64::from(r.latency_ms.p50),
            f64::from(r.latency_ms.p99),
        )];
        let rows = r.stages.iter().map(|s| (s.stage.as_str(), s.samples, s.p50_ms, s.p99_ms)).chain(sink);
        for (stage, samples, p50, p99) in rows {
            let _ = writeln!(out, "  {stage:<60}{samples:>10}{p50:>9.2}{p99:>9.2}");
        }
    }
    out
}

/// An SVG line chart of `series` (name, colour, values per second).
fn chart(title: &str, unit: &str, series: &[(&str, &str, Vec<f64>)]) -> String {
    let (w, h, pad) = (720.0, 240.0, 48.0);
    let len = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let top = series.iter().flat_map(|s| s.2.iter().copied()).fold(1.0_f64, f64::max) * 1.1;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (len - 1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / top;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<text x="{pad}" y="18" font-size="13">{title}</text>
<line x1="{pad}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#999"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{y0}" stroke="#999"/>
<text x="4" y="{pad}">{top:.0}</text><text x="4" y="{y0}">0 {unit}</text><text x="{x1}" y="{yl}" text-anchor="end">{secs} s</text>
"##,
        y0 = h - pad,
        x1 = w - pad,
        yl = h - pad + 16.0,
        secs = len - 1,
    );
    for (k, (name, colour, values)) in series.iter().enumerate() {
        let points: Vec<String> = values.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v))).collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
        let _ = writeln!(svg, r##"<text x="{}" y="34" fill="{colour}">{name}</text>"##, pad + 10.0 + 140.0 * k as f64);
    }
    svg.push_str("</svg>");
    svg
}

/// A self-contained HTML page for `reports`.
pub fn html(reports: &[Report]) -> String {
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Herald load test</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>\
         </head><body><h1>Herald load test</h1>",
    );
    let _ = write!(page, "<pre>{}</pre>", escape(&table(reports)));
    for r in reports {
        let _ = write!(page, "<h2>{}</h2><p>{}</p>", escape(&r.scenario), escape(&r.description));
        let _ = write!(
            page,
            "<table><tr><th>events accepted</th><th>deliveries</th><th>lost</th><th>duplicates</th><th>bad signatures</th><th>baseline req/s</th></tr>\
             <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
            r.events_accepted,
            r.deliveries,
            r.lost,
            r.duplicates,
            r.bad_signatures,
            r.baseline_requests_per_second.map_or("-".into(), |b| format!("{b:.0}"))
        );
        let accepted = r.timeline.iter().map(|s| s.accepted as f64).collect();
        let delivered = r.timeline.iter().map(|s| s.delivered as f64).collect();
        let p50 = r.timeline.iter().map(|s| f64::from(s.p50_ms)).collect();
        let p99 = r.timeline.iter().map(|s| f64::from(s.p99_ms)).collect();
        page.push_str("<p>");
        page.push_str(&chart(
            "Throughput per second",
            "/s",
            &[("events accepted", "#1f77b4", accepted), ("deliveries", "#2ca02c", delivered)],
        ));
        page.push_str("</p><p>");
        page.push_str(&chart(
            "End-to-end latency of that second's deliveries",
            "ms",
            &[("p50", "#ff7f0e", p50), ("p99", "#d62728", p99)],
        ));
        page.push_str("</p>");
    }
    page.push_str("</body></html>");
    page
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
