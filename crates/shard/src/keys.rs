//! Key encodings and stored-value framing: every byte layout the shard crate writes.
//!
//! Keys are big-endian so that a range scan is an ordered scan, and every key of a shard starts
//! with its 4-byte shard id, so one node's RocksDB holds all of its shards side by side:
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_log` | `shard u32 | index u64` | a Raft entry |
//! | `raft_state` | `shard u32 | tag u8` | vote (1), committed log id (2), last purged log id (3) |
//! | `snapshot` | `shard u32 | tag u8` | the latest snapshot: meta and data (1) |
//! | `node` | ASCII name | this node's identity (`identity`), key layout (`layout`), … |
//! | `room_events` | `shard u32 | room hash u64 | room | hlc wall u64 | hlc logical u32 | replica u64 | counter u64` | a CRDT event |
//! | `room_state` | `shard u32 | room hash u64 | room | tag u8` | version vector (1), read markers (2) |
//!
//! `room` is `length u8 | utf-8 bytes` (room ids are at most 255 bytes), so one room's keys are
//! contiguous and a `room_events` scan is a history scan in the room's total order. The room
//! hash (FNV-1a of the id) gives every room key a fixed-length prefix, `shard | room hash`, that
//! RocksDB keeps an insert hint for ([`crate::engine::RocksEngine`]): a room's new events land
//! next to its previous ones, so inserting one skips the memtable's search from the top.
//!
//! The layout is recorded in the engine ([`LAYOUT`]); a node refuses a data directory of
//! another layout instead of misreading it.
//!
//! Values are framed as `version u8 | postcard bytes`; [`encode`] and [`decode`] are the only
//! ways in and out, so an unknown version is reported as corruption instead of misread.

use palaver_crdt::Position;
use palaver_ids::{RoomId, ShardId};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StorageError;

/// The framing version of every stored value written by this build.
pub const VALUE_VERSION: u8 = 1;

/// Tags of the `raft_state` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftStateTag {
    /// The vote (term and voted-for / leader).
    Vote = 1,
    /// The last log id known to be committed.
    Committed = 2,
    /// The last log id purged from the log.
    LastPurged = 3,
}

/// Tags of the `snapshot` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SnapshotTag {
    /// The shard's latest snapshot (meta and data).
    Current = 1,
}

/// Tags of the `room_state` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RoomStateTag {
    /// The version vector of the events the replica holds.
    VersionVector = 1,
    /// The room's read markers.
    ReadMarkers = 2,
}

/// The key layout this build reads and writes, recorded in the `node` family
/// ([`crate::engine::ensure_layout`]). Layout 1 had no room hash in room keys; 2 added it.
pub const LAYOUT: u32 = 2;

/// Key of the layout record in the `node` column family.
pub const LAYOUT_KEY: &[u8] = b"layout";

/// Key of the node's identity record in the `node` column family.
pub const NODE_IDENTITY_KEY: &[u8] = b"identity";

/// `shard | index` in the `raft_log` column family.
pub fn log_key(shard: ShardId, index: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&shard.0.to_be_bytes());
    key[4..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The index encoded in a `raft_log` key.
pub fn log_index_of(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key
        .get(4..12)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StorageError::corrupt(format!("raft log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The first key past every `raft_log` key of `shard`.
pub fn log_end(shard: ShardId) -> Vec<u8> {
    shard_prefix_end(shard)
}

/// `shard | tag` in the `raft_state` column family.
pub fn raft_state_key(shard: ShardId, tag: RaftStateTag) -> [u8; TAGGED_KEY_BYTES] {
    tagged(shard, tag as u8)
}

/// `shard | tag` in the `snapshot` column family.
pub fn snapshot_key(shard: ShardId, tag: SnapshotTag) -> [u8; TAGGED_KEY_BYTES] {
    tagged(shard, tag as u8)
}

/// Bytes of the shard id at the front of every shard key.
pub const SHARD_PREFIX_BYTES: usize = 4;

/// The 4-byte prefix of every key of `shard`.
pub fn shard_prefix(shard: ShardId) -> [u8; SHARD_PREFIX_BYTES] {
    shard.0.to_be_bytes()
}

/// The first key after every key of `shard` (the next shard's prefix, or all-ones).
pub fn shard_prefix_end(shard: ShardId) -> Vec<u8> {
    match shard.0.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 13],
    }
}

/// The shard id at the front of any shard key.
pub fn shard_of(key: &[u8]) -> Result<ShardId, StorageError> {
    let bytes: [u8; 4] = key
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StorageError::corrupt(format!("shard key of {} bytes", key.len())))?;
    Ok(ShardId(u32::from_be_bytes(bytes)))
}

/// Bytes of a room key's fixed part: `shard u32 | room hash u64`.
pub const ROOM_KEY_FIXED_BYTES: usize = SHARD_PREFIX_BYTES + 8;

/// `shard | room hash | room`: the prefix of every `room_events` and `room_state` key of `room`.
pub fn room_prefix(shard: ShardId, room: &RoomId) -> Vec<u8> {
    let bytes = room.as_str().as_bytes();
    assert!(bytes.len() <= usize::from(u8::MAX), "room ids are validated to at most 255 bytes");
    let mut key = Vec::with_capacity(ROOM_KEY_FIXED_BYTES + 1 + bytes.len() + 28);
    key.extend_from_slice(&shard.0.to_be_bytes());
    key.extend_from_slice(&room_hash(bytes).to_be_bytes());
    key.push(bytes.len() as u8);
    key.extend_from_slice(bytes);
    key
}

/// FNV-1a (64-bit) of a room id: stored in every room key, so it must never change.
fn room_hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// `shard | room | position` in the `room_events` column family.
pub fn room_event_key(shard: ShardId, room: &RoomId, position: Position) -> Vec<u8> {
    let mut key = room_prefix(shard, room);
    key.extend_from_slice(&position.hlc.wall_ms.to_be_bytes());
    key.extend_from_slice(&position.hlc.logical.to_be_bytes());
    key.extend_from_slice(&position.replica.0.to_be_bytes());
    key.extend_from_slice(&position.counter.to_be_bytes());
    key
}

/// `shard | room | tag` in the `room_state` column family.
pub fn room_state_key(shard: ShardId, room: &RoomId, tag: RoomStateTag) -> Vec<u8> {
    let mut key = room_prefix(shard, room);
    key.push(tag as u8);
    key
}

/// The room and tag of a `room_state` key.
pub fn room_state_key_parts(key: &[u8]) -> Result<(RoomId, u8), StorageError> {
    let corrupt = || StorageError::corrupt(format!("room state key of {} bytes", key.len()));
    let len = usize::from(*key.get(ROOM_KEY_FIXED_BYTES).ok_or_else(corrupt)?);
    let start = ROOM_KEY_FIXED_BYTES + 1;
    let room = key.get(start..start + len).ok_or_else(corrupt)?;
    let tag = *key.get(start + len).ok_or_else(corrupt)?;
    let room = std::str::from_utf8(room).map_err(|_| corrupt())?;
    Ok((RoomId(room.to_owned()), tag))
}

/// Bytes of a `shard | tag` key (`raft_state`, `snapshot`).
pub const TAGGED_KEY_BYTES: usize = SHARD_PREFIX_BYTES + 1;

fn tagged(shard: ShardId, tag: u8) -> [u8; TAGGED_KEY_BYTES] {
    let mut key = [0u8; TAGGED_KEY_BYTES];
    key[..4].copy_from_slice(&shard.0.to_be_bytes());
    key[4] = tag;
    key
}

/// Frame a value for storage: version byte, then postcard.
///
/// One buffer, written in place: every Raft entry, replication message and stored event goes
/// through here, so it does not serialize into a second buffer to copy behind the version byte.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(ENCODE_CAPACITY_HINT);
    out.push(VALUE_VERSION);
    postcard::to_io(value, out).map_err(|e| StorageError::corrupt(format!("encode: {e}")))
}

/// First capacity of an [`encode`] buffer: enough for most log entries and events, so that a
/// typical value needs no reallocation.
const ENCODE_CAPACITY_HINT: usize = 128;

/// Read a value framed by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| StorageError::corrupt(format!("decode: {e}")))
        }
        Some((version, _)) => Err(StorageError::corrupt(format!("unknown value version {version}"))),
        None => Err(StorageError::corrupt("empty stored value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_shard_then_index() {
        let mut keys = vec![log_key(ShardId(2), 1), log_key(ShardId(1), 300), log_key(ShardId(1), 2)];
        keys.sort();
        assert_eq!(keys, vec![log_key(ShardId(1), 2), log_key(ShardId(1), 300), log_key(ShardId(2), 1)]);
        assert_eq!(log_index_of(&log_key(ShardId(9), 77)).expect("index"), 77);
        assert!(log_key(ShardId(1), u64::MAX).as_slice() < log_end(ShardId(1)).as_slice());
    }

    #[test]
    fn room_keys_group_by_room_sort_by_position_and_parse_back() {
        use palaver_crdt::{Dot, Hlc, ReplicaId};
        let position =
            |wall_ms, replica, counter| Position::new(Hlc::new(wall_ms, 0), Dot::new(ReplicaId(replica), counter));
        let a = RoomId("a".into());
        let ab = RoomId("ab".into());
        let mut keys = [
            room_event_key(ShardId(1), &ab, position(1, 1, 1)),
            room_event_key(ShardId(1), &a, position(9, 1, 2)),
            room_event_key(ShardId(1), &a, position(9, 0, 7)),
            room_event_key(ShardId(1), &a, position(2, 3, 1)),
        ];
        keys.sort();
        let of_a: Vec<usize> = (0..keys.len()).filter(|i| keys[*i].starts_with(&room_prefix(ShardId(1), &a))).collect();
        assert!(of_a == [0, 1, 2] || of_a == [1, 2, 3], "rooms never interleave: {of_a:?}");
        let a_keys = &keys[of_a[0]..=of_a[2]];
        assert_eq!(a_keys[0], room_event_key(ShardId(1), &a, position(2, 3, 1)));
        assert_eq!(a_keys[1], room_event_key(ShardId(1), &a, position(9, 0, 7)));
        assert_eq!(a_keys[2], room_event_key(ShardId(1), &a, position(9, 1, 2)));
        // The fixed part (shard, room hash) is the same for a room's keys and differs between
        // rooms; the hash is stored, so it is pinned (FNV-1a 64 of "a").
        assert!(a_keys.iter().all(|k| k[..ROOM_KEY_FIXED_BYTES] == a_keys[0][..ROOM_KEY_FIXED_BYTES]));
        assert_ne!(
            room_prefix(ShardId(1), &a)[..ROOM_KEY_FIXED_BYTES],
            room_prefix(ShardId(1), &ab)[..ROOM_KEY_FIXED_BYTES]
        );
        assert_eq!(room_prefix(ShardId(1), &a)[4..ROOM_KEY_FIXED_BYTES], 0xaf63_dc4c_8601_ec8c_u64.to_be_bytes());
        let prefix = room_prefix(ShardId(1), &a);
        assert!(a_keys.iter().all(|k| k.starts_with(&prefix) && k.as_slice() < prefix_end(&prefix).as_slice()));
        let key = room_state_key(ShardId(1), &ab, RoomStateTag::ReadMarkers);
        assert_eq!(room_state_key_parts(&key).expect("parts"), (ab, RoomStateTag::ReadMarkers as u8));
        assert!(room_state_key_parts(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 9, b'x']).is_err());
        assert!(room_state_key_parts(&[0, 0, 0, 1, 9, b'x']).is_err());
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
    }

    #[test]
    fn framing_rejects_unknown_versions_and_garbage() {
        let bytes = encode(&(1u64, "x".to_string())).expect("encode");
        assert_eq!(decode::<(u64, String)>(&bytes).expect("decode"), (1, "x".to_string()));
        assert!(matches!(decode::<u64>(&[]), Err(StorageError::Corrupt(_))));
        assert!(matches!(decode::<u64>(&[9, 1]), Err(StorageError::Corrupt(_))));
        assert!(matches!(decode::<String>(&[VALUE_VERSION, 200]), Err(StorageError::Corrupt(_))));
        assert!(log_index_of(&[1, 2]).is_err());
    }
}
