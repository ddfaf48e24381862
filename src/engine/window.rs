//! Daily run windows (`window: 02:00-05:00 America/New_York`): batches start only inside the
//! window. A window may cross midnight; daylight saving time is handled by jiff's time zones
//! (a start that falls into a DST gap moves forward, as wall clocks do).

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

/// A daily window in a time zone, `[start, end)` in wall-clock time.
#[derive(Debug, Clone)]
pub struct Window {
    start: Time,
    end: Time,
    tz: TimeZone,
    text: String,
}

/// Where an instant stands relative to the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Inside; the window closes at this instant.
    Inside { ends: Zoned },
    /// Outside; the window opens next at this instant.
    Outside { opens: Zoned },
}

impl Window {
    /// Parse `HH:MM-HH:MM ZONE` (ZONE: an IANA name such as `America/New_York`, or `UTC`).
    pub fn parse(text: &str) -> Result<Window, String> {
        const HINT: &str = "write it as HH:MM-HH:MM and an IANA time zone, e.g. \
                            `02:00-05:00 America/New_York`";
        let mut parts = text.split_whitespace();
        let (Some(range), Some(zone), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{text:?}: {HINT}"));
        };
        let (a, b) = range
            .split_once('-')
            .ok_or_else(|| format!("{text:?}: {HINT}"))?;
        let time = |s: &str| -> Result<Time, String> {
            let (h, m) = s.split_once(':').ok_or_else(|| format!("{s:?}: {HINT}"))?;
            let (hs, ms) = (h, m);
            let (h, m): (i8, i8) = match (hs.parse::<i8>(), ms.parse::<i8>()) {
                (Ok(h), Ok(m)) if hs.len() == 2 && ms.len() == 2 => (h, m),
                _ => return Err(format!("{s:?} is not a time like 02:00; {HINT}")),
            };
            if h == 24 && m == 0 {
                return Ok(Time::midnight());
            }
            Time::new(h, m, 0, 0).map_err(|e| format!("{s:?}: {e}"))
        };
        let (start, end) = (time(a)?, time(b)?);
        if start == end {
            return Err(format!(
                "{text:?}: the window starts and ends at the same time; leave `window` out to \
                 run at any time"
            ));
        }
        let tz = TimeZone::get(zone)
            .map_err(|e| format!("{zone:?} is not a known time zone (an IANA name): {e}"))?;
        Ok(Window {
            start,
            end,
            tz,
            text: text.to_string(),
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The window that opens on `day` (local date): its start and end instants.
    fn on(&self, day: Date) -> Option<(Zoned, Zoned)> {
        let start = day.to_datetime(self.start).to_zoned(self.tz.clone()).ok()?;
        let end_day = if self.end > self.start {
            day
        } else {
            day.checked_add(1.day()).ok()?
        };
        let end = end_day
            .to_datetime(self.end)
            .to_zoned(self.tz.clone())
            .ok()?;
        Some((start, end))
    }

    /// Where `now` stands.
    pub fn position(&self, now: Timestamp) -> Position {
        let today = now.to_zoned(self.tz.clone()).date();
        let mut next: Option<Zoned> = None;
        for offset in -1i64..=2 {
            let Ok(day) = today.checked_add(offset.days()) else {
                continue;
            };
            let Some((start, end)) = self.on(day) else {
                continue;
            };
            if start.timestamp() <= now && now < end.timestamp() {
                return Position::Inside { ends: end };
            }
            if start.timestamp() > now && next.as_ref().is_none_or(|n| start < *n) {
                next = Some(start);
            }
        }
        Position::Outside {
            opens: next.unwrap_or_else(|| now.to_zoned(self.tz.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn inside_and_outside_a_plain_window() {
        let w = Window::parse("02:00-05:00 America/New_York").unwrap();
        // 03:00 New York in winter = 08:00 UTC.
        match w.position(at("2026-01-10T08:00:00Z")) {
            Position::Inside { ends } => {
                assert_eq!(ends.timestamp(), at("2026-01-10T10:00:00Z"))
            }
            p => panic!("{p:?}"),
        }
        // 06:00 New York: outside, opens tomorrow 02:00.
        match w.position(at("2026-01-10T11:00:00Z")) {
            Position::Outside { opens } => {
                assert_eq!(opens.timestamp(), at("2026-01-11T07:00:00Z"))
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn crossing_midnight() {
        let w = Window::parse("22:00-02:00 UTC").unwrap();
        assert!(matches!(
            w.position(at("2026-03-01T23:30:00Z")),
            Position::Inside { .. }
        ));
        match w.position(at("2026-03-02T01:00:00Z")) {
            Position::Inside { ends } => assert_eq!(ends.timestamp(), at("2026-03-02T02:00:00Z")),
            p => panic!("{p:?}"),
        }
        match w.position(at("2026-03-02T12:00:00Z")) {
            Position::Outside { opens } => {
                assert_eq!(opens.timestamp(), at("2026-03-02T22:00:00Z"))
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn daylight_saving_is_followed() {
        let w = Window::parse("02:00-05:00 America/New_York").unwrap();
        // Summer: 03:00 EDT = 07:00 UTC.
        assert!(matches!(
            w.position(at("2026-07-10T07:00:00Z")),
            Position::Inside { .. }
        ));
        // On the spring-forward night 02:00 does not exist: the window opens at 03:00 EDT.
        match w.position(at("2026-03-08T05:00:00Z")) {
            Position::Outside { opens } => {
                assert_eq!(opens.timestamp(), at("2026-03-08T07:00:00Z"))
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn bad_windows_are_refused() {
        for bad in [
            "02:00-05:00",
            "2:00-05:00 UTC",
            "02:00-02:00 UTC",
            "02:00-05:00 Mars/Base",
            "25:00-05:00 UTC",
            "02:00 05:00 UTC",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }
}
