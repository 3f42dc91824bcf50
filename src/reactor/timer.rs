//! A single-level hashed timer wheel (Varghese & Lauck) driven by integer ticks.
//!
//! The wheel never reads the clock: the reactor converts `Instant`s to [`Tick`]s with a
//! [`TickSource`](crate::base::time::TickSource) and calls [`TimerWheel::advance`] with the current tick, so tests step time
//! by hand.
//!
//! Invariants:
//! - every entry has `at > self.now` and sits in slot `at % SLOTS`, linked into that slot's
//!   doubly linked list (entries live in a slab; the lists are intrusive, so insert and cancel
//!   are O(1) and allocate nothing once the slab has grown);
//! - bit `s` of `occupied` is set exactly when slot `s` is non-empty;
//! - a timer never fires early: `advance(now)` fires exactly the entries with `at <= now`.
//!   Timers longer than one rotation simply stay in their slot until their tick comes round.

use slab::Slab;

pub use crate::base::time::Tick;

/// Number of slots. With the reactor's 10 ms tick one rotation spans 10.24 s.
const SLOTS: usize = 1024;
const WORDS: usize = SLOTS / 64;

/// Handle to a scheduled timer, used to cancel it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerKey {
    index: usize,
    serial: u64,
}

struct Entry<T> {
    at: Tick,
    serial: u64,
    value: T,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A hashed timer wheel holding values of type `T`.
pub struct TimerWheel<T> {
    slots: Box<[Option<usize>]>,
    occupied: [u64; WORDS],
    entries: Slab<Entry<T>>,
    now: Tick,
    next_serial: u64,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose current tick is `now`.
    pub fn new(now: Tick) -> TimerWheel<T> {
        TimerWheel {
            slots: vec![None; SLOTS].into_boxed_slice(),
            occupied: [0; WORDS],
            entries: Slab::new(),
            now,
            next_serial: 0,
        }
    }

    /// Number of scheduled timers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no timer is scheduled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Schedules `value` to fire at tick `at`. A tick that is not in the future fires on the
    /// next tick, never in the current `advance` call.
    pub fn insert(&mut self, at: Tick, value: T) -> TimerKey {
        let at = at.max(self.now.after(1));
        let serial = self.next_serial;
        self.next_serial += 1;
        let slot = slot_of(at);
        let head = self.slots[slot];
        let index = self.entries.insert(Entry {
            at,
            serial,
            value,
            prev: None,
            next: head,
        });
        if let Some(head) = head {
            self.entries[head].prev = Some(index);
        }
        self.slots[slot] = Some(index);
        self.occupied[slot / 64] |= 1 << (slot % 64);
        TimerKey { index, serial }
    }

    /// Cancels a timer, returning its value, or `None` if it already fired or was cancelled.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        match self.entries.get(key.index) {
            Some(entry) if entry.serial == key.serial => Some(self.unlink(key.index)),
            _ => None,
        }
    }

    /// Moves the wheel to tick `now`, appending the values of every timer due by then to `out`.
    /// After a stall longer than a rotation, each slot is visited once.
    pub fn advance(&mut self, now: Tick, out: &mut Vec<T>) {
        if now <= self.now {
            return;
        }
        let steps = now.since(self.now).min(SLOTS as u64);
        for step in 1..=steps {
            let slot = slot_of(self.now.after(step));
            let mut cursor = self.slots[slot];
            while let Some(index) = cursor {
                let entry = &self.entries[index];
                cursor = entry.next;
                if entry.at <= now {
                    out.push(self.unlink(index));
                }
            }
        }
        self.now = now;
    }

    /// The earliest tick at which [`advance`](Self::advance) may fire a timer: a lower bound,
    /// exact unless the first occupied slot holds only timers of a later rotation.
    pub fn next_deadline(&self) -> Option<Tick> {
        if self.entries.is_empty() {
            return None;
        }
        let first = slot_of(self.now.after(1));
        let (word, bit) = (first / 64, first % 64);
        // The occupancy map a word at a time, from `first` round to the bits of its own word
        // below `first`: at most 17 words, whatever the number of timers.
        for step in 0..=WORDS {
            let index = (word + step) % WORDS;
            let mut bits = self.occupied[index];
            if step == 0 {
                bits &= u64::MAX << bit;
            } else if step == WORDS {
                bits &= !(u64::MAX << bit);
            }
            if bits != 0 {
                let slot = index * 64 + bits.trailing_zeros() as usize;
                let distance = (slot + SLOTS - first) % SLOTS;
                return Some(self.now.after(1 + distance as u64));
            }
        }
        debug_assert!(false, "timers exist but no slot is marked occupied");
        None
    }

    fn unlink(&mut self, index: usize) -> T {
        let entry = self.entries.remove(index);
        match entry.prev {
            Some(prev) => self.entries[prev].next = entry.next,
            None => {
                let slot = slot_of(entry.at);
                self.slots[slot] = entry.next;
                if entry.next.is_none() {
                    self.occupied[slot / 64] &= !(1 << (slot % 64));
                }
            }
        }
        if let Some(next) = entry.next {
            self.entries[next].prev = entry.prev;
        }
        entry.value
    }
}

