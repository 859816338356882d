//! Idle Raft groups sleep; one beat per node pair keeps them (DESIGN: "coalesce heartbeats per
//! node pair and let idle groups sleep").
//!
//! Awake, every replica of every group runs openraft's timer (a tick every ~20 ms) and every
//! leader heartbeats each follower every 100 ms: a node with 200 replicas wakes ~10,000 times a
//! second and sends ~1,300 heartbeats a second with no client doing anything. Most groups are
//! idle most of the time: users, rooms and membership change rarely; messages take the CRDT
//! plane, which does not touch Raft.
//!
//! ## How a group falls asleep
//! Every [`BEAT_INTERVAL_MS`] each node sweeps its replicas. A group it leads whose log has not
//! grown for [`IDLE_SWEEPS_BEFORE_SLEEP`] sweeps, with every entry committed and applied, every
//! follower matched up to the last entry, and a settled membership (no joint config, no
//! learners), is *proposed*: the node lists it in the [`pb::Beat`] it sends each follower's
//! node. A follower agrees (in the [`pb::BeatReply`]) if its replica follows this leader in this
//! term, holds the same last log index and has applied it; it then stops its replica's timer.
//! Once every follower agreed, the leader stops its own timer: no ticks, no heartbeats. Until
//! then the leader keeps heartbeating, so a follower never waits on a silent leader with its
//! election timer running.
//!
//! ## How it wakes
//! - A write (or anything else that grows the log, or changes the term) wakes the leader at its
//!   next sweep; openraft replicates the write at once without the timer. The leader then stops
//!   listing the group, and a follower wakes a group its leader's beat no longer lists.
//! - A follower refuses a group (its vote or log differ, it restarted): the leader wakes it and
//!   proposes again.
//! - A follower whose replica's vote or state changed (it voted for a candidate) wakes it.
//! - The leader's node goes silent (crashed, partitioned, stopped) for [`LEADER_SILENCE_MS`]
//!   (the shortest election timeout): each follower wakes the groups it led, after a random
//!   delay up to the election timeout's spread so that one follower campaigns first, and
//!   openraft elects as usual. Failover takes as long as with per-group heartbeats.
//!
//! A copy this node still holds of a shard that placement moved elsewhere (until the drain
//! issue removes such copies) has its timer stopped for as long as placement leaves it out: it
//! still answers votes and appends, it only never campaigns.
//!
//! Safety does not depend on any of this: Raft never relies on timers for safety, only for
//! liveness, and a sleeping group still answers every Raft RPC, replicates every write and
//! serves lease-less reads (a read on a sleeping leader confirms its leadership with one
//! heartbeat round). What sleep changes is who notices a dead leader: the node-pair beat, not
//! each group's own timer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use palaver_ids::{NodeId, ShardId};
use palaver_proto::v1 as pb;
use palaver_shard::Replica;
use palaver_shard::replica::{ELECTION_TIMEOUT_MS_MAX, ELECTION_TIMEOUT_MS_MIN, HEARTBEAT_INTERVAL_MS};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::lock;
use crate::node::NodeInner;

/// How often a node sweeps its replicas and beats its peers: the Raft heartbeat interval.
pub const BEAT_INTERVAL_MS: u64 = HEARTBEAT_INTERVAL_MS;
/// Sweeps without a new log entry before a leader proposes that its group sleep.
pub const IDLE_SWEEPS_BEFORE_SLEEP: u32 = 10;
/// A follower wakes the groups of a leader node it has not heard a beat from for this long.
pub const LEADER_SILENCE_MS: u64 = ELECTION_TIMEOUT_MS_MIN;
/// Longest random delay before a follower of a silent leader wakes a group: the spread of the
/// election timeout, so that the followers of one group do not campaign at the same moment.
pub const WAKE_SPREAD_MS: u64 = ELECTION_TIMEOUT_MS_MAX - ELECTION_TIMEOUT_MS_MIN;

const _: () = assert!(
    BEAT_INTERVAL_MS * 2 < LEADER_SILENCE_MS,
    "a follower must see two beats before it takes its leader's node for silent"
);

