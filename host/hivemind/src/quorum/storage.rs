//! Raft's durable state on redb: the log and vote ([`LogStore`]) and the
//! state machine ([`StateMachine`]).
//!
//! The log and vote live in the store's `raft.redb`; every append and vote
//! is a durable commit there before openraft hears it is done, as losing
//! either would allow two leaders in one term or lose acknowledged entries.
//!
//! The state machine lives in `hivemind.redb`. Applying is not forced to
//! disk entry by entry: a commit is made durable every 200 ms at most and
//! whenever a snapshot is taken. After a crash the state machine resumes
//! from its last durable `applied` and replays the log after it; openraft
//! purges the log only behind a snapshot, which is durable by then, so the
//! entries to replay are always there. Replaying gives the same seqs, so a
//! role may see an event again, never a different one under the same seq.
//!
//! The state machine's events live in the store's `events` table keyed by
//! their seq: consecutive numbers given at apply (one log entry may carry a
//! batch of events). Taking a snapshot compacts them to the latest event
//! per kind+key; the snapshot's bytes are produced when one is read (to
//! send to a follower), from a consistent read of the state machine.

// openraft's traits fix `StorageError` as the error type; its size is theirs.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClusterState, Command, CommandResult, MemberRecord, NodeAddress, NodeId, TokenRecord, TypeConfig};
use crate::log::StoredEvent;
use crate::store::{EVENTS, Store};

/// Raft log entries by index, JSON-encoded.
const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// `vote`, `last_purged`.
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// `applied`, `membership`, `cluster`, `snapshot_taken` (the log id of
/// the last snapshot taken or installed; none before the first).
const MACHINE: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");
/// Latest event seq per `KIND\0KEY`, for compaction.
const LATEST: TableDefinition<&str, u64> = TableDefinition::new("latest_events");
/// Seqs of events a later one of the same kind+key replaced: what the next
/// compaction removes.
const SUPERSEDED: TableDefinition<u64, ()> = TableDefinition::new("superseded_events");

/// The longest the state machine goes without a durable commit.
const STATE_MACHINE_FLUSH: std::time::Duration = std::time::Duration::from_millis(200);
/// Log entries kept in memory for replication: at most this many, and
/// at most `LOG_TAIL_BYTES` of them encoded (a group commit can make one
/// entry large).
const LOG_TAIL: usize = 4096;
const LOG_TAIL_BYTES: usize = 16 << 20;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn io_error(subject: ErrorSubject<NodeId>, verb: ErrorVerb, error: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::error(error.to_string())).into()
}

fn read_error(error: impl std::fmt::Display) -> StorageError<NodeId> {
    io_error(ErrorSubject::Store, ErrorVerb::Read, error)
}

fn write_error(error: impl std::fmt::Display) -> StorageError<NodeId> {
    io_error(ErrorSubject::Store, ErrorVerb::Write, error)
}

/// Runs blocking redb work off the async threads.
async fn blocking<T: Send + 'static>(
    db: &Arc<Database>,
    work: impl FnOnce(&Database) -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || work(&db))
        .await
        .map_err(write_error)?
}

fn get_json<T: for<'de> Deserialize<'de>>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> StorageResult<Option<T>> {
    match table.get(key).map_err(read_error)? {
        None => Ok(None),
        Some(value) => serde_json::from_slice(value.value()).map(Some).map_err(read_error),
    }
}

fn to_json<T: Serialize>(value: &T) -> StorageResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(write_error)
}

fn anyhow_error(error: StorageError<NodeId>) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

/// Stores written before the log had a file of its own keep it in
/// `hivemind.redb`: copy it into `raft.redb`, durably, then drop it there.
/// A crash in between copies it again on the next start (nothing has been
/// appended meanwhile, so the copy is the same).
fn move_log_to_own_file(db: &Database, log_db: &Database) -> anyhow::Result<()> {
    let read = db.begin_read()?;
    let old_log = match read.open_table(RAFT_LOG) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    let old_meta = read.open_table(RAFT_META)?;
    let txn = log_db.begin_write()?;
    {
        let mut log = txn.open_table(RAFT_LOG)?;
        for item in old_log.iter()? {
            let (index, entry) = item?;
            log.insert(index.value(), entry.value())?;
        }
        let mut meta = txn.open_table(RAFT_META)?;
        for item in old_meta.iter()? {
            let (key, value) = item?;
            meta.insert(key.value(), value.value())?;
        }
    }
    txn.commit()?;
    drop((old_log, old_meta, read));
    let txn = db.begin_write()?;
    txn.delete_table(RAFT_LOG)?;
    txn.delete_table(RAFT_META)?;
    txn.commit()?;
    Ok(())
}

/// What the host reads of a Raft core's storage while it runs: kept when a
/// stopped core is replaced by a new one over the same files, so readers
/// never hold a handle to the old one.
#[derive(Clone)]
pub struct Kept {
    /// The highest log index known committed.
    pub committed: Arc<std::sync::atomic::AtomicU64>,
    /// The last event's seq, for watchers.
    pub applied: Arc<watch::Sender<u64>>,
    /// The cluster facts as last applied.
    pub cluster: Arc<std::sync::RwLock<ClusterState>>,
}

/// Opens the Raft tables in `store` and returns the log and the state
/// machine; `kept` are the handles of the core they replace, if any.
pub fn open(store: &Store, kept: Option<&Kept>) -> anyhow::Result<(LogStore, StateMachine, Kept)> {
    let db = store.database()?;
    let log_db = store.raft_log_database()?;
    move_log_to_own_file(&db, &log_db)?;
    let txn = log_db.begin_write()?;
    txn.open_table(RAFT_LOG)?;
    txn.open_table(RAFT_META)?;
    txn.commit()?;
    let txn = db.begin_write()?;
    {
        let mut machine = txn.open_table(MACHINE)?;
        txn.open_table(LATEST)?;
        // Stores written before compaction tracked superseded events (and
        // kept the snapshot's bytes) are brought up to date once.
        let tables: Vec<String> = txn.list_tables()?.map(|table| table.name().to_string()).collect();
        if !tables.iter().any(|name| name == SUPERSEDED.name()) {
            let mut superseded = txn.open_table(SUPERSEDED)?;
            let keep: BTreeSet<u64> = txn
                .open_table(LATEST)?
                .iter()?
                .map(|item| item.map(|(_, seq)| seq.value()))
                .collect::<Result<_, _>>()?;
            for item in txn.open_table(EVENTS)?.iter()? {
                let seq = item?.0.value();
                if !keep.contains(&seq) {
                    superseded.insert(seq, ())?;
                }
            }
        }
        let old_snapshot: Option<StoredSnapshot> = get_json(&machine, "snapshot").map_err(anyhow_error)?;
        if let Some(old) = old_snapshot {
            let taken = to_json(&old.meta.last_log_id).map_err(anyhow_error)?;
            machine.insert("snapshot_taken", taken.as_slice())?;
            machine.remove("snapshot")?;
        }
    }
    txn.commit()?;
    let last_seq = {
        let read = db.begin_read()?;
        let table = read.open_table(EVENTS)?;
        table.last()?.map(|(seq, _)| seq.value()).unwrap_or(0)
    };
    let cluster = read_cluster(&db)?;
    let kept = match kept {
        Some(kept) => {
            // What is on disk is what this node applied durably; a stopped
            // core's last words in memory may not have reached it.
            *kept.cluster.write().unwrap() = cluster;
            kept.applied
                .send_if_modified(|last| std::mem::replace(last, last_seq) != last_seq);
            kept.clone()
        }
        None => Kept {
            committed: Default::default(),
            applied: Arc::new(watch::channel(last_seq).0),
            cluster: Arc::new(std::sync::RwLock::new(cluster)),
        },
    };
    let mut log = LogStore::new(log_db);
    log.committed = kept.committed.clone();
    let machine = StateMachine {
        db,
        applied: kept.applied.clone(),
        last_durable: Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
        cluster: kept.cluster.clone(),
    };
    Ok((log, machine, kept))
}

