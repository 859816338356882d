//! openraft's network for palaver: every shard's Raft RPCs go over the node's shared
//! [`Peers`] links, tagged with the shard id and framed with palaver's value framing
//! (`palaver_shard::keys::encode`).

use std::future::Future;
use std::sync::Arc;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, OptionalSend};
use palaver_ids::ShardId;
use palaver_proto::v1::{RaftKind, RaftMessage, SnapshotRequest, raft_reply};
use palaver_shard::keys;
use palaver_shard::types::{RaftNode, Snapshot, SnapshotData, TypeConfig, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::peer::{PeerError, PeerLink, Peers};

/// Builds the network client of one shard towards each of its peers.
#[derive(Debug, Clone)]
pub struct ShardNetworkFactory {
    shard: ShardId,
    peers: Arc<Peers>,
}

impl ShardNetworkFactory {
    /// The factory of `shard` over `peers`.
    pub fn new(shard: ShardId, peers: Arc<Peers>) -> Self {
        Self { shard, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for ShardNetworkFactory {
    type Network = ShardPeerNetwork;

    async fn new_client(&mut self, target: u64, node: &RaftNode) -> Self::Network {
        ShardPeerNetwork { shard: self.shard, target, link: self.peers.link(&node.addr).map_err(|e| e.to_string()) }
    }
}

/// One shard's client towards one peer.
#[derive(Debug)]
pub struct ShardPeerNetwork {
    shard: ShardId,
    target: u64,
    link: Result<PeerLink, String>,
}

fn unreachable(reason: impl std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::new(&AnyError::error(reason.to_string()))
}

fn rpc_error(error: PeerError) -> RPCError<TypeConfig> {
    match error {
        PeerError::Unreachable { .. } => RPCError::Unreachable(unreachable(error)),
        PeerError::Remote { .. } => RPCError::Network(NetworkError::new(&AnyError::error(error.to_string()))),
    }
}

impl ShardPeerNetwork {
    fn link(&self) -> Result<&PeerLink, RPCError<TypeConfig>> {
        self.link
            .as_ref()
            .map_err(|reason| RPCError::Unreachable(unreachable(format!("node {}: {reason}", self.target))))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: RaftKind,
        request: &Req,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let payload =
            keys::encode(request).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))?;
        let message = RaftMessage { shard: self.shard.0, kind: kind as i32, payload };
        let bytes = self.link()?.raft(message).await.map_err(rpc_error)?;
        keys::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))
    }
}

impl RaftNetworkV2<TypeConfig> for ShardPeerNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::Append, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::Vote, &rpc).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::PreVote, &rpc).await
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::TransferLeader, &rpc).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let network = |e: String| StreamingError::Network(NetworkError::new(&AnyError::error(e)));
        let link = self.link.as_ref().map_err(|reason| StreamingError::Unreachable(unreachable(reason)))?;
        let request = SnapshotRequest {
            shard: self.shard.0,
            vote: keys::encode(&vote).map_err(|e| network(e.to_string()))?,
            meta: keys::encode(&snapshot.meta).map_err(|e| network(e.to_string()))?,
            data: snapshot.snapshot.into_inner(),
        };
        let reply = link
            .client()
            .install_snapshot(request)
            .await
            .map_err(|status| StreamingError::Unreachable(unreachable(status.message())))?
            .into_inner();
        match reply.result {
            Some(raft_reply::Result::Payload(bytes)) => keys::decode(&bytes).map_err(|e| network(e.to_string())),
            Some(raft_reply::Result::Error(reason)) => Err(network(reason)),
            None => Err(network("empty snapshot reply".into())),
        }
    }
}
