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

    /// The instant the window closes if `now` is inside, else panics.
    fn ends(w: &Window, now: &str) -> Timestamp {
        match w.position(at(now)) {
            Position::Inside { ends } => ends.timestamp(),
            p => panic!("{now}: {p:?}"),
        }
    }

    /// The instant the window opens next if `now` is outside, else panics.
    fn opens(w: &Window, now: &str) -> Timestamp {
        match w.position(at(now)) {
            Position::Outside { opens } => opens.timestamp(),
            p => panic!("{now}: {p:?}"),
        }
    }

    #[test]
    fn start_is_inside_end_is_outside() {
        let w = Window::parse("02:00-05:00 UTC").unwrap();
        assert_eq!(ends(&w, "2026-01-10T02:00:00Z"), at("2026-01-10T05:00:00Z"));
        assert_eq!(ends(&w, "2026-01-10T04:59:59Z"), at("2026-01-10T05:00:00Z"));
        assert_eq!(
            opens(&w, "2026-01-10T05:00:00Z"),
            at("2026-01-11T02:00:00Z")
        );
        assert_eq!(
            opens(&w, "2026-01-10T01:59:59Z"),
            at("2026-01-10T02:00:00Z")
        );
        // 24:00 is the midnight that ends a day.
        let w = Window::parse("23:00-24:00 UTC").unwrap();
        assert_eq!(ends(&w, "2026-01-10T23:30:00Z"), at("2026-01-11T00:00:00Z"));
        assert_eq!(
            opens(&w, "2026-01-11T00:00:00Z"),
            at("2026-01-11T23:00:00Z")
        );
    }

    #[test]
    fn crossing_midnight_in_new_york_on_daylight_saving_days() {
        let w = Window::parse("22:00-04:00 America/New_York").unwrap();
        // Spring forward (2026-03-08): 22:00 EST (03:00Z) to 04:00 EDT (08:00Z), 5 hours.
        assert_eq!(
            opens(&w, "2026-03-08T02:59:00Z"),
            at("2026-03-08T03:00:00Z")
        );
        assert_eq!(ends(&w, "2026-03-08T03:00:00Z"), at("2026-03-08T08:00:00Z"));
        assert_eq!(ends(&w, "2026-03-08T07:30:00Z"), at("2026-03-08T08:00:00Z"));
        // The next night is all EDT: 02:00Z to 08:00Z.
        assert_eq!(
            opens(&w, "2026-03-08T08:00:00Z"),
            at("2026-03-09T02:00:00Z")
        );
        // Fall back (2026-11-01): 22:00 EDT (02:00Z) to 04:00 EST (09:00Z), 7 hours.
        assert_eq!(ends(&w, "2026-11-01T02:00:00Z"), at("2026-11-01T09:00:00Z"));
        assert_eq!(ends(&w, "2026-11-01T08:59:00Z"), at("2026-11-01T09:00:00Z"));
        assert_eq!(
            opens(&w, "2026-11-01T09:00:00Z"),
            at("2026-11-02T03:00:00Z")
        );
    }

    #[test]
    fn the_repeated_hour_of_fall_back_is_inside_once_per_wall_clock() {
        // 2026-11-01 in New York: 01:00-02:00 happens twice (EDT, then EST). The window starts
        // at the first 01:30 and ends at 02:00 EST, so both 01:45s are inside.
        let w = Window::parse("01:30-02:00 America/New_York").unwrap();
        assert_eq!(ends(&w, "2026-11-01T05:30:00Z"), at("2026-11-01T07:00:00Z"));
        assert_eq!(ends(&w, "2026-11-01T05:45:00Z"), at("2026-11-01T07:00:00Z"));
        assert_eq!(ends(&w, "2026-11-01T06:45:00Z"), at("2026-11-01T07:00:00Z"));
        assert_eq!(
            opens(&w, "2026-11-01T07:00:00Z"),
            at("2026-11-02T06:30:00Z")
        );
        // A whole-night window on that day is an hour longer than usual: 01:00 EDT to 05:00 EST.
        let w = Window::parse("01:00-05:00 America/New_York").unwrap();
        assert_eq!(ends(&w, "2026-11-01T05:00:00Z"), at("2026-11-01T10:00:00Z"));
    }

    #[test]
    fn an_end_in_the_spring_forward_gap_moves_forward_too() {
        // 2026-03-08 in New York: 02:00-03:00 does not exist. 02:30 becomes 03:30 EDT.
        let w = Window::parse("01:00-02:30 America/New_York").unwrap();
        assert_eq!(ends(&w, "2026-03-08T06:00:00Z"), at("2026-03-08T07:30:00Z"));
        assert_eq!(
            opens(&w, "2026-03-08T07:30:00Z"),
            at("2026-03-09T05:00:00Z")
        );
    }

    #[test]
    fn other_zones_follow_their_own_rules() {
        // Europe/Berlin changes on 2026-03-29 (01:00Z), not on New York's date.
        let w = Window::parse("02:30-04:00 Europe/Berlin").unwrap();
        // 2026-03-08 is ordinary winter time there: 01:30Z to 03:00Z.
        assert_eq!(ends(&w, "2026-03-08T01:30:00Z"), at("2026-03-08T03:00:00Z"));
        // On 2026-03-29, 02:30 does not exist: the window opens at 03:30 CEST (01:30Z) and
        // ends at 04:00 CEST (02:00Z).
        assert_eq!(
            opens(&w, "2026-03-29T00:00:00Z"),
            at("2026-03-29T01:30:00Z")
        );
        assert_eq!(ends(&w, "2026-03-29T01:45:00Z"), at("2026-03-29T02:00:00Z"));
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