/// The Raft log. Appends go to the `raft-log-writer` thread, which commits
/// whatever has queued up in one durable transaction and only then reports
/// each append flushed: so the leader replicates while its own flush runs
/// (see `vendor/README.md`), and a burst of appends costs one fsync.
/// Truncation and purge wait for the queued appends first, so the log's
/// order on disk is the order openraft gave. Entries a purge leaves on disk
/// are deleted by the `raft-log-purger` thread a chunk at a time, so a
/// purge of thousands of entries never holds up an append. The last
/// [`LOG_TAIL`] entries stay in memory (`tail`), so replicating them to
/// followers reads no disk, even before they are durable here.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    tail: Arc<std::sync::RwLock<LogTail>>,
    /// Tells the purger how far the log is purged.
    purged: Arc<watch::Sender<Option<u64>>>,
    writes: std::sync::mpsc::Sender<LogWrite>,
    /// Appends sent to the writer and not yet done.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// This node, once known: entries another leader made are a follower's
    /// appends, which openraft waits for anyway.
    me: Option<NodeId>,
    /// The highest log index known committed, for metrics (openraft 0.9
    /// reports it only through `save_committed`).
    committed: Arc<std::sync::atomic::AtomicU64>,
}

/// Work for the log writer thread, done in the order sent.
enum LogWrite {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Answered once everything sent before it is durable.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The log writer thread: group-commits queued appends, then reports them.
fn write_log(
    db: Arc<Database>,
    tail: Arc<std::sync::RwLock<LogTail>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    writes: std::sync::mpsc::Receiver<LogWrite>,
) {
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        while let Ok(next) = writes.try_recv() {
            batch.push(next);
        }
        let mut last_index = None;
        let result = (|| {
            let txn = db.begin_write().map_err(|error| error.to_string())?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(|error| error.to_string())?;
                for write in &batch {
                    if let LogWrite::Append { entries, .. } = write {
                        for (index, bytes) in entries {
                            table
                                .insert(*index, bytes.as_slice())
                                .map_err(|error| error.to_string())?;
                            last_index = Some(*index);
                        }
                    }
                }
            }
            // Durable when commit returns: only then may openraft count it.
            txn.commit().map_err(|error| error.to_string())
        })();
        if result.is_ok()
            && let Some(index) = last_index
        {
            tail.write().unwrap().mark_durable(index);
        }
        for write in batch {
            match write {
                LogWrite::Append { callback, .. } => {
                    queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                }
                LogWrite::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        if let Err(error) = &result {
            tracing::error!(%error, "the Raft log cannot be written");
        }
    }
}

impl LogStore {
    fn new(db: Arc<Database>) -> LogStore {
        let leftover = leftover_purged(&db).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the Raft log's purge point; leftover entries stay until the next purge");
            None
        });
        let (purged, watch) = watch::channel(leftover);
        let thread_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-purger".into())
            .spawn(move || delete_purged(thread_db, watch))
            .expect("start the log purger thread");
        let tail = Arc::new(std::sync::RwLock::new(LogTail::default()));
        let (writes, received) = std::sync::mpsc::channel();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (thread_db, thread_tail, thread_queued) = (db.clone(), tail.clone(), queued.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_log(thread_db, thread_tail, thread_queued, received))
            .expect("start the log writer thread");
        LogStore {
            db,
            tail,
            purged: Arc::new(purged),
            writes,
            queued,
            me: None,
            committed: Default::default(),
        }
    }

    /// Names this node, so appends of entries another leader made (this
    /// node following) commit inline: openraft waits for them before it
    /// answers the leader, and a thread hop would only add latency.
    pub fn set_node_id(&mut self, me: NodeId) {
        self.me = Some(me);
    }

    /// Waits until every append sent so far is durable.
    async fn flush_writes(&self) -> StorageResult<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.writes
            .send(LogWrite::Barrier(done))
            .map_err(|_| io_error(ErrorSubject::Logs, ErrorVerb::Write, "the log writer stopped"))?;
        wait.await
            .map_err(|_| io_error(ErrorSubject::Logs, ErrorVerb::Write, "the log writer stopped"))
    }

    /// One durable commit of `work`.
    fn commit(
        &self,
        subject: ErrorSubject<NodeId>,
        work: impl FnOnce(&redb::WriteTransaction) -> StorageResult<()>,
    ) -> StorageResult<()> {
        let txn = self.db.begin_write().map_err(write_error)?;
        work(&txn)?;
        // Durable when commit returns: only then may openraft count it.
        txn.commit().map_err(|error| io_error(subject, ErrorVerb::Write, error))
    }
}

/// The last entries appended, one run of consecutive indexes, with the
/// size of each encoded.
#[derive(Default)]
struct LogTail {
    entries: BTreeMap<u64, (Entry<TypeConfig>, usize)>,
    bytes: usize,
    /// Entries up to here are on disk; later ones only here, so they are
    /// never evicted.
    durable: u64,
}

impl LogTail {
    fn push(&mut self, entries: Vec<(Entry<TypeConfig>, usize)>) {
        let follows = match (self.entries.last_key_value(), entries.first()) {
            (Some((last, _)), Some((first, _))) => last + 1 == first.log_id.index,
            _ => true,
        };
        if !follows {
            self.entries.clear();
            self.bytes = 0;
        }
        for (entry, size) in entries {
            self.bytes += size;
            if let Some((_, replaced)) = self.entries.insert(entry.log_id.index, (entry, size)) {
                self.bytes -= replaced;
            }
        }
        self.evict();
    }