/// Where a group this node leads stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Heartbeating; counting idle sweeps.
    Awake { idle: u32 },
    /// Still heartbeating, listed in beats; waiting for these followers to agree.
    Asking { waiting: BTreeSet<NodeId> },
    /// Timer stopped; listed in beats.
    Asleep,
}

/// A group this node leads, as of its last sweep.
#[derive(Debug, Clone)]
struct Led {
    term: u64,
    last_log: u64,
    phase: Phase,
}

/// A group this node follows whose timer it stopped.
#[derive(Debug, Clone, Copy)]
struct Followed {
    leader: NodeId,
    term: u64,
    /// Set when the leader's node went silent: the timer starts again then, unless a beat
    /// from the leader comes first.
    wake_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    led: BTreeMap<ShardId, Led>,
    followed: BTreeMap<ShardId, Followed>,
    /// When a beat last came from each node.
    heard: BTreeMap<NodeId, Instant>,
    /// Replicas this node holds of shards placed elsewhere now; their timer stays stopped.
    retired: BTreeSet<ShardId>,
    /// Peers the last sweep beat with a group listed (address by node): they get a beat the
    /// next sweep even with nothing listed, so they wake what is no longer listed at once.
    listed_to: BTreeMap<NodeId, String>,
}

/// A beat for one peer.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The peer's node.
    pub peer: NodeId,
    /// Its gRPC address.
    pub addr: String,
    /// What to send.
    pub beat: pb::Beat,
}

/// A node's sleeping groups: the ones it leads and the ones it follows.
#[derive(Debug, Default)]
pub struct Quiesce {
    state: std::sync::Mutex<State>,
    silence_wakes: AtomicU64,
    beats_sent: AtomicU64,
}

/// The Raft facts about one replica that sleep decisions read.
struct Facts {
    state: ServerState,
    term: u64,
    leader: Option<u64>,
    vote_leader: u64,
    vote_committed: bool,
    last_log: u64,
    applied: u64,
    committed: u64,
    settled_membership: bool,
    voters: Vec<u64>,
    /// Followers whose replication matched the last log index.
    matched: BTreeSet<u64>,
    /// The membership, for the followers' addresses.
    membership: Arc<palaver_shard::types::StoredMembership>,
}

