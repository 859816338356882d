//! What the chat client knows: the rooms, each room's messages, unread counts, which room is
//! shown. Plain data changed only by the methods here — applying a subscription's
//! `RoomEvent`, a `ListRooms` answer, a page of history, a join or a leave — so all of it is
//! unit-tested without a server or a terminal.
//!
//! - **No duplicates, no gaps.** Each room keeps the version vector of the message events it
//!   applied. An event whose dot `(replica, counter)` the vector already covers is a duplicate
//!   (a resubscription that resent it) and is dropped; the vector is what a resubscription
//!   starts from, so nothing between is lost.
//! - **Messages are upserted.** A `MessageEvent` carries the message as it is after the event
//!   (edited body, redaction, reactions), so applying one replaces the held copy; messages are
//!   ordered by their post's position `(wall_ms, logical, replica, counter)`.
//! - **Handles.** Every held message gets a number, its *handle*, shown in brackets and used by
//!   `/react N`, `/edit N`, `/redact N`. A handle never changes while the client runs. When a
//!   room's subscription first catches up, the messages held are numbered 1, 2, … in room
//!   order; later messages (live or loaded by `/history`) take the next numbers.
//! - **Unread counts.** Until a room's subscription has caught up and sent the room's side
//!   state, the count is the one `ListRooms` gave. From then on it is computed as the server
//!   does: messages after the caller's read marker, by others, not redacted. Viewing a room
//!   moves the marker to its newest message ([`ChatState::take_read_mark`]).
//! - **Bounded.** At most [`MESSAGES_KEPT_PER_ROOM`] messages per room; the oldest go first,
//!   and `/history` stops loading once a room holds that many. A room's first subscription
//!   sends all of it, so `/history` has older pages to load only in rooms larger than that.

use std::collections::BTreeMap;
use std::ops::Bound;

use palaver_proto::v1 as pb;
use palaver_proto::v1::room_event::Event;

/// Most messages the client holds per room.
pub const MESSAGES_KEPT_PER_ROOM: usize = 5_000;

/// A place in a room's total order; compares field by field, as the server orders messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Hybrid logical clock, wall part (ms since the Unix epoch).
    pub wall_ms: u64,
    /// Hybrid logical clock, logical part.
    pub logical: u32,
    /// The replica that accepted the event.
    pub replica: u64,
    /// The event's sequence number at that replica.
    pub counter: u64,
}

impl From<&pb::Position> for Position {
    fn from(p: &pb::Position) -> Self {
        Self { wall_ms: p.wall_ms, logical: p.logical, replica: p.replica, counter: p.counter }
    }
}

impl Position {
    /// The protobuf form.
    pub fn to_pb(self) -> pb::Position {
        pb::Position { wall_ms: self.wall_ms, logical: self.logical, replica: self.replica, counter: self.counter }
    }
}

/// A message as the chat view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownMessage {
    /// The number shown in brackets, stable while the client runs.
    pub handle: u64,
    /// The message id (32 hex digits).
    pub id: String,
    /// Its post's place in the room.
    pub position: Position,
    /// Who posted it.
    pub author: String,
    /// The text; empty once redacted.
    pub body: String,
    /// Whether it was edited.
    pub edited: bool,
    /// Whether it was redacted.
    pub redacted: bool,
    /// Reactions and who gave them.
    pub reactions: Vec<(String, Vec<String>)>,
}

/// The state of a room's subscription, for the room list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Receiving what the client lacked.
    CatchingUp,
    /// Caught up; events arrive as they happen.
    Live,
    /// The stream broke; resubscribing after a pause.
    Reconnecting,
}

/// One room the client knows of.
#[derive(Debug, Clone, Default)]
pub struct RoomView {
    /// The room id.
    pub name: String,
    /// Whether the caller is a member.
    pub member: bool,
    /// Title, from `ListRooms`.
    pub title: String,
    /// Users typing now (others only).
    pub typing: Vec<String>,
    /// The subscription's state (`None`: not subscribed).
    pub link: Option<Link>,
    /// Whether older messages may exist than the ones held.
    pub older_pages: bool,
    /// Whether the subscription has caught up at least once.
    caught_up: bool,
    /// Whether the room's side state (read markers) has arrived.
    side_seen: bool,
    /// The unread count `ListRooms` gave.
    listed_unread: u64,
    /// The caller's read marker.
    read_marker: Option<Position>,
    /// Message events applied: replica -> highest counter.
    version_vector: BTreeMap<u64, u64>,
    /// Position -> message id, in room order.
    order: BTreeMap<Position, String>,
    /// Message id -> message.
    messages: BTreeMap<String, ShownMessage>,
    /// Handle -> message id.
    handles: BTreeMap<u64, String>,
    /// The next handle to give.
    next_handle: u64,
    /// Whether the messages were numbered in room order at the first catch-up.
    numbered: bool,
    /// Whether messages were dropped for the limit (so older ones exist than those held).
    trimmed: bool,
}