    fn mark_durable(&mut self, index: u64) {
        self.durable = self.durable.max(index);
        self.evict();
    }

    fn evict(&mut self) {
        while self.entries.len() > LOG_TAIL || (self.bytes > LOG_TAIL_BYTES && self.entries.len() > 1) {
            match self.entries.first_entry() {
                Some(first) if *first.key() <= self.durable => {
                    let (_, size) = first.remove();
                    self.bytes -= size;
                }
                _ => return,
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.entries.retain(|index, _| keep(*index));
        self.bytes = self.entries.values().map(|(_, size)| size).sum();
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.first_key_value().map(|(index, _)| *index)
    }

    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries.last_key_value().map(|(_, (entry, _))| entry.log_id)
    }

    fn range(&self, range: (Bound<u64>, Bound<u64>)) -> BTreeMap<u64, Entry<TypeConfig>> {
        self.entries
            .range(range)
            .map(|(index, (entry, _))| (*index, entry.clone()))
            .collect()
    }
}

/// The purger thread: deletes the entries up to the purge point from disk,
/// a chunk per transaction, until every `LogStore` is gone.
fn delete_purged(db: Arc<Database>, mut purged: watch::Receiver<Option<u64>>) {
    loop {
        let upto = *purged.borrow_and_update();
        let more = match upto {
            Some(upto) => delete_purged_chunk(&db, upto).unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot delete purged Raft log entries; retrying at the next purge");
                false
            }),
            None => false,
        };
        if !more && futures::executor::block_on(purged.changed()).is_err() {
            return;
        }
    }
}

/// Entries purged from the log in a chunk.
const PURGE_CHUNK: u64 = 256;

/// The purge point, when entries at or before it are still on disk (a purge
/// the previous run did not finish deleting).
fn leftover_purged(db: &Database) -> StorageResult<Option<u64>> {
    let read = db.begin_read().map_err(read_error)?;
    let last_purged: Option<LogId<NodeId>> = get_json(&read.open_table(RAFT_META).map_err(read_error)?, "last_purged")?;
    let first = read
        .open_table(RAFT_LOG)
        .map_err(read_error)?
        .first()
        .map_err(read_error)?
        .map(|(index, _)| index.value());
    Ok(match (first, last_purged) {
        (Some(first), Some(purged)) if first <= purged.index => Some(purged.index),
        _ => None,
    })
}

/// Deletes the next chunk of purged entries; true while some are left. Not
/// forced to disk: the purge point is, and a leftover entry is deleted again.
fn delete_purged_chunk(db: &Database, upto: u64) -> StorageResult<bool> {
    let mut txn = db.begin_write().map_err(write_error)?;
    txn.set_durability(Durability::None).map_err(write_error)?;
    let more = {
        let mut log = txn.open_table(RAFT_LOG).map_err(write_error)?;
        let Some(first) = log.first().map_err(read_error)?.map(|(index, _)| index.value()) else {
            return Ok(false);
        };
        if first > upto {
            return Ok(false);
        }
        let end = upto.min(first + PURGE_CHUNK - 1);
        log.retain_in(first..=end, |_, _| false).map_err(write_error)?;
        end < upto
    };
    txn.commit().map_err(write_error)?;
    Ok(more)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        // The tail first: it holds every entry from its first index on, so
        // a range that starts there (replication, usually) is all in it.
        let (from_tail, tail_start) = {
            let tail = self.tail.read().unwrap();
            (tail.range(range), tail.first_index())
        };
        let starts_in_tail = match (range.0, tail_start) {
            (Bound::Included(start), Some(first)) => start >= first,
            (Bound::Excluded(start), Some(first)) => start >= first,
            _ => false,
        };
        if starts_in_tail {
            return Ok(from_tail.into_values().collect());
        }
        let pending = from_tail;
        let mut entries: BTreeMap<u64, Entry<TypeConfig>> = blocking(&self.db, move |db| {
            let read = db.begin_read().map_err(read_error)?;
            let table = read.open_table(RAFT_LOG).map_err(read_error)?;
            let mut entries = BTreeMap::new();
            for item in table.range::<u64>(range).map_err(read_error)? {
                let (index, value) = item.map_err(read_error)?;
                entries.insert(
                    index.value(),
                    serde_json::from_slice(value.value()).map_err(read_error)?,
                );
            }
            Ok(entries)
        })
        .await?;
        entries.extend(pending);
        Ok(entries.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_pending = self.tail.read().unwrap().last_log_id();
        let mut state = blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            let meta = read.open_table(RAFT_META).map_err(read_error)?;
            let last_purged: Option<LogId<NodeId>> = get_json(&meta, "last_purged")?;
            let log = read.open_table(RAFT_LOG).map_err(read_error)?;
            let last_stored = match log.last().map_err(read_error)? {
                Some((_, value)) => Some(
                    serde_json::from_slice::<Entry<TypeConfig>>(value.value())
                        .map_err(read_error)?
                        .log_id,
                ),
                None => None,
            };
            // Entries at or before the purge point may still be on disk.
            let last = last_stored.max(last_purged);
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await?;
        if last_pending > state.last_log_id {
            state.last_log_id = last_pending;
        }
        Ok(state)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let bytes = to_json(vote)?;
        self.commit(ErrorSubject::Vote, |txn| {
            txn.open_table(RAFT_META)
                .map_err(write_error)?
                .insert("vote", bytes.as_slice())
                .map_err(write_error)?;
            Ok(())
        })
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            get_json(&read.open_table(RAFT_META).map_err(read_error)?, "vote")
        })
        .await
    }

    // The committed index is kept in memory only, for metrics, and
    // `read_committed` keeps openraft's default (none): a restarted node
    // re-learns it from the leader and re-applies from its last durable
    // `applied`. Storing it would cost a write transaction per commit on
    // the hot path.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        if let Some(committed) = committed {
            self.committed
                .fetch_max(committed.index, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let encoded: Vec<(LogId<NodeId>, Vec<u8>)> = entries
            .iter()
            .map(|entry| Ok((entry.log_id, to_json(entry)?)))
            .collect::<StorageResult<_>>()?;
        self.tail.write().unwrap().push(
            entries
                .into_iter()
                .zip(&encoded)
                .map(|(entry, (_, bytes))| (entry, bytes.len()))
                .collect(),
        );
        let following = self.me.is_some_and(|me| {
            encoded
                .first()
                .is_some_and(|(log_id, _)| log_id.leader_id.node_id != me)
        });
        // With appends still queued (this node led a moment ago), the
        // writer keeps the order.
        if following && self.queued.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            let last = encoded.last().map(|(log_id, _)| log_id.index);
            let result = self.commit(ErrorSubject::Logs, |txn| {
                let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                for (log_id, bytes) in &encoded {
                    table.insert(log_id.index, bytes.as_slice()).map_err(write_error)?;
                }
                Ok(())
            });
            if result.is_ok()
                && let Some(last) = last
            {
                self.tail.write().unwrap().mark_durable(last);
            }
            callback.log_io_completed(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|error| std::io::Error::other(error.to_string())),
            );
            return result;
        }
        let entries = encoded
            .into_iter()
            .map(|(log_id, bytes)| (log_id.index, bytes))
            .collect();
        self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.writes.send(LogWrite::Append { entries, callback }).map_err(|_| {
            self.queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            io_error(ErrorSubject::Logs, ErrorVerb::Write, "the log writer stopped")
        })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.flush_writes().await?;
        self.tail.write().unwrap().retain(|index| index < log_id.index);
        self.commit(ErrorSubject::Logs, |txn| {
            txn.open_table(RAFT_LOG)
                .map_err(write_error)?
                .retain_in(log_id.index.., |_, _| false)
                .map_err(write_error)
        })
    }

    /// Durably moves the purge point; the purger deletes the entries.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.flush_writes().await?;
        self.tail.write().unwrap().retain(|index| index > log_id.index);
        let bytes = to_json(&Some(log_id))?;
        self.commit(ErrorSubject::Logs, |txn| {
            txn.open_table(RAFT_META)
                .map_err(write_error)?
                .insert("last_purged", bytes.as_slice())
                .map_err(write_error)?;
            Ok(())
        })?;
        self.purged.send_replace(Some(log_id.index));
        Ok(())
    }
}

