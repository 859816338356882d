//! CRDT operations of clients attached to a node that holds no replica of the room's shard.
//!
//! The node that holds the client's connection authenticates it, then sends the operation to a
//! replica on the peer link ([`forward`]); the replica runs the very same [`Ops`] method a local
//! client would reach ([`answer`]) and sends back its result or its typed error, so the client
//! cannot tell where its room lives. Which replica: the route from
//! [`crate::directory::resolve_shard`], tried in an order rotated by the room's hash (spreading
//! rooms over replicas). A replica that does not hold the shard (the route was stale) or does
//! not answer is moved last in the cached route and the next one is tried; after a full pass,
//! the route is dropped, resolved again (DHT, then meta) and tried once more.
//!
//! A retried write is safe: a post carries its client message id, so a second copy merges away
//! as the same message; edits and reactions are last-writer-wins and set adds.

use std::hash::{Hash, Hasher};

use palaver_crdt::{Hlc, Position};
use palaver_ids::{NodeId, RoomId, UserName};
use palaver_router::{Route, ShardEpoch, ShardRecord};
use palaver_shard::{Replica, Role, keys};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::messaging::{AckLevel, HistoryPage, SideWrite, WriteAck};
use crate::node::NodeInner;
use crate::ops::Ops;
use crate::peer::PeerError;

/// A client's operation, sent to a replica of its room's shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCall {
    /// The epoch of the route the sender used; a replica that knows a newer one answers with
    /// its record, so the sender's cache is corrected.
    pub epoch: ShardEpoch,
    /// The user, authenticated by the sending node.
    pub user: UserName,
    /// The room (validated by the sending node).
    pub room: RoomId,
    /// What to do.
    pub op: ClientOp,
}

/// The operations a replica runs for another node's client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientOp {
    /// [`Ops::post`].
    Post {
        /// Message body.
        body: String,
        /// Client message id.
        client_message_id: String,
        /// Ack level.
        ack: AckLevel,
        /// The newest position the client had seen.
        seen: Option<Hlc>,
    },
    /// [`Ops::edit`].
    Edit {
        /// Message id (hex).
        id: String,
        /// New body.
        body: String,
        /// Ack level.
        ack: AckLevel,
    },
    /// [`Ops::redact`].
    Redact {
        /// Message id (hex).
        id: String,
        /// Ack level.
        ack: AckLevel,
    },
    /// [`Ops::react`].
    React {
        /// Message id (hex).
        id: String,
        /// The reaction.
        reaction: String,
        /// Take it back instead.
        remove: bool,
        /// Ack level.
        ack: AckLevel,
    },
    /// [`Ops::history`].
    History {
        /// Only before this position.
        before: Option<Position>,
        /// Only after this position.
        after: Option<Position>,
        /// Page size.
        limit: usize,
        /// Oldest first instead of newest first.
        oldest_first: bool,
    },
    /// [`Ops::side_write`].
    Side(SideWrite),
    /// [`Ops::unread_count`].
    Unread,
    /// [`Ops::member_role`]: may the user read the room (for a subscription held elsewhere).
    Role,
}

/// What a replica answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientAnswer {
    /// A write's acknowledgement.
    Write(WriteAck),
    /// A page of history.
    History(HistoryPage),
    /// Done, nothing to report.
    Done,
    /// An unread count.
    Unread(u64),
    /// The user's role.
    Role(Role),
}

/// A replica's answer: the result, and its record of the shard if the caller's was older.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReply {
    /// What happened.
    pub result: Result<ClientAnswer, Declined>,
    /// The replica's newer record of the shard.
    pub hint: Option<ShardRecord>,
}

/// Why a replica did not run the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Declined {
    /// It holds no replica of the shard: the caller's route is stale.
    NotReplica,
    /// The operation failed as it would have for a local client.
    Api(ApiError),
}

