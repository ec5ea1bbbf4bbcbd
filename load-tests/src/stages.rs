//! Where an event's milliseconds go: the generator's own publish round trips, and the stages
//! Herald times itself (read from its `/metrics` histograms at the end of a run), beside the
//! end-to-end latency the sink measured.

use serde::Serialize;

/// One stage of an event's way, p50 and p99 in ms.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// What was timed.
    pub stage: String,
    /// Samples behind the figures.
    pub samples: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// Exact percentiles of sorted µs samples.
pub fn of_samples(stage: &str, sorted_us: &[u32]) -> Option<Stage> {
    let at = |q: f64| f64::from(sorted_us[((sorted_us.len() - 1) as f64 * q).round() as usize]) / 1000.0;
    (!sorted_us.is_empty()).then(|| Stage {
        stage: stage.into(),
        samples: sorted_us.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}

/// The stages Herald times, from its Prometheus text: each histogram's series whose labels
/// contain `label` (summed), percentiles interpolated within buckets — so each figure is only
/// as exact as the bucket it falls in.
pub fn of_herald(metrics: &str) -> Vec<Stage> {
    [
        ("API request in Herald: POST /v1/events/batch", "herald_api_request_seconds", "route=\"/v1/events/batch\""),
        ("API request in Herald: POST /v1/events", "herald_api_request_seconds", "route=\"/v1/events\""),
        ("durable append, deliveries topic (group commit + fsync)", "herald_log_append_seconds", "deliveries\""),
        ("durable append, history topic", "herald_log_append_seconds", "history\""),
        ("delivery request: Herald → sink → answer", "herald_delivery_request_seconds", "transport=\"webhook\""),
        ("accepted → delivered, as Herald times it", "herald_delivery_end_to_end_seconds", "transport=\"webhook\""),
    ]
    .into_iter()
    .filter_map(|(stage, name, label)| histogram(metrics, name, label).and_then(|b| quantiles(stage, &b)))
    .collect()
}

/// Cumulative buckets `(upper bound, count)` of `name`'s series whose labels contain `label`,
/// summed over those series, in bound order.
fn histogram(metrics: &str, name: &str, label: &str) -> Option<Vec<(f64, u64)>> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with(&prefix) && l.contains(label)) {
        let (labels, count) = line.rsplit_once(' ')?;
        let le = labels.split("le=\"").nth(1)?.split('"').next()?;
        let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        let count: u64 = count.parse::<f64>().ok()? as u64;
        match buckets.iter_mut().find(|(b, _)| *b == bound) {
            Some(b) => b.1 += count,
            None => buckets.push((bound, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!buckets.is_empty()).then_some(buckets)
}

fn quantiles(stage: &str, buckets: &[(f64, u64)]) -> Option<Stage> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let rank = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, count) in buckets {
            if count as f64 >= rank {
                if bound.is_infinite() {
                    return lower.0 * 1000.0;
                }
                let within = (rank - lower.1 as f64) / (count - lower.1).max(1) as f64;
                return (lower.0 + (bound - lower.0) * within) * 1000.0;
            }
            lower = (bound, count);
        }
        lower.0 * 1000.0
    };
    Some(Stage { stage: stage.into(), samples: total, p50_ms: at(0.5), p99_ms: at(0.99) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_read_from_summed_buckets_and_interpolated_within_one() {
        let text = "\
herald_log_append_seconds_bucket{topic=\"p.deliveries\",le=\"0.001\"} 50
herald_log_append_seconds_bucket{topic=\"p.deliveries\",le=\"0.002\"} 90
herald_log_append_seconds_bucket{topic=\"p.deliveries\",le=\"+Inf\"} 100
herald_log_append_seconds_bucket{topic=\"p.history\",le=\"0.001\"} 0
herald_log_append_seconds_bucket{topic=\"p.history\",le=\"0.002\"} 0
herald_log_append_seconds_bucket{topic=\"p.history\",le=\"+Inf\"} 4
";
        let stages = of_herald(text);
        let deliveries = stages.iter().find(|s| s.stage.contains("deliveries")).unwrap();
        assert_eq!(deliveries.samples, 100);
        assert!((deliveries.p50_ms - 1.0).abs() < 1e-9, "{deliveries:?}");
        // The 99th sample is past every finite bound: reported as that bound, not invented.
        assert!((deliveries.p99_ms - 2.0).abs() < 1e-9, "{deliveries:?}");
        let history = stages.iter().find(|s| s.stage.contains("history")).unwrap();
        assert_eq!((history.samples, history.p50_ms), (4, 2.0));
        let exact = of_samples("publish", &[1000, 2000, 3000]).unwrap();
        assert_eq!((exact.p50_ms, exact.p99_ms), (2.0, 3.0));
    }
}