impl RoomView {
    fn new(name: &str) -> Self {
        Self { name: name.to_owned(), next_handle: 1, older_pages: true, ..Self::default() }
    }

    /// The messages held, oldest first.
    pub fn messages(&self) -> impl Iterator<Item = &ShownMessage> {
        self.order.values().filter_map(|id| self.messages.get(id))
    }

    /// How many messages are held.
    #[cfg(test)]
    pub fn message_count(&self) -> usize {
        self.order.len()
    }

    /// The message with this handle.
    pub fn by_handle(&self, handle: u64) -> Option<&ShownMessage> {
        self.handles.get(&handle).and_then(|id| self.messages.get(id))
    }

    /// The message with this id.
    pub fn by_id(&self, id: &str) -> Option<&ShownMessage> {
        self.messages.get(id)
    }

    /// The newest message's position.
    pub fn newest(&self) -> Option<Position> {
        self.order.last_key_value().map(|(position, _)| *position)
    }

    /// The oldest message's position.
    pub fn oldest(&self) -> Option<Position> {
        self.order.first_key_value().map(|(position, _)| *position)
    }

    /// The version vector to resubscribe from.
    pub fn version_vector(&self) -> BTreeMap<u64, u64> {
        self.version_vector.clone()
    }

    /// Unread messages for `me`: the `ListRooms` count until the room's read markers are
    /// known, then the messages after `me`'s marker that others posted and nobody redacted.
    pub fn unread(&self, me: &str) -> u64 {
        if !(self.caught_up && self.side_seen) {
            return self.listed_unread;
        }
        let after = match self.read_marker {
            Some(marker) => (Bound::Excluded(marker), Bound::Unbounded),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let unread = self
            .order
            .range(after)
            .filter_map(|(_, id)| self.messages.get(id))
            .filter(|m| !m.redacted && m.author != me)
            .count();
        u64::try_from(unread).unwrap_or(u64::MAX)
    }

    /// Apply a message event; false if it was a duplicate (or carried no position).
    fn apply_message(&mut self, event: &pb::MessageEvent) -> bool {
        let Some(position) = event.position.as_ref() else {
            return false;
        };
        let held = self.version_vector.entry(position.replica).or_default();
        if position.counter <= *held {
            return false;
        }
        *held = position.counter;
        if let Some(message) = &event.message {
            self.upsert(message);
            self.trim();
        }
        true
    }

    /// Insert or replace a message; its handle stays.
    fn upsert(&mut self, message: &pb::Message) {
        let position = message.position.as_ref().map(Position::from).unwrap_or_default();
        let reactions = message.reactions.iter().map(|r| (r.reaction.clone(), r.users.clone())).collect();
        if let Some(held) = self.messages.get_mut(&message.message_id) {
            held.body.clone_from(&message.body);
            held.edited = message.edited;
            held.redacted = message.redacted;
            held.reactions = reactions;
            return;
        }
        let handle = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(handle, message.message_id.clone());
        self.order.insert(position, message.message_id.clone());
        let shown = ShownMessage {
            handle,
            id: message.message_id.clone(),
            position,
            author: message.author.clone(),
            body: message.body.clone(),
            edited: message.edited,
            redacted: message.redacted,
            reactions,
        };
        self.messages.insert(message.message_id.clone(), shown);
    }

    /// Drop the oldest messages beyond [`MESSAGES_KEPT_PER_ROOM`].
    fn trim(&mut self) {
        while self.order.len() > MESSAGES_KEPT_PER_ROOM {
            let Some((_, id)) = self.order.pop_first() else { break };
            if let Some(dropped) = self.messages.remove(&id) {
                self.handles.remove(&dropped.handle);
            }
            self.older_pages = true;
            self.trimmed = true;
        }
    }

    /// Number the held messages 1, 2, … in room order (once, at the first catch-up).
    fn number(&mut self) {
        self.handles.clear();
        for (index, id) in self.order.values().enumerate() {
            let handle = u64::try_from(index).unwrap_or(u64::MAX).saturating_add(1);
            if let Some(message) = self.messages.get_mut(id) {
                message.handle = handle;
            }
            self.handles.insert(handle, id.clone());
        }
        self.next_handle = u64::try_from(self.order.len()).unwrap_or(u64::MAX).saturating_add(1);
        self.numbered = true;
    }
}

/// Everything the client knows.
#[derive(Debug, Clone)]
pub struct ChatState {
    /// The logged-in user.
    pub me: String,
    /// Rooms by id.
    rooms: BTreeMap<String, RoomView>,
    /// The room shown.
    current: Option<String>,
}

impl ChatState {
    /// No rooms yet.
    pub fn new(me: &str) -> Self {
        Self { me: me.to_owned(), rooms: BTreeMap::new(), current: None }
    }

