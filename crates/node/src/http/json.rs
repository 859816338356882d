//! The JSON forms of requests, replies and events, shared by WebSocket frames and HTTP routes,
//! and their conversions to and from the protobuf types [`crate::dispatch`] takes. Field names
//! are the protobuf ones; enums are lowercase strings instead of numbers; unset optional
//! fields may be left out. These types also generate the OpenAPI document's schemas.

use std::collections::BTreeMap;

use palaver_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// A place in a room's total order: compare `(wall_ms, logical, replica, counter)` in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// Hybrid logical clock, wall part: ms since the Unix epoch.
    pub wall_ms: u64,
    /// Hybrid logical clock, logical part.
    pub logical: u32,
    /// The replica that accepted the event (its node id << 32 | the node's life).
    pub replica: u64,
    /// The event's sequence number at that replica, in this room.
    pub counter: u64,
}

impl From<pb::Position> for Position {
    fn from(p: pb::Position) -> Self {
        Self { wall_ms: p.wall_ms, logical: p.logical, replica: p.replica, counter: p.counter }
    }
}

impl From<Position> for pb::Position {
    fn from(p: Position) -> Self {
        Self { wall_ms: p.wall_ms, logical: p.logical, replica: p.replica, counter: p.counter }
    }
}

/// What a client holds of a room: replica (as a string key) -> highest counter held.
pub type VersionVector = BTreeMap<String, u64>;

fn vv_to_pb(vv: &VersionVector) -> Result<pb::VersionVector, ApiError> {
    let mut entries = std::collections::HashMap::new();
    for (replica, counter) in vv {
        let replica = replica
            .parse::<u64>()
            .map_err(|_| ApiError::invalid("version_vector", format!("key {replica:?} is not a replica id")))?;
        entries.insert(replica, *counter);
    }
    Ok(pb::VersionVector { entries })
}

fn vv_from_pb(vv: pb::VersionVector) -> VersionVector {
    vv.entries.into_iter().map(|(r, c)| (r.to_string(), c)).collect()
}

/// A member's rank in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May read and post.
    Member,
    /// May also kick, ban, unban, invite and change settings.
    Admin,
    /// May also delete the room and set any role.
    Owner,
}

fn role_from_pb(role: i32) -> Option<Role> {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Member) => Some(Role::Member),
        Ok(pb::Role::Admin) => Some(Role::Admin),
        Ok(pb::Role::Owner) => Some(Role::Owner),
        _ => None,
    }
}

fn role_to_pb(role: Role) -> i32 {
    match role {
        Role::Member => pb::Role::Member as i32,
        Role::Admin => pb::Role::Admin as i32,
        Role::Owner => pb::Role::Owner as i32,
    }
}

/// Who may join a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Anyone not banned.
    #[default]
    Public,
    /// Invited users only.
    InviteOnly,
}

fn visibility_to_pb(v: Visibility) -> i32 {
    match v {
        Visibility::Public => pb::Visibility::Public as i32,
        Visibility::InviteOnly => pb::Visibility::InviteOnly as i32,
    }
}

fn visibility_from_pb(v: i32) -> Visibility {
    match pb::Visibility::try_from(v) {
        Ok(pb::Visibility::InviteOnly) => Visibility::InviteOnly,
        _ => Visibility::Public,
    }
}

/// How durable a write must be before the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckLevel {
    /// Fsynced on the accepting replica (available in a minority partition).
    One,
    /// Fsynced on 2 of the 3 replicas (the default).
    #[default]
    Quorum,
}

fn ack_to_pb(ack: Option<AckLevel>) -> i32 {
    match ack {
        Some(AckLevel::One) => pb::AckLevel::One as i32,
        Some(AckLevel::Quorum) | None => pb::AckLevel::Quorum as i32,
    }
}

fn ack_from_pb(ack: i32) -> AckLevel {
    match pb::AckLevel::try_from(ack) {
        Ok(pb::AckLevel::One) => AckLevel::One,
        _ => AckLevel::Quorum,
    }
}

/// A user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Connected and active.
    Online,
    /// Connected, idle.
    Away,
    /// Not connected.
    Offline,
}

fn presence_to_pb(p: Presence) -> i32 {
    match p {
        Presence::Online => pb::PresenceStatus::Online as i32,
        Presence::Away => pb::PresenceStatus::Away as i32,
        Presence::Offline => pb::PresenceStatus::Offline as i32,
    }
}

