//! Durations as people write them in config and API bodies: ISO-8601 (`PT60S`, `P1D`,
//! `PT1H30M`) or humane (`60s`, `1h 30m`, `250ms`); bare numbers are seconds.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration that parses from either notation and prints in the humane one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

/// The longest duration taken anywhere: a century. Longer ones ("forever" as
/// `18446744073709551615`) overflowed the millisecond arithmetic they reach (a dead-letter
/// retention so long it wrapped to the past and deleted every dead letter at the next flush).
pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A duration within [`MAX`].
fn bounded(d: Duration) -> Option<HumanDuration> {
    (d <= MAX).then_some(HumanDuration(d))
}

/// Why a duration string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: expected ISO-8601 like \"PT30S\" or humane like \"30s\", at most 100 years")]
pub struct DurationError {
    input: String,
}

/// Parses an ISO-8601 duration (days and time parts; years and months are not fixed
/// lengths and are refused).
fn parse_iso8601(s: &str) -> Option<Duration> {
    let rest = s.strip_prefix('P').or_else(|| s.strip_prefix('p'))?;
    if rest.is_empty() {
        return None;
    }
    let (date, time) = match rest.find(['T', 't']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut secs = 0f64;
    let mut any = false;
    let mut take = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut num = String::new();
        let mut unit_at = 0;
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' || c == ',' {
                num.push(if c == ',' { '.' } else { c });
                continue;
            }
            let c = c.to_ascii_uppercase();
            let pos = units.iter().skip(unit_at).position(|(u, _)| *u == c)? + unit_at;
            secs += num.parse::<f64>().ok()? * units[pos].1;
            unit_at = pos + 1;
            num.clear();
            any = true;
        }
        num.is_empty().then_some(())
    };
    take(date, &[('W', 604_800.0), ('D', 86_400.0)])?;
    if let Some(time) = time {
        if time.is_empty() {
            return None;
        }
        take(time, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    }
    // Checked: "P9999999999999999999D" is finite as a float but beyond any Duration.
    any.then(|| Duration::try_from_secs_f64(secs).ok()).flatten()
}

impl std::str::FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let err = || DurationError { input: s.to_string() };
        if t.starts_with(['P', 'p']) {
            return parse_iso8601(t).and_then(bounded).ok_or_else(err);
        }
        if let Ok(secs) = t.parse::<u64>() {
            return bounded(Duration::from_secs(secs)).ok_or_else(err);
        }
        humantime::parse_duration(t).ok().and_then(bounded).ok_or_else(err)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"PT30S\" or \"30s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                bounded(Duration::from_secs(v)).ok_or_else(|| E::custom("a duration is at most 100 years"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                let v = u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
                self.visit_u64(v)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        HumanDuration(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Duration, DurationError> {
        s.parse::<HumanDuration>().map(|d| d.0)
    }

    #[test]
    fn reads_iso8601() {
        assert_eq!(parse("PT60S"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("PT1H30M"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("P1D"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("P1DT2H"), Ok(Duration::from_secs(93_600)));
        assert_eq!(parse("PT0.5S"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("PT30M"), Ok(Duration::from_secs(1800)));
    }

    #[test]
    fn reads_humane_forms_and_seconds() {
        assert_eq!(parse("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("45"), Ok(Duration::from_secs(45)));
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["P", "PT", "P1Y", "PT5X", "PT1S2H", "soon", "-5s", "", "P99999999999999999999999D", "PT1e400S"] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
    }
}
