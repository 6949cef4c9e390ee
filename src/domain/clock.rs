//! The server clock that every duration scand measures is read against: how far in the future
//! or past an event time may be, when a shipment stalls, when retention removes a journey and
//! how old the change log may grow. One clock, injectable, so tests and benchmarks move it by
//! months in a second; in production it is the system clock.
//!
//! Builds with the `failpoints` feature also read the fail point `clock-offset-seconds`
//! (`FAILPOINTS=clock-offset-seconds=return(7776000)`), so a test can start the real daemon
//! months ahead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::EventTime;

#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Microseconds added to the system clock: zero unless a test or benchmark advanced it.
    offset_micros: Arc<AtomicI64>,
}

impl Clock {
    pub fn now(&self) -> SystemTime {
        let offset = self.offset_micros.load(Ordering::Relaxed) + injected_offset_micros();
        let system = SystemTime::now();
        match u64::try_from(offset) {
            Ok(ahead) => system + Duration::from_micros(ahead),
            Err(_) => system - Duration::from_micros(offset.unsigned_abs()),
        }
    }

    pub fn event_time(&self) -> EventTime {
        EventTime::from_system_time(self.now())
    }

    /// Moves this clock, and every clone of it, `by` ahead.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.offset_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

#[cfg(feature = "failpoints")]
fn injected_offset_micros() -> i64 {
    fail::fail_point!("clock-offset-seconds", |seconds| {
        seconds
            .and_then(|s| s.parse::<i64>().ok())
            .map_or(0, |s| s.saturating_mul(1_000_000))
    });
    0
}

#[cfg(not(feature = "failpoints"))]
fn injected_offset_micros() -> i64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_a_clock_moves_its_clones() {
        let clock = Clock::default();
        let clone = clock.clone();
        let before = clone.event_time();
        clock.advance(Duration::from_secs(90 * 24 * 3600));
        let moved = clone.event_time().0 - before.0;
        assert!(
            (90 * 24 * 3600 * 1_000_000..91 * 24 * 3600 * 1_000_000).contains(&moved),
            "{moved}"
        );
    }
}
