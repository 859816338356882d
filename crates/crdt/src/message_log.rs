//! The room log: every event of a room's CRDT plane, and the messages they materialize into.
//!
//! A [`RoomLog`] is a grow-only set of [`Event`]s, each named by its [`Dot`] and stamped with an
//! [`Hlc`]. Any replica of the room's shard issues events ([`RoomLog::stamp`]), applies them
//! locally and ships them; the others apply them in their issuer's counter order
//! ([`RoomLog::apply_event`]), which keeps the set gapless so that the [`VersionVector`] alone
//! says what a log holds, and [`RoomLog::delta_since`] answers "what does the other side lack".
//!
//! ## Materialization
//! The log keeps the visible [`Message`]s up to date as events arrive, each event costing
//! O(log n). What a message shows is a function of the *set* of events held, whatever order they
//! arrived in:
//!
//! - **Post** creates the message. Its id ([`MessageId`]) is derived from (room, author, client
//!   message id), so a retried post that lands on another replica has the same id; the message
//!   shows once, at the smallest [`Position`] of its posts, with that post's body. A post whose id
//!   does not match its own fields is kept in the set but shows nothing.
//! - **Edit** is a last-writer-wins register on the body, latest [`Position`] wins. Only the
//!   message's author edits: edits by anyone else are kept but ignored, also when they arrive
//!   before the post (they wait, then are judged).
//! - **Redact** is a tombstone: body, edits and reactions are gone for good, the skeleton (id,
//!   author, position, `redacted`) stays so that the order and replies still resolve.
//! - **React / Unreact** form an add-wins observed-remove set of (reaction, user) per message.
//!   A react adds its own dot; an unreact removes the react dots of its author and reaction that
//!   its issuing replica had observed (its version vector at stamp time). A concurrent react the
//!   unreact did not observe survives.
//! - Events about a message that has not arrived yet (edits, reactions, a redaction) are kept in
//!   per-message state and take effect when the post arrives.
//!
//! ## Total order
//! Messages are ordered by [`Position`] `(hlc, replica, counter)`: unique (a dot is), the same on
//! every replica, and consistent with causality because [`RoomLog::stamp`] stamps each new event
//! after every event the replica holds and after the client's `seen` stamp.
//!
//! ## Why not `crdts::Orswot` for reactions
//! Its deferred removals live in a `HashMap` (no deterministic iteration or serialization), and
//! it tracks causality per set while our room log already gives per-replica ordered delivery and
//! a unique dot per event. The set here is the same algorithm (dots plus a causal context per
//! entry) on `BTreeMap`s.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;

use palaver_ids::{RoomId, UserName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::CrdtError;
use crate::hlc::{Hlc, HlcClock};
use crate::version_vector::{Dot, ReplicaId, VersionVector};

/// Bytes in a [`MessageId`].
pub const MESSAGE_ID_BYTES: usize = 16;

/// Domain separator hashed in front of a message id's fields; bump the version to change the
/// derivation (every stored id would change with it).
const MESSAGE_ID_DOMAIN: &[u8] = b"palaver.message_id.v1";

const INVARIANT_INDEX: &str = "invariant: every posted message id has an entry in the order";

/// A message's id: the first 16 bytes of SHA-256 over the length-prefixed (room, author, client
/// message id). Deterministic, so a retried post gets the same id on any replica.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub [u8; MESSAGE_ID_BYTES]);

impl MessageId {
    /// The id of the post `client_message_id` of `author` in `room`.
    pub fn derive(room: &RoomId, author: &UserName, client_message_id: &str) -> MessageId {
        let mut hasher = Sha256::new();
        hasher.update(MESSAGE_ID_DOMAIN);
        for field in [room.as_str(), author.as_str(), client_message_id] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        let digest = hasher.finalize();
        let mut id = [0u8; MESSAGE_ID_BYTES];
        id.copy_from_slice(&digest[..MESSAGE_ID_BYTES]);
        MessageId(id)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; MESSAGE_ID_BYTES] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    /// Lowercase hex, written at once: every event sent to a client carries its message id as
    /// text, and a `write!` per byte showed in profiles.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 2 * MESSAGE_ID_BYTES];
        for (pair, byte) in text.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// A place in the room's total order: `(hlc, replica, counter)`, compared in that order. Unique
/// because `(replica, counter)` is the event's dot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The event's stamp.
    pub hlc: Hlc,
    /// The replica that issued it.
    pub replica: ReplicaId,
    /// Its counter at that replica.
    pub counter: u64,
}

impl Position {
    /// Before every event's position.
    pub const MIN: Position = Position { hlc: Hlc::ZERO, replica: ReplicaId(0), counter: 0 };

    /// The position of the event `dot` stamped `hlc`.
    pub fn new(hlc: Hlc, dot: Dot) -> Self {
        Position { hlc, replica: dot.replica, counter: dot.counter }
    }

    /// The dot of the event at this position.
    pub fn dot(&self) -> Dot {
        Dot::new(self.replica, self.counter)
    }
}

/// One change to a room, as issued by one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Which replica issued it, and its sequence number there.
    pub dot: Dot,
    /// When, by the issuing replica's hybrid clock.
    pub hlc: Hlc,
    /// The member who asked for it (authorized by the issuing replica).
    pub author: UserName,
    /// What it does.
    pub kind: EventKind,
}

