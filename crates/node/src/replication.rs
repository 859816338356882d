//! CRDT replication between the replicas of each shard: pushes and anti-entropy.
//!
//! Two kinds of task keep a peer's copies up to date:
//!
//! - **The courier** (one per peer node, for every shard the two nodes share). When any local
//!   store has own changes (a durable event this replica wrote, a side-state change), it sends
//!   the peer, in one call for all shards, each room the peer lacks something of this
//!   replica's own writing: the durable events this replica stamped after the peer's known
//!   version vector (at most [`PUSH_EVENTS_PER_ROOM_MAX`] per room, [`COURIER_ROOMS_PER_CALL_MAX`]
//!   rooms and about [`COURIER_EVENTS_PER_CALL_MAX`] events per call) and the side state if its
//!   digest differs. The peer applies every shard's rooms, fsyncs once, and answers with its
//!   copies, which the courier records — that record is what `quorum` acknowledgements wait on.
//!   One call is in flight per peer node: what changes meanwhile goes in the next, so under
//!   load a call carries many posts of many shards (one task, one fsync and one answer on the
//!   peer for all of them). Once the oldest call has waited [`COURIER_STALL_MS`] and
//!   [`COURIER_STALL_FACTOR`] times the usual answer time (a slow fsync on the peer), one more
//!   leaves, up to [`COURIER_CALLS_IN_FLIGHT_MAX`], carrying only what
//!   the calls in flight do not; answers are taken in call order. Every replica pushes its
//!   own writes to every peer, so a third replica's events reach the peer from that replica;
//!   relaying them at once too would send each event to each peer twice (measured: about as
//!   many duplicates as new events).
//! - **The pusher** (one per local replica and other member of its group) does the rest, for
//!   its shard:
//!   - *Relay.* When a third replica's events arrive here, the pusher looks again
//!     [`RELAY_GRACE_MS`] later (it does not wake for them at once). If the peer still seems
//!     to lack some (that writer died, or a partition cut it off from the peer), it asks the
//!     peer what it holds of those rooms (a push without events), then sends what it really
//!     lacks, whoever wrote it.
//!   - *Anti-entropy.* At once after a failed call (its own or the courier's for its shard: so
//!     after a partition heals or a peer restarts), and periodically, the pusher sends the
//!     peer a digest of every room's version vector (a digest alone: nothing else crosses the
//!     wire while the two agree); if they differ, the two exchange listings of their rooms in
//!     pages of [`SYNC_ROOMS_PER_PAGE`], and each side then relays what the other lacks. The
//!     period starts at [`ANTI_ENTROPY_INTERVAL_MS`] and doubles, up to
//!     [`ANTI_ENTROPY_INTERVAL_MAX_MS`], for as long as each comparison finds the two in
//!     agreement (pushes keep them there; the digest is the safety net), so a quiet replica's
//!     cost is not O(rooms) every second. After each exchange the courier looks at every room
//!     of the shard again; a shard whose courier call failed is left alone until then, so a
//!     peer that is down costs a digest per retry, not a push.
//!
//! The courier looks only at the rooms whose own changes it has not sent yet (a cursor per
//! shard into [`CrdtStore::changed_since`]); it scans a shard's whole index only at start,
//! after anti-entropy and after a round that got stuck.
//!
//! Both directions run: each replica's couriers and pushers feed its peers, and a push also
//! tells the receiver what the sender holds (which is how a replica mostly learns that a peer
//! got a third replica's events).
//!
//! Every loop is bounded and every call has a deadline ([`CRDT_CALL_TIMEOUT_MS`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use openraft::async_runtime::WatchReceiver;
use palaver_crdt::{Dot, Event, ReplicaId, VersionVector};
use palaver_ids::{NodeId, RoomId, ShardId};
use palaver_proto::v1::{CrdtBatchRequest, CrdtReply, CrdtRequest};
use palaver_shard::{CrdtStore, PushScope, Replica, RoomSummary, SideState, keys};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::lock;
use crate::node::NodeInner;

/// How soon a pusher compares digests with its peer again after they differed.
pub const ANTI_ENTROPY_INTERVAL_MS: u64 = 1_000;
/// The longest pause between two digest comparisons while they keep agreeing.
pub const ANTI_ENTROPY_INTERVAL_MAX_MS: u64 = 32_000;
/// Most rooms in one relay call.
pub const PUSH_ROOMS_MAX: usize = 64;
/// Most events of one room in one push.
pub const PUSH_EVENTS_PER_ROOM_MAX: usize = 512;
/// Most relay calls in one round before the pusher yields to anti-entropy.
pub const PUSH_CALLS_PER_ROUND_MAX: usize = 64;
/// Most changed rooms of one shard the courier looks at per call; more wait for the next.
pub const COURIER_CHANGED_ROOMS_MAX: usize = 4_096;
/// Most rooms (of all shards) in one courier call.
pub const COURIER_ROOMS_PER_CALL_MAX: usize = 256;
/// A courier call takes no further room once it holds this many events.
pub const COURIER_EVENTS_PER_CALL_MAX: usize = 4_096;
/// Most courier calls in flight to one peer node (see [`COURIER_STALL_MS`]).
pub const COURIER_CALLS_IN_FLIGHT_MAX: usize = 4;
/// A courier sends one call at a time (what changes meanwhile goes in the next, so under load
/// a call carries many posts), but once the oldest call has waited this long, and
/// [`COURIER_STALL_FACTOR`] times as long as answers usually take (its answer waits for the
/// peer's fsync, and that one is slow), one more leaves, up to [`COURIER_CALLS_IN_FLIGHT_MAX`]:
/// a slow fsync on the peer does not hold up what follows. Under saturation every answer is
/// slow, and more, smaller calls would only cost more CPU per post.
pub const COURIER_STALL_MS: u64 = 2;
/// See [`COURIER_STALL_MS`].
pub const COURIER_STALL_FACTOR: u32 = 4;
/// Rooms per page of an anti-entropy listing.
pub const SYNC_ROOMS_PER_PAGE: usize = 1_024;
/// Deadline of one replication call.
pub const CRDT_CALL_TIMEOUT_MS: u64 = 5_000;
/// Pause after a failed call before the pusher or courier tries that peer again.
pub const PUSH_RETRY_MS: u64 = 200;
/// How long a peer may seem to lack a third replica's events before this replica relays them
/// (after asking the peer what it holds). That replica pushes its own writes, so the gap
/// normally closes by itself well within this; the relay is for writers that died or were cut
/// off from the peer.
pub const RELAY_GRACE_MS: u64 = 1_000;

