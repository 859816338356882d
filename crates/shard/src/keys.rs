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
//! | `node` | ASCII name | this node's identity (`identity`) |
//!
//! Values are framed as `version u8 | postcard bytes`; [`encode`] and [`decode`] are the only
//! ways in and out, so an unknown version is reported as corruption instead of misread.

use palaver_ids::ShardId;
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
pub fn raft_state_key(shard: ShardId, tag: RaftStateTag) -> [u8; 5] {
    tagged(shard, tag as u8)
}

/// `shard | tag` in the `snapshot` column family.
pub fn snapshot_key(shard: ShardId, tag: SnapshotTag) -> [u8; 5] {
    tagged(shard, tag as u8)
}

/// The 4-byte prefix of every key of `shard`.
pub fn shard_prefix(shard: ShardId) -> [u8; 4] {
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

fn tagged(shard: ShardId, tag: u8) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[..4].copy_from_slice(&shard.0.to_be_bytes());
    key[4] = tag;
    key
}

/// Frame a value for storage: version byte, then postcard.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![VALUE_VERSION];
    let body = postcard::to_allocvec(value).map_err(|e| StorageError::corrupt(format!("encode: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

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
    fn framing_rejects_unknown_versions_and_garbage() {
        let bytes = encode(&(1u64, "x".to_string())).expect("encode");
        assert_eq!(decode::<(u64, String)>(&bytes).expect("decode"), (1, "x".to_string()));
        assert!(matches!(decode::<u64>(&[]), Err(StorageError::Corrupt(_))));
        assert!(matches!(decode::<u64>(&[9, 1]), Err(StorageError::Corrupt(_))));
        assert!(matches!(decode::<String>(&[VALUE_VERSION, 200]), Err(StorageError::Corrupt(_))));
        assert!(log_index_of(&[1, 2]).is_err());
    }
}
