//! openraft's own storage test suite, run on palaver's log store and state machine over both
//! key-value engines: the in-memory one and RocksDB.

use std::sync::Arc;

use openraft::StorageError;
use openraft::errors::ErrorSource;
use openraft::testing::log::{StoreBuilder, Suite};
use palaver_ids::ShardId;
use palaver_shard::types::TypeConfig;
use palaver_shard::{GroupCommit, KvEngine, MemEngine, RocksEngine, ShardLogStore, ShardStateMachine};

struct MemBuilder;

impl StoreBuilder<TypeConfig, ShardLogStore, ShardStateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), ShardLogStore, ShardStateMachine), StorageError<TypeConfig>> {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::new());
        stores(engine).map(|(log, sm)| ((), log, sm))
    }
}

struct RocksBuilder;

impl StoreBuilder<TypeConfig, ShardLogStore, ShardStateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, ShardLogStore, ShardStateMachine), StorageError<TypeConfig>> {
        let dir =
            tempfile::tempdir().map_err(|e| StorageError::read(openraft::impls::BoxedErrorSource::from_error(&e)))?;
        let engine: Arc<dyn KvEngine> = Arc::new(
            RocksEngine::open(dir.path())
                .map_err(|e| StorageError::read(openraft::impls::BoxedErrorSource::from_error(&e)))?,
        );
        stores(engine).map(|(log, sm)| (dir, log, sm))
    }
}

fn stores(engine: Arc<dyn KvEngine>) -> Result<(ShardLogStore, ShardStateMachine), StorageError<TypeConfig>> {
    // A shard other than 0 and 1, so that keys of neighbouring shards would show up if a range
    // scan leaked across the shard prefix.
    let shard = ShardId(7);
    let group_commit = GroupCommit::start(engine.clone());
    let log = ShardLogStore::new(shard, engine.clone(), group_commit);
    let sm = ShardStateMachine::open(shard, engine)
        .map_err(|e| StorageError::read(openraft::impls::BoxedErrorSource::from_error(&e)))?;
    Ok((log, sm))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_passes_on_the_memory_engine() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(MemBuilder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_passes_on_rocksdb() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(RocksBuilder).await
}