const _: () = assert!(PUSH_RETRY_MS < ANTI_ENTROPY_INTERVAL_MS);
const _: () = assert!(RELAY_GRACE_MS <= ANTI_ENTROPY_INTERVAL_MAX_MS);
const _: () = assert!(ANTI_ENTROPY_INTERVAL_MS <= ANTI_ENTROPY_INTERVAL_MAX_MS);
const _: () = assert!(COURIER_EVENTS_PER_CALL_MAX >= PUSH_EVENTS_PER_ROOM_MAX);
// A courier call must fit a peer message: every event up to the body limit, with room to spare.
const _: () = assert!(
    (COURIER_EVENTS_PER_CALL_MAX + PUSH_EVENTS_PER_ROOM_MAX) * crate::limits::MESSAGE_BODY_BYTES_MAX * 2
        <= crate::limits::PEER_MESSAGE_BYTES_MAX
);

/// One room's part of a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPush {
    /// The room.
    pub room: RoomId,
    /// The sender's durable copy (after these events), so the receiver can push back.
    pub sender: RoomSummary,
    /// Events the receiver lacks, each replica's in counter order.
    pub events: Vec<Event>,
    /// The sender's side state, if the receiver's digest differs.
    pub side: Option<SideState>,
}

/// One shard's part of a courier call ([`CrdtBatchRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPush {
    /// The shard.
    pub shard: ShardId,
    /// Its rooms.
    pub rooms: Vec<RoomPush>,
}

/// The answer to one shard's part of a courier call: the receiver's copy of each pushed room,
/// or why that shard's part failed (the others still count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPushed {
    /// The shard.
    pub shard: ShardId,
    /// The copies, or the failure.
    pub result: Result<Vec<RoomSummary>, String>,
}

/// A replication message between two replicas of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrdtMessage {
    /// Events and side state the receiver lacks.
    Push(Vec<RoomPush>),
    /// Anti-entropy, first step: the sender's digest of every room (answered `InSync` or
    /// `Differs`).
    Digest([u8; 32]),
    /// Anti-entropy: the sender's digest and a page of its rooms, `[from, to)` (`to` `None`: to
    /// the end).
    Sync {
        /// Digest of every room of the sender.
        digest: [u8; 32],
        /// First room of the page's range.
        from: RoomId,
        /// End of the page's range (exclusive); `None`: the last page.
        to: Option<RoomId>,
        /// The sender's rooms in the range.
        rooms: Vec<RoomSummary>,
    },
}

/// The answer to a [`CrdtMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrdtAnswer {
    /// The receiver's copy of each pushed room, after applying.
    Pushed(Vec<RoomSummary>),
    /// Same digest: nothing to exchange.
    InSync,
    /// Different digests: exchange listings.
    Differs,
    /// The receiver's rooms in the page's range.
    Listing(Vec<RoomSummary>),
}

/// Where the courier is in one shard's own changes for one peer.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    /// The change sequence number up to which the peer has been sent every own change;
    /// `None`: look at every room of the shard next.
    sent_upto: Option<u64>,
    /// Bumped by the pusher when it asks for a full look (after anti-entropy), so that a round
    /// that started before does not move the cursor past it.
    generation: u64,
    /// The shard's change sequence number when the peer last took nothing of a push: the
    /// courier leaves the shard alone until it changes again or the pusher asks for a look.
    stuck_at: Option<u64>,
    /// A call with this shard failed: the courier leaves it alone until the pusher's
    /// anti-entropy gets through (so a peer that is down costs a digest per retry, not pushes).
    awaiting_sync: bool,
}

/// What the pusher of one (shard, peer) and the courier for that peer share.
#[derive(Debug)]
struct PeerShard {
    replica: Replica,
    cursor: Mutex<Cursor>,
    /// The courier's call with this shard failed: anti-entropy now (and on retry).
    failed: Notify,
    /// The peer took nothing of what the courier sent for this shard: compare soon.
    stuck: Notify,
}

impl PeerShard {
    /// Make the courier look at every room of the shard next.
    fn rescan(&self) {
        let mut cursor = lock(&self.cursor);
        cursor.sent_upto = None;
        cursor.stuck_at = None;
        cursor.awaiting_sync = false;
        cursor.generation = cursor.generation.wrapping_add(1);
    }
}

/// A running pusher.
#[derive(Debug)]
struct PusherTask {
    handle: JoinHandle<()>,
    shared: Arc<PeerShard>,
}

/// A running courier.
#[derive(Debug)]
struct CourierTask {
    handle: JoinHandle<()>,
    addr: String,
    /// The shards the two nodes share, by shard (kept current by [`Replication::ensure_pushers`]).
    shards: Arc<Mutex<BTreeMap<ShardId, Arc<PeerShard>>>>,
    /// Wakes the courier (a shard was added or asked for a full look).
    wake: Arc<Notify>,
}

/// Replication's tasks on a node: pushers by (shard, peer), couriers by peer node.
#[derive(Debug, Default)]
pub struct Replication {
    pushers: Mutex<BTreeMap<(ShardId, NodeId), PusherTask>>,
    couriers: Mutex<BTreeMap<NodeId, CourierTask>>,
    stats: Arc<CourierStats>,
}

/// What the couriers sent since the node started (for `/metrics`).
#[derive(Debug, Default)]
pub struct CourierStats {
    calls: std::sync::atomic::AtomicU64,
    rooms: std::sync::atomic::AtomicU64,
    events: std::sync::atomic::AtomicU64,
    after_stall: std::sync::atomic::AtomicU64,
}

/// A snapshot of [`CourierStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CourierCounts {
    /// Calls sent.
    pub calls: u64,
    /// Rooms pushed, over all calls.
    pub rooms: u64,
    /// Events pushed, over all calls.
    pub events: u64,
    /// Calls sent while an earlier call to the same peer had waited longer than
    /// [`COURIER_STALL_MS`] for its answer.
    pub after_stall: u64,
}

