//! The shard replicas a node runs, started on demand and stopped together.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use palaver_ids::{NodeId, ShardId};
use palaver_shard::{
    Cf, GroupCommit, KvEngine, NodeCrdt, Replica, ReplicaOptions, ShardLogStore, StartError, StorageError, WriteBatch,
};

use crate::peer::Peers;
use crate::raft_network::ShardNetworkFactory;

/// Key of the node's CRDT life counter in the `node` family: the life its stores issue dots
/// under ([`palaver_crdt::ReplicaId::incarnation`]).
const CRDT_LIFE_KEY: &[u8] = b"crdt_life";
/// Key of the life that ended with a clean shutdown: every dot it issued is durable.
const CRDT_LIFE_CLOSED_KEY: &[u8] = b"crdt_life_closed";

/// Begin this start's CRDT life, fsynced before any store opens: the last life again if it
/// ended with a clean shutdown ([`ReplicaSet::shutdown`]: every dot it issued is durable, so
/// its stores go on after them), else a new one (a crash may have lost dots that a peer or a
/// subscriber had already been shown, so they must never be issued again).
pub fn begin_life(engine: &dyn KvEngine) -> Result<u64, StorageError> {
    use crate::directory::{BOOT_COUNT_KEY, read_counter};
    // Data directories from before the life counter used the boot count as the life.
    let last = match read_counter(engine, CRDT_LIFE_KEY)? {
        Some(life) => life,
        None => read_counter(engine, BOOT_COUNT_KEY)?.unwrap_or(0),
    };
    let closed = read_counter(engine, CRDT_LIFE_CLOSED_KEY)?;
    let life = if last > 0 && closed == Some(last) { last } else { last + 1 };
    let mut batch = WriteBatch::new();
    batch.put(Cf::Node, CRDT_LIFE_KEY.to_vec(), life.to_be_bytes().to_vec());
    // Gone before the first dot of this start: a crash from here on ends the life.
    batch.delete(Cf::Node, CRDT_LIFE_CLOSED_KEY.to_vec());
    engine.write(batch)?;
    engine.sync()?;
    Ok(life)
}

/// Record `life` as closed; only once every dot it issued is fsynced.
fn mark_closed(engine: &dyn KvEngine, life: u64) -> Result<(), StorageError> {
    let mut batch = WriteBatch::new();
    batch.put(Cf::Node, CRDT_LIFE_CLOSED_KEY.to_vec(), life.to_be_bytes().to_vec());
    engine.write(batch)?;
    engine.sync()
}

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
    /// No replicas yet, for the `life`-th life of `node` ([`begin_life`]; its CRDT stores
    /// issue dots under a replica id of this life: [`NodeCrdt::for_life`]).
    pub fn new(
        node: NodeId,
        life: u64,
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
            crdt: NodeCrdt::for_life(life),
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

    /// Stop every replica, then end the CRDT life cleanly: no store stamps another event,
    /// every event stamped is fsynced, and the life is recorded as closed, so that the next
    /// start goes on under the same replica id instead of adding one to every room's version
    /// vector ([`begin_life`]).
    pub async fn shutdown(&self) {
        let replicas: Vec<Replica> =
            std::mem::take(&mut *self.replicas.write().unwrap_or_else(|p| p.into_inner())).into_values().collect();
        for replica in replicas {
            if let Err(e) = replica.raft.shutdown().await {
                tracing::warn!(shard = %replica.shard, error = %e, "raft shutdown failed");
            }
        }
        if let Err(e) = self.close_life() {
            tracing::warn!(node = %self.node, error = %e, "CRDT life not closed: the next start begins a new one");
        }
    }

    fn close_life(&self) -> Result<(), StorageError> {
        let life = self.crdt.life();
        if life == 0 {
            return Ok(());
        }
        self.crdt.seal();
        self.engine.sync()?;
        mark_closed(self.engine.as_ref(), life)
    }
}

#[cfg(test)]
mod tests {
    use palaver_shard::MemEngine;

    use super::*;

    #[test]
    fn a_life_goes_on_after_a_clean_shutdown_and_never_after_a_crash() {
        let engine = MemEngine::new();
        assert_eq!(begin_life(&engine).expect("life"), 1, "the first start");
        assert_eq!(begin_life(&engine).expect("life"), 2, "a crash ended the first life");
        mark_closed(&engine, 2).expect("close");
        assert_eq!(begin_life(&engine).expect("life"), 2, "a clean shutdown: the same life goes on");
        assert_eq!(begin_life(&engine).expect("life"), 3, "the mark is gone once the life goes on: a crash ends it");
        mark_closed(&engine, 2).expect("close");
        assert_eq!(begin_life(&engine).expect("life"), 4, "a mark for an older life does not revive it");
    }

    #[test]
    fn a_directory_from_before_the_life_counter_goes_on_after_its_boot_count() {
        let engine = MemEngine::new();
        let mut batch = WriteBatch::new();
        batch.put(Cf::Node, crate::directory::BOOT_COUNT_KEY.to_vec(), 5u64.to_be_bytes().to_vec());
        engine.write(batch).expect("write");
        assert_eq!(begin_life(&engine).expect("life"), 6, "its last life was its boot count, 5");
    }
}
