//! Convergence of the room log under the real protocol, checked by proptest.
//!
//! Three origin replicas issue random operations (posts, retried posts, edits by authors and by
//! others, redactions, reactions and unreactions), each stamping its own events with its own
//! clock and wall time (which steps back, and whose state a restart loses), and pull bounded
//! deltas from each other between operations. Then:
//!
//! - the merge laws hold on the three (partially synced) origin logs;
//! - the union shows exactly what a naive, order-free reference model computes from the set of
//!   events;
//! - three fresh replicas fed every event in arbitrary order, duplicated, bouncing with `Gap`
//!   and redelivered, interleaved with bounded delta pulls, end equal to the union: the same
//!   messages in the same order, byte-identical when serialized;
//! - every event orders after each message its replica held (or its client had seen) when it
//!   was stamped.

use std::collections::{BTreeMap, BTreeSet};

use palaver_crdt::{
    Applied, CrdtError, Event, EventKind, Hlc, HlcClock, Message, MessageId, Position, ReplicaId, RoomLog,
};
use palaver_ids::{RoomId, UserName};
use proptest::prelude::*;

const ROOM: &str = "general";
const USERS: [&str; 3] = ["ann", "bob", "cy"];
const REACTIONS: [&str; 2] = ["+1", "heart"];
const REPLICAS: usize = 3;
/// Steps a fresh replica may take to receive everything before the test calls it stuck.
const DELIVERY_STEPS_MAX: usize = 200_000;

