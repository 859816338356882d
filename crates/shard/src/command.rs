//! The commands of the consensus plane and their results.
//!
//! A [`Command`] is what a client write becomes once it has been validated and authenticated at
//! the edge; it is appended to a shard's Raft log and applied by [`crate::MetaState::apply`] on
//! every replica. Everything apply needs travels in the command: timestamps (`at_ms`), the
//! argon2 hash of a password (salted at the edge), the cluster's token secret. Apply reads no
//! clock and draws no random number, so every replica decides the same.
//!
//! Stored and sent: these types are encoded in the Raft log. Add variants and fields only at the
//! end, never reorder them.

use palaver_ids::{NodeId, RoomId, UserName};
use serde::{Deserialize, Serialize};

/// A role in a room, in increasing rank. Modelled on XMPP MUC affiliations (member, admin,
/// owner); a ban is kept apart, as MUC's "outcast".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// May read and post.
    Member,
    /// May also kick and ban members, invite, unban and change the room's settings.
    Admin,
    /// May also delete the room and grant or take away any role. A room keeps at least one.
    Owner,
}

/// Who may join a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Visibility {
    /// Anyone who is not banned may join.
    #[default]
    Public,
    /// Only invited users may join; only admins and owners invite.
    InviteOnly,
}

/// A room's settings, changed by admins and owners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoomSettings {
    /// Human-readable title; the room id stays the key.
    pub title: String,
    /// Free text shown under the title.
    pub topic: String,
    /// Who may join.
    pub visibility: Visibility,
}

/// Who sent a command and which of its commands it is, so that a command retried after an
/// ambiguous failure (committed, but the answer lost with its leader) is answered with its
/// first outcome instead of being applied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The node that first submitted it.
    pub origin: u64,
    /// Random per start of that node (its sequence restarts at zero).
    pub boot: u64,
    /// The node's sequence number for this start.
    pub seq: u64,
}

/// A command in a shard's Raft log. Variants are encoded by position: new ones go last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Meta group only, once: the cluster's identity and the secret that signs login tokens.
    InitCluster {
        /// Random id of this cluster, chosen by the first node.
        cluster_id: String,
        /// The HMAC key that signs login tokens; every node learns it when it joins.
        token_secret: Vec<u8>,
        /// Number of data shards (fixed for the life of the cluster).
        shard_count: u32,
    },
    /// Meta group only: add a node to the registry. Idempotent on `grpc_addr`: a retried join
    /// gets the id it was given the first time.
    AddNode {
        /// Where the node serves gRPC (peers and clients).
        grpc_addr: String,
        /// When the edge received the join.
        at_ms: u64,
    },
    /// Register a user (on the shard the user name hashes to).
    RegisterUser {
        /// The new user's name.
        user: UserName,
        /// argon2 PHC string, salted at the edge.
        password_hash: String,
        /// When the edge received the request.
        at_ms: u64,
    },
    /// Create a room; the creator becomes its owner.
    CreateRoom {
        /// The new room's id.
        room: RoomId,
        /// The creator, who becomes the first owner.
        owner: UserName,
        /// Initial settings.
        settings: RoomSettings,
        /// When the edge received the request.
        at_ms: u64,
    },
    /// Delete a room (owners only).
    DeleteRoom {
        /// The room.
        room: RoomId,
        /// Who asks.
        actor: UserName,
    },
    /// Replace a room's settings (admins and owners).
    UpdateRoomSettings {
        /// The room.
        room: RoomId,
        /// Who asks.
        actor: UserName,
        /// The new settings.
        settings: RoomSettings,
    },
    /// Join a room as a member.
    Join {
        /// The room.
        room: RoomId,
        /// Who joins.
        user: UserName,
        /// When the edge received the request.
        at_ms: u64,
    },
    /// Invite a user into a room (needed for invite-only rooms).
    Invite {
        /// The room.
        room: RoomId,
        /// Who invites.
        actor: UserName,
        /// Who is invited.
        target: UserName,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: RoomId,
        /// Who leaves.
        user: UserName,
    },
    /// Remove a member from a room; they may join again.
    Kick {
        /// The room.
        room: RoomId,
        /// Who kicks.
        actor: UserName,
        /// Who is kicked.
        target: UserName,
    },
    /// Remove a user from a room and keep them out until unbanned.
    Ban {
        /// The room.
        room: RoomId,
        /// Who bans.
        actor: UserName,
        /// Who is banned (need not be a member).
        target: UserName,
        /// Shown to the banned user and in the audit trail.
        reason: String,
        /// When the edge received the request.
        at_ms: u64,
    },
    /// Lift a ban.
    Unban {
        /// The room.
        room: RoomId,
        /// Who unbans.
        actor: UserName,
        /// Who is unbanned.
        target: UserName,
    },
    /// Give a member another role.
    SetRole {
        /// The room.
        room: RoomId,
        /// Who changes the role.
        actor: UserName,
        /// Whose role changes (must be a member).
        target: UserName,
        /// The new role.
        role: Role,
    },
    /// `command`, identified: applied once, a repeat answered with the first outcome.
    Request {
        /// The request's identity.
        id: RequestId,
        /// When the submitting node received it (ms since the Unix epoch): how long its
        /// outcome is remembered.
        at_ms: u64,
        /// The command.
        command: Box<Command>,
    },
}

