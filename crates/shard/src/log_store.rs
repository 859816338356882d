//! openraft's log storage for one shard, in the node's shared key-value engine.
//!
//! Every key starts with the shard id (see [`crate::keys`]), so all shards of a node share one
//! RocksDB. Appends are written to the engine without an fsync and handed to the node's
//! [`GroupCommit`] thread, which fsyncs the WAL once for everything queued since its last fsync
//! and only then tells openraft that the entries are persisted. Many shards appending at once
//! therefore share one fsync; no append is ever reported durable before it is. Under load
//! (the last fsync covered more than one waiter) fsyncs start at most every
//! [`FSYNC_INTERVAL_MIN_US`], so that each covers more.
//!
//! Votes are fsynced before `save_vote` returns (a vote must survive a crash before it is
//! sent). The committed log id is written on every advance, without an fsync of its own (the
//! next group commit makes it durable): a restarted replica rebuilds its in-memory state
//! machine up to it, so it must not lag what the replica had applied and acted on (a ban it
//! enforced, a member it admitted) by more than the last moments before a crash.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use openraft::storage::{LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, entry::RaftEntry};
use palaver_ids::ShardId;

use crate::engine::{Cf, KvEngine, WriteBatch};
use crate::error::StorageError;
use crate::keys::{self, RaftStateTag};
use crate::types::{Entry, IoFlushed, LogId, TypeConfig, Vote};

/// Most entries read by one `try_get_log_entries` call: unbounded, because openraft bounds its
/// own requests (`max_payload_entries`) and expects every entry of the range it asks for.
pub const LOG_READ_ENTRIES_MAX: usize = usize::MAX;

/// Under load, the least time between the starts of two fsyncs when the last one covered a
/// Raft append. On this project's VM an fsync costs ~40 µs of CPU besides its wait (a device
/// flush is a VM exit), and back-to-back fsyncs under load each covered only 2–3 waiters;
/// spacing them by 1 ms raised 64-client consensus writes from ~5,800/s to ~7,000/s
/// (medians). A lone waiter is never delayed. 2 ms did worse for consensus writes
/// (2026-11-28, three ABBA pairs at 64 clients: 5,529/5,840/7,127 against 7,127/6,338/7,932
/// commits/s): each of a group's rounds waits for the fsync, and at 64 shards a round carries
/// about one write. CRDT writes are spaced further ([`CRDT_FSYNC_INTERVAL_MIN_US`]).
///
/// Tried and left out (2026-11-27, when deliveries still waited for the accepting replica's
/// fsync): 2 ms for every waiter once an fsync covered 3 or more. At
/// saturation it cut fsyncs from ~0.35 to ~0.25 per post (three nodes) and context switches
/// from ~3.1 to ~2.6, but posts/s moved within noise, and at `bench posts --rate 2000` the
/// batches reached 3 as well: ack and delivery p50 rose by ~1 ms (1.4 → 2.5 ms). The waiter
/// count does not tell saturation from a moderate load.
pub const FSYNC_INTERVAL_MIN_US: u64 = 1_000;

/// Under load, the least time between the starts of two fsyncs when the last one covered
/// CRDT writes only. Since events are shown to subscribers and sent to peers before their
/// fsync, delivery does not wait for it, and a `quorum` ack waits for two fsyncs that run
/// side by side on two nodes; fewer fsyncs leave more CPU to everything else. Against 1 ms
/// (2026-11-28, three ABBA pairs each): at `bench posts --rate 2000 --subscribers 10`
/// delivery p99 2.68/2.84/4.13 ms against 3.53/3.41/5.06, ack p99 3.69/3.84/5.20 against
/// 4.53/4.25/6.61, ack p50 +0.3 ms (1.94 against 1.65), fsyncs per post 1.41 against 1.68; at
/// 64 in flight (two pairs) 9,081/8,316 posts/s against 8,790/6,803. 3 ms did no better than
/// 2 (two pairs: delivery p99 2.92/3.15 against 2.72/2.78 ms, ack p50 +0.5 ms).
pub const CRDT_FSYNC_INTERVAL_MIN_US: u64 = 2_000;

