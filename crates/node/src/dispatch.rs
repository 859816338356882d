//! Every client operation, implemented once over protobuf types: the unary `ChatService`
//! calls, the `Pipeline` stream, WebSocket frames and the HTTP routes ([`crate::http`]) all
//! come here, so no operation exists twice. Each function takes the caller (already
//! authenticated, except for register and login) and the request, runs it through [`Ops`], and
//! returns the reply or a typed [`ApiError`].

use palaver_ids::{ShardId, UserName};
use palaver_proto::v1 as pb;
use palaver_shard::meta::Room;
use palaver_shard::{Role, RoomSettings, Visibility};

use crate::convert::{self, role_to_pb};
use crate::error::ApiError;
use crate::messaging::{SideWrite, WriteAck};
use crate::ops::{Ops, TargetAction};
use crate::routing::Committed;

pub fn visibility_from_pb(visibility: i32) -> Result<Visibility, ApiError> {
    match pb::Visibility::try_from(visibility) {
        Ok(pb::Visibility::Public) => Ok(Visibility::Public),
        Ok(pb::Visibility::InviteOnly) => Ok(Visibility::InviteOnly),
        Err(_) => Err(ApiError::invalid("visibility", "unknown value")),
    }
}

pub fn visibility_to_pb(visibility: Visibility) -> i32 {
    match visibility {
        Visibility::Public => pb::Visibility::Public as i32,
        Visibility::InviteOnly => pb::Visibility::InviteOnly as i32,
    }
}

pub fn room_to_pb(id: &str, shard: ShardId, room: &Room, viewer: &palaver_ids::UserName) -> pb::Room {
    let can_see_bans = matches!(room.role_of(viewer), Some(Role::Admin | Role::Owner));
    pb::Room {
        room: id.to_owned(),
        title: room.settings.title.clone(),
        topic: room.settings.topic.clone(),
        visibility: visibility_to_pb(room.settings.visibility),
        members: room
            .members
            .iter()
            .map(|(user, m)| pb::Member {
                user: user.0.clone(),
                role: role_to_pb(Some(m.role)),
                joined_at_ms: m.joined_at_ms,
            })
            .collect(),
        banned: if can_see_bans { room.banned.keys().map(|u| u.0.clone()).collect() } else { Vec::new() },
        shard: shard.0,
        created_at_ms: room.created_at_ms,
    }
}

/// Register a user.
pub async fn register(ops: &Ops, request: pb::RegisterRequest) -> Result<pb::RegisterResponse, ApiError> {
    let user = ops.register(&request.user, &request.password).await?;
    Ok(pb::RegisterResponse { user: user.0 })
}

/// Log in: a token for the user.
pub async fn login(ops: &Ops, request: pb::LoginRequest) -> Result<pb::LoginResponse, ApiError> {
    let login = ops.login(&request.user, &request.password).await?;
    Ok(pb::LoginResponse { token: login.token, expires_at_ms: login.expires_at_ms })
}

/// Create a room; the caller becomes its owner.
pub async fn create_room(ops: &Ops, user: &UserName, request: pb::CreateRoomRequest) -> Result<pb::Room, ApiError> {
    let settings = RoomSettings {
        title: request.title,
        topic: request.topic,
        visibility: visibility_from_pb(request.visibility)?,
    };
    let (shard, room) = ops.create_room(user, &request.room, settings).await?;
    Ok(room_to_pb(&request.room, shard, &room, user))
}

/// A room, its members and settings.
pub async fn get_room(ops: &Ops, user: &UserName, request: pb::RoomRequest) -> Result<pb::Room, ApiError> {
    let (shard, room) = ops.get_room(user, &request.room).await?;
    Ok(room_to_pb(&request.room, shard, &room, user))
}

/// Change a room's settings.
pub async fn update_room(ops: &Ops, user: &UserName, request: pb::UpdateRoomRequest) -> Result<pb::Room, ApiError> {
    let settings = RoomSettings {
        title: request.title,
        topic: request.topic,
        visibility: visibility_from_pb(request.visibility)?,
    };
    let (shard, room) = ops.update_room(user, &request.room, settings).await?;
    Ok(room_to_pb(&request.room, shard, &room, user))
}

