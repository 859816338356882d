//! The CRDT store of one shard replica: every room's event log, read markers, presence and
//! typing, kept in the node's engine, and what this replica knows of its peers' copies.
//!
//! ## What it stores
//! - `room_events`: every event of every room, keyed `shard | room | hlc | replica | counter`
//!   (see [`crate::keys`]), so a key scan is a history scan in the room's total order.
//! - `room_state`: per room, the version vector of the events held (written in the same batch
//!   as the events) and the read markers.
//!
//! A room's [`RoomLog`] is loaded into memory on first use; the version vectors of all rooms of
//! the shard (the *index*) are loaded when the replica starts, so anti-entropy can compare rooms
//! without loading their logs. At most [`ROOMS_LOADED_MAX`] rooms stay loaded per replica: past
//! that, the least recently used rooms that nobody holds (no subscriber, no write in flight)
//! and that have no presence or typing (which live only in memory) are dropped from memory, and
//! loaded again from the engine on their next use.
//!
//! ## Write path
//! [`CrdtStore::write_local`] stamps an event (the replica's next dot, an HLC after everything
//! the room holds and after what the client had seen), writes it to the engine and applies it
//! under the room's lock — so a replica's events reach the disk in counter order — then waits
//! for the node's group-commit fsync. Only then does the event count as *durable*: subscribers
//! and peers are only ever sent a replica's own events once they are durable there, so an own
//! event that a crash loses was never seen by anyone, and its dot can be issued again safely.
//!
//! [`CrdtStore::apply_remote`] applies a peer's events in the issuer's counter order (a gap stops
//! the batch; anti-entropy fills it), persists them, fsyncs, and answers with the durable version
//! vector, which the sender records as this replica's copy ([`CrdtStore::record_peer`]). The
//! peer's events are *visible* to subscribers as soon as they are applied, before that fsync:
//! the peer fsynced them before sending, so a subscriber waits for one replica's fsync, not two.
//!
//! ## Guarantees
//! - Gapless: on disk and in memory, a room holds exactly `R:1..=vv[R]` of every replica `R`.
//! - A durable event is on disk (fsynced); a peer's recorded version vector only covers events
//!   that peer reported durable.
//! - A visible event (sent to subscribers) is durable here or on the peer it came from.
//! - Every change of durable state or side state bumps [`CrdtStore::changes`] (own changes,
//!   the node's signal) or [`CrdtStore::received`] (peers' events), which the
//!   replication tasks and subscribers watch.
//!
//! ## Non-goals (for now)
//! Windowing a room's log over disk (a loaded room keeps all its events in memory), and garbage
//! collection of tombstones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use palaver_crdt::{
    Applied, CrdtError, Dot, Event, EventKind, Hlc, HlcClock, MessageId, Position, PresenceMap, ReadMarkers, ReplicaId,
    RoomLog, TypingMap, VersionVector,
};
use palaver_ids::{RoomId, ShardId, UserName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use crate::engine::{Cf, KvEngine, WriteBatch};
use crate::error::StorageError;
use crate::keys::{self, RoomStateTag};
use crate::log_store::GroupCommit;

/// Most events read from the engine per scan while loading a room.
pub const ROOM_LOAD_SCAN_EVENTS: usize = 4_096;
/// Rooms kept loaded per replica before idle ones are dropped from memory.
pub const ROOMS_LOADED_MAX: usize = 512;
/// Eviction drops idle rooms until this many are loaded (so it runs once per many loads).
pub const ROOMS_LOADED_AFTER_EVICTION: usize = ROOMS_LOADED_MAX * 7 / 8;
/// Side events (presence, typing, read markers) buffered per room for slow subscribers; a
/// subscriber that falls further behind is sent the full side state instead.
pub const SIDE_EVENTS_BUFFERED_PER_ROOM: usize = 256;

/// Why a CRDT operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The engine failed or returned corrupt data: fatal for this replica.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The CRDT refused the operation (clock drift, a gap, a conflicting dot).
    #[error(transparent)]
    Crdt(#[from] CrdtError),
    /// The node is shutting down: its stores issue no more dots in this life
    /// ([`NodeCrdt::seal`]).
    #[error("shard {shard}: the node is shutting down")]
    Closed {
        /// The store's shard.
        shard: ShardId,
    },
}

/// The state of a room that is not in its event log: read markers, presence and typing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideState {
    /// How far each member has read.
    pub markers: ReadMarkers,
    /// Who is online, away or offline.
    pub presence: PresenceMap,
    /// Who is typing.
    pub typing: TypingMap,
}

/// Which of a peer's gaps a push fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushScope {
    /// This replica's own events (and side state). Every replica pushes its own writes to
    /// every peer, so this is the eager push: a peer lacking a third replica's events is, as a
    /// rule, being sent them by that replica, and relaying them too would send each event to
    /// each peer twice.
    Own,
    /// Everything the peer is known to lack, whoever wrote it: the relay, for events whose
    /// writer could not deliver them (it died, or a partition cut it off from the peer).
    All,
}

/// A change of a room's side state, for subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideChange {
    /// The side state changed; here is all of it (small: one entry per member).
    State(Arc<SideState>),
}

/// One room, loaded.
#[derive(Debug)]
pub struct RoomCell {
    state: Mutex<RoomState>,
    /// The store's use counter when the room was last asked for (for eviction).
    last_used: std::sync::atomic::AtomicU64,
    /// What is fsynced here: pushes to peers send only this, and quorum counts only this.
    durable: watch::Sender<VersionVector>,
    /// What subscribers may be sent: `durable`, and peers' events applied here whose fsync
    /// here may still be running. A peer sends only what it has fsynced, so every visible
    /// event is durable on at least one replica; a subscriber does not wait for a second
    /// replica's fsync.
    visible: watch::Sender<VersionVector>,
    side: broadcast::Sender<SideChange>,
}

/// A loaded room's log and side state. Held briefly under the room's lock.
#[derive(Debug)]
pub struct RoomState {
    /// The event log and the messages it shows.
    pub log: RoomLog,
    /// Read markers, presence and typing.
    pub side: SideState,
}

impl RoomCell {
    /// Lock the room's state. Never held across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The version vector of the durable events.
    pub fn durable(&self) -> VersionVector {
        self.durable.borrow().clone()
    }

    /// Watch the durable version vector.
    pub fn watch_durable(&self) -> watch::Receiver<VersionVector> {
        self.durable.subscribe()
    }

    /// Subscribe to side-state changes.
    pub fn subscribe_side(&self) -> broadcast::Receiver<SideChange> {
        self.side.subscribe()
    }

    /// Up to `limit` durable events that a holder of `have` lacks, each replica's in counter
    /// order.
    pub fn durable_delta(&self, have: &VersionVector, limit: usize) -> Vec<Event> {
        let durable = self.durable();
        self.lock().log.delta_between(have, &durable, limit)
    }

    /// Watch the version vector of the events subscribers may be sent (see
    /// [`RoomCell::visible_delta`]).
    pub fn watch_visible(&self) -> watch::Receiver<VersionVector> {
        self.visible.subscribe()
    }

    /// Up to `limit` events for a subscriber holding `have`, each replica's in counter order:
    /// the durable ones, and peers' events applied here (durable on the peer that sent them)
    /// whose fsync here may still be running.
    pub fn visible_delta(&self, have: &VersionVector, limit: usize) -> Vec<Event> {
        let visible = self.visible.borrow().clone();
        self.lock().log.delta_between(have, &visible, limit)
    }

    /// Make `version_vector` visible to subscribers (a merge: visibility only grows).
    fn show(&self, version_vector: &VersionVector) {
        self.visible.send_if_modified(|visible| {
            if visible.dominates(version_vector) {
                return false;
            }
            visible.merge(version_vector);
            true
        });
    }
}

/// What a local write produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The event's place in the room (for a retried post: the first post's).
    pub position: Position,
    /// The message the event is about.
    pub message_id: MessageId,
    /// Whether this was a retry of a post the room already holds.
    pub duplicate: bool,
}

/// What [`CrdtStore::stamp_and_write`] did.
#[derive(Debug)]
enum Stamped {
    /// The post was already there.
    Retry(Written),
    /// A new event, written; the room's version vector after it.
    New(Written, VersionVector),
}

/// A peer replica's copy of a room, as far as this replica knows.
#[derive(Debug, Clone, Default)]
struct PeerKnowledge {
    /// Whether a full anti-entropy exchange with this peer completed since start: rooms it did
    /// not list are then known to be empty there.
    synced: bool,
    rooms: BTreeMap<RoomId, VersionVector>,
    side_digests: BTreeMap<RoomId, [u8; 32]>,
}

