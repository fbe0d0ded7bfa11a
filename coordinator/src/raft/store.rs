//! The durable half of openraft: log, vote and snapshots in one redb file.
//!
//! ```text
//!   <data_dir>/arcfed.redb
//!     logs : u64 index ──▶ serde_json(Entry)      append / truncate / purge
//!     meta : "vote" | "committed" | "last_purged" | "snapshot_meta" | "snapshot_data"
//!
//!   LogStore ─┐                          ┌─ StateMachine ──apply──▶ Shared{state, applied, effects}
//!             └── Arc<Database> (once) ──┘
//! ```
//!
//! Durability contract (openraft 0.9 v2 storage):
//! - every write is one redb write transaction, committed on a blocking thread
//!   (`spawn_blocking`), so an fsync never stalls a tokio worker;
//! - `append` calls `LogFlushed::log_io_completed` only after its commit returned, and
//!   `save_vote` returns only after its commit returned (redb's default `Durability::Immediate`);
//! - `save_committed` is only a hint and skips the fsync (`Durability::None`, see there);
//! - the state machine lives in memory. What makes it durable is the log plus the *current
//!   snapshot*, which is stored here. On `open` the state is restored from that snapshot and
//!   openraft re-applies the committed log after it (`read_committed`), which gives the same
//!   state again because `State::apply` is deterministic.
//!
//! Log keys are redb's native `u64`, which redb orders numerically, so range scans and
//! `last()` follow log order (what big-endian byte keys buy in a byte-ordered store).
use super::{NodeId, Shared, TypeConfig};
use crate::core::{Applied, Command, State};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

/// Log entries by index.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
/// Small named values (vote, committed, last purged, current snapshot), serde_json encoded.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

/// The database file inside the data dir.
pub const DB_FILE: &str = "arcfed.redb";
/// Written, fsynced and removed at open to prove the data dir is writable before we need it.
const PROBE_FILE: &str = ".arcfed-write-probe";
/// redb's page cache. Its default (1 GiB) would let a voter keep every page of the log and
/// of each snapshot written in memory: 250 MiB on a follower of 10,000 scale sets × 5. Reads
/// are of recent entries (replication) and of the one current snapshot, so a small cache
/// serves them.
const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// How long `open` retries redb's "already open" error. openraft's tasks can keep the previous
/// handle alive for a moment after `Raft::shutdown()`, so a same-process reopen (tests) races.
const OPEN_RETRY_FOR: Duration = Duration::from_secs(2);

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Why the store could not be opened. Every variant names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {}: {action}: {source}", .path.display())]
    DataDir {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot open database: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("{}: {source}", .path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: DbError,
    },
    #[error("{}: store task failed: {detail}", .path.display())]
    Task { path: PathBuf, detail: String },
    /// The store exists but cannot be what a voter wrote: the voter must not start.
    #[error("{}: refusing to start: {detail}", .path.display())]
    Damaged { path: PathBuf, detail: String },
}

/// An error inside one store operation, before it is mapped to openraft's `StorageError`
/// (whose subject says which operation failed).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Redb(#[from] redb::Error),
    #[error("corrupt {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("corrupt {what}: {detail}")]
    Inconsistent { what: String, detail: String },
    #[error("blocking store task failed: {0}")]
    Task(String),
}

/// redb has one error type per step (begin, open table, read, commit); fold them into one.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError, redb::SetDurabilityError);

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, DbError> {
    serde_json::to_vec(value).map_err(|source| DbError::Encode { what, source })
}

fn decode<T: for<'de> Deserialize<'de>>(what: impl Into<String>, bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|source| DbError::Decode { what: what.into(), source })
}

/// Runs `f` on tokio's blocking pool: redb reads and commits (fsync) must not stall the
/// workers that drive Raft heartbeats and agent streams. `to_io` names the failed operation.
async fn blocking<T, F>(to_io: fn(&DbError) -> StorageIOError<NodeId>, f: F) -> StorageResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
{
    let result = match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(join) => Err(DbError::Task(join.to_string())),
    };
    result.map_err(|e| to_io(&e).into())
}