fn presence_from_pb(p: i32) -> Presence {
    match pb::PresenceStatus::try_from(p) {
        Ok(pb::PresenceStatus::Online) => Presence::Online,
        Ok(pb::PresenceStatus::Away) => Presence::Away,
        _ => Presence::Offline,
    }
}

// ---- requests ------------------------------------------------------------------------------

/// Register a user.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// 1 to 32 characters: ASCII letters, digits, '-', '_' or '.'.
    pub user: String,
    /// 8 to 128 bytes.
    pub password: String,
}

/// Resume a session with a token from an earlier login.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthenticateArgs {
    /// The token.
    pub token: String,
}

/// Create a room.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomArgs {
    /// 1 to 64 characters: lowercase ASCII letters, digits, '-' or '_'.
    pub room: String,
    /// Up to 128 bytes.
    #[serde(default)]
    pub title: String,
    /// Up to 1024 bytes.
    #[serde(default)]
    pub topic: String,
    /// Who may join (public if left out).
    #[serde(default)]
    pub visibility: Visibility,
}

impl From<CreateRoomArgs> for pb::CreateRoomRequest {
    fn from(a: CreateRoomArgs) -> Self {
        Self { room: a.room, title: a.title, topic: a.topic, visibility: visibility_to_pb(a.visibility) }
    }
}

/// New settings of a room (they replace the old ones).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomSettings {
    /// Up to 128 bytes.
    #[serde(default)]
    pub title: String,
    /// Up to 1024 bytes.
    #[serde(default)]
    pub topic: String,
    /// Who may join.
    #[serde(default)]
    pub visibility: Visibility,
}

impl RoomSettings {
    /// The protobuf request for `room`.
    pub fn into_pb(self, room: String) -> pb::UpdateRoomRequest {
        pb::UpdateRoomRequest {
            room,
            title: self.title,
            topic: self.topic,
            visibility: visibility_to_pb(self.visibility),
        }
    }
}

/// A request about one room.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomArgs {
    /// The room id.
    pub room: String,
}

impl From<RoomArgs> for pb::RoomRequest {
    fn from(a: RoomArgs) -> Self {
        Self { room: a.room }
    }
}

/// A request about one user in one room (invite, kick, unban).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetArgs {
    /// The room id (taken from the path in HTTP routes).
    #[serde(default)]
    pub room: String,
    /// The user acted upon.
    pub user: String,
}

impl From<TargetArgs> for pb::TargetRequest {
    fn from(a: TargetArgs) -> Self {
        Self { room: a.room, user: a.user }
    }
}

/// Ban a user.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BanArgs {
    /// The room id (taken from the path in HTTP routes).
    #[serde(default)]
    pub room: String,
    /// The user banned.
    pub user: String,
    /// Why, up to 512 bytes.
    #[serde(default)]
    pub reason: String,
}

impl From<BanArgs> for pb::BanRequest {
    fn from(a: BanArgs) -> Self {
        Self { room: a.room, user: a.user, reason: a.reason }
    }
}

/// Set a member's role.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRoleArgs {
    /// The room id (taken from the path in HTTP routes).
    #[serde(default)]
    pub room: String,
    /// The member.
    pub user: String,
    /// The new role.
    pub role: Role,
}

impl From<SetRoleArgs> for pb::SetRoleRequest {
    fn from(a: SetRoleArgs) -> Self {
        Self { room: a.room, user: a.user, role: role_to_pb(a.role) }
    }
}

/// Post a message.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostArgs {
    /// The room id (taken from the path in HTTP routes).
    #[serde(default)]
    pub room: String,
    /// The text: 1 byte to 16 KiB of UTF-8, shown as text.
    pub body: String,
    /// The client's idempotency key (1 to 64 bytes): a retry with the same key is the same
    /// message.
    pub client_message_id: String,
    /// Durability before the answer (quorum if left out).
    #[serde(default)]
    pub ack: Option<AckLevel>,
    /// The newest position the client has seen in the room, so the message orders after it.
    #[serde(default)]
    pub seen: Option<Position>,
}

impl From<PostArgs> for pb::PostRequest {
    fn from(a: PostArgs) -> Self {
        Self {
            room: a.room,
            body: a.body,
            client_message_id: a.client_message_id,
            ack: ack_to_pb(a.ack),
            seen: a.seen.map(Into::into),
        }
    }
}

/// Edit one's message.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditArgs {
    /// The room id.
    pub room: String,
    /// The message (32 hex digits).
    pub message_id: String,
    /// The new text.
    pub body: String,
    /// Durability before the answer.
    #[serde(default)]
    pub ack: Option<AckLevel>,
}