impl Event {
    /// The event's place in the total order.
    pub fn position(&self) -> Position {
        Position::new(self.hlc, self.dot)
    }

    /// The message the event is about.
    pub fn message_id(&self) -> MessageId {
        match &self.kind {
            EventKind::Post { message_id, .. }
            | EventKind::Edit { message_id, .. }
            | EventKind::Redact { message_id }
            | EventKind::React { message_id, .. }
            | EventKind::Unreact { message_id, .. } => *message_id,
        }
    }
}

/// What an [`Event`] does to its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A new message (or a retry of one: same id).
    Post {
        /// `MessageId::derive(room, author, client_message_id)`; a post whose id does not match
        /// is kept but shows nothing.
        message_id: MessageId,
        /// The client's idempotency key for this post.
        client_message_id: String,
        /// The text.
        body: String,
    },
    /// Replace the body (author only; latest position wins).
    Edit {
        /// The message edited.
        message_id: MessageId,
        /// The new text.
        body: String,
    },
    /// Tombstone the message: body and reactions gone, skeleton kept, later edits ignored.
    /// Authorization (author or moderator) is the issuing replica's check.
    Redact {
        /// The message redacted.
        message_id: MessageId,
    },
    /// The author adds `reaction` to the message.
    React {
        /// The message reacted to.
        message_id: MessageId,
        /// The reaction (an emoji, a short code).
        reaction: String,
    },
    /// The author removes their `reaction` from the message: every react of theirs with that
    /// reaction whose dot `observed` covers.
    Unreact {
        /// The message.
        message_id: MessageId,
        /// The reaction removed.
        reaction: String,
        /// The issuing replica's version vector when it stamped the unreact.
        observed: VersionVector,
    },
}

/// A dot and a stamp for a new local event, from [`RoomLog::stamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The next dot of the issuing replica.
    pub dot: Dot,
    /// A stamp after everything the replica held and the client had seen.
    pub hlc: Hlc,
}

impl Stamp {
    /// The event with this stamp.
    pub fn event(self, author: UserName, kind: EventKind) -> Event {
        Event { dot: self.dot, hlc: self.hlc, author, kind }
    }

    /// The position the event will have.
    pub fn position(&self) -> Position {
        Position::new(self.hlc, self.dot)
    }
}

/// What [`RoomLog::apply_event`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event was new and is now held.
    New,
    /// The log already held this exact event; nothing changed.
    Duplicate,
}

/// A message as the room shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its id.
    pub id: MessageId,
    /// Its place in the room: the smallest position of its posts.
    pub position: Position,
    /// Who posted it.
    pub author: UserName,
    /// The text: the latest edit's, else the first post's; empty once redacted.
    pub body: String,
    /// Whether an edit by the author replaced the body (false once redacted).
    pub edited: bool,
    /// Whether the message was redacted.
    pub redacted: bool,
    /// Who reacted with what; empty once redacted.
    pub reactions: BTreeMap<String, BTreeSet<UserName>>,
}

/// A page of history: the messages strictly between `after` and `before` (either open), at most
/// `limit`, the newest ones first if `newest_first`, else the oldest ones first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageQuery {
    /// Only messages after this position.
    pub after: Option<Position>,
    /// Only messages before this position.
    pub before: Option<Position>,
    /// At most this many messages.
    pub limit: usize,
    /// Take from the newest end of the range, in descending order.
    pub newest_first: bool,
}

impl PageQuery {
    /// The `limit` newest messages, newest first.
    pub fn latest(limit: usize) -> Self {
        PageQuery { after: None, before: None, limit, newest_first: true }
    }

    /// The `limit` messages just before `position`, newest first (scrolling back).
    pub fn before(position: Position, limit: usize) -> Self {
        PageQuery { after: None, before: Some(position), limit, newest_first: true }
    }

    /// The `limit` messages just after `position`, oldest first (catching up).
    pub fn after(position: Position, limit: usize) -> Self {
        PageQuery { after: Some(position), before: None, limit, newest_first: false }
    }
}

/// One room's events and the messages they show. See the module documentation.
///
/// **Invariant:** for every replica `R`, the log holds exactly the events with dots
/// `R:1..=version_vector[R]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomLog {
    room: RoomId,
    version_vector: VersionVector,
    events: BTreeMap<Dot, Event>,
    /// The greatest stamp held ([`Hlc::ZERO`] when empty).
    max_hlc: Hlc,
    /// Posted messages in total order.
    order: BTreeMap<Position, Message>,
    /// Each posted message's current position (key into `order`).
    positions: BTreeMap<MessageId, Position>,
    /// Per-message CRDT state for every message some non-post event is about.
    states: BTreeMap<MessageId, MessageState>,
}

