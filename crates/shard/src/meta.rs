//! The metadata state machine of one shard: users, rooms with their members, roles, bans and
//! invitations, and — on the meta shard only — the cluster registry.
//!
//! [`MetaState::apply`] is a pure function of the state and one [`Command`]. It reads no clock,
//! draws no random number and iterates only `BTreeMap`s and `BTreeSet`s, so every replica that
//! applies the same log reaches the same state and returns the same [`Outcome`]s, also when it
//! re-applies the log after a crash. A refused command is a result ([`Outcome::Refused`]), not a
//! failure, and leaves the state exactly as it was: every check runs before the first change.
//!
//! ## Ranks
//! The rules follow XMPP MUC affiliations (XEP-0045). A member of a room holds one [`Role`];
//! the ranks are, from high to low, **Owner > Admin > Member > none**. A user who is not a member
//! (an outsider, an invited user, a banned user) has no rank. A ban is kept apart from the roles,
//! as MUC's "outcast": a banned user is never a member.
//!
//! | Action | Who may | Notes |
//! |---|---|---|
//! | `Join` | anyone not banned | invite-only rooms need an invitation, consumed on join |
//! | `Leave` | a member | not the last owner |
//! | `Invite` | a member; in invite-only rooms an admin or owner | |
//! | `Kick`, `Ban` | an admin or owner who strictly outranks the target | a ban needs no membership |
//! | `Unban`, `UpdateRoomSettings` | an admin or owner | |
//! | `SetRole` | an owner | the last owner may not demote themself |
//! | `DeleteRoom` | an owner | |
//!
//! Nobody outranks an owner, so an owner leaves a room only by their own `Leave` or `SetRole`,
//! and a room always keeps at least one owner.
//!
//! ## Order of checks
//! So that a command that breaks several rules is always refused the same, predictable way, the
//! room commands check, in this order:
//! 1. the room exists ([`Refusal::RoomNotFound`]);
//! 2. the actor: membership or rank ([`Refusal::PermissionDenied`]; for `Leave`,
//!    [`Refusal::NotMember`]; for `Join`, [`Refusal::Banned`], then an existing membership makes
//!    the join a no-op, then [`Refusal::NotInvited`]);
//! 3. the target: the actor themself ([`Refusal::SelfTarget`] for kick, ban, unban), then the
//!    target's standing (not a member, already a member, banned, not banned), then the target's
//!    rank against the actor's ([`Refusal::PermissionDenied`]);
//! 4. the last-owner rule ([`Refusal::LastOwner`]).
//!
//! An actor who is not a member has no rank, so every action that needs one is
//! `PermissionDenied` for them, whatever the target.
//!
//! The cluster commands check that this is the meta shard (and, for `AddNode`, that the cluster
//! was initialized; both [`Refusal::NotMetaShard`]), then [`Refusal::AlreadyInitialized`].
//!
//! ## Invariants
//! After every command, in every room: at least one member is an owner; no user is both a
//! member and banned, both a member and invited, or both banned and invited. In the cluster
//! registry, node ids are unique, below `next_node_id`, and each `grpc_addr` appears once.
//!
//! ## Idempotence
//! A command that a client may retry after a lost reply is a no-op the second time: joining a
//! room one is a member of (the role and join time stay), inviting an invited user, banning a
//! banned user (the ban record is replaced), setting a role a member already holds, and adding a
//! node whose `grpc_addr` is registered (it gets its first id back).
//!
//! ## Not here
//! - Authentication and input validation: the edge checks passwords, tokens, name syntax and
//!   size limits (name lengths, reason length) before a command reaches the log; apply refuses
//!   only on the rules above.
//! - Whether a room's creator or an invited user is a registered user: users and rooms live on
//!   different shards, so apply cannot see both.
//! - Session roles (MUC moderator, participant, visitor) and voice: they derive from the
//!   affiliation at the edge and are never stored.
//! - Messages, presence and typing: the CRDT plane.

use std::collections::{BTreeMap, BTreeSet};

use palaver_ids::{NodeId, RoomId, UserName};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome, Refusal, RequestId, Role, RoomSettings, Visibility};

/// How long (by the submitting nodes' clocks, as carried in the log) the outcome of an
/// identified request is remembered: well past the routing layer's retry deadline.
pub const REQUEST_MEMORY_MS: u64 = 60_000;
/// Most request outcomes remembered per shard; the oldest are forgotten first.
pub const REQUESTS_REMEMBERED_MAX: usize = 100_000;

/// The outcomes of recent identified requests, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct RecentRequests {
    outcomes: BTreeMap<RequestId, Outcome>,
    order: std::collections::VecDeque<(u64, RequestId)>,
}

impl RecentRequests {
    fn get(&self, id: &RequestId) -> Option<&Outcome> {
        self.outcomes.get(id)
    }

    /// Remember `outcome`, forgetting those older than [`REQUEST_MEMORY_MS`] before `at_ms`
    /// and beyond [`REQUESTS_REMEMBERED_MAX`]. Deterministic: only log contents decide.
    fn record(&mut self, id: RequestId, at_ms: u64, outcome: Outcome) {
        while let Some(&(oldest_ms, oldest)) = self.order.front() {
            if oldest_ms.saturating_add(REQUEST_MEMORY_MS) >= at_ms && self.order.len() < REQUESTS_REMEMBERED_MAX {
                break;
            }
            self.order.pop_front();
            self.outcomes.remove(&oldest);
        }
        if self.outcomes.insert(id, outcome).is_none() {
            self.order.push_back((at_ms, id));
        }
    }

    /// How many outcomes are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.outcomes.len()
    }
}

/// The metadata of one shard: its users, its rooms and, on the meta shard, the cluster registry.
///
/// Changed only by [`MetaState::apply`]; see the module doc for the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MetaState {
    /// Whether this is shard 0, the only shard that holds the cluster registry.
    is_meta: bool,
    /// The cluster registry, once `InitCluster` has been applied (meta shard only).
    cluster: Option<ClusterInfo>,
    /// The users whose names hash to this shard.
    users: BTreeMap<UserName, UserRecord>,
    /// The rooms whose ids hash to this shard.
    rooms: BTreeMap<RoomId, Room>,
    /// Outcomes of recent identified requests, to answer a retry without applying it again.
    requests: RecentRequests,
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2 PHC string, salted at the edge.
    pub password_hash: String,
    /// When the edge received the registration.
    pub created_at_ms: u64,
}

/// A room: its settings and who is in it, invited to it or banned from it.
///
/// A user is in at most one of `members`, `banned` and `invited`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// Title, topic and visibility.
    pub settings: RoomSettings,
    /// When the edge received the `CreateRoom`.
    pub created_at_ms: u64,
    /// The members and their roles; at least one is an owner.
    pub members: BTreeMap<UserName, Membership>,
    /// The banned users (MUC "outcasts").
    pub banned: BTreeMap<UserName, BanRecord>,
    /// Users invited and not yet joined.
    pub invited: BTreeSet<UserName>,
}

/// One member's standing in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The member's role.
    pub role: Role,
    /// When the member joined (or created the room).
    pub joined_at_ms: u64,
}

/// Why and by whom a user was banned from a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanRecord {
    /// Who banned them (the latest ban, if banned again).
    pub by: UserName,
    /// Shown to the banned user and in the audit trail.
    pub reason: String,
    /// When the edge received the ban.
    pub at_ms: u64,
}