    /// A room, if known.
    pub fn room(&self, name: &str) -> Option<&RoomView> {
        self.rooms.get(name)
    }

    /// Every known room, by id.
    pub fn rooms(&self) -> impl Iterator<Item = &RoomView> {
        self.rooms.values()
    }

    /// The room shown.
    pub fn current(&self) -> Option<&RoomView> {
        self.current.as_ref().and_then(|name| self.rooms.get(name))
    }

    /// The id of the room shown.
    pub fn current_name(&self) -> Option<&str> {
        self.current.as_deref()
    }

    fn room_mut(&mut self, name: &str) -> &mut RoomView {
        self.rooms.entry(name.to_owned()).or_insert_with(|| RoomView::new(name))
    }

    /// Take a `ListRooms` answer: rooms and their unread counts. Rooms the caller is not a
    /// member of and the answer no longer lists are forgotten.
    pub fn set_rooms(&mut self, listed: &[pb::RoomSummary]) {
        for summary in listed {
            let room = self.room_mut(&summary.room);
            room.member = summary.my_role != pb::Role::Unspecified as i32;
            room.title.clone_from(&summary.title);
            room.listed_unread = summary.unread_count;
        }
        let current = self.current.clone();
        self.rooms.retain(|name, room| {
            room.member || current.as_deref() == Some(name) || listed.iter().any(|s| s.room == *name)
        });
        self.clear_unread_of_current();
    }

    /// The caller joined (or created) `room`: it becomes a member and the room shown.
    pub fn joined(&mut self, room: &str) {
        self.room_mut(room).member = true;
        self.select(room);
    }

    /// The caller left `room`; another joined room is shown, if any.
    pub fn left(&mut self, room: &str) {
        if let Some(view) = self.rooms.get_mut(room) {
            view.member = false;
            view.link = None;
            view.typing.clear();
        }
        if self.current.as_deref() == Some(room) {
            self.current = self.joined_rooms().first().map(|name| (*name).to_owned());
        }
    }

    /// Record the state of a room's subscription.
    pub fn set_link(&mut self, room: &str, link: Option<Link>) {
        self.room_mut(room).link = link;
    }

    /// Show `room` if it is known and joined; false otherwise.
    pub fn select(&mut self, room: &str) -> bool {
        if !self.rooms.get(room).is_some_and(|r| r.member) {
            return false;
        }
        self.current = Some(room.to_owned());
        self.clear_unread_of_current();
        true
    }

    /// Show the joined room `step` places after (or before, if negative) the current one.
    pub fn select_next(&mut self, step: isize) {
        let joined: Vec<String> = self.joined_rooms().iter().map(|name| (*name).to_owned()).collect();
        if joined.is_empty() {
            return;
        }
        let count = isize::try_from(joined.len()).unwrap_or(isize::MAX);
        let at = self.current.as_ref().and_then(|c| joined.iter().position(|name| name == c));
        let next = match at {
            Some(at) => (isize::try_from(at).unwrap_or(0) + step).rem_euclid(count),
            None => 0,
        };
        if let Some(name) = joined.get(usize::try_from(next).unwrap_or(0)) {
            self.select(name);
        }
    }