impl Facts {
    fn of(replica: &Replica) -> Self {
        let metrics = replica.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let last_log = m.last_log_index.unwrap_or(0);
        let settled_membership = membership.get_joint_config().len() == 1
            && membership.learner_ids().next().is_none()
            && m.membership_config.log_id() == m.committed_membership_config.log_id();
        let matched = m
            .replication
            .as_ref()
            .map(|targets| {
                targets
                    .iter()
                    .filter(|(_, matched)| matched.as_ref().map(|id| id.index) == Some(last_log))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        Facts {
            state: m.state,
            term: m.current_term,
            leader: m.current_leader,
            vote_leader: m.vote.leader_id.voted_for,
            vote_committed: m.vote.committed,
            last_log,
            applied: m.last_applied.as_ref().map_or(0, |id| id.index),
            committed: m.local_committed.as_ref().map_or(0, |id| id.index),
            settled_membership,
            voters: membership.voter_ids().collect(),
            matched,
            membership: m.membership_config.clone(),
        }
    }

    fn leads(&self, me: NodeId) -> bool {
        self.state == ServerState::Leader && self.leader == Some(me.0)
    }

    /// The leader has nothing in flight: everything committed, applied and on every follower.
    fn settled(&self, me: NodeId) -> bool {
        self.settled_membership
            && self.committed == self.last_log
            && self.applied == self.last_log
            && self.followers(me).all(|id| self.matched.contains(&id.0))
    }

    fn followers(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().copied().filter(move |id| *id != me.0).map(NodeId)
    }

    /// This replica follows `leader` in `term` with `last_log` applied.
    fn follows(&self, leader: NodeId, term: u64, last_log: u64) -> bool {
        self.state == ServerState::Follower
            && self.term == term
            && self.vote_leader == leader.0
            && self.vote_committed
            && self.leader == Some(leader.0)
            && self.last_log == last_log
            && self.applied == last_log
    }
}

fn set_timer(replica: &Replica, on: bool) {
    replica.raft.runtime_config().tick(on);
}

impl Quiesce {
    /// Whether this node stopped the timer of its replica of `shard`.
    pub fn is_asleep(&self, shard: ShardId) -> bool {
        let state = lock(&self.state);
        state.led.get(&shard).is_some_and(|led| led.phase == Phase::Asleep)
            || state.followed.get(&shard).is_some_and(|f| f.wake_at.is_none())
            || state.retired.contains(&shard)
    }

    /// How many local replicas have their timer stopped.
    pub fn asleep_count(&self) -> usize {
        let state = lock(&self.state);
        state.led.values().filter(|led| led.phase == Phase::Asleep).count()
            + state.followed.values().filter(|f| f.wake_at.is_none()).count()
            + state.retired.len()
    }

    /// Groups woken because their leader's node went silent, since start.
    pub fn silence_wakes(&self) -> u64 {
        self.silence_wakes.load(Ordering::Relaxed)
    }

    /// Beats sent, since start.
    pub fn beats_sent(&self) -> u64 {
        self.beats_sent.load(Ordering::Relaxed)
    }

    /// Look at every local replica: count idle sweeps, propose sleep, wake what must wake, and
    /// return the beats to send. `wake_delay` draws the delay before waking a group whose
    /// leader went silent.
    pub fn sweep(&self, node: &NodeInner, mut wake_delay: impl FnMut() -> Duration) -> Vec<Outgoing> {
        let me = node.id;
        let now = Instant::now();
        let replicas = node.replicas.all();
        // Copies left on this node after placement moved the shard away: they never need to
        // campaign (the drain issue removes them).
        let retired: BTreeSet<ShardId> = {
            let view = node.view();
            let known = view.info.is_some();
            replicas.iter().map(|r| r.shard).filter(|shard| known && !view.placement(*shard).contains(&me)).collect()
        };
        // Read before taking the lock, which a write to a sleeping group waits for.
        let replicas: Vec<(Facts, Replica)> = replicas.into_iter().map(|r| (Facts::of(&r), r)).collect();
        let present: BTreeSet<ShardId> = replicas.iter().map(|(_, replica)| replica.shard).collect();
        let mut state = lock(&self.state);
        let mut beats: BTreeMap<NodeId, (String, Vec<pb::QuietGroup>)> = BTreeMap::new();
        let mut delayed_wakes = Vec::new();
        for (facts, replica) in replicas {
            let shard = replica.shard;
            if facts.leads(me) {
                if state.followed.remove(&shard).is_some() | state.retired.remove(&shard) {
                    set_timer(&replica, true);
                }
                self.sweep_led(&mut state, &replica, &facts, me, &mut beats);
                continue;
            }
            if let Some(led) = state.led.remove(&shard)
                && led.phase == Phase::Asleep
            {
                set_timer(&replica, true);
            }
            if retired.contains(&shard) {
                state.followed.remove(&shard);
                state.retired.insert(shard);
                set_timer(&replica, false);
                continue;
            }
            if state.retired.remove(&shard) {
                set_timer(&replica, true);
            }
            let Some(followed) = state.followed.get(&shard).copied() else { continue };
            if !facts.follows(followed.leader, followed.term, facts.last_log) {
                // It voted for a candidate, or learned of another leader: openraft takes over.
                state.followed.remove(&shard);
                set_timer(&replica, true);
                continue;
            }
            let silent = state
                .heard
                .get(&followed.leader)
                .is_none_or(|heard| now.duration_since(*heard) >= Duration::from_millis(LEADER_SILENCE_MS));
            if silent && followed.wake_at.is_none() {
                let at = now + wake_delay();
                if let Some(entry) = state.followed.get_mut(&shard) {
                    entry.wake_at = Some(at);
                }
                delayed_wakes.push((shard, at));
            }
        }
        state.led.retain(|shard, _| present.contains(shard));
        state.followed.retain(|shard, _| present.contains(shard));
        state.retired.retain(|shard| present.contains(shard));
        for (peer, addr) in std::mem::take(&mut state.listed_to) {
            beats.entry(peer).or_insert_with(|| (addr, Vec::new()));
        }
        state.listed_to =
            beats.iter().filter(|(_, (_, groups))| !groups.is_empty()).map(|(p, (a, _))| (*p, a.clone())).collect();
        drop(state);
        for (shard, at) in delayed_wakes {
            tracing::info!(node = %me, %shard, "the leader's node went silent; waking the group");
            self.schedule_wake(node, shard, at);
        }
        beats
            .into_iter()
            .map(|(peer, (addr, groups))| Outgoing { peer, addr, beat: pb::Beat { from: me.0, groups } })
            .collect()
    }

    fn sweep_led(
        &self,
        state: &mut State,
        replica: &Replica,
        facts: &Facts,
        me: NodeId,
        beats: &mut BTreeMap<NodeId, (String, Vec<pb::QuietGroup>)>,
    ) {
        let fresh = Led { term: facts.term, last_log: facts.last_log, phase: Phase::Awake { idle: 0 } };
        let led = state.led.entry(replica.shard).or_insert_with(|| fresh.clone());
        if led.term != facts.term || led.last_log != facts.last_log {
            // A write, or a new term: awake, and idle from now.
            if led.phase == Phase::Asleep {
                set_timer(replica, true);
            }
            *led = fresh;
            return;
        }
        if let Phase::Awake { idle } = &mut led.phase {
            *idle = idle.saturating_add(1);
            if *idle < IDLE_SWEEPS_BEFORE_SLEEP || !facts.settled(me) {
                return;
            }
            let waiting: BTreeSet<NodeId> = facts.followers(me).collect();
            if waiting.is_empty() {
                // A single voter: nothing to agree with.
                led.phase = Phase::Asleep;
                set_timer(replica, false);
                return;
            }
            led.phase = Phase::Asking { waiting };
        }
        for follower in facts.followers(me) {
            let Some(addr) = facts.membership.get_node(&follower.0).map(|node| &node.addr) else { continue };
            let group = pb::QuietGroup { shard: replica.shard.0, term: facts.term, last_log_index: facts.last_log };
            beats.entry(follower).or_insert_with(|| (addr.clone(), Vec::new())).1.push(group);
        }
    }

    /// Wake `replica`'s group if this node leads it asleep (its timer starts again, and it counts
    /// as idle from now). `true` if it was asleep.
    fn wake_led(&self, replica: &Replica) -> bool {
        let mut state = lock(&self.state);
        let Some(led) = state.led.get_mut(&replica.shard) else { return false };
        let was_asleep = led.phase == Phase::Asleep;
        if was_asleep {
            set_timer(replica, true);
        }
        led.phase = Phase::Awake { idle: 0 };
        was_asleep
    }

    /// Start `shard`'s timer at `at`, unless a beat from its leader came meanwhile.
    fn schedule_wake(&self, node: &NodeInner, shard: ShardId, at: Instant) {
        let Some(replica) = node.replicas.get(shard) else { return };
        let quiesce = node.quiesce.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let due = {
                let mut state = lock(&quiesce.state);
                let due = state.followed.get(&shard).is_some_and(|f| f.wake_at == Some(at));
                if due {
                    state.followed.remove(&shard);
                }
                due
            };
            if due {
                quiesce.silence_wakes.fetch_add(1, Ordering::Relaxed);
                set_timer(&replica, true);
            }
        });
    }