/// The cluster registry, held by the meta shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Random id of this cluster, chosen by the first node.
    pub cluster_id: String,
    /// The HMAC key that signs login tokens.
    pub token_secret: Vec<u8>,
    /// Number of data shards, fixed for the life of the cluster.
    pub shard_count: u32,
    /// The nodes that have joined, by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// The id the next new node gets; ids start at 1 and are never reused.
    pub next_node_id: u64,
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Where the node serves gRPC (peers and clients); unique in the registry.
    pub grpc_addr: String,
    /// When the edge received the node's first join.
    pub joined_at_ms: u64,
}

/// The id of the first node added to a cluster.
const FIRST_NODE_ID: u64 = 1;

impl MetaState {
    /// An empty state. `is_meta`: whether this is shard 0 (the only shard that accepts
    /// `InitCluster` and `AddNode`).
    pub fn new(is_meta: bool) -> Self {
        Self { is_meta, ..Self::default() }
    }

    /// Apply one command.
    ///
    /// Deterministic: no clock, no RNG, no `HashMap` iteration. Refusals leave the state
    /// unchanged. Never panics.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        let result = match command {
            Command::Request { id, at_ms, command } => {
                if let Some(first) = self.requests.get(id) {
                    return first.clone();
                }
                let outcome = self.apply(command);
                self.requests.record(*id, *at_ms, outcome.clone());
                return outcome;
            }
            Command::InitCluster { cluster_id, token_secret, shard_count } => {
                self.init_cluster(cluster_id, token_secret, *shard_count)
            }
            Command::AddNode { grpc_addr, at_ms } => {
                return match self.add_node(grpc_addr, *at_ms) {
                    Ok(node) => Outcome::NodeAdded(node),
                    Err(refusal) => Outcome::Refused(refusal),
                };
            }
            Command::RegisterUser { user, password_hash, at_ms } => self.register_user(user, password_hash, *at_ms),
            Command::CreateRoom { room, owner, settings, at_ms } => self.create_room(room, owner, settings, *at_ms),
            Command::DeleteRoom { room, actor } => self.delete_room(room, actor),
            Command::UpdateRoomSettings { room, actor, settings } => self.update_room_settings(room, actor, settings),
            Command::Join { room, user, at_ms } => self.join(room, user, *at_ms),
            Command::Invite { room, actor, target } => self.invite(room, actor, target),
            Command::Leave { room, user } => self.leave(room, user),
            Command::Kick { room, actor, target } => self.kick(room, actor, target),
            Command::Ban { room, actor, target, reason, at_ms } => self.ban(room, actor, target, reason, *at_ms),
            Command::Unban { room, actor, target } => self.unban(room, actor, target),
            Command::SetRole { room, actor, target, role } => self.set_role(room, actor, target, *role),
        };
        match result {
            Ok(()) => Outcome::Done,
            Err(refusal) => Outcome::Refused(refusal),
        }
    }

    /// A registered user of this shard.
    pub fn user(&self, user: &UserName) -> Option<&UserRecord> {
        self.users.get(user)
    }

    /// A room of this shard.
    pub fn room(&self, room: &RoomId) -> Option<&Room> {
        self.rooms.get(room)
    }

    /// The rooms of this shard, in id order.
    pub fn rooms(&self) -> impl Iterator<Item = (&RoomId, &Room)> {
        self.rooms.iter()
    }

    /// The cluster registry: `Some` only on the meta shard after `InitCluster`.
    pub fn cluster(&self) -> Option<&ClusterInfo> {
        self.cluster.as_ref()
    }
}

impl Room {
    /// The user's role, or `None` if they are not a member.
    pub fn role_of(&self, user: &UserName) -> Option<Role> {
        self.members.get(user).map(|membership| membership.role)
    }

    /// Whether the user is a member (of any role).
    pub fn is_member(&self, user: &UserName) -> bool {
        self.members.contains_key(user)
    }

    /// How many members are owners.
    fn owner_count(&self) -> usize {
        self.members.values().filter(|membership| membership.role == Role::Owner).count()
    }

    /// Whether `user` is the room's only owner.
    fn is_last_owner(&self, user: &UserName) -> bool {
        self.role_of(user) == Some(Role::Owner) && self.owner_count() == 1
    }
}

// The handlers: each checks everything first and changes the state only when it returns `Ok`.
impl MetaState {
    fn init_cluster(&mut self, cluster_id: &str, token_secret: &[u8], shard_count: u32) -> Result<(), Refusal> {
        if !self.is_meta {
            return Err(Refusal::NotMetaShard);
        }
        if self.cluster.is_some() {
            return Err(Refusal::AlreadyInitialized);
        }
        self.cluster = Some(ClusterInfo {
            cluster_id: cluster_id.to_owned(),
            token_secret: token_secret.to_vec(),
            shard_count,
            nodes: BTreeMap::new(),
            next_node_id: FIRST_NODE_ID,
        });
        Ok(())
    }

    fn add_node(&mut self, grpc_addr: &str, at_ms: u64) -> Result<NodeId, Refusal> {
        if !self.is_meta {
            return Err(Refusal::NotMetaShard);
        }
        let Some(cluster) = self.cluster.as_mut() else {
            return Err(Refusal::NotMetaShard);
        };
        // A linear scan: the registry holds a handful of nodes and a join is rare.
        if let Some((&node, _)) = cluster.nodes.iter().find(|(_, record)| record.grpc_addr == grpc_addr) {
            return Ok(node);
        }
        let node = NodeId(cluster.next_node_id);
        // 2^64 joins cannot happen in a cluster's life; saturating keeps apply free of panics.
        cluster.next_node_id = cluster.next_node_id.saturating_add(1);
        cluster.nodes.insert(node, NodeRecord { grpc_addr: grpc_addr.to_owned(), joined_at_ms: at_ms });
        Ok(node)
    }

    fn register_user(&mut self, user: &UserName, password_hash: &str, at_ms: u64) -> Result<(), Refusal> {
        if self.users.contains_key(user) {
            return Err(Refusal::UserExists(user.clone()));
        }
        self.users.insert(user.clone(), UserRecord { password_hash: password_hash.to_owned(), created_at_ms: at_ms });
        Ok(())
    }

    fn create_room(
        &mut self,
        room_id: &RoomId,
        owner: &UserName,
        settings: &RoomSettings,
        at_ms: u64,
    ) -> Result<(), Refusal> {
        if self.rooms.contains_key(room_id) {
            return Err(Refusal::RoomExists(room_id.clone()));
        }
        let members = BTreeMap::from([(owner.clone(), Membership { role: Role::Owner, joined_at_ms: at_ms })]);
        self.rooms.insert(
            room_id.clone(),
            Room {
                settings: settings.clone(),
                created_at_ms: at_ms,
                members,
                banned: BTreeMap::new(),
                invited: BTreeSet::new(),
            },
        );
        Ok(())
    }

