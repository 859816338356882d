//! openraft's type configuration for palaver, and short names for the openraft types we use.
//!
//! openraft 0.10 is an alpha; every openraft type the rest of palaver touches is named here so
//! that API churn stays in this crate.

use crate::command::{Command, Outcome};

openraft::declare_raft_types!(
    /// palaver's Raft types: commands and outcomes of the metadata state machine, `u64` node
    /// ids, nodes known by their gRPC address, and the standard leader id (at most one leader
    /// per term).
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// The bytes of a snapshot in flight or at rest.
pub type SnapshotData = std::io::Cursor<Vec<u8>>;
/// One shard's Raft handle.
pub type Raft = openraft::Raft<TypeConfig, crate::state_machine::ShardStateMachine>;
/// A log id (term, leader, index).
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Membership as stored with the log id that set it.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot with its bytes.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
/// A Raft node's address book entry.
pub type RaftNode = openraft::BasicNode;
/// Completion callback for a log append.
pub type IoFlushed = openraft::storage::IOFlushed<TypeConfig>;
