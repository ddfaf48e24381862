//! Durations in specs (`500ms`, `30s`, `45m`, `1h30m`): strict syntax, parsed by humantime.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A duration written as one or more `<number><unit>` groups with no spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

const HINT: &str = "write a number and a unit with no space, e.g. 500ms, 30s, 45m, 1h30m (0 = off)";

/// Parse a duration the way specs and `--max-runtime` accept it.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    // humantime alone accepts "5 minutes" and "2 weeks"; specs are read at 4 a.m., so only the
    // compact unit forms pass.
    let compact = !t.is_empty()
        && t.chars().all(|c| c.is_ascii_alphanumeric())
        && t.starts_with(|c: char| c.is_ascii_digit());
    // Each unit once, largest first (`1h30m`): `1h1h` (humantime adds it up to 2h) or `30m1h`
    // is a typo more likely than a meaning.
    const ORDER: [&str; 5] = ["d", "h", "m", "s", "ms"];
    let ranks: Vec<Option<usize>> = t
        .split(|c: char| c.is_ascii_digit())
        .filter(|u| !u.is_empty())
        .map(|u| ORDER.iter().position(|o| *o == u))
        .collect();
    let units_ok = ranks.iter().all(Option::is_some) && ranks.windows(2).all(|w| w[0] < w[1]);
    if !compact || !units_ok || t.ends_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("invalid duration \"{text}\": {HINT}"));
    }
    humantime::parse_duration(t).map_err(|e| format!("invalid duration \"{text}\": {e}; {HINT}"))
}

/// A duration the way a spec writes it, in its largest whole unit: `366d`, `1h`, `2147483647ms`.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        return "0".into();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(0) => Ok(Dur(Duration::ZERO)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "invalid duration {n}: a unit is required, e.g. {n}ms or {n}s"
            ))),
            Raw::Text(s) => parse(&s).map(Dur).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn formats_in_the_largest_whole_unit() {
        use super::format;
        assert_eq!(format(Duration::from_secs(366 * 86400)), "366d");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
        assert_eq!(format(Duration::from_millis(2_147_483_647)), "2147483647ms");
        assert_eq!(format(Duration::from_millis(90_000)), "90s");
        assert_eq!(format(Duration::ZERO), "0");
    }

    #[test]
    fn accepts_compact_forms_only() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse("1d2h3m4s5ms").unwrap(),
            Duration::from_millis(93_784_005)
        );
        for bad in [
            "5 minutes",
            "5minutes",
            "5",
            "ms",
            "",
            "1.5s",
            "-3s",
            "2w",
            "1h1h",
            "30m1h",
            "1s1s",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