impl ClientAnswer {
    /// The write acknowledgement, or an internal error if the replica answered something else.
    pub fn write(self) -> Result<WriteAck, ApiError> {
        match self {
            ClientAnswer::Write(ack) => Ok(ack),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(answer: &ClientAnswer) -> ApiError {
    ApiError::Internal(format!("replica answered {answer:?}"))
}

/// Run `op` for `user` in `room` on a replica of the room's shard.
pub async fn forward(node: &NodeInner, user: &UserName, room: &RoomId, op: ClientOp) -> Result<ClientAnswer, ApiError> {
    let shard = node.ring.shard_of_room(room);
    let mut call = ClientCall { epoch: ShardEpoch::default(), user: user.clone(), room: room.clone(), op };
    let mut last_failure = String::from("no replica known");
    for pass in 0..2 {
        if pass == 1 {
            node.directory.cache.invalidate(shard);
        }
        let route = crate::directory::resolve_shard(node, shard).await;
        call.epoch = route.epoch;
        let frame = keys::encode(&call)?;
        for target in rotated(&route.replicas, room) {
            if target == node.id {
                continue;
            }
            let reply = call_replica(node, target, &frame).await.map(|reply| {
                if let Some(hint) = reply.hint {
                    node.directory.cache.hint(shard, Route::from(&hint));
                }
                reply.result
            });
            match reply {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(Declined::Api(error))) => return Err(error),
                Ok(Err(Declined::NotReplica)) => {
                    last_failure = format!("node {target} holds no replica of shard {shard}");
                    node.directory.cache.node_failed(shard, target);
                }
                Err(reason) => {
                    last_failure = reason;
                    node.directory.cache.node_failed(shard, target);
                }
            }
        }
    }
    Err(ApiError::Unavailable { shard: shard.0, reason: last_failure })
}

async fn call_replica(node: &NodeInner, target: NodeId, frame: &[u8]) -> Result<ClientReply, String> {
    let addr =
        crate::directory::node_addr(node, target).await.ok_or_else(|| format!("no address for node {target}"))?;
    let link = node.replicas.peers().link(&addr).map_err(|e| e.to_string())?;
    let bytes = link.client_op(frame.to_vec()).await.map_err(|e| match e {
        PeerError::Unreachable { .. } => format!("node {target} unreachable"),
        other => other.to_string(),
    })?;
    keys::decode(&bytes).map_err(|e| format!("node {target} answered a malformed frame: {e}"))
}

/// `replicas`, starting at a place chosen by the room's hash.
fn rotated(replicas: &[NodeId], room: &RoomId) -> Vec<NodeId> {
    if replicas.is_empty() {
        return Vec::new();
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut hasher);
    let start = (hasher.finish() % replicas.len() as u64) as usize;
    replicas[start..].iter().chain(&replicas[..start]).copied().collect()
}

/// Answer another node's [`ClientCall`] (a framed one) with this node's replica.
pub async fn answer(ops: &Ops, frame: &[u8]) -> Result<Vec<u8>, ApiError> {
    let call: ClientCall = keys::decode(frame).map_err(|e| ApiError::invalid("client call", e.to_string()))?;
    let shard = ops.node().ring.shard_of_room(&call.room);
    let reply = match ops.node().serving_replica(shard) {
        None => ClientReply { result: Err(Declined::NotReplica), hint: None },
        Some(replica) => {
            let caller_epoch = call.epoch;
            let result = run(ops, &replica, call).await.map_err(Declined::Api);
            let hint = crate::directory::newer_shard_record(ops.node(), &replica, caller_epoch);
            ClientReply { result, hint }
        }
    };
    Ok(keys::encode(&reply)?)
}

/// Run `call` through the same [`Ops`] method a local client reaches; `replica` is this
/// node's serving replica of the room's shard.
async fn run(ops: &Ops, replica: &Replica, call: ClientCall) -> Result<ClientAnswer, ApiError> {
    let ClientCall { user, room, op, .. } = call;
    let name = room.as_str();
    match op {
        ClientOp::Post { body, client_message_id, ack, seen } => {
            ops.post(&user, name, &body, &client_message_id, ack, seen).await.map(ClientAnswer::Write)
        }
        ClientOp::Edit { id, body, ack } => ops.edit(&user, name, &id, &body, ack).await.map(ClientAnswer::Write),
        ClientOp::Redact { id, ack } => ops.redact(&user, name, &id, ack).await.map(ClientAnswer::Write),
        ClientOp::React { id, reaction, remove, ack } => {
            ops.react(&user, name, &id, &reaction, remove, ack).await.map(ClientAnswer::Write)
        }
        ClientOp::History { before, after, limit, oldest_first } => {
            ops.history(&user, name, before, after, limit, oldest_first).await.map(ClientAnswer::History)
        }
        ClientOp::Side(write) => ops.side_write(&user, name, write).await.map(|()| ClientAnswer::Done),
        ClientOp::Unread => ops.unread_count(&user, &room).await.map(ClientAnswer::Unread),
        ClientOp::Role => ops.member_role(replica, &room, &user).await.map(ClientAnswer::Role),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_every_replica_once() {
        let replicas = [NodeId(1), NodeId(2), NodeId(3)];
        for room in ["a", "b", "general", "rust"] {
            let mut order = rotated(&replicas, &RoomId(room.into()));
            order.sort();
            assert_eq!(order, replicas);
        }
        assert!(rotated(&[], &RoomId("a".into())).is_empty());
    }

    #[test]
    fn calls_and_typed_errors_survive_the_frame() {
        let call = ClientCall {
            epoch: ShardEpoch { term: 3, config_index: 7 },
            user: UserName("u".into()),
            room: RoomId("r".into()),
            op: ClientOp::Post { body: "hi".into(), client_message_id: "c1".into(), ack: AckLevel::Quorum, seen: None },
        };
        let back: ClientCall = keys::decode(&keys::encode(&call).expect("encodes")).expect("decodes");
        assert_eq!(back, call);
        let refused: Result<ClientAnswer, Declined> = Err(Declined::Api(ApiError::RateLimited { retry_after_ms: 50 }));
        let back: Result<ClientAnswer, Declined> =
            keys::decode(&keys::encode(&refused).expect("encodes")).expect("decodes");
        assert_eq!(back, refused);
        let invalid: Result<ClientAnswer, Declined> = Err(Declined::Api(ApiError::invalid("body", "too long")));
        let back: Result<ClientAnswer, Declined> =
            keys::decode(&keys::encode(&invalid).expect("encodes")).expect("decodes");
        assert_eq!(back, invalid);
    }
}
