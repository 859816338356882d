//! # palaver-router: where a room lives
//!
//! Routing answers two questions for every request: which shard holds this room (or user), and
//! which nodes hold that shard. Both answers come from consistent hashing ([`ring`]): rooms and
//! users hash onto a fixed set of data shards, shards onto the registered nodes. The meta group
//! (shard 0) holds the node registry that placement is computed from, so every node computes
//! the same placement from the same registry.
//!
//! Non-goals (for now): the libp2p Kademlia DHT that carries node and shard directory records,
//! and the route cache with its invalidation; both come with the routing-plane issue. Until
//! then a node learns the registry from the meta group and the leader of a shard from the
//! redirects its replicas answer with.

pub mod ring;

pub use ring::{NODE_VNODES, REPLICATION_FACTOR, SHARD_COUNT_MAX, SHARD_VNODES, ShardRing, placement};
