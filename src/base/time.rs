//! Time as data: a [`Tick`] is a point in time counted in whole timer ticks, and a
//! [`TickSource`] converts the clock's `Instant`s into ticks. Nothing below the reactor reads a
//! clock: every module is handed `now` as a `Tick`, so tests step time by hand.

use std::time::{Duration, Instant};

/// A point in time, counted in ticks since the [`TickSource`] started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(pub u64);

impl Tick {
    /// The tick `ticks` after this one.
    pub fn after(self, ticks: u64) -> Tick {
        Tick(self.0.saturating_add(ticks))
    }

    /// Ticks elapsed from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Converts between wall-clock `Instant`s and [`Tick`]s.
#[derive(Clone, Copy, Debug)]
pub struct TickSource {
    start: Instant,
    tick: Duration,
}

impl TickSource {
    /// A source whose tick 0 begins at `start`, counting in steps of `tick`.
    pub fn new(start: Instant, tick: Duration) -> TickSource {
        debug_assert!(!tick.is_zero());
        TickSource { start, tick }
    }

    /// The tick containing `instant` (rounded down).
    pub fn tick_at(&self, instant: Instant) -> Tick {
        let elapsed = instant.saturating_duration_since(self.start);
        Tick((elapsed.as_nanos() / self.tick.as_nanos()) as u64)
    }

    /// A duration in whole ticks, rounded up so that nothing fires early.
    pub fn ticks_in(&self, duration: Duration) -> u64 {
        let ticks = duration.as_nanos().div_ceil(self.tick.as_nanos());
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// How long from `now` until tick `t` begins (zero if it already has).
    pub fn until(&self, t: Tick, now: Instant) -> Duration {
        let begins = self.start + self.tick * u32::try_from(t.0).unwrap_or(u32::MAX);
        begins.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_source_rounds_deadlines_up() {
        let start = Instant::now();
        let ticks = TickSource::new(start, Duration::from_millis(10));
        assert_eq!(ticks.ticks_in(Duration::from_millis(10)), 1);
        assert_eq!(ticks.ticks_in(Duration::from_millis(11)), 2);
        assert_eq!(ticks.tick_at(start + Duration::from_millis(19)), Tick(1));
        assert_eq!(
            ticks.until(Tick(3), start + Duration::from_millis(25)),
            Duration::from_millis(5)
        );
        assert_eq!(
            ticks.until(Tick(1), start + Duration::from_millis(25)),
            Duration::ZERO
        );
    }
}
