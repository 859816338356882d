//! Conversions between palaver's types and their protobuf forms, in one place for every
//! surface that speaks protobuf (the gRPC services, subscriptions).

use std::collections::BTreeMap;

use palaver_crdt::{Dot, Event, EventKind, Hlc, Message, Position, PresenceStatus, ReplicaId, RoomLog, VersionVector};
use palaver_proto::v1 as pb;
use palaver_shard::{Role, SideState};

use crate::error::ApiError;
use crate::messaging::AckLevel;

/// A role as protobuf.
pub fn role_to_pb(role: Option<Role>) -> i32 {
    match role {
        None => pb::Role::Unspecified as i32,
        Some(Role::Member) => pb::Role::Member as i32,
        Some(Role::Admin) => pb::Role::Admin as i32,
        Some(Role::Owner) => pb::Role::Owner as i32,
    }
}

/// A position as protobuf.
pub fn position_to_pb(position: Position) -> pb::Position {
    pb::Position {
        wall_ms: position.hlc.wall_ms,
        logical: position.hlc.logical,
        replica: position.replica.0,
        counter: position.counter,
    }
}

/// A position from protobuf (any values are a valid position).
pub fn position_from_pb(position: &pb::Position) -> Position {
    Position::new(Hlc::new(position.wall_ms, position.logical), Dot::new(ReplicaId(position.replica), position.counter))
}

/// A version vector as protobuf.
pub fn version_vector_to_pb(version_vector: &VersionVector) -> pb::VersionVector {
    pb::VersionVector { entries: BTreeMap::<u64, u64>::from(version_vector).into_iter().collect() }
}

/// A version vector from protobuf (zero entries are dropped).
pub fn version_vector_from_pb(version_vector: Option<&pb::VersionVector>) -> VersionVector {
    let entries: BTreeMap<u64, u64> =
        version_vector.map(|vv| vv.entries.iter().map(|(r, c)| (*r, *c)).collect()).unwrap_or_default();
    VersionVector::from(entries)
}

/// An ack level from protobuf (unset: quorum).
pub fn ack_from_pb(ack: i32) -> Result<AckLevel, ApiError> {
    match pb::AckLevel::try_from(ack) {
        Ok(pb::AckLevel::One) => Ok(AckLevel::One),
        Ok(pb::AckLevel::Quorum | pb::AckLevel::Unspecified) => Ok(AckLevel::Quorum),
        Err(_) => Err(ApiError::invalid("ack", "must be ACK_LEVEL_ONE or ACK_LEVEL_QUORUM")),
    }
}

/// An ack level as protobuf.
pub fn ack_to_pb(ack: AckLevel) -> i32 {
    match ack {
        AckLevel::One => pb::AckLevel::One as i32,
        AckLevel::Quorum => pb::AckLevel::Quorum as i32,
    }
}

/// A role from protobuf.
pub fn role_from_pb(role: i32) -> Result<Role, ApiError> {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Member) => Ok(Role::Member),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Owner) => Ok(Role::Owner),
        _ => Err(ApiError::invalid("role", "must be ROLE_MEMBER, ROLE_ADMIN or ROLE_OWNER")),
    }
}

/// A presence status from protobuf.
pub fn presence_from_pb(status: i32) -> Result<PresenceStatus, ApiError> {
    match pb::PresenceStatus::try_from(status) {
        Ok(pb::PresenceStatus::Online) => Ok(PresenceStatus::Online),
        Ok(pb::PresenceStatus::Away) => Ok(PresenceStatus::Away),
        Ok(pb::PresenceStatus::Offline) => Ok(PresenceStatus::Offline),
        _ => Err(ApiError::invalid("status", "must be ONLINE, AWAY or OFFLINE")),
    }
}

fn presence_to_pb(status: PresenceStatus) -> i32 {
    match status {
        PresenceStatus::Online => pb::PresenceStatus::Online as i32,
        PresenceStatus::Away => pb::PresenceStatus::Away as i32,
        PresenceStatus::Offline => pb::PresenceStatus::Offline as i32,
    }
}

/// A message as protobuf.
pub fn message_to_pb(message: &Message) -> pb::Message {
    pb::Message {
        message_id: message.id.to_string(),
        position: Some(position_to_pb(message.position)),
        author: message.author.0.clone(),
        body: message.body.clone(),
        edited: message.edited,
        redacted: message.redacted,
        reactions: message
            .reactions
            .iter()
            .map(|(reaction, users)| pb::Reaction {
                reaction: reaction.clone(),
                users: users.iter().map(|u| u.0.clone()).collect(),
            })
            .collect(),
    }
}

/// One event of a room, with the message it touched as `log` shows it now.
pub fn message_event(event: &Event, log: &RoomLog) -> pb::MessageEvent {
    let kind = match &event.kind {
        EventKind::Post { .. } => pb::MessageEventKind::Posted,
        EventKind::Edit { .. } => pb::MessageEventKind::Edited,
        EventKind::Redact { .. } => pb::MessageEventKind::Redacted,
        EventKind::React { .. } => pb::MessageEventKind::Reacted,
        EventKind::Unreact { .. } => pb::MessageEventKind::Unreacted,
    };
    let message_id = event.message_id();
    pb::MessageEvent {
        position: Some(position_to_pb(event.position())),
        kind: kind as i32,
        message_id: message_id.to_string(),
        actor: event.author.0.clone(),
        message: log.message(&message_id).map(message_to_pb),
    }
}

/// A room's side state as protobuf, as of `now_ms` (expired presence and typing left out).
pub fn side_to_pb(side: &SideState, now_ms: u64) -> pb::RoomState {
    pb::RoomState {
        presence: side
            .presence
            .present_at(now_ms)
            .map(|(user, status)| (user.0.clone(), presence_to_pb(status)))
            .collect(),
        typing: side.typing.typing_at(now_ms).into_iter().map(|u| u.0).collect(),
        read_markers: side.markers.iter().map(|(user, position)| (user.0.clone(), position_to_pb(*position))).collect(),
    }
}
