//! The CRDT plane's client operations, written once for every surface: post, edit, redact,
//! react, history, presence, typing and read markers.
//!
//! Each operation is validated at the edge (sizes, rates), authorized against the room's
//! applied membership on this node's replica of the room's shard, and run on that replica's
//! [`palaver_shard::CrdtStore`]: no Raft leader is involved, so chat keeps working while a
//! shard elects or is cut off from its other replicas. A write is acknowledged at the level the
//! client asked ([`AckLevel`]): `one` once it is fsynced here, `quorum` once a second replica
//! reports it fsynced too.
//!
//! Membership comes from the local replica's applied Raft state. A replica may lag its leader
//! by a few milliseconds (a join that just committed), so a user this replica does not know as
//! a member is confirmed with the leader before being refused; if no leader answers within
//! [`MEMBERSHIP_CONFIRM_TIMEOUT_MS`] (a partition), the local answer stands.
//!
//! A node that holds no replica of the room's shard sends the operation to one that does
//! ([`crate::remote`]), which runs the same method here.

use std::time::Duration;

use palaver_crdt::{EventKind, Hlc, MessageId, PageQuery, Position, PresenceEntry, PresenceStatus, RoomLog};
use palaver_ids::{RoomId, UserName};
use palaver_shard::{Refusal, Replica, Role, SideState, Written};

use crate::error::ApiError;
use crate::limits;
use crate::ops::Ops;
use crate::query::{Answer, Query};
use crate::remote::{self, ClientAnswer, ClientOp};
use crate::routing;

/// How long a `quorum` write waits for a second replica before answering `quorum_timeout`.
pub const QUORUM_ACK_TIMEOUT_MS: u64 = 5_000;
/// How long a replica asks its leader to confirm that a user it does not know is no member.
pub const MEMBERSHIP_CONFIRM_TIMEOUT_MS: u64 = 1_000;

/// How durable a write must be before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum AckLevel {
    /// Fsynced on the accepting replica.
    One,
    /// Fsynced on the accepting replica and one more.
    #[default]
    Quorum,
}

/// What a write reached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteAck {
    /// What was written (or found, for a retried post).
    pub written: Written,
    /// The durability reached.
    pub ack: AckLevel,
}

/// What a client may change in a room besides messages.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SideWrite {
    /// Presence in the room.
    Presence(PresenceStatus),
    /// Typing (or stopped).
    Typing(bool),
    /// Read up to this position.
    Read(Position),
}

/// A page of history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryPage {
    /// The messages, in the order asked for.
    pub messages: Vec<palaver_crdt::Message>,
    /// Whether more lie beyond the page.
    pub more: bool,
}

/// A parsed message id.
pub fn message_id(hex: &str) -> Result<MessageId, ApiError> {
    let bad = || ApiError::invalid("message_id", "must be 32 hexadecimal digits");
    if hex.len() != 2 * palaver_crdt::MESSAGE_ID_BYTES || !hex.is_ascii() {
        return Err(bad());
    }
    let mut bytes = [0u8; palaver_crdt::MESSAGE_ID_BYTES];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(MessageId(bytes))
}

impl Ops {
    /// This node's replica of `room`'s shard, if it holds one that serves clients (see
    /// [`crate::node::NodeInner::serving_replica`]).
    pub fn local_replica(&self, room: &RoomId) -> Option<Replica> {
        self.node().serving_replica(self.node().ring.shard_of_room(room))
    }

    async fn forward(&self, user: &UserName, room: &RoomId, op: ClientOp) -> Result<ClientAnswer, ApiError> {
        // Boxed: the way to a remote replica (routes, retries, DHT) is a large future, and a
        // local write's future would otherwise be as large.
        Box::pin(remote::forward(self.node(), user, room, op)).await
    }

    /// `user`'s role in `room`, from the local replica, confirmed with the leader if the local
    /// replica does not know them as a member.
    pub async fn member_role(&self, replica: &Replica, room: &RoomId, user: &UserName) -> Result<Role, ApiError> {
        let local = replica.state.read().meta.room(room).map(|r| r.role_of(user));
        if let Some(Some(role)) = local {
            return Ok(role);
        }
        // Boxed: the confirming read is the rare path, and a large future.
        let confirm = Box::pin(routing::read(self.node(), replica.shard, Query::Room(room.clone())));
        let confirmed = tokio::time::timeout(Duration::from_millis(MEMBERSHIP_CONFIRM_TIMEOUT_MS), confirm).await;
        let exists_with_role = match confirmed {
            Ok(Ok(Answer::Room(found))) => found.map(|r| r.role_of(user)),
            _ => local,
        };
        match exists_with_role {
            None => Err(ApiError::Refused(Refusal::RoomNotFound(room.clone()))),
            Some(None) => Err(ApiError::Refused(Refusal::NotMember { room: room.clone(), user: user.clone() })),
            Some(Some(role)) => Ok(role),
        }
    }