/// Applies commands to the state machine's tables within one transaction.
/// Events get consecutive seqs after the highest one stored (compaction
/// always keeps that one, as it is the latest of its kind+key), so every
/// node numbers them alike.
struct Applier<'a, 't> {
    cluster: &'a mut ClusterState,
    events: &'a mut redb::Table<'t, u64, &'static [u8]>,
    latest: &'a mut redb::Table<'t, &'static str, u64>,
    superseded: &'a mut redb::Table<'t, u64, ()>,
    next_seq: u64,
    /// The newest event's time: no event is recorded before it, so the
    /// log's times never go back when members' clocks disagree.
    last_timestamp_ms: u64,
}

impl Applier<'_, '_> {
    /// A new Raft membership: the epoch moves when the voters change,
    /// members follow the nodes it lists, and each node it no longer lists
    /// is recorded as `node.removed`, so roles drop it (its DNS name among
    /// its records) and the registry stops showing it.
    fn apply_membership(&mut self, membership: &openraft::Membership<NodeId, NodeAddress>) -> StorageResult<()> {
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        if voters != self.cluster.voters {
            self.cluster.epoch += 1;
            self.cluster.voters = voters;
        }
        let listed: BTreeMap<NodeId, &NodeAddress> = membership.nodes().map(|(id, node)| (*id, node)).collect();
        // A member admitted by `node.joined` but not yet added as a learner
        // is not gone when a membership change proposed before its addition
        // applies without it.
        let gone: Vec<(NodeId, String)> = self
            .cluster
            .members
            .iter()
            .filter(|(id, member)| !member.awaiting_learner && !listed.contains_key(id))
            .map(|(id, member)| (*id, member.name.clone()))
            .collect();
        for (id, node) in &listed {
            let epoch = self.cluster.epoch;
            let member = self.cluster.members.entry(*id).or_insert(MemberRecord {
                joined_epoch: epoch,
                ..MemberRecord::default()
            });
            member.awaiting_learner = false;
            if member.name.is_empty() {
                member.name.clone_from(&node.name);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        let timestamp_ms = self.last_timestamp_ms;
        for (id, name) in gone {
            self.cluster.members.remove(&id);
            self.cluster.removed.retain(|removed| *removed != id);
            self.cluster.removed.push(id);
            let key = super::hex_id(id);
            self.record(
                "node.removed".into(),
                key.clone(),
                key,
                timestamp_ms,
                serde_json::json!({ "name": name }),
            )?;
        }
        let overflow = self.cluster.removed.len().saturating_sub(super::REMOVED_KEPT);
        self.cluster.removed.drain(..overflow);
        Ok(())
    }

    /// The newest event's time, read from the store: an entry that carries
    /// no time of its own (a membership change) is recorded at it.
    fn newest_timestamp_ms(&self) -> StorageResult<u64> {
        let Some((_, bytes)) = self.events.last().map_err(read_error)? else {
            return Ok(0);
        };
        Ok(serde_json::from_slice::<StoredEvent>(bytes.value())
            .map(|event| event.timestamp_ms)
            .unwrap_or(0))
    }

    fn last_seq(&self) -> StorageResult<u64> {
        Ok(self
            .events
            .last()
            .map_err(read_error)?
            .map(|(seq, _)| seq.value())
            .unwrap_or(0))
    }

    fn record(
        &mut self,
        kind: String,
        key: String,
        source: String,
        timestamp_ms: u64,
        payload: serde_json::Value,
    ) -> StorageResult<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        // A time from a node whose clock is behind the newest event's is
        // raised to it: readers may take the log's times as ordered.
        let timestamp_ms = timestamp_ms.max(self.last_timestamp_ms);
        self.last_timestamp_ms = timestamp_ms;
        let event = StoredEvent {
            seq,
            epoch: self.cluster.epoch,
            kind,
            key,
            source,
            timestamp_ms,
            payload,
        };
        self.events
            .insert(seq, to_json(&event)?.as_slice())
            .map_err(write_error)?;
        let replaced = self
            .latest
            .insert(latest_key(&event.kind, &event.key).as_str(), seq)
            .map_err(write_error)?
            .map(|old| old.value());
        if let Some(old) = replaced {
            self.superseded.insert(old, ()).map_err(write_error)?;
        }
        Ok(seq)
    }

    fn apply(&mut self, command: Command) -> StorageResult<CommandResult> {
        Ok(match command {
            Command::Event {
                kind,
                key,
                source,
                timestamp_ms,
                payload,
            } => CommandResult::Event {
                seq: self.record(kind, key, source, timestamp_ms, payload)?,
            },
            Command::Batch(commands) => CommandResult::Batch(
                commands
                    .into_iter()
                    .map(|command| self.apply(command))
                    .collect::<StorageResult<_>>()?,
            ),
            Command::Formed {
                cluster_id,
                secret,
                founders,
                timestamp_ms,
            } => {
                // Only the first one counts: a cluster's identity never changes.
                if self.cluster.cluster_id.is_empty() {
                    self.cluster.cluster_id = cluster_id;
                    self.cluster.secret = secret;
                    let epoch = self.cluster.epoch;
                    for (id, address) in founders {
                        let payload = joined_payload(&address, epoch);
                        let id = format!("{id:016x}");
                        self.record("node.joined".into(), id.clone(), id, timestamp_ms, payload)?;
                    }
                }
                CommandResult::Nothing
            }
            Command::TokenIssued {
                id,
                secret,
                expires_ms,
                ttl_ms,
            } => {
                forget_old_tokens(self.cluster, expires_ms);
                self.cluster.tokens.insert(
                    id,
                    TokenRecord {
                        secret,
                        expires_ms,
                        ttl_ms,
                        learned_ms: super::now_ms(),
                        used_by: None,
                    },
                );
                CommandResult::Nothing
            }
            Command::NodeJoined {
                id,
                address,
                token,
                timestamp_ms,
            } => {
                // The name first: a join refused for it leaves the token unused.
                let taken = super::join::name_taken_by(
                    &address.name,
                    id,
                    self.cluster
                        .members
                        .iter()
                        .map(|(id, member)| (*id, member.name.as_str())),
                );
                let refusal = taken.or_else(|| {
                    token
                        .as_ref()
                        .and_then(|token| match self.cluster.tokens.get_mut(token) {
                            None => Some("the join token is unknown to this cluster".to_string()),
                            Some(record) => match record.used_by {
                                Some(user) if user != id => Some(format!(
                                    "the join token was already used (by node {user:016x}); ask for a new one with \
                             `hivemind members token`"
                                )),
                                // The leader decides expiry by its own clock
                                // before it proposes the join (see
                                // `TokenRecord::expired`); only entries from
                                // before TTLs were kept are checked here,
                                // as they were when first applied.
                                _ if record.ttl_ms == 0 && timestamp_ms > record.expires_ms => Some(
                                    "the join token has expired; ask for a new one with `hivemind members token`"
                                        .to_string(),
                                ),
                                _ => {
                                    record.used_by = Some(id);
                                    None
                                }
                            },
                        })
                });
                if let Some(reason) = refusal {
                    return Ok(CommandResult::Refused { reason });
                }
                let epoch = self.cluster.epoch;
                self.cluster.removed.retain(|removed| *removed != id);
                self.cluster.members.entry(id).or_insert(MemberRecord {
                    name: address.name.clone(),
                    joined_epoch: epoch,
                    awaiting_learner: true,
                    ..MemberRecord::default()
                });
                let payload = joined_payload(&address, epoch);
                let seq = self.record(
                    "node.joined".into(),
                    format!("{id:016x}"),
                    format!("{id:016x}"),
                    timestamp_ms,
                    payload,
                )?;
                CommandResult::Joined { seq, epoch }
            }
            Command::NodeHealthChanged {
                id,
                health,
                generation,
                reason,
                timestamp_ms,
            } => {
                let Some(member) = self.cluster.members.get_mut(&id) else {
                    return Ok(CommandResult::Refused {
                        reason: format!("node {} is not a member of this cluster", super::hex_id(id)),
                    });
                };
                if member.health == health {
                    return Ok(CommandResult::Nothing);
                }
                member.health = health;
                member.generation = generation;
                let payload = serde_json::json!({
                    "generation": generation,
                    "reason": reason,
                });
                let seq = self.record(
                    health.event_kind().into(),
                    super::hex_id(id),
                    super::hex_id(id),
                    timestamp_ms,
                    payload,
                )?;
                CommandResult::Event { seq }
            }
        })
    }
}

/// How long a used or expired token is remembered, so that a replay is
/// refused as such rather than as unknown.
const TOKEN_MEMORY_MS: u64 = 24 * 3600 * 1000;

/// Drops tokens that expired long before `now_ms` (a time carried by the
/// entry being applied, so every node drops the same ones).
fn forget_old_tokens(cluster: &mut ClusterState, now_ms: u64) {
    cluster
        .tokens
        .retain(|_, token| token.expires_ms.saturating_add(TOKEN_MEMORY_MS) > now_ms);
}

/// Drops all Raft state and the events it produced: the node then knows
/// nothing of any cluster and catches up from the leader's snapshot.
pub fn reset(store: &Store) -> anyhow::Result<()> {
    let txn = store.raft_log_database()?.begin_write()?;
    txn.delete_table(RAFT_LOG)?;
    txn.delete_table(RAFT_META)?;
    txn.commit()?;
    let txn = store.database()?.begin_write()?;
    txn.delete_table(MACHINE)?;
    txn.delete_table(LATEST)?;
    txn.delete_table(SUPERSEDED)?;
    txn.open_table(EVENTS)?.retain(|_, _| false)?;
    txn.commit()?;
    Ok(())
}

/// The cluster facts as last applied on this node.
pub fn read_cluster(db: &Database) -> anyhow::Result<ClusterState> {
    let read = db.begin_read()?;
    let table = match read.open_table(MACHINE) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(ClusterState::default()),
        Err(error) => return Err(error.into()),
    };
    Ok(get_json(&table, "cluster")
        .map_err(|error| anyhow::anyhow!("{error}"))?
        .unwrap_or_default())
}

