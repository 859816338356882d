//! The key-value engine under every shard of a node: one trait, two implementations.
//!
//! A node keeps all of its shards in one engine (one RocksDB per node); keys start with the
//! shard id (see [`crate::keys`]). The trait is deliberately small — point reads, ordered range
//! scans, atomic write batches and an explicit [`KvEngine::sync`] — so that:
//!
//! - [`RocksEngine`] is the real one: column families by purpose, writes go to the WAL
//!   without a per-write fsync, and `sync` fsyncs the WAL once for every write before it. That is
//!   what lets many appends from many shards share one fsync (group commit, see
//!   [`crate::log_store`]).
//! - [`MemEngine`] keeps ordered maps in memory for the simulator and fast tests.
//!
//! Both pass the same behaviour tests (`tests` below). Non-goals: iterators that outlive a call,
//! snapshots/transactions across calls (a shard's state machine is in memory; the engine stores
//! its log, its vote and its snapshots).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use crate::error::StorageError;
use crate::keys;

/// A column family: keys of one purpose. Names are stored on disk; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries: `shard | index`.
    RaftLog,
    /// Raft vote, committed and purged log ids: `shard | tag`.
    RaftState,
    /// The latest state machine snapshot of each shard: `shard | tag`.
    Snapshot,
    /// This node's own identity: its node id and the cluster it belongs to.
    Node,
    /// CRDT events of every room: `shard | room hash | room | hlc | replica | counter`.
    RoomEvents,
    /// Per-room CRDT state besides events (version vector, read markers):
    /// `shard | room hash | room | tag`.
    RoomState,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 6] = [Cf::RaftLog, Cf::RaftState, Cf::Snapshot, Cf::Node, Cf::RoomEvents, Cf::RoomState];

    /// The column family's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::Snapshot => "snapshot",
            Cf::Node => "node",
            Cf::RoomEvents => "room_events",
            Cf::RoomState => "room_state",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One change in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
    },
    /// Remove every key in `[from, to)`.
    DeleteRange {
        /// Column family.
        cf: Cf,
        /// First key removed.
        from: Vec<u8>,
        /// First key kept.
        to: Vec<u8>,
    },
}

/// Changes applied atomically by [`KvEngine::write`]: all of them or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `key` to `value`.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put { cf, key: key.into(), value: value.into() });
    }

    /// Remove `key`.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { cf, key: key.into() });
    }

    /// Remove every key in `[from, to)`.
    pub fn delete_range(&mut self, cf: Cf, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange { cf, from: from.into(), to: to.into() });
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The changes, in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }
}

/// A key and its value, as returned by scans.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The storage engine of a node. Implementations are shared by all shards of the node.
pub trait KvEngine: Send + Sync + fmt::Debug + 'static {
    /// The value of `key`, if any.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Apply `batch` atomically. Not durable until the next [`KvEngine::sync`] returns.
    fn write(&self, batch: WriteBatch) -> Result<(), StorageError>;

    /// Make every write that returned before this call durable (fsync).
    fn sync(&self) -> Result<(), StorageError>;

    /// Up to `limit` entries with `from <= key < to`, ascending.
    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError>;

    /// Up to `limit` entries with `from <= key < to`, descending.
    fn scan_rev(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError>;
}

/// Check that `engine` holds data in the key layout this build reads ([`keys::LAYOUT`]), and
/// record that layout in an empty one. Called before anything else reads the engine: keys of
/// another layout would not be found (rooms would look empty) instead of failing.
pub fn ensure_layout(engine: &dyn KvEngine) -> Result<(), StorageError> {
    let expected = keys::LAYOUT;
    if let Some(bytes) = engine.get(Cf::Node, keys::LAYOUT_KEY)? {
        let found = <[u8; 4]>::try_from(bytes.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| StorageError::corrupt(format!("layout record of {} bytes", bytes.len())))?;
        return if found == expected { Ok(()) } else { Err(StorageError::Layout { found, expected }) };
    }
    let past_every_key = [0xff; 512];
    for cf in Cf::ALL {
        if !engine.scan(cf, &[], &past_every_key, 1)?.is_empty() {
            // Written before the layout was recorded: the first layout.
            return Err(StorageError::Layout { found: 1, expected });
        }
    }
    let mut batch = WriteBatch::new();
    batch.put(Cf::Node, keys::LAYOUT_KEY.to_vec(), expected.to_be_bytes().to_vec());
    engine.write(batch)?;
    engine.sync()
}