impl RoomLog {
    /// An empty log for `room`.
    pub fn new(room: RoomId) -> Self {
        RoomLog {
            room,
            version_vector: VersionVector::new(),
            events: BTreeMap::new(),
            max_hlc: Hlc::ZERO,
            order: BTreeMap::new(),
            positions: BTreeMap::new(),
            states: BTreeMap::new(),
        }
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// What the log holds: `1..=vv[R]` of every replica `R`.
    pub fn version_vector(&self) -> &VersionVector {
        &self.version_vector
    }

    /// The greatest stamp held ([`Hlc::ZERO`] when empty).
    pub fn max_hlc(&self) -> Hlc {
        self.max_hlc
    }

    /// A dot and stamp for a new event issued by `replica`: the replica's next counter, and a
    /// stamp after every event held and after `seen` (the newest stamp the client had seen, which
    /// may come from another replica). Changes nothing in the log: apply the event built from it
    /// ([`Stamp::event`]) before stamping the next one. Fails with
    /// [`CrdtError::ClockDrift`] if `seen` (or a held stamp) is too far ahead of `now_ms`.
    pub fn stamp(
        &self,
        clock: &mut HlcClock,
        replica: ReplicaId,
        now_ms: u64,
        seen: Option<Hlc>,
    ) -> Result<Stamp, CrdtError> {
        let floor = seen.map_or(self.max_hlc, |seen| seen.max(self.max_hlc));
        let hlc = clock.observe(floor, now_ms)?;
        let dot = Dot::new(replica, self.version_vector.get(replica).saturating_add(1));
        Ok(Stamp { dot, hlc })
    }

    /// Add `event` to the log if it is the next one of its replica. An event already held is a
    /// [`Applied::Duplicate`] (idempotent); one past a gap is refused with [`CrdtError::Gap`]
    /// (fetch the missing ones, then offer it again); a different event under a held dot is
    /// [`CrdtError::ConflictingDot`].
    pub fn apply_event(&mut self, event: Event) -> Result<Applied, CrdtError> {
        let Dot { replica, counter } = event.dot;
        if counter == 0 {
            return Err(CrdtError::InvalidEvent { reason: "dot counter 0 names no event" });
        }
        let have = self.version_vector.get(replica);
        if counter <= have {
            let held = self.events.get(&event.dot).expect("invariant: a room log holds every dot its vector covers");
            return if *held == event {
                Ok(Applied::Duplicate)
            } else {
                Err(CrdtError::ConflictingDot { dot: event.dot })
            };
        }
        if counter > have.saturating_add(1) {
            return Err(CrdtError::Gap { replica, have, got: counter });
        }
        self.version_vector.advance(event.dot);
        self.max_hlc = self.max_hlc.max(event.hlc);
        self.materialize(&event);
        self.events.insert(event.dot, event);
        Ok(Applied::New)
    }

    /// The events a log at `other` lacks, at most `limit`: per replica (in replica order), in
    /// counter order, so applying them in order never meets a gap.
    pub fn delta_since(&self, other: &VersionVector, limit: usize) -> Vec<Event> {
        self.missing_from(other).take(limit).cloned().collect()
    }

    /// [`RoomLog::delta_since`] `other`, but only events that `upto` covers (e.g. the durable
    /// ones): per replica, the events after `other`'s entry up to `upto`'s. Visits no event
    /// past `limit`, however far behind `other` is.
    pub fn delta_between(&self, other: &VersionVector, upto: &VersionVector, limit: usize) -> Vec<Event> {
        self.missing_between(other, upto).take(limit).cloned().collect()
    }

    /// Apply every event of `other` this log lacks; returns how many were new. Commutative,
    /// associative and idempotent in the resulting log. Fails only if the rooms differ.
    pub fn merge(&mut self, other: &RoomLog) -> Result<usize, CrdtError> {
        if self.room != other.room {
            return Err(CrdtError::RoomMismatch { room: self.room.clone(), other: other.room.clone() });
        }
        let held = self.version_vector.clone();
        let mut new = 0;
        for event in other.missing_from(&held) {
            if self.apply_event(event.clone())? == Applied::New {
                new += 1;
            }
        }
        Ok(new)
    }

    /// The visible messages (redacted skeletons included), in total order.
    pub fn messages(&self) -> impl DoubleEndedIterator<Item = &Message> {
        self.order.values()
    }

    /// The messages strictly after `after` (all if `None`), in total order.
    pub fn messages_after(&self, after: Option<Position>) -> impl DoubleEndedIterator<Item = &Message> {
        self.range(after, None)
    }

    /// One message by id, once a post of it has arrived.
    pub fn message(&self, id: &MessageId) -> Option<&Message> {
        self.positions.get(id).and_then(|position| self.order.get(position))
    }

    /// A page of history (see [`PageQuery`]). Bounds that leave nothing between them give an
    /// empty page.
    pub fn page(&self, query: &PageQuery) -> Vec<&Message> {
        let range = self.range(query.after, query.before);
        if query.newest_first { range.rev().take(query.limit).collect() } else { range.take(query.limit).collect() }
    }

    /// How many messages show (redacted skeletons included).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no message shows.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Every event held, in dot order (each replica's in counter order): applying them in this
    /// order rebuilds the log. So does position order (a store's time-ordered key scan): events
    /// stamped through [`RoomLog::stamp`] rise in stamp with their replica's counter.
    pub fn events(&self) -> impl DoubleEndedIterator<Item = &Event> {
        self.events.values()
    }

    /// How many events the log holds.
    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    fn missing_from<'a>(&'a self, other: &'a VersionVector) -> impl Iterator<Item = &'a Event> + 'a {
        self.missing_between(other, &self.version_vector)
    }

