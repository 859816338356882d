//! `palaver chat --plain`: line mode, for scripts and pipes.
//!
//! Logs in (with `--register`, registers first; a taken name is fine), joins `--room` (being
//! a member already is fine) and subscribes to it. Then every line read from standard input is
//! posted to the room, one post at a time and in order (blank lines are skipped), and every
//! event of the room is printed to standard output, one line each, once each, in the order the
//! subscription delivers them (the room's backlog first):
//!
//! ```text
//! ROOM AUTHOR: BODY                      a post
//! ROOM * ACTOR edited ID: BODY           an edit, with the new body
//! ROOM * ACTOR redacted ID               a redaction
//! ROOM * ACTOR reacted REACTION to ID    a reaction
//! ROOM * ACTOR unreacted REACTION to ID  a reaction taken back
//! ROOM * USER CHANGE                     a membership change of USER by USER:
//!                                        created, joined, left, deleted, settings
//! ROOM * USER CHANGE by ACTOR            ... by someone else: invited, kicked, banned,
//!                                        unbanned, role (followed by the new role)
//! ```
//!
//! `ID` is the first 8 hex digits of the message id. User names never contain spaces or `*`,
//! so the second word tells a post (`AUTHOR:`) from an event (`*`). Bodies are escaped to one
//! line: a backslash is written `\\`, a newline `\n`, a carriage return `\r`, any other control
//! character `\u{HEX}`.
//!
//! At the end of standard input the client waits until each of its own posts has come back on
//! the subscription (at most [`DRAIN_TIMEOUT_MS`]), then exits: 0, or 1 if a post was refused
//! (each refusal is reported on standard error as it happens). A failed login, join or
//! subscription exits 1 at once with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use palaver_proto::v1 as pb;
use palaver_proto::v1::room_event::Event;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::session::{self, INCOMING_QUEUE_EVENTS, Incoming, Session, Subscriptions};
use super::state::{ChatState, ShownMessage};

/// How long the client waits at the end of its input for its own posts to come back.
pub const DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Hex digits of a message id shown in event lines.
pub const SHORT_ID_DIGITS: usize = 8;

/// Run line mode for `user` in `room`.
pub async fn run(addr: &str, user: &str, password: &str, register: bool, room: &str) -> anyhow::Result<()> {
    let client = session::connect(addr)?;
    let session = Session::login(client, user, password, register).await.map_err(anyhow::Error::msg)?;
    session.join(room).await.map_err(|s| anyhow::anyhow!("cannot join {room}: {}", session::describe(&s)))?;
    let (sender, mut incoming) = mpsc::channel(INCOMING_QUEUE_EVENTS);
    let mut subscriptions = Subscriptions::default();
    subscriptions.start(&session, room, BTreeMap::new(), &sender);
    drop(sender);
    let mut plain = Plain { state: ChatState::new(user), own_pending: BTreeSet::new() };
    let result = plain.serve(&session, room, &mut incoming).await;
    subscriptions.shutdown().await;
    let refused = result?;
    anyhow::ensure!(refused == 0, "{refused} posts were refused");
    Ok(())
}

struct Plain {
    state: ChatState,
    /// Ids of the client's own posts not yet seen on the subscription.
    own_pending: BTreeSet<String>,
}