/// One room in an anti-entropy summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    /// The room.
    pub room: RoomId,
    /// Its durable version vector.
    pub version_vector: VersionVector,
    /// A digest of its read markers and presence.
    pub side_digest: [u8; 32],
}

/// The CRDT store of one shard replica. Cloning shares it.
#[derive(Debug, Clone)]
pub struct CrdtStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    shard: ShardId,
    /// The id this store issues dots under in this life of the node.
    replica: ReplicaId,
    /// The node's own key among `peers` (its bare node id): never counted as a peer.
    node_key: ReplicaId,
    engine: Arc<dyn KvEngine>,
    group_commit: GroupCommit,
    node: NodeCrdt,
    rooms: Mutex<BTreeMap<RoomId, Arc<RoomCell>>>,
    /// Bumped on every `room` call: the clock of least-recent use.
    uses: std::sync::atomic::AtomicU64,
    /// Every room with events or side state, and its durable version vector and side digest.
    index: Mutex<BTreeMap<RoomId, (VersionVector, [u8; 32])>>,
    /// Rooms with own events written and shared but not yet durable: the last such counter.
    /// The couriers push own events up to it (the index holds only durable ones).
    shared_own: Mutex<BTreeMap<RoomId, u64>>,
    peers: Mutex<BTreeMap<ReplicaId, PeerKnowledge>>,
    changed_rooms: Mutex<ChangedRooms>,
    received: watch::Sender<u64>,
    acks: watch::Sender<u64>,
    received_events: ReceivedCounters,
}

/// What the CRDT stores of one node share: the node's hybrid clock, and a signal that any of
/// them has own changes to push (what the node's couriers, one per peer node, wait on).
#[derive(Debug, Clone)]
pub struct NodeCrdt {
    clock: Arc<Mutex<HlcClock>>,
    own_changes: Arc<watch::Sender<u64>>,
    /// Which life of the node this is (0: not counted, as in tests); its stores issue dots
    /// under [`ReplicaId::incarnation`] of it.
    life: u64,
    /// Whether the life is sealed ([`NodeCrdt::seal`]). A store holds the read side from
    /// stamping an own event until the event is written to the engine.
    sealed: Arc<RwLock<bool>>,
}

impl Default for NodeCrdt {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeCrdt {
    /// A fresh clock and signal, for one node whose starts are not counted (its stores issue
    /// dots under the bare node id).
    pub fn new() -> Self {
        Self::for_life(0)
    }

    /// A fresh clock and signal, for the `life`-th life of a node (counted and fsynced before
    /// any store opens; a life ends with a crash, or with [`NodeCrdt::seal`]).
    pub fn for_life(life: u64) -> Self {
        Self {
            clock: Arc::new(Mutex::new(HlcClock::new())),
            own_changes: Arc::new(watch::channel(0).0),
            life,
            sealed: Arc::new(RwLock::new(false)),
        }
    }

    /// This life's number.
    pub fn life(&self) -> u64 {
        self.life
    }

    /// End this life's own writes: from now on the node's stores refuse to stamp an event
    /// ([`StoreError::Closed`]). Returns once every event stamped before is written to the
    /// engine, so that an engine fsync after it makes every dot this life issued durable; only
    /// then may the next start of the node reuse the life (and issue dots after them).
    pub fn seal(&self) {
        *self.sealed.write().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
    }

    /// The replica id under which the stores of `node` issue dots in this life.
    pub fn replica_of(&self, node: u64) -> ReplicaId {
        ReplicaId::incarnation(node, self.life)
    }

    /// Bumped on every own change of any store of the node ([`CrdtStore::changes`]).
    pub fn own_changes(&self) -> watch::Receiver<u64> {
        self.own_changes.subscribe()
    }
}

/// A peer's events applied and written but not yet fsynced
/// ([`CrdtStore::stage_remote_rooms`]); [`CrdtStore::publish_remote_rooms`] makes them
/// durable once the node's group commit has fsynced.
#[derive(Debug)]
pub struct StagedRooms {
    applied: Vec<(RoomId, Arc<RoomCell>, VersionVector, bool)>,
    wrote: bool,
}

impl StagedRooms {
    /// Whether an fsync must come before publishing: something was written, or a room holds
    /// events that another caller wrote and has not fsynced yet (publishing marks a room's
    /// whole vector durable). Else publishing needs no fsync.
    pub fn wrote(&self) -> bool {
        self.wrote
    }
}

/// The rooms whose own events or side state changed, by the sequence number of their latest
/// change, so that a pusher looks only at rooms changed since its last round instead of
/// scanning every room of the shard.
#[derive(Debug, Default)]
struct ChangedRooms {
    last: u64,
    by_seq: BTreeMap<u64, RoomId>,
    seq_of: BTreeMap<RoomId, u64>,
}

/// Events peers sent this replica, since it started: what replication costs the receiver.
#[derive(Debug, Default)]
struct ReceivedCounters {
    new: std::sync::atomic::AtomicU64,
    duplicate: std::sync::atomic::AtomicU64,
}

/// Events peers sent a replica since it started, by whether it already held them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceivedEvents {
    /// Events it did not hold yet.
    pub new: u64,
    /// Events it already held (another replica sent them first, or a retry).
    pub duplicate: u64,
}

/// Whether a peer known as `knowledge` lacks something of `room` (durable vector `vv`, side
/// digest `side`) within `scope`: the vector to send events after and whether its side state
/// is behind, or `None`. Before a full exchange, a room the peer never reported is skipped.
fn room_behind(
    knowledge: Option<&PeerKnowledge>,
    me: ReplicaId,
    scope: PushScope,
    room: &RoomId,
    vv: &VersionVector,
    side: &[u8; 32],
) -> Option<(VersionVector, bool)> {
    let nothing = VersionVector::new();
    let held = match knowledge.and_then(|k| k.rooms.get(room)) {
        Some(held) => held,
        None if knowledge.is_some_and(|k| k.synced) => &nothing,
        None => return None,
    };
    let their_side = knowledge.and_then(|k| k.side_digests.get(room));
    let side_behind = *side != [0; 32] && their_side != Some(side);
    let lacking = match scope {
        PushScope::All => !held.dominates(vv),
        PushScope::Own => held.get(me) < vv.get(me),
    };
    if !lacking && !side_behind {
        return None;
    }
    let base = match scope {
        PushScope::All => held.clone(),
        PushScope::Own => own_base(vv, held, me),
    };
    Some((base, side_behind))
}

/// The vector to send `me`'s own events after: the peer's entry for `me` (`held`), every
/// other replica's raised to this replica's (`vv`), so that the delta holds no one else's.
fn own_base(vv: &VersionVector, held: &VersionVector, me: ReplicaId) -> VersionVector {
    let mut base = VersionVector::new();
    for (replica, counter) in vv.iter().filter(|(replica, _)| *replica != me) {
        base.advance(Dot::new(replica, counter));
    }
    base.advance(Dot::new(me, held.get(me)));
    base
}