    /// The rooms the caller is a member of, by id.
    pub fn joined_rooms(&self) -> Vec<&str> {
        self.rooms.values().filter(|r| r.member).map(|r| r.name.as_str()).collect()
    }

    /// Apply one subscription event; false if it changed nothing (a duplicate message event).
    pub fn apply(&mut self, event: &pb::RoomEvent) -> bool {
        let me = self.me.clone();
        let changed = match &event.event {
            None => false,
            Some(Event::Message(message)) => self.room_mut(&event.room).apply_message(message),
            Some(Event::Membership(change)) => {
                let room = self.room_mut(&event.room);
                if change.user == me {
                    match change.change.as_str() {
                        "created" | "joined" => room.member = true,
                        "left" | "kicked" | "banned" | "deleted" => room.member = false,
                        _ => {}
                    }
                }
                if change.change == "deleted" {
                    room.member = false;
                }
                true
            }
            Some(Event::State(state)) => {
                let room = self.room_mut(&event.room);
                room.typing = state.typing.iter().filter(|user| **user != me).cloned().collect();
                if let Some(marker) = state.read_markers.get(&me).map(Position::from) {
                    room.read_marker = room.read_marker.max(Some(marker));
                }
                room.side_seen = true;
                true
            }
            Some(Event::CaughtUp(_)) => {
                let room = self.room_mut(&event.room);
                room.caught_up = true;
                room.link = Some(Link::Live);
                if !room.numbered {
                    room.number();
                    // The first subscription sent the whole room: older pages exist only if
                    // some were dropped for the limit.
                    room.older_pages = room.trimmed;
                }
                true
            }
        };
        if self.current.as_deref() == Some(event.room.as_str())
            && !self.rooms.get(&event.room).is_some_and(|r| r.member)
        {
            let room = event.room.clone();
            self.left(&room);
        }
        self.clear_unread_of_current();
        changed
    }

    /// Add a page of older history to `room`; returns how many messages were new.
    pub fn add_history(&mut self, room: &str, page: &[pb::Message], more: bool) -> usize {
        let view = self.room_mut(room);
        let mut added = 0;
        for message in page {
            if view.order.len() >= MESSAGES_KEPT_PER_ROOM {
                break;
            }
            if !view.messages.contains_key(&message.message_id) {
                view.upsert(message);
                added += 1;
            }
        }
        view.older_pages = more && view.order.len() < MESSAGES_KEPT_PER_ROOM;
        added
    }

    /// If the room shown has messages after the caller's read marker, move the marker to the
    /// newest and return the room and position to send in `MarkRead`.
    pub fn take_read_mark(&mut self) -> Option<(String, Position)> {
        let name = self.current.clone()?;
        let room = self.rooms.get_mut(&name)?;
        let newest = room.newest()?;
        if !room.member || room.read_marker.is_some_and(|marker| marker >= newest) {
            return None;
        }
        room.read_marker = Some(newest);
        room.listed_unread = 0;
        Some((name, newest))
    }

