//! # palaver-shard: one shard replica
//!
//! A *shard* is a Raft group of (up to) three replicas on three distinct nodes; rooms and users
//! hash onto shards. This crate is one replica of one shard: the openraft group's log storage
//! ([`log_store`]), its state machine ([`state_machine`]), and the metadata rules the state
//! machine enforces ([`meta`], over the commands in [`command`]).
//!
//! ## Storage
//! A node keeps every shard it replicates in one key-value engine ([`engine::KvEngine`]): one
//! RocksDB per node in production ([`engine::RocksEngine`]), ordered maps in memory for the
//! simulator ([`engine::MemEngine`]). Every key starts with the shard id ([`keys`]). Raft log
//! appends from all shards of a node are fsynced together by one [`log_store::GroupCommit`]
//! thread before openraft hears that they are durable.
//!
//! ## The CRDT plane
//! Messages, edits, reactions, presence, typing and read markers do not go through Raft: the
//! [`crdt_store`] of each replica accepts them, persists them in the same engine (group-commit
//! fsync, shared with the Raft log), and tracks what is durable and what each peer replica holds,
//! so the node can acknowledge at `one` or `quorum` and replicate by delta and anti-entropy.
//!
//! ## Guarantees
//! - An entry is reported persisted only after an fsync that covers it; a vote is fsynced before
//!   it is used.
//! - Apply is deterministic: the same log gives the same [`MetaState`] and the same
//!   [`Outcome`]s on every replica and after every restart.
//! - A snapshot is fsynced before the log behind it is purged.
//!
//! ## Non-goals (here, for now)
//! - The network: the node crate implements openraft's network over gRPC.
//! - Replica moves (the rebalancing issue).
//! - A state machine larger than memory: the metadata of a shard is held in memory and
//!   snapshotted whole.

pub mod command;
pub mod crdt_store;
pub mod engine;
pub mod error;
pub mod keys;
pub mod log_store;
pub mod meta;
pub mod replica;
pub mod state_machine;
pub mod types;

pub use command::{Command, Outcome, Refusal, RequestId, Role, RoomSettings, Visibility};
pub use crdt_store::{
    CrdtStore, NodeCrdt, PushScope, ReceivedEvents, RoomCell, RoomSummary, SideState, StagedRooms, StoreError, Written,
};
pub use engine::{Cf, KvEngine, MemEngine, RocksEngine, StallingEngine, WriteBatch};
pub use error::StorageError;
pub use log_store::{GroupCommit, GroupCommitCounts, ShardLogStore};
pub use meta::MetaState;
pub use replica::{Replica, ReplicaOptions, StartError};
pub use state_machine::{Applied, ShardStateMachine};
