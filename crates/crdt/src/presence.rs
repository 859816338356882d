//! Presence: each user's status, a last-writer-wins register that expires.
//!
//! A replica that hears from a user's connection writes a [`PresenceEntry`] stamped with its
//! clock; the entry with the greatest `(hlc, replica)` wins everywhere (ties of a buggy double
//! stamp are broken by the rest of the entry, so merge stays a join). An entry counts only until
//! `expires_at_ms`: a user whose connections all went silent reads as
//! [`PresenceStatus::Offline`] without anyone writing that.
//!
//! Entries are never pruned here: dropping an expired winner would let an older entry with a
//! later expiry win again after a merge. The map holds at most one entry per user.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use palaver_ids::UserName;
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::version_vector::ReplicaId;

/// How long (ms) a presence entry counts after it was written, unless refreshed; clients
/// heartbeat well within it.
pub const PRESENCE_TTL_MS: u64 = 90_000;

/// What a user shows as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PresenceStatus {
    /// Connected and active.
    Online,
    /// Connected, idle.
    Away,
    /// Not connected (or expired).
    Offline,
}

/// One write of a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The status written.
    pub status: PresenceStatus,
    /// When, by the writing replica's clock.
    pub hlc: Hlc,
    /// The writing replica.
    pub replica: ReplicaId,
    /// The entry reads as offline from this wall-clock time on.
    pub expires_at_ms: u64,
}

impl PresenceEntry {
    /// An entry written at `now_ms` that expires [`PRESENCE_TTL_MS`] later.
    pub fn new(status: PresenceStatus, hlc: Hlc, replica: ReplicaId, now_ms: u64) -> Self {
        PresenceEntry { status, hlc, replica, expires_at_ms: now_ms.saturating_add(PRESENCE_TTL_MS) }
    }

    /// The status at `now_ms`: offline once expired.
    pub fn status_at(&self, now_ms: u64) -> PresenceStatus {
        if now_ms < self.expires_at_ms { self.status } else { PresenceStatus::Offline }
    }

    /// Last-writer-wins order: `(hlc, replica)`, then the rest so that it is total.
    fn lww_cmp(&self, other: &PresenceEntry) -> Ordering {
        (self.hlc, self.replica, self.expires_at_ms, self.status).cmp(&(
            other.hlc,
            other.replica,
            other.expires_at_ms,
            other.status,
        ))
    }
}

/// The presence of a set of users (a room's members, a shard's users).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceMap {
    entries: BTreeMap<UserName, PresenceEntry>,
}

impl PresenceMap {
    /// An empty map: everyone offline.
    pub fn new() -> Self {
        PresenceMap::default()
    }

    /// Write `entry` for `user` if it is later than the entry held; returns whether it was.
    pub fn set(&mut self, user: UserName, entry: PresenceEntry) -> bool {
        crate::register::keep_greater(&mut self.entries, user, entry, |new, held| held.lww_cmp(new) == Ordering::Less)
    }

    /// Take every later entry of `other`.
    pub fn merge(&mut self, other: &PresenceMap) {
        for (user, entry) in &other.entries {
            self.set(user.clone(), *entry);
        }
    }

    /// The winning entry of `user`, expired or not.
    pub fn entry(&self, user: &UserName) -> Option<&PresenceEntry> {
        self.entries.get(user)
    }

    /// `user`'s status at `now_ms`: offline if unknown or expired.
    pub fn status_at(&self, user: &UserName, now_ms: u64) -> PresenceStatus {
        self.entries.get(user).map_or(PresenceStatus::Offline, |entry| entry.status_at(now_ms))
    }

    /// Every user not offline at `now_ms`, in name order, with their status.
    pub fn present_at(&self, now_ms: u64) -> impl Iterator<Item = (&UserName, PresenceStatus)> {
        self.entries
            .iter()
            .map(move |(user, entry)| (user, entry.status_at(now_ms)))
            .filter(|(_, status)| *status != PresenceStatus::Offline)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ann() -> UserName {
        UserName::from("ann")
    }

    fn entry(status: PresenceStatus, wall_ms: u64, replica: u64, expires_at_ms: u64) -> PresenceEntry {
        PresenceEntry { status, hlc: Hlc::new(wall_ms, 0), replica: ReplicaId(replica), expires_at_ms }
    }

    #[test]
    fn unknown_users_are_offline() {
        assert_eq!(PresenceMap::new().status_at(&ann(), 0), PresenceStatus::Offline);
    }

    #[test]
    fn entry_expires_after_the_ttl() {
        let mut map = PresenceMap::new();
        map.set(ann(), PresenceEntry::new(PresenceStatus::Online, Hlc::new(1_000, 0), ReplicaId(1), 1_000));
        assert_eq!(map.status_at(&ann(), 1_000 + PRESENCE_TTL_MS - 1), PresenceStatus::Online);
        assert_eq!(map.status_at(&ann(), 1_000 + PRESENCE_TTL_MS), PresenceStatus::Offline);
        assert_eq!(map.present_at(1_000).count(), 1);
        assert_eq!(map.present_at(1_000 + PRESENCE_TTL_MS).count(), 0);
    }

    #[test]
    fn latest_write_wins_in_either_order() {
        let older = entry(PresenceStatus::Online, 10, 2, 500);
        let newer = entry(PresenceStatus::Away, 20, 1, 400);
        for (first, second) in [(older, newer), (newer, older)] {
            let mut map = PresenceMap::new();
            map.set(ann(), first);
            map.set(ann(), second);
            assert_eq!(map.entry(&ann()), Some(&newer));
            // The older entry expires later, but the newer one wins and has expired.
            assert_eq!(map.status_at(&ann(), 450), PresenceStatus::Offline);
        }
        let mut map = PresenceMap::new();
        assert!(map.set(ann(), newer));
        assert!(!map.set(ann(), older), "an older write does not replace");
        assert!(!map.set(ann(), newer), "the same write changes nothing");
    }

    #[test]
    fn equal_stamps_break_ties_by_replica() {
        let from_1 = entry(PresenceStatus::Online, 10, 1, 500);
        let from_2 = entry(PresenceStatus::Away, 10, 2, 500);
        let mut a = PresenceMap::new();
        a.set(ann(), from_1);
        a.set(ann(), from_2);
        let mut b = PresenceMap::new();
        b.set(ann(), from_2);
        b.set(ann(), from_1);
        assert_eq!(a, b);
        assert_eq!(a.status_at(&ann(), 0), PresenceStatus::Away);
    }

    fn arb_map() -> impl Strategy<Value = PresenceMap> {
        let arb_entry = (0..3u8, 0..4u64, 0..4u32, 1..3u64, 0..3u64).prop_map(|(s, wall, logical, replica, exp)| {
            let status = [PresenceStatus::Online, PresenceStatus::Away, PresenceStatus::Offline][usize::from(s)];
            PresenceEntry { status, hlc: Hlc::new(wall, logical), replica: ReplicaId(replica), expires_at_ms: exp }
        });
        prop::collection::vec((0..3u8, arb_entry), 0..8).prop_map(|writes| {
            let mut map = PresenceMap::new();
            for (u, e) in writes {
                map.set(UserName(format!("u{u}")), e);
            }
            map
        })
    }

    fn merged(a: &PresenceMap, b: &PresenceMap) -> PresenceMap {
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
