//! Consistent hashing: which shard holds a room (or a user), and which nodes hold a shard.
//!
//! Both use `hashring`, whose hasher is SipHash with fixed keys, so every node and every build
//! computes the same answers.
//!
//! - **Key -> shard** ([`ShardRing`]): the data shards `1..=S` are placed on a ring with
//!   [`SHARD_VNODES`] points each; a room id or user name maps to the next point clockwise. S is
//!   fixed when the cluster is created.
//! - **Shard -> nodes** ([`placement`]): the nodes are placed on a ring with [`NODE_VNODES`]
//!   points each; a shard's replicas are the first [`REPLICATION_FACTOR`] *distinct* nodes
//!   clockwise from the shard's hash. `hashring::get_with_replicas` can return one node twice
//!   (two vnodes in a row), so the walk skips nodes it has already taken. Adding a node moves
//!   only the replicas whose walk now meets it first: about `3S/(N+1)`.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use hashring::HashRing;
use palaver_ids::{NodeId, RoomId, ShardId, UserName};

/// Ring points per data shard on the key ring.
pub const SHARD_VNODES: u32 = 64;
/// Ring points per node on the placement ring.
pub const NODE_VNODES: u32 = 32;
/// Replicas per shard when enough nodes are up.
pub const REPLICATION_FACTOR: usize = 3;
/// Most data shards a cluster may be created with.
pub const SHARD_COUNT_MAX: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vnode<T> {
    owner: T,
    point: u32,
}

impl<T: Hash> Hash for Vnode<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.owner.hash(state);
        self.point.hash(state);
    }
}

/// Maps room ids and user names onto the data shards `1..=shard_count`.
#[derive(Debug)]
pub struct ShardRing {
    ring: HashRing<Vnode<u32>>,
    shard_count: u32,
}

impl ShardRing {
    /// A ring over data shards `1..=shard_count`.
    ///
    /// # Panics
    /// If `shard_count` is 0 or above [`SHARD_COUNT_MAX`]: callers validate it first.
    pub fn new(shard_count: u32) -> Self {
        assert!(
            (1..=SHARD_COUNT_MAX).contains(&shard_count),
            "shard count {shard_count} outside 1..={SHARD_COUNT_MAX}"
        );
        let mut ring = HashRing::new();
        for shard in 1..=shard_count {
            for point in 0..SHARD_VNODES {
                ring.add(Vnode { owner: shard, point });
            }
        }
        Self { ring, shard_count }
    }

    /// Number of data shards.
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// The shard that holds `room`.
    pub fn shard_of_room(&self, room: &RoomId) -> ShardId {
        self.shard_of(("room", room.as_str()))
    }

    /// The shard that holds `user`'s account.
    pub fn shard_of_user(&self, user: &UserName) -> ShardId {
        self.shard_of(("user", user.as_str()))
    }

    fn shard_of(&self, key: (&str, &str)) -> ShardId {
        // The ring holds at least one vnode (shard_count >= 1), so `get` always answers.
        ShardId(self.ring.get(&key).map_or(1, |vnode| vnode.owner))
    }
}

/// The nodes that should hold `shard`: up to [`REPLICATION_FACTOR`] distinct nodes from
/// `nodes`, in ring order (the first is the preferred leader). Fewer when fewer nodes exist.
pub fn placement(shard: ShardId, nodes: &BTreeSet<NodeId>) -> Vec<NodeId> {
    let mut ring = HashRing::new();
    for node in nodes {
        for point in 0..NODE_VNODES {
            ring.add(Vnode { owner: node.0, point });
        }
    }
    let wanted = REPLICATION_FACTOR.min(nodes.len());
    let mut chosen: Vec<NodeId> = Vec::with_capacity(wanted);
    if wanted == 0 {
        return chosen;
    }
    // The whole ring in clockwise order from the shard's point (len - 1 extra entries).
    let walk = ring.get_with_replicas(&("shard", shard.0), ring.len().saturating_sub(1)).unwrap_or_default();
    for vnode in walk {
        let node = NodeId(vnode.owner);
        if !chosen.contains(&node) {
            chosen.push(node);
            if chosen.len() == wanted {
                break;
            }
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(ids: impl IntoIterator<Item = u64>) -> BTreeSet<NodeId> {
        ids.into_iter().map(NodeId).collect()
    }

    #[test]
    fn rooms_spread_over_every_shard_and_stay_put() {
        let ring = ShardRing::new(8);
        let mut seen = BTreeSet::new();
        for i in 0..2000 {
            let room = RoomId(format!("room-{i}"));
            let shard = ring.shard_of_room(&room);
            assert!((1..=8).contains(&shard.0));
            assert_eq!(shard, ShardRing::new(8).shard_of_room(&room), "placement is deterministic");
            seen.insert(shard);
        }
        assert_eq!(seen.len(), 8, "every shard gets rooms");
    }

    #[test]
    fn small_clusters_place_on_every_node() {
        assert_eq!(placement(ShardId(3), &nodes([7])), vec![NodeId(7)]);
        let two = placement(ShardId(3), &nodes([1, 2]));
        assert_eq!(two.iter().collect::<BTreeSet<_>>().len(), 2);
        assert!(placement(ShardId(3), &BTreeSet::new()).is_empty());
    }

    proptest! {
        #[test]
        fn replicas_are_distinct_and_adding_a_node_moves_few(n in 3u64..12, shards in 8u32..128) {
            let before_nodes = nodes(1..=n);
            let after_nodes = nodes(1..=n + 1);
            let mut moved = 0usize;
            for shard in 0..=shards {
                let before = placement(ShardId(shard), &before_nodes);
                let after = placement(ShardId(shard), &after_nodes);
                prop_assert_eq!(before.len(), 3);
                prop_assert_eq!(before.iter().collect::<BTreeSet<_>>().len(), 3, "distinct nodes");
                let after_set: BTreeSet<_> = after.iter().collect();
                prop_assert_eq!(after_set.len(), 3);
                // Only the new node may enter a replica set.
                for node in &after {
                    prop_assert!(before.contains(node) || *node == NodeId(n + 1));
                }
                moved += after.iter().filter(|node| !before.contains(node)).count();
            }
            // About 3S/(N+1) replica moves; allow generous slack for small S.
            let expected = 3.0 * f64::from(shards + 1) / (n as f64 + 1.0);
            prop_assert!((moved as f64) < expected * 2.5 + 6.0, "moved {moved}, expected about {expected}");
        }
    }
}
