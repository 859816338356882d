//! CRDT replication between the replicas of each shard: pushes and anti-entropy.
//!
//! For every local replica and every other member of its Raft group, one task (a *pusher*)
//! keeps that peer's copy of the shard's rooms up to date:
//!
//! - **Push (own events).** When the shard's store changes (a durable event, a side-state
//!   change), the pusher sends each room the peer lacks something of this replica's own
//!   writing: the durable events this replica stamped after the peer's known version vector (at
//!   most [`PUSH_EVENTS_PER_ROOM_MAX`] per room, [`PUSH_ROOMS_MAX`] rooms per call) and the side
//!   state if its digest differs. The peer applies, fsyncs and answers with its copy, which the
//!   pusher records — that record is what `quorum` acknowledgements wait on. Every replica
//!   pushes its own writes to every peer, so a third replica's events reach the peer from that
//!   replica; relaying them at once too would send each event to each peer twice (measured:
//!   about as many duplicates as new events).
//! - **Relay.** When a third replica's events arrive here, the pusher looks again
//!   [`RELAY_GRACE_MS`] later (it does not wake for them at once). If the peer still seems to
//!   lack some (that writer died, or a partition cut it off from the peer), it asks the peer
//!   what it holds of those rooms (a push without events), then sends what it really lacks,
//!   whoever wrote it.
//! - **Anti-entropy.** At once after a failed call (so after a partition heals or a peer
//!   restarts), and periodically, the pusher sends the peer a digest of every room's version
//!   vector (a digest alone: nothing else crosses the wire while the two agree); if they
//!   differ, the two exchange listings of their rooms in pages of [`SYNC_ROOMS_PER_PAGE`], and
//!   each side then relays what the other lacks. The period starts at
//!   [`ANTI_ENTROPY_INTERVAL_MS`] and doubles, up to [`ANTI_ENTROPY_INTERVAL_MAX_MS`], for as
//!   long as each comparison finds the two in agreement (pushes keep them there; the digest is
//!   the safety net), so a quiet replica's cost is not O(rooms) every second.
//!
//! Both directions run: each replica's pushers feed its peers, and a push also tells the
//! receiver what the sender holds (which is how a replica mostly learns that a peer got a third
//! replica's events).
//!
//! Every loop is bounded and every call has a deadline ([`CRDT_CALL_TIMEOUT_MS`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use palaver_crdt::{Event, ReplicaId, VersionVector};
use palaver_ids::{NodeId, RoomId, ShardId};
use palaver_proto::v1::CrdtRequest;
use palaver_shard::{CrdtStore, PushScope, Replica, RoomSummary, SideState, keys};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::node::NodeInner;

/// How soon a pusher compares digests with its peer again after they differed.
pub const ANTI_ENTROPY_INTERVAL_MS: u64 = 1_000;
/// The longest pause between two digest comparisons while they keep agreeing.
pub const ANTI_ENTROPY_INTERVAL_MAX_MS: u64 = 32_000;
/// Most rooms in one push call.
pub const PUSH_ROOMS_MAX: usize = 64;
/// Most events of one room in one push call.
pub const PUSH_EVENTS_PER_ROOM_MAX: usize = 512;
/// Most push calls in one round before the pusher yields to anti-entropy and new changes.
pub const PUSH_CALLS_PER_ROUND_MAX: usize = 64;
/// Rooms per page of an anti-entropy listing.
pub const SYNC_ROOMS_PER_PAGE: usize = 1_024;
/// Deadline of one replication call.
pub const CRDT_CALL_TIMEOUT_MS: u64 = 5_000;
/// Pause after a failed call before the pusher tries that peer again.
pub const PUSH_RETRY_MS: u64 = 200;
/// How long a peer may seem to lack a third replica's events before this replica relays them
/// (after asking the peer what it holds). That replica pushes its own writes, so the gap
/// normally closes by itself well within this; the relay is for writers that died or were cut
/// off from the peer.
pub const RELAY_GRACE_MS: u64 = 1_000;

const _: () = assert!(PUSH_RETRY_MS < ANTI_ENTROPY_INTERVAL_MS);
const _: () = assert!(RELAY_GRACE_MS <= ANTI_ENTROPY_INTERVAL_MAX_MS);
const _: () = assert!(ANTI_ENTROPY_INTERVAL_MS <= ANTI_ENTROPY_INTERVAL_MAX_MS);

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

/// The pusher tasks of a node, by (shard, peer).
#[derive(Debug, Default)]
pub struct Replication {
    tasks: Mutex<BTreeMap<(ShardId, NodeId), JoinHandle<()>>>,
}

