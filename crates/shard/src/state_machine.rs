//! openraft's state machine for one shard: the [`MetaState`] in memory, its snapshots in the
//! engine.
//!
//! The applied state lives in memory and is rebuilt on start from the shard's latest snapshot
//! plus the committed log entries after it (openraft re-applies them: `read_committed`). A
//! snapshot is written to the engine and fsynced before openraft may purge the log behind it, so
//! the snapshot and the log together always hold every committed command.
//!
//! Deterministic-apply contract: `apply` calls [`MetaState::apply`], which reads no clock and no
//! randomness; a refusal is an [`Outcome::Refused`] result, identical on every replica. An engine
//! failure is an I/O error, which stops this shard's Raft group (fatal), never a refusal.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use palaver_ids::ShardId;
use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome};
use crate::engine::{Cf, KvEngine, WriteBatch};
use crate::error::StorageError;
use crate::keys::{self, SnapshotTag};
use crate::meta::MetaState;
use crate::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};

/// What the state machine has applied: the metadata and the log position it reflects.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The metadata of the shard (users, rooms, members; for the meta group, the cluster).
    pub meta: MetaState,
    /// The last log id applied.
    pub last_applied: Option<LogId>,
    /// The last membership applied.
    pub membership: StoredMembership,
}

/// A snapshot as stored in the engine.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// A command as applied, for whoever watches the shard (room subscribers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedCommand {
    /// Where it is in the shard's log.
    pub log_index: u64,
    /// The command.
    pub command: Command,
    /// What apply returned.
    pub outcome: Outcome,
}

/// Applied room commands buffered for slow watchers; one that lags further misses some and is
/// told so by the broadcast channel.
pub const APPLIED_COMMANDS_BUFFERED: usize = 1_024;

/// One shard's state machine. Cloning shares it: the node reads [`ShardStateMachine::read`]
/// while openraft applies.
#[derive(Debug, Clone)]
pub struct ShardStateMachine {
    shard: ShardId,
    engine: Arc<dyn KvEngine>,
    applied: Arc<RwLock<Applied>>,
    watchers: tokio::sync::broadcast::Sender<Arc<AppliedCommand>>,
}

impl ShardStateMachine {
    /// Open the state machine of `shard`, restored from its latest snapshot in `engine`.
    pub fn open(shard: ShardId, engine: Arc<dyn KvEngine>) -> Result<Self, StorageError> {
        let mut applied = Applied { meta: MetaState::new(shard.is_meta()), ..Applied::default() };
        if let Some(stored) = Self::load_snapshot(shard, engine.as_ref())? {
            applied.meta = keys::decode(&stored.data)?;
            applied.last_applied = stored.meta.last_log_id;
            applied.membership = stored.meta.last_membership.clone();
        }
        let (watchers, _) = tokio::sync::broadcast::channel(APPLIED_COMMANDS_BUFFERED);
        Ok(Self { shard, engine, applied: Arc::new(RwLock::new(applied)), watchers })
    }

    /// Watch the room commands this replica applies from now on (refused ones included). A
    /// side channel: it does not change what apply decides.
    pub fn watch_applied(&self) -> tokio::sync::broadcast::Receiver<Arc<AppliedCommand>> {
        self.watchers.subscribe()
    }

    /// Read the applied state. Hold the guard briefly: apply waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        // A panic while holding the lock leaves the data as it was before that apply step;
        // reading it stays sound, so poisoning is ignored.
        self.applied.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn load_snapshot(shard: ShardId, engine: &dyn KvEngine) -> Result<Option<StoredSnapshot>, StorageError> {
        engine
            .get(Cf::Snapshot, &keys::snapshot_key(shard, SnapshotTag::Current))?
            .map(|bytes| keys::decode(&bytes))
            .transpose()
    }

    fn store_snapshot(&self, stored: &StoredSnapshot) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(Cf::Snapshot, keys::snapshot_key(self.shard, SnapshotTag::Current).to_vec(), keys::encode(stored)?);
        self.engine.write(batch)?;
        self.engine.sync()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ShardStateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
        let stored = {
            let applied = self.read();
            StoredSnapshot {
                meta: SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone() },
                data: keys::encode(&applied.meta)?,
            }
        };
        let this = self.clone();
        let stored = tokio::task::spawn_blocking(move || this.store_snapshot(&stored).map(|()| stored))
            .await
            .map_err(|e| std::io::Error::other(format!("snapshot task: {e}")))??;
        tracing::debug!(shard = %self.shard, last = ?stored.meta.last_log_id, bytes = stored.data.len(), "snapshot built");
        Ok(Snapshot { meta: stored.meta, snapshot: std::io::Cursor::new(stored.data) })
    }
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        let applied = self.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>> + Unpin + OptionalSend,
    {
        let mut entries = entries;
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = {
                let mut applied = self.write();
                applied.last_applied = Some(entry.log_id());
                match &entry.payload {
                    EntryPayload::Blank => Outcome::Done,
                    EntryPayload::Normal(command) => {
                        let outcome = applied.meta.apply(command);
                        if command.room().is_some() && self.watchers.receiver_count() > 0 {
                            let _ = self.watchers.send(Arc::new(AppliedCommand {
                                log_index: entry.log_id().index,
                                command: command.inner().clone(),
                                outcome: outcome.clone(),
                            }));
                        }
                        outcome
                    }
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id()), membership.clone());
                        Outcome::Done
                    }
                }
            };
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), std::io::Error> {
        let data = snapshot.into_inner();
        let meta_state: MetaState = keys::decode(&data)?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.store_snapshot(&stored))
            .await
            .map_err(|e| std::io::Error::other(format!("snapshot task: {e}")))??;
        let mut applied = self.write();
        applied.meta = meta_state;
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        tracing::info!(shard = %self.shard, last = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, std::io::Error> {
        let stored = Self::load_snapshot(self.shard, self.engine.as_ref())?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: std::io::Cursor::new(s.data) }))
    }
}
