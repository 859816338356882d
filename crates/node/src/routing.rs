//! Getting a command or a read to the leader of its shard, from any node.
//!
//! The node tries, in order: itself if it leads the shard, the leader its route names (the
//! route cache, else the shard's directory record in the DHT, else the meta group's placement:
//! [`crate::directory::resolve_shard`]), then the route's other replicas and the placement. A
//! replica that does not lead answers with a redirect naming the leader it knows, which
//! corrects the cached route; an unreachable node is moved last in it. The loop retries with backoff until
//! [`ROUTE_DEADLINE_MS`], long enough to ride out an election, so a client does not see a
//! leader change as an error.
//!
//! Execution on the leader ([`execute_local`], [`read_local`]) is the same code whether the
//! request came from a local client or as a forward or read call on a peer link.

use std::sync::Arc;
use std::time::Duration;

use openraft::LinearizerOption;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use palaver_ids::{NodeId, ShardId};
use palaver_proto::v1::{ForwardRequest, ReadRequest, Redirect, forward_reply, read_reply};
use palaver_shard::{Command, Outcome, keys};

use crate::error::ApiError;
use crate::node::NodeInner;
use crate::peer::PeerError;
use crate::query::{Answer, Query};

/// How long a request keeps trying to reach its shard's leader.
pub const ROUTE_DEADLINE_MS: u64 = 8_000;
/// First pause between attempts; doubles up to [`ROUTE_BACKOFF_MS_MAX`].
pub const ROUTE_BACKOFF_MS_MIN: u64 = 20;
/// Longest pause between attempts.
pub const ROUTE_BACKOFF_MS_MAX: u64 = 250;

/// How long a read on the leader waits for a quorum to confirm its leadership when its lease
/// has lapsed (a quiet group, or a busy machine that delayed the heartbeats' answers): it
/// heartbeats at once and waits this long before it fails as unavailable.
pub const READ_QUORUM_WAIT_MS: u64 = 1_000;

const _: () = assert!(ROUTE_BACKOFF_MS_MIN < ROUTE_BACKOFF_MS_MAX);
const _: () = assert!(READ_QUORUM_WAIT_MS < crate::env::PEER_REQUEST_TIMEOUT_MS);
const _: () = assert!(ROUTE_DEADLINE_MS > 4 * palaver_shard::replica::ELECTION_TIMEOUT_MS_MAX);

/// Why the leader could not run a request here.
#[derive(Debug)]
pub enum LocalError {
    /// Not the leader; maybe it knows who is.
    NotLeader(Option<NodeId>),
    /// A real failure.
    Api(ApiError),
}

/// A committed command: its outcome and its log index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// What apply returned.
    pub outcome: Outcome,
    /// Where it is in the shard's log.
    pub log_index: u64,
}

/// Run `command` on this node's replica of `shard`, if it is the leader.
pub async fn execute_local(node: &NodeInner, shard: ShardId, command: Command) -> Result<Committed, LocalError> {
    let Some(replica) = node.replicas.get(shard) else {
        return Err(LocalError::NotLeader(node.leader_hint(shard)));
    };
    crate::quiesce::wake_for_write(node, &replica).await;
    // openraft's futures are kilobytes; boxed, they do not make every request future that
    // can reach them (moved on each spawn and push) that large too.
    match Box::pin(replica.raft.client_write(command)).await {
        Ok(response) => Ok(Committed { outcome: response.data, log_index: response.log_id.index }),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(LocalError::NotLeader(f.leader_id.map(NodeId)))
        }
        Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
            // Leadership changed under the write; route again: the command carries its request
            // identity, so if it did commit, the retry is answered with that outcome.
            Err(LocalError::NotLeader(f.leader_id.map(NodeId)))
        }
        Err(e) => Err(LocalError::Api(ApiError::Unavailable { shard: shard.0, reason: e.to_string() })),
    }
}

