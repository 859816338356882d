//! Room subscriptions: a client's live view of a room, resumable from its version vector.
//!
//! A subscription first sends every visible event the client's version vector lacks (each
//! replica's in counter order, so the client's vector stays gapless), then a `caught_up` marker
//! with the vector reached and the room's side state, then live events as they become visible
//! here, and membership changes as this replica applies them. Visible: this replica's own
//! events once fsynced here, a peer's once applied here (the peer fsynced them before sending;
//! see [`palaver_shard::RoomCell::visible_delta`]). Events are pulled from the room's
//! log, not buffered per subscriber: a slow subscriber only slows its own stream (the bounded
//! channel to it fills), and memory does not grow. A subscriber that falls more than
//! [`palaver_shard::state_machine::APPLIED_COMMANDS_BUFFERED`] membership changes behind is
//! ended with `resource_exhausted` and resubscribes with its version vector, missing nothing.
//!
//! A subscriber whose membership ends (left, kicked, banned, room deleted) is sent that change
//! and then the stream ends with `not_member`.
//!
//! The same code serves another node's [`Ops::follow`] (`PeerService.Follow`): a subscription
//! without a user, which that node fans out to its own subscribers ([`crate::feed`]). On a node
//! that holds no replica of the room's shard, [`Ops::subscribe`] goes through that feed.

use std::collections::HashMap;
use std::sync::Arc;

use palaver_crdt::VersionVector;
use palaver_ids::{RoomId, UserName};
use palaver_proto::v1 as pb;
use palaver_shard::crdt_store::SideChange;
use palaver_shard::state_machine::AppliedCommand;
use palaver_shard::{Command, Outcome, Refusal, Replica};

/// Whether a membership `change` of `user` ends the subscription of `subscriber` (`None`: a
/// node's feed, which only a deleted room ends).
pub fn membership_ends(change: &str, user: &UserName, subscriber: Option<&UserName>) -> bool {
    match change {
        "deleted" => true,
        "left" | "kicked" | "banned" => subscriber == Some(user),
        _ => false,
    }
}
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::convert;
use crate::error::ApiError;
use crate::limits;
use crate::node::NodeInner;
use crate::ops::Ops;

/// Most events pulled from the log per step of a subscription.
pub const SUBSCRIPTION_EVENTS_PER_PULL: usize = 256;
/// Events queued to one subscriber before its stream waits for it.
pub const SUBSCRIPTION_QUEUE_EVENTS: usize = 64;

/// The stream a gRPC subscription feeds.
pub type EventStream = tokio_stream::wrappers::ReceiverStream<Result<pb::RoomEvent, Status>>;

/// The subscriber went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Where a subscription's events go: a gRPC stream's channel ([`EventStream`]), or straight
/// into a WebSocket connection's outbound queue (no channel and no task of its own per
/// subscription: an idle subscription costs only its own task).
pub trait EventSink: Send + Sync + 'static {
    /// Deliver an event, or the error the subscription ends with; waits while the subscriber
    /// is full. `Err(Gone)`: the subscriber went away, the subscription stops.
    fn deliver(&self, event: Result<pb::RoomEvent, Status>) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Resolves once the subscriber is gone.
    fn closed(&self) -> impl Future<Output = ()> + Send;
    /// Whether the subscriber is gone.
    fn is_closed(&self) -> bool;
}

impl EventSink for mpsc::Sender<Result<pb::RoomEvent, Status>> {
    async fn deliver(&self, event: Result<pb::RoomEvent, Status>) -> Result<(), Gone> {
        self.send(event).await.map_err(|_| Gone)
    }

    async fn closed(&self) {
        mpsc::Sender::closed(self).await;
    }

    fn is_closed(&self) -> bool {
        mpsc::Sender::is_closed(self)
    }
}

/// One of many subscriptions sharing a stream: its events go into the stream's one queue,
/// each made into the stream's item by `tag` with the subscription's id (an `Err`: the end it
/// ends with). Used by `SubscribeRooms` ([`crate::subscribe_rooms`]) and `FollowRooms`
/// ([`crate::follow`]).
pub struct TaggedSink<T> {
    /// The subscription's id on its stream.
    pub id: u64,
    /// The stream's queue.
    pub events: mpsc::Sender<T>,
    /// Makes an event (or the end) of subscription `id` into the stream's item.
    pub tag: fn(u64, Result<pb::RoomEvent, Status>) -> T,
}

impl<T> std::fmt::Debug for TaggedSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaggedSink").field("id", &self.id).finish_non_exhaustive()
    }
}

impl<T> Clone for TaggedSink<T> {
    fn clone(&self) -> Self {
        Self { id: self.id, events: self.events.clone(), tag: self.tag }
    }
}

