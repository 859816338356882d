//! Read markers: how far each user has read in a room.
//!
//! Per user, a max-register of [`Position`]: marking only ever moves the marker forward, so a
//! stale mark from a slow device cannot un-read messages, and merge is the pointwise maximum.

use std::collections::BTreeMap;

use palaver_ids::UserName;
use serde::{Deserialize, Serialize};

use crate::message_log::{Position, RoomLog};

/// The read markers of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadMarkers {
    markers: BTreeMap<UserName, Position>,
}

impl ReadMarkers {
    /// Nobody has read anything.
    pub fn new() -> Self {
        ReadMarkers::default()
    }

    /// `user` has read up to and including `position`. Returns whether the marker moved (it
    /// never moves back).
    pub fn mark(&mut self, user: UserName, position: Position) -> bool {
        crate::register::keep_greater(&mut self.markers, user, position, |new, held| new > held)
    }

    /// Take every marker of `other` that is further along.
    pub fn merge(&mut self, other: &ReadMarkers) {
        for (user, position) in &other.markers {
            self.mark(user.clone(), *position);
        }
    }

    /// Every marker, by user.
    pub fn iter(&self) -> impl Iterator<Item = (&UserName, &Position)> {
        self.markers.iter()
    }

    /// `user`'s marker, if they have read anything.
    pub fn marker(&self, user: &UserName) -> Option<Position> {
        self.markers.get(user).copied()
    }

    /// How many messages of `log` after `user`'s marker are unread: not redacted and not
    /// written by `user`. Costs one step per message after the marker.
    pub fn unread_count(&self, user: &UserName, log: &RoomLog) -> u64 {
        let unread = log
            .messages_after(self.marker(user))
            .filter(|message| !message.redacted && message.author != *user)
            .count();
        u64::try_from(unread).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::hlc::Hlc;
    use crate::message_log::{Event, EventKind, MessageId};
    use crate::version_vector::{Dot, ReplicaId};
    use palaver_ids::RoomId;

    fn position(wall_ms: u64, replica: u64, counter: u64) -> Position {
        Position::new(Hlc::new(wall_ms, 0), Dot::new(ReplicaId(replica), counter))
    }

    #[test]
    fn marker_never_moves_back() {
        let ann = UserName::from("ann");
        let mut markers = ReadMarkers::new();
        assert!(markers.mark(ann.clone(), position(20, 1, 2)));
        assert!(!markers.mark(ann.clone(), position(10, 1, 1)));
        assert!(!markers.mark(ann.clone(), position(20, 1, 2)));
        assert_eq!(markers.marker(&ann), Some(position(20, 1, 2)));
        assert!(markers.mark(ann.clone(), position(20, 2, 1)), "same stamp, later replica");
        let mut stale = ReadMarkers::new();
        stale.mark(ann.clone(), position(5, 3, 1));
        markers.merge(&stale);
        assert_eq!(markers.marker(&ann), Some(position(20, 2, 1)));
    }

    #[test]
    fn unread_counts_visible_messages_of_others_after_the_marker() {
        let room = RoomId::from("general");
        let mut log = RoomLog::new(room.clone());
        let mut positions = Vec::new();
        for (counter, author) in [(1, "bob"), (2, "ann"), (3, "bob"), (4, "cy"), (5, "bob")] {
            let client_message_id = counter.to_string();
            let event = Event {
                dot: Dot::new(ReplicaId(1), counter),
                hlc: Hlc::new(10 * counter, 0),
                author: UserName::from(author),
                kind: EventKind::Post {
                    message_id: MessageId::derive(&room, &UserName::from(author), &client_message_id),
                    client_message_id,
                    body: "x".to_owned(),
                },
            };
            positions.push(event.position());
            log.apply_event(event).expect("next");
        }
        let redact = Event {
            dot: Dot::new(ReplicaId(1), 6),
            hlc: Hlc::new(60, 0),
            author: UserName::from("cy"),
            kind: EventKind::Redact { message_id: MessageId::derive(&room, &UserName::from("cy"), "4") },
        };
        log.apply_event(redact).expect("next");

        let ann = UserName::from("ann");
        let mut markers = ReadMarkers::new();
        assert_eq!(markers.unread_count(&ann, &log), 3, "bob's three; ann's own and the redacted one don't count");
        markers.mark(ann.clone(), positions[0]);
        assert_eq!(markers.unread_count(&ann, &log), 2);
        markers.mark(ann.clone(), positions[4]);
        assert_eq!(markers.unread_count(&ann, &log), 0);
        assert_eq!(markers.unread_count(&UserName::from("bob"), &log), 1, "only ann's");
    }

    fn arb_markers() -> impl Strategy<Value = ReadMarkers> {
        prop::collection::vec((0..3u8, 0..4u64, 1..3u64, 1..4u64), 0..8).prop_map(|marks| {
            let mut markers = ReadMarkers::new();
            for (u, wall, replica, counter) in marks {
                markers.mark(UserName(format!("u{u}")), position(wall, replica, counter));
            }
            markers
        })
    }

    fn merged(a: &ReadMarkers, b: &ReadMarkers) -> ReadMarkers {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn merge_is_commutative_associative_idempotent(a in arb_markers(), b in arb_markers(), c in arb_markers()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
        }
    }
}