fn read_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, DbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    match table.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// One write transaction putting (or, for `None`, removing) one meta key.
fn write_meta(db: &Database, key: &str, value: Option<Vec<u8>>, durability: Durability) -> Result<(), DbError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    {
        let mut table = txn.open_table(META)?;
        match value {
            Some(v) => {
                table.insert(key, v.as_slice())?;
            }
            None => {
                table.remove(key)?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Opens (or creates) `<data_dir>/arcfed.redb` and restores the state machine from the stored
/// snapshot into `shared`.
///
/// Call it once per process: redb refuses a second handle on the same file, so the log store and
/// the state machine share this one. An unwritable data dir fails here, with its path, rather than
/// at the first vote.
pub async fn open(data_dir: &Path, shared: Arc<Shared>) -> Result<(LogStore, StateMachine), StoreError> {
    let dir = data_dir.to_path_buf();
    let db_path = dir.join(DB_FILE);
    let task_path = db_path.clone();
    let opened = tokio::task::spawn_blocking(move || open_blocking(&dir))
        .await
        .map_err(|e| StoreError::Task { path: task_path, detail: e.to_string() })??;
    let (db, restored) = opened;
    let db = Arc::new(db);

    let (last_applied, last_membership, state) = match restored {
        Some((meta, body)) => (meta.last_log_id, meta.last_membership, body.state),
        None => (None, StoredMembership::default(), State::default()),
    };
    // Always overwrite: openraft re-applies from `last_applied`, so anything already in `shared`
    // (a reused handle in tests) would be applied twice.
    *shared.state.write().unwrap_or_else(PoisonError::into_inner) = state;
    shared.applied.send_replace(last_applied.map_or(0, |l| l.index));
    tracing::info!(path = %db_path.display(), last_applied = ?last_applied, "raft store opened");

    let log = LogStore { db: db.clone() };
    let sm = StateMachine { db, shared, last_applied, last_membership };
    Ok((log, sm))
}

type Meta = SnapshotMeta<NodeId, BasicNode>;
type Restored = Option<(Meta, SnapshotBody)>;

fn open_blocking(dir: &Path) -> Result<(Database, Restored), StoreError> {
    let dir_err = |action: &'static str| {
        let path = dir.to_path_buf();
        move |source| StoreError::DataDir { path, action, source }
    };
    std::fs::create_dir_all(dir).map_err(dir_err("cannot create directory"))?;
    let probe = dir.join(PROBE_FILE);
    let mut f = std::fs::File::create(&probe).map_err(dir_err("not writable (cannot create a file)"))?;
    f.write_all(b"arcfed").map_err(dir_err("not writable (cannot write a file)"))?;
    f.sync_all().map_err(dir_err("not writable (cannot fsync a file)"))?;
    drop(f);
    std::fs::remove_file(&probe).map_err(dir_err("cannot remove the write probe"))?;

    let path = dir.join(DB_FILE);
    // A store that exists but is empty is damage (a truncated copy, a full disk at creation),
    // not a new node: opening it as new would let the lowest node id bootstrap a fresh quorum
    // and hand out tokens from 1 again. Only a missing file means "start fresh".
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
        return Err(StoreError::Damaged {
            path,
            detail: "the file is empty (0 bytes); restore it from a backup, or remove the data dir \
                     to join as a new voter"
                .into(),
        });
    }
    let deadline = Instant::now() + OPEN_RETRY_FOR;
    let db = loop {
        match redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).create(&path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(StoreError::Open { path, source }),
        }
    };
    // redb fsyncs the file, not its directory entry: without this, a crash soon after the first
    // start could lose a freshly created file, and with it a vote already acknowledged.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(dir_err("cannot fsync the directory"))?;
    let restored = init_and_restore(&db).map_err(|source| StoreError::Db { path: path.clone(), source })?;
    Ok((db, restored))
}

