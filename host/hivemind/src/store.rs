//! The node's durable store: two redb databases in the data directory.
//! `hivemind.redb` holds the event log, every role's key-value state, each
//! role's delivery cursor, operator settings (paused/disabled roles) and the
//! Raft state machine; `raft.redb` (next to it) holds the Raft log and vote.
//! The log has a file of its own because every append waits for the disk:
//! its commits then write only the log's pages, and never queue behind a
//! state machine or role state transaction.
//!
//! redb's API is blocking and a durable commit waits for the disk, so every
//! method here is synchronous and async callers go through
//! [`Store::blocking`]. It owns bytes on disk; what the event log means is in
//! `log.rs`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

/// Events by seq; the value is the JSON of [`crate::log::StoredEvent`].
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Role state; the key is `ROLE\0KEY`, so one role's keys are one range.
const ROLE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("role_state");
/// Seq of the last event each role's `on-event` accepted.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// Operator settings that survive restarts, e.g. `role.dns.mode = paused`.
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data store {path}: {source}")]
    Database {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("data store: the operation was cancelled because the host is shutting down")]
    Cancelled,
    #[error("data store {path} is being reopened after a failed write; try again in a moment")]
    Reopening { path: String },
    #[error("data store {path} cannot be reopened yet: a part of this node still holds it")]
    StillHeld { path: String },
    #[error("data store {path} is in use by another process (is another hivemind running with this data directory?)")]
    InUse { path: String },
    #[error(
        "data store {path} cannot be opened: {source}. The file may be truncated or corrupt; restore it from a \
         backup, or move it away to start this node empty (it then catches up from the cluster, or starts a new log)"
    )]
    Unreadable {
        path: String,
        #[source]
        source: redb::Error,
    },
}

/// The two database files. Each sits in a slot that is empty only while
/// it is being reopened: redb refuses every call after a failed write (a
/// full disk, an I/O error) until the file is closed and opened again.
struct Files {
    path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    raft_path: PathBuf,
    raft_log: RwLock<Option<Arc<Database>>>,
    /// The last failed write to `hivemind.redb` since it was opened: from
    /// then on the file takes nothing until it is reopened.
    failure: Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct Store {
    files: Arc<Files>,
}

/// Opens (or creates) one database file, with errors that name it.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    Database::create(path).map_err(|error| match error {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.display().to_string(),
        },
        other => StoreError::Unreadable {
            path: path.display().to_string(),
            source: other.into(),
        },
    })
}

/// The database in `slot`, or why there is none.
fn opened(slot: &RwLock<Option<Arc<Database>>>, path: &Path) -> Result<Arc<Database>, StoreError> {
    slot.read().unwrap().clone().ok_or_else(|| StoreError::Reopening {
        path: path.display().to_string(),
    })
}

/// Closes the database in `slot` and opens its file again. Refused while
/// anyone else still holds the database: redb allows one handle per file.
fn reopen_slot(slot: &RwLock<Option<Arc<Database>>>, path: &Path) -> Result<(), StoreError> {
    let mut slot = slot.write().unwrap();
    if let Some(db) = slot.take() {
        if Arc::strong_count(&db) > 1 {
            *slot = Some(db);
            return Err(StoreError::StillHeld {
                path: path.display().to_string(),
            });
        }
        drop(db);
    }
    *slot = Some(Arc::new(open_database(path)?));
    Ok(())
}

