//! # palaver-router: where a room lives
//!
//! Routing answers two questions for every request: which shard holds this room (or user), and
//! which nodes hold that shard. Both answers come from consistent hashing ([`ring`]): rooms and
//! users hash onto a fixed set of data shards, shards onto the registered nodes. The meta group
//! (shard 0) holds the node registry that placement is computed from, so every node computes
//! the same placement from the same registry.
//!
//!
//! Finding the nodes themselves, and each shard's replicas and leader without asking the meta
//! group, is the DHT's job ([`dht`]): every node runs a libp2p swarm with Kademlia, and stores
//! sealed [`records`] in it — node records (ids and addresses) and shard directory records
//! (replicas, leader, configuration epoch). The [`cache`] keeps what a node learned, and the
//! node's routing layer resolves room -> shard -> replicas from the ring, the cache, the DHT,
//! then a meta replica, in that order.

pub mod cache;
pub mod dht;
pub mod records;
pub mod ring;

pub use cache::{Route, RouteCache, RouteCounters};
pub use dht::{Dht, DhtConfig, DhtError, DhtPeer};
pub use records::{Entry, NodeRecord, RecordError, RecordKey, RecordSeal, ShardEpoch, ShardRecord};

pub use ring::{NODE_VNODES, REPLICATION_FACTOR, SHARD_COUNT_MAX, SHARD_VNODES, ShardRing, placement};
