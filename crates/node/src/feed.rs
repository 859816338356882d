//! Subscriptions on a node that holds no replica of the room's shard: one upstream feed per
//! room per node, fanned out to every local subscriber of the room.
//!
//! **The feed** ([`Feed`]) follows the room on one replica (on the node's one `FollowRooms`
//! stream to that replica, [`crate::follow`]; resumed from what the feed holds if the replica
//! goes away: another replica is tried, with backoff) and
//! keeps the last [`FEED_BUFFER_EVENTS`] events in a buffer, each numbered. It tracks `vv`,
//! what it received, and `base`: every message event not in the buffer is in `base` (the
//! start point, plus what was evicted). It lives while local subscribers hold it; the last one
//! leaving stops the upstream stream.
//!
//! **A local subscriber** ([`subscribe`]):
//! 1. its membership is checked on a replica (the same rule as a local subscription);
//! 2. if what it holds does not include `base`, it first catches up on its own short-lived
//!    `Follow` stream, until that stream's `caught_up`;
//! 3. it then reads the buffer from its oldest event on, skipping what it holds, then sends
//!    `caught_up` and the room's side state, then live events as the buffer grows.
//!
//! A subscriber that falls more than the buffer behind (a slow client) is ended with
//! `resource_exhausted` and resumes with its version vector, missing nothing; memory stays
//! bounded by the buffer. A membership change that removes the subscriber (or deletes the room)
//! is sent, then its stream ends with `not_member`, as on a replica.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use palaver_crdt::{Dot, ReplicaId, VersionVector};
use palaver_ids::{RoomId, UserName};
use palaver_proto::v1 as pb;
use palaver_proto::v1::room_event::Event;
use palaver_shard::Refusal;
use tokio::sync::watch;
use tonic::Status;

use crate::convert;
use crate::error::ApiError;
use crate::follow::FollowLinks;
use crate::lock;
use crate::node::NodeInner;
use crate::ops::Ops;
use crate::remote::{ClientAnswer, ClientOp};
use crate::subscribe::{EventSink, membership_ends};

/// Events a feed keeps for its subscribers.
pub const FEED_BUFFER_EVENTS: usize = 4_096;
/// First wait before a feed reconnects upstream; doubles up to [`FEED_RETRY_MS_MAX`].
pub const FEED_RETRY_MS_MIN: u64 = 50;
/// Longest wait between upstream attempts.
pub const FEED_RETRY_MS_MAX: u64 = 2_000;

/// The feeds of this node, by room.
#[derive(Debug, Default)]
pub struct Feeds {
    rooms: Mutex<BTreeMap<RoomId, Weak<Feed>>>,
    /// The streams the feeds follow their rooms on, one per peer.
    pub links: FollowLinks,
}

impl Feeds {
    /// How many feeds are open (for status and tests).
    pub fn open(&self) -> usize {
        lock(&self.rooms).values().filter(|feed| feed.strong_count() > 0).count()
    }
}

/// One buffered event.
#[derive(Debug, Clone)]
struct Item {
    seq: u64,
    /// The message event's dot (`None` for membership and side-state events).
    dot: Option<Dot>,
    event: Arc<pb::RoomEvent>,
}

#[derive(Debug, Default)]
struct FeedState {
    vv: VersionVector,
    base: VersionVector,
    items: VecDeque<Item>,
    next_seq: u64,
    side: Option<pb::RoomState>,
    /// The upstream said the room is gone (or the feed gave up): every subscriber ends.
    ended: Option<Status>,
}

impl FeedState {
    fn push(&mut self, dot: Option<Dot>, event: pb::RoomEvent) {
        self.items.push_back(Item { seq: self.next_seq, dot, event: Arc::new(event) });
        self.next_seq += 1;
        while self.items.len() > FEED_BUFFER_EVENTS {
            if let Some(Item { dot: Some(dot), .. }) = self.items.pop_front() {
                self.base.advance(dot);
            }
        }
    }

    fn oldest_seq(&self) -> u64 {
        self.next_seq - self.items.len() as u64
    }
}

/// A node's feed of one room.
#[derive(Debug)]
pub struct Feed {
    room: RoomId,
    state: Mutex<FeedState>,
    changed: watch::Sender<u64>,
    /// Dropped with the feed: tells the upstream task to stop.
    _stop: watch::Sender<()>,
}

impl Feed {
    /// The room it follows.
    pub fn room(&self) -> &RoomId {
        &self.room
    }
}

/// The feed of `room` on `node`, opened if none is.
fn feed_of(node: &Arc<NodeInner>, room: &RoomId, have: &VersionVector) -> Arc<Feed> {
    let mut rooms = lock(&node.feeds.rooms);
    if let Some(feed) = rooms.get(room).and_then(Weak::upgrade) {
        return feed;
    }
    let (changed, _) = watch::channel(0);
    let (stop, stopped) = watch::channel(());
    let state = FeedState { vv: have.clone(), base: have.clone(), ..FeedState::default() };
    let feed = Arc::new(Feed { room: room.clone(), state: Mutex::new(state), changed, _stop: stop });
    rooms.retain(|_, feed| feed.strong_count() > 0);
    rooms.insert(room.clone(), Arc::downgrade(&feed));
    tokio::spawn(upstream(node.clone(), Arc::downgrade(&feed), stopped));
    feed
}