fn slot_of(at: Tick) -> usize {
    (at.0 % SLOTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(wheel: &mut TimerWheel<u32>, now: u64) -> Vec<u32> {
        let mut out = Vec::new();
        wheel.advance(Tick(now), &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn fires_on_its_tick_and_not_before() {
        let mut wheel = TimerWheel::new(Tick(0));
        wheel.insert(Tick(5), 1);
        assert_eq!(fired(&mut wheel, 4), Vec::<u32>::new());
        assert_eq!(fired(&mut wheel, 5), vec![1]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn slot_collision_fires_only_the_due_rotation() {
        let mut wheel = TimerWheel::new(Tick(0));
        let far = SLOTS as u64 * 3 + 7;
        wheel.insert(Tick(7), 1);
        wheel.insert(Tick(far), 2);
        assert_eq!(fired(&mut wheel, 7), vec![1]);
        assert_eq!(fired(&mut wheel, far - 1), Vec::<u32>::new());
        assert_eq!(fired(&mut wheel, far), vec![2]);
    }

    #[test]
    fn cancel_before_fire_and_stale_keys() {
        let mut wheel = TimerWheel::new(Tick(0));
        let a = wheel.insert(Tick(3), 1);
        let b = wheel.insert(Tick(3), 2);
        let c = wheel.insert(Tick(3), 3);
        assert_eq!(wheel.cancel(b), Some(2));
        assert_eq!(wheel.cancel(b), None);
        assert_eq!(fired(&mut wheel, 3), vec![1, 3]);
        assert_eq!(wheel.cancel(a), None);
        // A reused slab index must not be cancelled through an old key.
        let d = wheel.insert(Tick(9), 4);
        assert_eq!(wheel.cancel(c), None);
        assert_eq!(wheel.cancel(d), Some(4));
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn catching_up_after_a_stall() {
        let mut wheel = TimerWheel::new(Tick(0));
        for i in 0..3000u32 {
            wheel.insert(Tick(u64::from(i) + 1), i);
        }
        let all = fired(&mut wheel, 10_000);
        assert_eq!(all.len(), 3000);
        assert!(wheel.is_empty());
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick() {
        let mut wheel = TimerWheel::new(Tick(0));
        wheel.advance(Tick(100), &mut Vec::new());
        wheel.insert(Tick(50), 1);
        assert_eq!(wheel.next_deadline(), Some(Tick(101)));
        assert_eq!(fired(&mut wheel, 100), Vec::<u32>::new());
        assert_eq!(fired(&mut wheel, 101), vec![1]);
    }

    #[test]
    fn next_deadline_table() {
        // (timers, now, expected next deadline)
        let cases: &[(&[u64], u64, Option<u64>)] = &[
            (&[], 0, None),
            (&[10], 0, Some(10)),
            (&[10, 4, 30], 0, Some(4)),
            (&[10, 4, 30], 4, Some(10)),
            (&[SLOTS as u64 + 2], 0, Some(2)), // lower bound: same slot, later rotation
            (&[SLOTS as u64 + 2], 2, Some(SLOTS as u64 + 2)),
            (&[SLOTS as u64 + 9], 10, Some(SLOTS as u64 + 9)), // wraps into first's own word
            (&[200, 700], 100, Some(200)),                     // several words on
        ];
        for (timers, now, expected) in cases {
            let mut wheel = TimerWheel::new(Tick(0));
            for &t in *timers {
                wheel.insert(Tick(t), t);
            }
            wheel.advance(Tick(*now), &mut Vec::new());
            assert_eq!(
                wheel.next_deadline(),
                expected.map(Tick),
                "{timers:?} at {now}"
            );
        }
    }
}
