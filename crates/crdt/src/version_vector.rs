//! Replica ids, dots and version vectors: who issued an event, and who has seen what.
//!
//! A [`Dot`] `(replica, counter)` names one event: the `counter`-th event its replica issued in a
//! room, counting from 1. A [`VersionVector`] maps each replica to the highest counter held.
//! Because a room log holds its events without gaps (see [`crate::RoomLog`]), the vector *is*
//! the set of held events: `vv` holds exactly the dots `1..=vv[R]` of every replica `R`. Two
//! replicas catch up by exchanging vectors and sending each other what the other lacks.
//!
//! [`VersionVector`] wraps `crdts::VClock` and keeps it canonical: no zero entries, so equal
//! sets of events give equal (and byte-identical serialized) vectors.

use std::collections::BTreeMap;
use std::fmt;

use crdts::{CmRDT, VClock};
use palaver_ids::NodeId;
use serde::{Deserialize, Serialize};

/// A replica of a shard, in one life of the node that holds it ([`ReplicaId::incarnation`]),
/// or a bare node id. Dots and version vectors are keyed by it; it also breaks ties in the
/// total order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl ReplicaId {
    /// The replica id of node `node` in its `life`-th life: `node << 32 | life` (the life's
    /// low 32 bits). A node shares its own events before they are fsynced; after a crash it
    /// may have lost some that peers and subscribers hold, so each start after a crash issues
    /// dots under a new id, and no dot is ever issued twice. Life 0 is the bare node id.
    pub fn incarnation(node: u64, life: u64) -> ReplicaId {
        if life == 0 { ReplicaId(node) } else { ReplicaId((node << 32) | (life & 0xffff_ffff)) }
    }
}

impl From<NodeId> for ReplicaId {
    fn from(node: NodeId) -> Self {
        ReplicaId(node.0)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// One event's identity: the `counter`-th event `replica` issued in the room (from 1).
/// Ordered by replica, then counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The replica that issued the event.
    pub replica: ReplicaId,
    /// Its sequence number at that replica, from 1, without gaps.
    pub counter: u64,
}

impl Dot {
    /// A dot from its parts.
    pub fn new(replica: ReplicaId, counter: u64) -> Self {
        Dot { replica, counter }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.replica, self.counter)
    }
}

/// The highest counter held per replica. Canonical: replicas at 0 have no entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "BTreeMap<ReplicaId, u64>", into = "BTreeMap<ReplicaId, u64>")]
pub struct VersionVector(VClock<ReplicaId>);

impl VersionVector {
    /// The empty vector: nothing held.
    pub fn new() -> Self {
        VersionVector::default()
    }

    /// The highest counter of `replica` (0 if none).
    pub fn get(&self, replica: ReplicaId) -> u64 {
        self.0.get(&replica)
    }

    /// Whether `dot` is covered: `0 < dot.counter <= self[dot.replica]`.
    pub fn contains(&self, dot: Dot) -> bool {
        dot.counter != 0 && dot.counter <= self.get(dot.replica)
    }

    /// Raise `dot.replica`'s entry to `dot.counter` if it is lower.
    pub fn advance(&mut self, dot: Dot) {
        if dot.counter != 0 {
            self.0.apply(crdts::Dot::new(dot.replica, dot.counter));
        }
    }

    /// Pointwise maximum with `other`.
    pub fn merge(&mut self, other: &VersionVector) {
        for (replica, counter) in other.iter() {
            self.advance(Dot::new(replica, counter));
        }
    }

    /// Whether every dot `other` covers is covered by `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.iter().all(|(replica, counter)| self.get(replica) >= counter)
    }

    /// Whether no replica has an entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries `(replica, highest counter)`, in replica order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (ReplicaId, u64)> + '_ {
        self.0.dots.iter().map(|(replica, counter)| (*replica, *counter))
    }

    /// The sum of all entries: how many events the vector covers.
    pub fn event_count(&self) -> u64 {
        self.iter().map(|(_, counter)| counter).sum()
    }
}

impl From<BTreeMap<ReplicaId, u64>> for VersionVector {
    fn from(entries: BTreeMap<ReplicaId, u64>) -> Self {
        let mut vv = VersionVector::new();
        for (replica, counter) in entries {
            vv.advance(Dot::new(replica, counter));
        }
        vv
    }
}