impl<T: Send + 'static> EventSink for TaggedSink<T> {
    async fn deliver(&self, event: Result<pb::RoomEvent, Status>) -> Result<(), Gone> {
        self.events.send((self.tag)(self.id, event)).await.map_err(|_| Gone)
    }

    async fn closed(&self) {
        self.events.closed().await;
    }

    fn is_closed(&self) -> bool {
        self.events.is_closed()
    }
}

/// The subscriptions running on one multiplexed stream (`SubscribeRooms`, `FollowRooms`), by
/// the id the stream gave each; every one still running is aborted when this is dropped (the
/// stream ended).
#[derive(Debug, Default)]
pub struct Running(HashMap<u64, tokio::task::AbortHandle>);

impl Running {
    /// Forget the subscriptions that have finished.
    pub fn prune(&mut self) {
        self.0.retain(|_, task| !task.is_finished());
    }

    /// How many are held (finished ones too, until [`Running::prune`]).
    pub fn held(&self) -> usize {
        self.0.len()
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: u64) -> bool {
        self.0.contains_key(&id)
    }

    /// Spawn `task` as subscription `id`.
    pub fn spawn(&mut self, id: u64, task: impl Future<Output = ()> + Send + 'static) {
        self.0.insert(id, tokio::spawn(task).abort_handle());
    }