impl Store {
    /// Opens (or creates) the database at `path` and the Raft log's
    /// `raft.redb` beside it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let raft_path = path.with_file_name("raft.redb");
        let db = open_database(path)?;
        let raft_log = open_database(&raft_path)?;
        let store = Store {
            files: Arc::new(Files {
                path: path.to_path_buf(),
                db: RwLock::new(Some(Arc::new(db))),
                raft_path,
                raft_log: RwLock::new(Some(Arc::new(raft_log))),
                failure: Mutex::new(None),
            }),
        };
        store.write(Durability::Immediate, |txn| {
            txn.open_table(EVENTS)?;
            txn.open_table(ROLE_STATE)?;
            txn.open_table(CURSORS)?;
            txn.open_table(SETTINGS)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// The database, for subsystems that keep their own tables in it (the
    /// quorum log).
    pub(crate) fn database(&self) -> Result<Arc<Database>, StoreError> {
        opened(&self.files.db, &self.files.path)
    }

    /// The Raft log's own database (`raft.redb`).
    pub(crate) fn raft_log_database(&self) -> Result<Arc<Database>, StoreError> {
        opened(&self.files.raft_log, &self.files.raft_path)
    }

    /// The directory the database files are in.
    pub fn directory(&self) -> &Path {
        self.files.path.parent().unwrap_or(Path::new("."))
    }

    /// Why `hivemind.redb` takes no writes, when a write to it failed: it
    /// must then be reopened ([`Store::reopen`]).
    pub fn failure(&self) -> Option<String> {
        self.files.failure.lock().unwrap().clone()
    }

    /// Closes both database files and opens them again, once everyone else
    /// has let go of them (within `timeout`): after a failed write, redb
    /// takes nothing more until then. Calls made meanwhile fail with
    /// [`StoreError::Reopening`].
    pub async fn reopen(&self, timeout: std::time::Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let files = self.files.clone();
            let reopened = tokio::task::spawn_blocking(move || {
                reopen_slot(&files.raft_log, &files.raft_path)?;
                reopen_slot(&files.db, &files.path)?;
                *files.failure.lock().unwrap() = None;
                Ok(())
            })
            .await
            .map_err(|_| StoreError::Cancelled)?;
            match reopened {
                Err(StoreError::StillHeld { .. } | StoreError::InUse { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Waits until this handle is the last one to the databases, so that
    /// dropping it closes the files (a restart in the same process can then
    /// open it again). Tasks that finish shortly after a shutdown (openraft's
    /// state machine worker, say) may still hold one for a moment.
    pub async fn wait_last_handle(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let held = |slot: &RwLock<Option<Arc<Database>>>| slot.read().unwrap().as_ref().map_or(0, Arc::strong_count);
        while Arc::strong_count(&self.files) > 1 || held(&self.files.db) > 1 || held(&self.files.raft_log) > 1 {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Runs blocking store work on the blocking thread pool.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || work(&store)).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(StoreError::Cancelled),
        }
    }

    fn error(&self, source: impl Into<redb::Error>) -> StoreError {
        let source = source.into();
        if matches!(source, redb::Error::Io(_) | redb::Error::PreviousIo) {
            let mut failure = self.files.failure.lock().unwrap();
            if failure.is_none() {
                *failure = Some(source.to_string());
            }
        }
        StoreError::Database {
            path: self.files.path.display().to_string(),
            source,
        }
    }

    fn write<T>(
        &self,
        durability: Durability,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let mut txn = self.database()?.begin_write().map_err(|error| self.error(error))?;
        txn.set_durability(durability).map_err(|error| self.error(error))?;
        let value = work(&txn).map_err(|error| self.error(error))?;
        txn.commit().map_err(|error| self.error(error))?;
        Ok(value)
    }

    fn read<T>(&self, work: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, StoreError> {
        let txn = self.database()?.begin_read().map_err(|error| self.error(error))?;
        work(&txn).map_err(|error| self.error(error))
    }

    // --- events ---

    /// Appends an event durably under the next seq, built by `encode(seq)`.
    pub fn append_event(&self, encode: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, StoreError> {
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(EVENTS)?;
            let seq = table.last()?.map(|(seq, _)| seq.value()).unwrap_or(0) + 1;
            table.insert(seq, encode(seq).as_slice())?;
            Ok(seq)
        })
    }

    /// The highest seq, 0 for an empty log.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(EVENTS)?.last()?.map(|(seq, _)| seq.value()).unwrap_or(0)))
    }

    /// Up to `limit` encoded events with seq greater than `after` for which
    /// `keep` is true, oldest first.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(EVENTS)?;
            let mut found = Vec::new();
            for entry in table.range(after.saturating_add(1)..)? {
                let (seq, value) = entry?;
                if keep(value.value()) {
                    found.push((seq.value(), value.value().to_vec()));
                    if found.len() >= limit {
                        break;
                    }
                }
            }
            Ok(found)
        })
    }

    // --- role state ---

    fn state_key(role: &str, key: &str) -> String {
        format!("{role}\0{key}")
    }

    pub fn state_get(&self, role: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let full = Self::state_key(role, key);
        self.read(|txn| {
            Ok(txn
                .open_table(ROLE_STATE)?
                .get(full.as_str())?
                .map(|value| value.value().to_vec()))
        })
    }

    pub fn state_set(&self, role: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let full = Self::state_key(role, key);
        self.write(Durability::Immediate, |txn| {
            txn.open_table(ROLE_STATE)?.insert(full.as_str(), value)?;
            Ok(())
        })
    }

    pub fn state_delete(&self, role: &str, key: &str) -> Result<(), StoreError> {
        let full = Self::state_key(role, key);
        self.write(Durability::Immediate, |txn| {
            txn.open_table(ROLE_STATE)?.remove(full.as_str())?;
            Ok(())
        })
    }

    pub fn state_keys(&self, role: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let start = Self::state_key(role, prefix);
        let role_prefix = format!("{role}\0");
        self.read(|txn| {
            let table = txn.open_table(ROLE_STATE)?;
            let mut keys = Vec::new();
            for entry in table.range(start.as_str()..)? {
                let (key, _) = entry?;
                let key = key.value();
                match key.strip_prefix(role_prefix.as_str()) {
                    Some(own) if own.starts_with(prefix) => keys.push(own.to_string()),
                    _ => break,
                }
            }
            Ok(keys)
        })
    }

    // --- delivery cursors ---

    pub fn cursor(&self, role: &str) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(CURSORS)?.get(role)?.map(|seq| seq.value()).unwrap_or(0)))
    }

    /// Records that `role` accepted every event up to `seq`. Not forced to
    /// disk: a cursor lost in a crash only means redelivering events, which
    /// roles must tolerate; it can never skip one.
    pub fn set_cursor(&self, role: &str, seq: u64) -> Result<(), StoreError> {
        self.write(Durability::None, |txn| {
            txn.open_table(CURSORS)?.insert(role, seq)?;
            Ok(())
        })
    }

    // --- settings ---

    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(SETTINGS)?
                .get(name)?
                .map(|value| value.value().to_string()))
        })
    }

    pub fn set_setting(&self, name: &str, value: Option<&str>) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(SETTINGS)?;
            match value {
                Some(value) => table.insert(name, value)?,
                None => table.remove(name)?,
            };
            Ok(())
        })
    }
}