/// How long the group commit waits, from the start of the last fsync, before the next one:
/// not at all after a lone waiter, else by what the last fsync covered.
fn fsync_gap(waiters: usize, any_raft: bool) -> std::time::Duration {
    let micros = match (waiters, any_raft) {
        (0 | 1, _) => 0,
        (_, true) => FSYNC_INTERVAL_MIN_US,
        (_, false) => CRDT_FSYNC_INTERVAL_MIN_US,
    };
    std::time::Duration::from_micros(micros)
}

/// How many of a shard's newest log entries are kept in memory (the store's tail cache).
/// openraft reads back entries it has just appended (the leader to replicate them, every
/// replica to apply them); 256 covers the entries in flight at 64 clients with room to spare.
pub const LOG_TAIL_CACHED_MAX: usize = 256;

/// The newest entries of one shard's log, as one contiguous run, so that openraft's read-backs
/// of fresh entries skip the engine. It mirrors what was written: an append that does not
/// continue the run restarts it, truncation and purging cut it, and a failed write clears it.
/// A read is answered from it only when the whole range lies inside the run.
#[derive(Debug, Default)]
struct TailCache {
    entries: std::collections::VecDeque<Entry>,
}

impl TailCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index())
    }

    fn append(&mut self, entry: Entry) {
        let continues = self.entries.back().is_none_or(|last| last.index().checked_add(1) == Some(entry.index()));
        if !continues {
            self.entries.clear();
        }
        self.entries.push_back(entry);
        while self.entries.len() > LOG_TAIL_CACHED_MAX {
            self.entries.pop_front();
        }
    }

    /// Forgets every entry (after a failed write, the engine may hold less than the cache).
    fn clear(&mut self) {
        self.entries.clear();
    }

    /// Forgets every entry after `last` (all of them for `None`).
    fn truncate_after(&mut self, last: Option<u64>) {
        match (last, self.first_index()) {
            (Some(last), Some(first)) if last >= first => {
                let keep = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
                self.entries.truncate(keep);
            }
            _ => self.clear(),
        }
    }

    /// Forgets every entry up to and including `upto`.
    fn purge(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            self.entries.pop_front();
        }
    }

    /// Entries `start..end` (`end` exclusive; `None`: to the newest), if all of them are here
    /// and there is at least one.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.index();
        let end = end.unwrap_or(last.saturating_add(1));
        if start < first || end <= start || end > last.saturating_add(1) {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(self.entries.range(from..to).cloned().collect())
    }
}

/// Upper bounds of the fsync duration buckets of [`GroupCommitCounts`], in microseconds
/// (doubling from 64 µs to about 0.5 s; one more bucket counts the longer ones).
pub const FSYNC_BUCKETS_US: [u64; 14] =
    [64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072, 262_144, 524_288];

/// What the group-commit thread has done since it started, counted as it goes.
#[derive(Debug, Default)]
struct GroupCommitStats {
    failed: AtomicU64,
    waiters: AtomicU64,
    micros: AtomicU64,
    /// Fsyncs by duration: `buckets[i]` counts those of at most `FSYNC_BUCKETS_US[i]` (and more
    /// than the bound before); the last, those longer than every bound. Their sum is the count.
    buckets: [AtomicU64; FSYNC_BUCKETS_US.len() + 1],
}

impl GroupCommitStats {
    fn record(&self, waiters: usize, took: std::time::Duration, ok: bool) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if !ok {
            self.failed.fetch_add(1, Relaxed);
        }
        self.waiters.fetch_add(waiters as u64, Relaxed);
        self.micros.fetch_add(micros, Relaxed);
        let bucket = FSYNC_BUCKETS_US.iter().position(|bound| micros <= *bound).unwrap_or(FSYNC_BUCKETS_US.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
    }
}