/// The fixed key prefix under which a family's keys mostly go in next to the previous one: a
/// room's events and a shard's log are appended in order, and a shard's Raft state keys are
/// overwritten (the committed id on every advance), each new version just before the last.
fn insert_hint_prefix(cf: Cf) -> Option<usize> {
    match cf {
        Cf::RoomEvents => Some(keys::ROOM_KEY_FIXED_BYTES),
        Cf::RaftLog => Some(keys::SHARD_PREFIX_BYTES),
        Cf::RaftState => Some(keys::TAGGED_KEY_BYTES),
        // Room state is updated in place, which memtable insert hints do not support.
        Cf::Snapshot | Cf::Node | Cf::RoomState => None,
    }
}

/// Memtable size of each column family (RocksDB may hold two per family before a flush).
/// Set on every family: the database's own option does not carry over to them, and RocksDB's
/// default, 64 MiB, let six families hold up to 768 MiB per node. (A smaller memtable also
/// makes each insert's skip-list walk shorter; under the posts bench, 4 MiB against 64 MiB did
/// not show above the noise.)
pub const MEMTABLE_BYTES: usize = 16 << 20;

/// Live WAL bytes past which RocksDB flushes the families that keep the oldest WAL file
/// alive, so that it can be recycled ([`WAL_FILES_RECYCLED`]). Without it, families that are
/// rarely written (or, like room state, updated in place) would keep every WAL file alive up
/// to RocksDB's default of four times all memtables (~768 MiB here).
pub const WAL_LIVE_BYTES_MAX: u64 = 4 * MEMTABLE_BYTES as u64;

/// WAL files kept for reuse instead of deleted. A recycled file is overwritten in place, so
/// its size does not change and an fdatasync has no inode to write: on this project's VM
/// (ext4) an append plus fdatasync took ~200 µs and ~75 µs of CPU, an overwrite ~110 µs and
/// ~45 µs. Records of a recycled file carry their file's number, so recovery stops at the
/// previous use's leftovers (RocksDB allows this with its default point-in-time recovery).
pub const WAL_FILES_RECYCLED: usize = 4;

/// Bytes of flush and compaction output written between two background syncs of the file.
pub const SST_BYTES_PER_SYNC: u64 = 1 << 20;

/// The sizes a [`RocksEngine`] opens with; tests shrink them to reach flushes and WAL reuse
/// within a few megabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RocksTuning {
    /// [`MEMTABLE_BYTES`].
    pub(crate) memtable_bytes: usize,
    /// [`WAL_LIVE_BYTES_MAX`].
    pub(crate) wal_live_bytes_max: u64,
}

impl Default for RocksTuning {
    fn default() -> Self {
        Self { memtable_bytes: MEMTABLE_BYTES, wal_live_bytes_max: WAL_LIVE_BYTES_MAX }
    }
}

/// The real engine: one RocksDB with a column family per [`Cf`].
pub struct RocksEngine {
    db: rocksdb::DB,
}

impl fmt::Debug for RocksEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksEngine").field("path", &self.db.path()).finish()
    }
}

