//! The cluster as this node knows it, and keeping the shard groups placed where the meta group
//! says.
//!
//! - **Identity** ([`NodeIdentity`]): the node id, the cluster id, the token secret and the shard
//!   count, persisted in the engine's `node` family when the node initializes or joins the
//!   cluster, and read back on every restart.
//! - **View** ([`ClusterView`]): the meta group's cluster record (node registry) with the meta
//!   log index it reflects. A node that holds a meta replica reads it locally; the others ask
//!   peers (`PeerService.ClusterMap`) and keep the freshest answer.
//! - **Reconcile** ([`reconcile_once`]): every [`RECONCILE_INTERVAL_MS`], the node starts the
//!   replicas that placement assigns to it, and for each shard it leads, moves the group's voters
//!   towards the placement: add the missing nodes as learners (which waits until they caught
//!   up, by log or by snapshot), then change the voters in one joint-consensus step. One change
//!   per shard at a time, at most [`MEMBERSHIP_CHANGES_IN_FLIGHT_MAX`] per node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use palaver_ids::{NodeId, ShardId};
use palaver_proto::v1::ClusterMapRequest;
use palaver_shard::meta::ClusterInfo;
use palaver_shard::{Cf, KvEngine, StorageError, WriteBatch, keys};
use serde::{Deserialize, Serialize};

use crate::node::NodeInner;

/// How often a node refreshes its view and reconciles placement.
pub const RECONCILE_INTERVAL_MS: u64 = 300;
/// Most membership changes one node drives at once.
pub const MEMBERSHIP_CHANGES_IN_FLIGHT_MAX: usize = 4;

/// Who this node is, persisted once it belongs to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// This node's id.
    pub node_id: NodeId,
    /// The cluster it belongs to.
    pub cluster_id: String,
    /// The key that signs login tokens.
    pub token_secret: Vec<u8>,
    /// Number of data shards.
    pub shard_count: u32,
}

impl NodeIdentity {
    /// The identity stored in `engine`, if the node has one.
    pub fn load(engine: &dyn KvEngine) -> Result<Option<Self>, StorageError> {
        engine.get(Cf::Node, keys::NODE_IDENTITY_KEY)?.map(|bytes| keys::decode(&bytes)).transpose()
    }

    /// Persist (and fsync) this identity.
    pub fn store(&self, engine: &dyn KvEngine) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(Cf::Node, keys::NODE_IDENTITY_KEY.to_vec(), keys::encode(self)?);
        engine.write(batch)?;
        engine.sync()
    }
}

/// The freshest cluster record this node has seen.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The meta group's cluster record (set through [`ClusterView::offer`] only).
    pub info: Option<ClusterInfo>,
    /// The meta log index it reflects.
    pub applied_index: u64,
    /// Placement of every shard (index = shard id), computed when the registered nodes or the
    /// shard count change: client operations ask for it on every call.
    placements: Vec<Vec<NodeId>>,
}

impl ClusterView {
    /// Replace the view if `info` is at least as fresh.
    pub fn offer(&mut self, info: ClusterInfo, applied_index: u64) {
        if self.info.is_some() && applied_index < self.applied_index {
            return;
        }
        let same_nodes = self
            .info
            .as_ref()
            .is_some_and(|held| held.shard_count == info.shard_count && held.nodes.keys().eq(info.nodes.keys()));
        if !same_nodes {
            let nodes: BTreeSet<NodeId> = info.nodes.keys().copied().collect();
            self.placements =
                (0..=info.shard_count).map(|shard| palaver_router::placement(ShardId(shard), &nodes)).collect();
        }
        self.info = Some(info);
        self.applied_index = applied_index;
    }

    /// The gRPC address of node `id`, if registered.
    pub fn addr(&self, id: NodeId) -> Option<String> {
        self.info.as_ref()?.nodes.get(&id).map(|rec| rec.grpc_addr.clone())
    }

    /// Registered nodes and their addresses.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        self.info
            .as_ref()
            .map(|info| info.nodes.iter().map(|(id, rec)| (*id, rec.grpc_addr.clone())).collect())
            .unwrap_or_default()
    }

    /// Where `shard` should live, by consistent hashing over the registered nodes.
    pub fn placement(&self, shard: ShardId) -> Vec<NodeId> {
        usize::try_from(shard.0).ok().and_then(|i| self.placements.get(i)).cloned().unwrap_or_default()
    }
}