/// A snapshot of the group commit's counters (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitCounts {
    /// Fsyncs done (failed ones included): the sum of `buckets`.
    pub fsyncs: u64,
    /// Fsyncs that failed.
    pub failed: u64,
    /// Waiters they covered: Raft appends and CRDT writes (more per fsync: better batching).
    pub waiters: u64,
    /// Time spent in them, in microseconds.
    pub micros: u64,
    /// Fsyncs by duration, per bucket of [`FSYNC_BUCKETS_US`] and a last one for longer
    /// fsyncs (not cumulative).
    pub buckets: [u64; FSYNC_BUCKETS_US.len() + 1],
}

/// The node-wide group-commit thread: fsyncs the engine once per batch of queued appends.
///
/// Cloning shares the thread; it exits when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Flushed>,
    stats: Arc<GroupCommitStats>,
}

/// Who waits for an fsync: openraft (a log append) or an async caller ([`GroupCommit::sync`]).
enum Flushed {
    Raft(IoFlushed),
    Waiter(tokio::sync::oneshot::Sender<Result<(), StorageError>>),
}

impl std::fmt::Debug for Flushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flushed::Raft(_) => "Flushed::Raft",
            Flushed::Waiter(_) => "Flushed::Waiter",
        })
    }
}

impl Flushed {
    fn complete(self, result: Result<(), StorageError>) {
        match self {
            Flushed::Raft(callback) => callback.io_completed(result.map_err(std::io::Error::from)),
            Flushed::Waiter(waiter) => {
                let _ = waiter.send(result);
            }
        }
    }
}

impl GroupCommit {
    /// Start the thread for `engine`.
    /// The thread holds only a weak handle: the engine closes when its owners drop it, not
    /// whenever this thread gets around to exiting (RocksDB must not outlive process exit).
    pub fn start(engine: Arc<dyn KvEngine>) -> Self {
        let engine = Arc::downgrade(&engine);
        let (queue, pending) = mpsc::channel::<Flushed>();
        let stats = Arc::new(GroupCommitStats::default());
        let counted = stats.clone();
        std::thread::Builder::new()
            .name("palaver-group-commit".into())
            .spawn(move || Self::run(engine, pending, &counted))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the group-commit thread"));
        Self { queue, stats }
    }

    /// What the thread has done so far.
    pub fn counts(&self) -> GroupCommitCounts {
        let stats = &self.stats;
        let buckets: [u64; FSYNC_BUCKETS_US.len() + 1] = std::array::from_fn(|i| stats.buckets[i].load(Relaxed));
        GroupCommitCounts {
            fsyncs: buckets.iter().sum(),
            failed: stats.failed.load(Relaxed),
            waiters: stats.waiters.load(Relaxed),
            micros: stats.micros.load(Relaxed),
            buckets,
        }
    }

    fn run(engine: std::sync::Weak<dyn KvEngine>, pending: mpsc::Receiver<Flushed>, stats: &GroupCommitStats) {
        let mut last_start = std::time::Instant::now();
        let mut gap = std::time::Duration::ZERO;
        while let Ok(first) = pending.recv() {
            // Under load (the last fsync covered more than one waiter) wait out the rest of
            // the interval so that the next fsync covers more: fsyncs cost CPU, not only time.
            // A lone waiter is fsynced at once.
            let since = last_start.elapsed();
            if since < gap {
                std::thread::sleep(gap - since);
            }
            last_start = std::time::Instant::now();
            let mut batch = vec![first];
            batch.extend(pending.try_iter());
            let started = std::time::Instant::now();
            let result = match engine.upgrade() {
                Some(engine) => engine.sync(),
                None => Err(StorageError::io("the engine is closed")),
            };
            stats.record(batch.len(), started.elapsed(), result.is_ok());
            gap = fsync_gap(batch.len(), batch.iter().any(|waiter| matches!(waiter, Flushed::Raft(_))));
            for waiter in batch {
                waiter.complete(result.clone());
            }
        }
    }

