//! The typed identifiers that every palaver crate shares.
//!
//! They live in a crate of their own so that `palaver-shard` and `palaver-router` can agree on
//! them without depending on each other. Nothing here does I/O; every type is a plain value
//! that serializes with serde.
//!
//! - [`NodeId`]: a node of the cluster, assigned by the meta group when the node joins and never
//!   reused.
//! - [`ShardId`]: a Raft group. Shard `0` is the meta group; data shards are `1..=shard_count`.
//! - [`RoomId`]: a room's id, chosen by its creator (`general`, `rust-dev`); the room's shard is
//!   derived from it by hashing.
//! - [`UserName`]: a user's unique login name; the user's record lives in the shard its name
//!   hashes to.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node of the cluster. Assigned by the meta group, starting at 1, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct NodeId(pub u64);

/// A shard: one Raft group of (up to) three replicas. Shard 0 is the meta group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ShardId(pub u32);

impl ShardId {
    /// The meta group: node registry, shard placement, the cluster's token secret.
    pub const META: ShardId = ShardId(0);

    /// Whether this is the meta group.
    pub fn is_meta(self) -> bool {
        self == Self::META
    }
}

/// A room's id as its creator chose it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoomId(pub String);

/// A user's unique login name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserName(pub String);

macro_rules! display_inner {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
display_inner!(NodeId, ShardId, RoomId, UserName);

impl RoomId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl UserName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for RoomId {
    fn from(s: &str) -> Self {
        RoomId(s.to_owned())
    }
}

impl From<&str> for UserName {
    fn from(s: &str) -> Self {
        UserName(s.to_owned())
    }
}