/// Follow the room on a replica, reconnecting from what the feed holds, until the feed is
/// dropped.
async fn upstream(node: Arc<NodeInner>, feed: Weak<Feed>, mut stopped: watch::Receiver<()>) {
    let mut backoff_ms = FEED_RETRY_MS_MIN;
    loop {
        let Some(room) = feed.upgrade().map(|held| held.room.clone()) else { return };
        let shard = node.ring.shard_of_room(&room);
        let route = crate::directory::resolve_shard(&node, shard).await;
        let mut last = format!("no replica of shard {shard} known");
        let mut served = false;
        for target in route.replicas.iter().copied().filter(|id| *id != node.id) {
            let Some(addr) = crate::directory::node_addr(&node, target).await else { continue };
            let Some(held) = feed.upgrade() else { return };
            let have = lock(&held.state).vv.clone();
            let following = node.feeds.links.follow(&node, &addr, &held, &have);
            drop(held);
            let mut following = match following {
                Ok(following) => following,
                Err(reason) => {
                    node.directory.cache.node_failed(shard, target);
                    last = format!("node {target}: {reason}");
                    continue;
                }
            };
            let ended = tokio::select! {
                ended = &mut following.ended => ended,
                _ = stopped.changed() => return,
            };
            let Ok(ended) = ended else { continue };
            if ended.status.code() == tonic::Code::FailedPrecondition {
                // The room is gone: its followers end as a replica's would.
                if let Some(held) = feed.upgrade() {
                    lock(&held.state).ended = Some(ended.status);
                    held.changed.send_modify(|n| *n += 1);
                }
                return;
            }
            if ended.received {
                tracing::debug!(%room, error = %ended.status.message(), "feed upstream ended; reconnecting");
                served = true;
                break;
            }
            node.directory.cache.node_failed(shard, target);
            last = format!("node {target}: {}", ended.status.message());
        }
        if served {
            backoff_ms = FEED_RETRY_MS_MIN;
        } else {
            node.directory.cache.invalidate(shard);
            tracing::debug!(%room, reason = %last, "feed upstream unavailable");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            _ = stopped.changed() => return,
        }
        backoff_ms = (backoff_ms * 2).min(FEED_RETRY_MS_MAX);
    }
}

/// Add one upstream event to the feed.
pub(crate) fn take(feed: &Feed, event: pb::RoomEvent) {
    let mut state = lock(&feed.state);
    match &event.event {
        Some(Event::Message(message)) => {
            let Some(dot) = message.position.as_ref().map(event_dot) else { return };
            if state.vv.contains(dot) {
                return;
            }
            state.vv.advance(dot);
            state.push(Some(dot), event);
        }
        Some(Event::State(side)) => {
            state.side = Some(side.clone());
            state.push(None, event);
        }
        Some(Event::Membership(_)) => state.push(None, event),
        Some(Event::CaughtUp(_)) | None => return,
    }
    drop(state);
    feed.changed.send_modify(|n| *n += 1);
}

fn event_dot(position: &pb::Position) -> Dot {
    Dot::new(ReplicaId(position.replica), position.counter)
}

/// A `Follow` stream of `room` from one of its replicas, starting after `have`.
async fn follow_stream(
    node: &NodeInner,
    room: &RoomId,
    have: &VersionVector,
) -> Result<tonic::Streaming<pb::RoomEvent>, String> {
    let shard = node.ring.shard_of_room(room);
    let route = crate::directory::resolve_shard(node, shard).await;
    let request =
        pb::FollowRequest { from: node.id.0, room: room.0.clone(), have: Some(convert::version_vector_to_pb(have)) };
    let mut last = format!("no replica of shard {shard} known");
    for target in route.replicas.iter().copied().filter(|id| *id != node.id) {
        let Some(addr) = crate::directory::node_addr(node, target).await else { continue };
        let Ok(link) = node.replicas.peers().link(&addr) else { continue };
        match link.client().follow(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => {
                node.directory.cache.node_failed(shard, target);
                last = format!("node {target}: {}", status.message());
            }
        }
    }
    node.directory.cache.invalidate(shard);
    Err(last)
}

/// Subscribe `user` to `room` on a node that holds no replica of its shard: the membership
/// check runs now, the returned future serves the subscription into `sink`.
pub async fn subscribe<S: EventSink>(
    ops: &Ops,
    user: &UserName,
    room: RoomId,
    have: VersionVector,
    sink: S,
) -> Result<impl Future<Output = ()> + Send + 'static, ApiError> {
    match crate::remote::forward(ops.node(), user, &room, ClientOp::Role).await? {
        ClientAnswer::Role(_) => {}
        other => return Err(ApiError::Internal(format!("replica answered {other:?} to a membership check"))),
    }
    let node = ops.node().clone();
    let feed = feed_of(&node, &room, &have);
    Ok(Subscriber { node, feed, user: user.clone(), have, sender: sink }.run())
}