    /// Report `callback` once everything written so far is durable.
    fn flush_then(&self, callback: IoFlushed) {
        self.enqueue(Flushed::Raft(callback));
    }

    fn enqueue(&self, waiter: Flushed) {
        if let Err(mpsc::SendError(waiter)) = self.queue.send(waiter) {
            waiter.complete(Err(StorageError::io("group-commit thread has stopped")));
        }
    }

    /// Wait until everything written to the engine before this call is durable. Concurrent
    /// callers (and Raft appends) share one fsync.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let (waiter, done) = tokio::sync::oneshot::channel();
        self.enqueue(Flushed::Waiter(waiter));
        done.await.map_err(|_| StorageError::io("group-commit thread has stopped"))?
    }
}

/// One shard's Raft log and vote.
#[derive(Debug, Clone)]
pub struct ShardLogStore {
    shard: ShardId,
    engine: Arc<dyn KvEngine>,
    group_commit: GroupCommit,
    /// The newest entries, shared by clones (openraft reads through a clone).
    tail: Arc<std::sync::Mutex<TailCache>>,
}

impl ShardLogStore {
    /// The log of `shard` in `engine`, made durable through `group_commit`.
    pub fn new(shard: ShardId, engine: Arc<dyn KvEngine>, group_commit: GroupCommit) -> Self {
        Self { shard, engine, group_commit, tail: Arc::default() }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, TailCache> {
        // The cache holds no invariant a panicking holder could break halfway that a reader
        // would trust: every mutation is a whole push, pop, truncate or clear.
        self.tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_state<T: serde::de::DeserializeOwned>(&self, tag: RaftStateTag) -> Result<Option<T>, StorageError> {
        self.engine
            .get(Cf::RaftState, &keys::raft_state_key(self.shard, tag))?
            .map(|bytes| keys::decode(&bytes))
            .transpose()
    }

    fn write_state<T: serde::Serialize>(&self, tag: RaftStateTag, value: &T) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftState, keys::raft_state_key(self.shard, tag).to_vec(), keys::encode(value)?);
        self.engine.write(batch)
    }

    fn last_entry(&self) -> Result<Option<Entry>, StorageError> {
        let from = keys::log_key(self.shard, 0);
        let last = self.engine.scan_rev(Cf::RaftLog, &from, &keys::log_end(self.shard), 1)?;
        last.first().map(|(_, value)| keys::decode(value)).transpose()
    }

    /// Whether this shard has any Raft state in the engine (a vote or a log).
    pub fn exists(&self) -> Result<bool, StorageError> {
        Ok(self.read_state::<Vote>(RaftStateTag::Vote)?.is_some() || self.last_entry()?.is_some())
    }
}

impl RaftLogReader<TypeConfig> for ShardLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // `None`: to the end of the log (also for an inclusive `u64::MAX`).
        let end_exclusive = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let Some(entries) = self.tail().get(start, end_exclusive) {
            return Ok(entries);
        }
        let end = match end_exclusive {
            Some(i) => keys::log_key(self.shard, i).to_vec(),
            None => keys::log_end(self.shard),
        };
        let rows = self.engine.scan(Cf::RaftLog, &keys::log_key(self.shard, start), &end, LOG_READ_ENTRIES_MAX)?;
        let mut entries = Vec::with_capacity(rows.len());
        for (key, value) in rows {
            let index = keys::log_index_of(&key)?;
            let entry: Entry = keys::decode(&value)?;
            if entry.index() != index {
                return Err(StorageError::corrupt(format!(
                    "shard {} log key {index} holds entry {}",
                    self.shard,
                    entry.index()
                ))
                .into());
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        Ok(self.read_state(RaftStateTag::Vote)?)
    }
}