    fn delete_room(&mut self, room_id: &RoomId, actor: &UserName) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        require_rank(room, room_id, actor, Role::Owner, || "delete the room".to_owned())?;
        self.rooms.remove(room_id);
        Ok(())
    }

    fn update_room_settings(
        &mut self,
        room_id: &RoomId,
        actor: &UserName,
        settings: &RoomSettings,
    ) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        require_rank(room, room_id, actor, Role::Admin, || "change the room's settings".to_owned())?;
        room.settings = settings.clone();
        Ok(())
    }

    fn join(&mut self, room_id: &RoomId, user: &UserName, at_ms: u64) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        if room.banned.contains_key(user) {
            return Err(Refusal::Banned { room: room_id.clone(), user: user.clone() });
        }
        if room.is_member(user) {
            return Ok(());
        }
        let invited = room.invited.contains(user);
        if room.settings.visibility == Visibility::InviteOnly && !invited {
            return Err(Refusal::NotInvited { room: room_id.clone(), user: user.clone() });
        }
        room.invited.remove(user);
        room.members.insert(user.clone(), Membership { role: Role::Member, joined_at_ms: at_ms });
        Ok(())
    }

    fn invite(&mut self, room_id: &RoomId, actor: &UserName, target: &UserName) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        let needed = match room.settings.visibility {
            Visibility::Public => Role::Member,
            Visibility::InviteOnly => Role::Admin,
        };
        require_rank(room, room_id, actor, needed, || format!("invite {target}"))?;
        if room.banned.contains_key(target) {
            return Err(Refusal::Banned { room: room_id.clone(), user: target.clone() });
        }
        if room.is_member(target) {
            return Err(Refusal::AlreadyMember { room: room_id.clone(), user: target.clone() });
        }
        room.invited.insert(target.clone());
        Ok(())
    }

    fn leave(&mut self, room_id: &RoomId, user: &UserName) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        if !room.is_member(user) {
            return Err(Refusal::NotMember { room: room_id.clone(), user: user.clone() });
        }
        if room.is_last_owner(user) {
            return Err(Refusal::LastOwner { room: room_id.clone(), user: user.clone() });
        }
        room.members.remove(user);
        Ok(())
    }

    fn kick(&mut self, room_id: &RoomId, actor: &UserName, target: &UserName) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        let action = || format!("kick {target}");
        let actor_role = require_rank(room, room_id, actor, Role::Admin, action)?;
        if actor == target {
            return Err(Refusal::SelfTarget(actor.clone()));
        }
        let Some(target_role) = room.role_of(target) else {
            return Err(Refusal::NotMember { room: room_id.clone(), user: target.clone() });
        };
        require_outranks(actor_role, Some(target_role), room_id, actor, action)?;
        room.members.remove(target);
        Ok(())
    }

    fn ban(
        &mut self,
        room_id: &RoomId,
        actor: &UserName,
        target: &UserName,
        reason: &str,
        at_ms: u64,
    ) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        let action = || format!("ban {target}");
        let actor_role = require_rank(room, room_id, actor, Role::Admin, action)?;
        if actor == target {
            return Err(Refusal::SelfTarget(actor.clone()));
        }
        require_outranks(actor_role, room.role_of(target), room_id, actor, action)?;
        room.members.remove(target);
        room.invited.remove(target);
        room.banned.insert(target.clone(), BanRecord { by: actor.clone(), reason: reason.to_owned(), at_ms });
        Ok(())
    }

    fn unban(&mut self, room_id: &RoomId, actor: &UserName, target: &UserName) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        require_rank(room, room_id, actor, Role::Admin, || format!("unban {target}"))?;
        if actor == target {
            return Err(Refusal::SelfTarget(actor.clone()));
        }
        if room.banned.remove(target).is_none() {
            return Err(Refusal::NotBanned { room: room_id.clone(), user: target.clone() });
        }
        Ok(())
    }

    fn set_role(&mut self, room_id: &RoomId, actor: &UserName, target: &UserName, role: Role) -> Result<(), Refusal> {
        let room = self.room_or_refuse(room_id)?;
        require_rank(room, room_id, actor, Role::Owner, || format!("set the role of {target} to {role:?}"))?;
        let Some(current) = room.role_of(target) else {
            return Err(Refusal::NotMember { room: room_id.clone(), user: target.clone() });
        };
        if current == role {
            return Ok(());
        }
        // Only an owner gets here, and an owner can lose the role only by changing their own.
        if room.is_last_owner(target) {
            return Err(Refusal::LastOwner { room: room_id.clone(), user: target.clone() });
        }
        if let Some(membership) = room.members.get_mut(target) {
            membership.role = role;
        }
        Ok(())
    }

    /// The room, for a command that may change it, or `RoomNotFound`.
    fn room_or_refuse(&mut self, room_id: &RoomId) -> Result<&mut Room, Refusal> {
        self.rooms.get_mut(room_id).ok_or_else(|| Refusal::RoomNotFound(room_id.clone()))
    }
}

/// The actor's role if it is at least `needed`; otherwise `PermissionDenied` for `action`.
/// A non-member has no rank and is always refused.
fn require_rank(
    room: &Room,
    room_id: &RoomId,
    actor: &UserName,
    needed: Role,
    action: impl FnOnce() -> String,
) -> Result<Role, Refusal> {
    match room.role_of(actor) {
        Some(role) if role >= needed => Ok(role),
        _ => Err(denied(room_id, actor, action())),
    }
}

/// `Ok` if the actor strictly outranks the target (`None`: the target is not a member and has
/// no rank); otherwise `PermissionDenied` for `action`.
fn require_outranks(
    actor_role: Role,
    target_role: Option<Role>,
    room_id: &RoomId,
    actor: &UserName,
    action: impl FnOnce() -> String,
) -> Result<(), Refusal> {
    if Some(actor_role) > target_role { Ok(()) } else { Err(denied(room_id, actor, action())) }
}

