//! Where the loop reads the time. Read once per pass; everything below the reactor is handed
//! `now` as a [`Tick`](super::timer::Tick) and never reads a clock itself.
//!
//! [`Clock::system`] is the real thing. [`Clock::manual`] stands still until
//! [`Clock::advance`] moves it, so tests step heartbeats, handshake deadlines, token expiry
//! and the shutdown drain through the real loop without waiting (as sozu and tokio's timer
//! wheel do).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A monotonic clock and the Unix time, read together.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<Manual>>);

#[derive(Debug)]
struct Manual {
    start: Instant,
    unix_start: Duration,
    elapsed_ns: AtomicU64,
}

impl Clock {
    /// The system's clocks.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that starts at the current time and moves only when told to.
    pub fn manual() -> Clock {
        Clock(Some(Arc::new(Manual {
            start: Instant::now(),
            unix_start: unix_now(),
            elapsed_ns: AtomicU64::new(0),
        })))
    }

    /// Moves a manual clock forward by `by`; the system clock cannot be moved.
    ///
    /// # Panics
    /// On the system clock: a test that thinks it steps time must not silently wait.
    pub fn advance(&self, by: Duration) {
        let manual = self
            .0
            .as_ref()
            .expect("only a manual clock can be advanced");
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        manual.elapsed_ns.fetch_add(by, Ordering::SeqCst);
    }

    /// The current instant.
    pub fn now(&self) -> Instant {
        match &self.0 {
            None => Instant::now(),
            Some(manual) => manual.start + manual.elapsed(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> u64 {
        let since_epoch = match &self.0 {
            None => unix_now(),
            Some(manual) => manual.unix_start + manual.elapsed(),
        };
        since_epoch.as_millis() as u64
    }

    /// Seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        self.unix_millis() / 1000
    }
}

impl Manual {
    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::SeqCst))
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual();
        let (t0, u0) = (clock.now(), clock.unix_secs());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now() - t0, Duration::from_secs(90));
        assert!(clock.unix_secs() - u0 >= 89);
    }
}