impl RaftLogStorage<TypeConfig> for ShardLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let last_purged_log_id: Option<LogId> = self.read_state(RaftStateTag::LastPurged)?;
        let last_log_id = match self.last_entry()? {
            Some(entry) => Some(entry.log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        self.write_state(RaftStateTag::Vote, vote)?;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.sync())
            .await
            .map_err(|e| std::io::Error::other(format!("vote fsync task: {e}")))??;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        // Every advance: the state machine is rebuilt up to it after a restart (see the module
        // docs). Writing it only every 64 entries let a restarted replica forget up to 63
        // applied commands (a ban among them) until a leader reached it, indefinitely so
        // in a partition.
        Ok(self.write_state(RaftStateTag::Committed, &committed)?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        Ok(self.read_state::<Option<LogId>>(RaftStateTag::Committed)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IoFlushed) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::new();
        let mut written = Vec::new();
        for entry in entries {
            batch.put(Cf::RaftLog, keys::log_key(self.shard, entry.index()).to_vec(), keys::encode(&entry)?);
            written.push(entry);
        }
        if let Err(e) = self.engine.write(batch) {
            self.tail().clear();
            return Err(e.into());
        }
        {
            let mut tail = self.tail();
            for entry in written {
                tail.append(entry);
            }
        }
        self.group_commit.flush_then(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let from = last_log_id.map_or(0, |id| id.index().saturating_add(1));
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::RaftLog, keys::log_key(self.shard, from).to_vec(), keys::log_end(self.shard));
        self.tail().truncate_after(last_log_id.map(|id| id.index()));
        self.engine.write(batch)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let mut batch = WriteBatch::new();
        batch.put(
            Cf::RaftState,
            keys::raft_state_key(self.shard, RaftStateTag::LastPurged).to_vec(),
            keys::encode(&log_id)?,
        );
        let upto = keys::log_key(self.shard, log_id.index().saturating_add(1)).to_vec();
        batch.delete_range(Cf::RaftLog, keys::log_key(self.shard, 0).to_vec(), upto);
        self.tail().purge(log_id.index());
        self.engine.write(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::vote::RaftLeaderIdExt;

    fn entry(index: u64) -> Entry {
        let leader = openraft::impls::leader_id_std::LeaderId::<u64, u64>::new_committed(1, 1);
        Entry::new_blank(LogId::new(leader, index))
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.index()).collect())
    }

    #[test]
    fn a_lone_waiter_is_fsynced_at_once_and_raft_appends_wait_less_than_crdt_writes() {
        use std::time::Duration;
        assert_eq!(fsync_gap(0, false), Duration::ZERO);
        assert_eq!(fsync_gap(1, true), Duration::ZERO, "a lone waiter");
        assert_eq!(fsync_gap(1, false), Duration::ZERO, "a lone waiter");
        assert_eq!(fsync_gap(2, true), Duration::from_micros(FSYNC_INTERVAL_MIN_US));
        assert_eq!(fsync_gap(5, false), Duration::from_micros(CRDT_FSYNC_INTERVAL_MIN_US));
        const { assert!(FSYNC_INTERVAL_MIN_US < CRDT_FSYNC_INTERVAL_MIN_US) };
    }

    #[tokio::test]
    async fn every_committed_advance_is_written_for_a_restart_to_rebuild_up_to() {
        let engine: Arc<dyn KvEngine> = Arc::new(crate::engine::MemEngine::new());
        let group_commit = GroupCommit::start(engine.clone());
        let mut store = ShardLogStore::new(ShardId(3), engine.clone(), group_commit.clone());
        for index in [3, 4, 10] {
            store.save_committed(Some(entry(index).log_id())).await.expect("save");
        }
        // A restart reads what the last advance wrote, not an older one.
        let mut reopened = ShardLogStore::new(ShardId(3), engine, group_commit);
        let committed = reopened.read_committed().await.expect("read");
        assert_eq!(committed.map(|id| id.index()), Some(10));
    }

    #[test]
    fn fsync_durations_land_in_their_bucket_and_past_the_last_bound_in_the_overflow() {
        let stats = GroupCommitStats::default();
        for micros in [0, 64, 65, 524_288, 524_289, 3_000_000] {
            stats.record(2, std::time::Duration::from_micros(micros), micros != 0);
        }
        let counts = GroupCommit { queue: mpsc::channel().0, stats: Arc::new(stats) }.counts();
        assert_eq!((counts.fsyncs, counts.failed, counts.waiters), (6, 1, 12));
        assert_eq!(counts.micros, 64 + 65 + 524_288 + 524_289 + 3_000_000);
        let mut want = [0u64; FSYNC_BUCKETS_US.len() + 1];
        want[0] = 2; // 0 and 64 µs
        want[1] = 1; // 65 µs
        want[FSYNC_BUCKETS_US.len() - 1] = 1; // the last bound itself
        want[FSYNC_BUCKETS_US.len()] = 2; // past it
        assert_eq!(counts.buckets, want);
    }

    #[tokio::test]
    async fn the_group_commit_counts_its_fsyncs_and_the_waiters_they_covered() {
        let engine: Arc<dyn KvEngine> = Arc::new(crate::engine::MemEngine::new());
        let group_commit = GroupCommit::start(engine.clone());
        let waits: Vec<_> = (0..5).map(|_| group_commit.sync()).collect();
        for result in futures::future::join_all(waits).await {
            result.expect("sync");
        }
        let counts = group_commit.counts();
        assert_eq!(counts.waiters, 5, "every waiter counted once");
        assert!((1..=5).contains(&counts.fsyncs), "{counts:?}");
        assert_eq!(counts.buckets.iter().sum::<u64>(), counts.fsyncs);
        assert_eq!(counts.failed, 0);
    }

    fn cache_of(range: std::ops::RangeInclusive<u64>) -> TailCache {
        let mut cache = TailCache::default();
        for i in range {
            cache.append(entry(i));
        }
        cache
    }

    #[test]
    fn tail_cache_answers_only_ranges_it_holds_whole() {
        let cache = cache_of(5..=9);
        assert_eq!(indexes(cache.get(5, Some(10))), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(cache.get(7, None)), Some(vec![7, 8, 9]));
        assert_eq!(indexes(cache.get(6, Some(8))), Some(vec![6, 7]));
        assert_eq!(indexes(cache.get(4, Some(8))), None, "starts before the run");
        assert_eq!(indexes(cache.get(8, Some(11))), None, "ends after the run");
        assert_eq!(indexes(cache.get(8, Some(8))), None, "empty range");
        assert_eq!(indexes(TailCache::default().get(0, None)), None);
    }

    #[test]
    fn tail_cache_restarts_on_a_gap_and_keeps_the_newest() {
        let mut cache = cache_of(1..=3);
        cache.append(entry(7));
        assert_eq!(indexes(cache.get(7, None)), Some(vec![7]));
        assert_eq!(indexes(cache.get(3, None)), None);

        let total = u64::try_from(LOG_TAIL_CACHED_MAX).unwrap_or(u64::MAX) + 10;
        let cache = cache_of(1..=total);
        assert_eq!(cache.entries.len(), LOG_TAIL_CACHED_MAX);
        assert_eq!(cache.first_index(), Some(11));
    }

    #[test]
    fn tail_cache_follows_truncation_and_purge() {
        let mut cache = cache_of(5..=9);
        cache.truncate_after(Some(7));
        assert_eq!(indexes(cache.get(5, None)), Some(vec![5, 6, 7]));
        cache.append(entry(8));
        assert_eq!(indexes(cache.get(5, None)), Some(vec![5, 6, 7, 8]));
        cache.purge(6);
        assert_eq!(indexes(cache.get(7, None)), Some(vec![7, 8]));
        assert_eq!(indexes(cache.get(6, None)), None);
        cache.truncate_after(Some(3));
        assert_eq!(cache.entries.len(), 0);
        let mut cache = cache_of(5..=9);
        cache.truncate_after(None);
        assert_eq!(cache.entries.len(), 0);
    }
}
