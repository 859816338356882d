//! Every authenticated client write, implemented once over protobuf types: the unary
//! `ChatService` calls and the `Pipeline` stream both come here (and so will WebSocket frames),
//! so no operation exists twice. Each function takes the caller (already authenticated) and the
//! request, runs it through [`Ops`], and returns the reply or a typed [`ApiError`].

use palaver_ids::UserName;
use palaver_proto::v1 as pb;

use crate::convert;
use crate::error::ApiError;
use crate::messaging::{SideWrite, WriteAck};
use crate::ops::{Ops, TargetAction};
use crate::routing::Committed;

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