/// Creates the tables (so read transactions never see "table does not exist") and reads the
/// current snapshot back.
fn init_and_restore(db: &Database) -> Result<Restored, DbError> {
    let txn = db.begin_write()?;
    txn.open_table(LOGS)?;
    txn.open_table(META)?;
    txn.commit()?;
    match read_snapshot(db)? {
        Some((meta, data)) => {
            let body = SnapshotBody::decode(&meta, &data)?;
            Ok(Some((meta, body)))
        }
        None => Ok(None),
    }
}

fn read_snapshot(db: &Database) -> Result<Option<(Meta, Vec<u8>)>, DbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    let Some(meta) = table.get(KEY_SNAPSHOT_META)? else {
        return Ok(None);
    };
    let meta: Meta = decode(KEY_SNAPSHOT_META, meta.value())?;
    let Some(data) = table.get(KEY_SNAPSHOT_DATA)? else {
        return Err(DbError::Inconsistent {
            what: "snapshot".into(),
            detail: format!("meta {} is stored without its data", meta.snapshot_id),
        });
    };
    Ok(Some((meta, data.value().to_vec())))
}

/// The Raft log and vote. Cheap to clone: it is also openraft's log reader.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

/// `range` as an inclusive `[first, last]`, or `None` if it is empty (redb must never be asked
/// for an inverted range).
fn inclusive_bounds(range: &impl RangeBounds<u64>) -> Option<(u64, u64)> {
    let first = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let last = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (first <= last).then_some((first, last))
}

/// Decodes the stored log entry at `index`: an error (never a panic) for bytes that are not an
/// entry, or an entry for another index. The fuzz tests drive it with corrupted entries.
pub fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>, DbError> {
    let entry: Entry<TypeConfig> = decode(format!("log entry {index}"), bytes)?;
    if entry.log_id.index != index {
        return Err(DbError::Inconsistent {
            what: format!("log entry {index}"),
            detail: format!("it holds log id {}", entry.log_id),
        });
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let Some((first, last)) = inclusive_bounds(&range) else {
            return Ok(Vec::new());
        };
        let db = self.db.clone();
        blocking(
            |e| StorageIOError::read_logs(e),
            move || {
                let txn = db.begin_read()?;
                let table = txn.open_table(LOGS)?;
                let mut entries = Vec::new();
                for item in table.range(first..=last)? {
                    let (k, v) = item?;
                    entries.push(decode_entry(k.value(), v.value())?);
                }
                Ok(entries)
            },
        )
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let db = self.db.clone();
        blocking(
            |e| StorageIOError::read_logs(e),
            move || {
                let txn = db.begin_read()?;
                let meta = txn.open_table(META)?;
                let last_purged_log_id: Option<LogId<NodeId>> = match meta.get(KEY_LAST_PURGED)? {
                    Some(v) => decode(KEY_LAST_PURGED, v.value())?,
                    None => None,
                };
                let logs = txn.open_table(LOGS)?;
                let last_log_id = match logs.last()? {
                    Some((k, v)) => Some(decode_entry(k.value(), v.value())?.log_id),
                    None => last_purged_log_id,
                };
                Ok(LogState { last_purged_log_id, last_log_id })
            },
        )
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durable before it returns: a vote forgotten after a crash could elect two leaders in a term.
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let bytes = encode(KEY_VOTE, vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let db = self.db.clone();
        blocking(
            |e| StorageIOError::write_vote(e),
            move || write_meta(&db, KEY_VOTE, Some(bytes), Durability::Immediate),
        )
        .await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        let db = self.db.clone();
        blocking(|e| StorageIOError::read_vote(e), move || read_meta(&db, KEY_VOTE)).await
    }

    /// Lets a restarted node re-apply its committed log without waiting for a leader.
    ///
    /// `Durability::None`: openraft awaits this in its core loop after every commit advance, and
    /// the value is only a hint (losing the newest one merely delays re-apply until the leader
    /// commits again). It becomes durable with the next `append`/`save_vote` commit, which redb
    /// persists together with every earlier commit.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let bytes = match committed {
            Some(c) => Some(encode(KEY_COMMITTED, &c).map_err(|e| StorageIOError::write(&e))?),
            None => None,
        };
        let db = self.db.clone();
        blocking(|e| StorageIOError::write(e), move || write_meta(&db, KEY_COMMITTED, bytes, Durability::None)).await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let db = self.db.clone();
        blocking(|e| StorageIOError::read(e), move || read_meta(&db, KEY_COMMITTED)).await
    }

    /// All entries in one transaction; the callback fires only after that commit (fsync) returned.
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let bytes = encode("log entry", &entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            rows.push((entry.log_id.index, bytes));
        }
        let db = self.db.clone();
        blocking(
            |e| StorageIOError::write_logs(e),
            move || {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(LOGS)?;
                    for (index, bytes) in &rows {
                        table.insert(*index, bytes.as_slice())?;
                    }
                }
                txn.commit()?;
                Ok(())
            },
        )
        .await?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    /// Removes `log_id.index` and everything after it (a conflicting suffix).
    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        blocking(
            |e| StorageIOError::write_logs(e),
            move || {
                let txn = db.begin_write()?;
                txn.open_table(LOGS)?.retain_in(log_id.index.., |_, _| false)?;
                txn.commit()?;
                Ok(())
            },
        )
        .await
    }

    /// Records `last_purged` and deletes up to `log_id.index` in the same transaction, so
    /// `get_log_state` never sees a gap without the id that explains it.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let bytes = encode(KEY_LAST_PURGED, &Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        let db = self.db.clone();
        blocking(
            |e| StorageIOError::write_logs(e),
            move || {
                let txn = db.begin_write()?;
                txn.open_table(META)?.insert(KEY_LAST_PURGED, bytes.as_slice())?;
                txn.open_table(LOGS)?.retain_in(..=log_id.index, |_, _| false)?;
                txn.commit()?;
                Ok(())
            },
        )
        .await
    }
}