/// A snapshot: the cluster facts and the latest event of every kind+key.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    cluster: ClusterState,
    events: Vec<StoredEvent>,
    /// How long ago, by the sender's clock, it learned each join token: the
    /// receiver counts on from there by its own (see `TokenRecord`).
    #[serde(default)]
    token_ages_ms: BTreeMap<String, u64>,
}

impl SnapshotData {
    /// `cluster` with each token's learning time turned into an age, as
    /// the receiver of a snapshot needs it.
    fn new(mut cluster: ClusterState, events: Vec<StoredEvent>) -> SnapshotData {
        let now = super::now_ms();
        let token_ages_ms = cluster
            .tokens
            .iter_mut()
            .map(|(id, token)| (id.clone(), now.saturating_sub(std::mem::take(&mut token.learned_ms))))
            .collect();
        SnapshotData {
            cluster,
            events,
            token_ages_ms,
        }
    }

    /// The cluster facts with each token's learning time on this node's
    /// clock (now, for a token the sender gave no age for).
    fn cluster_here(&self) -> ClusterState {
        let now = super::now_ms();
        let mut cluster = self.cluster.clone();
        for (id, token) in &mut cluster.tokens {
            token.learned_ms = now.saturating_sub(self.token_ages_ms.get(id).copied().unwrap_or(0));
        }
        cluster
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeAddress>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    applied: Arc<watch::Sender<u64>>,
    /// When an apply last committed durably.
    last_durable: Arc<std::sync::Mutex<std::time::Instant>>,
    /// The cluster facts as last committed to the store, kept in memory:
    /// the leader's health decisions and the API read them several times
    /// a second, and only an apply or a snapshot changes them.
    cluster: Arc<std::sync::RwLock<ClusterState>>,
}

/// The payload of `node.joined`: what a reader needs to reach the node.
fn joined_payload(address: &NodeAddress, epoch: u64) -> serde_json::Value {
    serde_json::json!({
        "name": address.name,
        "transport": address.transport,
        "api": address.api,
        "epoch": epoch,
    })
}

fn latest_key(kind: &str, key: &str) -> String {
    format!("{kind}\0{key}")
}

impl StateMachine {
    /// The cluster facts as last applied, shared with the log's readers.
    pub fn cluster(&self) -> Arc<std::sync::RwLock<ClusterState>> {
        self.cluster.clone()
    }