    async fn write(
        &self,
        replica: &Replica,
        room: &RoomId,
        author: &UserName,
        kind: EventKind,
        ack: AckLevel,
        seen: Option<Hlc>,
    ) -> Result<WriteAck, ApiError> {
        let now_ms = self.node().now_ms();
        let written = replica.crdt.write_local(room, author.clone(), kind, now_ms, seen).await?;
        if ack == AckLevel::Quorum && !replica.crdt.wait_replicated(written.position, room, QUORUM_ACK_TIMEOUT_MS).await
        {
            return Err(ApiError::QuorumTimeout { shard: replica.shard.0 });
        }
        Ok(WriteAck { written, ack })
    }

    /// Post a message. A retry with the same `client_message_id` is the same message.
    pub async fn post(
        &self,
        user: &UserName,
        room: &str,
        body: &str,
        client_message_id: &str,
        ack: AckLevel,
        seen: Option<Hlc>,
    ) -> Result<WriteAck, ApiError> {
        let room = limits::room_id(room)?;
        let body = limits::body(body)?;
        let client_message_id =
            limits::token("client_message_id", client_message_id, limits::CLIENT_MESSAGE_ID_BYTES_MAX)?;
        let Some(replica) = self.local_replica(&room) else {
            let op = ClientOp::Post { body, client_message_id, ack, seen };
            return self.forward(user, &room, op).await?.write();
        };
        self.member_role(&replica, &room, user).await?;
        self.node().rate_limiter.take(user, self.node().now_ms())?;
        let message_id = MessageId::derive(&room, user, &client_message_id);
        let kind = EventKind::Post { message_id, client_message_id, body };
        self.write(&replica, &room, user, kind, ack, seen).await
    }

    /// Replace the body of one's own message.
    pub async fn edit(
        &self,
        user: &UserName,
        room: &str,
        id: &str,
        body: &str,
        ack: AckLevel,
    ) -> Result<WriteAck, ApiError> {
        let room = limits::room_id(room)?;
        let message_id = message_id(id)?;
        let body = limits::body(body)?;
        let Some(replica) = self.local_replica(&room) else {
            return self.forward(user, &room, ClientOp::Edit { id: id.to_owned(), body, ack }).await?.write();
        };
        self.member_role(&replica, &room, user).await?;
        self.node().rate_limiter.take(user, self.node().now_ms())?;
        let author = self.message_author(&replica, &room, &message_id).await?;
        if author != *user {
            return Err(denied(&room, user, "edit another member's message"));
        }
        self.write(&replica, &room, user, EventKind::Edit { message_id, body }, ack, None).await
    }

    /// Redact a message: its author, or an admin or owner.
    pub async fn redact(&self, user: &UserName, room: &str, id: &str, ack: AckLevel) -> Result<WriteAck, ApiError> {
        let room = limits::room_id(room)?;
        let message_id = message_id(id)?;
        let Some(replica) = self.local_replica(&room) else {
            return self.forward(user, &room, ClientOp::Redact { id: id.to_owned(), ack }).await?.write();
        };
        let role = self.member_role(&replica, &room, user).await?;
        self.node().rate_limiter.take(user, self.node().now_ms())?;
        let author = self.message_author(&replica, &room, &message_id).await?;
        if author != *user && role < Role::Admin {
            return Err(denied(&room, user, "redact another member's message"));
        }
        self.write(&replica, &room, user, EventKind::Redact { message_id }, ack, None).await
    }

    /// Add (or with `remove`, take back) a reaction.
    pub async fn react(
        &self,
        user: &UserName,
        room: &str,
        id: &str,
        reaction: &str,
        remove: bool,
        ack: AckLevel,
    ) -> Result<WriteAck, ApiError> {
        let room = limits::room_id(room)?;
        let message_id = message_id(id)?;
        let reaction = limits::token("reaction", reaction, limits::REACTION_BYTES_MAX)?;
        let Some(replica) = self.local_replica(&room) else {
            let op = ClientOp::React { id: id.to_owned(), reaction, remove, ack };
            return self.forward(user, &room, op).await?.write();
        };
        self.member_role(&replica, &room, user).await?;
        self.node().rate_limiter.take(user, self.node().now_ms())?;
        self.message_author(&replica, &room, &message_id).await?;
        let kind = if remove {
            let cell = replica.crdt.room(&room).await?;
            let observed = cell.lock().log.version_vector().clone();
            EventKind::Unreact { message_id, reaction, observed }
        } else {
            EventKind::React { message_id, reaction }
        };
        self.write(&replica, &room, user, kind, ack, None).await
    }

