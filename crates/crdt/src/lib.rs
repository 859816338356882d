//! # palaver-crdt: the CRDT plane's data types
//!
//! Messages, edits, reactions, presence, typing and read markers must stay available when a
//! shard's replicas cannot reach each other, so they are not agreed on through Raft: any of the
//! three replicas of a room's shard accepts them, and the replicas converge afterwards. This
//! crate is that convergence, as plain data types with no I/O, no clock reads and no randomness
//! (see `DESIGN.md`, "CRDT plane"). The shard crate stores and ships what these types produce.
//!
//! ## The pieces
//! - [`Hlc`] and [`HlcClock`] ([`hlc`]): hybrid logical timestamps that follow the wall clock
//!   and never contradict causality; the caller passes `now_ms`.
//! - [`ReplicaId`], [`Dot`] and [`VersionVector`] ([`version_vector`]): each event is named by
//!   `(replica, counter)`; a version vector says which events a replica holds.
//! - [`RoomLog`] ([`message_log`]): the set of a room's [`Event`]s (posts, edits, redactions,
//!   reactions) and the [`Message`]s they materialize into, in one total order by [`Position`].
//! - [`PresenceMap`] ([`presence`]), [`TypingMap`] ([`typing`]): last-writer-wins registers
//!   with expiry. [`ReadMarkers`] ([`read_marker`]): a max-register per user.
//!
//! ## The protocol these types assume
//! A replica that accepts a request stamps it ([`RoomLog::stamp`]: the next dot of the replica,
//! an HLC after everything the replica holds and after the client's `seen` stamp), builds the
//! event, applies it to its own log, persists it and pushes it to the other replicas. A replica
//! applies a peer's events in the issuer's counter order; one that arrives early is refused with
//! [`CrdtError::Gap`] and offered again after anti-entropy (exchange version vectors, send
//! [`RoomLog::delta_since`]) filled the hole. A replica should also pass each received event's
//! stamp through [`HlcClock::observe`], which refuses stamps too far in the future
//! ([`CLOCK_DRIFT_MS_MAX`]).
//!
//! ## Guarantees
//! - **Gapless:** a room log holds, for every replica `R`, exactly the events `R:1..=vv[R]`, so
//!   the version vector alone describes its contents.
//! - **Convergence:** two logs holding the same events show the same messages, byte for byte
//!   when serialized (every collection is a `BTreeMap`/`BTreeSet`), whatever order the events
//!   arrived in and however often.
//! - **Merge laws:** [`RoomLog::merge`], [`PresenceMap::merge`], [`TypingMap::merge`] and
//!   [`ReadMarkers::merge`] are commutative, associative and idempotent (checked by proptest).
//! - **One total order, consistent with causality:** messages are ordered by
//!   `(hlc, replica, counter)`; if the stamping replica held message A, or the client said it had
//!   seen A's stamp, the new event orders after A.
//! - **Idempotent posts:** a message's id is derived from (room, author, client message id), so
//!   a retried post shows once, wherever it landed.
//! - Deterministic refusals: every [`CrdtError`] depends only on the inputs.
//!
//! ## Non-goals (here, for now)
//! - Authorization: who may post, edit, redact or react is the shard's decision against its
//!   applied membership. The log only refuses to let anyone but the author edit, and anyone but a
//!   reacting user take their reaction back, because those rules must hold on every replica.
//! - Limits on input sizes (bodies, names, reactions): the node checks them at the edge.
//! - Garbage collection: the log holds every event in memory, tombstones included; pruning
//!   causally stable tombstones and windowing the log over disk belong to the shard's store.
//! - Strict rooms (posts through Raft with a gap-free per-room sequence). The intended shape: the
//!   Raft apply issues those posts as ordinary events under a reserved replica id with the room
//!   sequence as counter, so messages, storage and positions keep one shape.
//! - Edit history: an edit replaces the body; earlier bodies stay only in the event set.

pub mod error;
pub mod hlc;
pub mod message_log;
pub mod presence;
pub mod read_marker;
mod register;
pub mod typing;
pub mod version_vector;

pub use error::CrdtError;
pub use hlc::{CLOCK_DRIFT_MS_MAX, Hlc, HlcClock};
pub use message_log::{
    Applied, Event, EventKind, MESSAGE_ID_BYTES, Message, MessageId, PageQuery, Position, RoomLog, Stamp,
};
pub use presence::{PRESENCE_TTL_MS, PresenceEntry, PresenceMap, PresenceStatus};
pub use read_marker::ReadMarkers;
pub use typing::{TYPING_TTL_MS, TypingEntry, TypingMap};
pub use version_vector::{Dot, ReplicaId, VersionVector};

// A typing indicator is a shorter-lived signal than presence.
const _: () = assert!(TYPING_TTL_MS < PRESENCE_TTL_MS);
