//! Client operations, written once: validation, authentication, routing to the right shard,
//! and turning outcomes into results. The gRPC service (and later WebSocket and HTTP) are thin
//! adapters over these functions.

use std::sync::Arc;

use palaver_ids::{RoomId, ShardId, UserName};
use palaver_shard::meta::Room;
use palaver_shard::{Command, Outcome, Role, RoomSettings};

use crate::auth::{self, TOKEN_TTL_MS};
use crate::error::ApiError;
use crate::limits;
use crate::node::NodeInner;
use crate::query::{Answer, Query, RoomSummary};
use crate::routing::{self, Committed};

/// Bytes of salt per password hash.
pub const PASSWORD_SALT_BYTES: usize = 16;
/// Most shards read at once by a room listing.
pub const LISTING_READS_IN_FLIGHT_MAX: usize = 16;

/// A login token and when it expires.
#[derive(Debug, Clone)]
pub struct Login {
    /// The token.
    pub token: String,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// A membership action on another user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    /// Invite them.
    Invite,
    /// Kick them.
    Kick,
    /// Lift their ban.
    Unban,
}

/// The client operations of one node.
#[derive(Debug, Clone)]
pub struct Ops {
    node: Arc<NodeInner>,
}

fn committed(done: Committed) -> Result<Committed, ApiError> {
    match done.outcome {
        Outcome::Refused(refusal) => Err(ApiError::Refused(refusal)),
        _ => Ok(done),
    }
}

impl Ops {
    /// Operations served by `node`.
    pub fn new(node: Arc<NodeInner>) -> Self {
        Self { node }
    }

    /// The node these operations run on.
    pub(crate) fn node(&self) -> &Arc<NodeInner> {
        &self.node
    }

    /// The user a bearer token speaks for.
    pub fn authenticate(&self, token: Option<&str>) -> Result<UserName, ApiError> {
        let token = token.ok_or_else(|| ApiError::Unauthenticated("missing token: log in first".into()))?;
        self.node.signer.verify(token, self.node.now_ms())
    }

    /// The shard of a room given by name (any string; invalid names still hash somewhere).
    pub fn shard_of_room_name(&self, room: &str) -> ShardId {
        self.node.ring.shard_of_room(&RoomId(room.to_owned()))
    }

    fn room_shard(&self, room: &RoomId) -> ShardId {
        self.node.ring.shard_of_room(room)
    }

    async fn submit(&self, shard: ShardId, command: Command) -> Result<Committed, ApiError> {
        committed(routing::submit(&self.node, shard, command).await?)
    }

    /// Register a user.
    pub async fn register(&self, user: &str, password: &str) -> Result<UserName, ApiError> {
        let user = limits::user_name("user", user)?;
        limits::password(password)?;
        let salt = self.node.env.rng.bytes(PASSWORD_SALT_BYTES);
        let password = password.to_owned();
        let password_hash = self.node.hashes.run(move || auth::hash_password(&password, &salt)).await?;
        let shard = self.node.ring.shard_of_user(&user);
        let command = Command::RegisterUser { user: user.clone(), password_hash, at_ms: self.node.now_ms() };
        self.submit(shard, command).await?;
        Ok(user)
    }

    /// Check a password and issue a token.
    pub async fn login(&self, user: &str, password: &str) -> Result<Login, ApiError> {
        let wrong = || ApiError::Unauthenticated("wrong user name or password".into());
        let user = limits::user_name("user", user)?;
        if password.len() > limits::PASSWORD_BYTES_MAX {
            return Err(wrong());
        }
        let shard = self.node.ring.shard_of_user(&user);
        let Answer::User(Some(record)) = routing::read(&self.node, shard, Query::User(user.clone())).await? else {
            return Err(wrong());
        };
        let password = password.to_owned();
        let ok = self.node.hashes.run(move || auth::verify_password(&password, &record.password_hash)).await?;
        if !ok {
            return Err(wrong());
        }
        let expires_at_ms = self.node.now_ms().saturating_add(TOKEN_TTL_MS);
        Ok(Login { token: self.node.signer.sign(&user, expires_at_ms)?, expires_at_ms })
    }

    /// Create a room owned by `actor`.
    pub async fn create_room(
        &self,
        actor: &UserName,
        room: &str,
        settings: RoomSettings,
    ) -> Result<(ShardId, Room), ApiError> {
        let room = limits::room_id(room)?;
        let settings = validate_settings(settings)?;
        let shard = self.room_shard(&room);
        let command =
            Command::CreateRoom { room: room.clone(), owner: actor.clone(), settings, at_ms: self.node.now_ms() };
        self.submit(shard, command).await?;
        self.get_room(actor, room.as_str()).await
    }

    /// A room, as `actor` may see it.
    pub async fn get_room(&self, actor: &UserName, room: &str) -> Result<(ShardId, Room), ApiError> {
        let room = limits::room_id(room)?;
        let shard = self.room_shard(&room);
        match routing::read(&self.node, shard, Query::Room(room.clone())).await? {
            Answer::Room(Some(found)) => {
                let visible = found.is_member(actor) || found.settings.visibility == palaver_shard::Visibility::Public;
                if !visible {
                    return Err(ApiError::Refused(palaver_shard::Refusal::NotMember { room, user: actor.clone() }));
                }
                Ok((shard, found))
            }
            _ => Err(ApiError::Refused(palaver_shard::Refusal::RoomNotFound(room))),
        }
    }

