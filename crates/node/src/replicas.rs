//! The shard replicas a node runs, started on demand and stopped together.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use palaver_ids::{NodeId, ShardId};
use palaver_shard::{GroupCommit, KvEngine, NodeCrdt, Replica, ReplicaOptions, ShardLogStore, StartError};

use crate::peer::Peers;
use crate::raft_network::ShardNetworkFactory;

/// Every replica on this node, by shard.
#[derive(Debug)]
pub struct ReplicaSet {
    node: NodeId,
    engine: Arc<dyn KvEngine>,
    group_commit: GroupCommit,
    peers: Arc<Peers>,
    options: ReplicaOptions,
    crdt: NodeCrdt,
    replicas: RwLock<BTreeMap<ShardId, Replica>>,
    starting: tokio::sync::Mutex<()>,
}

impl ReplicaSet {
    /// No replicas yet, for the `boot`-th start of `node` (its CRDT stores issue dots under a
    /// replica id of this life: [`NodeCrdt::for_life`]).
    pub fn new(
        node: NodeId,
        boot: u64,
        engine: Arc<dyn KvEngine>,
        group_commit: GroupCommit,
        peers: Arc<Peers>,
        options: ReplicaOptions,
    ) -> Self {
        Self {
            node,
            engine,
            group_commit,
            peers,
            options,
            crdt: NodeCrdt::for_life(boot),
            replicas: RwLock::new(BTreeMap::new()),
            starting: tokio::sync::Mutex::new(()),
        }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// What the node's CRDT stores share.
    pub fn crdt(&self) -> &NodeCrdt {
        &self.crdt
    }

    /// The node's group commit (one fsync for many writes).
    pub fn group_commit(&self) -> &GroupCommit {
        &self.group_commit
    }

    /// The shared peer links.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The running replica of `shard`, if any.
    pub fn get(&self, shard: ShardId) -> Option<Replica> {
        self.replicas.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    /// Every running replica.
    pub fn all(&self) -> Vec<Replica> {
        self.replicas.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The replica of `shard`, started (empty, or restored from the engine) if not running.
    pub async fn ensure(&self, shard: ShardId) -> Result<Replica, StartError> {
        if let Some(replica) = self.get(shard) {
            return Ok(replica);
        }
        let _one_at_a_time = self.starting.lock().await;
        if let Some(replica) = self.get(shard) {
            return Ok(replica);
        }
        let network = ShardNetworkFactory::new(shard, self.peers.clone());
        let replica = Replica::start(
            self.node,
            shard,
            self.engine.clone(),
            self.group_commit.clone(),
            network,
            self.options,
            self.crdt.clone(),
        )
        .await?;
        tracing::debug!(node = %self.node, %shard, "replica started");
        self.replicas.write().unwrap_or_else(|p| p.into_inner()).insert(shard, replica.clone());
        Ok(replica)
    }

    /// Start every replica whose Raft state is in the engine (after a restart).
    pub async fn restore(&self, shard_count: u32) -> Result<(), StartError> {
        for shard in (0..=shard_count).map(ShardId) {
            let store = ShardLogStore::new(shard, self.engine.clone(), self.group_commit.clone());
            if store.exists()? {
                self.ensure(shard).await?;
            }
        }
        Ok(())
    }

    /// Stop every replica.
    pub async fn shutdown(&self) {
        let replicas: Vec<Replica> =
            std::mem::take(&mut *self.replicas.write().unwrap_or_else(|p| p.into_inner())).into_values().collect();
        for replica in replicas {
            if let Err(e) = replica.raft.shutdown().await {
                tracing::warn!(shard = %replica.shard, error = %e, "raft shutdown failed");
            }
        }
    }
}