    /// A beat from `beat.from`: stop the timer of each listed group whose local replica agrees,
    /// wake the groups of that leader it no longer lists. Answers the groups now asleep here.
    pub fn on_beat(&self, node: &NodeInner, beat: &pb::Beat) -> pb::BeatReply {
        let leader = NodeId(beat.from);
        let mut state = lock(&self.state);
        state.heard.insert(leader, Instant::now());
        let mut asleep = Vec::new();
        let mut listed = BTreeSet::new();
        for group in &beat.groups {
            let shard = ShardId(group.shard);
            listed.insert(shard);
            let replica = node.replicas.get(shard);
            let agrees = replica.as_ref().is_some_and(|replica| {
                Facts::of(replica).follows(leader, group.term, group.last_log_index) && !state.led.contains_key(&shard)
            });
            if agrees {
                // A retired copy's timer is stopped already, and stays so.
                if !state.retired.contains(&shard) {
                    state.followed.insert(shard, Followed { leader, term: group.term, wake_at: None });
                    if let Some(replica) = &replica {
                        set_timer(replica, false);
                    }
                }
                asleep.push(group.shard);
            } else if state.followed.remove(&shard).is_some()
                && let Some(replica) = &replica
            {
                set_timer(replica, true);
            }
        }
        state.followed.retain(|shard, f| {
            let unlisted = f.leader == leader && !listed.contains(shard);
            if unlisted && let Some(replica) = node.replicas.get(*shard) {
                set_timer(&replica, true);
            }
            !unlisted
        });
        pb::BeatReply { asleep }
    }