    /// The events after `other` up to `upto` (per replica), lazily, in replica then counter
    /// order.
    fn missing_between<'a>(
        &'a self,
        other: &'a VersionVector,
        upto: &'a VersionVector,
    ) -> impl Iterator<Item = &'a Event> + 'a {
        self.version_vector.iter().flat_map(move |(replica, have)| {
            let from = Dot::new(replica, other.get(replica).saturating_add(1));
            let to = Dot::new(replica, have.min(upto.get(replica)));
            let range = if from <= to { Some(self.events.range(from..=to)) } else { None };
            range.into_iter().flatten().map(|(_, event)| event)
        })
    }

    fn range(&self, after: Option<Position>, before: Option<Position>) -> impl DoubleEndedIterator<Item = &Message> {
        let bounds = match (after, before) {
            (Some(after), Some(before)) if after >= before => (Bound::Unbounded, Bound::Excluded(Position::MIN)),
            _ => (after.map_or(Bound::Unbounded, Bound::Excluded), before.map_or(Bound::Unbounded, Bound::Excluded)),
        };
        self.order.range(bounds).map(|(_, message)| message)
    }

    fn materialize(&mut self, event: &Event) {
        let position = event.position();
        let author = &event.author;
        match &event.kind {
            EventKind::Post { message_id, client_message_id, body } => {
                if *message_id == MessageId::derive(&self.room, author, client_message_id) {
                    self.on_post(*message_id, position, author, body);
                }
            }
            EventKind::Edit { message_id, body } => self.on_edit(*message_id, position, author, body),
            EventKind::Redact { message_id } => self.on_redact(*message_id),
            EventKind::React { message_id, reaction } => self.on_react(*message_id, event.dot, author, reaction),
            EventKind::Unreact { message_id, reaction, observed } => {
                self.on_unreact(*message_id, author, reaction, observed)
            }
        }
    }

    fn on_post(&mut self, id: MessageId, position: Position, author: &UserName, body: &str) {
        match self.positions.get(&id).copied() {
            None => {
                let mut message = Message {
                    id,
                    position,
                    author: author.clone(),
                    body: body.to_owned(),
                    edited: false,
                    redacted: false,
                    reactions: BTreeMap::new(),
                };
                if let Some(state) = self.states.get_mut(&id) {
                    state.adopt(&mut message);
                }
                self.positions.insert(id, position);
                self.order.insert(position, message);
            }
            Some(current) if position < current => {
                let mut message = self.order.remove(&current).expect(INVARIANT_INDEX);
                message.position = position;
                if !message.edited && !message.redacted {
                    message.body = body.to_owned();
                }
                self.positions.insert(id, position);
                self.order.insert(position, message);
            }
            Some(_) => {}
        }
    }

    fn on_edit(&mut self, id: MessageId, position: Position, editor: &UserName, body: &str) {
        let state = self.states.entry(id).or_default();
        if state.redacted {
            return;
        }
        match self.positions.get(&id) {
            None => {
                if state.early_edits.get(editor).is_none_or(|(latest, _)| *latest < position) {
                    state.early_edits.insert(editor.clone(), (position, body.to_owned()));
                }
            }
            Some(at) => {
                let message = self.order.get_mut(at).expect(INVARIANT_INDEX);
                if message.author != *editor || state.edit_position.is_some_and(|latest| latest >= position) {
                    return;
                }
                state.edit_position = Some(position);
                message.body = body.to_owned();
                message.edited = true;
            }
        }
    }

    fn on_redact(&mut self, id: MessageId) {
        let state = self.states.entry(id).or_default();
        state.redacted = true;
        state.early_edits.clear();
        state.edit_position = None;
        state.reactions.clear();
        if let Some(at) = self.positions.get(&id) {
            let message = self.order.get_mut(at).expect(INVARIANT_INDEX);
            message.redacted = true;
            message.edited = false;
            message.body.clear();
            message.reactions.clear();
        }
    }

    fn on_react(&mut self, id: MessageId, dot: Dot, user: &UserName, reaction: &str) {
        let state = self.states.entry(id).or_default();
        if state.redacted {
            return;
        }
        let dots = state.reactions.entry((reaction.to_owned(), user.clone())).or_default();
        if dots.removed.contains(dot) {
            return;
        }
        let appears = dots.live.is_empty();
        dots.live.insert(dot);
        if let (true, Some(at)) = (appears, self.positions.get(&id)) {
            let message = self.order.get_mut(at).expect(INVARIANT_INDEX);
            message.reactions.entry(reaction.to_owned()).or_default().insert(user.clone());
        }
    }

    fn on_unreact(&mut self, id: MessageId, user: &UserName, reaction: &str, observed: &VersionVector) {
        let state = self.states.entry(id).or_default();
        if state.redacted {
            return;
        }
        let dots = state.reactions.entry((reaction.to_owned(), user.clone())).or_default();
        dots.removed.merge(observed);
        let was_shown = !dots.live.is_empty();
        dots.live.retain(|dot| !observed.contains(*dot));
        if let (true, true, Some(at)) = (was_shown, dots.live.is_empty(), self.positions.get(&id)) {
            let message = self.order.get_mut(at).expect(INVARIANT_INDEX);
            if let Some(users) = message.reactions.get_mut(reaction) {
                users.remove(user);
                if users.is_empty() {
                    message.reactions.remove(reaction);
                }
            }
        }
    }
}

