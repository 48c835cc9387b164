//! The cluster's quorum-replicated event log: Raft (openraft) over the
//! node's redb store.
//!
//! It owns the Raft types, the commands the log carries, the state machine
//! they build (members, cluster id and epoch, the event stream) and
//! [`QuorumLog`], the [`EventLog`] the rest of the host uses. It does not own
//! sockets: the transport carries its RPCs.
//!
//! # Layout
//! - `storage`: the Raft log and the state machine on redb, durable before
//!   openraft is told they are.
//! - this file: types, commands, start-up and the `EventLog` implementation.

pub mod storage;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::Raft;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::log::{EventLog, LogError, NewEvent, StoredEvent, validate};
use crate::store::Store;

pub type NodeId = u64;

/// How to reach a member: what the Raft membership stores for each node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    pub name: String,
    /// Node-to-node transport address.
    pub transport: String,
    /// HTTP API address.
    pub api: String,
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (transport {}, api {})", self.name, self.transport, self.api)
    }
}

/// What the replicated log carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An event from a role or the API.
    Event {
        kind: String,
        key: String,
        source: String,
        timestamp_ms: u64,
        payload: serde_json::Value,
    },
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The event's seq (its log index).
    Event { seq: u64 },
    /// Entries without a result (membership, leader blanks).
    Nothing,
}

openraft::declare_raft_types!(
    /// Raft types of the Hivemind control plane.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = NodeAddress,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Cluster-wide facts the state machine keeps beside the events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Chosen when the cluster is first formed; never changes.
    pub cluster_id: String,
    /// Generation of the voter set: bumped by every voter change.
    pub epoch: u64,
    /// Voter ids of the current epoch, to detect a voter change.
    pub voters: Vec<NodeId>,
}

/// Writes that find no quorum fail after this long instead of hanging.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Raft timing: settings for a LAN; failover takes about one election.
#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Entries applied since the last snapshot before a new one is built
    /// (and the log before it purged).
    pub snapshot_every: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(300),
            election_max: Duration::from_millis(600),
            snapshot_every: 10_000,
        }
    }
}

pub type HivemindRaft = Raft<TypeConfig>;

/// What `/v1/status` shows of the quorum.
#[derive(Debug, Clone, Serialize)]
pub struct QuorumStatus {
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied: u64,
    pub voters: Vec<String>,
}

/// The quorum log as the host's [`EventLog`].
pub struct QuorumLog {
    raft: HivemindRaft,
    store: Store,
    applied: watch::Receiver<u64>,
}

impl QuorumLog {
    /// Starts Raft for this node over `store`. A node whose store has no
    /// Raft state yet forms a one-voter cluster of itself.
    pub async fn start_single(
        store: Store,
        id: NodeId,
        address: NodeAddress,
        timing: &Timing,
    ) -> anyhow::Result<QuorumLog> {
        let config = openraft::Config {
            cluster_name: "hivemind".into(),
            heartbeat_interval: timing.heartbeat.as_millis() as u64,
            election_timeout_min: timing.election_min.as_millis() as u64,
            election_timeout_max: timing.election_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timing.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let (log_store, state_machine, applied) = storage::open(&store)?;
        let network = storage::NoNetwork;
        let raft = Raft::new(id, config, network, log_store, state_machine).await?;
        if !raft.is_initialized().await? {
            let mut members = BTreeMap::new();
            members.insert(id, address);
            raft.initialize(members).await?;
        }
        // A lone voter elects itself within one election timeout; serve only
        // once writes can succeed.
        raft.wait(Some(timing.election_max * 10))
            .metrics(
                |metrics| metrics.current_leader == Some(id),
                "this node leads its one-voter cluster",
            )
            .await
            .map_err(|error| anyhow::anyhow!("the cluster log did not elect this node as leader: {error}"))?;
        Ok(QuorumLog { raft, store, applied })
    }

    pub fn raft(&self) -> &HivemindRaft {
        &self.raft
    }

    /// Leader, term and voters as this node sees them (node ids in hex,
    /// as everywhere users see them).
    pub fn status(&self) -> QuorumStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: Vec<String> = metrics
            .membership_config
            .membership()
            .voter_ids()
            .map(|id| format!("{id:016x}"))
            .collect();
        QuorumStatus {
            leader: metrics.current_leader.map(|id| format!("{id:016x}")),
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0),
            voters,
        }
    }

    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft did not shut down cleanly");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl EventLog for QuorumLog {
    async fn append(&self, event: NewEvent) -> Result<u64, LogError> {
        validate(&event)?;
        let payload = serde_json::from_slice(&event.payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&event.payload).into_owned()));
        let command = Command::Event {
            kind: event.kind,
            key: event.key,
            source: event.source,
            timestamp_ms: now_ms(),
            payload,
        };
        match tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(command)).await {
            Err(_) => Err(LogError::Unavailable(format!(
                "the write was not committed within {} s: no quorum of voters is reachable",
                WRITE_TIMEOUT.as_secs()
            ))),
            Ok(Err(error)) => Err(LogError::Unavailable(format!("the write was not committed: {error}"))),
            Ok(Ok(written)) => match written.data {
                CommandResult::Event { seq } => Ok(seq),
                CommandResult::Nothing => Err(LogError::Unavailable("the log did not return a seq".into())),
            },
        }
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
        self.applied.clone()
    }
}

#[derive(Deserialize)]
struct KindOnly {
    kind: String,
}