    /// `peer`'s answer to `sent`: a group every follower agreed to sleeps; a group a follower
    /// refused wakes (or stays awake) and is asked again. A beat that failed changes nothing.
    pub fn on_reply(&self, node: &NodeInner, peer: NodeId, sent: &pb::Beat, reply: &pb::BeatReply) {
        let agreed: BTreeSet<u32> = reply.asleep.iter().copied().collect();
        let mut state = lock(&self.state);
        for group in &sent.groups {
            let shard = ShardId(group.shard);
            let Some(led) = state.led.get_mut(&shard) else { continue };
            if led.term != group.term || led.last_log != group.last_log_index {
                continue;
            }
            let agrees = agreed.contains(&group.shard);
            match &mut led.phase {
                Phase::Awake { .. } => {}
                Phase::Asking { waiting } => {
                    if agrees {
                        waiting.remove(&peer);
                    } else {
                        waiting.insert(peer);
                    }
                    if waiting.is_empty() {
                        led.phase = Phase::Asleep;
                        if let Some(replica) = node.replicas.get(shard) {
                            set_timer(&replica, false);
                        }
                    }
                }
                Phase::Asleep => {
                    if !agrees {
                        led.phase = Phase::Asking { waiting: BTreeSet::from([peer]) };
                        if let Some(replica) = node.replicas.get(shard) {
                            set_timer(&replica, true);
                        }
                    }
                }
            }
        }
    }
}

/// Ready `replica` for a write: if this node leads its group asleep, wake it and renew its
/// leader lease first. openraft refuses writes on a leader whose lease lapsed (no quorum
/// acknowledged it within the longest election timeout), and a sleeping leader sends nothing
/// that would renew it; one heartbeat round does ([`crate::routing::lease_or_quorum`]).
/// The first write to a sleeping group pays that round trip, the ones after it do not.
pub async fn wake_for_write(node: &NodeInner, replica: &Replica) {
    if !node.quiesce.wake_led(replica) {
        return;
    }
    // Boxed: openraft's futures are kilobytes, and this is the rare path of every write.
    if let Err(e) = Box::pin(replica.raft.ensure_linearizable(crate::routing::lease_or_quorum())).await {
        // The write that follows finds out the same and is routed again.
        tracing::debug!(shard = %replica.shard, error = %e, "woken leader could not renew its lease");
    }
}

/// Sweep and beat every [`BEAT_INTERVAL_MS`] until the node stops. At most one beat per peer
/// is in flight: a peer that does not answer is not sent more.
pub async fn run(node: Arc<NodeInner>, mut stopped: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_millis(BEAT_INTERVAL_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = BTreeSet::new();
    let mut beats = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = interval.tick() => {
                let rng = node.env.rng.clone();
                let spread = WAKE_SPREAD_MS.max(1);
                let outgoing = node.quiesce.sweep(&node, || {
                    let bytes = rng.bytes(8);
                    let draw = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
                    Duration::from_millis(draw % spread)
                });
                for Outgoing { peer, addr, beat } in outgoing {
                    if !in_flight.insert(peer) {
                        continue;
                    }
                    let link = node.replicas.peers().link(&addr);
                    node.quiesce.beats_sent.fetch_add(1, Ordering::Relaxed);
                    beats.push(async move {
                        let reply = match link {
                            Ok(link) => link.beat(beat.clone()).await.ok(),
                            Err(_) => None,
                        };
                        (peer, beat, reply)
                    });
                }
            }
            Some((peer, beat, reply)) = beats.next(), if !beats.is_empty() => {
                in_flight.remove(&peer);
                if let Some(reply) = reply {
                    node.quiesce.on_reply(&node, peer, &beat, &reply);
                }
            }
            _ = stopped.changed() => return,
        }
    }
}