    /// Rooms `actor` may see, across every shard; also the shards that did not answer.
    pub async fn list_rooms(&self, actor: &UserName) -> Result<(Vec<RoomSummary>, Vec<u32>), ApiError> {
        use futures::StreamExt;
        let shards = 1..=self.node.identity.shard_count;
        let results: Vec<(u32, Result<Answer, ApiError>)> = futures::stream::iter(shards)
            .map(|shard| {
                let node = self.node.clone();
                let actor = actor.clone();
                async move { (shard, routing::read(&node, ShardId(shard), Query::RoomsVisibleTo(actor)).await) }
            })
            .buffer_unordered(LISTING_READS_IN_FLIGHT_MAX)
            .collect()
            .await;
        let mut rooms = Vec::new();
        let mut unavailable = Vec::new();
        for (shard, result) in results {
            match result {
                Ok(Answer::Rooms(found)) => rooms.extend(found),
                _ => unavailable.push(shard),
            }
        }
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        unavailable.sort_unstable();
        for room in rooms.iter_mut().filter(|r| r.my_role.is_some()) {
            room.unread_count = self.unread_count(actor, &room.room).await?;
        }
        Ok((rooms, unavailable))
    }

    /// Delete a room.
    pub async fn delete_room(&self, actor: &UserName, room: &str) -> Result<Committed, ApiError> {
        let room = limits::room_id(room)?;
        self.submit(self.room_shard(&room), Command::DeleteRoom { room, actor: actor.clone() }).await
    }

    /// Replace a room's settings.
    pub async fn update_room(
        &self,
        actor: &UserName,
        room: &str,
        settings: RoomSettings,
    ) -> Result<(ShardId, Room), ApiError> {
        let room_id = limits::room_id(room)?;
        let settings = validate_settings(settings)?;
        let command = Command::UpdateRoomSettings { room: room_id.clone(), actor: actor.clone(), settings };
        self.submit(self.room_shard(&room_id), command).await?;
        self.get_room(actor, room).await
    }

    /// Join a room.
    pub async fn join(&self, actor: &UserName, room: &str) -> Result<Committed, ApiError> {
        let room = limits::room_id(room)?;
        let command = Command::Join { room: room.clone(), user: actor.clone(), at_ms: self.node.now_ms() };
        self.submit(self.room_shard(&room), command).await
    }

    /// Leave a room.
    pub async fn leave(&self, actor: &UserName, room: &str) -> Result<Committed, ApiError> {
        let room = limits::room_id(room)?;
        self.submit(self.room_shard(&room), Command::Leave { room, user: actor.clone() }).await
    }

    /// Invite, kick or unban another user.
    pub async fn act_on(
        &self,
        actor: &UserName,
        action: TargetAction,
        room: &str,
        target: &str,
    ) -> Result<Committed, ApiError> {
        let room = limits::room_id(room)?;
        let target = self.existing_user(target).await?;
        let actor = actor.clone();
        let shard = self.room_shard(&room);
        let command = match action {
            TargetAction::Invite => Command::Invite { room, actor, target },
            TargetAction::Kick => Command::Kick { room, actor, target },
            TargetAction::Unban => Command::Unban { room, actor, target },
        };
        self.submit(shard, command).await
    }

    /// Ban a user.
    pub async fn ban(&self, actor: &UserName, room: &str, target: &str, reason: &str) -> Result<Committed, ApiError> {
        let room = limits::room_id(room)?;
        let target = self.existing_user(target).await?;
        let reason = limits::text("reason", reason, limits::BAN_REASON_BYTES_MAX)?;
        let command =
            Command::Ban { room: room.clone(), actor: actor.clone(), target, reason, at_ms: self.node.now_ms() };
        self.submit(self.room_shard(&room), command).await
    }

    /// Set a member's role.
    pub async fn set_role(
        &self,
        actor: &UserName,
        room: &str,
        target: &str,
        role: Role,
    ) -> Result<Committed, ApiError> {
        let room = limits::room_id(room)?;
        let target = limits::user_name("user", target)?;
        let command = Command::SetRole { room: room.clone(), actor: actor.clone(), target, role };
        self.submit(self.room_shard(&room), command).await
    }

    /// A user name that is registered.
    async fn existing_user(&self, user: &str) -> Result<UserName, ApiError> {
        let user = limits::user_name("user", user)?;
        let shard = self.node.ring.shard_of_user(&user);
        match routing::read(&self.node, shard, Query::User(user.clone())).await? {
            Answer::User(Some(_)) => Ok(user),
            _ => Err(ApiError::UserNotFound(user.0)),
        }
    }
}

fn validate_settings(settings: RoomSettings) -> Result<RoomSettings, ApiError> {
    Ok(RoomSettings {
        title: limits::text("title", &settings.title, limits::ROOM_TITLE_BYTES_MAX)?,
        topic: limits::text("topic", &settings.topic, limits::ROOM_TOPIC_BYTES_MAX)?,
        visibility: settings.visibility,
    })
}
