//! Starting one shard replica: its Raft configuration, log store and state machine.

use std::sync::Arc;

use openraft::network::RaftNetworkFactory;
use openraft::{Config, SnapshotPolicy};
use palaver_crdt::ReplicaId;
use palaver_ids::{NodeId, ShardId};

use crate::crdt_store::{CrdtStore, NodeCrdt};
use crate::engine::KvEngine;
use crate::error::StorageError;
use crate::log_store::{GroupCommit, ShardLogStore};
use crate::state_machine::ShardStateMachine;
use crate::types::{Raft, SnapshotData, TypeConfig};

/// Leader heartbeat interval.
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Shortest election timeout.
pub const ELECTION_TIMEOUT_MS_MIN: u64 = 300;
/// A heartbeat to a follower that acknowledged a replication request sent this recently is
/// skipped: under writes the appends already prove the leader alive and renew its lease.
pub const HEARTBEAT_SUPPRESS_MS: u64 = 100;
/// Longest election timeout.
pub const ELECTION_TIMEOUT_MS_MAX: u64 = 600;
/// Build a snapshot after this many applied entries by default.
pub const SNAPSHOT_LOGS_SINCE_LAST_DEFAULT: u64 = 5_000;
/// Most entries in one AppendEntries request.
pub const APPEND_ENTRIES_MAX: u64 = 512;

const _: () = assert!(
    HEARTBEAT_INTERVAL_MS * 2 < ELECTION_TIMEOUT_MS_MIN,
    "a follower must see two heartbeats per election timeout"
);
// openraft ticks every heartbeat_interval * 13 / 64 ms; a suppressed heartbeat goes out at the
// first tick after its deadline, which must come before any follower's election timeout.
const _: () = assert!(
    HEARTBEAT_INTERVAL_MS + HEARTBEAT_SUPPRESS_MS + HEARTBEAT_INTERVAL_MS * 13 / 64 < ELECTION_TIMEOUT_MS_MIN,
    "heartbeat suppression must not let a follower time out"
);
const _: () = assert!(ELECTION_TIMEOUT_MS_MIN < ELECTION_TIMEOUT_MS_MAX, "election timeouts need a random spread");

/// Tunables of a shard replica that tests and operators change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaOptions {
    /// Build a snapshot (and purge the log behind it) after this many entries.
    pub snapshot_logs_since_last: u64,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self { snapshot_logs_since_last: SNAPSHOT_LOGS_SINCE_LAST_DEFAULT }
    }
}

/// The openraft configuration of every shard group.
pub fn raft_config(options: ReplicaOptions) -> Result<Arc<Config>, String> {
    let config = Config {
        cluster_name: "palaver".to_string(),
        heartbeat_interval: HEARTBEAT_INTERVAL_MS,
        heartbeat_min_interval: Some(HEARTBEAT_SUPPRESS_MS),
        election_timeout_min: ELECTION_TIMEOUT_MS_MIN,
        election_timeout_max: ELECTION_TIMEOUT_MS_MAX,
        enable_pre_vote: Some(true),
        max_payload_entries: APPEND_ENTRIES_MAX,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: options.snapshot_logs_since_last / 5,
        install_snapshot_timeout: 10_000,
        // The state machine lives in memory and is rebuilt at a restart up to the committed
        // log id saved last, which a crash can leave a little behind (it is durable with the
        // next fsync). A leader restored as leader at startup (openraft's default) would confirm
        // its leadership with a quorum and answer linearizable reads from that state (with the
        // id saved every 64 entries, a user registered before a restart was not found); as a
        // follower it learns the true commit from the next leader before it leads.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    config.validate().map(Arc::new).map_err(|e| format!("invalid raft config: {e}"))
}

/// One started shard replica: its Raft handle, a shared view of its state machine, and its
/// CRDT store.
#[derive(Debug, Clone)]
pub struct Replica {
    /// The shard.
    pub shard: ShardId,
    /// The Raft group handle.
    pub raft: Raft,
    /// The applied state, for reads.
    pub state: ShardStateMachine,
    /// The rooms' messages, reactions, presence, typing and read markers.
    pub crdt: CrdtStore,
}

/// Errors starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The engine failed or holds corrupt data.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// openraft refused to start.
    #[error("raft failed to start: {0}")]
    Raft(String),
}

impl Replica {
    /// Start the replica of `shard` on node `node`, restoring whatever `engine` holds for it.
    /// `crdt` is what the node's CRDT stores share (its hybrid clock, its own-changes signal).
    pub async fn start<N>(
        node: NodeId,
        shard: ShardId,
        engine: Arc<dyn KvEngine>,
        group_commit: GroupCommit,
        network: N,
        options: ReplicaOptions,
        crdt: NodeCrdt,
    ) -> Result<Self, StartError>
    where
        N: RaftNetworkFactory<TypeConfig>,
        N::Network: openraft::network::NetSnapshot<TypeConfig, SnapshotData = SnapshotData>,
    {
        let config = raft_config(options).map_err(StartError::Raft)?;
        let crdt = CrdtStore::open(shard, ReplicaId(node.0), engine.clone(), group_commit.clone(), crdt)?;
        let log_store = ShardLogStore::new(shard, engine.clone(), group_commit);
        let state = ShardStateMachine::open(shard, engine)?;
        let raft = openraft::Raft::new(node.0, config, network, log_store, state.clone())
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        Ok(Self { shard, raft, state, crdt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings correctness rests on, pinned: a restarted node never resumes as leader (its
    /// rebuilt state may lag what it had applied), pre-vote keeps a rejoining node from
    /// deposing a healthy leader, elections wait out missed heartbeats; and the snapshot
    /// policy follows the options.
    #[test]
    fn every_group_runs_with_the_settings_correctness_rests_on() {
        let config = raft_config(ReplicaOptions::default()).expect("valid");
        assert_eq!(config.enable_leader_restore, Some(false));
        assert_eq!(config.enable_pre_vote, Some(true));
        assert_eq!(config.heartbeat_interval, HEARTBEAT_INTERVAL_MS);
        assert!(config.election_timeout_min > 2 * config.heartbeat_interval);
        assert_eq!(config.max_in_snapshot_log_to_keep, SNAPSHOT_LOGS_SINCE_LAST_DEFAULT / 5);
        let small = raft_config(ReplicaOptions { snapshot_logs_since_last: 50 }).expect("valid");
        assert_eq!(small.snapshot_policy, SnapshotPolicy::LogsSinceLast(50));
    }
}