    /// Stop subscription `id`, if it runs.
    pub fn stop(&mut self, id: u64) {
        if let Some(task) = self.0.remove(&id) {
            task.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// A subscription to run (spawn it): it ends when the subscriber goes, or with an error
/// delivered to its sink.
pub type SubscriptionTask = futures::future::BoxFuture<'static, ()>;

impl Ops {
    /// Subscribe `user` to `room`, resuming after `have`, as a gRPC stream.
    pub async fn subscribe(&self, user: &UserName, room: &str, have: VersionVector) -> Result<EventStream, ApiError> {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_QUEUE_EVENTS);
        let task = self.subscribe_into(user, room, have, sender).await?;
        tokio::spawn(task);
        Ok(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }

    /// Subscribe `user` to `room`, resuming after `have`, delivering into `sink`: the
    /// membership check runs now; the returned task serves the subscription.
    pub async fn subscribe_into<S: EventSink>(
        &self,
        user: &UserName,
        room: &str,
        have: VersionVector,
        sink: S,
    ) -> Result<SubscriptionTask, ApiError> {
        let room = limits::room_id(room)?;
        let Some(replica) = self.local_replica(&room) else {
            return Ok(Box::pin(crate::feed::subscribe(self, user, room, have, sink).await?));
        };
        // Watch membership before checking it, so that no change between the check and the
        // stream's start goes unseen.
        let applied = replica.state.watch_applied();
        self.member_role(&replica, &room, user).await?;
        let node = self.node().clone();
        let subscription = Subscription { node, replica, room, user: Some(user.clone()), have, sender: sink };
        Ok(Box::pin(subscription.run(applied)))
    }

    /// Another node's feed of `room`, resuming after `have` (no user: that node checks its own
    /// subscribers).
    pub async fn follow(&self, room: &str, have: VersionVector) -> Result<EventStream, ApiError> {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_QUEUE_EVENTS);
        tokio::spawn(self.follow_into(room, have, sender)?);
        Ok(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }

    /// Another node's feed of `room`, resuming after `have`, delivering into `sink`; the
    /// returned task serves it.
    pub fn follow_into<S: EventSink>(
        &self,
        room: &str,
        have: VersionVector,
        sink: S,
    ) -> Result<SubscriptionTask, ApiError> {
        let room = limits::room_id(room)?;
        let shard = self.node().ring.shard_of_room(&room);
        let replica = self.local_replica(&room).ok_or_else(|| ApiError::Unavailable {
            shard: shard.0,
            reason: format!("node {} holds no replica of shard {shard}", self.node().id),
        })?;
        let applied = replica.state.watch_applied();
        let subscription = Subscription { node: self.node().clone(), replica, room, user: None, have, sender: sink };
        Ok(Box::pin(subscription.run(applied)))
    }
}

struct Subscription<S> {
    node: Arc<NodeInner>,
    replica: Replica,
    room: RoomId,
    /// The subscriber; `None` for another node's feed.
    user: Option<UserName>,
    have: VersionVector,
    sender: S,
}

/// Why a subscription ended.
enum End {
    /// The client went away.
    Gone,
    /// The subscription must end with this error.
    Error(Status),
}

impl<S: EventSink> Subscription<S> {
    async fn run(mut self, applied: broadcast::Receiver<Arc<AppliedCommand>>) {
        let _registered = self.user.as_ref().map(|user| self.node.register_subscription(user, &self.room));
        if let End::Error(status) = self.serve(applied).await {
            let _ = self.sender.deliver(Err(status)).await;
        }
    }

    /// The replica stopped serving the room (it is shutting down, or gave up the shard): the
    /// subscriber resumes elsewhere from its version vector.
    fn source_gone(&self) -> End {
        let reason = "the subscription's source went away; resubscribe with your version vector".into();
        End::Error(ApiError::Unavailable { shard: self.node.ring.shard_of_room(&self.room).0, reason }.into())
    }

    async fn send(&self, event: pb::room_event::Event) -> Result<(), End> {
        let event = pb::RoomEvent { room: self.room.0.clone(), event: Some(event) };
        self.sender.deliver(Ok(event)).await.map_err(|_| End::Gone)
    }

    async fn serve(&mut self, mut applied: broadcast::Receiver<Arc<AppliedCommand>>) -> End {
        let cell = match self.replica.crdt.room(&self.room).await {
            Ok(cell) => cell,
            Err(e) => return End::Error(ApiError::from(e).into()),
        };
        let mut visible = cell.watch_visible();
        let mut side = cell.subscribe_side();
        let mut caught_up = false;
        loop {
            visible.borrow_and_update();
            let events = cell.visible_delta(&self.have, SUBSCRIPTION_EVENTS_PER_PULL);
            if !events.is_empty() {
                let converted: Vec<pb::MessageEvent> = {
                    let state = cell.lock();
                    events.iter().map(|event| convert::message_event(event, &state.log)).collect()
                };
                for (event, message) in events.iter().zip(converted) {
                    if let Err(end) = self.send(pb::room_event::Event::Message(message)).await {
                        return end;
                    }
                    self.have.advance(event.dot);
                }
                continue;
            }
            if !caught_up {
                caught_up = true;
                if let Err(end) =
                    self.send(pb::room_event::Event::CaughtUp(convert::version_vector_to_pb(&self.have))).await
                {
                    return end;
                }
                let state = cell.lock().side.clone();
                let now_ms = self.node.now_ms();
                if let Err(end) = self.send(pb::room_event::Event::State(convert::side_to_pb(&state, now_ms))).await {
                    return end;
                }
            }
            let step = tokio::select! {
                changed = visible.changed() => match changed {
                    Ok(()) => Ok(()),
                    Err(_) => Err(self.source_gone()),
                },
                change = side.recv() => match change {
                    Ok(SideChange::State(state)) => {
                        let now_ms = self.node.now_ms();
                        self.send(pb::room_event::Event::State(convert::side_to_pb(&state, now_ms))).await
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let state = cell.lock().side.clone();
                        let now_ms = self.node.now_ms();
                        self.send(pb::room_event::Event::State(convert::side_to_pb(&state, now_ms))).await
                    }
                    Err(broadcast::error::RecvError::Closed) => Err(self.source_gone()),
                },
                command = applied.recv() => match command {
                    Ok(command) => self.membership(&command).await,
                    Err(broadcast::error::RecvError::Lagged(missed)) => Err(End::Error(
                        ApiError::SlowConsumer(format!("fell {missed} membership changes behind")).into(),
                    )),
                    Err(broadcast::error::RecvError::Closed) => Err(self.source_gone()),
                },
                () = self.sender.closed() => Err(End::Gone),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Send a membership change of this room; end the subscription if it removed the user.
    async fn membership(&self, applied: &AppliedCommand) -> Result<(), End> {
        if applied.command.room() != Some(&self.room) || applied.outcome != Outcome::Done {
            return Ok(());
        }
        let (user, change, actor) = match &applied.command {
            Command::CreateRoom { owner, .. } => (owner, "created", owner),
            Command::DeleteRoom { actor, .. } => (actor, "deleted", actor),
            Command::UpdateRoomSettings { actor, .. } => (actor, "settings", actor),
            Command::Join { user, .. } => (user, "joined", user),
            Command::Invite { actor, target, .. } => (target, "invited", actor),
            Command::Leave { user, .. } => (user, "left", user),
            Command::Kick { actor, target, .. } => (target, "kicked", actor),
            Command::Ban { actor, target, .. } => (target, "banned", actor),
            Command::Unban { actor, target, .. } => (target, "unbanned", actor),
            Command::SetRole { actor, target, .. } => (target, "role", actor),
            Command::Request { .. }
            | Command::InitCluster { .. }
            | Command::AddNode { .. }
            | Command::RegisterUser { .. } => return Ok(()),
        };
        let role = self.replica.state.read().meta.room(&self.room).and_then(|room| room.role_of(user));
        let event = pb::MembershipEvent {
            user: user.0.clone(),
            change: change.to_owned(),
            actor: actor.0.clone(),
            role: convert::role_to_pb(role),
        };
        self.send(pb::room_event::Event::Membership(event)).await?;
        if membership_ends(change, user, self.user.as_ref()) {
            let subscriber = self.user.clone().unwrap_or_else(|| UserName(String::new()));
            let refusal = Refusal::NotMember { room: self.room.clone(), user: subscriber };
            return Err(End::Error(ApiError::Refused(refusal).into()));
        }
        Ok(())
    }
}