fn denied(room_id: &RoomId, actor: &UserName, action: String) -> Refusal {
    Refusal::PermissionDenied { room: room_id.clone(), actor: actor.clone(), action }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    // ---------------------------------------------------------------------------------------
    // The fixture of the rule table: room "lobby", built fresh for every row.
    // ---------------------------------------------------------------------------------------

    const LOBBY: &str = "lobby";
    /// Owner; created the room.
    const OLGA: &str = "olga";
    /// A second owner, so that an owner has an owner to act on (and may leave).
    const OTTO: &str = "otto";
    /// Admin.
    const ADAM: &str = "adam";
    /// Member.
    const MIA: &str = "mia";
    /// Banned (by olga); not a member.
    const BOB: &str = "bob";
    /// Outsider: not a member, not invited, not banned.
    const NINA: &str = "nina";

    /// The actors of the table, one per standing: Owner, Admin, Member, NonMember, Banned.
    const ACTORS: [&str; 5] = [OLGA, ADAM, MIA, NINA, BOB];

    fn user(name: &str) -> UserName {
        UserName::from(name)
    }

    fn lobby() -> RoomId {
        RoomId::from(LOBBY)
    }

    fn settings(visibility: Visibility) -> RoomSettings {
        RoomSettings { title: "Lobby".to_owned(), topic: "say hi".to_owned(), visibility }
    }

    /// Apply a command that must succeed while building a fixture.
    fn must(state: &mut MetaState, command: Command) {
        let outcome = state.apply(&command);
        assert_eq!(outcome, Outcome::Done, "fixture command {command:?}");
    }

    fn request(seq: u64, at_ms: u64, command: Command) -> Command {
        Command::Request { id: RequestId { origin: 2, boot: 7, seq }, at_ms, command: Box::new(command) }
    }

    #[test]
    fn a_retried_request_gets_its_first_outcome_and_is_not_applied_again() {
        let mut state = fixture(Visibility::Public);
        let leave = Command::Leave { room: lobby(), user: user(MIA) };
        let first = request(1, 1_000, leave.clone());
        assert_eq!(state.apply(&first), Outcome::Done);
        let after_first = state.clone();
        assert_eq!(state.apply(&first), Outcome::Done, "the retry is answered, not refused as not_member");
        assert_eq!(state, after_first, "and changes nothing");
        // The same command under a new identity is a new request, refused on its merits.
        let expected = Outcome::Refused(Refusal::NotMember { room: lobby(), user: user(MIA) });
        assert_eq!(state.apply(&request(2, 1_001, leave.clone())), expected);
        assert_eq!(state.apply(&leave), expected, "an unidentified command is applied as before");
    }

    #[test]
    fn request_outcomes_are_forgotten_after_the_memory_window() {
        let mut state = fixture(Visibility::Public);
        let join = Command::Join { room: lobby(), user: user(NINA), at_ms: 5 };
        assert_eq!(state.apply(&request(1, 1_000, join.clone())), Outcome::Done);
        assert_eq!(state.requests.len(), 1);
        let later = 1_000 + REQUEST_MEMORY_MS + 1;
        let leave = Command::Leave { room: lobby(), user: user(NINA) };
        assert_eq!(state.apply(&request(2, later, leave)), Outcome::Done);
        assert_eq!(state.requests.len(), 1, "the old outcome was forgotten when a newer request came");
        // A forgotten request is applied on its merits: nina left, so she joins again.
        assert_eq!(state.apply(&request(1, later, join)), Outcome::Done);
        assert_eq!(state.room(&lobby()).and_then(|room| room.role_of(&user(NINA))), Some(Role::Member));
    }

    /// The room of the table: olga and otto owners, adam admin, mia member, bob banned.
    fn fixture(visibility: Visibility) -> MetaState {
        let mut state = MetaState::new(false);
        let room = lobby();
        must(&mut state, create(LOBBY, OLGA, Visibility::Public));
        for (name, role) in [(OTTO, Role::Owner), (ADAM, Role::Admin), (MIA, Role::Member)] {
            must(&mut state, Command::Join { room: room.clone(), user: user(name), at_ms: 2 });
            must(&mut state, Command::SetRole { room: room.clone(), actor: user(OLGA), target: user(name), role });
        }
        must(
            &mut state,
            Command::Ban {
                room: room.clone(),
                actor: user(OLGA),
                target: user(BOB),
                reason: "spam".to_owned(),
                at_ms: 3,
            },
        );
        must(&mut state, Command::UpdateRoomSettings { room, actor: user(OLGA), settings: settings(visibility) });
        state
    }

    fn create(room: &str, owner: &str, visibility: Visibility) -> Command {
        Command::CreateRoom { room: RoomId::from(room), owner: user(owner), settings: settings(visibility), at_ms: 1 }
    }

    // ---------------------------------------------------------------------------------------
    // The rule table.
    // ---------------------------------------------------------------------------------------

    /// An action of the table, taken by the row's actor in the lobby.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Act {
        Join,
        Invite(&'static str),
        Leave,
        Kick(&'static str),
        Ban(&'static str),
        Unban(&'static str),
        SetRole(&'static str, Role),
        DeleteRoom,
        UpdateRoomSettings,
    }

    /// What the row expects; refusals name the user they are about.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        Done,
        /// `PermissionDenied` for the actor and this action.
        Denied,
        /// `SelfTarget` of the actor.
        SelfTarget,
        NotMember(&'static str),
        AlreadyMember(&'static str),
        Banned(&'static str),
        NotBanned(&'static str),
        NotInvited(&'static str),
    }

    /// One rule: `actor` does `action`; the expected outcome in a public and an invite-only room.
    #[derive(Debug, Clone, Copy)]
    struct Row {
        actor: &'static str,
        action: Act,
        public: Expect,
        invite_only: Expect,
    }

    const fn row(actor: &'static str, action: Act, public: Expect, invite_only: Expect) -> Row {
        Row { actor, action, public, invite_only }
    }

    use self::Act::*;
    use self::Expect::*;

    /// Every action of the table, each with the targets that tell the rules apart.
    const ACTIONS: [Act; 22] = [
        Join,
        Invite(NINA),
        Invite(MIA),
        Invite(BOB),
        Leave,
        Kick(MIA),
        Kick(ADAM),
        Kick(OTTO),
        Kick(NINA),
        Ban(MIA),
        Ban(ADAM),
        Ban(OTTO),
        Ban(NINA),
        Ban(BOB),
        Unban(BOB),
        Unban(NINA),
        SetRole(MIA, Role::Owner),
        SetRole(MIA, Role::Admin),
        SetRole(MIA, Role::Member),
        SetRole(NINA, Role::Member),
        DeleteRoom,
        UpdateRoomSettings,
    ];

    /// The rules. Fixture: olga and otto are owners, adam an admin, mia a member, bob banned,
    /// nina an outsider; nobody is invited.
    #[rustfmt::skip]
    const TABLE: &[Row] = &[
        //   actor  action                      public               invite-only
        // An owner may do everything, except act on another owner.
        row(OLGA, Join,                         Done,                Done),
        row(OLGA, Invite(NINA),                 Done,                Done),
        row(OLGA, Invite(MIA),                  AlreadyMember(MIA),  AlreadyMember(MIA)),
        row(OLGA, Invite(BOB),                  Banned(BOB),         Banned(BOB)),
        row(OLGA, Leave,                        Done,                Done),
        row(OLGA, Kick(MIA),                    Done,                Done),
        row(OLGA, Kick(ADAM),                   Done,                Done),
        row(OLGA, Kick(OTTO),                   Denied,              Denied),
        row(OLGA, Kick(NINA),                   NotMember(NINA),     NotMember(NINA)),
        row(OLGA, Ban(MIA),                     Done,                Done),
        row(OLGA, Ban(ADAM),                    Done,                Done),
        row(OLGA, Ban(OTTO),                    Denied,              Denied),
        row(OLGA, Ban(NINA),                    Done,                Done),
        row(OLGA, Ban(BOB),                     Done,                Done),
        row(OLGA, Unban(BOB),                   Done,                Done),
        row(OLGA, Unban(NINA),                  NotBanned(NINA),     NotBanned(NINA)),
        row(OLGA, SetRole(MIA, Role::Owner),    Done,                Done),
        row(OLGA, SetRole(MIA, Role::Admin),    Done,                Done),
        row(OLGA, SetRole(MIA, Role::Member),   Done,                Done),
        row(OLGA, SetRole(NINA, Role::Member),  NotMember(NINA),     NotMember(NINA)),
        row(OLGA, DeleteRoom,                   Done,                Done),
        row(OLGA, UpdateRoomSettings,           Done,                Done),
        // An admin moderates members and outsiders, but not owners nor roles nor the room.
        row(ADAM, Join,                         Done,                Done),
        row(ADAM, Invite(NINA),                 Done,                Done),
        row(ADAM, Invite(MIA),                  AlreadyMember(MIA),  AlreadyMember(MIA)),
        row(ADAM, Invite(BOB),                  Banned(BOB),         Banned(BOB)),
        row(ADAM, Leave,                        Done,                Done),
        row(ADAM, Kick(MIA),                    Done,                Done),
        row(ADAM, Kick(ADAM),                   SelfTarget,          SelfTarget),
        row(ADAM, Kick(OTTO),                   Denied,              Denied),
        row(ADAM, Kick(NINA),                   NotMember(NINA),     NotMember(NINA)),
        row(ADAM, Ban(MIA),                     Done,                Done),
        row(ADAM, Ban(ADAM),                    SelfTarget,          SelfTarget),
        row(ADAM, Ban(OTTO),                    Denied,              Denied),
        row(ADAM, Ban(NINA),                    Done,                Done),
        row(ADAM, Ban(BOB),                     Done,                Done),
        row(ADAM, Unban(BOB),                   Done,                Done),
        row(ADAM, Unban(NINA),                  NotBanned(NINA),     NotBanned(NINA)),
        row(ADAM, SetRole(MIA, Role::Owner),    Denied,              Denied),
        row(ADAM, SetRole(MIA, Role::Admin),    Denied,              Denied),
        row(ADAM, SetRole(MIA, Role::Member),   Denied,              Denied),
        row(ADAM, SetRole(NINA, Role::Member),  Denied,              Denied),
        row(ADAM, DeleteRoom,                   Denied,              Denied),
        row(ADAM, UpdateRoomSettings,           Done,                Done),
        // A member may join, leave, and invite into a public room; nothing else.
        row(MIA,  Join,                         Done,                Done),
        row(MIA,  Invite(NINA),                 Done,                Denied),
        row(MIA,  Invite(MIA),                  AlreadyMember(MIA),  Denied),
        row(MIA,  Invite(BOB),                  Banned(BOB),         Denied),
        row(MIA,  Leave,                        Done,                Done),
        row(MIA,  Kick(MIA),                    Denied,              Denied),
        row(MIA,  Kick(ADAM),                   Denied,              Denied),
        row(MIA,  Kick(OTTO),                   Denied,              Denied),
        row(MIA,  Kick(NINA),                   Denied,              Denied),
        row(MIA,  Ban(MIA),                     Denied,              Denied),
        row(MIA,  Ban(ADAM),                    Denied,              Denied),
        row(MIA,  Ban(OTTO),                    Denied,              Denied),
        row(MIA,  Ban(NINA),                    Denied,              Denied),
        row(MIA,  Ban(BOB),                     Denied,              Denied),
        row(MIA,  Unban(BOB),                   Denied,              Denied),
        row(MIA,  Unban(NINA),                  Denied,              Denied),
        row(MIA,  SetRole(MIA, Role::Owner),    Denied,              Denied),
        row(MIA,  SetRole(MIA, Role::Admin),    Denied,              Denied),
        row(MIA,  SetRole(MIA, Role::Member),   Denied,              Denied),
        row(MIA,  SetRole(NINA, Role::Member),  Denied,              Denied),
        row(MIA,  DeleteRoom,                   Denied,              Denied),
        row(MIA,  UpdateRoomSettings,           Denied,              Denied),
        // An outsider has no rank: they may only join a public room.
        row(NINA, Join,                         Done,                NotInvited(NINA)),
        row(NINA, Invite(NINA),                 Denied,              Denied),
        row(NINA, Invite(MIA),                  Denied,              Denied),
        row(NINA, Invite(BOB),                  Denied,              Denied),
        row(NINA, Leave,                        NotMember(NINA),     NotMember(NINA)),
        row(NINA, Kick(MIA),                    Denied,              Denied),
        row(NINA, Kick(ADAM),                   Denied,              Denied),
        row(NINA, Kick(OTTO),                   Denied,              Denied),
        row(NINA, Kick(NINA),                   Denied,              Denied),
        row(NINA, Ban(MIA),                     Denied,              Denied),
        row(NINA, Ban(ADAM),                    Denied,              Denied),
        row(NINA, Ban(OTTO),                    Denied,              Denied),
        row(NINA, Ban(NINA),                    Denied,              Denied),
        row(NINA, Ban(BOB),                     Denied,              Denied),
        row(NINA, Unban(BOB),                   Denied,              Denied),
        row(NINA, Unban(NINA),                  Denied,              Denied),
        row(NINA, SetRole(MIA, Role::Owner),    Denied,              Denied),
        row(NINA, SetRole(MIA, Role::Admin),    Denied,              Denied),
        row(NINA, SetRole(MIA, Role::Member),   Denied,              Denied),
        row(NINA, SetRole(NINA, Role::Member),  Denied,              Denied),
        row(NINA, DeleteRoom,                   Denied,              Denied),
        row(NINA, UpdateRoomSettings,           Denied,              Denied),
        // A banned user has no rank and may not even join.
        row(BOB,  Join,                         Banned(BOB),         Banned(BOB)),
        row(BOB,  Invite(NINA),                 Denied,              Denied),
        row(BOB,  Invite(MIA),                  Denied,              Denied),
        row(BOB,  Invite(BOB),                  Denied,              Denied),
        row(BOB,  Leave,                        NotMember(BOB),      NotMember(BOB)),
        row(BOB,  Kick(MIA),                    Denied,              Denied),
        row(BOB,  Kick(ADAM),                   Denied,              Denied),
        row(BOB,  Kick(OTTO),                   Denied,              Denied),
        row(BOB,  Kick(NINA),                   Denied,              Denied),
        row(BOB,  Ban(MIA),                     Denied,              Denied),
        row(BOB,  Ban(ADAM),                    Denied,              Denied),
        row(BOB,  Ban(OTTO),                    Denied,              Denied),
        row(BOB,  Ban(NINA),                    Denied,              Denied),
        row(BOB,  Ban(BOB),                     Denied,              Denied),
        row(BOB,  Unban(BOB),                   Denied,              Denied),
        row(BOB,  Unban(NINA),                  Denied,              Denied),
        row(BOB,  SetRole(MIA, Role::Owner),    Denied,              Denied),
        row(BOB,  SetRole(MIA, Role::Admin),    Denied,              Denied),
        row(BOB,  SetRole(MIA, Role::Member),   Denied,              Denied),
        row(BOB,  SetRole(NINA, Role::Member),  Denied,              Denied),
        row(BOB,  DeleteRoom,                   Denied,              Denied),
        row(BOB,  UpdateRoomSettings,           Denied,              Denied),
    ];

    impl Act {
        /// The command for `actor` taking this action in the lobby.
        fn command(self, actor: &str) -> Command {
            let room = lobby();
            let actor = user(actor);
            match self {
                Join => Command::Join { room, user: actor, at_ms: 10 },
                Invite(target) => Command::Invite { room, actor, target: user(target) },
                Leave => Command::Leave { room, user: actor },
                Kick(target) => Command::Kick { room, actor, target: user(target) },
                Ban(target) => {
                    Command::Ban { room, actor, target: user(target), reason: "rules".to_owned(), at_ms: 10 }
                }
                Unban(target) => Command::Unban { room, actor, target: user(target) },
                SetRole(target, role) => Command::SetRole { room, actor, target: user(target), role },
                DeleteRoom => Command::DeleteRoom { room, actor },
                UpdateRoomSettings => Command::UpdateRoomSettings {
                    room,
                    actor,
                    settings: RoomSettings { topic: "new topic".to_owned(), ..settings(Visibility::Public) },
                },
            }
        }

        /// How a `PermissionDenied` describes this action.
        fn description(self) -> String {
            match self {
                Invite(target) => format!("invite {target}"),
                Kick(target) => format!("kick {target}"),
                Ban(target) => format!("ban {target}"),
                Unban(target) => format!("unban {target}"),
                SetRole(target, role) => format!("set the role of {target} to {role:?}"),
                DeleteRoom => "delete the room".to_owned(),
                UpdateRoomSettings => "change the room's settings".to_owned(),
                Join | Leave => "(never denied)".to_owned(),
            }
        }
    }

    impl Expect {
        /// The exact outcome this expectation stands for, for `actor` taking `action`.
        fn outcome(self, actor: &str, action: Act) -> Outcome {
            let room = lobby();
            let refusal = match self {
                Done => return Outcome::Done,
                Denied => Refusal::PermissionDenied { room, actor: user(actor), action: action.description() },
                SelfTarget => Refusal::SelfTarget(user(actor)),
                NotMember(who) => Refusal::NotMember { room, user: user(who) },
                AlreadyMember(who) => Refusal::AlreadyMember { room, user: user(who) },
                Banned(who) => Refusal::Banned { room, user: user(who) },
                NotBanned(who) => Refusal::NotBanned { room, user: user(who) },
                NotInvited(who) => Refusal::NotInvited { room, user: user(who) },
            };
            Outcome::Refused(refusal)
        }
    }

    #[test]
    fn rule_table_covers_every_standing_and_action_once() {
        for actor in ACTORS {
            for action in ACTIONS {
                let rows = TABLE.iter().filter(|r| r.actor == actor && r.action == action).count();
                assert_eq!(rows, 1, "rows for {actor} doing {action:?}");
            }
        }
        assert_eq!(TABLE.len(), ACTORS.len() * ACTIONS.len(), "the table has extra rows");
    }

    #[test]
    fn rule_table() {
        let mut failures = Vec::new();
        for visibility in [Visibility::Public, Visibility::InviteOnly] {
            for row in TABLE {
                let mut state = fixture(visibility);
                let before = state.clone();
                let command = row.action.command(row.actor);
                let expect = match visibility {
                    Visibility::Public => row.public,
                    Visibility::InviteOnly => row.invite_only,
                };
                let expected = expect.outcome(row.actor, row.action);
                let outcome = state.apply(&command);
                if outcome != expected {
                    failures.push(format!(
                        "{visibility:?}: {} {:?}: expected {expected:?}, got {outcome:?}",
                        row.actor, row.action
                    ));
                }
                if matches!(outcome, Outcome::Refused(_)) && state != before {
                    failures
                        .push(format!("{visibility:?}: {} {:?}: refused but changed the state", row.actor, row.action));
                }
                if let Err(broken) = check_invariants(&state) {
                    failures.push(format!("{visibility:?}: {} {:?}: {broken}", row.actor, row.action));
                }
            }
        }
        assert!(failures.is_empty(), "{} rule(s) broken:\n{}", failures.len(), failures.join("\n"));
    }

    // ---------------------------------------------------------------------------------------
    // Rules with more than one step.
    // ---------------------------------------------------------------------------------------

    fn room_of(state: &MetaState) -> &Room {
        match state.room(&lobby()) {
            Some(room) => room,
            None => panic!("the lobby is gone"),
        }
    }

    fn set_role(actor: &str, target: &str, role: Role) -> Command {
        Command::SetRole { room: lobby(), actor: user(actor), target: user(target), role }
    }

    fn leave(name: &str) -> Command {
        Command::Leave { room: lobby(), user: user(name) }
    }

    fn join(name: &str, at_ms: u64) -> Command {
        Command::Join { room: lobby(), user: user(name), at_ms }
    }

    fn invite(actor: &str, target: &str) -> Command {
        Command::Invite { room: lobby(), actor: user(actor), target: user(target) }
    }

    fn ban(actor: &str, target: &str, reason: &str, at_ms: u64) -> Command {
        Command::Ban { room: lobby(), actor: user(actor), target: user(target), reason: reason.to_owned(), at_ms }
    }

    fn last_owner(name: &str) -> Outcome {
        Outcome::Refused(Refusal::LastOwner { room: lobby(), user: user(name) })
    }

    #[test]
    fn the_last_owner_can_neither_leave_nor_demote_themself() {
        let mut state = MetaState::new(false);
        must(&mut state, create(LOBBY, OLGA, Visibility::Public));
        must(&mut state, join(MIA, 2));

        for command in [leave(OLGA), set_role(OLGA, OLGA, Role::Admin), set_role(OLGA, OLGA, Role::Member)] {
            let before = state.clone();
            assert_eq!(state.apply(&command), last_owner(OLGA), "{command:?}");
            assert_eq!(state, before, "{command:?} changed the state");
        }
        // Keeping the role is not a demotion.
        assert_eq!(state.apply(&set_role(OLGA, OLGA, Role::Owner)), Outcome::Done);

        // With a second owner, either may step down; then the other is the last.
        must(&mut state, set_role(OLGA, MIA, Role::Owner));
        assert_eq!(state.apply(&set_role(OLGA, OLGA, Role::Admin)), Outcome::Done);
        assert_eq!(room_of(&state).role_of(&user(OLGA)), Some(Role::Admin));
        assert_eq!(state.apply(&leave(MIA)), last_owner(MIA));
        assert_eq!(state.apply(&set_role(MIA, MIA, Role::Member)), last_owner(MIA));
        // The remaining owner may demote nobody else into ownerlessness: demoting another
        // owner keeps the actor an owner.
        must(&mut state, set_role(MIA, OLGA, Role::Owner));
        assert_eq!(state.apply(&set_role(MIA, OLGA, Role::Member)), Outcome::Done);
        assert_eq!(state.apply(&leave(OLGA)), Outcome::Done);
        assert_eq!(state.apply(&leave(MIA)), last_owner(MIA));
        check_invariants(&state).unwrap_or_else(|broken| panic!("{broken}"));
    }

    #[test]
    fn join_is_idempotent_and_keeps_role_and_join_time() {
        let mut state = fixture(Visibility::Public);
        for name in [OLGA, ADAM, MIA] {
            let before = state.clone();
            assert_eq!(state.apply(&join(name, 99)), Outcome::Done, "{name}");
            assert_eq!(state, before, "{name} joining again changed the state");
        }
        assert_eq!(state.apply(&join(NINA, 20)), Outcome::Done);
        let expected = Membership { role: Role::Member, joined_at_ms: 20 };
        assert_eq!(room_of(&state).members.get(&user(NINA)), Some(&expected));
        let before = state.clone();
        assert_eq!(state.apply(&join(NINA, 21)), Outcome::Done);
        assert_eq!(state, before, "nina joining again changed the state");
    }

    #[test]
    fn invite_is_idempotent_and_consumed_on_join() {
        let mut state = fixture(Visibility::InviteOnly);
        assert_eq!(state.apply(&invite(ADAM, NINA)), Outcome::Done);
        let once = state.clone();
        assert_eq!(state.apply(&invite(OLGA, NINA)), Outcome::Done);
        assert_eq!(state, once, "a second invitation changed the state");
        assert!(room_of(&state).invited.contains(&user(NINA)));

        assert_eq!(state.apply(&join(NINA, 30)), Outcome::Done);
        assert!(room_of(&state).is_member(&user(NINA)));
        assert!(room_of(&state).invited.is_empty(), "the invitation was not consumed");

        // The invitation was used up: after leaving, nina needs a new one.
        must(&mut state, leave(NINA));
        assert_eq!(
            state.apply(&join(NINA, 31)),
            Outcome::Refused(Refusal::NotInvited { room: lobby(), user: user(NINA) })
        );
    }

    #[test]
    fn ban_removes_membership_and_invitation_and_a_second_ban_replaces_the_record() {
        let mut state = fixture(Visibility::InviteOnly);
        must(&mut state, invite(ADAM, NINA));
        must(&mut state, ban(ADAM, NINA, "flood", 40));
        must(&mut state, ban(ADAM, MIA, "spam", 41));
        let room = room_of(&state);
        assert!(!room.invited.contains(&user(NINA)), "the invitation survived the ban");
        assert!(!room.is_member(&user(MIA)), "the membership survived the ban");
        assert_eq!(room.role_of(&user(MIA)), None);

        must(&mut state, ban(OLGA, MIA, "spam again", 42));
        let expected = BanRecord { by: user(OLGA), reason: "spam again".to_owned(), at_ms: 42 };
        assert_eq!(room_of(&state).banned.get(&user(MIA)), Some(&expected));

        // Unbanned, mia is an outsider: she needs an invitation like anyone else.
        must(&mut state, Command::Unban { room: lobby(), actor: user(ADAM), target: user(MIA) });
        assert!(!room_of(&state).banned.contains_key(&user(MIA)));
        assert_eq!(
            state.apply(&join(MIA, 43)),
            Outcome::Refused(Refusal::NotInvited { room: lobby(), user: user(MIA) })
        );
    }

    #[test]
    fn kicked_member_may_join_again_as_a_member() {
        let mut state = fixture(Visibility::Public);
        must(&mut state, Command::Kick { room: lobby(), actor: user(OLGA), target: user(ADAM) });
        assert!(!room_of(&state).is_member(&user(ADAM)));
        must(&mut state, join(ADAM, 50));
        assert_eq!(room_of(&state).role_of(&user(ADAM)), Some(Role::Member));
    }

    #[test]
    fn an_admin_cannot_kick_or_ban_another_admin() {
        let mut state = fixture(Visibility::Public);
        must(&mut state, set_role(OLGA, MIA, Role::Admin));
        for (command, action) in [
            (Command::Kick { room: lobby(), actor: user(ADAM), target: user(MIA) }, "kick mia"),
            (ban(ADAM, MIA, "no", 60), "ban mia"),
        ] {
            let expected = Outcome::Refused(Refusal::PermissionDenied {
                room: lobby(),
                actor: user(ADAM),
                action: action.to_owned(),
            });
            assert_eq!(state.apply(&command), expected, "{command:?}");
        }
    }

    #[test]
    fn room_commands_on_a_missing_room_are_refused_first() {
        let mut state = fixture(Visibility::Public);
        let missing = RoomId::from("nowhere");
        let commands = [
            Command::DeleteRoom { room: missing.clone(), actor: user(OLGA) },
            Command::UpdateRoomSettings { room: missing.clone(), actor: user(OLGA), settings: RoomSettings::default() },
            Command::Join { room: missing.clone(), user: user(BOB), at_ms: 1 },
            Command::Invite { room: missing.clone(), actor: user(NINA), target: user(BOB) },
            Command::Leave { room: missing.clone(), user: user(NINA) },
            Command::Kick { room: missing.clone(), actor: user(MIA), target: user(MIA) },
            Command::Ban {
                room: missing.clone(),
                actor: user(MIA),
                target: user(MIA),
                reason: String::new(),
                at_ms: 1,
            },
            Command::Unban { room: missing.clone(), actor: user(MIA), target: user(NINA) },
            Command::SetRole { room: missing.clone(), actor: user(MIA), target: user(NINA), role: Role::Owner },
        ];
        let before = state.clone();
        for command in commands {
            let expected = Outcome::Refused(Refusal::RoomNotFound(missing.clone()));
            assert_eq!(state.apply(&command), expected, "{command:?}");
        }
        assert_eq!(state, before);
    }

    #[test]
    fn create_and_delete_room() {
        let mut state = MetaState::new(false);
        must(&mut state, create(LOBBY, OLGA, Visibility::InviteOnly));
        let room = room_of(&state);
        assert_eq!(room.role_of(&user(OLGA)), Some(Role::Owner));
        assert_eq!(room.members.len(), 1);
        assert_eq!(room.settings, settings(Visibility::InviteOnly));
        assert_eq!(room.created_at_ms, 1);

        let before = state.clone();
        assert_eq!(
            state.apply(&create(LOBBY, MIA, Visibility::Public)),
            Outcome::Refused(Refusal::RoomExists(lobby()))
        );
        assert_eq!(state, before);

        must(&mut state, Command::DeleteRoom { room: lobby(), actor: user(OLGA) });
        assert!(state.room(&lobby()).is_none());
        assert_eq!(state.rooms().count(), 0);
        // The id is free again.
        must(&mut state, create(LOBBY, MIA, Visibility::Public));
        assert_eq!(room_of(&state).role_of(&user(MIA)), Some(Role::Owner));
    }

    #[test]
    fn register_user_once() {
        let mut state = MetaState::new(false);
        let register = |hash: &str| Command::RegisterUser { user: user(MIA), password_hash: hash.to_owned(), at_ms: 5 };
        must(&mut state, register("$argon2id$first"));
        let before = state.clone();
        assert_eq!(state.apply(&register("$argon2id$second")), Outcome::Refused(Refusal::UserExists(user(MIA))));
        assert_eq!(state, before);
        let expected = UserRecord { password_hash: "$argon2id$first".to_owned(), created_at_ms: 5 };
        assert_eq!(state.user(&user(MIA)), Some(&expected));
        assert_eq!(state.user(&user(NINA)), None);
    }

    // ---------------------------------------------------------------------------------------
    // The cluster registry.
    // ---------------------------------------------------------------------------------------

    fn init_cluster(cluster_id: &str) -> Command {
        Command::InitCluster { cluster_id: cluster_id.to_owned(), token_secret: vec![7; 32], shard_count: 8 }
    }

    fn add_node(grpc_addr: &str, at_ms: u64) -> Command {
        Command::AddNode { grpc_addr: grpc_addr.to_owned(), at_ms }
    }

    #[test]
    fn cluster_commands_are_refused_on_a_data_shard_and_before_init() {
        let not_meta = Outcome::Refused(Refusal::NotMetaShard);
        let cases = [
            ("data shard", MetaState::new(false), init_cluster("c1")),
            ("data shard", MetaState::new(false), add_node("10.0.0.1:7000", 1)),
            ("meta shard before InitCluster", MetaState::new(true), add_node("10.0.0.1:7000", 1)),
        ];
        for (case, mut state, command) in cases {
            let before = state.clone();
            assert_eq!(state.apply(&command), not_meta, "{case}: {command:?}");
            assert_eq!(state, before, "{case}: {command:?}");
            assert_eq!(state.cluster(), None, "{case}");
        }
    }

    #[test]
    fn init_cluster_only_once() {
        let mut state = MetaState::new(true);
        must(&mut state, init_cluster("c1"));
        let before = state.clone();
        assert_eq!(state.apply(&init_cluster("c2")), Outcome::Refused(Refusal::AlreadyInitialized));
        assert_eq!(state, before);
        let expected = ClusterInfo {
            cluster_id: "c1".to_owned(),
            token_secret: vec![7; 32],
            shard_count: 8,
            nodes: BTreeMap::new(),
            next_node_id: 1,
        };
        assert_eq!(state.cluster(), Some(&expected));
    }

    #[test]
    fn add_node_numbers_nodes_from_one_and_is_idempotent_on_grpc_addr() {
        let mut state = MetaState::new(true);
        must(&mut state, init_cluster("c1"));
        assert_eq!(state.apply(&add_node("a:1", 10)), Outcome::NodeAdded(NodeId(1)));
        assert_eq!(state.apply(&add_node("b:1", 11)), Outcome::NodeAdded(NodeId(2)));
        let before = state.clone();
        // A retried join, even with a later timestamp, gets its first id back.
        assert_eq!(state.apply(&add_node("a:1", 12)), Outcome::NodeAdded(NodeId(1)));
        assert_eq!(state, before, "a retried join changed the registry");
        assert_eq!(state.apply(&add_node("c:1", 13)), Outcome::NodeAdded(NodeId(3)));

        let Some(cluster) = state.cluster() else { panic!("no cluster") };
        assert_eq!(cluster.next_node_id, 4);
        let expected = NodeRecord { grpc_addr: "a:1".to_owned(), joined_at_ms: 10 };
        assert_eq!(cluster.nodes.get(&NodeId(1)), Some(&expected));
        assert_eq!(cluster.nodes.len(), 3);
    }

    // ---------------------------------------------------------------------------------------
    // Determinism and invariants under random command sequences.
    // ---------------------------------------------------------------------------------------

    /// Longest random command sequence.
    const PROPTEST_COMMANDS_MAX: usize = 64;

    /// The invariants of the module doc; `Err` names the first one broken.
    fn check_invariants(state: &MetaState) -> Result<(), String> {
        for (id, room) in state.rooms() {
            if room.owner_count() == 0 {
                return Err(format!("room {id} has no owner"));
            }
            for name in room.members.keys() {
                if room.banned.contains_key(name) || room.invited.contains(name) {
                    return Err(format!("{name} is a member of {id} and banned or invited"));
                }
            }
            for name in &room.invited {
                if room.banned.contains_key(name) {
                    return Err(format!("{name} is invited to {id} and banned"));
                }
            }
        }
        if let Some(cluster) = state.cluster() {
            let mut addrs = BTreeSet::new();
            for (node, record) in &cluster.nodes {
                if node.0 == 0 || node.0 >= cluster.next_node_id {
                    return Err(format!("node id {node} outside 1..{}", cluster.next_node_id));
                }
                if !addrs.insert(record.grpc_addr.as_str()) {
                    return Err(format!("grpc_addr {} registered twice", record.grpc_addr));
                }
            }
        }
        Ok(())
    }

    fn any_user() -> impl Strategy<Value = UserName> {
        prop::sample::select(vec!["ann", "ben", "cy", "dee"]).prop_map(UserName::from)
    }

    fn any_room() -> impl Strategy<Value = RoomId> {
        prop::sample::select(vec!["r1", "r2"]).prop_map(RoomId::from)
    }

    fn any_role() -> impl Strategy<Value = Role> {
        prop::sample::select(vec![Role::Member, Role::Admin, Role::Owner])
    }

    fn any_settings() -> impl Strategy<Value = RoomSettings> {
        (prop::sample::select(vec!["", "t"]), prop::sample::select(vec![Visibility::Public, Visibility::InviteOnly]))
            .prop_map(|(title, visibility)| RoomSettings { title: title.to_owned(), topic: String::new(), visibility })
    }

    fn any_at_ms() -> impl Strategy<Value = u64> {
        0..100u64
    }

    fn any_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            1 => (prop::sample::select(vec!["c1", "c2"]), 0..4u32).prop_map(|(id, shard_count)| {
                Command::InitCluster { cluster_id: id.to_owned(), token_secret: vec![1, 2], shard_count }
            }),
            2 => (prop::sample::select(vec!["a:1", "b:1", "c:1"]), any_at_ms())
                .prop_map(|(addr, at_ms)| Command::AddNode { grpc_addr: addr.to_owned(), at_ms }),
            1 => (any_user(), any_at_ms()).prop_map(|(user, at_ms)| Command::RegisterUser {
                user,
                password_hash: "h".to_owned(),
                at_ms,
            }),
            2 => (any_room(), any_user(), any_settings(), any_at_ms()).prop_map(
                |(room, owner, settings, at_ms)| Command::CreateRoom { room, owner, settings, at_ms }
            ),
            1 => (any_room(), any_user()).prop_map(|(room, actor)| Command::DeleteRoom { room, actor }),
            1 => (any_room(), any_user(), any_settings()).prop_map(|(room, actor, settings)| {
                Command::UpdateRoomSettings { room, actor, settings }
            }),
            4 => (any_room(), any_user(), any_at_ms())
                .prop_map(|(room, user, at_ms)| Command::Join { room, user, at_ms }),
            3 => (any_room(), any_user(), any_user())
                .prop_map(|(room, actor, target)| Command::Invite { room, actor, target }),
            3 => (any_room(), any_user()).prop_map(|(room, user)| Command::Leave { room, user }),
            2 => (any_room(), any_user(), any_user())
                .prop_map(|(room, actor, target)| Command::Kick { room, actor, target }),
            2 => (any_room(), any_user(), any_user(), any_at_ms()).prop_map(
                |(room, actor, target, at_ms)| Command::Ban {
                    room,
                    actor,
                    target,
                    reason: "r".to_owned(),
                    at_ms,
                }
            ),
            2 => (any_room(), any_user(), any_user())
                .prop_map(|(room, actor, target)| Command::Unban { room, actor, target }),
            3 => (any_room(), any_user(), any_user(), any_role())
                .prop_map(|(room, actor, target, role)| Command::SetRole { room, actor, target, role }),
        ]
    }

    proptest! {
        /// Two replicas that apply the same log agree on every outcome and on the state;
        /// refusals change nothing; the invariants hold after every command; and the state
        /// survives its storage encoding.
        #[test]
        fn apply_is_deterministic(
            is_meta in any::<bool>(),
            commands in prop::collection::vec(any_command(), 0..PROPTEST_COMMANDS_MAX),
        ) {
            let mut first = MetaState::new(is_meta);
            let mut second = MetaState::new(is_meta);
            for command in &commands {
                let before = first.clone();
                let outcome = first.apply(command);
                prop_assert_eq!(&second.apply(command), &outcome, "{:?}", command);
                prop_assert_eq!(&first, &second, "after {:?}", command);
                if matches!(outcome, Outcome::Refused(_)) {
                    prop_assert_eq!(&first, &before, "refused {:?} changed the state", command);
                }
                if let Err(broken) = check_invariants(&first) {
                    return Err(TestCaseError::fail(format!("after {command:?}: {broken}")));
                }
            }
            let bytes = postcard::to_allocvec(&first)
                .map_err(|error| TestCaseError::fail(error.to_string()))?;
            let decoded: MetaState = postcard::from_bytes(&bytes)
                .map_err(|error| TestCaseError::fail(error.to_string()))?;
            prop_assert_eq!(decoded, first);
        }
    }
}
