//! # palaver-crdt: the CRDT plane's data types
//!
//! This crate will hold the pure data types of the CRDT plane — hybrid logical clock, dots and
//! version vectors, the room message log with its delta and merge, edits, reactions,
//! redactions, presence, typing and read markers — with no I/O, no clock reads and no
//! randomness (see `../shared/DESIGN.md`, "CRDT plane").
//!
//! It is empty today: the consensus plane (users, rooms, membership, roles) came first, and the
//! CRDT plane is the next issue. The crate exists so that the workspace has its final shape and
//! the dependency direction (crdt <- shard <- node) is fixed from the start.
