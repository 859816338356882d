//! The crate's one error type.
//!
//! Every variant is a deterministic answer to the inputs: the same event offered to the same log
//! gives the same error on every replica. Variants are named by what the caller does next, and
//! [`CrdtError::is_retryable`] says whether offering the same input again later can succeed.

use palaver_ids::RoomId;

use crate::version_vector::{Dot, ReplicaId};

/// Why a clock reading, an event or a merge was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The event is not the next one of its replica: the log holds `1..=have` of `replica` and
    /// was offered `got > have + 1`. The caller asks a peer for the missing events (anti-entropy
    /// with the log's version vector) and offers this one again after them.
    #[error("gap in the events of replica {replica}: the log holds up to {have}, offered {got}")]
    Gap {
        /// The replica whose stream has the gap.
        replica: ReplicaId,
        /// The last counter of `replica` the log holds.
        have: u64,
        /// The counter offered.
        got: u64,
    },
    /// A timestamp from elsewhere (a peer's event, a client's "seen" stamp) is further ahead of
    /// the local wall clock than [`crate::CLOCK_DRIFT_MS_MAX`]. Retryable: once the local clock
    /// catches up (or the remote one is fixed) the same stamp is accepted.
    #[error("remote clock {remote_wall_ms} ms is more than {drift_max_ms} ms ahead of local {now_ms} ms")]
    ClockDrift {
        /// The wall component of the refused stamp.
        remote_wall_ms: u64,
        /// The local wall clock when it was refused.
        now_ms: u64,
        /// The allowed drift, [`crate::CLOCK_DRIFT_MS_MAX`].
        drift_max_ms: u64,
    },
    /// The log already holds a different event under this dot: a replica issued one dot twice
    /// (it lost events it had already shipped). Never retryable; the room needs an operator.
    #[error("dot {dot} already holds a different event")]
    ConflictingDot {
        /// The dot issued twice.
        dot: Dot,
    },
    /// The event is malformed (for example a dot with counter 0).
    #[error("invalid event: {reason}")]
    InvalidEvent {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two logs of different rooms were merged.
    #[error("cannot merge the log of room {other} into the log of room {room}")]
    RoomMismatch {
        /// The room of the log merged into.
        room: RoomId,
        /// The room of the other log.
        other: RoomId,
    },
}

impl CrdtError {
    /// Whether offering the same input again later can succeed (after a resend of the missing
    /// events, or after the local clock has moved on).
    pub fn is_retryable(&self) -> bool {
        match self {
            CrdtError::Gap { .. } | CrdtError::ClockDrift { .. } => true,
            CrdtError::ConflictingDot { .. } | CrdtError::InvalidEvent { .. } | CrdtError::RoomMismatch { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_by_variant() {
        let table = [
            (CrdtError::Gap { replica: ReplicaId(1), have: 1, got: 3 }, true),
            (CrdtError::ClockDrift { remote_wall_ms: 2, now_ms: 1, drift_max_ms: 0 }, true),
            (CrdtError::ConflictingDot { dot: Dot::new(ReplicaId(1), 1) }, false),
            (CrdtError::InvalidEvent { reason: "x" }, false),
            (CrdtError::RoomMismatch { room: RoomId::from("a"), other: RoomId::from("b") }, false),
        ];
        for (error, retryable) in table {
            assert_eq!(error.is_retryable(), retryable, "{error}");
        }
    }
}