/// How a leader confirms it still leads: at once while it holds its lease, else with one
/// heartbeat round, waiting up to [`READ_QUORUM_WAIT_MS`] for a quorum (which renews the lease).
/// openraft's `ReadPolicy::LeaseRead` fails at once when the lease has lapsed instead, which
/// turned a heartbeat answer delayed by a busy machine into an `unavailable` for the client.
pub fn lease_or_quorum() -> LinearizerOption {
    LinearizerOption::new(None, true).with_wait_timeout(Duration::from_millis(READ_QUORUM_WAIT_MS))
}

/// Answer `query` from this node's replica of `shard`, if it is the leader: at once while it
/// holds its lease, else once a quorum confirms it (at most [`READ_QUORUM_WAIT_MS`]).
pub async fn read_local(node: &NodeInner, shard: ShardId, query: &Query) -> Result<Answer, LocalError> {
    let Some(replica) = node.replicas.get(shard) else {
        return Err(LocalError::NotLeader(node.leader_hint(shard)));
    };
    match Box::pin(replica.raft.ensure_linearizable(lease_or_quorum())).await {
        Ok(_) => {}
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
            return Err(LocalError::NotLeader(f.leader_id.map(NodeId)));
        }
        Err(e) => return Err(LocalError::Api(ApiError::Unavailable { shard: shard.0, reason: e.to_string() })),
    }
    let applied = replica.state.read();
    Ok(query.evaluate(&applied.meta))
}

/// The redirect this node answers with when it cannot serve a request for `shard`.
pub fn redirect(node: &NodeInner, leader: Option<NodeId>, reason: &str) -> Redirect {
    let leader_addr = leader.and_then(|id| node.view().addr(id)).unwrap_or_default();
    Redirect { leader_id: leader.map_or(0, |id| id.0), leader_addr, reason: reason.to_owned() }
}

enum Attempt<T> {
    Done(T),
    Redirected(Option<NodeId>),
    Failed(ApiError),
}

/// Commit `command` on the leader of `shard`, wherever it is. The command gets a request
/// identity first, so a retry after an ambiguous failure (committed, answer lost) returns the
/// first outcome instead of applying it again.
pub async fn submit(node: &Arc<NodeInner>, shard: ShardId, command: Command) -> Result<Committed, ApiError> {
    let command = node.identify(command);
    let frame = keys::encode(&command)?;
    route(node, shard, |target| {
        let command = command.clone();
        let frame = frame.clone();
        async move {
            if target == node.id {
                return match execute_local(node, shard, command).await {
                    Ok(done) => Attempt::Done(done),
                    Err(LocalError::NotLeader(hint)) => Attempt::Redirected(hint),
                    Err(LocalError::Api(e)) => Attempt::Failed(e),
                };
            }
            let Some(link) = link_to(node, target).await else { return Attempt::Redirected(None) };
            match link.forward(ForwardRequest { shard: shard.0, command: frame }).await {
                Ok(reply) => match reply.result {
                    Some(forward_reply::Result::Outcome(bytes)) => match keys::decode(&bytes) {
                        Ok(outcome) => Attempt::Done(Committed { outcome, log_index: reply.log_index }),
                        Err(e) => Attempt::Failed(ApiError::Internal(format!("peer outcome: {e}"))),
                    },
                    Some(forward_reply::Result::Redirect(r)) => {
                        Attempt::Redirected((r.leader_id != 0).then_some(NodeId(r.leader_id)))
                    }
                    None => Attempt::Redirected(None),
                },
                Err(PeerError::Unreachable { .. }) => Attempt::Redirected(None),
                Err(PeerError::Remote { code, .. })
                    if code == tonic::Code::Unavailable || code == tonic::Code::Unknown =>
                {
                    Attempt::Redirected(None)
                }
                Err(PeerError::Remote { reason, .. }) => {
                    Attempt::Failed(ApiError::Unavailable { shard: shard.0, reason })
                }
            }
        }
    })
    .await
}