impl RocksEngine {
    /// Open (or create) the database at `path`, with every column family.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_tuned(path, RocksTuning::default())
    }

    /// [`RocksEngine::open`] with other sizes.
    pub(crate) fn open_tuned(path: &Path, tuning: RocksTuning) -> Result<Self, StorageError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.set_write_buffer_size(tuning.memtable_bytes);
        options.set_max_background_jobs(2);
        options.set_max_total_wal_size(tuning.wal_live_bytes_max);
        options.set_recycle_log_file_num(WAL_FILES_RECYCLED);
        // Flushes and compactions hand their output to the disk a megabyte at a time instead
        // of all at once at the end, so that a WAL fsync does not queue behind a whole SST
        // file. At `bench posts --rate 2000 --subscribers 10` (100 s runs) delivery p99 was
        // lower with it in each of three alternated pairs of runs (means of each pair: 43
        // against 76 ms in a noisy hour, then 7.0 against 9.4 and 8.2 against 14.5 ms).
        options.set_bytes_per_sync(SST_BYTES_PER_SYNC);
        // Writes go to RocksDB's WAL buffer, not to the file: nothing is durable before `sync`
        // (the group commit) anyway, and this way one `sync` writes and fsyncs the WAL for
        // every batch since the last, instead of a write system call per batch.
        options.set_manual_wal_flush(true);
        // Required by in-place updates (below); each write group's batches then go into the
        // memtables one after the other, which on a node's few cores costs nothing measurable.
        options.set_allow_concurrent_memtable_write(false);
        let families = Cf::ALL.iter().map(|cf| -> Result<_, StorageError> {
            let mut cf_options = rocksdb::Options::default();
            cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Each family's own options: the database's do not carry over to them.
            cf_options.set_write_buffer_size(tuning.memtable_bytes);
            if *cf == Cf::RoomState {
                // Every post overwrites its room's version vector. In place, the memtable holds
                // one entry per room instead of one per post, and an overwrite is a short seek
                // among them instead of a skip-list insert among everything since the last flush.
                cf_options.set_inplace_update_support(true);
            }
            let cf_options = match insert_hint_prefix(*cf) {
                // A new key is usually inserted right after the last key of its prefix (the
                // room's or the shard's newest): RocksDB keeps where that was and starts the
                // skip-list search there instead of at the top.
                Some(bytes) => cf_options
                    .get_options_from_string(format!(
                        "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{bytes}"
                    ))
                    .map_err(|e| StorageError::io(format!("{} options: {e}", cf.name())))?,
                None => cf_options,
            };
            Ok(rocksdb::ColumnFamilyDescriptor::new(cf.name(), cf_options))
        });
        let families = families.collect::<Result<Vec<_>, _>>()?;
        let db = rocksdb::DB::open_cf_descriptors(&options, path, families)
            .map_err(|e| StorageError::io(format!("open rocksdb at {}: {e}", path.display())))?;
        Ok(Self { db })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StorageError::corrupt(format!("column family {} missing", cf.name())))
    }

    fn collect(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let handle = self.cf(cf)?;
        let mut out = Vec::new();
        if from >= to || limit == 0 {
            return Ok(out);
        }
        let mode = if reverse {
            rocksdb::IteratorMode::From(to, rocksdb::Direction::Reverse)
        } else {
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward)
        };
        let mut read_options = rocksdb::ReadOptions::default();
        read_options.set_iterate_lower_bound(from.to_vec());
        read_options.set_iterate_upper_bound(to.to_vec());
        for item in self.db.iterator_cf_opt(handle, read_options, mode) {
            let (key, value) = item.map_err(|e| StorageError::io(format!("scan {}: {e}", cf.name())))?;
            if key.as_ref() < from || key.as_ref() >= to {
                continue;
            }
            out.push((key.into_vec(), value.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

impl Drop for RocksEngine {
    /// With a manually flushed WAL, writes still in its buffer would be lost at close.
    fn drop(&mut self) {
        if let Err(e) = self.db.flush_wal(true) {
            tracing::error!(error = %e, "flushing the WAL at close failed");
        }
    }
}

impl KvEngine for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get_cf(self.cf(cf)?, key).map_err(|e| StorageError::io(format!("get from {}: {e}", cf.name())))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut rocks_batch = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                WriteOp::Put { cf, key, value } => rocks_batch.put_cf(self.cf(cf)?, key, value),
                WriteOp::Delete { cf, key } => rocks_batch.delete_cf(self.cf(cf)?, key),
                WriteOp::DeleteRange { cf, from, to } => rocks_batch.delete_range_cf(self.cf(cf)?, from, to),
            }
        }
        let mut write_options = rocksdb::WriteOptions::default();
        write_options.set_sync(false);
        self.db.write_opt(rocks_batch, &write_options).map_err(|e| StorageError::io(format!("write batch: {e}")))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(|e| StorageError::io(format!("fsync wal: {e}")))
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        self.collect(cf, from, to, limit, false)
    }

    fn scan_rev(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        self.collect(cf, from, to, limit, true)
    }
}

