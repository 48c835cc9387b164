//! Raft's durable state on redb: the log and vote ([`LogStore`]) and the
//! state machine ([`StateMachine`]).
//!
//! Every log append and vote is a durable redb commit before openraft hears
//! it is done; losing either would allow two leaders in one term or lose
//! acknowledged entries. Appends are readable before they are durable, so
//! the leader's disk write and replication overlap (see [`LogStore`]). State machine writes are not forced to disk on their
//! own: the next log append (always durable) carries them, and after a crash
//! the state machine resumes from its last durable `applied` and replays the
//! log, which is kept at least back to the last snapshot. Snapshots are
//! written durably before the log behind them may be purged.
//!
//! The state machine's events live in the store's `events` table keyed by
//! their seq: consecutive numbers given at apply (one log entry may carry a
//! batch of events).

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
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClusterState, Command, CommandResult, MemberRecord, NodeAddress, NodeId, TokenRecord, TypeConfig};
use crate::log::StoredEvent;
use crate::store::{EVENTS, Store};

/// Raft log entries by index, JSON-encoded.
const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// `vote`, `last_purged`.
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// `applied`, `membership`, `cluster`, `snapshot`.
const MACHINE: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");
/// Latest event seq per `KIND\0KEY`, for compaction.
const LATEST: TableDefinition<&str, u64> = TableDefinition::new("latest_events");

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

/// Opens the Raft tables in `store` and returns the log, the state machine
/// and a watch of the last event's seq.
pub fn open(store: &Store) -> anyhow::Result<(LogStore, StateMachine, watch::Receiver<u64>)> {
    let db = store.database();
    let txn = db.begin_write()?;
    txn.open_table(RAFT_LOG)?;
    txn.open_table(RAFT_META)?;
    txn.open_table(MACHINE)?;
    txn.open_table(LATEST)?;
    txn.commit()?;
    let last_seq = {
        let read = db.begin_read()?;
        let table = read.open_table(EVENTS)?;
        table.last()?.map(|(seq, _)| seq.value()).unwrap_or(0)
    };
    let (sender, receiver) = watch::channel(last_seq);
    Ok((
        LogStore::new(db.clone()),
        StateMachine {
            db,
            applied: Arc::new(sender),
        },
        receiver,
    ))
}

/// The Raft log. Appended entries are readable at once (from `pending`),
/// so the leader replicates them while its own disk write is under way, as
/// Raft allows; openraft counts the leader's copy only when the callback
/// says it is durable. One writer thread makes every change durable in the
/// order it was made, folding appends that queue up into one transaction.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    pending: Arc<std::sync::RwLock<BTreeMap<u64, Entry<TypeConfig>>>>,
    writer: Arc<std::sync::Mutex<std::sync::mpsc::Sender<LogWrite>>>,
}

/// A change for the log writer thread, with what to do once it is durable.
enum LogWrite {
    Append {
        entries: Vec<(LogId<NodeId>, Vec<u8>)>,
        done: LogFlushed<TypeConfig>,
    },
    Truncate {
        from: u64,
        done: tokio::sync::oneshot::Sender<StorageResult<()>>,
    },
    Purge {
        upto: LogId<NodeId>,
        done: tokio::sync::oneshot::Sender<StorageResult<()>>,
    },
    Vote {
        bytes: Vec<u8>,
        done: tokio::sync::oneshot::Sender<StorageResult<()>>,
    },
}

impl LogStore {
    fn new(db: Arc<Database>) -> LogStore {
        let pending = Arc::new(std::sync::RwLock::new(BTreeMap::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let (thread_db, thread_pending) = (db.clone(), pending.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_log(thread_db, thread_pending, receiver))
            .expect("start the log writer thread");
        LogStore {
            db,
            pending,
            writer: Arc::new(std::sync::Mutex::new(sender)),
        }
    }

    fn send(&self, write: LogWrite) -> StorageResult<()> {
        self.writer
            .lock()
            .unwrap()
            .send(write)
            .map_err(|_| write_error("the log writer stopped"))
    }

    /// Sends a change and waits until it is durable.
    async fn write(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<StorageResult<()>>) -> LogWrite,
    ) -> StorageResult<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(make(done))?;
        wait.await.map_err(|_| write_error("the log writer stopped"))?
    }
}