#[derive(Debug, Clone)]
enum Op {
    Post {
        at: usize,
        user: usize,
        client: u8,
        seen: Option<usize>,
    },
    Edit {
        at: usize,
        target: usize,
        by_author: bool,
    },
    Redact {
        at: usize,
        target: usize,
    },
    React {
        at: usize,
        user: usize,
        target: usize,
        reaction: usize,
    },
    Unreact {
        at: usize,
        user: usize,
        target: usize,
        reaction: usize,
    },
    Sync {
        from: usize,
        to: usize,
        limit: usize,
    },
    Wall {
        at: usize,
        delta_ms: i64,
    },
    /// The replica restarts without its clock's state (only the log survives).
    Restart {
        at: usize,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    let at = 0..REPLICAS;
    let user = 0..USERS.len();
    let reaction = 0..REACTIONS.len();
    prop_oneof![
        4 => (at.clone(), user.clone(), 0..4u8, prop::option::weighted(0.3, 0..64usize))
            .prop_map(|(at, user, client, seen)| Op::Post { at, user, client, seen }),
        2 => (at.clone(), 0..64usize, prop::bool::weighted(0.8))
            .prop_map(|(at, target, by_author)| Op::Edit { at, target, by_author }),
        1 => (at.clone(), 0..64usize).prop_map(|(at, target)| Op::Redact { at, target }),
        3 => (at.clone(), user.clone(), 0..64usize, reaction.clone())
            .prop_map(|(at, user, target, reaction)| Op::React { at, user, target, reaction }),
        2 => (at.clone(), user, 0..64usize, reaction)
            .prop_map(|(at, user, target, reaction)| Op::Unreact { at, user, target, reaction }),
        3 => (at.clone(), 0..REPLICAS, 1..6usize).prop_map(|(from, to, limit)| Op::Sync { from, to, limit }),
        1 => (at.clone(), -1_000..=1_000i64).prop_map(|(at, delta_ms)| Op::Wall { at, delta_ms }),
        1 => at.prop_map(|at| Op::Restart { at }),
    ]
}

/// One replica that issues events.
struct Origin {
    replica: ReplicaId,
    log: RoomLog,
    clock: HlcClock,
    wall_ms: u64,
}

/// A message some replica posted, as clients anywhere could have seen it.
#[derive(Clone)]
struct Posted {
    id: MessageId,
    author: UserName,
    hlc: Hlc,
}

/// An issued event and the messages that must order before it.
struct CausalRecord {
    position: Position,
    before: BTreeSet<MessageId>,
}

struct History {
    origins: Vec<Origin>,
    posted: Vec<Posted>,
    records: Vec<CausalRecord>,
}

fn room() -> RoomId {
    RoomId::from(ROOM)
}

fn user(index: usize) -> UserName {
    UserName::from(USERS[index])
}

/// Run the operations on three origins, as the replicas of one shard would.
fn run(ops: &[Op], skews_ms: [u64; REPLICAS]) -> History {
    let mut origins: Vec<Origin> = (0..REPLICAS)
        .map(|i| Origin {
            replica: ReplicaId(i as u64 + 1),
            log: RoomLog::new(room()),
            clock: HlcClock::new(),
            wall_ms: 1_000_000 + skews_ms[i],
        })
        .collect();
    let mut posted: Vec<Posted> = Vec::new();
    let mut records = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let body = format!("body {step}");
        // (replica, author, what, the message a client saw elsewhere)
        let (at, author, kind, seen) = match op {
            Op::Post { at, user: u, client, seen } => {
                let client_message_id = format!("c{client}");
                let message_id = MessageId::derive(&room(), &user(*u), &client_message_id);
                let seen = seen.and_then(|s| posted.get(s % posted.len().max(1)).cloned());
                (*at, user(*u), EventKind::Post { message_id, client_message_id, body }, seen)
            }
            Op::Edit { at, target, by_author } => {
                let Some(p) = pick(&posted, *target) else { continue };
                let editor = if *by_author { p.author.clone() } else { other_than(&p.author) };
                (*at, editor, EventKind::Edit { message_id: p.id, body }, Some(p))
            }
            Op::Redact { at, target } => {
                let Some(p) = pick(&posted, *target) else { continue };
                (*at, p.author.clone(), EventKind::Redact { message_id: p.id }, Some(p))
            }
            Op::React { at, user: u, target, reaction } => {
                let Some(p) = pick(&posted, *target) else { continue };
                let kind = EventKind::React { message_id: p.id, reaction: REACTIONS[*reaction].to_owned() };
                (*at, user(*u), kind, Some(p))
            }
            Op::Unreact { at, user: u, target, reaction } => {
                let Some(p) = pick(&posted, *target) else { continue };
                let kind = EventKind::Unreact {
                    message_id: p.id,
                    reaction: REACTIONS[*reaction].to_owned(),
                    observed: origins[*at].log.version_vector().clone(),
                };
                (*at, user(*u), kind, Some(p))
            }
            Op::Sync { from, to, limit } => {
                sync(&mut origins, *from, *to, *limit);
                continue;
            }
            Op::Wall { at, delta_ms } => {
                let origin = &mut origins[*at];
                origin.wall_ms = origin.wall_ms.saturating_add_signed(*delta_ms);
                continue;
            }
            Op::Restart { at } => {
                origins[*at].clock = HlcClock::new();
                continue;
            }
        };
        let origin = &mut origins[at];
        let stamp =
            match origin.log.stamp(&mut origin.clock, origin.replica, origin.wall_ms, seen.as_ref().map(|p| p.hlc)) {
                Ok(stamp) => stamp,
                Err(CrdtError::ClockDrift { .. }) => continue,
                Err(error) => panic!("stamp failed: {error}"),
            };
        let mut before: BTreeSet<MessageId> = origin.log.messages().map(|m| m.id).collect();
        before.extend(seen.as_ref().map(|p| p.id));
        let event = stamp.event(author, kind);
        if let EventKind::Post { message_id, .. } = &event.kind
            && !posted.iter().any(|p| p.id == *message_id)
        {
            posted.push(Posted { id: *message_id, author: event.author.clone(), hlc: event.hlc });
        }
        records.push(CausalRecord { position: event.position(), before });
        assert_eq!(origin.log.apply_event(event), Ok(Applied::New), "a stamped event is the next one");
        origin.wall_ms += 1;
    }
    History { origins, posted, records }
}