impl From<VersionVector> for BTreeMap<ReplicaId, u64> {
    fn from(vv: VersionVector) -> Self {
        vv.0.dots
    }
}

/// From the protobuf shape (`map<uint64, uint64>`); zero entries are dropped.
impl From<BTreeMap<u64, u64>> for VersionVector {
    fn from(entries: BTreeMap<u64, u64>) -> Self {
        entries.into_iter().map(|(replica, counter)| (ReplicaId(replica), counter)).collect::<BTreeMap<_, _>>().into()
    }
}

/// To the protobuf shape (`map<uint64, uint64>`).
impl From<&VersionVector> for BTreeMap<u64, u64> {
    fn from(vv: &VersionVector) -> Self {
        vv.iter().map(|(replica, counter)| (replica.0, counter)).collect()
    }
}

impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<")?;
        for (i, (replica, counter)) in self.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{replica}:{counter}")?;
        }
        write!(f, ">")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        entries.iter().copied().collect::<BTreeMap<u64, u64>>().into()
    }

    #[test]
    fn every_life_of_every_node_has_its_own_replica_id() {
        let mut seen = std::collections::BTreeSet::new();
        for node in [1u64, 2, 3, 4_000] {
            for life in 1u64..=5 {
                assert!(seen.insert(ReplicaId::incarnation(node, life)), "node {node} life {life}");
            }
        }
        // Never a bare node id (life 0, which tests and data from before lives use).
        assert!((1u64..=4_000).all(|node| !seen.contains(&ReplicaId(node))));
        assert_eq!(ReplicaId::incarnation(3, 0), ReplicaId(3));
        assert_eq!(ReplicaId::incarnation(3, 2), ReplicaId((3 << 32) | 2));
    }

    #[test]
    fn get_and_contains() {
        let v = vv(&[(1, 3), (2, 1)]);
        assert_eq!(v.get(ReplicaId(1)), 3);
        assert_eq!(v.get(ReplicaId(9)), 0);
        assert!(v.contains(Dot::new(ReplicaId(1), 1)));
        assert!(v.contains(Dot::new(ReplicaId(1), 3)));
        assert!(!v.contains(Dot::new(ReplicaId(1), 4)));
        assert!(!v.contains(Dot::new(ReplicaId(1), 0)), "counter 0 names no event");
        assert!(!v.contains(Dot::new(ReplicaId(3), 1)));
    }

    #[test]
    fn merge_is_pointwise_max_and_dominates_follows() {
        let mut a = vv(&[(1, 3), (2, 1)]);
        let b = vv(&[(2, 5), (3, 2)]);
        assert!(!a.dominates(&b) && !b.dominates(&a));
        a.merge(&b);
        assert_eq!(a, vv(&[(1, 3), (2, 5), (3, 2)]));
        assert!(a.dominates(&b));
        assert_eq!(a.event_count(), 10);
    }

    #[test]
    fn entries_iterate_in_replica_order() {
        let v = vv(&[(9, 1), (2, 4), (5, 2)]);
        let entries: Vec<_> = v.iter().collect();
        assert_eq!(entries, vec![(ReplicaId(2), 4), (ReplicaId(5), 2), (ReplicaId(9), 1)]);
        assert_eq!(v.to_string(), "<2:4, 5:2, 9:1>");
    }

    #[test]
    fn protobuf_map_round_trip_is_canonical() {
        let v = vv(&[(1, 0), (2, 4)]);
        assert!(v == vv(&[(2, 4)]), "zero entries are dropped");
        assert_eq!(BTreeMap::<u64, u64>::from(&v), BTreeMap::from([(2, 4)]));
        assert!(vv(&[(1, 0)]).is_empty());
    }

    #[test]
    fn serde_drops_zero_entries() {
        let with_zero: BTreeMap<ReplicaId, u64> = BTreeMap::from([(ReplicaId(1), 0), (ReplicaId(2), 4)]);
        let bytes = postcard::to_allocvec(&with_zero).expect("encode");
        let decoded: VersionVector = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(decoded, vv(&[(2, 4)]));
        let again = postcard::to_allocvec(&decoded).expect("encode");
        assert_eq!(again, postcard::to_allocvec(&vv(&[(2, 4)])).expect("encode"));
    }
}