impl Replication {
    /// Start a pusher for every (local replica, other group member) that has none, and a
    /// courier for every peer node that has none; stop those whose peer left the group.
    pub fn ensure_pushers(&self, node: &Arc<NodeInner>, stopped: &watch::Receiver<bool>) {
        let mut wanted = BTreeMap::new();
        for replica in node.replicas.all() {
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow_watched();
            let membership = metrics.membership_config.membership();
            for (id, member) in membership.nodes() {
                if *id != node.id.0 {
                    wanted.insert((replica.shard, NodeId(*id)), (replica.clone(), member.addr.clone()));
                }
            }
        }
        let mut pushers = lock(&self.pushers);
        pushers.retain(|key, task| {
            let keep = wanted.contains_key(key) && !task.handle.is_finished();
            if !keep {
                task.handle.abort();
            }
            keep
        });
        let mut addrs: BTreeMap<NodeId, String> = BTreeMap::new();
        for (key, (replica, addr)) in wanted {
            addrs.entry(key.1).or_insert_with(|| addr.clone());
            if pushers.contains_key(&key) {
                continue;
            }
            let shared = Arc::new(PeerShard {
                replica,
                cursor: Mutex::new(Cursor::default()),
                failed: Notify::new(),
                stuck: Notify::new(),
            });
            let pusher =
                Pusher { node: node.clone(), shared: shared.clone(), peer: key.1, addr, stopped: stopped.clone() };
            pushers.insert(key, PusherTask { handle: tokio::spawn(pusher.run()), shared });
        }
        let mut couriers = lock(&self.couriers);
        couriers.retain(|peer, task| {
            let keep = addrs.get(peer) == Some(&task.addr) && !task.handle.is_finished();
            if !keep {
                task.handle.abort();
            }
            keep
        });
        for (peer, addr) in addrs {
            let task = couriers.entry(peer).or_insert_with(|| {
                let shards = Arc::new(Mutex::new(BTreeMap::new()));
                let wake = Arc::new(Notify::new());
                let courier = Courier {
                    node: node.clone(),
                    peer,
                    addr: addr.clone(),
                    shards: shards.clone(),
                    wake: wake.clone(),
                    stats: self.stats.clone(),
                    stopped: stopped.clone(),
                    start: 0,
                    in_flight: InFlight::default(),
                    next_call: 0,
                };
                CourierTask { handle: tokio::spawn(courier.run()), addr, shards, wake }
            });
            let current: BTreeMap<ShardId, Arc<PeerShard>> = pushers
                .iter()
                .filter(|((_, to), _)| *to == peer)
                .map(|((shard, _), pusher)| (*shard, pusher.shared.clone()))
                .collect();
            let mut shards = lock(&task.shards);
            let changed = shards.len() != current.len()
                || shards.iter().zip(current.iter()).any(|((a, x), (b, y))| a != b || !Arc::ptr_eq(x, y));
            if changed {
                *shards = current;
                drop(shards);
                task.wake.notify_one();
            }
        }
    }

    /// What the couriers sent since the node started.
    pub fn courier_counts(&self) -> CourierCounts {
        use std::sync::atomic::Ordering::Relaxed;
        CourierCounts {
            calls: self.stats.calls.load(Relaxed),
            rooms: self.stats.rooms.load(Relaxed),
            events: self.stats.events.load(Relaxed),
            after_stall: self.stats.after_stall.load(Relaxed),
        }
    }

    /// Stop every pusher and courier and wait for them.
    pub async fn shutdown(&self) {
        let mut handles: Vec<JoinHandle<()>> =
            std::mem::take(&mut *lock(&self.pushers)).into_values().map(|task| task.handle).collect();
        handles.extend(std::mem::take(&mut *lock(&self.couriers)).into_values().map(|task| task.handle));
        for handle in handles {
            handle.abort();
            let _ = handle.await;
        }
    }
}

/// How a push round ended.
enum Pushed {
    /// The peer lacks nothing, or the round's bound was reached.
    Done,
    /// The peer took nothing of what it seems to lack.
    Stuck,
}

/// Why a pusher's pause ended.
enum Wake {
    /// Anti-entropy is due (or a retry after a failure).
    Sync,
    /// A relay is due.
    Relay,
    /// Peers' events arrived here.
    Received,
    /// The courier's call for this shard failed.
    CourierFailed,
    /// The courier's push for this shard got stuck.
    CourierStuck,
}

/// Frame `message` for `shard` and call the peer at `addr` with it.
async fn call(node: &NodeInner, addr: &str, shard: ShardId, message: &CrdtMessage) -> Result<CrdtAnswer, String> {
    let link = node.replicas.peers().link(addr).map_err(|e| e.to_string())?;
    let payload = keys::encode(message).map_err(|e| e.to_string())?;
    let request = CrdtRequest { shard: shard.0, from: node.id.0, payload };
    decode_reply(link.crdt(request)).await
}

/// Wait for a replication call's reply, at most [`CRDT_CALL_TIMEOUT_MS`], and decode it.
async fn decode_reply<T: serde::de::DeserializeOwned>(
    reply: impl std::future::Future<Output = Result<CrdtReply, crate::peer::PeerError>>,
) -> Result<T, String> {
    let reply = tokio::time::timeout(Duration::from_millis(CRDT_CALL_TIMEOUT_MS), reply)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    keys::decode(&reply.payload).map_err(|e| e.to_string())
}

/// This replica's durable copy of `room`, sent with a push so that the receiver knows what the
/// sender holds.
fn sender_summary(store: &CrdtStore, room: &RoomId) -> RoomSummary {
    let sender = store.summaries(Some(room), 1).into_iter().next().filter(|s| s.room == *room);
    sender.unwrap_or_else(|| RoomSummary {
        room: room.clone(),
        version_vector: VersionVector::new(),
        side_digest: [0; 32],
    })
}

/// The push of `room`: its events after `base` that subscribers may be sent (durable, or own
/// and written: [`CrdtStore::share_written`]) and, if `side_behind`, its side state.
async fn room_push(
    store: &CrdtStore,
    room: RoomId,
    base: &VersionVector,
    side_behind: bool,
) -> Result<RoomPush, String> {
    let cell = store.room(&room).await.map_err(|e| e.to_string())?;
    let events = cell.visible_delta(base, PUSH_EVENTS_PER_ROOM_MAX);
    let side = if side_behind { Some(cell.lock().side.clone()) } else { None };
    let sender = sender_summary(store, &room);
    Ok(RoomPush { room, sender, events, side })
}

/// The pushes for `behind` (as [`CrdtStore::rooms_behind`] lists rooms).
async fn pushes(store: &CrdtStore, behind: Vec<(RoomId, VersionVector, bool)>) -> Result<Vec<RoomPush>, String> {
    let mut pushes = Vec::with_capacity(behind.len());
    for (room, base, side_behind) in behind {
        pushes.push(room_push(store, room, &base, side_behind).await?);
    }
    Ok(pushes)
}

/// Record `peer`'s copies of pushed rooms; returns whether that was news.
fn record_copies(store: &CrdtStore, peer: ReplicaId, copies: &[RoomSummary]) -> bool {
    let mut progressed = false;
    for copy in copies {
        progressed |= store.set_peer(peer, &copy.room, &copy.version_vector, copy.side_digest);
    }
    progressed
}