impl Replication {
    /// Start a pusher for every (local replica, other group member) that has none, and stop
    /// those whose peer left the group.
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
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|key, task| {
            let keep = wanted.contains_key(key) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (replica, addr)) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            let pusher = Pusher { node: node.clone(), replica, peer: key.1, addr, stopped: stopped.clone() };
            tasks.insert(key, tokio::spawn(pusher.run()));
        }
    }

    /// Stop every pusher and wait for them.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner())).into_values().collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
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
    /// This replica's own events or side state changed.
    Push,
    /// Peers' events arrived here.
    Received,
}

/// Keeps one peer's copy of one shard's rooms up to date.
struct Pusher {
    node: Arc<NodeInner>,
    replica: Replica,
    peer: NodeId,
    addr: String,
    stopped: watch::Receiver<bool>,
}

impl Pusher {
    async fn run(mut self) {
        let store = self.replica.crdt.clone();
        let peer = ReplicaId(self.peer.0);
        let mut changes = store.changes();
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
        // Whether this replica's own events or side state may have moved since the last round.
        let mut push_due = true;
        // The change sequence number up to which the peer has been sent every own change;
        // `None`: look at every room (at start, after anti-entropy, after a stuck round).
        let mut cursor: Option<u64> = None;
        loop {
            if sync_due {
                match self.sync(&store).await {
                    Ok(agreed) => {
                        sync_due = false;
                        interval = if agreed { (interval * 2).min(longest) } else { shortest };
                        next_sync = tokio::time::Instant::now() + interval;
                        // The listing just told what the peer holds: relay what it lacks now.
                        relay_now |= !agreed;
                        push_due = true;
                        cursor = None;
                    }
                    Err(e) => {
                        interval = shortest;
                        tracing::debug!(shard = %store.shard(), peer = %self.peer, error = %e, "anti-entropy failed")
                    }
                }
            }
            if !sync_due && (push_due || relay_now) {
                push_due = false;
                let relaying = relay_now;
                let round = if relaying { self.relay(&store).await } else { self.push_own(&store, &mut cursor).await };
                match round {
                    Ok(Pushed::Done) => {}
                    Ok(Pushed::Stuck) => {
                        // The peer took nothing of what it seems to lack: compare soon.
                        cursor = None;
                        interval = shortest;
                        next_sync = next_sync.min(tokio::time::Instant::now() + interval);
                    }
                    Err(e) => {
                        tracing::debug!(shard = %store.shard(), peer = %self.peer, error = %e, "push failed");
                        sync_due = true;
                    }
                }
                if !sync_due && relaying {
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
                    changed = changes.changed() => if changed.is_err() { Wake::Sync } else { Wake::Push },
                    changed = received.changed() => if changed.is_err() { Wake::Sync } else { Wake::Received },
                }
            };
            tokio::select! {
                wake = pause => match wake {
                    Wake::Sync => sync_due = true,
                    Wake::Relay => relay_now = true,
                    Wake::Push => push_due = true,
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

    async fn call(&self, message: &CrdtMessage) -> Result<CrdtAnswer, String> {
        let link = self.node.replicas.peers().link(&self.addr).map_err(|e| e.to_string())?;
        let payload = keys::encode(message).map_err(|e| e.to_string())?;
        let request = CrdtRequest { shard: self.replica.shard.0, from: self.node.id.0, payload };
        let call = link.crdt(request);
        let reply = tokio::time::timeout(Duration::from_millis(CRDT_CALL_TIMEOUT_MS), call)
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        keys::decode(&reply.payload).map_err(|e| e.to_string())
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

    /// This replica's durable copy of `room`, sent with a push so that the receiver knows what
    /// the sender holds.
    fn sender_summary(store: &CrdtStore, room: &RoomId) -> RoomSummary {
        let sender = store.summaries(Some(room), 1).into_iter().next().filter(|s| s.room == *room);
        sender.unwrap_or_else(|| RoomSummary {
            room: room.clone(),
            version_vector: VersionVector::new(),
            side_digest: [0; 32],
        })
    }

    /// Push until the peer lacks nothing within `scope` (or the round's bound is reached).
    async fn push(&self, store: &CrdtStore, scope: PushScope) -> Result<Pushed, String> {
        let peer = ReplicaId(self.peer.0);
        for _ in 0..PUSH_CALLS_PER_ROUND_MAX {
            let behind = store.rooms_behind(peer, PUSH_ROOMS_MAX, scope);
            if behind.is_empty() {
                return Ok(Pushed::Done);
            }
            let pushes = self.pushes(store, behind).await?;
            if !self.send_pushes(store, pushes).await? {
                // The peer took nothing (a refused or conflicting event): stop instead of
                // spinning; anti-entropy and the next change try again.
                return Ok(Pushed::Stuck);
            }
        }
        Ok(Pushed::Done)
    }

    /// Push this replica's own events and side state: of every room when `cursor` is `None`,
    /// else of the rooms changed since `cursor` only (no scan of the shard's whole index);
    /// moves `cursor` past what the peer now holds.
    async fn push_own(&self, store: &CrdtStore, cursor: &mut Option<u64>) -> Result<Pushed, String> {
        let peer = ReplicaId(self.peer.0);
        let Some(after) = *cursor else {
            let upto = store.change_seq();
            let pushed = self.push(store, PushScope::Own).await?;
            if matches!(pushed, Pushed::Done) && store.rooms_behind(peer, 1, PushScope::Own).is_empty() {
                *cursor = Some(upto);
            }
            return Ok(pushed);
        };
        let (rooms, upto) = store.changed_since(after, PUSH_ROOMS_MAX * PUSH_CALLS_PER_ROUND_MAX);
        for _ in 0..PUSH_CALLS_PER_ROUND_MAX {
            let mut behind = store.own_rooms_behind_among(peer, &rooms);
            if behind.is_empty() {
                *cursor = Some(upto);
                return Ok(Pushed::Done);
            }
            behind.truncate(PUSH_ROOMS_MAX);
            let pushes = self.pushes(store, behind).await?;
            if !self.send_pushes(store, pushes).await? {
                return Ok(Pushed::Stuck);
            }
        }
        // Rooms left behind: the next round looks at every room.
        *cursor = None;
        Ok(Pushed::Done)
    }

    /// The pushes for `behind` (as [`CrdtStore::rooms_behind`] lists rooms).
    async fn pushes(
        &self,
        store: &CrdtStore,
        behind: Vec<(RoomId, VersionVector, bool)>,
    ) -> Result<Vec<RoomPush>, String> {
        let mut pushes = Vec::with_capacity(behind.len());
        for (room, base, side_behind) in behind {
            let cell = store.room(&room).await.map_err(|e| e.to_string())?;
            let events = cell.durable_delta(&base, PUSH_EVENTS_PER_ROOM_MAX);
            let side = if side_behind { Some(cell.lock().side.clone()) } else { None };
            let sender = Self::sender_summary(store, &room);
            pushes.push(RoomPush { room, sender, events, side });
        }
        Ok(pushes)
    }

    /// Relay third replicas' events the peer still seems to lack. Ask first (a push without
    /// events, answered with the peer's copy): their writers have most likely delivered them
    /// since, and this replica's record of the peer only learns that from the peer.
    async fn relay(&self, store: &CrdtStore) -> Result<Pushed, String> {
        let peer = ReplicaId(self.peer.0);
        let probes: Vec<RoomPush> = store
            .rooms_behind(peer, PUSH_ROOMS_MAX, PushScope::All)
            .into_iter()
            .map(|(room, _, _)| RoomPush {
                sender: Self::sender_summary(store, &room),
                room,
                events: Vec::new(),
                side: None,
            })
            .collect();
        if !probes.is_empty() {
            self.send_pushes(store, probes).await?;
        }
        self.push(store, PushScope::All).await
    }

    /// Send one push call and record the peer's answer; returns whether that was news.
    async fn send_pushes(&self, store: &CrdtStore, pushes: Vec<RoomPush>) -> Result<bool, String> {
        let peer = ReplicaId(self.peer.0);
        let CrdtAnswer::Pushed(copies) = self.call(&CrdtMessage::Push(pushes)).await? else {
            return Err("unexpected answer to a push".into());
        };
        let mut progressed = false;
        for copy in &copies {
            progressed |= store.set_peer(peer, &copy.room, &copy.version_vector, copy.side_digest);
        }
        Ok(progressed)
    }
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
            let (senders, rooms): (Vec<_>, Vec<_>) = pushes
                .into_iter()
                .map(|push| ((push.room.clone(), push.sender), (push.room, push.events, push.side)))
                .unzip();
            let copies = store.apply_remote_rooms(rooms, now_ms).await.map_err(|e| e.to_string())?;
            for (room, sender) in senders {
                store.record_peer(peer, &room, &sender.version_vector, Some(sender.side_digest));
            }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use palaver_crdt::{EventKind, HlcClock, MessageId};
    use palaver_ids::UserName;
    use palaver_shard::{GroupCommit, KvEngine, MemEngine};

    use super::*;

    fn store(replica: u64) -> CrdtStore {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::new());
        let group_commit = GroupCommit::start(engine.clone());
        CrdtStore::open(ShardId(1), ReplicaId(replica), engine, group_commit, Arc::new(Mutex::new(HlcClock::new())))
            .expect("open")
    }

    #[tokio::test]
    async fn a_digest_alone_settles_agreement_and_a_difference_asks_for_listings() {
        let (a, b) = (store(1), store(2));
        let room = RoomId("general".into());
        let ada = UserName("ada".into());
        let kind = EventKind::Post {
            message_id: MessageId::derive(&room, &ada, "c1"),
            client_message_id: "c1".into(),
            body: "hi".into(),
        };
        a.write_local(&room, ada, kind, 1_000, None).await.expect("write");
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