/// Delete a room.
pub async fn delete_room(ops: &Ops, user: &UserName, request: pb::RoomRequest) -> Result<pb::Ack, ApiError> {
    let done = ops.delete_room(user, &request.room).await?;
    Ok(ack(ops, &request.room, done))
}

/// The rooms the caller can see, with unread counts in the rooms they belong to.
pub async fn list_rooms(ops: &Ops, user: &UserName) -> Result<pb::ListRoomsResponse, ApiError> {
    let (rooms, unavailable_shards) = ops.list_rooms(user).await?;
    let rooms = rooms
        .into_iter()
        .map(|r| pb::RoomSummary {
            room: r.room.0,
            title: r.settings.title,
            topic: r.settings.topic,
            visibility: visibility_to_pb(r.settings.visibility),
            member_count: r.member_count,
            my_role: role_to_pb(r.my_role),
            unread_count: r.unread_count,
        })
        .collect();
    Ok(pb::ListRoomsResponse { rooms, unavailable_shards })
}

/// A page of a room's history.
pub async fn history(ops: &Ops, user: &UserName, request: pb::HistoryRequest) -> Result<pb::HistoryResponse, ApiError> {
    let before = request.before.as_ref().map(convert::position_from_pb);
    let after = request.after.as_ref().map(convert::position_from_pb);
    let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
    let page = ops.history(user, &request.room, before, after, limit, request.oldest_first).await?;
    Ok(pb::HistoryResponse { messages: page.messages.iter().map(convert::message_to_pb).collect(), more: page.more })
}

/// Subscribe to a room from the client's version vector.
pub async fn subscribe(
    ops: &Ops,
    user: &UserName,
    request: pb::SubscribeRequest,
) -> Result<crate::subscribe::EventStream, ApiError> {
    let have = convert::version_vector_from_pb(request.version_vector.as_ref());
    ops.subscribe(user, &request.room, have).await
}

/// Subscribe to a room from the client's version vector, delivering into `sink`; the returned
/// task serves the subscription.
pub async fn subscribe_into<S: crate::subscribe::EventSink>(
    ops: &Ops,
    user: &UserName,
    request: pb::SubscribeRequest,
    sink: S,
) -> Result<crate::subscribe::SubscriptionTask, ApiError> {
    let have = convert::version_vector_from_pb(request.version_vector.as_ref());
    ops.subscribe_into(user, &request.room, have, sink).await
}

/// The answer to a committed membership or room change of `room`.
pub fn ack(ops: &Ops, room: &str, done: Committed) -> pb::Ack {
    pb::Ack { shard: ops.shard_of_room_name(room).0, log_index: done.log_index }
}

fn event_ack(done: &WriteAck) -> pb::EventAck {
    pb::EventAck { position: Some(convert::position_to_pb(done.written.position)), ack: convert::ack_to_pb(done.ack) }
}

/// Join a room.
pub async fn join(ops: &Ops, user: &UserName, request: pb::RoomRequest) -> Result<pb::Ack, ApiError> {
    let done = ops.join(user, &request.room).await?;
    Ok(ack(ops, &request.room, done))
}

/// Leave a room.
pub async fn leave(ops: &Ops, user: &UserName, request: pb::RoomRequest) -> Result<pb::Ack, ApiError> {
    let done = ops.leave(user, &request.room).await?;
    Ok(ack(ops, &request.room, done))
}

/// Invite, kick or unban another user.
pub async fn act_on(
    ops: &Ops,
    user: &UserName,
    action: TargetAction,
    request: pb::TargetRequest,
) -> Result<pb::Ack, ApiError> {
    let done = ops.act_on(user, action, &request.room, &request.user).await?;
    Ok(ack(ops, &request.room, done))
}

/// Ban another user.
pub async fn ban(ops: &Ops, user: &UserName, request: pb::BanRequest) -> Result<pb::Ack, ApiError> {
    let done = ops.ban(user, &request.room, &request.user, &request.reason).await?;
    Ok(ack(ops, &request.room, done))
}

/// Change another member's role.
pub async fn set_role(ops: &Ops, user: &UserName, request: pb::SetRoleRequest) -> Result<pb::Ack, ApiError> {
    let role = convert::role_from_pb(request.role)?;
    let done = ops.set_role(user, &request.room, &request.user, role).await?;
    Ok(ack(ops, &request.room, done))
}