/// One ordered map per column family.
type Families = [BTreeMap<Vec<u8>, Vec<u8>>; Cf::ALL.len()];

/// An in-memory engine: ordered maps behind a mutex. `sync` does nothing.
#[derive(Debug, Default)]
pub struct MemEngine {
    families: Mutex<Families>,
}

impl MemEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Families>, StorageError> {
        self.families.lock().map_err(|_| StorageError::io("memory engine lock poisoned"))
    }
}

impl KvEngine for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock()?[cf.index()].get(key).cloned())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut families = self.lock()?;
        for op in batch.ops {
            match op {
                WriteOp::Put { cf, key, value } => {
                    families[cf.index()].insert(key, value);
                }
                WriteOp::Delete { cf, key } => {
                    families[cf.index()].remove(&key);
                }
                WriteOp::DeleteRange { cf, from, to } => {
                    if from < to {
                        let doomed: Vec<Vec<u8>> =
                            families[cf.index()].range(from..to).map(|(k, _)| k.clone()).collect();
                        for key in doomed {
                            families[cf.index()].remove(&key);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let families = self.lock()?;
        Ok(families[cf.index()]
            .range(from.to_vec()..to.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan_rev(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let families = self.lock()?;
        Ok(families[cf.index()]
            .range(from.to_vec()..to.to_vec())
            .rev()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// A [`MemEngine`] whose fsyncs can be held: a disk that stalls, for tests and simulations
/// of that fault. While stalled, `sync` blocks its caller until [`StallingEngine::stall`]
/// lets go; reads and writes go on.
#[derive(Debug, Default)]
pub struct StallingEngine {
    inner: MemEngine,
    stalled: Mutex<bool>,
    released: std::sync::Condvar,
}

impl StallingEngine {
    /// Hold (`true`) or let go of (`false`) every fsync, those waiting included.
    pub fn stall(&self, stalled: bool) {
        *self.stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stalled;
        self.released.notify_all();
    }
}

impl KvEngine for StallingEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(cf, key)
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.inner.write(batch)
    }

    fn sync(&self) -> Result<(), StorageError> {
        let stalled = self.stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(self.released.wait_while(stalled, |stalled| *stalled).unwrap_or_else(std::sync::PoisonError::into_inner));
        self.inner.sync()
    }

    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        self.inner.scan(cf, from, to, limit)
    }

    fn scan_rev(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        self.inner.scan_rev(cf, from, to, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The behaviour both engines must share.
    fn engine_contract(engine: &dyn KvEngine) {
        let mut batch = WriteBatch::new();
        for i in 0u8..10 {
            batch.put(Cf::RaftLog, vec![1, i], vec![i]);
        }
        batch.put(Cf::RaftState, b"vote".to_vec(), b"v1".to_vec());
        engine.write(batch).expect("write");
        engine.sync().expect("sync");

        assert_eq!(engine.get(Cf::RaftState, b"vote").expect("get"), Some(b"v1".to_vec()));
        assert_eq!(engine.get(Cf::RaftLog, b"vote").expect("get"), None, "families are separate");

        let forward = engine.scan(Cf::RaftLog, &[1, 2], &[1, 5], 100).expect("scan");
        assert_eq!(forward.iter().map(|(k, _)| k[1]).collect::<Vec<_>>(), vec![2, 3, 4]);
        let limited = engine.scan(Cf::RaftLog, &[1], &[2], 3).expect("scan");
        assert_eq!(limited.len(), 3);
        let backward = engine.scan_rev(Cf::RaftLog, &[1, 2], &[1, 5], 2).expect("scan_rev");
        assert_eq!(backward.iter().map(|(k, _)| k[1]).collect::<Vec<_>>(), vec![4, 3]);
        assert!(engine.scan(Cf::RaftLog, &[1, 5], &[1, 5], 10).expect("empty").is_empty());

        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::RaftLog, vec![1, 0], vec![1, 8]);
        batch.delete(Cf::RaftState, b"vote".to_vec());
        engine.write(batch).expect("delete");
        let rest = engine.scan(Cf::RaftLog, &[0], &[255], 100).expect("scan");
        assert_eq!(rest.iter().map(|(k, _)| k[1]).collect::<Vec<_>>(), vec![8, 9]);
        assert_eq!(engine.get(Cf::RaftState, b"vote").expect("get"), None);

        // Overwrites (the room-state family updates in place on RocksDB): values that shrink,
        // grow and shrink again, several in one batch; the last one wins, for reads and scans.
        for (round, len) in [8usize, 3, 12, 1, 12, 5].into_iter().enumerate() {
            let want = vec![u8::try_from(round).expect("small"); len];
            let mut batch = WriteBatch::new();
            for key in [b"room-a".to_vec(), b"room-b".to_vec()] {
                batch.put(Cf::RoomState, key.clone(), vec![0xee; len + 4]);
                batch.put(Cf::RoomState, key, want.clone());
            }
            engine.write(batch).expect("overwrite");
            assert_eq!(engine.get(Cf::RoomState, b"room-a").expect("get"), Some(want.clone()));
            let rows = engine.scan(Cf::RoomState, b"room-", b"room.", 10).expect("scan");
            assert_eq!(rows, vec![(b"room-a".to_vec(), want.clone()), (b"room-b".to_vec(), want)]);
        }
    }

    /// Keys with the same 12-byte prefix (a room) inserted mostly in order, some behind the
    /// last one (a peer's older event), two rooms interleaved: scans see them sorted.
    fn hinted_inserts_stay_ordered(engine: &dyn KvEngine) {
        let key = |room: u8, position: u32| {
            let mut key = vec![0, 0, 0, 7, room, 1, 2, 3, 4, 5, 6, 7];
            key.extend_from_slice(&position.to_be_bytes());
            key
        };
        let positions: Vec<u32> = (0..400).map(|i| if i % 7 == 3 { i * 10 - 25 } else { i * 10 }).collect();
        for chunk in positions.chunks(13) {
            let mut batch = WriteBatch::new();
            for position in chunk {
                for room in [2u8, 1] {
                    batch.put(Cf::RoomEvents, key(room, *position), position.to_be_bytes().to_vec());
                }
            }
            engine.write(batch).expect("write");
        }
        for room in [1u8, 2] {
            let rows = engine.scan(Cf::RoomEvents, &key(room, 0), &key(room, u32::MAX), 1_000).expect("scan");
            let mut want = positions.clone();
            want.sort_unstable();
            let got: Vec<Vec<u8>> = rows.into_iter().map(|(k, _)| k).collect();
            assert_eq!(got, want.iter().map(|p| key(room, *p)).collect::<Vec<_>>());
        }
        // Overwritten keys under the hint (a shard's Raft state): the newest version is read.
        let state_key = |shard: u32, tag| keys::raft_state_key(palaver_ids::ShardId(shard), tag).to_vec();
        let tags = [keys::RaftStateTag::Committed, keys::RaftStateTag::Vote];
        for round in 0u32..300 {
            let mut batch = WriteBatch::new();
            for shard in [3u32, 1, 2] {
                for tag in tags {
                    batch.put(Cf::RaftState, state_key(shard, tag), (round * 10 + shard).to_be_bytes().to_vec());
                }
            }
            engine.write(batch).expect("write");
        }
        for shard in [1u32, 2, 3] {
            for tag in tags {
                let value = engine.get(Cf::RaftState, &state_key(shard, tag)).expect("get");
                assert_eq!(value, Some((299 * 10 + shard).to_be_bytes().to_vec()), "shard {shard} tag {tag:?}");
            }
        }
        let rows = engine.scan(Cf::RaftState, &[], &[0xff; 6], 100).expect("scan");
        assert_eq!(rows.len(), 6, "one row per key, the newest");
    }

    /// What [`ensure_layout`] does on an empty engine, a recorded one, and older data.
    fn layout_contract(empty: &dyn KvEngine, unmarked: &dyn KvEngine) {
        ensure_layout(empty).expect("an empty engine takes this build's layout");
        ensure_layout(empty).expect("and keeps it");
        assert_eq!(empty.get(Cf::Node, keys::LAYOUT_KEY).expect("get"), Some(keys::LAYOUT.to_be_bytes().to_vec()));
        let mut batch = WriteBatch::new();
        batch.put(Cf::Node, keys::LAYOUT_KEY.to_vec(), 99u32.to_be_bytes().to_vec());
        empty.write(batch).expect("write");
        assert!(matches!(ensure_layout(empty), Err(StorageError::Layout { found: 99, expected: keys::LAYOUT })));

        let mut batch = WriteBatch::new();
        batch.put(Cf::RoomEvents, vec![0, 0, 0, 1, 1, b'r'], vec![1]);
        unmarked.write(batch).expect("write");
        let refused = ensure_layout(unmarked).expect_err("data without a layout record is layout 1");
        assert!(matches!(refused, StorageError::Layout { found: 1, expected: keys::LAYOUT }));
        assert!(refused.to_string().contains("layout 1"), "{refused}");
        assert_eq!(unmarked.get(Cf::Node, keys::LAYOUT_KEY).expect("get"), None, "nothing recorded");
    }

    #[test]
    fn memory_engine_meets_the_contract() {
        engine_contract(&MemEngine::new());
        hinted_inserts_stay_ordered(&MemEngine::new());
        layout_contract(&MemEngine::new(), &MemEngine::new());
    }

    #[test]
    fn rocksdb_engine_meets_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        engine_contract(&RocksEngine::open(dir.path()).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        hinted_inserts_stay_ordered(&RocksEngine::open(dir.path()).expect("open"));
        let (empty, unmarked) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        layout_contract(
            &RocksEngine::open(empty.path()).expect("open"),
            &RocksEngine::open(unmarked.path()).expect("open"),
        );
    }

    #[test]
    fn rocksdb_engine_keeps_synced_writes_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let engine = RocksEngine::open(dir.path()).expect("open");
            let mut batch = WriteBatch::new();
            batch.put(Cf::Node, b"node_id".to_vec(), b"7".to_vec());
            engine.write(batch).expect("write");
            engine.sync().expect("sync");
        }
        let engine = RocksEngine::open(dir.path()).expect("reopen");
        assert_eq!(engine.get(Cf::Node, b"node_id").expect("get"), Some(b"7".to_vec()));
    }

    #[test]
    fn rocksdb_engine_keeps_the_last_in_place_overwrite_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let engine = RocksEngine::open(dir.path()).expect("open");
            for value in [vec![1u8; 16], vec![2; 4], vec![3; 9]] {
                let mut batch = WriteBatch::new();
                batch.put(Cf::RoomState, b"vv".to_vec(), value);
                engine.write(batch).expect("write");
            }
            engine.sync().expect("sync");
        }
        // Replayed from the WAL (no flush happened): every overwrite in order, the last one wins.
        let engine = RocksEngine::open(dir.path()).expect("reopen");
        assert_eq!(engine.get(Cf::RoomState, b"vv").expect("get"), Some(vec![3; 9]));
    }

    /// Count the lines of RocksDB's info log that contain `needle`.
    fn info_log_lines(dir: &Path, needle: &str) -> usize {
        std::fs::read_to_string(dir.join("LOG")).expect("info log").lines().filter(|l| l.contains(needle)).count()
    }

    /// Sizes that reach flushes and WAL reuse within a few rounds of [`recycling_round`].
    const SMALL: RocksTuning = RocksTuning { memtable_bytes: 64 << 10, wal_live_bytes_max: 256 << 10 };
    const RECYCLING_KEYS: u32 = 200;

    fn recycling_key(i: u32) -> Vec<u8> {
        i.to_be_bytes().to_vec()
    }

    fn recycling_value(round: u32, i: u32) -> Vec<u8> {
        format!("{round}:{i}:{}", "x".repeat(200)).into_bytes()
    }

    /// One round: rewrite the first `keys` keys of the events family (~50 KiB for all of them).
    fn recycling_round(engine: &RocksEngine, round: u32, keys: u32) {
        let mut batch = WriteBatch::new();
        for i in 0..keys {
            batch.put(Cf::RoomEvents, recycling_key(i), recycling_value(round, i));
        }
        if round.is_multiple_of(8) {
            // A family written rarely: it keeps old WAL files alive until the WAL limit
            // flushes it.
            batch.put(Cf::Node, b"round".to_vec(), round.to_be_bytes().to_vec());
        }
        engine.write(batch).expect("write");
        engine.sync().expect("sync");
    }

    #[test]
    fn rocksdb_engine_recycles_wal_files_and_recovers_from_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rounds, keys) = (40u32, RECYCLING_KEYS);
        {
            let engine = RocksEngine::open_tuned(dir.path(), SMALL).expect("open");
            // The last round is shorter than the ones before, so it ends inside a recycled
            // file, ahead of that file's previous contents.
            for round in 0..rounds {
                recycling_round(&engine, round, if round + 1 == rounds { keys / 4 } else { keys });
            }
        }
        assert!(
            info_log_lines(dir.path(), "to recycle list") > 0,
            "no WAL file was put up for reuse (max_total_wal_size or recycle_log_file_num not in effect)"
        );
        let engine = RocksEngine::open_tuned(dir.path(), SMALL).expect("reopen");
        for i in 0..keys {
            let round = if i < keys / 4 { rounds - 1 } else { rounds - 2 };
            let value = engine.get(Cf::RoomEvents, &recycling_key(i)).expect("get");
            assert_eq!(value, Some(recycling_value(round, i)), "key {i}");
        }
        let last_rare = (rounds - 1) / 8 * 8;
        assert_eq!(engine.get(Cf::Node, b"round").expect("get"), Some(last_rare.to_be_bytes().to_vec()));
    }

    /// Set in the child process of the kill -9 test: the data directory it writes to.
    const CRASH_CHILD_DIR_ENV: &str = "PALAVER_TEST_ENGINE_CRASH_CHILD_DIR";

    /// The kill -9 test's child: write and fsync rounds, reporting each once it is durable,
    /// until killed.
    fn crash_child(dir: &Path) {
        use std::io::Write;
        let engine = RocksEngine::open_tuned(dir, SMALL).expect("open");
        let mut out = std::io::stdout().lock();
        for round in 0..100_000 {
            recycling_round(&engine, round, RECYCLING_KEYS);
            writeln!(out, "synced {round}").expect("report");
            out.flush().expect("report");
        }
    }

    #[test]
    fn rocksdb_engine_keeps_synced_writes_in_recycled_wal_files_across_kill_9() {
        use std::io::BufRead;
        if let Some(dir) = std::env::var_os(CRASH_CHILD_DIR_ENV) {
            crash_child(Path::new(&dir));
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "engine::tests::rocksdb_engine_keeps_synced_writes_in_recycled_wal_files_across_kill_9",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the writer");
        let stdout = child.stdout.take().expect("writer's stdout");
        // Far past the rounds after which these sizes recycle WAL files (see the test above):
        // the kill lands while the WAL in use is a reused file, part overwritten, and recovery
        // must replay the newest rounds from it and stop at its previous use's records. (A
        // kill -9 loses only what RocksDB had not yet handed to the kernel; a power loss, which
        // loses what was not fsynced, is not something a test here can cause.)
        let kill_after = 120;
        let mut synced = None;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("read the writer");
            if let Some(round) = line.strip_prefix("synced ") {
                let round: u32 = round.parse().expect("a round number");
                synced = Some(round);
                if round >= kill_after {
                    break;
                }
            }
        }
        child.kill().expect("kill -9 the writer");
        child.wait().expect("reap the writer");
        let synced = synced.expect("the writer reported no durable round");
        assert!(synced >= kill_after, "the writer stopped at round {synced}");
        let engine = RocksEngine::open_tuned(dir.path(), SMALL).expect("reopen after kill -9");
        for i in 0..RECYCLING_KEYS {
            let value = engine.get(Cf::RoomEvents, &recycling_key(i)).expect("get").expect("key lost");
            let round: u32 = std::str::from_utf8(&value)
                .expect("utf-8")
                .split(':')
                .next()
                .and_then(|r| r.parse().ok())
                .expect("a round in the value");
            assert!(round >= synced, "key {i} went back to round {round}; round {synced} was durable");
            assert_eq!(value, recycling_value(round, i), "key {i}");
        }
    }
}