fn pick(posted: &[Posted], target: usize) -> Option<Posted> {
    if posted.is_empty() { None } else { Some(posted[target % posted.len()].clone()) }
}

fn other_than(author: &UserName) -> UserName {
    USERS.iter().map(|u| UserName::from(*u)).find(|u| u != author).expect("three users")
}

/// `to` pulls at most `limit` events from `from`, observing their stamps as the protocol says.
fn sync(origins: &mut [Origin], from: usize, to: usize, limit: usize) {
    if from == to {
        return;
    }
    let delta = origins[from].log.delta_since(origins[to].log.version_vector(), limit);
    let target = &mut origins[to];
    for event in delta {
        if target.clock.observe(event.hlc, target.wall_ms).is_err() {
            break; // too far ahead: bounce, the next anti-entropy round offers it again
        }
        assert_eq!(target.log.apply_event(event), Ok(Applied::New), "a delta applies in order");
    }
}

fn merged(a: &RoomLog, b: &RoomLog) -> RoomLog {
    let mut out = a.clone();
    out.merge(b).expect("same room");
    out
}

/// What the messages must be, computed naively from the set of events in any order.
fn reference(events: &[Event]) -> Vec<Message> {
    let mut posts: BTreeMap<MessageId, &Event> = BTreeMap::new();
    let mut redacted = BTreeSet::new();
    for event in events {
        match &event.kind {
            EventKind::Post { message_id, client_message_id, .. } => {
                let valid = *message_id == MessageId::derive(&room(), &event.author, client_message_id);
                let earlier = posts.get(message_id).is_none_or(|held| event.position() < held.position());
                if valid && earlier {
                    posts.insert(*message_id, event);
                }
            }
            EventKind::Redact { message_id } => {
                redacted.insert(*message_id);
            }
            _ => {}
        }
    }
    let mut messages: Vec<Message> = posts
        .iter()
        .map(|(id, post)| {
            let EventKind::Post { body, .. } = &post.kind else { unreachable!("posts only") };
            let mut message = Message {
                id: *id,
                position: post.position(),
                author: post.author.clone(),
                body: body.clone(),
                edited: false,
                redacted: redacted.contains(id),
                reactions: BTreeMap::new(),
            };
            if message.redacted {
                message.body.clear();
                return message;
            }
            let latest_edit = events
                .iter()
                .filter(|e| e.author == message.author)
                .filter_map(|e| match &e.kind {
                    EventKind::Edit { message_id, body } if message_id == id => Some((e.position(), body)),
                    _ => None,
                })
                .max();
            if let Some((_, body)) = latest_edit {
                message.body = body.clone();
                message.edited = true;
            }
            for react in events {
                let EventKind::React { message_id, reaction } = &react.kind else { continue };
                let removed = events.iter().any(|e| match &e.kind {
                    EventKind::Unreact { message_id: m, reaction: r, observed } => {
                        m == message_id && r == reaction && e.author == react.author && observed.contains(react.dot)
                    }
                    _ => false,
                });
                if message_id == id && !removed {
                    message.reactions.entry(reaction.clone()).or_default().insert(react.author.clone());
                }
            }
            message
        })
        .collect();
    messages.sort_by_key(|m| m.position);
    messages
}

