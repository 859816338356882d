//! Reads of a shard's applied state, evaluated on the shard's leader.
//!
//! A read is routed like a command (to the leader, with redirects) and answered from the
//! leader's applied [`MetaState`] after a lease check, so a read sees every write acknowledged
//! before it. Queries and answers travel between nodes framed (`palaver_shard::keys`).

use palaver_ids::{RoomId, UserName};
use palaver_shard::Role;
use palaver_shard::meta::{MetaState, Room, UserRecord};
use serde::{Deserialize, Serialize};

/// A read of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// A user's record.
    User(UserName),
    /// A room.
    Room(RoomId),
    /// Rooms of the shard that the user may see: public ones and those they belong to.
    RoomsVisibleTo(UserName),
}

/// One room in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    /// The room id.
    pub room: RoomId,
    /// Its title, topic and visibility.
    pub settings: palaver_shard::RoomSettings,
    /// Number of members.
    pub member_count: u32,
    /// The asking user's role, if a member.
    pub my_role: Option<Role>,
    /// Messages after the user's read marker that others posted (filled in by the node that
    /// answers the client, from its CRDT replica).
    pub unread_count: u64,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// For [`Query::User`].
    User(Option<UserRecord>),
    /// For [`Query::Room`].
    Room(Option<Room>),
    /// For [`Query::RoomsVisibleTo`].
    Rooms(Vec<RoomSummary>),
}

/// Most rooms one shard returns in a listing.
pub const ROOMS_PER_SHARD_LISTED_MAX: usize = 1_000;

impl Query {
    /// Evaluate against a shard's applied state.
    pub fn evaluate(&self, state: &MetaState) -> Answer {
        match self {
            Query::User(user) => Answer::User(state.user(user).cloned()),
            Query::Room(room) => Answer::Room(state.room(room).cloned()),
            Query::RoomsVisibleTo(user) => Answer::Rooms(
                state
                    .rooms()
                    .filter(|(_, room)| {
                        room.is_member(user) || room.settings.visibility == palaver_shard::Visibility::Public
                    })
                    .take(ROOMS_PER_SHARD_LISTED_MAX)
                    .map(|(id, room)| RoomSummary {
                        room: id.clone(),
                        settings: room.settings.clone(),
                        member_count: u32::try_from(room.members.len()).unwrap_or(u32::MAX),
                        my_role: room.role_of(user),
                        unread_count: 0,
                    })
                    .collect(),
            ),
        }
    }
}