    /// Tells watchers (role delivery, event streams) about events up to `seq`.
    fn notify_applied(&self, seq: u64) {
        self.applied.send_if_modified(|last| {
            let newer = seq > *last;
            if newer {
                *last = seq;
            }
            newer
        });
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeAddress>)> {
        blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            let table = read.open_table(MACHINE).map_err(read_error)?;
            let applied = get_json(&table, "applied")?;
            let membership = get_json(&table, "membership")?.unwrap_or_default();
            Ok((applied, membership))
        })
        .await
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // Inline, not on the blocking pool: a non-durable commit is quick,
        // and this is on the path of every write's answer.
        let flush = self.last_durable.lock().unwrap().elapsed() >= STATE_MACHINE_FLUSH;
        let db = &self.db;
        let (results, last_seq, cluster) = {
            let mut txn = db.begin_write().map_err(write_error)?;
            if !flush {
                txn.set_durability(Durability::None).map_err(write_error)?;
            }
            let mut results = Vec::with_capacity(entries.len());
            let mut last = None;
            let last_seq;
            let mut cluster: ClusterState;
            {
                let mut machine = txn.open_table(MACHINE).map_err(write_error)?;
                let mut events = txn.open_table(EVENTS).map_err(write_error)?;
                let mut latest = txn.open_table(LATEST).map_err(write_error)?;
                let mut superseded = txn.open_table(SUPERSEDED).map_err(write_error)?;
                cluster = get_json(&machine, "cluster")?.unwrap_or_default();
                let mut applier = Applier {
                    cluster: &mut cluster,
                    events: &mut events,
                    latest: &mut latest,
                    superseded: &mut superseded,
                    next_seq: 0,
                    last_timestamp_ms: 0,
                };
                applier.next_seq = applier.last_seq()? + 1;
                applier.last_timestamp_ms = applier.newest_timestamp_ms()?;
                for entry in entries {
                    last = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Blank => results.push(CommandResult::Nothing),
                        EntryPayload::Normal(command) => results.push(applier.apply(command)?),
                        EntryPayload::Membership(membership) => {
                            applier.apply_membership(&membership)?;
                            let stored = StoredMembership::new(Some(entry.log_id), membership);
                            machine
                                .insert("membership", to_json(&stored)?.as_slice())
                                .map_err(write_error)?;
                            results.push(CommandResult::Nothing);
                        }
                    }
                }
                last_seq = applier.next_seq - 1;
                machine
                    .insert("cluster", to_json(&cluster)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("applied", to_json(&last)?.as_slice())
                    .map_err(write_error)?;
            }
            txn.commit().map_err(write_error)?;
            if flush {
                *self.last_durable.lock().unwrap() = std::time::Instant::now();
            }
            (results, last_seq, cluster)
        };
        *self.cluster.write().unwrap() = cluster;
        self.notify_applied(last_seq);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddress>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let meta = meta.clone();
        let bytes = snapshot.into_inner();
        let (last_seq, cluster) = blocking(&self.db, move |db| {
            let data: SnapshotData = serde_json::from_slice(&bytes)
                .map_err(|error| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, error))?;
            let cluster = data.cluster_here();
            let txn = db.begin_write().map_err(write_error)?;
            {
                let mut events = txn.open_table(EVENTS).map_err(write_error)?;
                events.retain(|_, _| false).map_err(write_error)?;
                let mut latest = txn.open_table(LATEST).map_err(write_error)?;
                latest.retain(|_, _| false).map_err(write_error)?;
                txn.open_table(SUPERSEDED)
                    .map_err(write_error)?
                    .retain(|_, _| false)
                    .map_err(write_error)?;
                for event in &data.events {
                    events
                        .insert(event.seq, to_json(event)?.as_slice())
                        .map_err(write_error)?;
                    latest
                        .insert(latest_key(&event.kind, &event.key).as_str(), event.seq)
                        .map_err(write_error)?;
                }
                let mut machine = txn.open_table(MACHINE).map_err(write_error)?;
                machine
                    .insert("cluster", to_json(&cluster)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("applied", to_json(&meta.last_log_id)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("membership", to_json(&meta.last_membership)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("snapshot_taken", to_json(&meta.last_log_id)?.as_slice())
                    .map_err(write_error)?;
            }
            txn.commit().map_err(write_error)?;
            Ok((data.events.iter().map(|event| event.seq).max().unwrap_or(0), cluster))
        })
        .await?;
        *self.cluster.write().unwrap() = cluster;
        self.notify_applied(last_seq);
        Ok(())
    }

    /// The state machine as it is now, once a snapshot was ever taken (or
    /// installed): a snapshot is "everything applied so far", so it is read
    /// when asked for rather than kept as a second copy. One read
    /// transaction makes the facts, the events and `applied` agree.
    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            let machine = read.open_table(MACHINE).map_err(read_error)?;
            if get_json::<Option<LogId<NodeId>>>(&machine, "snapshot_taken")?.is_none() {
                return Ok(None);
            }
            let applied: Option<LogId<NodeId>> = get_json(&machine, "applied")?.flatten();
            let last_membership: StoredMembership<NodeId, NodeAddress> =
                get_json(&machine, "membership")?.unwrap_or_default();
            let cluster: ClusterState = get_json(&machine, "cluster")?.unwrap_or_default();
            let mut events = Vec::new();
            for item in read
                .open_table(EVENTS)
                .map_err(read_error)?
                .iter()
                .map_err(read_error)?
            {
                let (_, value) = item.map_err(read_error)?;
                events.push(serde_json::from_slice::<StoredEvent>(value.value()).map_err(read_error)?);
            }
            let snapshot_id = snapshot_id(applied);
            let data = to_json(&SnapshotData::new(cluster, events))?;
            Ok(Some(Snapshot {
                meta: SnapshotMeta {
                    last_log_id: applied,
                    last_membership,
                    snapshot_id,
                },
                snapshot: Box::new(Cursor::new(data)),
            }))
        })
        .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Commits the state machine durably (openraft may purge the log up to
    /// `applied` once this returns), then compacts the event stream to the
    /// latest event per kind+key. The snapshot's bytes are not built here —
    /// openraft keeps only the meta of a snapshot it asked for, and reads
    /// the bytes through `get_current_snapshot` when a follower needs them.
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let meta = blocking(&self.db, |db| {
            let txn = db.begin_write().map_err(write_error)?;
            let meta = {
                let mut machine = txn.open_table(MACHINE).map_err(write_error)?;
                let applied: Option<LogId<NodeId>> = get_json(&machine, "applied")?.flatten();
                let last_membership: StoredMembership<NodeId, NodeAddress> =
                    get_json(&machine, "membership")?.unwrap_or_default();
                machine
                    .insert("snapshot_taken", to_json(&applied)?.as_slice())
                    .map_err(write_error)?;
                let snapshot_id = snapshot_id(applied);
                SnapshotMeta {
                    last_log_id: applied,
                    last_membership,
                    snapshot_id,
                }
            };
            // Durable (with every apply before it) before the log behind it
            // may be purged.
            txn.commit()
                .map_err(|error| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, error))?;
            while compact_chunk(db)? {}
            Ok(meta)
        })
        .await?;
        *self.last_durable.lock().unwrap() = std::time::Instant::now();
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

