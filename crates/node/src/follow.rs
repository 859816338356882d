//! `PeerService.FollowRooms`: every room one node follows on another, on one stream per node
//! pair, instead of one `Follow` stream per room.
//!
//! A node that holds no replica of a room serves its local subscribers from a feed
//! ([`crate::feed`]) that follows the room on a replica. With one stream per room, every event
//! crossed as its own HTTP/2 message on its own stream, and woke a task of its own on the
//! receiving side. Here the caller starts and stops follows on one stream per peer
//! ([`FollowLinks`]), each named by an id it picks; the replica runs each follow as a
//! subscription without a user ([`crate::ops::Ops::follow_into`]) whose events go into one
//! queue per stream, and sends them as many to a message as were ready together ([`serve`]).
//! The caller's one reader task hands each event to its feed.
//!
//! A follow ends with its own error (`failed_precondition`: the room is gone; `unavailable`:
//! the node holds no replica); a stream that breaks ends every follow on it as unavailable,
//! and the next follow opens a new stream. Feeds never block the reader (they buffer and drop
//! slow subscribers), so one room cannot hold up the others on its stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use palaver_crdt::VersionVector;
use palaver_proto::v1 as pb;
use palaver_proto::v1::follow_event::Body;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::convert;
use crate::feed::Feed;
use crate::lock;
use crate::node::NodeInner;
use crate::ops::Ops;
use crate::subscribe::{Running, TaggedSink};

/// Events queued on one stream (the replica's side) before its follows wait for the network.
pub const FOLLOW_STREAM_QUEUE_EVENTS: usize = 1_024;
/// Most events in one `FollowEvents` message.
pub const FOLLOW_EVENTS_PER_MESSAGE_MAX: usize = 256;
/// Most starts and stops in one `FollowControl` message.
pub const FOLLOW_CONTROLS_PER_MESSAGE_MAX: usize = 256;
/// Most follows one stream holds at once (a node follows each room at most once per peer).
pub const FOLLOWS_PER_STREAM_MAX: usize = 65_536;

// ---------------------------------------------------------------------------------------------
// The replica's side.

fn ended(id: u64, status: &Status) -> pb::FollowEvent {
    let end = pb::LinkError { code: status.code() as i32, message: status.message().to_owned() };
    pb::FollowEvent { id, body: Some(Body::End(end)) }
}

/// A follow's event (or its end) on the stream.
fn tagged(id: u64, event: Result<pb::RoomEvent, Status>) -> pb::FollowEvent {
    match event {
        Ok(event) => pb::FollowEvent { id, body: Some(Body::Event(event)) },
        Err(status) => ended(id, &status),
    }
}

/// Serve one `FollowRooms` stream: run the follows `incoming` starts until it stops them, the
/// caller goes away or `stopped` turns true; the returned stream carries their events.
pub fn serve(
    ops: Ops,
    mut incoming: tonic::Streaming<pb::FollowControl>,
    mut stopped: watch::Receiver<bool>,
) -> impl futures::Stream<Item = Result<pb::FollowEvents, Status>> + Send + 'static {
    let (events, outgoing) = mpsc::channel::<pb::FollowEvent>(FOLLOW_STREAM_QUEUE_EVENTS);
    tokio::spawn(async move {
        let mut follows = Running::default();
        loop {
            let control = tokio::select! {
                control = incoming.message() => control,
                () = events.closed() => break,
                _ = stopped.wait_for(|stop| *stop) => break,
            };
            let Ok(Some(control)) = control else { break };
            follows.prune();
            for id in control.stop {
                follows.stop(id);
            }
            for start in control.start {
                let refused = if follows.contains(start.id) {
                    Some(Status::invalid_argument(format!("follow {} is already running", start.id)))
                } else if follows.held() >= FOLLOWS_PER_STREAM_MAX {
                    Some(Status::resource_exhausted(format!("{FOLLOWS_PER_STREAM_MAX} follows on one stream")))
                } else {
                    let have = convert::version_vector_from_pb(start.have.as_ref());
                    let sink = TaggedSink { id: start.id, events: events.clone(), tag: tagged };
                    match ops.follow_into(&start.room, have, sink) {
                        Ok(task) => {
                            follows.spawn(start.id, task);
                            None
                        }
                        Err(error) => Some(Status::from(error)),
                    }
                };
                if let Some(status) = refused
                    && events.send(ended(start.id, &status)).await.is_err()
                {
                    break;
                }
            }
        }
    });
    futures::stream::unfold(outgoing, |mut outgoing| async move {
        let events = crate::peer::next_batch(&mut outgoing, FOLLOW_EVENTS_PER_MESSAGE_MAX).await?;
        Some((Ok(pb::FollowEvents { events }), outgoing))
    })
}

// ---------------------------------------------------------------------------------------------
// The following node's side.

/// How a follow ended.
#[derive(Debug)]
pub struct Ended {
    /// Why (`failed_precondition`: the room is gone).
    pub status: Status,
    /// Whether any event of the follow arrived first (the replica served it).
    pub received: bool,
}

/// A follow running on a stream; dropping it stops the follow.
#[derive(Debug)]
pub struct Following {
    link: Arc<FollowLink>,
    id: u64,
    /// Resolves once the follow has ended.
    pub ended: oneshot::Receiver<Ended>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.link.stop(self.id);
    }
}

/// Counts of what this node's follow streams received (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowCounts {
    /// `FollowEvents` messages.
    pub messages: u64,
    /// Events in them.
    pub events: u64,
}

/// What the streams received so far, shared with their reader tasks.
#[derive(Debug, Default)]
struct Received {
    messages: AtomicU64,
    events: AtomicU64,
}