    fn clear_unread_of_current(&mut self) {
        if let Some(room) = self.current.as_ref().and_then(|name| self.rooms.get_mut(name)) {
            room.listed_unread = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(wall_ms: u64, replica: u64, counter: u64) -> pb::Position {
        pb::Position { wall_ms, logical: 0, replica, counter }
    }

    fn message(id: &str, author: &str, body: &str, at: pb::Position) -> pb::Message {
        pb::Message {
            message_id: id.into(),
            position: Some(at),
            author: author.into(),
            body: body.into(),
            ..Default::default()
        }
    }

    fn event(room: &str, kind: pb::MessageEventKind, at: pb::Position, message: pb::Message) -> pb::RoomEvent {
        let actor = message.author.clone();
        let event = pb::MessageEvent {
            position: Some(at),
            kind: kind as i32,
            message_id: message.message_id.clone(),
            actor,
            message: Some(message),
        };
        pb::RoomEvent { room: room.into(), event: Some(Event::Message(event)) }
    }

    fn posted(room: &str, id: &str, author: &str, body: &str, at: pb::Position) -> pb::RoomEvent {
        event(room, pb::MessageEventKind::Posted, at, message(id, author, body, at))
    }

    fn caught_up(room: &str) -> pb::RoomEvent {
        pb::RoomEvent { room: room.into(), event: Some(Event::CaughtUp(pb::VersionVector::default())) }
    }

    fn side(room: &str, marker_of_me: Option<pb::Position>) -> pb::RoomEvent {
        let mut state = pb::RoomState::default();
        if let Some(marker) = marker_of_me {
            state.read_markers.insert("ann".into(), marker);
        }
        state.typing = vec!["ann".into(), "bob".into()];
        pb::RoomEvent { room: room.into(), event: Some(Event::State(state)) }
    }

    fn listed(room: &str, member: bool, unread: u64) -> pb::RoomSummary {
        let my_role = if member { pb::Role::Member } else { pb::Role::Unspecified };
        pb::RoomSummary { room: room.into(), my_role: my_role as i32, unread_count: unread, ..Default::default() }
    }

    fn bodies(state: &ChatState, room: &str) -> Vec<(u64, String)> {
        state.room(room).map(|r| r.messages().map(|m| (m.handle, m.body.clone())).collect()).unwrap_or_default()
    }

    #[test]
    fn events_are_applied_once_in_room_order_and_numbered_at_catch_up() {
        let mut state = ChatState::new("ann");
        // The backlog comes per replica, not in room order.
        assert!(state.apply(&posted("general", "b", "bob", "second", position(20, 2, 1))));
        assert!(state.apply(&posted("general", "a", "cy", "first", position(10, 1, 1))));
        assert!(!state.apply(&posted("general", "a", "cy", "first", position(10, 1, 1))), "a resent event");
        assert!(state.apply(&caught_up("general")));
        assert_eq!(bodies(&state, "general"), vec![(1, "first".into()), (2, "second".into())]);
        // A live message takes the next handle; a resubscription resends an old dot: dropped.
        assert!(state.apply(&posted("general", "c", "bob", "third", position(30, 2, 2))));
        assert!(!state.apply(&posted("general", "b", "bob", "second", position(20, 2, 1))));
        assert!(state.apply(&caught_up("general")));
        assert_eq!(bodies(&state, "general").last(), Some(&(3, "third".into())));
        let room = state.room("general").expect("room");
        assert_eq!(room.version_vector(), BTreeMap::from([(1, 1), (2, 2)]));
        assert_eq!(room.by_handle(2).map(|m| m.id.as_str()), Some("b"));
    }

    #[test]
    fn an_event_replaces_the_message_it_touched_and_keeps_its_handle() {
        let mut state = ChatState::new("ann");
        let at = position(10, 1, 1);
        state.apply(&posted("general", "a", "bob", "helo", at));
        state.apply(&caught_up("general"));
        let mut edited = message("a", "bob", "hello", at);
        edited.edited = true;
        state.apply(&event("general", pb::MessageEventKind::Edited, position(11, 1, 2), edited.clone()));
        edited.reactions = vec![pb::Reaction { reaction: "+1".into(), users: vec!["ann".into()] }];
        state.apply(&event("general", pb::MessageEventKind::Reacted, position(12, 3, 1), edited.clone()));
        let shown = state.room("general").and_then(|r| r.by_handle(1)).expect("handle 1").clone();
        assert_eq!((shown.body.as_str(), shown.edited), ("hello", true));
        assert_eq!(shown.reactions, vec![("+1".to_string(), vec!["ann".to_string()])]);
        let mut redacted = message("a", "bob", "", at);
        redacted.redacted = true;
        state.apply(&event("general", pb::MessageEventKind::Redacted, position(13, 1, 3), redacted));
        let shown = state.room("general").and_then(|r| r.by_id("a")).expect("held");
        assert!(shown.redacted && shown.body.is_empty() && shown.reactions.is_empty());
        assert_eq!(state.room("general").map(RoomView::message_count), Some(1));
    }

    #[test]
    fn unread_counts_come_from_the_listing_then_from_the_read_marker() {
        let mut state = ChatState::new("ann");
        state.set_rooms(&[listed("general", true, 7), listed("random", true, 0), listed("public", false, 0)]);
        assert_eq!(state.joined_rooms(), vec!["general", "random"]);
        assert!(state.select("random"));
        let general = |s: &ChatState| s.room("general").map(|r| r.unread("ann"));
        assert_eq!(general(&state), Some(7), "the listing's count until the room caught up");
        state.apply(&posted("general", "a", "bob", "one", position(10, 1, 1)));
        state.apply(&posted("general", "b", "ann", "mine", position(20, 1, 2)));
        state.apply(&posted("general", "c", "bob", "two", position(30, 1, 3)));
        state.apply(&caught_up("general"));
        assert_eq!(general(&state), Some(7), "read markers not known yet");
        state.apply(&side("general", Some(position(10, 1, 1))));
        assert_eq!(general(&state), Some(1), "after the marker, by others: only 'two'");
        state.apply(&posted("general", "d", "bob", "three", position(40, 2, 1)));
        assert_eq!(general(&state), Some(2), "a live message in a room not shown counts");
        // Viewing the room reads it: the marker moves to the newest message, once.
        assert!(state.select("general"));
        assert_eq!(state.take_read_mark(), Some(("general".into(), Position::from(&position(40, 2, 1)))));
        assert_eq!(state.take_read_mark(), None);
        assert_eq!(general(&state), Some(0));
        // An older marker from the server does not move it back.
        state.apply(&side("general", Some(position(10, 1, 1))));
        assert_eq!(general(&state), Some(0));
        assert_eq!(state.room("general").map(|r| r.typing.clone()), Some(vec!["bob".to_string()]));
    }

    #[test]
    fn rooms_are_switched_among_joined_ones_and_leaving_shows_another() {
        let mut state = ChatState::new("ann");
        state.set_rooms(&[listed("a", true, 0), listed("b", false, 0), listed("c", true, 0)]);
        assert!(!state.select("b"), "not a member");
        assert!(!state.select("zzz"), "unknown");
        state.select_next(1);
        assert_eq!(state.current_name(), Some("a"));
        state.select_next(1);
        assert_eq!(state.current_name(), Some("c"));
        state.select_next(1);
        assert_eq!(state.current_name(), Some("a"), "wraps around");
        state.select_next(-1);
        assert_eq!(state.current_name(), Some("c"));
        state.joined("b");
        assert_eq!(state.current_name(), Some("b"));
        state.left("b");
        assert_eq!(state.current_name(), Some("a"));
        // Being kicked (a membership event about me) leaves too.
        state.select("c");
        let kicked = pb::MembershipEvent { user: "ann".into(), change: "kicked".into(), actor: "bob".into(), role: 0 };
        state.apply(&pb::RoomEvent { room: "c".into(), event: Some(Event::Membership(kicked)) });
        assert_eq!(state.joined_rooms(), vec!["a"]);
        assert_eq!(state.current_name(), Some("a"));
    }

    #[test]
    fn history_pages_add_older_messages_once() {
        let mut state = ChatState::new("ann");
        state.apply(&posted("general", "c", "bob", "new", position(30, 1, 3)));
        state.apply(&caught_up("general"));
        assert_eq!(state.room("general").map(|r| r.older_pages), Some(false), "the subscription sent it all");
        let page = vec![message("c", "bob", "new", position(30, 1, 3)), message("b", "cy", "old", position(20, 1, 2))];
        assert_eq!(state.add_history("general", &page, true), 1);
        assert_eq!(state.add_history("general", &page, false), 0);
        assert_eq!(bodies(&state, "general"), vec![(2, "old".into()), (1, "new".into())]);
        assert_eq!(state.room("general").map(|r| r.older_pages), Some(false));
        assert_eq!(state.room("general").and_then(RoomView::oldest), Some(Position::from(&position(20, 1, 2))));
    }

    #[test]
    fn a_room_holds_at_most_its_limit_of_messages() {
        let mut state = ChatState::new("ann");
        let over = u64::try_from(MESSAGES_KEPT_PER_ROOM).expect("fits") + 10;
        for i in 1..=over {
            state.apply(&posted("busy", &format!("m{i}"), "bob", "x", position(i, 1, i)));
        }
        let room = state.room("busy").expect("room");
        assert_eq!(room.message_count(), MESSAGES_KEPT_PER_ROOM);
        assert_eq!(room.oldest(), Some(Position::from(&position(11, 1, 11))), "the oldest went first");
        assert!(room.by_handle(1).is_none());
        state.apply(&caught_up("busy"));
        assert_eq!(state.room("busy").map(|r| r.older_pages), Some(true), "dropped messages can be loaded again");
        let page = vec![message("m1", "bob", "x", position(1, 1, 1))];
        assert_eq!(state.add_history("busy", &page, true), 0, "history stops at the limit");
    }
}
