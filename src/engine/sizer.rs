//! Batch size: follows an EWMA of keys/second toward `batch.target` (at most x1.5 up, x0.5
//! down per batch, clamped to min/max); halves after a statement timeout. Target 0 = fixed.
//! The average falls at once when a batch is slower than it (a table that gets expensive must
//! not see several oversized batches while the average catches up) and rises gradually.

use crate::spec::Batch;
use std::time::Duration;

/// Weight of the newest batch in the rate average.
const ALPHA: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct Sizer {
    size: u64,
    min: u64,
    max: u64,
    target: Duration,
    rate: Option<f64>,
}

impl Sizer {
    pub fn new(b: &Batch) -> Sizer {
        Sizer {
            size: b.size,
            min: b.min,
            max: b.max,
            target: b.target,
            rate: None,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Learn from a batch of `keys` that took `took`.
    pub fn observe(&mut self, keys: u64, took: Duration) {
        if self.target.is_zero() || keys == 0 || keys < self.size / 2 {
            // Fixed size, or a short tail batch that says little about the rate.
            return;
        }
        let rate = keys as f64 / took.as_secs_f64().max(1e-4);
        let avg = match self.rate {
            Some(prev) if rate > prev => ALPHA * rate + (1.0 - ALPHA) * prev,
            _ => rate,
        };
        self.rate = Some(avg);
        let want = avg * self.target.as_secs_f64();
        let cur = self.size as f64;
        let next = want.clamp(cur * 0.5, cur * 1.5).round() as u64;
        self.size = next.clamp(self.min, self.max);
    }

    /// Never go above `max` from now on (a unit that learned its limit).
    pub fn cap(&mut self, max: u64) {
        self.max = self.max.min(max).max(self.min);
        self.size = self.size.min(self.max);
    }

    /// Halve after a statement timeout. Returns false when already at `min`.
    pub fn halve(&mut self) -> bool {
        if self.size <= self.min {
            return false;
        }
        self.size = (self.size / 2).max(self.min);
        // The old rate over-promised: start averaging afresh.
        self.rate = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(target_ms: u64) -> Batch {
        Batch {
            size: 1000,
            target: Duration::from_millis(target_ms),
            min: 100,
            max: 100_000,
            pause: Duration::ZERO,
            walk_ahead: false,
        }
    }

    #[test]
    fn grows_at_most_one_and_a_half_and_stops_at_max() {
        let mut s = Sizer::new(&batch(500));
        s.observe(1000, Duration::from_millis(10));
        assert_eq!(s.size(), 1500);
        for _ in 0..40 {
            let n = s.size();
            s.observe(n, Duration::from_millis(10));
        }
        assert_eq!(s.size(), 100_000);
    }

    #[test]
    fn shrinks_at_most_half_and_halves_on_timeout() {
        let mut s = Sizer::new(&batch(500));
        s.observe(1000, Duration::from_secs(10));
        assert_eq!(s.size(), 500);
        assert!(s.halve());
        assert_eq!(s.size(), 250);
        assert!(s.halve() && s.halve());
        assert_eq!(s.size(), 100);
        assert!(!s.halve());
    }

    #[test]
    fn slows_down_at_once_after_a_fast_history() {
        let mut s = Sizer::new(&batch(100));
        for _ in 0..20 {
            let n = s.size();
            s.observe(n, Duration::from_millis(1));
        }
        assert_eq!(s.size(), 100_000);
        // Suddenly 2ms a row: every following batch halves until it fits the target.
        let mut seen = vec![];
        for _ in 0..15 {
            let n = s.size();
            s.observe(n, Duration::from_millis(2 * n));
            seen.push(s.size());
        }
        assert_eq!(seen[0], 50_000);
        assert_eq!(*seen.last().unwrap(), 100, "{seen:?}");
    }

    #[test]
    fn fixed_when_target_is_zero() {
        let mut s = Sizer::new(&batch(0));
        s.observe(1000, Duration::from_millis(1));
        assert_eq!(s.size(), 1000);
    }
}