/// The CRDT state of one message beyond its posts. Every field is a function of the set of
/// events about the message, whatever their arrival order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MessageState {
    /// Redacted: everything below is cleared and stays empty.
    redacted: bool,
    /// Before any post arrived: the latest edit of each editor (the author is not known yet).
    early_edits: BTreeMap<UserName, (Position, String)>,
    /// After a post arrived: the position of the author's edit that shows.
    edit_position: Option<Position>,
    /// The add-wins set of (reaction, user).
    reactions: BTreeMap<(String, UserName), ReactionDots>,
}

impl MessageState {
    /// Apply the state gathered before the first post arrived to its new message.
    fn adopt(&mut self, message: &mut Message) {
        if self.redacted {
            message.redacted = true;
            message.body.clear();
        } else {
            if let Some((position, body)) = self.early_edits.remove(&message.author) {
                message.body = body;
                message.edited = true;
                self.edit_position = Some(position);
            }
            for ((reaction, user), dots) in &self.reactions {
                if !dots.live.is_empty() {
                    message.reactions.entry(reaction.clone()).or_default().insert(user.clone());
                }
            }
        }
        self.early_edits.clear();
    }
}

/// One (reaction, user) entry of the observed-remove set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ReactionDots {
    /// React dots no unreact has observed: the entry shows while this is not empty.
    live: BTreeSet<Dot>,
    /// Everything unreacts of this entry observed; a react dot it covers never shows, also when
    /// the react arrives after the unreact.
    removed: VersionVector,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: &str = "general";

    fn user(name: &str) -> UserName {
        UserName::from(name)
    }

    fn id(author: &str, client_message_id: &str) -> MessageId {
        MessageId::derive(&RoomId::from(ROOM), &user(author), client_message_id)
    }

    fn event(replica: u64, counter: u64, wall_ms: u64, author: &str, kind: EventKind) -> Event {
        Event { dot: Dot::new(ReplicaId(replica), counter), hlc: Hlc::new(wall_ms, 0), author: user(author), kind }
    }

    fn post(author: &str, client_message_id: &str, body: &str) -> EventKind {
        EventKind::Post {
            message_id: id(author, client_message_id),
            client_message_id: client_message_id.to_owned(),
            body: body.to_owned(),
        }
    }

    fn edit(message_id: MessageId, body: &str) -> EventKind {
        EventKind::Edit { message_id, body: body.to_owned() }
    }

    fn react(message_id: MessageId, reaction: &str) -> EventKind {
        EventKind::React { message_id, reaction: reaction.to_owned() }
    }

    fn unreact(message_id: MessageId, reaction: &str, observed: &VersionVector) -> EventKind {
        EventKind::Unreact { message_id, reaction: reaction.to_owned(), observed: observed.clone() }
    }

    fn log_of(events: &[Event]) -> RoomLog {
        let mut log = RoomLog::new(RoomId::from(ROOM));
        for event in events {
            log.apply_event(event.clone()).expect("events in counter order");
        }
        log
    }

    fn bodies(log: &RoomLog) -> Vec<&str> {
        log.messages().map(|message| message.body.as_str()).collect()
    }

    #[test]
    fn message_id_is_deterministic_and_length_prefixed() {
        assert_eq!(id("ann", "c1"), id("ann", "c1"));
        assert_ne!(id("ann", "c1"), id("ann", "c2"));
        assert_ne!(id("ann", "c1"), id("bob", "c1"));
        let room = RoomId::from(ROOM);
        // Without length prefixes these two would hash the same bytes.
        assert_ne!(MessageId::derive(&room, &user("ab"), "c"), MessageId::derive(&room, &user("a"), "bc"));
        assert_eq!(id("ann", "c1").to_string().len(), 2 * MESSAGE_ID_BYTES);
        // Clients see ids as lowercase hex, two digits per byte, in byte order.
        let mut bytes = [0u8; MESSAGE_ID_BYTES];
        bytes.iter_mut().zip([0x00, 0x01, 0x0f, 0x10, 0x9a, 0xff]).for_each(|(b, v)| *b = v);
        assert_eq!(MessageId(bytes).to_string(), "00010f109aff00000000000000000000");
        assert_eq!(format!("{:?}", MessageId([0xab; MESSAGE_ID_BYTES])), format!("MessageId({})", "ab".repeat(16)));
    }

    #[test]
    fn gap_is_refused_and_the_log_is_unchanged() {
        let mut log = log_of(&[event(1, 1, 10, "ann", post("ann", "a", "one"))]);
        let before = log.clone();
        let error = log.apply_event(event(1, 3, 30, "ann", post("ann", "c", "three"))).expect_err("gap");
        assert_eq!(error, CrdtError::Gap { replica: ReplicaId(1), have: 1, got: 3 });
        assert!(error.is_retryable());
        assert_eq!(log, before);
        // A first event from a new replica must be its counter 1.
        let error = log.apply_event(event(2, 2, 30, "bob", post("bob", "b", "x"))).expect_err("gap");
        assert_eq!(error, CrdtError::Gap { replica: ReplicaId(2), have: 0, got: 2 });
    }

    #[test]
    fn duplicate_is_idempotent_and_a_conflicting_dot_is_refused() {
        let first = event(1, 1, 10, "ann", post("ann", "a", "one"));
        let mut log = log_of(std::slice::from_ref(&first));
        let before = log.clone();
        assert_eq!(log.apply_event(first.clone()), Ok(Applied::Duplicate));
        assert_eq!(log, before);
        let mut other = first;
        other.hlc = Hlc::new(11, 0);
        assert_eq!(log.apply_event(other), Err(CrdtError::ConflictingDot { dot: Dot::new(ReplicaId(1), 1) }));
        assert_eq!(
            log.apply_event(event(1, 0, 10, "ann", post("ann", "z", "zero"))),
            Err(CrdtError::InvalidEvent { reason: "dot counter 0 names no event" })
        );
    }

    #[test]
    fn retried_post_on_two_replicas_is_one_message_at_the_smaller_position() {
        let on_two = event(2, 1, 20, "ann", post("ann", "c1", "hello (retry)"));
        let on_one = event(1, 1, 25, "ann", post("ann", "c1", "hello"));
        for order in [[&on_two, &on_one], [&on_one, &on_two]] {
            let log = log_of(&order.map(Clone::clone));
            assert_eq!(log.len(), 1, "one message");
            assert_eq!(log.event_count(), 2, "both events are kept");
            let message = log.message(&id("ann", "c1")).expect("posted");
            assert_eq!(message.position, on_two.position());
            assert_eq!(message.body, "hello (retry)");
        }
    }

    #[test]
    fn post_with_a_forged_id_shows_nothing() {
        let forged = EventKind::Post {
            message_id: id("ann", "c1"),
            client_message_id: "c1".to_owned(),
            body: "I am ann".to_owned(),
        };
        let log = log_of(&[event(1, 1, 10, "mallory", forged)]);
        assert_eq!(log.event_count(), 1);
        assert!(log.is_empty());
    }

    #[test]
    fn edit_is_last_writer_wins_in_any_order() {
        let m = id("ann", "c1");
        let events = [
            event(1, 1, 10, "ann", post("ann", "c1", "v0")),
            event(1, 2, 40, "ann", edit(m, "v2")),
            event(2, 1, 30, "ann", edit(m, "v1")),
        ];
        for order in [[0, 1, 2], [0, 2, 1], [2, 0, 1]] {
            let mut log = RoomLog::new(RoomId::from(ROOM));
            for i in order {
                log.apply_event(events[i].clone()).expect("in order per replica");
            }
            let message = log.message(&m).expect("posted");
            assert_eq!((message.body.as_str(), message.edited), ("v2", true));
        }
        // Equal wall clocks: the replica breaks the tie, then the counter.
        let log = log_of(&[
            event(1, 1, 10, "ann", post("ann", "c1", "v0")),
            event(2, 1, 30, "ann", edit(m, "from 2")),
            event(3, 1, 30, "ann", edit(m, "from 3")),
        ]);
        assert_eq!(bodies(&log), ["from 3"]);
    }

    #[test]
    fn edits_by_others_are_ignored_before_and_after_the_post() {
        let m = id("ann", "c1");
        let after =
            log_of(&[event(1, 1, 10, "ann", post("ann", "c1", "mine")), event(1, 2, 20, "bob", edit(m, "bob's"))]);
        let before =
            log_of(&[event(2, 1, 20, "bob", edit(m, "bob's")), event(1, 1, 10, "ann", post("ann", "c1", "mine"))]);
        for log in [after, before] {
            let message = log.message(&m).expect("posted");
            assert_eq!((message.body.as_str(), message.edited), ("mine", false));
        }
    }

    #[test]
    fn edit_that_arrives_before_its_post_applies_when_the_post_arrives() {
        let m = id("ann", "c1");
        let log = log_of(&[
            event(2, 1, 20, "ann", edit(m, "edited")),
            event(2, 2, 21, "bob", edit(m, "not bob's to edit")),
            event(3, 1, 15, "ann", edit(m, "older edit, arrived later")),
            event(1, 1, 10, "ann", post("ann", "c1", "original")),
        ]);
        let message = log.message(&m).expect("posted");
        assert_eq!((message.body.as_str(), message.edited), ("edited", true));
        assert_eq!(log, {
            let mut other = RoomLog::new(RoomId::from(ROOM));
            other.merge(&log).expect("same room");
            other
        });
    }

    #[test]
    fn redaction_keeps_the_skeleton_and_ignores_later_edits_and_reactions() {
        let m = id("ann", "c1");
        let log = log_of(&[
            event(1, 1, 10, "ann", post("ann", "c1", "secret")),
            event(1, 2, 11, "bob", react(m, "+1")),
            event(1, 3, 12, "ann", edit(m, "more secret")),
            event(1, 4, 13, "ann", EventKind::Redact { message_id: m }),
            event(1, 5, 14, "ann", edit(m, "after redaction")),
            event(1, 6, 15, "cy", react(m, "+1")),
        ]);
        let message = log.message(&m).expect("skeleton stays");
        assert_eq!(message.position, Position::new(Hlc::new(10, 0), Dot::new(ReplicaId(1), 1)));
        assert_eq!(message.author, user("ann"));
        assert!(message.redacted && !message.edited && message.body.is_empty() && message.reactions.is_empty());
        // A redaction that arrives before its post gives the same skeleton.
        let early = log_of(&[
            event(2, 1, 13, "ann", EventKind::Redact { message_id: m }),
            event(1, 1, 10, "ann", post("ann", "c1", "secret")),
        ]);
        assert_eq!(early.message(&m).expect("skeleton"), message);
    }

    #[test]
    fn unreact_removes_what_it_observed_and_a_concurrent_react_wins() {
        let m = id("ann", "c1");
        let p = event(1, 1, 10, "ann", post("ann", "c1", "hi"));
        let bob_on_1 = event(1, 2, 11, "bob", react(m, "+1"));
        // Replica 1 had seen its own react (1:2) when bob took it back there.
        let observed_on_1: VersionVector = BTreeMap::from([(1u64, 2u64)]).into();
        let bob_off_on_1 = event(1, 3, 12, "bob", unreact(m, "+1", &observed_on_1));
        // Concurrently bob reacted again through replica 2, which had seen only the post.
        let bob_on_2 = event(2, 1, 12, "bob", react(m, "+1"));
        for order in [[&p, &bob_on_1, &bob_off_on_1, &bob_on_2], [&bob_on_2, &p, &bob_on_1, &bob_off_on_1]] {
            let log = log_of(&order.map(Clone::clone));
            let message = log.message(&m).expect("posted");
            assert_eq!(message.reactions, BTreeMap::from([("+1".to_owned(), BTreeSet::from([user("bob")]))]));
        }
        // Without the concurrent react, the unreact removes it.
        let log = log_of(&[p.clone(), bob_on_1.clone(), bob_off_on_1.clone()]);
        assert!(log.message(&m).expect("posted").reactions.is_empty());
        // An unreact by someone else removes nothing of bob's.
        let cy_off = event(1, 3, 12, "cy", unreact(m, "+1", &observed_on_1));
        let log = log_of(&[p, bob_on_1, cy_off]);
        assert_eq!(log.message(&m).expect("posted").reactions.len(), 1);
    }

    #[test]
    fn unreact_that_arrives_before_its_react_still_removes_it() {
        let m = id("ann", "c1");
        let observed: VersionVector = BTreeMap::from([(1u64, 2u64), (2, 1)]).into();
        let log = log_of(&[
            event(3, 1, 13, "bob", unreact(m, "+1", &observed)),
            event(2, 1, 11, "bob", react(m, "+1")),
            event(1, 1, 10, "ann", post("ann", "c1", "hi")),
            event(1, 2, 12, "bob", react(m, "+1")),
        ]);
        assert!(log.message(&m).expect("posted").reactions.is_empty());
    }

    #[test]
    fn stamp_orders_after_everything_held_and_seen() {
        let mut log = RoomLog::new(RoomId::from(ROOM));
        let mut clock = HlcClock::new();
        // A peer's event stamped ahead of this replica's wall clock.
        log.apply_event(event(2, 1, 5_000, "bob", post("bob", "b1", "from the future"))).expect("next");
        let stamp = log.stamp(&mut clock, ReplicaId(1), 1_000, None).expect("within drift");
        assert_eq!(stamp.dot, Dot::new(ReplicaId(1), 1));
        assert!(stamp.hlc > Hlc::new(5_000, 0));
        log.apply_event(stamp.event(user("ann"), post("ann", "a1", "reply"))).expect("next");
        // The client saw a message (on another replica) that this one does not hold yet.
        let seen = Hlc::new(9_000, 4);
        let stamp = log.stamp(&mut clock, ReplicaId(1), 1_000, Some(seen)).expect("within drift");
        assert_eq!(stamp.dot, Dot::new(ReplicaId(1), 2));
        assert!(stamp.hlc > seen);
        assert_eq!(bodies(&log), ["from the future", "reply"]);
        // A client cannot drag the clock beyond the drift limit.
        let too_far = Hlc::new(1_000 + crate::CLOCK_DRIFT_MS_MAX + 1, 0);
        assert!(matches!(log.stamp(&mut clock, ReplicaId(1), 1_000, Some(too_far)), Err(CrdtError::ClockDrift { .. })));
    }

    #[test]
    fn delta_since_is_gapless_and_bounded() {
        let mut source = RoomLog::new(RoomId::from(ROOM));
        for (replica, counter) in [(1, 1), (2, 1), (1, 2), (3, 1), (2, 2), (1, 3)] {
            let cid = format!("{replica}-{counter}");
            source.apply_event(event(replica, counter, 10 * counter, "ann", post("ann", &cid, &cid))).expect("next");
        }
        let mut target = RoomLog::new(RoomId::from(ROOM));
        target.apply_event(source.events().next().expect("1:1").clone()).expect("next");
        let mut rounds = 0;
        loop {
            let delta = source.delta_since(target.version_vector(), 2);
            assert!(delta.len() <= 2);
            if delta.is_empty() {
                break;
            }
            for event in delta {
                assert_eq!(target.apply_event(event), Ok(Applied::New));
            }
            rounds += 1;
        }
        assert_eq!(rounds, 3, "five missing events, two per round");
        assert_eq!(target, source);
        assert!(source.delta_since(&VersionVector::new(), 0).is_empty());
        // Bounded above too: the same events as filtering the whole delta, in the same order.
        let mut upto = VersionVector::new();
        upto.advance(Dot::new(ReplicaId(1), 2));
        upto.advance(Dot::new(ReplicaId(3), 1));
        let filtered: Vec<Event> = source
            .delta_since(&VersionVector::new(), usize::MAX)
            .into_iter()
            .filter(|e| upto.contains(e.dot))
            .collect();
        assert_eq!(source.delta_between(&VersionVector::new(), &upto, usize::MAX), filtered);
        assert_eq!(source.delta_between(&VersionVector::new(), &upto, 2), filtered[..2].to_vec());
        let dots: Vec<Dot> = filtered.iter().map(|e| e.dot).collect();
        assert_eq!(dots, [Dot::new(ReplicaId(1), 1), Dot::new(ReplicaId(1), 2), Dot::new(ReplicaId(3), 1)]);
    }

    #[test]
    fn merge_refuses_another_room() {
        let mut a = RoomLog::new(RoomId::from("a"));
        let b = RoomLog::new(RoomId::from("b"));
        assert_eq!(a.merge(&b), Err(CrdtError::RoomMismatch { room: RoomId::from("a"), other: RoomId::from("b") }));
    }

    #[test]
    fn pages_walk_history_both_ways() {
        let events: Vec<Event> =
            (1..=5).map(|i| event(1, i, 10 * i, "ann", post("ann", &i.to_string(), &i.to_string()))).collect();
        let log = log_of(&events);
        let page = |query: PageQuery| -> Vec<&str> { log.page(&query).iter().map(|m| m.body.as_str()).collect() };
        assert_eq!(page(PageQuery::latest(2)), ["5", "4"]);
        assert_eq!(page(PageQuery::before(events[3].position(), 2)), ["3", "2"]);
        assert_eq!(page(PageQuery::after(events[1].position(), 10)), ["3", "4", "5"]);
        let between = PageQuery {
            after: Some(events[0].position()),
            before: Some(events[4].position()),
            limit: 10,
            newest_first: false,
        };
        assert_eq!(page(between), ["2", "3", "4"]);
        let inverted = PageQuery { after: Some(events[3].position()), before: Some(events[1].position()), ..between };
        assert!(page(inverted).is_empty());
        let empty = PageQuery { after: Some(events[2].position()), before: Some(events[2].position()), ..between };
        assert!(page(empty).is_empty());
        assert!(page(PageQuery::latest(0)).is_empty());
        let after_all: Vec<_> = log.messages_after(Some(events[4].position())).collect();
        assert!(after_all.is_empty());
    }

    #[test]
    fn materialized_state_serializes_deterministically() {
        let m = id("ann", "c1");
        let events = [
            event(1, 1, 10, "ann", post("ann", "c1", "hi")),
            event(2, 1, 11, "bob", react(m, "+1")),
            event(2, 2, 12, "cy", react(m, "heart")),
            event(3, 1, 13, "bob", post("bob", "b1", "yo")),
        ];
        let forward = log_of(&events);
        let backward = log_of(&[events[3].clone(), events[1].clone(), events[2].clone(), events[0].clone()]);
        let bytes = |log: &RoomLog| postcard::to_allocvec(&log.messages().collect::<Vec<_>>()).expect("encode");
        assert_eq!(bytes(&forward), bytes(&backward));
        assert_eq!(forward, backward);
    }
}