/// The log writer thread: applies changes in order until every `LogStore`
/// is gone; consecutive appends share one durable commit.
fn write_log(
    db: Arc<Database>,
    pending: Arc<std::sync::RwLock<BTreeMap<u64, Entry<TypeConfig>>>>,
    receiver: std::sync::mpsc::Receiver<LogWrite>,
) {
    let mut next = None;
    loop {
        let write = match next.take() {
            Some(write) => write,
            None => match receiver.recv() {
                Ok(write) => write,
                Err(_) => return,
            },
        };
        match write {
            LogWrite::Append { entries, done } => {
                let mut batch = vec![(entries, done)];
                // Fold the appends already queued behind this one.
                while let Ok(write) = receiver.try_recv() {
                    match write {
                        LogWrite::Append { entries, done } => batch.push((entries, done)),
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let result = (|| {
                    let txn = db.begin_write().map_err(write_error)?;
                    {
                        let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                        for (entries, _) in &batch {
                            for (log_id, bytes) in entries {
                                table.insert(log_id.index, bytes.as_slice()).map_err(write_error)?;
                            }
                        }
                    }
                    // Durable when commit returns: only then may openraft count it.
                    txn.commit()
                        .map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Write, error))
                })();
                {
                    // Durable (or failed): readers find them on disk now. An
                    // index truncated and appended again meanwhile stays.
                    let mut pending = pending.write().unwrap();
                    for (entries, _) in &batch {
                        for (log_id, _) in entries {
                            if pending.get(&log_id.index).is_some_and(|entry| &entry.log_id == log_id) {
                                pending.remove(&log_id.index);
                            }
                        }
                    }
                }
                for (_, done) in batch {
                    done.log_io_completed(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|error| std::io::Error::other(error.to_string())),
                    );
                }
            }
            LogWrite::Truncate { from, done } => {
                let result = (|| {
                    let txn = db.begin_write().map_err(write_error)?;
                    txn.open_table(RAFT_LOG)
                        .map_err(write_error)?
                        .retain_in(from.., |_, _| false)
                        .map_err(write_error)?;
                    txn.commit().map_err(write_error)
                })();
                let _ = done.send(result);
            }
            LogWrite::Purge { upto, done } => {
                let result = (|| {
                    let bytes = to_json(&Some(upto))?;
                    let txn = db.begin_write().map_err(write_error)?;
                    {
                        txn.open_table(RAFT_META)
                            .map_err(write_error)?
                            .insert("last_purged", bytes.as_slice())
                            .map_err(write_error)?;
                        txn.open_table(RAFT_LOG)
                            .map_err(write_error)?
                            .retain_in(..=upto.index, |_, _| false)
                            .map_err(write_error)?;
                    }
                    txn.commit().map_err(write_error)
                })();
                let _ = done.send(result);
            }
            LogWrite::Vote { bytes, done } => {
                let result = (|| {
                    let txn = db.begin_write().map_err(write_error)?;
                    txn.open_table(RAFT_META)
                        .map_err(write_error)?
                        .insert("vote", bytes.as_slice())
                        .map_err(write_error)?;
                    txn.commit()
                        .map_err(|error| io_error(ErrorSubject::Vote, ErrorVerb::Write, error))
                })();
                let _ = done.send(result);
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        // Entries not yet durable first: once durable they leave `pending`
        // only after they are on disk, so none falls between the two reads.
        let pending: BTreeMap<u64, Entry<TypeConfig>> = self
            .pending
            .read()
            .unwrap()
            .range(range)
            .map(|(index, entry)| (*index, entry.clone()))
            .collect();
        // The leader replicating what it just appended: all of it is here.
        let wanted = match range {
            (Bound::Included(start), Bound::Excluded(end)) => end.checked_sub(start),
            (Bound::Included(start), Bound::Included(end)) => (end + 1).checked_sub(start),
            _ => None,
        };
        if wanted.is_some_and(|wanted| wanted > 0 && wanted == pending.len() as u64) {
            return Ok(pending.into_values().collect());
        }
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
        let last_pending = self
            .pending
            .read()
            .unwrap()
            .last_key_value()
            .map(|(_, entry)| entry.log_id);
        let mut state = blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            let meta = read.open_table(RAFT_META).map_err(read_error)?;
            let last_purged: Option<LogId<NodeId>> = get_json(&meta, "last_purged")?;
            let log = read.open_table(RAFT_LOG).map_err(read_error)?;
            let last = match log.last().map_err(read_error)? {
                Some((_, value)) => Some(
                    serde_json::from_slice::<Entry<TypeConfig>>(value.value())
                        .map_err(read_error)?
                        .log_id,
                ),
                None => last_purged,
            };
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
        self.write(|done| LogWrite::Vote { bytes, done }).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            get_json(&read.open_table(RAFT_META).map_err(read_error)?, "vote")
        })
        .await
    }

    // `save_committed` and `read_committed` keep openraft's defaults (not
    // stored): a restarted node re-learns the committed index from the
    // leader, and re-applies from its last durable `applied`. Storing it
    // would cost a write transaction per commit on the hot path.

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
        {
            let mut pending = self.pending.write().unwrap();
            for entry in entries {
                pending.insert(entry.log_id.index, entry);
            }
        }
        self.send(LogWrite::Append {
            entries: encoded,
            done: callback,
        })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.pending.write().unwrap().retain(|index, _| *index < log_id.index);
        self.write(|done| LogWrite::Truncate {
            from: log_id.index,
            done,
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.write(|done| LogWrite::Purge { upto: log_id, done }).await
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
    next_seq: u64,
}

impl Applier<'_, '_> {
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
        self.latest
            .insert(latest_key(&event.kind, &event.key).as_str(), seq)
            .map_err(write_error)?;
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
            Command::Formed { cluster_id, secret } => {
                // Only the first one counts: a cluster's identity never changes.
                if self.cluster.cluster_id.is_empty() {
                    self.cluster.cluster_id = cluster_id;
                    self.cluster.secret = secret;
                }
                CommandResult::Nothing
            }
            Command::TokenIssued { id, secret, expires_ms } => {
                forget_old_tokens(self.cluster, expires_ms);
                self.cluster.tokens.insert(
                    id,
                    TokenRecord {
                        secret,
                        expires_ms,
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
                let refusal = token
                    .as_ref()
                    .and_then(|token| match self.cluster.tokens.get_mut(token) {
                        None => Some("the join token is unknown to this cluster".to_string()),
                        Some(record) => match record.used_by {
                            Some(user) if user != id => Some(format!(
                                "the join token was already used (by node {user:016x}); ask for a new one with \
                             `hivemind members token`"
                            )),
                            _ if timestamp_ms > record.expires_ms => Some(
                                "the join token has expired; ask for a new one with `hivemind members token`"
                                    .to_string(),
                            ),
                            _ => {
                                record.used_by = Some(id);
                                None
                            }
                        },
                    });
                if let Some(reason) = refusal {
                    return Ok(CommandResult::Refused { reason });
                }
                let epoch = self.cluster.epoch;
                self.cluster
                    .members
                    .entry(id)
                    .or_insert(MemberRecord { joined_epoch: epoch });
                let payload = serde_json::json!({
                    "name": address.name,
                    "transport": address.transport,
                    "api": address.api,
                    "epoch": epoch,
                });
                let seq = self.record(
                    "node.joined".into(),
                    format!("{id:016x}"),
                    format!("{id:016x}"),
                    timestamp_ms,
                    payload,
                )?;
                CommandResult::Joined { seq, epoch }
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
pub fn reset(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    txn.delete_table(RAFT_LOG)?;
    txn.delete_table(RAFT_META)?;
    txn.delete_table(MACHINE)?;
    txn.delete_table(LATEST)?;
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
}

fn latest_key(kind: &str, key: &str) -> String {
    format!("{kind}\0{key}")
}

impl StateMachine {
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
        let (results, last_seq) = blocking(&self.db, move |db| {
            let mut txn = db.begin_write().map_err(write_error)?;
            txn.set_durability(Durability::None).map_err(write_error)?;
            let mut results = Vec::with_capacity(entries.len());
            let mut last = None;
            let last_seq;
            {
                let mut machine = txn.open_table(MACHINE).map_err(write_error)?;
                let mut events = txn.open_table(EVENTS).map_err(write_error)?;
                let mut latest = txn.open_table(LATEST).map_err(write_error)?;
                let mut cluster: ClusterState = get_json(&machine, "cluster")?.unwrap_or_default();
                let mut applier = Applier {
                    cluster: &mut cluster,
                    events: &mut events,
                    latest: &mut latest,
                    next_seq: 0,
                };
                applier.next_seq = applier.last_seq()? + 1;
                for entry in entries {
                    last = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Blank => results.push(CommandResult::Nothing),
                        EntryPayload::Normal(command) => results.push(applier.apply(command)?),
                        EntryPayload::Membership(membership) => {
                            let cluster = &mut *applier.cluster;
                            let voters: Vec<NodeId> = membership.voter_ids().collect();
                            if voters != cluster.voters {
                                cluster.epoch += 1;
                                cluster.voters = voters;
                            }
                            let listed: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
                            cluster.members.retain(|id, _| listed.contains(id));
                            for id in listed {
                                cluster.members.entry(id).or_insert(MemberRecord {
                                    joined_epoch: cluster.epoch,
                                });
                            }
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
            Ok((results, last_seq))
        })
        .await?;
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
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let last_seq = blocking(&self.db, move |db| {
            let data: SnapshotData = serde_json::from_slice(&stored.data)
                .map_err(|error| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, error))?;
            let txn = db.begin_write().map_err(write_error)?;
            {
                let mut events = txn.open_table(EVENTS).map_err(write_error)?;
                events.retain(|_, _| false).map_err(write_error)?;
                let mut latest = txn.open_table(LATEST).map_err(write_error)?;
                latest.retain(|_, _| false).map_err(write_error)?;
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
                    .insert("cluster", to_json(&data.cluster)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("applied", to_json(&stored.meta.last_log_id)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("membership", to_json(&stored.meta.last_membership)?.as_slice())
                    .map_err(write_error)?;
                machine
                    .insert("snapshot", to_json(&stored)?.as_slice())
                    .map_err(write_error)?;
            }
            txn.commit().map_err(write_error)?;
            Ok(data.events.iter().map(|event| event.seq).max().unwrap_or(0))
        })
        .await?;
        self.notify_applied(last_seq);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        blocking(&self.db, |db| {
            let read = db.begin_read().map_err(read_error)?;
            let stored: Option<StoredSnapshot> = get_json(&read.open_table(MACHINE).map_err(read_error)?, "snapshot")?;
            Ok(stored.map(|stored| Snapshot {
                meta: stored.meta,
                snapshot: Box::new(Cursor::new(stored.data)),
            }))
        })
        .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Compacts the event stream to the latest event per kind+key, then
    /// stores that, with the cluster facts, as the current snapshot.
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        blocking(&self.db, |db| {
            let txn = db.begin_write().map_err(write_error)?;
            let stored = {
                let mut machine = txn.open_table(MACHINE).map_err(write_error)?;
                let applied: Option<LogId<NodeId>> = get_json(&machine, "applied")?;
                let membership: StoredMembership<NodeId, NodeAddress> =
                    get_json(&machine, "membership")?.unwrap_or_default();
                let cluster: ClusterState = get_json(&machine, "cluster")?.unwrap_or_default();
                let latest = txn.open_table(LATEST).map_err(write_error)?;
                let mut keep = std::collections::BTreeSet::new();
                for item in latest.iter().map_err(read_error)? {
                    keep.insert(item.map_err(read_error)?.1.value());
                }
                let mut events_table = txn.open_table(EVENTS).map_err(write_error)?;
                events_table.retain(|seq, _| keep.contains(&seq)).map_err(write_error)?;
                let mut events = Vec::with_capacity(keep.len());
                for item in events_table.iter().map_err(read_error)? {
                    let (_, value) = item.map_err(read_error)?;
                    events.push(serde_json::from_slice::<StoredEvent>(value.value()).map_err(read_error)?);
                }
                let data = to_json(&SnapshotData { cluster, events })?;
                let snapshot_id = match applied {
                    Some(log_id) => format!("{}-{}-{}", log_id.leader_id, log_id.index, rand::random::<u32>()),
                    None => format!("empty-{}", rand::random::<u32>()),
                };
                let meta = SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id,
                };
                let stored = StoredSnapshot { meta, data };
                machine
                    .insert("snapshot", to_json(&stored)?.as_slice())
                    .map_err(write_error)?;
                stored
            };
            // Durable before openraft may purge the log behind it.
            txn.commit()
                .map_err(|error| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, error))?;
            Ok(Snapshot {
                meta: stored.meta,
                snapshot: Box::new(Cursor::new(stored.data)),
            })
        })
        .await
    }
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