struct Subscriber<S> {
    node: Arc<NodeInner>,
    feed: Arc<Feed>,
    user: UserName,
    have: VersionVector,
    sender: S,
}

/// Why a local subscriber stopped.
enum End {
    Gone,
    Error(Status),
}

impl<S: EventSink> Subscriber<S> {
    async fn run(mut self) {
        let _registered = self.node.register_subscription(&self.user, &self.feed.room);
        if let End::Error(status) = self.serve().await {
            let _ = self.sender.deliver(Err(status)).await;
        }
    }

    async fn send(&self, event: pb::RoomEvent) -> Result<(), End> {
        self.sender.deliver(Ok(event)).await.map_err(|_| End::Gone)
    }

    async fn serve(&mut self) -> End {
        if let Err(end) = self.catch_up().await {
            return end;
        }
        let mut changed = self.feed.changed.subscribe();
        let mut cursor = lock(&self.feed.state).oldest_seq();
        let mut caught_up = false;
        loop {
            changed.borrow_and_update();
            let (items, ended, side) = {
                let state = lock(&self.feed.state);
                if cursor < state.oldest_seq() {
                    return End::Error(ApiError::SlowConsumer("fell behind its node's feed".into()).into());
                }
                let skip = usize::try_from(cursor - state.oldest_seq()).unwrap_or(usize::MAX);
                let items: Vec<Item> = state.items.iter().skip(skip).cloned().collect();
                (items, state.ended.clone(), state.side.clone())
            };
            for item in items {
                cursor = item.seq + 1;
                if let Some(dot) = item.dot {
                    if self.have.contains(dot) {
                        continue;
                    }
                    self.have.advance(dot);
                }
                if let Err(end) = self.send((*item.event).clone()).await {
                    return end;
                }
                if let Some(Event::Membership(change)) = &item.event.event
                    && membership_ends(&change.change, &UserName(change.user.clone()), Some(&self.user))
                {
                    let refusal = Refusal::NotMember { room: self.feed.room.clone(), user: self.user.clone() };
                    return End::Error(ApiError::Refused(refusal).into());
                }
            }
            if let Some(status) = ended {
                return End::Error(status);
            }
            if !caught_up {
                caught_up = true;
                let marker = pb::RoomEvent {
                    room: self.feed.room.0.clone(),
                    event: Some(Event::CaughtUp(convert::version_vector_to_pb(&self.have))),
                };
                if let Err(end) = self.send(marker).await {
                    return end;
                }
                if let Some(side) = side {
                    let state = pb::RoomEvent { room: self.feed.room.0.clone(), event: Some(Event::State(side)) };
                    if let Err(end) = self.send(state).await {
                        return end;
                    }
                }
            }
            tokio::select! {
                changed = changed.changed() => if changed.is_err() { return End::Gone },
                () = self.sender.closed() => return End::Gone,
            }
        }
    }

    /// Bring `have` up to the feed's base on a stream of its own, if it is not there.
    async fn catch_up(&mut self) -> Result<(), End> {
        let mut backoff_ms = FEED_RETRY_MS_MIN;
        loop {
            let base = lock(&self.feed.state).base.clone();
            if self.have.dominates(&base) {
                return Ok(());
            }
            let mut stream = match follow_stream(&self.node, &self.feed.room, &self.have).await {
                Ok(stream) => stream,
                Err(reason) => {
                    tracing::debug!(room = %self.feed.room, %reason, "catch-up stream unavailable");
                    if self.sender.is_closed() {
                        return Err(End::Gone);
                    }
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(FEED_RETRY_MS_MAX);
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(event)) => match &event.event {
                        Some(Event::Message(message)) => {
                            let Some(dot) = message.position.as_ref().map(event_dot) else { continue };
                            if self.have.contains(dot) {
                                continue;
                            }
                            self.have.advance(dot);
                            self.send(event).await?;
                        }
                        Some(Event::CaughtUp(_)) => break,
                        _ => {}
                    },
                    Ok(None) => break,
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        return Err(End::Error(status));
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(replica: u64, counter: u64) -> (Option<Dot>, pb::RoomEvent) {
        let dot = Dot::new(ReplicaId(replica), counter);
        (Some(dot), pb::RoomEvent { room: "r".into(), event: None })
    }

    #[test]
    fn the_base_holds_everything_the_buffer_no_longer_does() {
        let mut state = FeedState::default();
        for counter in 1..=(FEED_BUFFER_EVENTS as u64 + 10) {
            let (dot, event) = message(1, counter);
            state.push(dot, event);
        }
        assert_eq!(state.items.len(), FEED_BUFFER_EVENTS);
        assert_eq!(state.base.get(ReplicaId(1)), 10);
        assert_eq!(state.oldest_seq(), 10);
        assert_eq!(state.items.front().and_then(|i| i.dot), Some(Dot::new(ReplicaId(1), 11)));
    }
}