impl From<EditArgs> for pb::EditRequest {
    fn from(a: EditArgs) -> Self {
        Self { room: a.room, message_id: a.message_id, body: a.body, ack: ack_to_pb(a.ack) }
    }
}

/// Name a message (redact).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageArgs {
    /// The room id.
    pub room: String,
    /// The message (32 hex digits).
    pub message_id: String,
    /// Durability before the answer.
    #[serde(default)]
    pub ack: Option<AckLevel>,
}

impl From<MessageArgs> for pb::MessageRequest {
    fn from(a: MessageArgs) -> Self {
        Self { room: a.room, message_id: a.message_id, ack: ack_to_pb(a.ack) }
    }
}

/// Add or take back a reaction.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReactArgs {
    /// The room id.
    pub room: String,
    /// The message (32 hex digits).
    pub message_id: String,
    /// An emoji or short code, 1 to 32 bytes.
    pub reaction: String,
    /// Take one's reaction back instead.
    #[serde(default)]
    pub remove: bool,
    /// Durability before the answer.
    #[serde(default)]
    pub ack: Option<AckLevel>,
}

impl From<ReactArgs> for pb::ReactRequest {
    fn from(a: ReactArgs) -> Self {
        Self { room: a.room, message_id: a.message_id, reaction: a.reaction, remove: a.remove, ack: ack_to_pb(a.ack) }
    }
}

/// A page of history.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryArgs {
    /// The room id.
    pub room: String,
    /// Only messages strictly before this position.
    #[serde(default)]
    pub before: Option<Position>,
    /// Only messages strictly after this position.
    #[serde(default)]
    pub after: Option<Position>,
    /// At most this many (1 to 500; 50 if left out).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Oldest first instead of newest first.
    #[serde(default)]
    pub oldest_first: bool,
}

impl From<HistoryArgs> for pb::HistoryRequest {
    fn from(a: HistoryArgs) -> Self {
        Self {
            room: a.room,
            before: a.before.map(Into::into),
            after: a.after.map(Into::into),
            limit: a.limit.unwrap_or(0),
            oldest_first: a.oldest_first,
        }
    }
}

/// Subscribe to a room.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeArgs {
    /// The room id.
    pub room: String,
    /// What the client already holds (left out: everything is sent).
    #[serde(default)]
    pub version_vector: VersionVector,
}

impl SubscribeArgs {
    /// The protobuf request.
    pub fn into_pb(self) -> Result<pb::SubscribeRequest, ApiError> {
        Ok(pb::SubscribeRequest { room: self.room, version_vector: Some(vv_to_pb(&self.version_vector)?) })
    }
}

/// End a subscription.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeArgs {
    /// The id of the subscribe frame that opened it.
    pub sub: u64,
}

/// Set presence.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPresenceArgs {
    /// The status.
    pub status: Presence,
    /// Rooms to show it in; left out or empty: every room subscribed to on this node.
    #[serde(default)]
    pub rooms: Vec<String>,
}

impl From<SetPresenceArgs> for pb::SetPresenceRequest {
    fn from(a: SetPresenceArgs) -> Self {
        Self { status: presence_to_pb(a.status), rooms: a.rooms }
    }
}

/// Say one is typing, or stopped.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypingArgs {
    /// The room id.
    pub room: String,
    /// Typing now (true) or stopped (false).
    pub typing: bool,
}

impl From<TypingArgs> for pb::TypingRequest {
    fn from(a: TypingArgs) -> Self {
        Self { room: a.room, typing: a.typing }
    }
}

/// Move one's read marker forward.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkReadArgs {
    /// The room id.
    pub room: String,
    /// The position of the last message read.
    pub position: Position,
}

impl From<MarkReadArgs> for pb::MarkReadRequest {
    fn from(a: MarkReadArgs) -> Self {
        Self { room: a.room, position: Some(a.position.into()) }
    }
}

// ---- replies -------------------------------------------------------------------------------

/// A registered user.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserReply {
    /// The user's name.
    pub user: String,
}

/// A login.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LoginReply {
    /// The user's name.
    pub user: String,
    /// Send as `Authorization: Bearer TOKEN` (HTTP, gRPC) or in an `authenticate` frame.
    pub token: String,
    /// When the token stops being accepted, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// A member of a room.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Member {
    /// The user.
    pub user: String,
    /// Their role.
    pub role: Option<Role>,
    /// When they joined, ms since the Unix epoch.
    pub joined_at_ms: u64,
}