/// A snapshot is named by the last entry it applied. Compaction may change
/// its bytes under the same name; that is safe because a leader sends a
/// snapshot whole, from its first byte, each time.
fn snapshot_id(applied: Option<LogId<NodeId>>) -> String {
    match applied {
        Some(log_id) => format!("{}-{}", log_id.leader_id, log_id.index),
        None => "empty".to_string(),
    }
}

/// Superseded events removed per transaction: compaction holds the state
/// machine's write lock only briefly at a time, so applying never waits long.
const COMPACTION_CHUNK: usize = 256;

/// Removes the next chunk of superseded events; true while some are left.
/// Not forced to disk on its own: an event removed again after a crash is
/// no harm.
fn compact_chunk(db: &Database) -> StorageResult<bool> {
    let mut txn = db.begin_write().map_err(write_error)?;
    txn.set_durability(Durability::None).map_err(write_error)?;
    let more = {
        let mut superseded = txn.open_table(SUPERSEDED).map_err(write_error)?;
        let mut events = txn.open_table(EVENTS).map_err(write_error)?;
        let chunk: Vec<u64> = superseded
            .iter()
            .map_err(read_error)?
            .take(COMPACTION_CHUNK)
            .map(|item| item.map(|(seq, _)| seq.value()))
            .collect::<Result<_, _>>()
            .map_err(read_error)?;
        for seq in &chunk {
            events.remove(seq).map_err(write_error)?;
            superseded.remove(seq).map_err(write_error)?;
        }
        chunk.len() == COMPACTION_CHUNK
    };
    txn.commit().map_err(write_error)?;
    Ok(more)
}

/// The network of a cluster that has only this node: nothing to reach.
pub struct NoNetwork;

pub struct Unreachable;

impl openraft::network::RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = Unreachable;

    async fn new_client(&mut self, _target: NodeId, _node: &NodeAddress) -> Self::Network {
        Unreachable
    }
}

fn unreachable<E: std::error::Error>() -> openraft::error::RPCError<NodeId, NodeAddress, E> {
    openraft::error::RPCError::Unreachable(openraft::error::Unreachable::new(&std::io::Error::other(
        "this node has no transport to other nodes",
    )))
}