/// What a snapshot's bytes hold. `last_applied`/`last_membership` repeat the snapshot meta so the
/// data can be checked against it on install and restore.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: State,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
}

impl SnapshotBody {
    fn decode(meta: &Meta, data: &[u8]) -> Result<SnapshotBody, DbError> {
        let body: SnapshotBody = decode(format!("snapshot {}", meta.snapshot_id), data)?;
        if body.last_applied != meta.last_log_id || body.last_membership != meta.last_membership {
            return Err(DbError::Inconsistent {
                what: format!("snapshot {}", meta.snapshot_id),
                detail: format!("its data covers {:?}, its meta says {:?}", body.last_applied, meta.last_log_id),
            });
        }
        Ok(body)
    }
}

/// Stores `meta`+`data` as the current snapshot in one transaction, unless a newer one is
/// already stored (a snapshot installed from the leader while this one was being built).
fn store_snapshot(db: &Database, meta: &Meta, data: &[u8]) -> Result<(), DbError> {
    let meta_bytes = encode("snapshot meta", meta)?;
    let txn = db.begin_write()?;
    let newer_stored = {
        let mut table = txn.open_table(META)?;
        let stored: Option<Meta> = match table.get(KEY_SNAPSHOT_META)? {
            Some(v) => Some(decode(KEY_SNAPSHOT_META, v.value())?),
            None => None,
        };
        let newer_stored = stored.is_some_and(|s| s.last_log_id > meta.last_log_id);
        if !newer_stored {
            table.insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
            table.insert(KEY_SNAPSHOT_DATA, data)?;
        }
        newer_stored
    };
    if newer_stored {
        txn.abort()?;
    } else {
        txn.commit()?;
    }
    Ok(())
}

/// The applied state. `State` itself sits in [`Shared`] so the server reads it without going
/// through openraft; this struct owns the Raft bookkeeping around it.
pub struct StateMachine {
    db: Arc<Database>,
    shared: Arc<Shared>,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
}