/// This node's `FollowRooms` streams, one per peer address.
#[derive(Debug, Default)]
pub struct FollowLinks {
    links: Mutex<HashMap<String, Arc<FollowLink>>>,
    received: Arc<Received>,
}

impl FollowLinks {
    /// What the streams received so far.
    pub fn counts(&self) -> FollowCounts {
        let received = &self.received;
        FollowCounts {
            messages: received.messages.load(Ordering::Relaxed),
            events: received.events.load(Ordering::Relaxed),
        }
    }

    /// How many of the streams are open.
    pub fn open(&self) -> usize {
        lock(&self.links).values().filter(|link| !lock(&link.state).closed).count()
    }

    /// Start following `feed`'s room from `have` on the node at `addr`, on the stream to it
    /// (opened if there is none, or the last one broke).
    pub fn follow(
        &self,
        node: &Arc<NodeInner>,
        addr: &str,
        feed: &Arc<Feed>,
        have: &VersionVector,
    ) -> Result<Following, String> {
        let mut links = lock(&self.links);
        if let Some(link) = links.get(addr)
            && let Some(following) = link.start(feed, have)
        {
            return Ok(following);
        }
        let client = node.replicas.peers().link(addr).map_err(|e| e.to_string())?.client();
        let (control, requests) = mpsc::unbounded_channel();
        let link = Arc::new(FollowLink { control, state: Mutex::new(LinkState::default()) });
        tokio::spawn(run(self.received.clone(), link.clone(), client, node.id.0, requests));
        links.insert(addr.to_owned(), link.clone());
        link.start(feed, have).ok_or_else(|| format!("the follow stream to {addr} closed at once"))
    }
}

enum Control {
    Start(pb::FollowStart),
    Stop(u64),
}

#[derive(Default)]
struct LinkState {
    /// The stream broke: no follow starts here any more.
    closed: bool,
    next_id: u64,
    follows: HashMap<u64, Follower>,
}

struct Follower {
    feed: Weak<Feed>,
    received: bool,
    ended: oneshot::Sender<Ended>,
}

/// One `FollowRooms` stream to a peer.
struct FollowLink {
    control: mpsc::UnboundedSender<Control>,
    state: Mutex<LinkState>,
}

impl std::fmt::Debug for FollowLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowLink").finish_non_exhaustive()
    }
}

impl FollowLink {
    fn start(self: &Arc<Self>, feed: &Arc<Feed>, have: &VersionVector) -> Option<Following> {
        let mut state = lock(&self.state);
        if state.closed {
            return None;
        }
        state.next_id += 1;
        let id = state.next_id;
        let start =
            pb::FollowStart { id, room: feed.room().0.clone(), have: Some(convert::version_vector_to_pb(have)) };
        self.control.send(Control::Start(start)).ok()?;
        let (ended, on_end) = oneshot::channel();
        state.follows.insert(id, Follower { feed: Arc::downgrade(feed), received: false, ended });
        Some(Following { link: self.clone(), id, ended: on_end })
    }

    fn stop(&self, id: u64) {
        if lock(&self.state).follows.remove(&id).is_some() {
            let _ = self.control.send(Control::Stop(id));
        }
    }

    fn take(&self, message: pb::FollowEvents) {
        let mut state = lock(&self.state);
        for event in message.events {
            match event.body {
                Some(Body::Event(room_event)) => {
                    let Some(follower) = state.follows.get_mut(&event.id) else { continue };
                    follower.received = true;
                    if let Some(feed) = follower.feed.upgrade() {
                        crate::feed::take(&feed, room_event);
                    }
                }
                Some(Body::End(end)) => {
                    if let Some(follower) = state.follows.remove(&event.id) {
                        let status = Status::new(tonic::Code::from(end.code), end.message);
                        let _ = follower.ended.send(Ended { status, received: follower.received });
                    }
                }
                None => {}
            }
        }
    }

    /// The stream is gone: every follow on it ends as unavailable.
    fn close(&self, reason: &str) {
        let mut state = lock(&self.state);
        state.closed = true;
        for (_, follower) in state.follows.drain() {
            let status = Status::unavailable(reason.to_owned());
            let _ = follower.ended.send(Ended { status, received: follower.received });
        }
    }
}

/// Open the stream, send the follows started and stopped on it, hand what arrives to the
/// feeds, until it breaks.
async fn run(
    received: Arc<Received>,
    link: Arc<FollowLink>,
    mut client: palaver_proto::v1::peer_service_client::PeerServiceClient<tonic::transport::Channel>,
    from: u64,
    requests: mpsc::UnboundedReceiver<Control>,
) {
    let controls = futures::stream::unfold(requests, move |mut requests| async move {
        let first = requests.recv().await?;
        let mut control = pb::FollowControl { from, start: Vec::new(), stop: Vec::new() };
        let mut add = |next| match next {
            Control::Start(start) => control.start.push(start),
            Control::Stop(id) => control.stop.push(id),
        };
        add(first);
        for _ in 1..FOLLOW_CONTROLS_PER_MESSAGE_MAX {
            match requests.try_recv() {
                Ok(next) => add(next),
                Err(_) => break,
            }
        }
        Some((control, requests))
    });
    let reason = match client.follow_rooms(controls).await {
        Ok(response) => {
            let mut incoming = response.into_inner();
            loop {
                match incoming.message().await {
                    Ok(Some(message)) => {
                        received.messages.fetch_add(1, Ordering::Relaxed);
                        received.events.fetch_add(message.events.len() as u64, Ordering::Relaxed);
                        link.take(message);
                    }
                    Ok(None) => break "the follow stream ended".to_owned(),
                    Err(status) => break format!("the follow stream broke: {}", status.message()),
                }
            }
        }
        Err(status) => format!("could not open a follow stream: {}", status.message()),
    };
    tracing::debug!(%reason, "follow stream closed");
    link.close(&reason);
}