/// Drop least recently used rooms from `rooms` until at most `keep` remain, skipping any that
/// someone holds (a subscriber, a write or push in flight: the map's is then not the only
/// handle, and `room` only hands out handles under the same lock) and any with presence or
/// typing, which exist only in memory. Everything else of a room is in the engine.
fn evict_idle(rooms: &mut BTreeMap<RoomId, Arc<RoomCell>>, keep: usize) {
    use std::sync::atomic::Ordering;
    let mut idle: Vec<(u64, RoomId)> = rooms
        .iter()
        .filter(|(_, cell)| Arc::strong_count(cell) == 1)
        .filter(|(_, cell)| {
            let state = cell.lock();
            state.side.presence == PresenceMap::default() && state.side.typing == TypingMap::default()
        })
        .map(|(room, cell)| (cell.last_used.load(Ordering::Relaxed), room.clone()))
        .collect();
    idle.sort_unstable();
    let excess = rooms.len().saturating_sub(keep);
    for (_, room) in idle.into_iter().take(excess) {
        rooms.remove(&room);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The digest of a room's side state: all of it, typing included, so that a change of any part
/// makes the replicas push it to each other.
fn side_digest(side: &SideState) -> Result<[u8; 32], StorageError> {
    let bytes = keys::encode(&(&side.markers, &side.presence, &side.typing))?;
    Ok(Sha256::digest(&bytes).into())
}

impl CrdtStore {
    /// Open the store of `shard` on the node whose key among peers is `node_key` (its id),
    /// loading the index of its rooms. `node` is what the node's stores share (its hybrid
    /// clock, and which life of the node this is: the store issues dots under
    /// [`NodeCrdt::replica_of`] the node).
    pub fn open(
        shard: ShardId,
        node_key: ReplicaId,
        engine: Arc<dyn KvEngine>,
        group_commit: GroupCommit,
        node: NodeCrdt,
    ) -> Result<Self, StorageError> {
        let replica = node.replica_of(node_key.0);
        let mut index = BTreeMap::new();
        let from = keys::shard_prefix(shard).to_vec();
        let to = keys::shard_prefix_end(shard);
        let mut cursor = from;
        loop {
            let rows = engine.scan(Cf::RoomState, &cursor, &to, ROOM_LOAD_SCAN_EVENTS)?;
            let Some((last, _)) = rows.last() else { break };
            cursor = [last.as_slice(), &[0]].concat();
            for (key, value) in &rows {
                let (room, tag) = keys::room_state_key_parts(key)?;
                let entry = index.entry(room).or_insert_with(|| (VersionVector::new(), [0; 32]));
                if tag == RoomStateTag::VersionVector as u8 {
                    entry.0 = keys::decode(value)?;
                } else if tag == RoomStateTag::ReadMarkers as u8 {
                    let side = SideState { markers: keys::decode(value)?, ..SideState::default() };
                    entry.1 = side_digest(&side)?;
                }
            }
        }
        let (acks, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(StoreInner {
                shard,
                replica,
                node_key,
                engine,
                group_commit,
                node,
                rooms: Mutex::new(BTreeMap::new()),
                uses: std::sync::atomic::AtomicU64::new(0),
                index: Mutex::new(index),
                shared_own: Mutex::new(BTreeMap::new()),
                peers: Mutex::new(BTreeMap::new()),
                changed_rooms: Mutex::new(ChangedRooms::default()),
                received: watch::channel(0).0,
                acks,
                received_events: ReceivedCounters::default(),
            }),
        })
    }

    /// The shard.
    pub fn shard(&self) -> ShardId {
        self.inner.shard
    }

    /// Events peers sent this replica since it started.
    pub fn received_events(&self) -> ReceivedEvents {
        use std::sync::atomic::Ordering;
        ReceivedEvents {
            new: self.inner.received_events.new.load(Ordering::Relaxed),
            duplicate: self.inner.received_events.duplicate.load(Ordering::Relaxed),
        }
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.inner.replica
    }

    /// Bumped on every change this replica pushes at once: its own durable events (a local
    /// write) and side state, in any room. This is the node's signal
    /// ([`NodeCrdt::own_changes`]): the other stores of the node bump it too.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.node.own_changes()
    }

    /// Bumped when peers' events (another replica's) became durable here: what a relay may
    /// have to pass on to a third replica.
    pub fn received(&self) -> watch::Receiver<u64> {
        self.inner.received.subscribe()
    }

    /// Record that `room`'s own events or side state changed, and wake the pushers.
    fn bump_changes(&self, room: &RoomId) {
        {
            let mut changed = lock(&self.inner.changed_rooms);
            changed.last += 1;
            let seq = changed.last;
            if let Some(old) = changed.seq_of.insert(room.clone(), seq) {
                changed.by_seq.remove(&old);
            }
            changed.by_seq.insert(seq, room.clone());
        }
        self.inner.node.own_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The sequence number of the latest change (0: none yet).
    pub fn change_seq(&self) -> u64 {
        lock(&self.inner.changed_rooms).last
    }

    /// The rooms whose own events or side state changed after sequence number `after`, at
    /// most `limit`, oldest change first, with the sequence number of the last one listed.
    pub fn changed_since(&self, after: u64, limit: usize) -> (Vec<RoomId>, u64) {
        let changed = lock(&self.inner.changed_rooms);
        let mut upto = after;
        let mut rooms = Vec::new();
        for (seq, room) in changed.by_seq.range(after.saturating_add(1)..).take(limit) {
            upto = *seq;
            rooms.push(room.clone());
        }
        (rooms, upto)
    }

    /// The room, loaded from the engine on first use.
    pub async fn room(&self, room: &RoomId) -> Result<Arc<RoomCell>, StoreError> {
        use std::sync::atomic::Ordering;
        let now = self.inner.uses.fetch_add(1, Ordering::Relaxed);
        if let Some(cell) = lock(&self.inner.rooms).get(room) {
            cell.last_used.store(now, Ordering::Relaxed);
            return Ok(cell.clone());
        }
        let this = self.clone();
        let id = room.clone();
        let loaded = tokio::task::spawn_blocking(move || this.load_room(&id))
            .await
            .map_err(|e| StorageError::io(format!("room load task: {e}")))??;
        loaded.last_used.store(now, Ordering::Relaxed);
        let mut rooms = lock(&self.inner.rooms);
        let cell = rooms.entry(room.clone()).or_insert_with(|| Arc::new(loaded)).clone();
        if rooms.len() > ROOMS_LOADED_MAX {
            evict_idle(&mut rooms, ROOMS_LOADED_AFTER_EVICTION);
        }
        Ok(cell)
    }

    /// How many rooms are loaded in memory.
    pub fn rooms_loaded(&self) -> usize {
        lock(&self.inner.rooms).len()
    }

    fn load_room(&self, room: &RoomId) -> Result<RoomCell, StoreError> {
        let shard = self.inner.shard;
        let engine = &self.inner.engine;
        let mut log = RoomLog::new(room.clone());
        let prefix = keys::room_prefix(shard, room);
        let end = keys::prefix_end(&prefix);
        let mut cursor = prefix.clone();
        loop {
            let rows = engine.scan(Cf::RoomEvents, &cursor, &end, ROOM_LOAD_SCAN_EVENTS)?;
            let Some((last, _)) = rows.last() else { break };
            cursor = [last.as_slice(), &[0]].concat();
            for (_, value) in rows {
                let event: Event = keys::decode(&value)?;
                match log.apply_event(event) {
                    Ok(_) => {}
                    Err(e) => {
                        return Err(StorageError::corrupt(format!("room {room} on shard {shard}: {e}")).into());
                    }
                }
            }
        }
        let markers = engine
            .get(Cf::RoomState, &keys::room_state_key(shard, room, RoomStateTag::ReadMarkers))?
            .map(|bytes| keys::decode(&bytes))
            .transpose()?
            .unwrap_or_default();
        let side = SideState { markers, ..SideState::default() };
        let durable = log.version_vector().clone();
        let (visible, _) = watch::channel(durable.clone());
        let (durable, _) = watch::channel(durable);
        let (side_tx, _) = broadcast::channel(SIDE_EVENTS_BUFFERED_PER_ROOM);
        Ok(RoomCell {
            state: Mutex::new(RoomState { log, side }),
            last_used: std::sync::atomic::AtomicU64::new(0),
            durable,
            visible,
            side: side_tx,
        })
    }

    /// Stamp, persist and apply a local event by `author`, then wait until it is durable.
    ///
    /// A `Post` whose message the room already holds (a retry: same client message id) writes
    /// nothing and reports the first post, once that is durable.
    pub async fn write_local(
        &self,
        room: &RoomId,
        author: UserName,
        kind: EventKind,
        now_ms: u64,
        seen: Option<Hlc>,
    ) -> Result<Written, StoreError> {
        let cell = self.room(room).await?;
        let (written, version_vector) = match self.stamp_and_write(room, &cell, author, kind, now_ms, seen)? {
            Stamped::Retry(written) => {
                self.wait_durable(&cell, written.position).await;
                return Ok(written);
            }
            Stamped::New(written, version_vector) => (written, version_vector),
        };
        self.share_written(room, &cell, &version_vector);
        self.inner.group_commit.sync().await?;
        self.mark_durable(room, &cell, &version_vector)?;
        Ok(written)
    }

    /// Under the room's lock: find a retried post, or stamp, write (not yet fsynced) and apply.
    fn stamp_and_write(
        &self,
        room: &RoomId,
        cell: &RoomCell,
        author: UserName,
        kind: EventKind,
        now_ms: u64,
        seen: Option<Hlc>,
    ) -> Result<Stamped, StoreError> {
        // Held until the event is in the engine, so that a seal waits for it.
        let sealed = self.inner.node.sealed.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *sealed {
            return Err(StoreError::Closed { shard: self.inner.shard });
        }
        let mut state = cell.lock();
        if let EventKind::Post { message_id, .. } = &kind
            && let Some(message) = state.log.message(message_id)
        {
            return Ok(Stamped::Retry(Written {
                position: message.position,
                message_id: *message_id,
                duplicate: true,
            }));
        }
        let stamp = {
            let mut clock = lock(&self.inner.node.clock);
            state.log.stamp(&mut clock, self.inner.replica, now_ms, seen)?
        };
        let event = stamp.event(author, kind);
        let written = Written { position: event.position(), message_id: event.message_id(), duplicate: false };
        let mut batch = WriteBatch::new();
        batch.put(
            Cf::RoomEvents,
            keys::room_event_key(self.inner.shard, room, event.position()),
            keys::encode(&event)?,
        );
        state.log.apply_event(event)?;
        let version_vector = state.log.version_vector().clone();
        batch.put(
            Cf::RoomState,
            keys::room_state_key(self.inner.shard, room, RoomStateTag::VersionVector),
            keys::encode(&version_vector)?,
        );
        self.inner.engine.write(batch)?;
        Ok(Stamped::New(written, version_vector))
    }

    /// Share own events as soon as they are written, before their fsync: subscribers may be
    /// sent them and the couriers push them, so that the peers' fsyncs run alongside this
    /// one. A crash may lose them here while a peer or a subscriber holds them; this life's
    /// replica id is never used again after a crash (only after a clean stop, which makes
    /// every dot of the life durable first: [`NodeCrdt::seal`]), so no dot is issued twice,
    /// and a peer that holds them brings them back.
    fn share_written(&self, room: &RoomId, cell: &RoomCell, version_vector: &VersionVector) {
        let me = self.inner.replica;
        cell.show(version_vector);
        let counter = version_vector.get(me);
        let advanced = {
            let mut shared = lock(&self.inner.shared_own);
            let entry = shared.entry(room.clone()).or_insert(0);
            let advanced = counter > *entry;
            *entry = (*entry).max(counter);
            advanced
        };
        if advanced {
            self.bump_changes(room);
        }
    }

    async fn wait_durable(&self, cell: &RoomCell, position: Position) {
        let mut durable = cell.watch_durable();
        let _ = durable.wait_for(|vv| vv.contains(position.dot())).await;
    }

    /// Record `version_vector` of `room` as durable; if this replica's own events advanced,
    /// forget what [`CrdtStore::share_written`] recorded up to them (the couriers were woken
    /// then) and wake the pushers for any it did not share, or else tell them that a peer's
    /// did ([`CrdtStore::received`]).
    fn mark_durable(&self, room: &RoomId, cell: &RoomCell, version_vector: &VersionVector) -> Result<(), StoreError> {
        let me = self.inner.replica;
        let (mut advanced, mut own_advanced) = (false, false);
        cell.durable.send_if_modified(|durable| {
            if durable.dominates(version_vector) {
                return false;
            }
            own_advanced = version_vector.get(me) > durable.get(me);
            durable.merge(version_vector);
            advanced = true;
            true
        });
        if advanced {
            // Merged, not assigned: a concurrent caller may have read the cell's vector before
            // this one's merge and write the index after it.
            let durable = cell.durable();
            cell.show(&durable);
            let mut index = lock(&self.inner.index);
            let entry = index.entry(room.clone()).or_insert_with(|| (VersionVector::new(), [0; 32]));
            entry.0.merge(&durable);
            drop(index);
            if own_advanced {
                let mut shared = lock(&self.inner.shared_own);
                let was_shared = shared.get(room).copied().unwrap_or(0);
                if was_shared <= durable.get(me) {
                    shared.remove(room);
                }
                drop(shared);
                if durable.get(me) > was_shared {
                    // Own events not shared when written: given back by a peer (this replica
                    // had lost them), they are pushed again.
                    self.bump_changes(room);
                }
            } else {
                self.inner.received.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        Ok(())
    }

    /// Apply events from a peer (each replica's in counter order), persist and fsync them, and
    /// merge `side` if given. Returns this replica's durable copy of the room, for the sender to
    /// record.
    pub async fn apply_remote(
        &self,
        room: &RoomId,
        events: Vec<Event>,
        side: Option<SideState>,
        now_ms: u64,
    ) -> Result<RoomSummary, StoreError> {
        let mut copies = self.apply_remote_rooms(vec![(room.clone(), events, side)], now_ms).await?;
        copies.pop().ok_or_else(|| StoreError::Storage(StorageError::io("no copy of the pushed room")))
    }

    /// [`CrdtStore::apply_remote`] for many rooms at once, with one fsync for all of them.
    pub async fn apply_remote_rooms(
        &self,
        rooms: Vec<(RoomId, Vec<Event>, Option<SideState>)>,
        now_ms: u64,
    ) -> Result<Vec<RoomSummary>, StoreError> {
        let staged = self.stage_remote_rooms(rooms, now_ms).await?;
        if staged.wrote() {
            self.sync().await?;
        }
        self.publish_remote_rooms(staged)
    }

    /// Apply and write a peer's events and side state of many rooms, without fsyncing: the
    /// caller fsyncs ([`CrdtStore::sync`], once for any number of stores of the node) and then
    /// publishes them ([`CrdtStore::publish_remote_rooms`]).
    pub async fn stage_remote_rooms(
        &self,
        rooms: Vec<(RoomId, Vec<Event>, Option<SideState>)>,
        now_ms: u64,
    ) -> Result<StagedRooms, StoreError> {
        let mut applied = Vec::with_capacity(rooms.len());
        let mut wrote = false;
        for (room, events, side) in rooms {
            let cell = self.room(&room).await?;
            let (version_vector, side_changed, wrote_room) =
                self.apply_remote_unsynced(&room, &cell, events, side, now_ms)?;
            // A concurrent push may have written events of this room that its fsync has not
            // covered yet: they are in `version_vector` too, so they need an fsync as well.
            wrote |= wrote_room || !cell.durable.borrow().dominates(&version_vector);
            applied.push((room, cell, version_vector, side_changed));
        }
        Ok(StagedRooms { applied, wrote })
    }

    /// Fsync everything the node's engine was given so far (the node's group commit).
    pub async fn sync(&self) -> Result<(), StoreError> {
        Ok(self.inner.group_commit.sync().await?)
    }

    /// Mark staged rooms durable (they must have been fsynced since they were staged) and
    /// return this replica's copy of each, for the sender to record.
    pub fn publish_remote_rooms(&self, staged: StagedRooms) -> Result<Vec<RoomSummary>, StoreError> {
        let mut copies = Vec::with_capacity(staged.applied.len());
        for (room, cell, version_vector, side_changed) in staged.applied {
            self.mark_durable(&room, &cell, &version_vector)?;
            if side_changed {
                self.side_changed(&room, &cell)?;
            }
            let side_digest = lock(&self.inner.index).get(&room).map_or([0; 32], |(_, digest)| *digest);
            copies.push(RoomSummary { room, version_vector: cell.durable(), side_digest });
        }
        Ok(copies)
    }

    /// Under the room's lock: apply and write (not yet fsynced) a peer's events and side state.
    /// Returns the room's version vector after them, whether its side state changed, and
    /// whether anything was written.
    fn apply_remote_unsynced(
        &self,
        room: &RoomId,
        cell: &RoomCell,
        events: Vec<Event>,
        side: Option<SideState>,
        now_ms: u64,
    ) -> Result<(VersionVector, bool, bool), StoreError> {
        let mut wrote = false;
        let (mut new, mut duplicate) = (0u64, 0u64);
        let mut state = cell.lock();
        let mut batch = WriteBatch::new();
        for event in events {
            if state.log.version_vector().contains(event.dot) {
                duplicate += 1;
                continue;
            }
            {
                // A peer's stamp moves this node's clock forward; one too far ahead is
                // applied all the same (refusing it would stop convergence) but not observed.
                let mut clock = lock(&self.inner.node.clock);
                if let Err(e) = clock.observe(event.hlc, now_ms) {
                    tracing::warn!(shard = %self.inner.shard, %room, error = %e, "peer event stamped ahead");
                }
            }
            let key = keys::room_event_key(self.inner.shard, room, event.position());
            let value = keys::encode(&event)?;
            match state.log.apply_event(event) {
                Ok(Applied::New) => {
                    batch.put(Cf::RoomEvents, key, value);
                    wrote = true;
                    new += 1;
                }
                Ok(Applied::Duplicate) => duplicate += 1,
                Err(CrdtError::Gap { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        {
            use std::sync::atomic::Ordering;
            self.inner.received_events.new.fetch_add(new, Ordering::Relaxed);
            self.inner.received_events.duplicate.fetch_add(duplicate, Ordering::Relaxed);
        }
        let side_changed = match side {
            Some(side) => merge_side(&mut state.side, &side),
            None => false,
        };
        if side_changed {
            batch.put(
                Cf::RoomState,
                keys::room_state_key(self.inner.shard, room, RoomStateTag::ReadMarkers),
                keys::encode(&state.side.markers)?,
            );
            wrote = true;
        }
        let version_vector = state.log.version_vector().clone();
        if wrote {
            batch.put(
                Cf::RoomState,
                keys::room_state_key(self.inner.shard, room, RoomStateTag::VersionVector),
                keys::encode(&version_vector)?,
            );
            self.inner.engine.write(batch)?;
            // Peers' events only: this replica's own events in the log may not be fsynced yet
            // (a local write between its stamp and its group commit), and nobody else has them.
            let me = self.inner.replica;
            let mut peers_events = VersionVector::new();
            for (replica, counter) in version_vector.iter().filter(|(replica, _)| *replica != me) {
                peers_events.advance(Dot::new(replica, counter));
            }
            cell.show(&peers_events);
        }
        Ok((version_vector, side_changed, wrote))
    }

    /// Change the room's side state with `change` (a local presence, typing or read-marker
    /// write), persist read markers, and tell subscribers and peers if anything changed.
    pub async fn update_side<F>(&self, room: &RoomId, change: F) -> Result<bool, StoreError>
    where
        F: FnOnce(&mut SideState, &RoomLog) -> bool,
    {
        let cell = self.room(room).await?;
        {
            let mut state = cell.lock();
            let RoomState { log, side } = &mut *state;
            if !change(side, log) {
                return Ok(false);
            }
            let mut batch = WriteBatch::new();
            batch.put(
                Cf::RoomState,
                keys::room_state_key(self.inner.shard, room, RoomStateTag::ReadMarkers),
                keys::encode(&state.side.markers)?,
            );
            self.inner.engine.write(batch)?;
        }
        self.inner.group_commit.sync().await?;
        self.side_changed(room, &cell)?;
        Ok(true)
    }

    /// Publish the room's side state as it is now: its digest into the index, the state to
    /// subscribers, a bump to pushers.
    ///
    /// Under the room's lock, and of the state now rather than a copy taken before the fsync:
    /// two writers that change the room at once finish their fsyncs in either order, and the
    /// later publication must not put the earlier state back. A stale digest in the index would
    /// tell pushers that a peer holding that older state lacks nothing, and the newer change
    /// would never leave this replica.
    fn side_changed(&self, room: &RoomId, cell: &RoomCell) -> Result<(), StoreError> {
        {
            let state = cell.lock();
            let digest = side_digest(&state.side)?;
            let mut index = lock(&self.inner.index);
            let entry = index.entry(room.clone()).or_insert_with(|| (VersionVector::new(), [0; 32]));
            entry.1 = digest;
            drop(index);
            let _ = cell.side.send(SideChange::State(Arc::new(state.side.clone())));
        }
        self.bump_changes(room);
        Ok(())
    }

    /// A fresh stamp from the node's clock (for presence and typing).
    pub fn tick(&self, now_ms: u64) -> Hlc {
        lock(&self.inner.node.clock).tick(now_ms)
    }

    /// Record that `peer` durably holds `version_vector` of `room` (and side state with
    /// `side_digest`, if given). Returns whether that is news.
    pub fn record_peer(
        &self,
        peer: ReplicaId,
        room: &RoomId,
        version_vector: &VersionVector,
        side_digest: Option<[u8; 32]>,
    ) -> bool {
        let mut peers = lock(&self.inner.peers);
        let knowledge = peers.entry(peer).or_default();
        let held = knowledge.rooms.entry(room.clone()).or_default();
        let grew = !held.dominates(version_vector);
        held.merge(version_vector);
        let side_moved = match side_digest {
            Some(digest) => knowledge.side_digests.insert(room.clone(), digest) != Some(digest),
            None => false,
        };
        drop(peers);
        if grew {
            self.inner.acks.send_modify(|n| *n = n.wrapping_add(1));
        }
        grew || side_moved
    }

    /// Record a full anti-entropy listing from `peer` for rooms in `[from, to)` (`to` `None`:
    /// to the end): rooms it did not list are empty there.
    pub fn record_peer_listing(&self, peer: ReplicaId, rooms: &[RoomSummary], from: &RoomId, to: Option<&RoomId>) {
        let listed: BTreeSet<&RoomId> = rooms.iter().map(|r| &r.room).collect();
        {
            let mut peers = lock(&self.inner.peers);
            let knowledge = peers.entry(peer).or_default();
            let in_range = |room: &RoomId| room >= from && to.is_none_or(|to| room < to);
            knowledge.rooms.retain(|room, _| !in_range(room) || listed.contains(room));
            knowledge.side_digests.retain(|room, _| !in_range(room) || listed.contains(room));
            if to.is_none() {
                knowledge.synced = true;
            }
        }
        for summary in rooms {
            self.record_peer(peer, &summary.room, &summary.version_vector, Some(summary.side_digest));
        }
    }

    /// Record `peer`'s own answer about its copy of `room` (a push reply): it replaces what this
    /// replica believed, also downwards (a peer that lost data, or a belief that ran ahead).
    /// Returns whether that is news.
    pub fn set_peer(
        &self,
        peer: ReplicaId,
        room: &RoomId,
        version_vector: &VersionVector,
        side_digest: [u8; 32],
    ) -> bool {
        let mut peers = lock(&self.inner.peers);
        let knowledge = peers.entry(peer).or_default();
        let old = knowledge.rooms.insert(room.clone(), version_vector.clone()).unwrap_or_default();
        let grew = !old.dominates(version_vector);
        let side_moved = knowledge.side_digests.insert(room.clone(), side_digest) != Some(side_digest);
        drop(peers);
        if grew {
            self.inner.acks.send_modify(|n| *n = n.wrapping_add(1));
        }
        grew || side_moved || old != *version_vector
    }

    /// Forget what this replica knew of `peer` (it restarted or was replaced).
    pub fn forget_peer(&self, peer: ReplicaId) {
        lock(&self.inner.peers).remove(&peer);
    }

    /// Wait until some replica other than this one durably holds `position`'s event, or
    /// `timeout_ms` passes; returns whether one does.
    pub async fn wait_replicated(&self, position: Position, room: &RoomId, timeout_ms: u64) -> bool {
        let dot = position.dot();
        let mut acks = self.inner.acks.subscribe();
        let held = || {
            lock(&self.inner.peers)
                .iter()
                .any(|(peer, k)| *peer != self.inner.node_key && k.rooms.get(room).is_some_and(|vv| vv.contains(dot)))
        };
        let wait = async {
            loop {
                if held() {
                    return true;
                }
                if acks.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), wait).await.unwrap_or(false)
    }

    /// A page of this replica's rooms, in room order, from `from` (inclusive), at most `limit`.
    pub fn summaries(&self, from: Option<&RoomId>, limit: usize) -> Vec<RoomSummary> {
        let index = lock(&self.inner.index);
        let range = match from {
            Some(from) => index.range(from.clone()..),
            None => index.range::<RoomId, _>(..),
        };
        range
            .take(limit)
            .map(|(room, (vv, digest))| RoomSummary {
                room: room.clone(),
                version_vector: vv.clone(),
                side_digest: *digest,
            })
            .collect()
    }

    /// Every room's summary and a digest of them all, taken at one instant: equal digests on two
    /// replicas mean nothing to exchange, and then each holds exactly these summaries.
    pub fn index_snapshot(&self) -> (Vec<RoomSummary>, [u8; 32]) {
        let index = lock(&self.inner.index);
        let mut hasher = Sha256::new();
        let mut summaries = Vec::with_capacity(index.len());
        for (room, (vv, side)) in index.iter() {
            hasher.update((room.0.len() as u64).to_be_bytes());
            hasher.update(room.0.as_bytes());
            for (replica, counter) in vv.iter() {
                hasher.update(replica.0.to_be_bytes());
                hasher.update(counter.to_be_bytes());
            }
            hasher.update(u64::MAX.to_be_bytes());
            hasher.update(side);
            summaries.push(RoomSummary { room: room.clone(), version_vector: vv.clone(), side_digest: *side });
        }
        (summaries, hasher.finalize().into())
    }

    /// The digest of [`CrdtStore::index_snapshot`].
    pub fn digest(&self) -> [u8; 32] {
        self.index_snapshot().1
    }

    /// The rooms `peer` lacks something of (events within `scope`, or side state), at most
    /// `limit`, each with the version vector to send events after (what the peer is known to
    /// hold; for [`PushScope::Own`], with every other replica's entry raised to this replica's,
    /// so that the delta holds this replica's own events only) and whether its side state is
    /// behind. Before a full exchange with `peer`, only rooms it already reported are listed.
    pub fn rooms_behind(&self, peer: ReplicaId, limit: usize, scope: PushScope) -> Vec<(RoomId, VersionVector, bool)> {
        let me = self.inner.replica;
        let peers = lock(&self.inner.peers);
        let knowledge = peers.get(&peer);
        let index = lock(&self.inner.index);
        index
            .iter()
            .filter_map(|(room, (vv, side))| {
                room_behind(knowledge, me, scope, room, vv, side).map(|(base, side)| (room.clone(), base, side))
            })
            .take(limit)
            .collect()
    }

    /// [`CrdtStore::rooms_behind`] with [`PushScope::Own`], among `rooms` only, counting own
    /// events as soon as they are written (and shared), not only once durable.
    pub fn own_rooms_behind_among(&self, peer: ReplicaId, rooms: &[RoomId]) -> Vec<(RoomId, VersionVector, bool)> {
        let me = self.inner.replica;
        let peers = lock(&self.inner.peers);
        let knowledge = peers.get(&peer);
        let index = lock(&self.inner.index);
        let shared = lock(&self.inner.shared_own);
        let (empty, no_side) = (VersionVector::new(), [0u8; 32]);
        rooms
            .iter()
            .filter_map(|room| {
                let written = shared.get(room).copied().unwrap_or(0);
                let (vv, side) = match index.get(room) {
                    Some((vv, side)) => (vv, side),
                    None if written > 0 => (&empty, &no_side),
                    None => return None,
                };
                let vv = if written > vv.get(me) {
                    let mut raised = vv.clone();
                    raised.advance(Dot::new(me, written));
                    std::borrow::Cow::Owned(raised)
                } else {
                    std::borrow::Cow::Borrowed(vv)
                };
                room_behind(knowledge, me, PushScope::Own, room, &vv, side)
                    .map(|(base, side)| (room.clone(), base, side))
            })
            .collect()
    }

    /// Whether `peer` seems to lack events of some other replica than this one (what a relay
    /// would send). Allocates nothing: the pusher asks after every round.
    pub fn others_lacking(&self, peer: ReplicaId) -> bool {
        let me = self.inner.replica;
        let peers = lock(&self.inner.peers);
        let knowledge = peers.get(&peer);
        let synced = knowledge.is_some_and(|k| k.synced);
        let index = lock(&self.inner.index);
        index.iter().any(|(room, (vv, _))| match knowledge.and_then(|k| k.rooms.get(room)) {
            Some(held) => vv.iter().any(|(replica, counter)| replica != me && held.get(replica) < counter),
            None => synced && vv.iter().any(|(replica, _)| replica != me),
        })
    }

    /// For each peer replica this one knows of: how many events this replica holds that the
    /// peer is not known to hold, over every room (replication lag, for metrics).
    pub fn peer_lag(&self) -> Vec<(ReplicaId, u64)> {
        let peers = lock(&self.inner.peers);
        let index = lock(&self.inner.index);
        peers
            .iter()
            .filter(|(peer, _)| **peer != self.inner.node_key)
            .map(|(peer, knowledge)| {
                let mut missing = 0u64;
                for (room, (vv, _)) in index.iter() {
                    let held = knowledge.rooms.get(room);
                    for (replica, counter) in vv.iter() {
                        let theirs = held.map_or(0, |h| h.get(replica));
                        missing = missing.saturating_add(counter.saturating_sub(theirs));
                    }
                }
                (*peer, missing)
            })
            .collect()
    }

    /// The room's side state now.
    pub async fn side_state(&self, room: &RoomId) -> Result<SideState, StoreError> {
        Ok(self.room(room).await?.lock().side.clone())
    }
}

/// Merge `other` into `side`; returns whether anything changed.
fn merge_side(side: &mut SideState, other: &SideState) -> bool {
    let before = side.clone();
    side.markers.merge(&other.markers);
    side.presence.merge(&other.presence);
    side.typing.merge(&other.typing);
    *side != before
}

#[cfg(test)]
mod tests {
    use palaver_crdt::MessageId;

    use super::*;
    use crate::engine::{MemEngine, RocksEngine, StallingEngine};

    fn store(engine: Arc<dyn KvEngine>, replica: u64) -> CrdtStore {
        let group_commit = GroupCommit::start(engine.clone());
        CrdtStore::open(ShardId(1), ReplicaId(replica), engine, group_commit, NodeCrdt::new()).expect("open")
    }

    /// Drop the last handle of `engine` (the group-commit thread lets go of its own handle once
    /// its queue closes), so the database can be opened again.
    async fn close(engine: Arc<dyn KvEngine>) {
        for _ in 0..1_000 {
            if Arc::strong_count(&engine) == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the engine is still in use");
    }

    fn post(room: &RoomId, author: &str, cid: &str, body: &str) -> EventKind {
        EventKind::Post {
            message_id: MessageId::derive(room, &UserName(author.into()), cid),
            client_message_id: cid.into(),
            body: body.into(),
        }
    }

    async fn write(store: &CrdtStore, room: &RoomId, author: &str, cid: &str, now_ms: u64) -> Written {
        store
            .write_local(room, UserName(author.into()), post(room, author, cid, cid), now_ms, None)
            .await
            .expect("write")
    }

    /// An own event is shown to subscribers and handed to the couriers as soon as it is
    /// written, while its fsync still runs, under this life's replica id; the write returns,
    /// and the event counts as durable, only after the fsync.
    #[tokio::test]
    async fn own_events_are_shared_before_their_fsync_under_this_lifes_id() {
        let engine = Arc::new(StallingEngine::default());
        engine.stall(true);
        let group_commit = GroupCommit::start(engine.clone());
        let life = 7;
        let store = CrdtStore::open(ShardId(1), ReplicaId(1), engine.clone(), group_commit, NodeCrdt::for_life(life))
            .expect("open");
        let me = ReplicaId::incarnation(1, life);
        assert_eq!(store.replica(), me);
        let room = RoomId("general".into());
        // A peer that has listed everything it holds (nothing), so it lacks what is written.
        store.record_peer_listing(ReplicaId(2), &[], &RoomId(String::new()), None);
        let writing = {
            let store = store.clone();
            let room = room.clone();
            tokio::spawn(async move { write(&store, &room, "ada", "c1", 1_000).await })
        };
        let cell = store.room(&room).await.expect("room");
        let mut visible = cell.watch_visible();
        // (The borrow `wait_for` returns is let go at once: it would block the next update.)
        let shown = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            visible.wait_for(|vv| vv.contains(Dot::new(me, 1))),
        )
        .await
        .is_ok_and(|seen| seen.is_ok());
        assert!(shown, "the event is visible while its fsync is held");
        assert_eq!(cell.visible_delta(&VersionVector::new(), 10).len(), 1);
        let behind = store.own_rooms_behind_among(ReplicaId(2), std::slice::from_ref(&room));
        assert_eq!(behind.len(), 1, "the couriers push it before its fsync: {behind:?}");
        assert_eq!(behind[0].1.get(me), 0, "from the peer's count of this life's events");
        assert!(!writing.is_finished(), "the write returns only after its fsync");
        assert!(!cell.durable().contains(Dot::new(me, 1)));
        engine.stall(false);
        let written = writing.await.expect("join");
        assert_eq!(written.position.dot(), Dot::new(me, 1));
        assert!(cell.durable().contains(Dot::new(me, 1)));
        assert!(lock(&store.inner.shared_own).is_empty(), "nothing shared beyond the durable events");
    }

    /// A sealed life stamps nothing more, in any store of the node; a store of the same life
    /// opened afterwards on the same engine (the next start, after a clean shutdown) goes on
    /// after the dots the life issued.
    #[tokio::test]
    async fn a_sealed_life_stamps_nothing_and_goes_on_after_its_dots() {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::new());
        let life = 3;
        let node = NodeCrdt::for_life(life);
        let open = |shard: u32, node: &NodeCrdt| {
            CrdtStore::open(
                ShardId(shard),
                ReplicaId(1),
                engine.clone(),
                GroupCommit::start(engine.clone()),
                node.clone(),
            )
            .expect("open")
        };
        let (first, second) = (open(1, &node), open(2, &node));
        let room = RoomId("general".into());
        let written = write(&first, &room, "ada", "c1", 1_000).await;
        assert_eq!(written.position.dot(), Dot::new(ReplicaId::incarnation(1, life), 1));
        node.seal();
        for store in [&first, &second] {
            let refused =
                store.write_local(&room, UserName("ada".into()), post(&room, "ada", "c2", "c2"), 2_000, None).await;
            assert_eq!(refused.err(), Some(StoreError::Closed { shard: store.shard() }));
        }
        assert_eq!(first.room(&room).await.expect("room").durable().get(ReplicaId::incarnation(1, life)), 1);
        let next = open(1, &NodeCrdt::for_life(life));
        let written = write(&next, &room, "ada", "c2", 3_000).await;
        assert_eq!(written.position.dot(), Dot::new(ReplicaId::incarnation(1, life), 2), "after the life's first dot");
    }

    #[tokio::test]
    async fn local_writes_are_durable_ordered_and_idempotent() {
        let store = store(Arc::new(MemEngine::new()), 1);
        let room = RoomId("general".into());
        let first = write(&store, &room, "ada", "c1", 1_000).await;
        let second = write(&store, &room, "bob", "c2", 999).await;
        assert!(first.position < second.position, "a later write orders later even if the wall clock went back");
        let retry = write(&store, &room, "ada", "c1", 2_000).await;
        assert!(retry.duplicate);
        assert_eq!(retry.position, first.position);
        let cell = store.room(&room).await.expect("room");
        assert_eq!(cell.durable().get(ReplicaId(1)), 2, "the retry wrote nothing");
        assert_eq!(cell.lock().log.len(), 2);
    }

    #[tokio::test]
    async fn idle_rooms_leave_memory_and_come_back_whole() {
        use palaver_crdt::{PresenceEntry, PresenceStatus};
        let store = store(Arc::new(MemEngine::new()), 1);
        // A room someone holds (a subscriber) and a room with presence stay loaded.
        let held_room = RoomId("held".into());
        let held = store.room(&held_room).await.expect("room");
        write(&store, &held_room, "ada", "h", 1_000).await;
        let present = RoomId("present".into());
        write(&store, &present, "ada", "p", 1_000).await;
        let ada = UserName("ada".into());
        let entry = PresenceEntry::new(PresenceStatus::Online, Hlc::new(1_000, 0), ReplicaId(1), 1_000);
        store.update_side(&present, |side, _| side.presence.set(ada.clone(), entry)).await.expect("presence");
        let first = RoomId("r0".into());
        write(&store, &first, "ada", "m0", 1_000).await;
        let first_cell = Arc::downgrade(&store.room(&first).await.expect("room"));
        for i in 1..ROOMS_LOADED_MAX + 50 {
            let room = RoomId(format!("r{i}"));
            write(&store, &room, "ada", &format!("m{i}"), 1_000 + i as u64).await;
        }
        assert!(store.rooms_loaded() <= ROOMS_LOADED_MAX, "{} rooms loaded", store.rooms_loaded());
        assert!(first_cell.upgrade().is_none(), "the least recently used idle room left memory");
        assert!(Arc::ptr_eq(&held, &store.room(&held_room).await.expect("room")), "a held room stays");
        let present_cell = store.room(&present).await.expect("room");
        assert!(present_cell.lock().side.presence.entry(&ada).is_some(), "a room with presence stays");
        // The evicted room comes back from the engine with its events, and goes on counting.
        let again = store.room(&first).await.expect("room");
        let bodies: Vec<String> = again.lock().log.messages().map(|m| m.body.clone()).collect();
        assert_eq!(bodies, vec!["m0".to_string()]);
        assert_eq!(again.durable().get(ReplicaId(1)), 1);
        drop(again);
        let next = write(&store, &first, "bob", "after", 9_000).await;
        assert_eq!(next.position.counter, 2);
        assert!(!next.duplicate);
        let retry = write(&store, &first, "ada", "m0", 9_001).await;
        assert!(retry.duplicate, "a retried post is still recognised after a reload");
    }

    /// Writes racing each other (local ones and peers' merges, whose fsyncs finish in any
    /// order) leave the index equal to the room (side digest and durable version vector) and
    /// the subscribers' last state equal to the room's side state: a stale index would make
    /// pushers skip the newest change for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_side_writes_publish_the_newest_state() {
        use palaver_crdt::{PresenceEntry, PresenceStatus};
        let store = store(Arc::new(MemEngine::new()), 1);
        let room = RoomId("busy".into());
        let cell = store.room(&room).await.expect("room");
        let mut subscriber = cell.subscribe_side();
        // Rounds of racing writers; after each, what was published must be the state now.
        for round in 0..20u64 {
            let mut writers = Vec::new();
            for poster in 0..2u64 {
                let (store, room) = (store.clone(), room.clone());
                writers.push(tokio::spawn(async move {
                    for i in 0..40u64 {
                        write(&store, &room, "ada", &format!("r{round}-p{poster}-{i}"), 1_000).await;
                    }
                }));
            }
            for writer in 0..8u64 {
                let (store, room) = (store.clone(), room.clone());
                writers.push(tokio::spawn(async move {
                    for i in 0..40u64 {
                        let user = UserName(format!("u{writer}-{}", i % 4));
                        let hlc = Hlc::new(1_000 + round * 100 + i, 0);
                        let entry = PresenceEntry::new(PresenceStatus::Online, hlc, ReplicaId(1), 1_000);
                        if writer % 2 == 0 {
                            store.update_side(&room, |side, _| side.presence.set(user, entry)).await.expect("side");
                        } else {
                            let mut side = SideState::default();
                            side.presence.set(user, PresenceEntry { replica: ReplicaId(2), ..entry });
                            store.apply_remote(&room, Vec::new(), Some(side), 1_000).await.expect("merge");
                        }
                    }
                }));
            }
            for writer in writers {
                writer.await.expect("writer");
            }
            let now = cell.lock().side.clone();
            let indexed = store.summaries(Some(&room), 1).into_iter().next().expect("indexed").side_digest;
            assert_eq!(indexed, side_digest(&now).expect("digest"), "round {round}: the index has the newest digest");
            let indexed = store.summaries(Some(&room), 1).into_iter().next().expect("indexed").version_vector;
            assert_eq!(indexed, cell.durable(), "round {round}: the index has the newest version vector");
            let mut last = None;
            loop {
                match subscriber.try_recv() {
                    Ok(SideChange::State(state)) => last = Some(state),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
            assert_eq!(last.as_deref(), Some(&now), "round {round}: subscribers were last sent the newest state");
        }
    }

    #[tokio::test]
    async fn a_reopened_store_has_every_durable_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let room = RoomId("ops".into());
        {
            let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(dir.path()).expect("open"));
            let store = store(engine.clone(), 7);
            for i in 0..50 {
                write(&store, &room, "ada", &format!("m{i}"), 1_000 + i).await;
            }
            drop(store);
            close(engine).await;
        }
        let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(dir.path()).expect("reopen"));
        let store = store(engine, 7);
        assert_eq!(store.summaries(None, 10).len(), 1, "the index lists the room without loading it");
        let cell = store.room(&room).await.expect("room");
        assert_eq!(cell.durable().get(ReplicaId(7)), 50);
        let bodies: Vec<String> = cell.lock().log.messages().map(|m| m.body.clone()).collect();
        assert_eq!(bodies, (0..50).map(|i| format!("m{i}")).collect::<Vec<_>>());
        let next = write(&store, &room, "ada", "after-restart", 900).await;
        assert_eq!(next.position.counter, 51);
    }

    #[tokio::test]
    async fn remote_events_apply_in_order_and_stop_at_a_gap() {
        let a = store(Arc::new(MemEngine::new()), 1);
        let b = store(Arc::new(MemEngine::new()), 2);
        let room = RoomId("sync".into());
        for i in 0..5 {
            write(&a, &room, "ada", &format!("m{i}"), 1_000 + i).await;
        }
        let events = a.room(&room).await.expect("room").durable_delta(&VersionVector::new(), 100);
        assert_eq!(events.len(), 5);
        // Skip the second event: the batch stops at the gap, keeping only the first.
        let mut with_gap = events.clone();
        with_gap.remove(1);
        let held = b.apply_remote(&room, with_gap, None, 1_000).await.expect("apply");
        assert_eq!(held.version_vector.get(ReplicaId(1)), 1);
        let held = b.apply_remote(&room, events.clone(), None, 1_000).await.expect("apply");
        assert_eq!(held.version_vector.get(ReplicaId(1)), 5);
        // Duplicates change nothing.
        let held = b.apply_remote(&room, events, None, 1_000).await.expect("apply");
        assert_eq!(held.version_vector.get(ReplicaId(1)), 5);
        assert_eq!(a.digest(), b.digest(), "same events, same digest");
        assert_eq!(
            b.received_events(),
            ReceivedEvents { new: 5, duplicate: 6 },
            "every received event is counted once"
        );
    }

    /// Subscribers see a peer's events once they are applied here, before this replica's
    /// fsync (the peer fsynced them before sending), but this replica's own events only once
    /// they are fsynced here.
    #[tokio::test]
    async fn peers_events_are_visible_before_the_local_fsync() {
        let a = store(Arc::new(MemEngine::new()), 1);
        let b = store(Arc::new(MemEngine::new()), 2);
        let room = RoomId("vis".into());
        for i in 0..2 {
            write(&a, &room, "ada", &format!("a{i}"), 1_000 + i).await;
        }
        let from_a = a.room(&room).await.expect("room").durable_delta(&VersionVector::new(), 100);
        let cell = b.room(&room).await.expect("room");
        let mut visible = cell.watch_visible();
        visible.borrow_and_update();
        // b's own event, stamped and written but not yet shared (nor fsynced).
        let own = match b.stamp_and_write(
            &room,
            &cell,
            UserName("bob".into()),
            post(&room, "bob", "b0", "b0"),
            1_100,
            None,
        ) {
            Ok(Stamped::New(written, _)) => written,
            other => panic!("expected a new event, got {other:?}"),
        };
        let staged = b.stage_remote_rooms(vec![(room.clone(), from_a.clone(), None)], 1_100).await.expect("stage");
        assert!(visible.has_changed().expect("open"), "staging a peer's events wakes subscribers");
        // The same events again (a concurrent push) write nothing, but publishing them must
        // still wait for an fsync: the room's vector holds the first push's unsynced events.
        let again = b.stage_remote_rooms(vec![(room.clone(), from_a.clone(), None)], 1_100).await.expect("stage");
        assert!(again.wrote(), "a room with unsynced events needs an fsync before it is published");
        let shown: Vec<Dot> = cell.visible_delta(&VersionVector::new(), 100).iter().map(|e| e.dot).collect();
        let from_a_dots: Vec<Dot> = from_a.iter().map(|e| e.dot).collect();
        assert_eq!(shown, from_a_dots, "a's events are visible, b's unshared own event is not");
        assert!(cell.durable_delta(&VersionVector::new(), 100).is_empty(), "nothing is durable here yet");
        b.sync().await.expect("sync");
        b.publish_remote_rooms(staged).expect("publish");
        let shown: Vec<Dot> = cell.visible_delta(&VersionVector::new(), 100).iter().map(|e| e.dot).collect();
        assert_eq!(shown.len(), 3, "after the fsync every event is visible");
        assert!(shown.contains(&own.position.dot()));
        assert_eq!(cell.durable_delta(&VersionVector::new(), 100).len(), 3);
    }

    #[tokio::test]
    async fn peers_and_quorum_waits() {
        let a = store(Arc::new(MemEngine::new()), 1);
        let room = RoomId("q".into());
        let written = write(&a, &room, "ada", "m", 1_000).await;
        assert!(!a.wait_replicated(written.position, &room, 10).await, "nobody else holds it yet");
        assert!(
            a.rooms_behind(ReplicaId(2), 10, PushScope::All).is_empty(),
            "an unknown peer gets nothing before a full exchange"
        );
        a.record_peer_listing(ReplicaId(2), &[], &RoomId(String::new()), None);
        let behind = a.rooms_behind(ReplicaId(2), 10, PushScope::All);
        assert_eq!(behind.len(), 1, "after an empty listing, the peer lacks the room");
        let vv = a.room(&room).await.expect("room").durable();
        a.record_peer(ReplicaId(2), &room, &vv, None);
        assert!(a.wait_replicated(written.position, &room, 10).await);
        assert!(a.rooms_behind(ReplicaId(2), 10, PushScope::All).is_empty());
    }

    /// A replica's own durable events wake its pushers (`changes`); a peer's tell them that a
    /// relay may be due (`received`), so the pushers do not rescan on every event they got.
    #[tokio::test]
    async fn own_events_wake_pushers_and_peers_events_arm_the_relay() {
        let (a, b) = (store(Arc::new(MemEngine::new()), 1), store(Arc::new(MemEngine::new()), 2));
        let room = RoomId("wake".into());
        let (mut changes, mut received) = (b.changes(), b.received());
        write(&a, &room, "ada", "from-a", 1_000).await;
        let from_a = a.room(&room).await.expect("room").durable_delta(&VersionVector::new(), 10);
        b.apply_remote(&room, from_a, None, 1_000).await.expect("apply");
        assert!(received.has_changed().expect("open") && !changes.has_changed().expect("open"));
        received.borrow_and_update();
        write(&b, &room, "bob", "from-b", 1_001).await;
        assert!(changes.has_changed().expect("open") && !received.has_changed().expect("open"));
        changes.borrow_and_update();
        // b's own event, given back by a peer (b lost it): b must push it again.
        let fresh = store(Arc::new(MemEngine::new()), 2);
        let fresh_changes = fresh.changes();
        let own = b.room(&room).await.expect("room").durable_delta(&VersionVector::new(), 10);
        fresh.apply_remote(&room, own, None, 1_000).await.expect("apply");
        assert!(fresh_changes.has_changed().expect("open"), "its own events came back: push them");
    }

    /// Pushers look only at rooms changed since their last round: each room once, at its
    /// latest change, and only for this replica's own events or side state.
    #[tokio::test]
    async fn changed_rooms_are_listed_once_at_their_latest_change() {
        let (a, b) = (store(Arc::new(MemEngine::new()), 1), store(Arc::new(MemEngine::new()), 2));
        let (r1, r2) = (RoomId("one".into()), RoomId("two".into()));
        assert_eq!(b.change_seq(), 0);
        write(&b, &r1, "bob", "m1", 1_000).await;
        let after_first = b.change_seq();
        write(&b, &r2, "bob", "m2", 1_001).await;
        write(&b, &r1, "bob", "m3", 1_002).await;
        let (rooms, upto) = b.changed_since(0, 10);
        assert_eq!(rooms, vec![r2.clone(), r1.clone()], "oldest change first, each room once");
        assert_eq!(upto, b.change_seq());
        assert_eq!(b.changed_since(after_first, 1).0, vec![r2.clone()], "bounded");
        // A peer's event is not a change of b's own.
        write(&a, &r2, "ada", "from-a", 1_003).await;
        let from_a = a.room(&r2).await.expect("room").durable_delta(&VersionVector::new(), 10);
        b.apply_remote(&r2, from_a, None, 1_003).await.expect("apply");
        assert!(b.changed_since(upto, 10).0.is_empty());
        // Replica 3 knows nothing of r1 yet but has listed: r1 and r2 hold b's events it lacks.
        b.record_peer_listing(ReplicaId(3), &[], &RoomId(String::new()), None);
        let behind = b.own_rooms_behind_among(ReplicaId(3), std::slice::from_ref(&r1));
        assert_eq!(behind.len(), 1);
        assert_eq!(b.room(&r1).await.expect("room").durable_delta(&behind[0].1, 10).len(), 2);
    }

    /// The eager push carries a replica's own events only; the relay carries the rest.
    #[tokio::test]
    async fn an_own_push_leaves_third_replicas_events_to_the_relay() {
        let (a, b) = (store(Arc::new(MemEngine::new()), 1), store(Arc::new(MemEngine::new()), 2));
        let room = RoomId("three".into());
        write(&a, &room, "ada", "from-a", 1_000).await;
        let from_a = a.room(&room).await.expect("room").durable_delta(&VersionVector::new(), 10);
        b.apply_remote(&room, from_a, None, 1_000).await.expect("apply");
        // Replica 3 is known to hold nothing of the room.
        b.record_peer_listing(ReplicaId(3), &[], &RoomId(String::new()), None);
        assert!(b.rooms_behind(ReplicaId(3), 10, PushScope::Own).is_empty(), "b holds nothing of its own");
        assert_eq!(b.rooms_behind(ReplicaId(3), 10, PushScope::All).len(), 1, "the relay would send a's event");
        assert!(b.others_lacking(ReplicaId(3)));
        write(&b, &room, "bob", "from-b", 1_001).await;
        let behind = b.rooms_behind(ReplicaId(3), 10, PushScope::Own);
        assert_eq!(behind.len(), 1);
        let events = b.room(&room).await.expect("room").durable_delta(&behind[0].1, 10);
        let dots: Vec<Dot> = events.iter().map(|event| event.dot).collect();
        assert_eq!(dots, vec![Dot::new(ReplicaId(2), 1)], "only b's own event");
        let (_, base, _) = &b.rooms_behind(ReplicaId(3), 10, PushScope::All)[0];
        let events = b.room(&room).await.expect("room").durable_delta(base, 10);
        assert_eq!(events.len(), 2, "the relay sends both");
        let vv = b.room(&room).await.expect("room").durable();
        b.record_peer(ReplicaId(3), &room, &vv, None);
        assert!(!b.others_lacking(ReplicaId(3)), "replica 3 holds everything now");
    }

    #[tokio::test]
    async fn side_state_merges_and_persists_markers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let room = RoomId("side".into());
        let position = {
            let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(dir.path()).expect("open"));
            let store = store(engine.clone(), 1);
            let written = write(&store, &room, "ada", "m", 1_000).await;
            let changed = store
                .update_side(&room, |side, _| side.markers.mark(UserName("bob".into()), written.position))
                .await
                .expect("mark");
            assert!(changed);
            drop(store);
            close(engine).await;
            written.position
        };
        let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(dir.path()).expect("reopen"));
        let store = store(engine, 1);
        let side = store.side_state(&room).await.expect("side");
        assert_eq!(side.markers.marker(&UserName("bob".into())), Some(position));
    }
}