/// Whether a shard's status shows its voters exactly where placement wants them (no replica
/// move under way).
pub fn shard_placed(shard: &palaver_proto::v1::ShardStatus) -> bool {
    let mut voters = shard.voters.clone();
    let mut placement = shard.placement.clone();
    voters.sort_unstable();
    placement.sort_unstable();
    voters == placement
}

/// Refresh the view: from the local meta replica if there is one, and from a peer. The local
/// replica alone is not enough: one that the meta group moved away from stays on the node,
/// frozen, and a view taken only from it never learns of nodes that joined later (it then
/// computes every placement without them, and the shards it leads never move to them). The
/// view keeps whichever is newest.
pub async fn refresh_view(node: &Arc<NodeInner>) {
    if let Some(replica) = node.replicas.get(ShardId::META) {
        let (info, index) = {
            let applied = replica.state.read();
            (applied.meta.cluster().cloned(), applied.last_applied.as_ref().map_or(0, |id| id.index))
        };
        if let Some(info) = info {
            node.view_mut().offer(info, index);
        }
    }
    let addrs: Vec<String> = node.view().nodes().into_iter().filter(|(id, _)| *id != node.id).map(|(_, a)| a).collect();
    let addrs = if addrs.is_empty() { node.seeds.clone() } else { addrs };
    for addr in addrs {
        let Ok(link) = node.replicas.peers().link(&addr) else { continue };
        match link.client().cluster_map(ClusterMapRequest {}).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                if reply.cluster.is_empty() {
                    continue;
                }
                match keys::decode::<ClusterInfo>(&reply.cluster) {
                    Ok(info) => {
                        node.view_mut().offer(info, reply.applied_index);
                        return;
                    }
                    Err(e) => tracing::warn!(%addr, error = %e, "malformed cluster map"),
                }
            }
            Err(status) => tracing::debug!(%addr, error = %status.message(), "cluster map unavailable"),
        }
    }
}

/// One reconcile pass: start assigned replicas, drive membership of the shards led here.
pub async fn reconcile_once(node: &Arc<NodeInner>) {
    refresh_view(node).await;
    let view = node.view().clone();
    let Some(info) = view.info.clone() else { return };
    let addrs = view.nodes();
    for shard in (0..=info.shard_count).map(ShardId) {
        let placement = view.placement(shard);
        if placement.contains(&node.id)
            && node.replicas.get(shard).is_none()
            && let Err(e) = node.replicas.ensure(shard).await
        {
            tracing::error!(%shard, error = %e, "cannot start assigned replica");
        }
        let Some(replica) = node.replicas.get(shard) else { continue };
        if !replica.raft.is_leader() || placement.is_empty() {
            continue;
        }
        let voters: BTreeSet<u64> = {
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow_watched();
            let membership = metrics.membership_config.membership();
            if membership.get_joint_config().len() > 1 {
                continue; // a change is still in its joint phase
            }
            membership.voter_ids().collect()
        };
        let wanted: BTreeSet<u64> = placement.iter().map(|n| n.0).collect();
        if voters == wanted {
            continue;
        }
        if !node.begin_membership_change(shard) {
            continue;
        }
        let node = node.clone();
        let addrs = addrs.clone();
        tokio::spawn(async move {
            crate::quiesce::wake_for_write(&node, &replica).await;
            let result = change_voters(&replica, &voters, &wanted, &addrs).await;
            if let Err(e) = result {
                tracing::info!(%shard, error = %e, "membership change did not finish; will retry");
            } else {
                tracing::info!(%shard, ?wanted, "shard voters changed");
            }
            node.end_membership_change(shard);
        });
    }
}

async fn change_voters(
    replica: &palaver_shard::Replica,
    voters: &BTreeSet<u64>,
    wanted: &BTreeSet<u64>,
    addrs: &BTreeMap<NodeId, String>,
) -> Result<(), String> {
    for new in wanted.difference(voters) {
        let addr = addrs.get(&NodeId(*new)).ok_or_else(|| format!("node {new} has no address"))?;
        let node = palaver_shard::types::RaftNode { addr: addr.clone() };
        tokio::time::timeout(std::time::Duration::from_secs(30), replica.raft.add_learner(*new, node, true))
            .await
            .map_err(|_| format!("learner {new} did not catch up in 30 s"))?
            .map_err(|e| e.to_string())?;
    }
    replica.raft.change_membership(wanted.clone(), false).await.map_err(|e| e.to_string())?;
    Ok(())
}
