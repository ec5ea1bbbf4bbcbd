//! Reading `/metrics` as Prometheus does: the text, parsed by a Prometheus text-format parser,
//! and the value of a series by name and labels.

use super::Api;

/// One scrape of `/metrics`.
pub struct Scrape {
    /// The text exposition.
    pub text: String,
    samples: prometheus_parse::Scrape,
}

/// Scrapes `/metrics`; the text must be valid Prometheus text format.
pub async fn scrape(api: &Api) -> Scrape {
    let (status, body) = api.raw("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    let text = body.as_str().expect("text exposition").to_string();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let samples = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    Scrape { text, samples }
}

impl Scrape {
    /// Every sample.
    pub fn samples(&self) -> &[prometheus_parse::Sample] {
        &self.samples.samples
    }

    /// The value of the series `name` whose labels include `labels`, summed over the rest
    /// (a histogram's count of observations).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
            .sum()
    }
}