impl StateMachine {
    /// The shared applied state this machine writes to.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// A copy of the state taken when openraft asked for a builder. openraft builds snapshots on a
/// separate task while `apply` continues, so the builder must not read the live state.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    body: SnapshotBody,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Serializes the copy and stores it as the current snapshot before returning it, so
    /// `get_current_snapshot` serves it after a restart and the log before it can be purged.
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = encode("snapshot", &self.body).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let nonce: u64 = rand::random();
        let snapshot_id = match self.body.last_applied {
            Some(l) => format!("{}-{}-{nonce:016x}", l.leader_id, l.index),
            None => format!("none-{nonce:016x}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.body.last_applied,
            last_membership: self.body.last_membership.clone(),
            snapshot_id,
        };
        let db = self.db.clone();
        let (m, d) = (meta.clone(), data.clone());
        blocking(|e| StorageIOError::write_snapshot(None, e), move || store_snapshot(&db, &m, &d)).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built a snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    /// Applies the batch under one write lock, so readers see whole batches, then publishes the
    /// applied index and the effects (after the lock is released).
    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut effects = Vec::new();
        let mut announced = None;
        {
            let mut state = self.shared.state.write().unwrap_or_else(PoisonError::into_inner);
            for entry in entries {
                let index = entry.log_id.index;
                self.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => replies.push(Applied::default()),
                    EntryPayload::Normal(req) => {
                        if let Command::Advertise { node, .. } = &req.cmd
                            && *node == entry.log_id.leader_id.node_id
                        {
                            announced = Some((*node, entry.log_id.leader_id.term));
                        }
                        let applied = state.apply(index, &req);
                        effects.extend(applied.effects.iter().cloned().map(|e| (index, e)));
                        replies.push(applied);
                    }
                    EntryPayload::Membership(m) => {
                        self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        replies.push(Applied::default());
                    }
                }
            }
        }
        if let Some(last) = self.last_applied {
            self.shared.applied.send_replace(last.index);
        }
        if announced.is_some() {
            self.shared.announced.send_replace(announced);
        }
        for effect in effects {
            // No receivers (a follower, or no stream yet) is normal.
            let _ = self.shared.effects.send(effect);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            body: SnapshotBody {
                state: self.shared.snapshot(),
                last_applied: self.last_applied,
                last_membership: self.last_membership.clone(),
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Replaces the stored snapshot in one transaction, then the in-memory state. A crash between
    /// the two is harmless: `open` restores from the stored snapshot.
    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let signature = meta.signature();
        let body = SnapshotBody::decode(meta, &data).map_err(|e| StorageIOError::read_snapshot(Some(signature), &e))?;
        let db = self.db.clone();
        let m = meta.clone();
        blocking(
            |e| StorageIOError::write_snapshot(None, e),
            move || {
                let meta_bytes = encode("snapshot meta", &m)?;
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(META)?;
                    table.insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
                    table.insert(KEY_SNAPSHOT_DATA, data.as_slice())?;
                }
                txn.commit()?;
                Ok(())
            },
        )
        .await?;

        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        *self.shared.state.write().unwrap_or_else(PoisonError::into_inner) = body.state;
        self.shared.applied.send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        let stored = blocking(|e| StorageIOError::read_snapshot(None, e), move || read_snapshot(&db)).await?;
        Ok(stored.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Command, Request};
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, Membership};
    use std::collections::BTreeSet;

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// A normal entry whose effect on `State` is visible (`leader_addrs`).
    fn advertise(term: u64, index: u64, addr: &str) -> Entry<TypeConfig> {
        let req = Request { ts_ms: 1_000 + index as i64, cmd: Command::Advertise { node: index, addr: addr.into() } };
        Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(req) }
    }

    /// The fuzz seeds of `decode_entry` (fuzz/corpus/store-entry, named `<index>-*.json`) are
    /// real entries: each decodes at its index and at no other.
    #[test]
    fn the_store_entry_fuzz_seeds_are_valid_entries() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/store-entry");
        let mut n = 0;
        for f in std::fs::read_dir(&dir).expect("corpus dir") {
            let path = f.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let index: u64 = name.split('-').next().and_then(|i| i.parse().ok()).expect("<index>-*.json");
            let bytes = std::fs::read(&path).expect("seed");
            decode_entry(index, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(decode_entry(index + 1, &bytes).is_err(), "{name} decoded at another index");
            n += 1;
        }
        assert!(n >= 3, "{n} seeds");
    }

    fn membership(term: u64, index: u64, voters: &[u64]) -> Entry<TypeConfig> {
        let voters: BTreeSet<u64> = voters.iter().copied().collect();
        Entry { log_id: log_id(term, index), payload: EntryPayload::Membership(Membership::new(vec![voters], None)) }
    }

    /// Entries 1..=n: a membership entry first, then advertisements.
    fn entries(n: u64) -> Vec<Entry<TypeConfig>> {
        let mut v = vec![membership(1, 1, &[1, 2, 3])];
        v.extend((2..=n).map(|i| advertise(1, i, &format!("10.0.0.{i}:7000"))));
        v
    }

    async fn open_fresh(dir: &Path) -> (LogStore, StateMachine, Arc<Shared>) {
        let shared = Shared::new();
        let (log, sm) = open(dir, shared.clone()).await.expect("open store");
        (log, sm, shared)
    }

    #[tokio::test]
    async fn an_empty_store_file_stops_the_voter_instead_of_starting_fresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
        match open(dir.path(), Shared::new()).await {
            Err(e @ StoreError::Damaged { .. }) => {
                let text = e.to_string();
                assert!(text.contains("0 bytes") && text.contains(DB_FILE), "{text}");
            }
            Err(e) => panic!("expected Damaged, got {e}"),
            Ok(_) => panic!("an empty store was opened as a new one"),
        }
        // A missing file is a new voter.
        std::fs::remove_file(dir.path().join(DB_FILE)).unwrap();
        open_fresh(dir.path()).await;
    }

    #[tokio::test]
    async fn log_vote_and_committed_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _sm, _) = open_fresh(dir.path()).await;
            log.blocking_append(entries(3)).await.unwrap();
            log.save_vote(&Vote::new(7, 2)).await.unwrap();
            log.save_committed(Some(log_id(1, 3))).await.unwrap();
            // As in a running node, the next durable write carries the committed hint with it.
            log.blocking_append([advertise(1, 4, "a:1")]).await.unwrap();
        }
        let (mut log, _sm, _) = open_fresh(dir.path()).await;
        let got = log.try_get_log_entries(1..=4).await.unwrap();
        let want = {
            let mut v = entries(3);
            v.push(advertise(1, 4, "a:1"));
            v
        };
        assert_eq!(got, want);
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(7, 2)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_purged_log_id, None);
    }

    #[tokio::test]
    async fn purge_and_truncate_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _sm, _) = open_fresh(dir.path()).await;
            log.blocking_append(entries(6)).await.unwrap();
            log.purge(log_id(1, 2)).await.unwrap();
            log.truncate(log_id(1, 5)).await.unwrap();
        }
        let (mut log, _sm, _) = open_fresh(dir.path()).await;
        let got: Vec<u64> = log.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id.index).collect();
        assert_eq!(got, vec![3, 4]);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(1, 4)));
    }

    #[tokio::test]
    async fn snapshot_survives_reopen_and_restores_shared_state() {
        let dir = tempfile::tempdir().unwrap();
        let (built, state_at_snapshot, full_state) = {
            let (_log, mut sm, shared) = open_fresh(dir.path()).await;
            let all = entries(5);
            sm.apply(all[..3].to_vec()).await.unwrap();
            let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
            let state_at_snapshot = shared.snapshot();
            sm.apply(all[3..].to_vec()).await.unwrap();
            (built.meta, state_at_snapshot, shared.snapshot())
        };
        assert_ne!(state_at_snapshot, full_state, "entries after the snapshot change the state");

        let (_log, mut sm, shared) = open_fresh(dir.path()).await;
        let current = sm.get_current_snapshot().await.unwrap().expect("stored snapshot");
        assert_eq!(current.meta, built);
        assert_eq!(shared.snapshot(), state_at_snapshot);
        assert_eq!(*shared.applied.borrow(), 3);
        let (applied, mem) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 3)));
        assert_eq!(mem.log_id(), &Some(log_id(1, 1)));

        // What openraft does after a restart: re-apply the committed log after the snapshot.
        sm.apply(entries(5)[3..].to_vec()).await.unwrap();
        assert_eq!(shared.snapshot(), full_state, "re-applying gives the same state");
        assert_eq!(*shared.applied.borrow(), 5);
    }

    #[tokio::test]
    async fn install_snapshot_replaces_state_and_survives_reopen() {
        let leader_dir = tempfile::tempdir().unwrap();
        let follower_dir = tempfile::tempdir().unwrap();
        let (_l, mut leader, leader_shared) = open_fresh(leader_dir.path()).await;
        leader.apply(entries(4)).await.unwrap();
        let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

        {
            let (_f, mut follower, shared) = open_fresh(follower_dir.path()).await;
            follower.apply([advertise(1, 1, "stale:1")]).await.unwrap();
            assert_ne!(shared.snapshot(), leader_shared.snapshot());

            let mut incoming = follower.begin_receiving_snapshot().await.unwrap();
            incoming.get_mut().extend_from_slice(snap.snapshot.get_ref());
            follower.install_snapshot(&snap.meta, incoming).await.unwrap();

            assert_eq!(shared.snapshot(), leader_shared.snapshot());
            assert_eq!(*shared.applied.borrow(), 4);
            assert_eq!(
                follower.applied_state().await.unwrap(),
                (snap.meta.last_log_id, snap.meta.last_membership.clone())
            );
        }
        let (_f, mut follower, shared) = open_fresh(follower_dir.path()).await;
        assert_eq!(shared.snapshot(), leader_shared.snapshot());
        assert_eq!(follower.get_current_snapshot().await.unwrap().map(|s| s.meta), Some(snap.meta));
    }

    #[tokio::test]
    async fn install_snapshot_rejects_data_that_contradicts_its_meta() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, mut sm, _) = open_fresh(dir.path()).await;
        sm.apply(entries(2)).await.unwrap();
        let mut snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        snap.meta.last_log_id = Some(log_id(1, 9));
        assert!(sm.install_snapshot(&snap.meta, snap.snapshot).await.is_err());

        let garbage = Box::new(Cursor::new(b"not json".to_vec()));
        assert!(sm.install_snapshot(&snap.meta, garbage).await.is_err());
    }

    #[tokio::test]
    async fn a_snapshot_built_before_an_install_does_not_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, mut sm, _) = open_fresh(dir.path()).await;
        sm.apply(entries(2)).await.unwrap();
        let mut old_builder = sm.get_snapshot_builder().await;

        let other = tempfile::tempdir().unwrap();
        let (_o, mut newer, _) = open_fresh(other.path()).await;
        newer.apply(entries(6)).await.unwrap();
        let snap = newer.get_snapshot_builder().await.build_snapshot().await.unwrap();
        sm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();

        old_builder.build_snapshot().await.unwrap();
        let current = sm.get_current_snapshot().await.unwrap().expect("stored snapshot");
        assert_eq!(current.meta, snap.meta);
    }

    #[tokio::test]
    async fn corrupt_log_entry_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _sm, _) = open_fresh(dir.path()).await;
        log.blocking_append(entries(2)).await.unwrap();
        let txn = log.db.begin_write().unwrap();
        txn.open_table(LOGS).unwrap().insert(3, b"{not json".as_slice()).unwrap();
        txn.commit().unwrap();

        let err = log.try_get_log_entries(1..4).await.unwrap_err();
        assert!(err.to_string().contains("log entry 3"), "{err}");
        assert!(log.get_log_state().await.is_err());
    }

    #[tokio::test]
    async fn data_dir_that_is_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = open(&file, Shared::new()).await.err().expect("open must fail");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::DataDir { .. }), "{msg}");
        assert!(msg.starts_with(&format!("data dir {}: cannot create directory: ", file.display())), "{msg}");
    }

    #[tokio::test]
    async fn reopen_in_the_same_process_waits_for_the_old_handle() {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm, _) = open_fresh(dir.path()).await;
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop((log, sm));
        });
        let (_log, _sm, _) = open_fresh(dir.path()).await;
        release.await.unwrap();
    }
}