/// A room.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Room {
    /// The room id.
    pub room: String,
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: String,
    /// Who may join.
    pub visibility: Visibility,
    /// Members, ordered by name.
    pub members: Vec<Member>,
    /// Banned users (shown to admins and owners only).
    pub banned: Vec<String>,
    /// The shard that holds the room.
    pub shard: u32,
    /// When it was created, ms since the Unix epoch.
    pub created_at_ms: u64,
}

impl From<pb::Room> for Room {
    fn from(r: pb::Room) -> Self {
        Self {
            room: r.room,
            title: r.title,
            topic: r.topic,
            visibility: visibility_from_pb(r.visibility),
            members: r
                .members
                .into_iter()
                .map(|m| Member { user: m.user, role: role_from_pb(m.role), joined_at_ms: m.joined_at_ms })
                .collect(),
            banned: r.banned,
            shard: r.shard,
            created_at_ms: r.created_at_ms,
        }
    }
}

/// One room in a list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RoomSummary {
    /// The room id.
    pub room: String,
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: String,
    /// Who may join.
    pub visibility: Visibility,
    /// Number of members.
    pub member_count: u32,
    /// The caller's role; null if not a member.
    pub my_role: Option<Role>,
    /// Messages others posted after the caller's read marker (members only).
    pub unread_count: u64,
}

/// The rooms the caller can see.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RoomList {
    /// Ordered by room id.
    pub rooms: Vec<RoomSummary>,
    /// Shards that did not answer: the list may miss their rooms.
    pub unavailable_shards: Vec<u32>,
}

impl From<pb::ListRoomsResponse> for RoomList {
    fn from(r: pb::ListRoomsResponse) -> Self {
        Self {
            rooms: r
                .rooms
                .into_iter()
                .map(|s| RoomSummary {
                    room: s.room,
                    title: s.title,
                    topic: s.topic,
                    visibility: visibility_from_pb(s.visibility),
                    member_count: s.member_count,
                    my_role: role_from_pb(s.my_role),
                    unread_count: s.unread_count,
                })
                .collect(),
            unavailable_shards: r.unavailable_shards,
        }
    }
}

/// A membership or room change was committed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Ack {
    /// The shard that committed it.
    pub shard: u32,
    /// Its Raft log index.
    pub log_index: u64,
}

impl From<pb::Ack> for Ack {
    fn from(a: pb::Ack) -> Self {
        Self { shard: a.shard, log_index: a.log_index }
    }
}

/// A message was accepted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PostReply {
    /// The message id (32 hex digits).
    pub message_id: String,
    /// Its place in the room.
    pub position: Option<Position>,
    /// Whether this was a retry of a message the room already held.
    pub duplicate: bool,
    /// The durability reached.
    pub ack: AckLevel,
}

impl From<pb::PostResponse> for PostReply {
    fn from(r: pb::PostResponse) -> Self {
        Self {
            message_id: r.message_id,
            position: r.position.map(Into::into),
            duplicate: r.duplicate,
            ack: ack_from_pb(r.ack),
        }
    }
}

/// A CRDT write was accepted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventAck {
    /// The event's place (null for presence and typing).
    pub position: Option<Position>,
    /// The durability reached.
    pub ack: AckLevel,
}

impl From<pb::EventAck> for EventAck {
    fn from(r: pb::EventAck) -> Self {
        Self { position: r.position.map(Into::into), ack: ack_from_pb(r.ack) }
    }
}

/// One reaction and who gave it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Reaction {
    /// The reaction.
    pub reaction: String,
    /// Who gave it, sorted.
    pub users: Vec<String>,
}

/// A message as the room shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Message {
    /// The message id (32 hex digits).
    pub message_id: String,
    /// Its place in the room.
    pub position: Option<Position>,
    /// Who posted it.
    pub author: String,
    /// The text (empty once redacted). Plain text: never render it as HTML.
    pub body: String,
    /// Whether the author edited it.
    pub edited: bool,
    /// Whether it was redacted.
    pub redacted: bool,
    /// Reactions.
    pub reactions: Vec<Reaction>,
}

impl From<pb::Message> for Message {
    fn from(m: pb::Message) -> Self {
        Self {
            message_id: m.message_id,
            position: m.position.map(Into::into),
            author: m.author,
            body: m.body,
            edited: m.edited,
            redacted: m.redacted,
            reactions: m.reactions.into_iter().map(|r| Reaction { reaction: r.reaction, users: r.users }).collect(),
        }
    }
}