impl Plain {
    /// Post standard input, print events; returns how many posts were refused.
    async fn serve(
        &mut self,
        session: &Session,
        room: &str,
        incoming: &mut mpsc::Receiver<Incoming>,
    ) -> anyhow::Result<usize> {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut refused = 0;
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line.context("read standard input")? else { break };
                    if line.trim().is_empty() {
                        continue;
                    }
                    let seen = self.state.room(room).and_then(|r| r.newest());
                    match session.post(room, &line, seen).await {
                        Ok(posted) => {
                            if self.state.room(room).and_then(|r| r.by_id(&posted.message_id)).is_none() {
                                self.own_pending.insert(posted.message_id);
                            }
                        }
                        Err(status) => {
                            eprintln!("palaver chat: post refused: {}", session::describe(&status));
                            refused += 1;
                        }
                    }
                }
                next = incoming.recv() => self.take(next)?,
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(DRAIN_TIMEOUT_MS);
        while !self.own_pending.is_empty() {
            match tokio::time::timeout_at(deadline, incoming.recv()).await {
                Ok(next) => self.take(next)?,
                Err(_) => {
                    eprintln!(
                        "palaver chat: {} of my posts did not come back within {DRAIN_TIMEOUT_MS} ms",
                        self.own_pending.len()
                    );
                    break;
                }
            }
        }
        Ok(refused)
    }

    /// Handle what a subscription task sent.
    fn take(&mut self, next: Option<Incoming>) -> anyhow::Result<()> {
        match next {
            Some(Incoming::Event(event)) => {
                let before = match &event.event {
                    Some(Event::Message(m)) => {
                        self.state.room(&event.room).and_then(|r| r.by_id(&m.message_id)).cloned()
                    }
                    _ => None,
                };
                if self.state.apply(&event) {
                    if let Some(line) = event_line(&event, before.as_ref()) {
                        println!("{line}");
                    }
                    if let Some(Event::Message(m)) = &event.event {
                        self.own_pending.remove(&m.message_id);
                    }
                }
                Ok(())
            }
            Some(Incoming::Link { room, error: Some(error), .. }) => {
                eprintln!("palaver chat: {room}: resubscribing after: {error}");
                Ok(())
            }
            Some(Incoming::Link { .. }) => Ok(()),
            Some(Incoming::Ended { room, reason }) => anyhow::bail!("the subscription to {room} ended: {reason}"),
            None => anyhow::bail!("the subscription ended"),
        }
    }
}

/// The output line of one event (`None` for events not printed: catch-up markers and side
/// state). `before` is the message as it was before the event, if it was held, to tell which
/// reaction changed.
pub fn event_line(event: &pb::RoomEvent, before: Option<&ShownMessage>) -> Option<String> {
    let room = &event.room;
    match event.event.as_ref()? {
        Event::Message(m) => {
            let id = short_id(&m.message_id);
            let actor = &m.actor;
            let kind = pb::MessageEventKind::try_from(m.kind).unwrap_or(pb::MessageEventKind::Unspecified);
            let message = m.message.as_ref();
            Some(match kind {
                pb::MessageEventKind::Posted => {
                    let author = message.map_or(actor.as_str(), |m| m.author.as_str());
                    format!("{room} {author}: {}", escape(message.map_or("", |m| m.body.as_str())))
                }
                pb::MessageEventKind::Edited => {
                    format!("{room} * {actor} edited {id}: {}", escape(message.map_or("", |m| m.body.as_str())))
                }
                pb::MessageEventKind::Redacted => format!("{room} * {actor} redacted {id}"),
                pb::MessageEventKind::Reacted | pb::MessageEventKind::Unreacted => {
                    let added = kind == pb::MessageEventKind::Reacted;
                    let now = reactions_of(actor, message.map(|m| m.reactions.iter().map(|r| (&r.reaction, &r.users))));
                    let then = reactions_of(actor, before.map(|b| b.reactions.iter().map(|(r, users)| (r, users))));
                    let changed: Vec<&str> = if added {
                        now.iter().filter(|r| !then.contains(*r)).copied().collect()
                    } else {
                        then.iter().filter(|r| !now.contains(*r)).copied().collect()
                    };
                    let shown = if changed.is_empty() { "?".to_owned() } else { changed.join(",") };
                    let verb = if added { "reacted" } else { "unreacted" };
                    format!("{room} * {actor} {verb} {shown} to {id}")
                }
                pb::MessageEventKind::Unspecified => format!("{room} * {actor} changed {id}"),
            })
        }
        Event::Membership(change) => {
            let mut line = format!("{room} * {} {}", change.user, change.change);
            if change.change == "role" {
                let role = pb::Role::try_from(change.role).unwrap_or(pb::Role::Unspecified);
                line.push(' ');
                line.push_str(role_name(role));
            }
            if change.actor != change.user {
                line.push_str(" by ");
                line.push_str(&change.actor);
            }
            Some(line)
        }
        Event::State(_) | Event::CaughtUp(_) => None,
    }
}

/// The reactions `actor` gave, in order.
fn reactions_of<'a, I>(actor: &str, reactions: Option<I>) -> Vec<&'a str>
where
    I: Iterator<Item = (&'a String, &'a Vec<String>)>,
{
    let Some(reactions) = reactions else { return Vec::new() };
    reactions.filter(|(_, users)| users.iter().any(|u| u == actor)).map(|(r, _)| r.as_str()).collect()
}