/// Post a message.
pub async fn post(ops: &Ops, user: &UserName, request: pb::PostRequest) -> Result<pb::PostResponse, ApiError> {
    let ack = convert::ack_from_pb(request.ack)?;
    let seen = request.seen.as_ref().map(|p| convert::position_from_pb(p).hlc);
    let done = ops.post(user, &request.room, &request.body, &request.client_message_id, ack, seen).await?;
    Ok(pb::PostResponse {
        message_id: done.written.message_id.to_string(),
        position: Some(convert::position_to_pb(done.written.position)),
        duplicate: done.written.duplicate,
        ack: convert::ack_to_pb(done.ack),
    })
}

/// Edit one's own message.
pub async fn edit(ops: &Ops, user: &UserName, request: pb::EditRequest) -> Result<pb::EventAck, ApiError> {
    let ack = convert::ack_from_pb(request.ack)?;
    let done = ops.edit(user, &request.room, &request.message_id, &request.body, ack).await?;
    Ok(event_ack(&done))
}

/// Redact a message.
pub async fn redact(ops: &Ops, user: &UserName, request: pb::MessageRequest) -> Result<pb::EventAck, ApiError> {
    let ack = convert::ack_from_pb(request.ack)?;
    let done = ops.redact(user, &request.room, &request.message_id, ack).await?;
    Ok(event_ack(&done))
}

/// Add or remove a reaction.
pub async fn react(ops: &Ops, user: &UserName, request: pb::ReactRequest) -> Result<pb::EventAck, ApiError> {
    let ack = convert::ack_from_pb(request.ack)?;
    let done = ops.react(user, &request.room, &request.message_id, &request.reaction, request.remove, ack).await?;
    Ok(event_ack(&done))
}

/// Say that one is (or stopped) typing.
pub async fn typing(ops: &Ops, user: &UserName, request: pb::TypingRequest) -> Result<pb::EventAck, ApiError> {
    ops.side_write(user, &request.room, SideWrite::Typing(request.typing)).await?;
    Ok(pb::EventAck { position: None, ack: pb::AckLevel::One as i32 })
}

/// Move one's read marker forward.
pub async fn mark_read(ops: &Ops, user: &UserName, request: pb::MarkReadRequest) -> Result<pb::EventAck, ApiError> {
    let position = request.position.as_ref().ok_or_else(|| ApiError::invalid("position", "is required"))?;
    let position = convert::position_from_pb(position);
    ops.side_write(user, &request.room, SideWrite::Read(position)).await?;
    Ok(pb::EventAck { position: Some(convert::position_to_pb(position)), ack: pb::AckLevel::One as i32 })
}

/// Set one's presence in the given rooms (all of one's rooms if none are given).
pub async fn set_presence(
    ops: &Ops,
    user: &UserName,
    request: pb::SetPresenceRequest,
) -> Result<pb::SetPresenceResponse, ApiError> {
    let status = convert::presence_from_pb(request.status)?;
    let rooms = ops.set_presence(user, &request.rooms, status).await?;
    Ok(pb::SetPresenceResponse { rooms })
}

/// The name of a `Pipeline` operation, as a metrics label.
pub fn pipeline_op_name(op: &pb::pipeline_request::Op) -> &'static str {
    use pb::pipeline_request::Op;
    match op {
        Op::Join(_) => "join",
        Op::Leave(_) => "leave",
        Op::Invite(_) => "invite",
        Op::Kick(_) => "kick",
        Op::Ban(_) => "ban",
        Op::Unban(_) => "unban",
        Op::SetRole(_) => "set_role",
        Op::Post(_) => "post",
        Op::Edit(_) => "edit",
        Op::Redact(_) => "redact",
        Op::React(_) => "react",
        Op::Typing(_) => "typing",
        Op::MarkRead(_) => "mark_read",
        Op::SetPresence(_) => "set_presence",
    }
}