/// A page of history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct History {
    /// The messages, in the order asked for.
    pub messages: Vec<Message>,
    /// Whether more lie beyond the page in that direction.
    pub more: bool,
}

impl From<pb::HistoryResponse> for History {
    fn from(h: pb::HistoryResponse) -> Self {
        Self { messages: h.messages.into_iter().map(Into::into).collect(), more: h.more }
    }
}

/// Presence was set.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PresenceReply {
    /// The rooms it was set in.
    pub rooms: Vec<String>,
}

/// A subscription opened; its events carry `sub`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Subscribed {
    /// The subscription: the id of the frame that opened it.
    pub sub: u64,
    /// The room.
    pub room: String,
}

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageChange {
    /// Posted.
    Posted,
    /// Edited.
    Edited,
    /// Redacted.
    Redacted,
    /// A reaction was added.
    Reacted,
    /// A reaction was taken back.
    Unreacted,
}

/// One event of a room subscription.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A message was posted, edited, redacted or reacted to. Add `position`'s
    /// `(replica, counter)` to the version vector.
    Message {
        /// The event's position.
        position: Option<Position>,
        /// What happened.
        change: Option<MessageChange>,
        /// The message id.
        message_id: String,
        /// Who did it.
        actor: String,
        /// The message as it shows now (null if its post has not arrived yet).
        message: Option<Message>,
    },
    /// Membership or settings changed.
    Membership {
        /// Whose membership changed.
        user: String,
        /// created, joined, left, invited, kicked, banned, unbanned, role, deleted, settings.
        change: String,
        /// Who did it.
        actor: String,
        /// The user's role afterwards; null if not a member.
        role: Option<Role>,
    },
    /// Presence, typing or read markers changed: the room's side state now.
    State {
        /// Users with a live presence entry.
        presence: BTreeMap<String, Presence>,
        /// Users typing now, sorted.
        typing: Vec<String>,
        /// User -> position of the last message they read.
        read_markers: BTreeMap<String, Position>,
    },
    /// Everything the client lacked has been sent; live events follow.
    CaughtUp {
        /// The version vector reached.
        version_vector: VersionVector,
    },
}

impl RoomEvent {
    /// The JSON form of a subscription event (`None` for an empty one).
    pub fn from_pb(event: pb::RoomEvent) -> Option<Self> {
        use pb::room_event::Event;
        Some(match event.event? {
            Event::Message(m) => RoomEvent::Message {
                position: m.position.map(Into::into),
                change: match pb::MessageEventKind::try_from(m.kind) {
                    Ok(pb::MessageEventKind::Posted) => Some(MessageChange::Posted),
                    Ok(pb::MessageEventKind::Edited) => Some(MessageChange::Edited),
                    Ok(pb::MessageEventKind::Redacted) => Some(MessageChange::Redacted),
                    Ok(pb::MessageEventKind::Reacted) => Some(MessageChange::Reacted),
                    Ok(pb::MessageEventKind::Unreacted) => Some(MessageChange::Unreacted),
                    _ => None,
                },
                message_id: m.message_id,
                actor: m.actor,
                message: m.message.map(Into::into),
            },
            Event::Membership(m) => {
                RoomEvent::Membership { user: m.user, change: m.change, actor: m.actor, role: role_from_pb(m.role) }
            }
            Event::State(s) => RoomEvent::State {
                presence: s.presence.into_iter().map(|(u, p)| (u, presence_from_pb(p))).collect(),
                typing: s.typing,
                read_markers: s.read_markers.into_iter().map(|(u, p)| (u, p.into())).collect(),
            },
            Event::CaughtUp(vv) => RoomEvent::CaughtUp { version_vector: vv_from_pb(vv) },
        })
    }
}

/// A failure, as WebSocket error frames and HTTP error bodies carry it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code (docs/errors.md), e.g. `rate_limited`, `not_member`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Whether the same request may succeed later unchanged.
    pub retryable: bool,
    /// For `rate_limited`: wait this long before retrying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<&ApiError> for ErrorBody {
    fn from(e: &ApiError) -> Self {
        Self {
            code: e.code().to_owned(),
            message: e.to_string(),
            retryable: e.is_retryable(),
            retry_after_ms: match e {
                ApiError::RateLimited { retry_after_ms } => Some(*retry_after_ms),
                _ => None,
            },
        }
    }
}
