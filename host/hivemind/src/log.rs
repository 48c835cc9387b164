//! The event log as the rest of the host sees it: append, read after a seq,
//! and watch the newest seq.
//!
//! [`EventLog`] is the seam the quorum log replaces: today [`LocalLog`] keeps
//! the log in this node's [`Store`]; roles, the API and delivery only use the
//! trait.

use std::time::{SystemTime, UNIX_EPOCH};

use hivemind_runtime::Event;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// Largest payload accepted for one event: events describe changes, they do
/// not carry bulk data.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;

/// An event as stored and as served by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: u64,
    pub epoch: u64,
    pub kind: String,
    pub key: String,
    pub source: String,
    pub timestamp_ms: u64,
    /// JSON payloads are kept as JSON; anything else as a string of bytes.
    pub payload: serde_json::Value,
}

impl StoredEvent {
    pub fn to_role_event(&self) -> Event {
        let payload = match &self.payload {
            serde_json::Value::String(text) => text.as_bytes().to_vec(),
            other => serde_json::to_vec(other).unwrap_or_default(),
        };
        Event {
            seq: self.seq,
            epoch: self.epoch,
            kind: self.kind.clone(),
            key: self.key.clone(),
            source: self.source.clone(),
            timestamp_ms: self.timestamp_ms,
            payload,
        }
    }
}

/// A new event before the log gives it a seq.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub key: String,
    pub source: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks kind, key and payload size; the same rules for roles and the API.
pub fn validate(event: &NewEvent) -> Result<(), LogError> {
    let kind_ok = !event.kind.is_empty()
        && event.kind.len() <= 128
        && event
            .kind
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !kind_ok {
        return Err(LogError::Invalid(format!(
            "kind {:?} must be 1-128 characters of letters, digits, '.', '_' or '-' (e.g. service.up)",
            event.kind
        )));
    }
    if event.key.is_empty() || event.key.len() > 256 {
        return Err(LogError::Invalid(format!("key {:?} must be 1-256 bytes", event.key)));
    }
    if event.payload.len() > MAX_PAYLOAD_BYTES {
        return Err(LogError::Invalid(format!(
            "payload is {} bytes; the limit is {MAX_PAYLOAD_BYTES}",
            event.payload.len()
        )));
    }
    Ok(())
}

/// What the host needs from the cluster log.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `event` and returns its seq once it is durable.
    async fn append(&self, event: NewEvent) -> Result<u64, LogError>;

    /// Up to `limit` events after `after` whose kind starts with `kind_prefix`.
    async fn since(&self, after: u64, kind_prefix: &str, limit: usize) -> Result<Vec<StoredEvent>, LogError>;

    /// The newest seq, updated after every append.
    fn watch_last(&self) -> watch::Receiver<u64>;
}

/// The single-node log: events in this node's store, epoch 1.
pub struct LocalLog {
    store: Store,
    last: watch::Sender<u64>,
}

/// The only epoch a single node has.
const LOCAL_EPOCH: u64 = 1;

impl LocalLog {
    pub fn open(store: Store) -> Result<LocalLog, StoreError> {
        let last = store.last_seq()?;
        Ok(LocalLog {
            store,
            last: watch::Sender::new(last),
        })
    }
}

#[async_trait::async_trait]
impl EventLog for LocalLog {
    async fn append(&self, event: NewEvent) -> Result<u64, LogError> {
        validate(&event)?;
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0);
        let payload = serde_json::from_slice(&event.payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&event.payload).into_owned()));
        let seq = self
            .store
            .blocking(move |store| {
                store.append_event(|seq| {
                    let stored = StoredEvent {
                        seq,
                        epoch: LOCAL_EPOCH,
                        kind: event.kind,
                        key: event.key,
                        source: event.source,
                        timestamp_ms,
                        payload,
                    };
                    serde_json::to_vec(&stored).expect("events encode as JSON")
                })
            })
            .await?;
        self.last.send_if_modified(|last| {
            let newer = seq > *last;
            if newer {
                *last = seq;
            }
            newer
        });
        Ok(seq)
    }

    async fn since(&self, after: u64, kind_prefix: &str, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        let prefix = kind_prefix.to_string();
        let found = self
            .store
            .blocking(move |store| {
                store.events_after(after, limit, |bytes| {
                    prefix.is_empty()
                        || serde_json::from_slice::<KindOnly>(bytes).is_ok_and(|event| event.kind.starts_with(&prefix))
                })
            })
            .await?;
        Ok(found
            .into_iter()
            .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
            .collect())
    }

    fn watch_last(&self) -> watch::Receiver<u64> {
        self.last.subscribe()
    }
}

#[derive(Deserialize)]
struct KindOnly {
    kind: String,
}