/// Every `ChatService` operation: its gRPC method and its label — the WebSocket `op`, the
/// `Pipeline` operation's name and the metrics label. The one list the surfaces name
/// operations from.
pub const OPERATIONS: [(&str, &str); 25] = [
    ("Register", "register"),
    ("Login", "login"),
    ("CreateRoom", "create_room"),
    ("GetRoom", "get_room"),
    ("ListRooms", "list_rooms"),
    ("DeleteRoom", "delete_room"),
    ("UpdateRoom", "update_room"),
    ("Join", "join"),
    ("Invite", "invite"),
    ("Leave", "leave"),
    ("Kick", "kick"),
    ("Ban", "ban"),
    ("Unban", "unban"),
    ("SetRole", "set_role"),
    ("Post", "post"),
    ("Edit", "edit"),
    ("Redact", "redact"),
    ("React", "react"),
    ("History", "history"),
    ("Subscribe", "subscribe"),
    ("SetPresence", "set_presence"),
    ("Typing", "typing"),
    ("MarkRead", "mark_read"),
    ("Pipeline", "pipeline"),
    ("SubscribeRooms", "subscribe_rooms"),
];

/// The label of an operation named `label` by a client, if there is one (so that clients
/// cannot grow a metrics label set).
pub fn known_op(label: &str) -> Option<&'static str> {
    OPERATIONS.iter().find(|(_, known)| *known == label).map(|(_, known)| *known)
}

/// Run one request of a `Pipeline` stream.
pub async fn pipeline(
    ops: &Ops,
    user: &UserName,
    op: Option<pb::pipeline_request::Op>,
) -> Result<pb::pipeline_reply::Result, ApiError> {
    use pb::pipeline_reply::Result as Reply;
    use pb::pipeline_request::Op;
    let op = op.ok_or_else(|| ApiError::invalid("op", "is required"))?;
    Ok(match op {
        Op::Join(r) => Reply::Ack(join(ops, user, r).await?),
        Op::Leave(r) => Reply::Ack(leave(ops, user, r).await?),
        Op::Invite(r) => Reply::Ack(act_on(ops, user, TargetAction::Invite, r).await?),
        Op::Kick(r) => Reply::Ack(act_on(ops, user, TargetAction::Kick, r).await?),
        Op::Ban(r) => Reply::Ack(ban(ops, user, r).await?),
        Op::Unban(r) => Reply::Ack(act_on(ops, user, TargetAction::Unban, r).await?),
        Op::SetRole(r) => Reply::Ack(set_role(ops, user, r).await?),
        Op::Post(r) => Reply::Post(post(ops, user, r).await?),
        Op::Edit(r) => Reply::Event(edit(ops, user, r).await?),
        Op::Redact(r) => Reply::Event(redact(ops, user, r).await?),
        Op::React(r) => Reply::Event(react(ops, user, r).await?),
        Op::Typing(r) => Reply::Event(typing(ops, user, r).await?),
        Op::MarkRead(r) => Reply::Event(mark_read(ops, user, r).await?),
        Op::SetPresence(r) => Reply::Presence(set_presence(ops, user, r).await?),
    })
}

/// An error as a `Pipeline` reply carries it: the same code, gRPC status and message a unary
/// call would give, and for rate limits when to retry.
pub fn pipeline_error(error: &ApiError) -> pb::PipelineError {
    pb::PipelineError {
        code: error.code().to_owned(),
        grpc_code: error.grpc_code() as i32,
        message: error.to_string(),
        retry_after_ms: match error {
            ApiError::RateLimited { retry_after_ms } => *retry_after_ms,
            _ => 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pipeline_operation_is_a_known_operation() {
        use pb::pipeline_request::Op;
        let ops = [
            Op::Join(Default::default()),
            Op::Leave(Default::default()),
            Op::Invite(Default::default()),
            Op::Kick(Default::default()),
            Op::Ban(Default::default()),
            Op::Unban(Default::default()),
            Op::SetRole(Default::default()),
            Op::Post(Default::default()),
            Op::Edit(Default::default()),
            Op::Redact(Default::default()),
            Op::React(Default::default()),
            Op::Typing(Default::default()),
            Op::MarkRead(Default::default()),
            Op::SetPresence(Default::default()),
        ];
        for op in &ops {
            let name = pipeline_op_name(op);
            assert_eq!(known_op(name), Some(name), "{name} is not in OPERATIONS");
        }
        assert_eq!(known_op("drop_tables"), None);
        let labels: std::collections::BTreeSet<_> = OPERATIONS.iter().map(|(_, label)| *label).collect();
        assert_eq!(labels.len(), OPERATIONS.len(), "labels are unique");
    }
}
