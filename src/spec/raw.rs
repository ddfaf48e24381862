//! The YAML shape of a spec, exactly as written (serde types). `validate.rs` turns it into `Spec`.

use super::duration::Dur;
use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub name: Option<Spanned<String>>,
    pub postgres: Option<Spanned<RawPostgres>>,
    pub clickhouse: Option<Spanned<RawClickhouse>>,
    #[serde(default)]
    pub batch: Option<Spanned<RawBatch>>,
    #[serde(default)]
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub state: Option<RawState>,
    #[serde(default)]
    pub throttle: Option<Spanned<RawThrottle>>,
    pub workers: Option<Spanned<Count>>,
    pub window: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThrottle {
    pub max_replication_lag: Option<Spanned<Dur>>,
    pub max_active_backends: Option<Spanned<Count>>,
    pub query: Option<Spanned<String>>,
    pub interval: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub url: Spanned<String>,
    pub table: Spanned<String>,
    pub key: Spanned<String>,
    #[serde(rename = "where")]
    pub where_: Option<Spanned<String>>,
    #[serde(default)]
    pub lock: LockMode,
    pub statement: Spanned<String>,
    pub verify: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClickhouse {
    pub url: Spanned<String>,
    pub user: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    /// `postgres://...`: keep the job's state and the target's lock in Postgres.
    pub state_url: Option<Spanned<String>>,
    pub source: Spanned<String>,
    pub time_column: Spanned<String>,
    pub split_column: Option<Spanned<String>>,
    pub from: Option<Spanned<String>>,
    pub to: Option<Spanned<String>>,
    pub chunks: Option<Spanned<Vec<ChunkLevel>>>,
    pub target: Spanned<String>,
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, Spanned<SettingValue>>,
    pub statement: Spanned<String>,
    pub verify: Option<Spanned<String>>,
    /// Land although materialized views read from the target (they do not see the chunks).
    pub land_without_views: Option<Spanned<bool>>,
}

/// One rung of the ClickHouse fallback ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkLevel {
    Month,
    Day,
    Split,
}

/// A ClickHouse setting's value as written (sent as text).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SettingValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl SettingValue {
    pub fn as_text(&self) -> String {
        match self {
            SettingValue::Int(v) => v.to_string(),
            SettingValue::Float(v) => v.to_string(),
            SettingValue::Bool(v) => u8::from(*v).to_string(),
            SettingValue::Text(v) => v.clone(),
        }
    }
}

/// How a batch's keys are locked before `statement` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// `FOR UPDATE SKIP LOCKED`; skipped rows are recorded and retried before the job is done.
    #[default]
    SkipLocked,
    /// No row locks taken by the engine (the statement's own locks still apply).
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    pub size: Option<Spanned<Count>>,
    pub target: Option<Spanned<Dur>>,
    pub min: Option<Spanned<Count>>,
    pub max: Option<Spanned<Count>>,
    pub pause: Option<Spanned<Dur>>,
    pub walk_ahead: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub statement_timeout: Option<Spanned<Dur>>,
    pub lock_timeout: Option<Spanned<Dur>>,
    pub idle_in_transaction_session_timeout: Option<Spanned<Dur>>,
    pub max_runtime: Option<Spanned<Dur>>,
    pub max_transaction_age: Option<Spanned<Dur>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub schema: Option<Spanned<String>>,
}

/// A whole number as written; negative, fractional or huge values are refused with a message
/// that says so (bounds are checked by `validate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Count(pub u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Count;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number, e.g. 1000")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Count, E> {
                u64::try_from(v)
                    .map(Count)
                    .map_err(|_| E::custom(format!("{v} is negative: write a whole number")))
            }

            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Count, E> {
                u64::try_from(v)
                    .map(Count)
                    .map_err(|_| E::custom(format!("{v} is far too large")))
            }

            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Count, E> {
                match u64::try_from(v) {
                    Ok(n) => Ok(Count(n)),
                    Err(_) if v < 0 => {
                        Err(E::custom(format!("{v} is negative: write a whole number")))
                    }
                    Err(_) => Err(E::custom(format!("{v} is far too large"))),
                }
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Count, E> {
                // Integers beyond 64 bits arrive as floats: do not show their rounded value.
                // Below that, a whole float was written as one (`10.0`, `1e3`, `0010`).
                Err(E::custom(match v {
                    v if v.fract() != 0.0 || !v.is_finite() => {
                        format!("{v} is not a whole number")
                    }
                    v if v < 0.0 => "the number is negative: write a whole number".to_string(),
                    v if v >= 18_446_744_073_709_551_616.0 => {
                        "the number is far too large".to_string()
                    }
                    v => format!(
                        "is not written as a plain whole number (a decimal point, an exponent \
                         or leading zeros): write {}",
                        v as u64
                    ),
                }))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Count, E> {
                let digits = !v.is_empty() && v.chars().all(|c| c.is_ascii_digit());
                Err(E::custom(if digits && v.parse::<u64>().is_ok() {
                    // A number of 64 bits arrives as one unless it was written as text.
                    format!(
                        "{v:?} is text (quoted, or tagged !!str): write the number without quotes"
                    )
                } else if digits {
                    format!("{v} is far too large")
                } else {
                    format!("{v:?} is not a whole number")
                }))
            }
        }
        d.deserialize_any(Visitor)
    }
}