/// Read `query` on the leader of `shard`, wherever it is.
pub async fn read(node: &Arc<NodeInner>, shard: ShardId, query: Query) -> Result<Answer, ApiError> {
    let frame = keys::encode(&query)?;
    route(node, shard, |target| {
        let query = query.clone();
        let frame = frame.clone();
        async move {
            if target == node.id {
                return match read_local(node, shard, &query).await {
                    Ok(answer) => Attempt::Done(answer),
                    Err(LocalError::NotLeader(hint)) => Attempt::Redirected(hint),
                    Err(LocalError::Api(e)) => Attempt::Failed(e),
                };
            }
            let Some(link) = link_to(node, target).await else { return Attempt::Redirected(None) };
            match link.read(ReadRequest { shard: shard.0, query: frame }).await {
                Ok(reply) => match reply.result {
                    Some(read_reply::Result::Answer(bytes)) => match keys::decode(&bytes) {
                        Ok(answer) => Attempt::Done(answer),
                        Err(e) => Attempt::Failed(ApiError::Internal(format!("peer answer: {e}"))),
                    },
                    Some(read_reply::Result::Redirect(r)) => {
                        Attempt::Redirected((r.leader_id != 0).then_some(NodeId(r.leader_id)))
                    }
                    None => Attempt::Redirected(None),
                },
                Err(_) => Attempt::Redirected(None),
            }
        }
    })
    .await
}

async fn link_to(node: &NodeInner, target: NodeId) -> Option<crate::peer::PeerLink> {
    let addr = crate::directory::node_addr(node, target).await?;
    node.replicas.peers().link(&addr).ok()
}

/// The routing loop shared by writes and reads.
async fn route<T, F, Fut>(node: &Arc<NodeInner>, shard: ShardId, mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut(NodeId) -> Fut,
    Fut: std::future::Future<Output = Attempt<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ROUTE_DEADLINE_MS);
    let mut backoff_ms = ROUTE_BACKOFF_MS_MIN;
    let mut rotation = 0usize;
    let mut next: Option<NodeId> = None;
    let mut route = crate::directory::resolve_shard(node, shard).await.replicas;
    loop {
        let target = next.take().or_else(|| pick_target(node, shard, &route, &mut rotation));
        if let Some(target) = target {
            match attempt(target).await {
                Attempt::Done(value) => {
                    node.set_leader_hint(shard, Some(target));
                    return Ok(value);
                }
                Attempt::Failed(error) => return Err(error),
                Attempt::Redirected(Some(hint)) if hint != target => {
                    node.set_leader_hint(shard, Some(hint));
                    next = Some(hint);
                    continue;
                }
                Attempt::Redirected(_) => {
                    node.directory.cache.node_failed(shard, target);
                    if rotation >= route.len().max(1) * 2 {
                        // A full round failed: the route may be stale; resolve it again.
                        node.directory.cache.invalidate(shard);
                        route = crate::directory::resolve_shard(node, shard).await.replicas;
                        rotation = 0;
                    }
                }
            }
        } else if node.view().info.is_none() {
            // No cluster view yet (a node that just started): fetch one.
            Box::pin(crate::cluster::refresh_view(node)).await;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Unavailable { shard: shard.0, reason: "no leader reachable".into() });
        }
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(ROUTE_BACKOFF_MS_MAX);
    }
}

/// The next node to try for `shard`: the local leader, the hint, then the route's replicas and
/// the placement in rotation.
fn pick_target(node: &NodeInner, shard: ShardId, route: &[NodeId], rotation: &mut usize) -> Option<NodeId> {
    if node.replicas.get(shard).is_some_and(|r| r.raft.is_leader()) {
        return Some(node.id);
    }
    if let Some(hint) = node.leader_hint(shard) {
        return Some(hint);
    }
    let mut candidates = route.to_vec();
    for placed in node.view().placement(shard) {
        if !candidates.contains(&placed) {
            candidates.push(placed);
        }
    }
    if let Some(replica) = node.replicas.get(shard) {
        // The group's actual voters may differ from placement while a change is under way.
        let metrics = replica.raft.metrics();
        let voters: Vec<u64> = metrics.borrow_watched().membership_config.membership().voter_ids().collect();
        for voter in voters {
            if !candidates.contains(&NodeId(voter)) {
                candidates.push(NodeId(voter));
            }
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let target = candidates[*rotation % candidates.len()];
    *rotation += 1;
    Some(target)
}