impl openraft::network::RaftNetwork<TypeConfig> for Unreachable {
    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<NodeId>,
        openraft::error::RPCError<NodeId, NodeAddress, openraft::error::RaftError<NodeId>>,
    > {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: openraft::raft::InstallSnapshotRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::InstallSnapshotResponse<NodeId>,
        openraft::error::RPCError<
            NodeId,
            NodeAddress,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<NodeId>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::VoteResponse<NodeId>,
        openraft::error::RPCError<NodeId, NodeAddress, openraft::error::RaftError<NodeId>>,
    > {
        Err(unreachable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn blank_entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 7), index),
            payload: EntryPayload::Blank,
        }
    }

    /// A store from before the log had a file of its own keeps its log and
    /// vote: they move to `raft.redb` and leave `hivemind.redb`.
    #[tokio::test]
    async fn a_log_kept_in_the_state_database_moves_to_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hivemind.redb")).unwrap();
        let vote = Vote::new_committed(3, 7);
        {
            let txn = store.database().unwrap().begin_write().unwrap();
            {
                let mut log = txn.open_table(RAFT_LOG).unwrap();
                for index in 1..=3 {
                    log.insert(index, to_json(&blank_entry(index)).unwrap().as_slice())
                        .unwrap();
                }
                let mut meta = txn.open_table(RAFT_META).unwrap();
                meta.insert("vote", to_json(&vote).unwrap().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }

        let (mut log, _, _) = open(&store, None).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(blank_entry(3).log_id)
        );
        let entries = log.try_get_log_entries(1..4).await.unwrap();
        assert_eq!(
            entries.iter().map(|entry| entry.log_id.index).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let read = store.database().unwrap().begin_read().unwrap();
        assert!(matches!(
            read.open_table(RAFT_LOG),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }

    /// The in-memory tail drops its oldest durable entries past its byte
    /// bound (never one only it holds), and starts over when an append does
    /// not follow on (after a snapshot).
    #[test]
    fn the_log_tail_is_bounded_and_one_run() {
        let mut tail = LogTail::default();
        tail.push(
            (1..=20)
                .map(|index| (blank_entry(index), LOG_TAIL_BYTES / 10))
                .collect(),
        );
        // Nothing is on disk yet: nothing may go.
        assert_eq!(tail.first_index(), Some(1));
        tail.mark_durable(20);
        assert_eq!(tail.first_index(), Some(11));
        assert_eq!(tail.last_log_id(), Some(blank_entry(20).log_id));
        assert!(tail.bytes <= LOG_TAIL_BYTES);
        tail.push(vec![(blank_entry(30), 1)]);
        assert_eq!(tail.first_index(), Some(30));
        assert_eq!(tail.bytes, 1);
    }

    struct TempStore;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for TempStore {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().map_err(write_error)?;
            let store = Store::open(&dir.path().join("hivemind.redb")).map_err(write_error)?;
            let (log, machine, _) = open(&store, None).map_err(write_error)?;
            Ok((dir, log, machine))
        }
    }

    /// openraft's own conformance suite for log and state machine storage.
    #[test]
    fn the_storage_passes_openrafts_suite() {
        openraft::testing::Suite::test_all(TempStore).unwrap();
    }

    /// A node the membership drops is recorded `node.removed` once; a node
    /// admitted by `node.joined` whose learner is not added yet survives a
    /// membership change that raced it; a join under a member's name (in
    /// another case) is refused, and the token it carried stays unused.
    #[tokio::test]
    async fn removals_and_names_follow_the_membership() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hivemind.redb")).unwrap();
        let (_, mut machine, _) = open(&store, None).unwrap();
        let address = |name: &str| NodeAddress {
            name: name.into(),
            transport: "127.0.0.1:1".into(),
            api: "127.0.0.1:2".into(),
        };
        let membership = |nodes: &[(NodeId, &str)]| {
            let nodes: BTreeMap<NodeId, NodeAddress> = nodes.iter().map(|(id, name)| (*id, address(name))).collect();
            EntryPayload::Membership(openraft::Membership::new(vec![BTreeSet::from([1])], nodes))
        };
        let joined = |id: NodeId, name: &str, token: Option<&str>| {
            EntryPayload::Normal(Command::NodeJoined {
                id,
                address: address(name),
                token: token.map(str::to_string),
                timestamp_ms: 1000,
            })
        };
        let token = EntryPayload::Normal(Command::TokenIssued {
            id: "t".into(),
            secret: "s".into(),
            expires_ms: u64::MAX,
            ttl_ms: 0,
        });
        let payloads = vec![
            membership(&[(1, "n1")]),
            token,
            joined(2, "n2", None),
            membership(&[(1, "n1")]),
            membership(&[(1, "n1"), (2, "n2")]),
            joined(3, "N2", Some("t")),
            membership(&[(1, "n1")]),
        ];
        let entries: Vec<Entry<TypeConfig>> = payloads
            .into_iter()
            .enumerate()
            .map(|(index, payload)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index as u64 + 1),
                payload,
            })
            .collect();
        let results = machine.apply(entries).await.unwrap();
        assert!(matches!(&results[5], CommandResult::Refused { reason } if reason.contains("belongs to member")));

        let cluster = read_cluster(&store.database().unwrap()).unwrap();
        assert!(!cluster.members.contains_key(&2), "n2 was removed");
        assert_eq!(cluster.removed, [2]);
        assert_eq!(cluster.tokens["t"].used_by, None, "the refused join spent no token");
        let read = store.database().unwrap().begin_read().unwrap();
        let kinds: Vec<String> = read
            .open_table(EVENTS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|row| {
                serde_json::from_slice::<StoredEvent>(row.unwrap().1.value())
                    .unwrap()
                    .kind
            })
            .collect();
        assert_eq!(
            kinds,
            ["node.joined", "node.removed"],
            "one join, one removal, none for the race"
        );
    }

    /// An event proposed by a node whose clock is behind is recorded at the
    /// newest event's time, so the log's times never go back; a later time
    /// is kept as given.
    #[tokio::test]
    async fn event_times_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hivemind.redb")).unwrap();
        let (_, mut machine, _) = open(&store, None).unwrap();
        let event = |key: &str, timestamp_ms: u64| Command::Event {
            kind: "test.clock".into(),
            key: key.into(),
            source: "test".into(),
            timestamp_ms,
            payload: serde_json::Value::Null,
        };
        let entries: Vec<Entry<TypeConfig>> = [event("fast", 600_000), event("slow", 1_000), event("later", 700_000)]
            .into_iter()
            .enumerate()
            .map(|(index, command)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index as u64 + 1),
                payload: EntryPayload::Normal(command),
            })
            .collect();
        machine.apply(entries).await.unwrap();
        let read = store.database().unwrap().begin_read().unwrap();
        let times: Vec<(String, u64)> = read
            .open_table(EVENTS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|row| {
                let event = serde_json::from_slice::<StoredEvent>(row.unwrap().1.value()).unwrap();
                (event.key, event.timestamp_ms)
            })
            .collect();
        assert_eq!(
            times,
            [
                ("fast".into(), 600_000),
                ("slow".into(), 600_000),
                ("later".into(), 700_000)
            ]
        );
    }

    /// A token in a snapshot travels as its age, not as a reading of the
    /// sender's clock, and arrives as old as it was, by the receiver's clock.
    #[test]
    fn a_snapshot_carries_token_ages_not_clock_readings() {
        let now = crate::quorum::now_ms();
        let mut cluster = ClusterState::default();
        cluster.tokens.insert(
            "t".into(),
            TokenRecord {
                secret: "s".into(),
                expires_ms: 0,
                ttl_ms: 60_000,
                learned_ms: now - 30_000,
                used_by: None,
            },
        );
        let sent = SnapshotData::new(cluster, Vec::new());
        assert_eq!(sent.cluster.tokens["t"].learned_ms, 0, "no clock reading is sent");
        assert!(
            sent.token_ages_ms["t"].abs_diff(30_000) < 1_000,
            "{:?}",
            sent.token_ages_ms
        );
        let bytes = serde_json::to_vec(&sent).unwrap();
        let received = serde_json::from_slice::<SnapshotData>(&bytes).unwrap().cluster_here();
        let token = &received.tokens["t"];
        assert!(
            token.learned_ms.abs_diff(now - 30_000) < 1_000,
            "learned {}",
            token.learned_ms
        );
        assert!(!token.expired(now), "30 s into a 60 s TTL");
        assert!(token.expired(now + 31_000), "past its TTL");
    }

    #[tokio::test]
    async fn purged_entries_go_and_later_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hivemind.redb")).unwrap();
        {
            let txn = store.raft_log_database().unwrap().begin_write().unwrap();
            {
                let mut log = txn.open_table(RAFT_LOG).unwrap();
                for index in 1..=1000 {
                    log.insert(index, to_json(&blank_entry(index)).unwrap().as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let (mut log, _, _) = open(&store, None).unwrap();
        log.purge(blank_entry(900).log_id).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(blank_entry(900).log_id));
        assert_eq!(state.last_log_id, Some(blank_entry(1000).log_id));
        let kept = log.try_get_log_entries(901..1001).await.unwrap();
        assert_eq!(kept.len(), 100);
        // The writer deletes the purged entries in chunks, in the background.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let read = store.raft_log_database().unwrap().begin_read().unwrap();
            let first = read
                .open_table(RAFT_LOG)
                .unwrap()
                .first()
                .unwrap()
                .map(|(index, _)| index.value());
            if first == Some(901) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "purged entries left from {first:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
