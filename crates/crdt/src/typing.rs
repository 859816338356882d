//! Typing indicators: who is typing in a room right now.
//!
//! Per user, a last-writer-wins register by [`Hlc`] (ties broken by the rest of the entry, so
//! merge stays a join) that expires [`TYPING_TTL_MS`] after it was written: a client that
//! keeps typing re-sends well within the TTL, and one that vanishes stops showing on its own.
//! Typing is never stored or replayed; the map exists so that replicas agree on it while they
//! fan it out.

use std::collections::{BTreeMap, BTreeSet};

use palaver_ids::UserName;
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;

/// How long (ms) a "typing" write shows unless refreshed.
pub const TYPING_TTL_MS: u64 = 5_000;

/// One write of a user's typing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TypingEntry {
    /// When, by the writing replica's clock. First in the field order: the derived order is the
    /// last-writer-wins order.
    pub hlc: Hlc,
    /// The entry stops showing from this wall-clock time on.
    pub expires_at_ms: u64,
    /// Typing (true) or stopped (false).
    pub typing: bool,
}

/// The typing state of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingMap {
    entries: BTreeMap<UserName, TypingEntry>,
}

impl TypingMap {
    /// Nobody typing.
    pub fn new() -> Self {
        TypingMap::default()
    }

    /// `user` started (`typing`) or stopped typing, stamped `hlc`, written at `now_ms`; the
    /// write expires [`TYPING_TTL_MS`] later. Returns whether it replaced the held entry.
    pub fn set(&mut self, user: UserName, typing: bool, hlc: Hlc, now_ms: u64) -> bool {
        self.set_entry(user, TypingEntry { hlc, expires_at_ms: now_ms.saturating_add(TYPING_TTL_MS), typing })
    }

    /// Write `entry` for `user` if it is later than the entry held; returns whether it was.
    pub fn set_entry(&mut self, user: UserName, entry: TypingEntry) -> bool {
        crate::register::keep_greater(&mut self.entries, user, entry, |new, held| new > held)
    }

    /// Take every later entry of `other`.
    pub fn merge(&mut self, other: &TypingMap) {
        for (user, entry) in &other.entries {
            self.set_entry(user.clone(), *entry);
        }
    }

    /// Who is typing at `now_ms`.
    pub fn typing_at(&self, now_ms: u64) -> BTreeSet<UserName> {
        self.entries
            .iter()
            .filter(|(_, entry)| entry.typing && now_ms < entry.expires_at_ms)
            .map(|(user, _)| user.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ann() -> UserName {
        UserName::from("ann")
    }

    #[test]
    fn typing_shows_until_the_ttl() {
        let mut map = TypingMap::new();
        map.set(ann(), true, Hlc::new(1_000, 0), 1_000);
        assert_eq!(map.typing_at(1_000 + TYPING_TTL_MS - 1), BTreeSet::from([ann()]));
        assert!(map.typing_at(1_000 + TYPING_TTL_MS).is_empty());
    }

    #[test]
    fn stop_wins_over_an_older_start_and_loses_to_a_newer_one() {
        let mut map = TypingMap::new();
        map.set(ann(), true, Hlc::new(1_000, 0), 1_000);
        assert!(map.set(ann(), false, Hlc::new(1_500, 0), 1_500));
        assert!(map.typing_at(1_600).is_empty());
        assert!(!map.set(ann(), true, Hlc::new(1_200, 0), 1_200), "older start is ignored");
        assert!(map.typing_at(1_600).is_empty());
        assert!(map.set(ann(), true, Hlc::new(2_000, 0), 2_000));
        assert_eq!(map.typing_at(2_100), BTreeSet::from([ann()]));
    }

    fn arb_map() -> impl Strategy<Value = TypingMap> {
        prop::collection::vec((0..3u8, any::<bool>(), 0..4u64, 0..3u32, 0..3u64), 0..8).prop_map(|writes| {
            let mut map = TypingMap::new();
            for (u, typing, wall, logical, now) in writes {
                map.set(UserName(format!("u{u}")), typing, Hlc::new(wall, logical), now);
            }
            map
        })
    }

    fn merged(a: &TypingMap, b: &TypingMap) -> TypingMap {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn merge_is_commutative_associative_idempotent(a in arb_map(), b in arb_map(), c in arb_map()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
        }
    }
}