    async fn message_author(&self, replica: &Replica, room: &RoomId, id: &MessageId) -> Result<UserName, ApiError> {
        let cell = replica.crdt.room(room).await?;
        let state = cell.lock();
        match state.log.message(id) {
            Some(message) if !message.redacted => Ok(message.author.clone()),
            _ => Err(ApiError::MessageNotFound(id.to_string())),
        }
    }

    /// A page of history, from this replica.
    pub async fn history(
        &self,
        user: &UserName,
        room: &str,
        before: Option<Position>,
        after: Option<Position>,
        limit: usize,
        oldest_first: bool,
    ) -> Result<HistoryPage, ApiError> {
        let room = limits::room_id(room)?;
        let limit = match limit {
            0 => limits::HISTORY_PAGE_MESSAGES_DEFAULT,
            n if n > limits::HISTORY_PAGE_MESSAGES_MAX => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("must be at most {}", limits::HISTORY_PAGE_MESSAGES_MAX),
                ));
            }
            n => n,
        };
        let Some(replica) = self.local_replica(&room) else {
            let op = ClientOp::History { before, after, limit, oldest_first };
            return match self.forward(user, &room, op).await? {
                ClientAnswer::History(page) => Ok(page),
                other => Err(ApiError::Internal(format!("replica answered {other:?} to a history call"))),
            };
        };
        self.member_role(&replica, &room, user).await?;
        let cell = replica.crdt.room(&room).await?;
        let state = cell.lock();
        let query = PageQuery { after, before, limit: limit + 1, newest_first: !oldest_first };
        let mut messages: Vec<palaver_crdt::Message> = state.log.page(&query).into_iter().cloned().collect();
        let more = messages.len() > limit;
        messages.truncate(limit);
        Ok(HistoryPage { messages, more })
    }

    /// Change the caller's presence, typing or read marker in `room`.
    pub async fn side_write(&self, user: &UserName, room: &str, write: SideWrite) -> Result<(), ApiError> {
        let room = limits::room_id(room)?;
        let Some(replica) = self.local_replica(&room) else {
            self.forward(user, &room, ClientOp::Side(write)).await?;
            return Ok(());
        };
        self.member_role(&replica, &room, user).await?;
        let now_ms = self.node().now_ms();
        let hlc = replica.crdt.tick(now_ms);
        let me = replica.crdt.replica();
        let user = user.clone();
        replica
            .crdt
            .update_side(&room, move |side: &mut SideState, _log: &RoomLog| match write {
                SideWrite::Presence(status) => side.presence.set(user, PresenceEntry::new(status, hlc, me, now_ms)),
                SideWrite::Typing(typing) => side.typing.set(user, typing, hlc, now_ms),
                SideWrite::Read(position) => side.markers.mark(user, position),
            })
            .await?;
        Ok(())
    }

    /// Set presence in `rooms`, or (if empty) in every room the caller is subscribed to here.
    pub async fn set_presence(
        &self,
        user: &UserName,
        rooms: &[String],
        status: PresenceStatus,
    ) -> Result<Vec<String>, ApiError> {
        let rooms: Vec<String> = if rooms.is_empty() { self.node().subscribed_rooms(user) } else { rooms.to_vec() };
        for room in &rooms {
            self.side_write(user, room, SideWrite::Presence(status)).await?;
        }
        Ok(rooms)
    }

    /// Messages in `room` after `user`'s read marker that others posted.
    pub async fn unread_count(&self, user: &UserName, room: &RoomId) -> Result<u64, ApiError> {
        let Some(replica) = self.local_replica(room) else {
            return match self.forward(user, room, ClientOp::Unread).await? {
                ClientAnswer::Unread(count) => Ok(count),
                other => Err(ApiError::Internal(format!("replica answered {other:?} to an unread count"))),
            };
        };
        let cell = replica.crdt.room(room).await?;
        let state = cell.lock();
        Ok(state.side.markers.unread_count(user, &state.log))
    }
}

fn denied(room: &RoomId, user: &UserName, action: &str) -> ApiError {
    ApiError::Refused(Refusal::PermissionDenied { room: room.clone(), actor: user.clone(), action: action.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_parse_from_32_hex_digits_only() {
        let id = MessageId::derive(&RoomId("r".into()), &UserName("u".into()), "c");
        assert_eq!(message_id(&id.to_string()).expect("round trip"), id);
        for bad in ["", "xyz", &"0".repeat(31), &"g".repeat(32), &"é".repeat(16)] {
            assert!(message_id(bad).is_err(), "{bad:?}");
        }
    }
}
