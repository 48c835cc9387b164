//! The event log as the rest of the host sees it: append, read after a seq,
//! and watch the newest seq.
//!
//! [`EventLog`] is what roles, the API and delivery use; the quorum log
//! (`crate::quorum::QuorumLog`) implements it.

use hivemind_runtime::Event;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::StoreError;

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
    /// The log cannot take writes now (no quorum, no leader); retry later.
    #[error("the cluster log is unavailable: {0}")]
    Unavailable(String),
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

    /// A position that grows whenever new events may be readable (the last
    /// applied log index); a wake-up for readers, not an event seq.
    fn watch_last(&self) -> watch::Receiver<u64>;
}