/// Keeps one peer's copy of one shard's rooms in agreement: anti-entropy and relay (the
/// courier pushes this replica's own changes).
struct Pusher {
    node: Arc<NodeInner>,
    shared: Arc<PeerShard>,
    peer: NodeId,
    addr: String,
    stopped: watch::Receiver<bool>,
}

impl Pusher {
    async fn run(mut self) {
        let store = self.shared.replica.crdt.clone();
        let peer = ReplicaId(self.peer.0);
        let mut received = store.received();
        let mut sync_due = true;
        let shortest = Duration::from_millis(ANTI_ENTROPY_INTERVAL_MS);
        let longest = Duration::from_millis(ANTI_ENTROPY_INTERVAL_MAX_MS);
        let mut interval = shortest;
        let mut next_sync = tokio::time::Instant::now() + interval;
        // Whether the next round relays third replicas' events, and when one is due: armed
        // when peers' events arrive here, or while the peer seems to lack some after a relay.
        let mut relay_now = false;
        let mut relay_at: Option<tokio::time::Instant> = None;
        let grace = Duration::from_millis(RELAY_GRACE_MS);
        loop {
            if sync_due {
                match self.sync(&store).await {
                    Ok(agreed) => {
                        sync_due = false;
                        interval = if agreed { (interval * 2).min(longest) } else { shortest };
                        next_sync = tokio::time::Instant::now() + interval;
                        // The listing just told what the peer holds: relay what it lacks now,
                        // and let the courier look at every room for own changes.
                        relay_now |= !agreed;
                        self.shared.rescan();
                        self.wake_courier();
                    }
                    Err(e) => {
                        interval = shortest;
                        tracing::debug!(shard = %store.shard(), peer = %self.peer, error = %e, "anti-entropy failed")
                    }
                }
            }
            if !sync_due && relay_now {
                match self.relay(&store).await {
                    Ok(Pushed::Done) => {}
                    Ok(Pushed::Stuck) => {
                        // The peer took nothing of what it seems to lack: compare soon.
                        interval = shortest;
                        next_sync = next_sync.min(tokio::time::Instant::now() + interval);
                    }
                    Err(e) => {
                        tracing::debug!(shard = %store.shard(), peer = %self.peer, error = %e, "relay failed");
                        sync_due = true;
                    }
                }
                if !sync_due {
                    relay_now = false;
                    relay_at = store.others_lacking(peer).then(|| tokio::time::Instant::now() + grace);
                }
            }
            let pause = async {
                if sync_due {
                    tokio::time::sleep(Duration::from_millis(PUSH_RETRY_MS)).await;
                    return Wake::Sync;
                }
                let relay = async {
                    match relay_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep_until(next_sync) => Wake::Sync,
                    () = relay => Wake::Relay,
                    () = self.shared.failed.notified() => Wake::CourierFailed,
                    () = self.shared.stuck.notified() => Wake::CourierStuck,
                    // Only while no relay is armed: once it is, peers' events change nothing until
                    // it fires (so a loaded shard wakes its pushers about once a second, not once
                    // per event); what arrives meanwhile is still marked changed afterwards.
                    changed = received.changed(), if relay_at.is_none() => {
                        if changed.is_err() { Wake::Sync } else { Wake::Received }
                    }
                }
            };
            tokio::select! {
                wake = pause => match wake {
                    Wake::Sync | Wake::CourierFailed => sync_due = true,
                    Wake::Relay => relay_now = true,
                    Wake::CourierStuck => {
                        interval = shortest;
                        next_sync = next_sync.min(tokio::time::Instant::now() + interval);
                    }
                    // Their writer is pushing them to the peer too: no round now; look again
                    // after the grace.
                    Wake::Received => {
                        relay_at.get_or_insert_with(|| tokio::time::Instant::now() + grace);
                    }
                },
                _ = self.stopped.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Tell the courier for this peer that this shard wants a full look.
    fn wake_courier(&self) {
        if let Some(task) = lock(&self.node.replication.couriers).get(&self.peer) {
            task.wake.notify_one();
        }
    }

    async fn call(&self, message: &CrdtMessage) -> Result<CrdtAnswer, String> {
        call(&self.node, &self.addr, self.shared.replica.shard, message).await
    }

    /// One full anti-entropy exchange: digests, then listings page by page if they differ.
    /// The pages come from one snapshot of the index, the one the digest was taken of.
    /// Returns whether the digests agreed.
    async fn sync(&self, store: &CrdtStore) -> Result<bool, String> {
        let peer = ReplicaId(self.peer.0);
        let (all, digest) = store.index_snapshot();
        match self.call(&CrdtMessage::Digest(digest)).await? {
            CrdtAnswer::InSync => {
                store.record_peer_listing(peer, &all, &RoomId(String::new()), None);
                return Ok(true);
            }
            CrdtAnswer::Differs => {}
            _ => return Err("unexpected answer to a digest".into()),
        }
        let mut from = RoomId(String::new());
        let mut start = 0;
        loop {
            let end = (start + SYNC_ROOMS_PER_PAGE).min(all.len());
            let to = all.get(end).map(|next| next.room.clone());
            let rooms = all[start..end].to_vec();
            let message = CrdtMessage::Sync { digest, from: from.clone(), to: to.clone(), rooms };
            match self.call(&message).await? {
                CrdtAnswer::InSync => {
                    store.record_peer_listing(peer, &all, &RoomId(String::new()), None);
                    return Ok(true);
                }
                CrdtAnswer::Listing(theirs) => store.record_peer_listing(peer, &theirs, &from, to.as_ref()),
                _ => return Err("unexpected answer to a sync".into()),
            }
            match to {
                Some(next) => {
                    from = next;
                    start = end;
                }
                None => return Ok(false),
            }
        }
    }

    /// Relay third replicas' events the peer still seems to lack. Ask first (a push without
    /// events, answered with the peer's copy): their writers have most likely delivered them
    /// since, and this replica's record of the peer only learns that from the peer. Then push
    /// until the peer lacks nothing (or the round's bound is reached).
    async fn relay(&self, store: &CrdtStore) -> Result<Pushed, String> {
        let peer = ReplicaId(self.peer.0);
        let probes: Vec<RoomPush> = store
            .rooms_behind(peer, PUSH_ROOMS_MAX, PushScope::All)
            .into_iter()
            .map(|(room, _, _)| RoomPush { sender: sender_summary(store, &room), room, events: Vec::new(), side: None })
            .collect();
        if !probes.is_empty() {
            self.send_pushes(store, probes).await?;
        }
        for _ in 0..PUSH_CALLS_PER_ROUND_MAX {
            let behind = store.rooms_behind(peer, PUSH_ROOMS_MAX, PushScope::All);
            if behind.is_empty() {
                return Ok(Pushed::Done);
            }
            let pushes = pushes(store, behind).await?;
            if !self.send_pushes(store, pushes).await? {
                // The peer took nothing (a refused or conflicting event): stop instead of
                // spinning; anti-entropy and the next change try again.
                return Ok(Pushed::Stuck);
            }
        }
        Ok(Pushed::Done)
    }

    /// Send one push call and record the peer's answer; returns whether that was news.
    async fn send_pushes(&self, store: &CrdtStore, pushes: Vec<RoomPush>) -> Result<bool, String> {
        let CrdtAnswer::Pushed(copies) = self.call(&CrdtMessage::Push(pushes)).await? else {
            return Err("unexpected answer to a push".into());
        };
        Ok(record_copies(store, ReplicaId(self.peer.0), &copies))
    }
}

/// One shard's state during a courier round.
struct ShardRound {
    shared: Arc<PeerShard>,
    /// The cursor's generation when the round read it.
    generation: u64,
    /// The rooms changed since the cursor (`None`: every room of the shard).
    rooms: Option<Vec<RoomId>>,
    /// The change sequence number the cursor moves to once the peer holds all of `rooms`.
    upto: u64,
}

impl ShardRound {
    /// What the peer lacks of this replica's own writing, among the round's rooms.
    fn behind(&self, peer: ReplicaId, limit: usize) -> Vec<(RoomId, VersionVector, bool)> {
        let store = &self.shared.replica.crdt;
        match &self.rooms {
            Some(rooms) => {
                let mut behind = store.own_rooms_behind_among(peer, rooms);
                behind.truncate(limit);
                behind
            }
            None => store.rooms_behind(peer, limit, PushScope::Own),
        }
    }

    /// The peer holds every own change of the round: move the cursor, unless the pusher asked
    /// for a full look since the round started.
    fn finish(&self) {
        let mut cursor = lock(&self.shared.cursor);
        if cursor.generation == self.generation {
            cursor.sent_upto = Some(self.upto);
        }
    }

    /// A call with this shard failed: leave it to the pusher's anti-entropy, after which the
    /// courier looks at every room of the shard.
    fn fail(&self) {
        let mut cursor = lock(&self.shared.cursor);
        cursor.sent_upto = None;
        cursor.awaiting_sync = true;
        drop(cursor);
        self.shared.failed.notify_one();
    }

    /// The peer took nothing of this shard's push: look at every room again, but only once
    /// the shard changes again (or the pusher asks).
    fn park(&self) {
        let mut cursor = lock(&self.shared.cursor);
        cursor.sent_upto = None;
        cursor.stuck_at = Some(self.upto);
    }
}

/// What the courier's calls in flight carry of one room: the highest own counter and the side
/// digest sent, and the newest call that carries them.
#[derive(Debug, Clone, Copy)]
struct Carried {
    own: u64,
    side: Option<[u8; 32]>,
    call: u64,
}

/// What the courier's calls in flight carry, by shard and room: the next call sends only what
/// comes after.
#[derive(Debug, Default)]
struct InFlight {
    shards: HashMap<ShardId, HashMap<RoomId, Carried>>,
}

impl InFlight {
    /// What calls in flight carry of `room`.
    fn get(&self, shard: ShardId, room: &RoomId) -> Option<Carried> {
        self.shards.get(&shard)?.get(room).copied()
    }

    /// Call `call` carries `room`'s own events up to `own`, and its side state of digest
    /// `side` if given.
    fn carry(&mut self, call: u64, shard: ShardId, room: RoomId, own: u64, side: Option<[u8; 32]>) {
        let entry = self.shards.entry(shard).or_default().entry(room).or_insert(Carried { own, side: None, call });
        entry.own = entry.own.max(own);
        entry.call = call;
        if side.is_some() {
            entry.side = side;
        }
    }

    /// Call `call` was answered (or failed): forget what it carried, unless a later call
    /// carries the room too.
    fn settle(&mut self, call: u64, carried: &[(ShardId, RoomId, u64)]) {
        for (shard, room, _) in carried {
            let Some(rooms) = self.shards.get_mut(shard) else { continue };
            if rooms.get(room).is_some_and(|carried| carried.call == call) {
                rooms.remove(room);
                if rooms.is_empty() {
                    self.shards.remove(shard);
                }
            }
        }
    }
}

/// A courier call on its way.
struct Call {
    id: u64,
    /// The rounds of the shards it carries.
    rounds: Vec<ShardRound>,
    /// The rooms it carries, by shard, with the highest own counter sent.
    carried: Vec<(ShardId, RoomId, u64)>,
}

/// A courier call and the peer's answer.
type Answered = (Call, Result<Vec<ShardPushed>, String>);

/// Pushes this replica's own changes of every shard it shares with one peer node, many
/// shards per call, up to [`COURIER_CALLS_IN_FLIGHT_MAX`] calls in flight.
struct Courier {
    node: Arc<NodeInner>,
    peer: NodeId,
    addr: String,
    shards: Arc<Mutex<BTreeMap<ShardId, Arc<PeerShard>>>>,
    wake: Arc<Notify>,
    stats: Arc<CourierStats>,
    stopped: watch::Receiver<bool>,
    /// Where the next look starts among the shards, moved on by every call: when calls are
    /// full, every shard still gets its turn at the front.
    start: usize,
    /// What the calls in flight carry.
    in_flight: InFlight,
    /// The id of the next call.
    next_call: u64,
}

impl Courier {
    async fn run(mut self) {
        let mut changes = self.node.replicas.crdt().own_changes();
        let mut changes_open = true;
        let (wake, mut stopped) = (self.wake.clone(), self.stopped.clone());
        let mut calls: FuturesOrdered<BoxFuture<'static, Answered>> = FuturesOrdered::new();
        // When each call in flight left, oldest first.
        let mut sent_at: VecDeque<tokio::time::Instant> = VecDeque::new();
        // After a failed call: no new call before then (a pusher's wake ends the wait sooner).
        let mut retry_at: Option<tokio::time::Instant> = None;
        // How long answers usually take (a moving average).
        let mut usual = Duration::ZERO;
        let mut stall = Duration::from_millis(COURIER_STALL_MS);
        // One call at a time (what changes meanwhile goes in the next: under load a call
        // carries many posts); one more once the oldest has waited `stall`.
        let may_send =
            |sent_at: &VecDeque<tokio::time::Instant>, retry_at: Option<tokio::time::Instant>, stall: Duration| {
                retry_at.is_none()
                    && match sent_at.front() {
                        None => true,
                        Some(oldest) => sent_at.len() < COURIER_CALLS_IN_FLIGHT_MAX && oldest.elapsed() >= stall,
                    }
            };
        loop {
            while may_send(&sent_at, retry_at, stall) {
                // Seen before the shards are read: a change from now on wakes the wait below.
                changes.borrow_and_update();
                match self.next_call().await {
                    Ok(Some(call)) => {
                        if !sent_at.is_empty() {
                            self.stats.after_stall.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        calls.push_back(call);
                        sent_at.push_back(tokio::time::Instant::now());
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "courier push failed");
                        retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(PUSH_RETRY_MS));
                    }
                }
            }
            let can_send = may_send(&sent_at, retry_at, stall);
            let stalls_at = match sent_at.front() {
                Some(oldest) if !can_send && retry_at.is_none() && sent_at.len() < COURIER_CALLS_IN_FLIGHT_MAX => {
                    Some(*oldest + stall)
                }
                _ => None,
            };
            let at = |instant: Option<tokio::time::Instant>| async move {
                match instant {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((call, answer)) = calls.next(), if !calls.is_empty() => {
                    if let Some(sent) = sent_at.pop_front() {
                        usual = (usual * 7 + sent.elapsed()) / 8;
                        stall = (usual * COURIER_STALL_FACTOR).max(Duration::from_millis(COURIER_STALL_MS));
                    }
                    if let Err(e) = self.settle(call, answer) {
                        tracing::debug!(peer = %self.peer, error = %e, "courier push failed");
                        retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(PUSH_RETRY_MS));
                    }
                }
                changed = changes.changed(), if changes_open && can_send => changes_open = changed.is_ok(),
                () = at(stalls_at) => {}
                () = wake.notified() => retry_at = None,
                () = at(retry_at) => retry_at = None,
                _ = stopped.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// The shards with own changes the peer may lack, from their cursors.
    fn open_shards(&self) -> Vec<ShardRound> {
        let mut shards: Vec<Arc<PeerShard>> = lock(&self.shards).values().cloned().collect();
        if !shards.is_empty() {
            let start = self.start % shards.len();
            shards.rotate_left(start);
        }
        shards
            .into_iter()
            .filter_map(|shared| {
                let cursor = *lock(&shared.cursor);
                let store = &shared.replica.crdt;
                let seq = store.change_seq();
                if cursor.awaiting_sync || cursor.stuck_at == Some(seq) {
                    return None;
                }
                let (rooms, upto) = match cursor.sent_upto {
                    Some(after) if seq == after => return None,
                    Some(after) => {
                        let (rooms, upto) = store.changed_since(after, COURIER_CHANGED_ROOMS_MAX);
                        (Some(rooms), upto)
                    }
                    None => (None, seq),
                };
                Some(ShardRound { shared, generation: cursor.generation, rooms, upto })
            })
            .collect()
    }

    /// The next call: what the peer lacks of this replica's own changes, over every shard
    /// (within the call's bounds), beyond what the calls in flight carry; or `None` if there
    /// is nothing to send. Moves the cursor of each shard the peer lacks nothing of (not
    /// even what is in flight).
    async fn next_call(&mut self) -> Result<Option<BoxFuture<'static, Answered>>, String> {
        let peer = ReplicaId(self.peer.0);
        let id = self.next_call;
        let (mut rounds, mut batch, mut carried) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rooms, mut events) = (0usize, 0usize);
        for shard in self.open_shards() {
            if rooms >= COURIER_ROOMS_PER_CALL_MAX || events >= COURIER_EVENTS_PER_CALL_MAX {
                break;
            }
            let limit = COURIER_ROOMS_PER_CALL_MAX - rooms;
            let behind = shard.behind(peer, limit);
            // Whether the peer lacks nothing beyond what the shard's pushes below hold.
            let mut whole = behind.len() < limit;
            let store = &shard.shared.replica.crdt;
            let (shard_id, me) = (store.shard(), store.replica());
            let mut shard_pushes = Vec::with_capacity(behind.len());
            for (room, mut base, side_behind) in behind {
                if events >= COURIER_EVENTS_PER_CALL_MAX {
                    whole = false;
                    break;
                }
                let in_flight = self.in_flight.get(shard_id, &room);
                if let Some(in_flight) = in_flight {
                    base.advance(Dot::new(me, in_flight.own));
                }
                let mut push = match room_push(store, room, &base, side_behind).await {
                    Ok(push) => push,
                    Err(e) => {
                        // This call never leaves: forget what it was to carry.
                        self.in_flight.settle(id, &carried);
                        return Err(e);
                    }
                };
                if let Some(in_flight) = in_flight {
                    if in_flight.side == Some(push.sender.side_digest) {
                        push.side = None;
                    }
                    if push.events.is_empty() && push.side.is_none() {
                        // All on its way already: the cursor moves once the answer is in.
                        whole = false;
                        continue;
                    }
                }
                let own = push.events.iter().map(|event| event.dot.counter).max().unwrap_or(base.get(me));
                let side = push.side.is_some().then_some(push.sender.side_digest);
                self.in_flight.carry(id, shard_id, push.room.clone(), own, side);
                carried.push((shard_id, push.room.clone(), own));
                events += push.events.len();
                shard_pushes.push(push);
            }
            if shard_pushes.is_empty() {
                if whole {
                    shard.finish();
                }
                continue;
            }
            rooms += shard_pushes.len();
            batch.push(ShardPush { shard: shard_id, rooms: shard_pushes });
            rounds.push(shard);
        }
        if rounds.is_empty() {
            return Ok(None);
        }
        self.start = self.start.wrapping_add(1);
        self.next_call = id.wrapping_add(1);
        let call = Call { id, rounds, carried };
        let (node, addr, stats) = (self.node.clone(), self.addr.clone(), self.stats.clone());
        Ok(Some(Box::pin(async move {
            let answer = send(&node, &addr, &stats, &batch, rooms, events).await;
            (call, answer)
        })))
    }

    /// Record the peer's answer to `call`. A shard whose push the peer took nothing of waits
    /// for its next change (or the pusher); a failed call fails every shard it carried: their
    /// pushers compare with the peer, and the courier looks at their every room next.
    fn settle(&mut self, call: Call, answer: Result<Vec<ShardPushed>, String>) -> Result<(), String> {
        let peer = ReplicaId(self.peer.0);
        self.in_flight.settle(call.id, &call.carried);
        let answers = match answer {
            Ok(answers) => answers,
            Err(e) => {
                for shard in &call.rounds {
                    shard.fail();
                }
                return Err(e);
            }
        };
        for shard in call.rounds {
            let store = &shard.shared.replica.crdt;
            let shard_id = store.shard();
            let answer = answers.iter().find(|answer| answer.shard == shard_id);
            match answer.map(|answer| &answer.result) {
                // The cursor moves once a later look finds the peer lacking nothing. An
                // earlier call's answer may already have told everything this one does.
                Some(Ok(copies))
                    if record_copies(store, peer, copies)
                        || holds_what_was_sent(copies, &call.carried, shard_id, store.replica()) => {}
                Some(Ok(_)) => {
                    // The peer took nothing (a refused or conflicting event): stop instead of
                    // spinning; anti-entropy and the shard's next change try again.
                    shard.park();
                    shard.shared.stuck.notify_one();
                }
                Some(Err(e)) => {
                    tracing::debug!(shard = %shard_id, peer = %self.peer, error = %e, "courier push refused");
                    shard.fail();
                }
                None => shard.fail(),
            }
        }
        Ok(())
    }
}

/// Whether the peer's `copies` of one shard's rooms hold every own event `carried` says the
/// call sent of them.
fn holds_what_was_sent(
    copies: &[RoomSummary],
    carried: &[(ShardId, RoomId, u64)],
    shard: ShardId,
    me: ReplicaId,
) -> bool {
    carried
        .iter()
        .filter(|(s, _, _)| *s == shard)
        .all(|(_, room, own)| copies.iter().any(|copy| copy.room == *room && copy.version_vector.get(me) >= *own))
}

/// Send one courier call.
async fn send(
    node: &NodeInner,
    addr: &str,
    stats: &CourierStats,
    batch: &[ShardPush],
    rooms: usize,
    events: usize,
) -> Result<Vec<ShardPushed>, String> {
    use std::sync::atomic::Ordering::Relaxed;
    let payload = keys::encode(&batch).map_err(|e| e.to_string())?;
    stats.calls.fetch_add(1, Relaxed);
    stats.rooms.fetch_add(rooms as u64, Relaxed);
    stats.events.fetch_add(events as u64, Relaxed);
    let link = node.replicas.peers().link(addr).map_err(|e| e.to_string())?;
    let request = CrdtBatchRequest { from: node.id.0, payload };
    decode_reply(link.crdt_batch(request)).await
}

/// Compare `peer`'s digest with this replica's index; if they agree, `peer` holds exactly what
/// the index lists, so record that. Returns the index and whether they agreed.
fn agree(store: &CrdtStore, peer: ReplicaId, digest: [u8; 32]) -> (Vec<RoomSummary>, bool) {
    let (all, mine) = store.index_snapshot();
    let agreed = digest == mine;
    if agreed {
        store.record_peer_listing(peer, &all, &RoomId(String::new()), None);
    }
    (all, agreed)
}

/// Handle a replication message from `from` for `store` (the receiving side).
pub async fn handle(store: &CrdtStore, from: NodeId, message: CrdtMessage, now_ms: u64) -> Result<CrdtAnswer, String> {
    let peer = ReplicaId(from.0);
    match message {
        CrdtMessage::Push(pushes) => {
            let (senders, rooms) = split_pushes(pushes);
            let copies = store.apply_remote_rooms(rooms, now_ms).await.map_err(|e| e.to_string())?;
            record_senders(store, peer, senders);
            Ok(CrdtAnswer::Pushed(copies))
        }
        CrdtMessage::Digest(digest) => {
            let (_, agreed) = agree(store, peer, digest);
            Ok(if agreed { CrdtAnswer::InSync } else { CrdtAnswer::Differs })
        }
        CrdtMessage::Sync { digest, from: start, to, rooms } => {
            let (all, agreed) = agree(store, peer, digest);
            if agreed {
                return Ok(CrdtAnswer::InSync);
            }
            store.record_peer_listing(peer, &rooms, &start, to.as_ref());
            let listing = all
                .into_iter()
                .filter(|summary| summary.room >= start && to.as_ref().is_none_or(|to| summary.room < *to))
                .collect();
            Ok(CrdtAnswer::Listing(listing))
        }
    }
}

/// A push's rooms to apply, and what the sender holds of each.
type SplitPushes = (Vec<(RoomId, RoomSummary)>, Vec<(RoomId, Vec<Event>, Option<SideState>)>);

fn split_pushes(pushes: Vec<RoomPush>) -> SplitPushes {
    pushes.into_iter().map(|push| ((push.room.clone(), push.sender), (push.room, push.events, push.side))).unzip()
}

/// Record what the sender of a push holds of each room (once its rooms are durable here).
fn record_senders(store: &CrdtStore, peer: ReplicaId, senders: Vec<(RoomId, RoomSummary)>) {
    for (room, sender) in senders {
        store.record_peer(peer, &room, &sender.version_vector, Some(sender.side_digest));
    }
}

/// Handle a courier call from `from` (the receiving side): every shard's rooms are applied and
/// written, then fsynced once for all of them. `shards` pairs each shard's part with its
/// store here, or why there is none; a shard that fails is answered with its error, and the
/// others still count.
pub async fn handle_batch(
    shards: Vec<(ShardPush, Result<CrdtStore, String>)>,
    from: NodeId,
    now_ms: u64,
) -> Vec<ShardPushed> {
    let peer = ReplicaId(from.0);
    let mut answers = Vec::with_capacity(shards.len());
    let mut staged = Vec::with_capacity(shards.len());
    let mut wrote = false;
    for (push, store) in shards {
        let shard = push.shard;
        let store = match store {
            Ok(store) => store,
            Err(e) => {
                answers.push(ShardPushed { shard, result: Err(e) });
                continue;
            }
        };
        let (senders, rooms) = split_pushes(push.rooms);
        match store.stage_remote_rooms(rooms, now_ms).await {
            Ok(rooms) => {
                wrote |= rooms.wrote();
                staged.push((shard, store, senders, rooms));
            }
            Err(e) => answers.push(ShardPushed { shard, result: Err(e.to_string()) }),
        }
    }
    // One fsync for every shard: the stores share the node's engine and group commit.
    let synced = match staged.first() {
        Some((_, store, _, _)) if wrote => store.sync().await.map_err(|e| e.to_string()),
        _ => Ok(()),
    };
    for (shard, store, senders, rooms) in staged {
        let result = synced.clone().and_then(|()| store.publish_remote_rooms(rooms).map_err(|e| e.to_string()));
        if result.is_ok() {
            record_senders(&store, peer, senders);
        }
        answers.push(ShardPushed { shard, result });
    }
    answers
}

#[cfg(test)]
mod tests {
    use palaver_crdt::{EventKind, MessageId};
    use palaver_ids::UserName;
    use palaver_shard::{GroupCommit, KvEngine, MemEngine, NodeCrdt};

    use super::*;

    fn store(replica: u64) -> CrdtStore {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::new());
        let group_commit = GroupCommit::start(engine.clone());
        CrdtStore::open(ShardId(1), ReplicaId(replica), engine, group_commit, NodeCrdt::new()).expect("open")
    }

    /// The stores of `shards` on one node: one engine, one group commit, one `NodeCrdt`.
    fn node_stores(replica: u64, shards: &[u32]) -> (NodeCrdt, Vec<CrdtStore>) {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::new());
        let group_commit = GroupCommit::start(engine.clone());
        let node = NodeCrdt::new();
        let stores = shards
            .iter()
            .map(|shard| {
                CrdtStore::open(ShardId(*shard), ReplicaId(replica), engine.clone(), group_commit.clone(), node.clone())
                    .expect("open")
            })
            .collect();
        (node, stores)
    }

    fn post(room: &RoomId, cid: &str) -> EventKind {
        let ada = UserName("ada".into());
        EventKind::Post {
            message_id: MessageId::derive(room, &ada, cid),
            client_message_id: cid.into(),
            body: "hi".into(),
        }
    }

    #[tokio::test]
    async fn one_courier_call_carries_many_shards_and_a_failed_shard_fails_alone() {
        let (sender_node, senders) = node_stores(1, &[1, 2]);
        let (_, receivers) = node_stores(2, &[1, 2]);
        let mut own_changes = sender_node.own_changes();
        own_changes.borrow_and_update();
        let room = RoomId("general".into());
        let ada = UserName("ada".into());
        let mut batch = Vec::new();
        for (i, sender) in senders.iter().enumerate() {
            sender.write_local(&room, ada.clone(), post(&room, &format!("c{i}")), 1_000, None).await.expect("write");
            let events = sender.room(&room).await.expect("room").durable_delta(&VersionVector::new(), usize::MAX);
            let push = RoomPush { room: room.clone(), sender: sender_summary(sender, &room), events, side: None };
            batch.push((ShardPush { shard: sender.shard(), rooms: vec![push] }, Ok(receivers[i].clone())));
        }
        assert!(own_changes.has_changed().expect("signal"), "a local write on any store bumps the node's signal");
        batch.push((ShardPush { shard: ShardId(3), rooms: Vec::new() }, Err("no replica of shard 3".to_string())));

        let answers = handle_batch(batch, NodeId(1), 1_000).await;
        assert_eq!(answers.len(), 3);
        for (i, receiver) in receivers.iter().enumerate() {
            let answer = answers.iter().find(|a| a.shard == receiver.shard()).expect("answered");
            let copies = answer.result.as_ref().expect("applied");
            let held = receiver.room(&room).await.expect("room").durable();
            assert_eq!(copies.len(), 1);
            assert_eq!(copies[0].version_vector, held, "the answer is the durable copy");
            assert_eq!(held.get(ReplicaId(1)), 1, "shard {} holds the sender's post", i + 1);
            assert!(
                receiver.rooms_behind(ReplicaId(1), 10, PushScope::All).is_empty(),
                "the push told the receiver what the sender holds"
            );
        }
        let failed = answers.iter().find(|a| a.shard == ShardId(3)).expect("answered");
        assert_eq!(failed.result, Err("no replica of shard 3".to_string()));
    }

    /// A room in two calls in flight: the first answer leaves the second call's record, the
    /// second removes it; a side digest sent stays recorded while a later call carries only
    /// events.
    #[test]
    fn what_calls_in_flight_carry_is_kept_until_the_last_of_them_is_answered() {
        let (shard, room) = (ShardId(3), RoomId("general".into()));
        let mut in_flight = InFlight::default();
        assert!(in_flight.get(shard, &room).is_none());
        in_flight.carry(0, shard, room.clone(), 5, Some([7; 32]));
        in_flight.carry(1, shard, room.clone(), 8, None);
        let carried = in_flight.get(shard, &room).expect("in flight");
        assert_eq!((carried.own, carried.side, carried.call), (8, Some([7; 32]), 1));
        in_flight.settle(0, &[(shard, room.clone(), 5)]);
        assert_eq!(in_flight.get(shard, &room).map(|c| c.own), Some(8), "call 1 still carries the room");
        assert!(in_flight.get(ShardId(4), &room).is_none(), "rooms are per shard");
        in_flight.settle(1, &[(shard, room.clone(), 8)]);
        assert!(in_flight.get(shard, &room).is_none());
    }

    /// An answer that adds nothing to what an earlier answer told still counts as taken when
    /// the peer holds every own event the call sent; one that holds less does not.
    #[test]
    fn an_answer_counts_as_taken_when_the_peer_holds_what_the_call_sent() {
        let me = ReplicaId(1);
        let (shard, room) = (ShardId(3), RoomId("general".into()));
        let copy = |counter| RoomSummary {
            room: room.clone(),
            version_vector: VersionVector::from(BTreeMap::from([(me, counter)])),
            side_digest: [0; 32],
        };
        let sent = [(shard, room.clone(), 8), (ShardId(4), RoomId("other".into()), 99)];
        assert!(holds_what_was_sent(&[copy(8)], &sent, shard, me));
        assert!(holds_what_was_sent(&[copy(9)], &sent, shard, me));
        assert!(!holds_what_was_sent(&[copy(7)], &sent, shard, me));
        assert!(!holds_what_was_sent(&[], &sent, shard, me));
    }

    #[tokio::test]
    async fn a_digest_alone_settles_agreement_and_a_difference_asks_for_listings() {
        let (a, b) = (store(1), store(2));
        let room = RoomId("general".into());
        let ada = UserName("ada".into());
        a.write_local(&room, ada, post(&room, "c1"), 1_000, None).await.expect("write");
        let answer = handle(&b, NodeId(1), CrdtMessage::Digest(a.digest()), 1_000).await.expect("digest");
        assert_eq!(answer, CrdtAnswer::Differs);
        let events = a.room(&room).await.expect("room").durable_delta(&VersionVector::new(), usize::MAX);
        b.apply_remote(&room, events, None, 1_000).await.expect("apply");
        let answer = handle(&b, NodeId(1), CrdtMessage::Digest(a.digest()), 1_000).await.expect("digest");
        assert_eq!(answer, CrdtAnswer::InSync);
        assert!(
            b.rooms_behind(ReplicaId(1), 10, PushScope::All).is_empty(),
            "agreement tells b what a holds: nothing to push"
        );
    }
}
