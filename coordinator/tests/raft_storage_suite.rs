//! openraft's own storage conformance suite (`openraft::testing::Suite`) on our redb store.
//!
//! Each scenario gets a fresh temp dir, hence its own database file and its own `Shared`.
use arcfed_coordinator::raft::store::{self, LogStore, StateMachine};
use arcfed_coordinator::raft::{NodeId, Shared, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};

struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) = store::open(dir.path(), Shared::new()).await.map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn redb_store_passes_openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RedbStoreBuilder)
}
