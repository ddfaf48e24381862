//! ClickHouse error classification: the code comes from the `Code: NNN` text (18.16 sends no
//! X-ClickHouse-Exception-Code header; newer servers put the same code in the text too).

use crate::error::{DbErrorKind, Error};

/// MEMORY_LIMIT_EXCEEDED: split the chunk one level down.
pub const MEMORY_LIMIT_EXCEEDED: u32 = 241;
/// Retried at the same size with backoff.
const TRANSIENT: [u32; 6] = [
    159, // TIMEOUT_EXCEEDED
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    252, // TOO_MANY_PARTS
    394, // QUERY_WAS_CANCELLED (server shutting down)
];

/// UNKNOWN_TABLE: on a read of `system.tables`, a table another session dropped mid-read.
pub const UNKNOWN_TABLE: u32 = 60;

/// A setting the server does not let this query change: UNKNOWN_SETTING, READONLY,
/// SETTING_CONSTRAINT_VIOLATION.
const SETTING_REFUSED: [u32; 3] = [115, 164, 452];

/// Whether `e` is the server refusing a setting (see `SETTING_REFUSED`).
pub fn refuses_setting(e: &Error) -> bool {
    matches!(e, Error::Db { message, .. } if code(message).is_some_and(|c| SETTING_REFUSED.contains(&c)))
}

/// The server's exception code of a database error, where it sent one.
pub fn db_code(e: &Error) -> Option<u32> {
    match e {
        Error::Db { message, .. } => code(message),
        _ => None,
    }
}

/// The exception code in a server message, e.g. `Code: 241, e.displayText() = ...` (18.16) or
/// `Code: 241. DB::Exception: ...` (current releases).
pub fn code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The server's words without the client's wrapping and 18.16's `e.what()` tail.
fn message(text: &str) -> String {
    let t = text.strip_prefix("bad response: ").unwrap_or(text);
    let t = t.split(", e.what() = ").next().unwrap_or(t);
    t.replace("e.displayText() = ", "").trim().to_string()
}

/// Bytes the server said a query would have used (`would use 11.87 MiB`), where known.
pub fn memory_hint(text: &str) -> Option<u64> {
    let rest = &text[text.find("would use ")? + 10..];
    let mut it = rest.split_whitespace();
    let n: f64 = it.next()?.parse().ok()?;
    let unit = it
        .next()?
        .trim_end_matches(|c: char| !c.is_ascii_alphabetic());
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some((n * mult) as u64)
}

/// A typed error for a failure while doing `context`.
pub fn ch_error(context: &str, e: &clickhouse::error::Error) -> Error {
    use clickhouse::error::Error as E;
    let text = e.to_string();
    let kind = match e {
        E::Network(_) | E::TimedOut => DbErrorKind::Transient,
        _ => match code(&text) {
            Some(MEMORY_LIMIT_EXCEEDED) => DbErrorKind::MemoryLimit,
            Some(c) if TRANSIENT.contains(&c) => DbErrorKind::Transient,
            _ => DbErrorKind::Fatal,
        },
    };
    Error::Db {
        message: format!("{context}: {}", message(&text)),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_codes_old_and_new() {
        let old = "bad response: Code: 241, e.displayText() = DB::Exception: Memory limit (for query) exceeded: would use 11.87 MiB (attempt to allocate chunk of 3145728 bytes), maximum: 9.54 MiB, e.what() = DB::Exception";
        assert_eq!(code(old), Some(241));
        assert_eq!(memory_hint(old), Some((11.87 * 1024.0 * 1024.0) as u64));
        assert_eq!(
            message(old),
            "Code: 241, DB::Exception: Memory limit (for query) exceeded: would use 11.87 MiB (attempt to allocate chunk of 3145728 bytes), maximum: 9.54 MiB"
        );
        let new = "Code: 202. DB::Exception: Too many simultaneous queries. Maximum: 100. (TOO_MANY_SIMULTANEOUS_QUERIES)";
        assert_eq!(code(new), Some(202));
        assert_eq!(code("no code here"), None);
    }
}