fn role_name(role: pb::Role) -> &'static str {
    match role {
        pb::Role::Unspecified => "none",
        pb::Role::Member => "member",
        pb::Role::Admin => "admin",
        pb::Role::Owner => "owner",
    }
}

/// The first [`SHORT_ID_DIGITS`] characters of a message id.
pub fn short_id(id: &str) -> &str {
    id.get(..SHORT_ID_DIGITS).unwrap_or(id)
}

/// A body on one line: backslashes doubled, newlines and other control characters escaped.
pub fn escape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    for c in body.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn message_event(kind: pb::MessageEventKind, actor: &str, message: pb::Message) -> pb::RoomEvent {
        let event = pb::MessageEvent {
            position: Some(pb::Position { wall_ms: 1, logical: 0, replica: 1, counter: 1 }),
            kind: kind as i32,
            message_id: ID.into(),
            actor: actor.into(),
            message: Some(message),
        };
        pb::RoomEvent { room: "general".into(), event: Some(Event::Message(event)) }
    }

    fn message(body: &str, reactions: &[(&str, &[&str])]) -> pb::Message {
        pb::Message {
            message_id: ID.into(),
            author: "olga".into(),
            body: body.into(),
            reactions: reactions
                .iter()
                .map(|(r, users)| pb::Reaction {
                    reaction: (*r).into(),
                    users: users.iter().map(|u| (*u).to_owned()).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn shown(reactions: &[(&str, &[&str])]) -> ShownMessage {
        ShownMessage {
            handle: 1,
            id: ID.into(),
            position: Default::default(),
            author: "olga".into(),
            body: "hi".into(),
            edited: false,
            redacted: false,
            reactions: reactions
                .iter()
                .map(|(r, u)| ((*r).to_owned(), u.iter().map(|x| (*x).to_owned()).collect()))
                .collect(),
        }
    }

    fn membership(user: &str, change: &str, actor: &str, role: pb::Role) -> pb::RoomEvent {
        let change =
            pb::MembershipEvent { user: user.into(), change: change.into(), actor: actor.into(), role: role as i32 };
        pb::RoomEvent { room: "general".into(), event: Some(Event::Membership(change)) }
    }

    #[test]
    fn every_event_has_its_line() {
        use pb::MessageEventKind::*;
        let before = shown(&[("+1", &["bob"])]);
        let cases: Vec<(pb::RoomEvent, Option<&ShownMessage>, Option<&str>)> = vec![
            (
                message_event(Posted, "olga", message("hello\nworld \\o/", &[])),
                None,
                Some("general olga: hello\\nworld \\\\o/"),
            ),
            (message_event(Edited, "olga", message("hello", &[])), None, Some("general * olga edited 01234567: hello")),
            (message_event(Redacted, "bob", message("", &[])), None, Some("general * bob redacted 01234567")),
            (
                message_event(Reacted, "bob", message("hi", &[("+1", &["bob"]), ("🎉", &["bob", "cy"])])),
                Some(&before),
                Some("general * bob reacted 🎉 to 01234567"),
            ),
            (
                message_event(Unreacted, "bob", message("hi", &[])),
                Some(&before),
                Some("general * bob unreacted +1 to 01234567"),
            ),
            (membership("mia", "joined", "mia", pb::Role::Member), None, Some("general * mia joined")),
            (membership("mia", "kicked", "olga", pb::Role::Unspecified), None, Some("general * mia kicked by olga")),
            (membership("mia", "role", "olga", pb::Role::Admin), None, Some("general * mia role admin by olga")),
            (
                pb::RoomEvent { room: "general".into(), event: Some(Event::CaughtUp(pb::VersionVector::default())) },
                None,
                None,
            ),
            (pb::RoomEvent { room: "general".into(), event: Some(Event::State(pb::RoomState::default())) }, None, None),
        ];
        for (event, before, want) in cases {
            assert_eq!(event_line(&event, before).as_deref(), want, "{event:?}");
        }
    }

    #[test]
    fn bodies_are_escaped_to_one_line() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\r\nb"), "a\\r\\nb");
        assert_eq!(escape("tab\there"), "tab\\u{9}here");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id(ID), "01234567");
    }
}