/// A small deterministic generator for delivery schedules (test-only; the crate has none).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Deliver `events` to three fresh replicas in arbitrary order with duplicates, bouncing gaps
/// for redelivery, interleaved with bounded delta pulls from the origins and from each other.
fn deliver(events: &[Event], origins: &[Origin], seed: u64) -> Vec<RoomLog> {
    let mut rng = SplitMix(seed);
    let target = origins.iter().fold(RoomLog::new(room()), |acc, o| merged(&acc, &o.log));
    let mut receivers: Vec<RoomLog> = (0..REPLICAS).map(|_| RoomLog::new(room())).collect();
    for r in 0..REPLICAS {
        let mut bag: Vec<Event> = Vec::new();
        for event in events {
            for _ in 0..=rng.below(3) {
                bag.push(event.clone());
            }
        }
        let mut steps = 0;
        while receivers[r].version_vector() != target.version_vector() {
            steps += 1;
            assert!(steps < DELIVERY_STEPS_MAX, "receiver {r} stuck at {}", receivers[r].version_vector());
            match rng.below(10) {
                0 | 1 => {
                    let source = &origins[rng.below(REPLICAS)].log;
                    pull(&mut receivers[r], source, 1 + rng.below(4));
                }
                2 if r > 0 => {
                    let (done, rest) = receivers.split_at_mut(r);
                    pull(&mut rest[0], &done[rng.below(r)], 1 + rng.below(4));
                }
                _ if !bag.is_empty() => {
                    let event = bag.swap_remove(rng.below(bag.len()));
                    match receivers[r].apply_event(event.clone()) {
                        Ok(_) => {}
                        Err(CrdtError::Gap { .. }) => bag.push(event),
                        Err(error) => panic!("delivery failed: {error}"),
                    }
                }
                _ => {}
            }
        }
        // Leftover duplicates are harmless.
        for event in bag {
            assert_ne!(receivers[r].apply_event(event), Ok(Applied::New), "everything is held already");
        }
    }
    receivers
}

fn pull(into: &mut RoomLog, from: &RoomLog, limit: usize) {
    for event in from.delta_since(into.version_vector(), limit) {
        assert_eq!(into.apply_event(event), Ok(Applied::New), "a delta applies in order");
    }
}

fn encoded(log: &RoomLog) -> Vec<u8> {
    postcard::to_allocvec(&log.messages().collect::<Vec<_>>()).expect("encode")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn replicas_converge_under_any_delivery(
        ops in prop::collection::vec(arb_op(), 1..60),
        skews_ms in prop::array::uniform3(0..3_000u64),
        seed in any::<u64>(),
    ) {
        let history = run(&ops, skews_ms);
        let [a, b, c] = [&history.origins[0].log, &history.origins[1].log, &history.origins[2].log];

        // Merge laws on logs that saw different subsets.
        prop_assert_eq!(merged(a, b), merged(b, a));
        prop_assert_eq!(merged(&merged(a, b), c), merged(a, &merged(b, c)));
        prop_assert_eq!(merged(a, a), a.clone());

        // The union shows what the order-free reference computes.
        let union = merged(&merged(a, b), c);
        let events: Vec<Event> = union.events().cloned().collect();
        let shown: Vec<Message> = union.messages().cloned().collect();
        prop_assert_eq!(&shown, &reference(&events));
        prop_assert_eq!(union.len(), history.posted.len(), "one message per (author, client message id)");
        prop_assert!(shown.windows(2).all(|w| w[0].position < w[1].position));

        // Fresh replicas fed in arbitrary order converge to it, byte for byte.
        for receiver in deliver(&events, &history.origins, seed) {
            prop_assert_eq!(encoded(&receiver), encoded(&union));
            prop_assert_eq!(&receiver, &union);
        }

        // Causality: everything an event's replica held or its client saw orders before it.
        for record in &history.records {
            for id in &record.before {
                let message = union.message(id).expect("a held or seen message is in the union");
                prop_assert!(message.position < record.position, "{:?} not before {:?}", message.position, record.position);
            }
        }
    }
}

#[test]
fn retried_post_on_two_partitioned_replicas_shows_once_after_heal() {
    let ops = [
        Op::Post { at: 0, user: 0, client: 1, seen: None },
        Op::Post { at: 1, user: 0, client: 1, seen: None },
        Op::Sync { from: 0, to: 1, limit: 10 },
        Op::Sync { from: 1, to: 0, limit: 10 },
    ];
    let history = run(&ops, [0, 0, 0]);
    let [a, b] = [&history.origins[0].log, &history.origins[1].log];
    assert_eq!(a, b);
    assert_eq!(a.len(), 1);
    assert_eq!(a.event_count(), 2);
}