impl std::fmt::Display for Command {
    /// A short description for logs (no secrets, no password hashes).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Request { command, .. } => command.fmt(f),
            Command::InitCluster { cluster_id, shard_count, .. } => {
                write!(f, "init cluster {cluster_id} with {shard_count} shards")
            }
            Command::AddNode { grpc_addr, .. } => write!(f, "add node at {grpc_addr}"),
            Command::RegisterUser { user, .. } => write!(f, "register {user}"),
            Command::CreateRoom { room, owner, .. } => write!(f, "{owner} creates {room}"),
            Command::DeleteRoom { room, actor } => write!(f, "{actor} deletes {room}"),
            Command::UpdateRoomSettings { room, actor, .. } => write!(f, "{actor} updates {room}"),
            Command::Join { room, user, .. } => write!(f, "{user} joins {room}"),
            Command::Invite { room, actor, target } => write!(f, "{actor} invites {target} to {room}"),
            Command::Leave { room, user } => write!(f, "{user} leaves {room}"),
            Command::Kick { room, actor, target } => write!(f, "{actor} kicks {target} from {room}"),
            Command::Ban { room, actor, target, .. } => write!(f, "{actor} bans {target} from {room}"),
            Command::Unban { room, actor, target } => write!(f, "{actor} unbans {target} in {room}"),
            Command::SetRole { room, actor, target, role } => {
                write!(f, "{actor} makes {target} {role:?} in {room}")
            }
        }
    }
}

impl Command {
    /// The command itself, without its request identity.
    pub fn inner(&self) -> &Command {
        match self {
            Command::Request { command, .. } => command.inner(),
            other => other,
        }
    }

    /// The room the command is about, if it is a room command.
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            Command::Request { command, .. } => command.room(),
            Command::InitCluster { .. } | Command::AddNode { .. } | Command::RegisterUser { .. } => None,
            Command::CreateRoom { room, .. }
            | Command::DeleteRoom { room, .. }
            | Command::UpdateRoomSettings { room, .. }
            | Command::Join { room, .. }
            | Command::Invite { room, .. }
            | Command::Leave { room, .. }
            | Command::Kick { room, .. }
            | Command::Ban { room, .. }
            | Command::Unban { room, .. }
            | Command::SetRole { room, .. } => Some(room),
        }
    }
}

/// Why the state machine refused a command. Deterministic: every replica refuses the same
/// command the same way, so these are results, not failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The cluster was already initialized.
    #[error("the cluster is already initialized")]
    AlreadyInitialized,
    /// A cluster command reached a shard other than the meta group, or before InitCluster.
    #[error("this shard does not hold the cluster registry")]
    NotMetaShard,
    /// The user name is taken.
    #[error("user {0} already exists")]
    UserExists(UserName),
    /// The room id is taken.
    #[error("room {0} already exists")]
    RoomExists(RoomId),
    /// No such room.
    #[error("room {0} does not exist")]
    RoomNotFound(RoomId),
    /// The user is not a member of the room.
    #[error("{user} is not a member of room {room}")]
    NotMember {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
    },
    /// The user is already a member of the room.
    #[error("{user} is already a member of room {room}")]
    AlreadyMember {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
    },
    /// The user is banned from the room.
    #[error("{user} is banned from room {room}")]
    Banned {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
    },
    /// The user is not banned from the room.
    #[error("{user} is not banned from room {room}")]
    NotBanned {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
    },
    /// The room is invite-only and the user holds no invitation.
    #[error("room {room} is invite-only and {user} is not invited")]
    NotInvited {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
    },
    /// The actor's role does not allow the action (or the target outranks them).
    #[error("{actor} may not {action} in room {room}")]
    PermissionDenied {
        /// The room.
        room: RoomId,
        /// Who tried.
        actor: UserName,
        /// What they tried, e.g. "kick bob".
        action: String,
    },
    /// The action would leave the room without an owner.
    #[error("{user} is the last owner of room {room}; name another owner first")]
    LastOwner {
        /// The room.
        room: RoomId,
        /// The last owner.
        user: UserName,
    },
    /// An actor tried to kick, ban or unban themselves.
    #[error("{0} cannot do that to themselves")]
    SelfTarget(UserName),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::NodeAdded(id) => write!(f, "node {id} added"),
            Outcome::Refused(refusal) => write!(f, "refused: {refusal}"),
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; nothing more to say.
    Done,
    /// AddNode applied: the node's id.
    NodeAdded(NodeId),
    /// The command was refused; the state is unchanged.
    Refused(Refusal),
}
