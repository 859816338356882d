//! Hybrid logical clocks: timestamps that follow the wall clock and never contradict causality.
//!
//! An [`Hlc`] is `(wall_ms, logical)`. A replica's [`HlcClock`] remembers the last stamp it
//! issued; every new stamp is strictly greater than the last one (even when the wall clock steps
//! backwards) and, through [`HlcClock::observe`], strictly greater than any stamp it has seen
//! from elsewhere. So if a replica held event A when it stamped event B, `hlc(A) < hlc(B)`.
//!
//! The clock never reads time: the caller passes `now_ms`. A remote stamp further ahead than
//! [`CLOCK_DRIFT_MS_MAX`] is refused instead of dragging the local clock into the future.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CrdtError;

/// How far (ms) a remote stamp's wall component may run ahead of the local wall clock before
/// [`HlcClock::observe`] refuses it. Bounds how far one bad clock can push every replica's
/// stamps ahead of real time.
pub const CLOCK_DRIFT_MS_MAX: u64 = 60_000;

/// A hybrid logical timestamp. Ordered by `wall_ms`, then `logical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the issuing replica's clock saw it (or later).
    pub wall_ms: u64,
    /// Orders stamps that share `wall_ms`.
    pub logical: u32,
}

impl Hlc {
    /// The smallest stamp.
    pub const ZERO: Hlc = Hlc { wall_ms: 0, logical: 0 };

    /// A stamp from its parts.
    pub fn new(wall_ms: u64, logical: u32) -> Self {
        Hlc { wall_ms, logical }
    }

    /// The smallest stamp greater than `self`: the next logical value, or the next millisecond
    /// when the logical part is exhausted.
    pub fn successor(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc { wall_ms: self.wall_ms, logical },
            None => Hlc {
                wall_ms: self.wall_ms.checked_add(1).expect("HLC wall clock overflow: wall_ms reached u64::MAX"),
                logical: 0,
            },
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// One replica's clock: the last stamp it issued. Persist [`HlcClock::last`] with the events it
/// stamped and [`HlcClock::resume`] from it after a restart (stamping through
/// [`crate::RoomLog::stamp`] also observes every held event, so a lost clock cannot reissue an
/// old stamp in a room).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has issued nothing.
    pub fn new() -> Self {
        HlcClock::default()
    }

    /// A clock that continues after `last`.
    pub fn resume(last: Hlc) -> Self {
        HlcClock { last }
    }

    /// The last stamp issued (or [`Hlc::ZERO`]).
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new local stamp, strictly greater than every stamp this clock issued before: the wall
    /// clock if it moved past the last stamp, else the last stamp's successor.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = self.next_after(self.last, now_ms);
        self.last
    }

    /// A new stamp strictly greater than both `remote` and every stamp issued before. Refuses a
    /// `remote` whose wall component is more than [`CLOCK_DRIFT_MS_MAX`] ahead of `now_ms`, and
    /// then leaves the clock unchanged.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<Hlc, CrdtError> {
        if remote.wall_ms > now_ms.saturating_add(CLOCK_DRIFT_MS_MAX) {
            return Err(CrdtError::ClockDrift {
                remote_wall_ms: remote.wall_ms,
                now_ms,
                drift_max_ms: CLOCK_DRIFT_MS_MAX,
            });
        }
        self.last = self.next_after(self.last.max(remote), now_ms);
        Ok(self.last)
    }

    fn next_after(&self, floor: Hlc, now_ms: u64) -> Hlc {
        if now_ms > floor.wall_ms { Hlc { wall_ms: now_ms, logical: 0 } } else { floor.successor() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_follows_the_wall_clock_forward() {
        let mut clock = HlcClock::new();
        assert_eq!(clock.tick(100), Hlc::new(100, 0));
        assert_eq!(clock.tick(250), Hlc::new(250, 0));
    }

    #[test]
    fn tick_is_strictly_monotonic_when_the_wall_clock_stalls_or_goes_back() {
        let mut clock = HlcClock::new();
        let mut previous = clock.tick(1_000);
        for now_ms in [1_000, 999, 500, 0, 1_000, 1_001, 700] {
            let stamp = clock.tick(now_ms);
            assert!(stamp > previous, "{stamp} after {previous} at wall {now_ms}");
            previous = stamp;
        }
        assert_eq!(previous, Hlc::new(1_001, 1));
    }

    #[test]
    fn observe_moves_past_the_remote_and_the_last_stamp() {
        let mut clock = HlcClock::new();
        clock.tick(1_000);
        let remote = Hlc::new(5_000, 7);
        let stamp = clock.observe(remote, 1_000).expect("within drift");
        assert_eq!(stamp, Hlc::new(5_000, 8));
        // A remote behind the clock still yields a fresh stamp.
        let stamp2 = clock.observe(Hlc::new(10, 0), 1_000).expect("old remote");
        assert_eq!(stamp2, Hlc::new(5_000, 9));
        // The wall clock overtakes both.
        assert_eq!(clock.observe(Hlc::new(10, 0), 6_000).expect("old remote"), Hlc::new(6_000, 0));
    }

    #[test]
    fn observe_accepts_drift_up_to_the_limit_and_refuses_beyond() {
        let now_ms = 1_000_000;
        let mut clock = HlcClock::new();
        let at_limit = Hlc::new(now_ms + CLOCK_DRIFT_MS_MAX, 0);
        assert_eq!(clock.observe(at_limit, now_ms), Ok(Hlc::new(now_ms + CLOCK_DRIFT_MS_MAX, 1)));

        let mut clock = HlcClock::resume(Hlc::new(now_ms, 3));
        let beyond = Hlc::new(now_ms + CLOCK_DRIFT_MS_MAX + 1, 0);
        let error = clock.observe(beyond, now_ms).expect_err("beyond the drift limit");
        assert_eq!(
            error,
            CrdtError::ClockDrift {
                remote_wall_ms: now_ms + CLOCK_DRIFT_MS_MAX + 1,
                now_ms,
                drift_max_ms: CLOCK_DRIFT_MS_MAX
            }
        );
        assert!(error.is_retryable());
        assert_eq!(clock.last(), Hlc::new(now_ms, 3), "a refused observe leaves the clock alone");
    }

    #[test]
    fn logical_overflow_bumps_the_wall_component() {
        let mut clock = HlcClock::resume(Hlc::new(42, u32::MAX));
        assert_eq!(clock.tick(10), Hlc::new(43, 0));
        assert_eq!(clock.tick(10), Hlc::new(43, 1));
    }

    #[test]
    fn order_is_wall_then_logical() {
        assert!(Hlc::new(1, 9) < Hlc::new(2, 0));
        assert!(Hlc::new(2, 0) < Hlc::new(2, 1));
        assert_eq!(Hlc::new(7, 3).to_string(), "7.3");
    }
}
