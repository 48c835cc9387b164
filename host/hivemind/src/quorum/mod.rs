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
//! - `network`: Raft RPCs over the node-to-node transport.
//! - this file: types, commands, start-up and the `EventLog` implementation.

pub mod network;
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
        let mut members = BTreeMap::new();
        members.insert(id, address);
        let log = Self::start(store, id, timing, storage::NoNetwork, Some(members)).await?;
        // A lone voter elects itself within one election timeout; serve only
        // once writes can succeed.
        log.raft
            .wait(Some(timing.election_max * 10))
            .metrics(
                |metrics| metrics.current_leader == Some(id),
                "this node leads its one-voter cluster",
            )
            .await
            .map_err(|error| anyhow::anyhow!("the cluster log did not elect this node as leader: {error}"))?;
        Ok(log)
    }

    /// Starts Raft for this node with `network`. `initial_members`, if
    /// given and the store has no Raft state yet, forms the cluster with
    /// those voters (one node of a new cluster does this, the others wait
    /// to be contacted).
    pub async fn start<N: openraft::network::RaftNetworkFactory<TypeConfig>>(
        store: Store,
        id: NodeId,
        timing: &Timing,
        network: N,
        initial_members: Option<BTreeMap<NodeId, NodeAddress>>,
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
        let raft = Raft::new(id, config, network, log_store, state_machine).await?;
        if let Some(members) = initial_members
            && !raft.is_initialized().await?
        {
            raft.initialize(members).await?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{ClusterCa, TransportCounters, serve};
    use tokio_util::sync::CancellationToken;

    struct TestNode {
        id: NodeId,
        log: QuorumLog,
        shutdown: CancellationToken,
        _dir: tempfile::TempDir,
    }

    /// Three nodes on loopback, each with its own store and transport
    /// server, under one cluster CA; node 1 forms the cluster.
    async fn three_nodes() -> Vec<TestNode> {
        let ca = ClusterCa::generate("test").unwrap();
        let timing = Timing {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(400),
            snapshot_every: 10_000,
        };
        let mut listeners = Vec::new();
        let mut members = BTreeMap::new();
        for id in 1..=3u64 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = NodeAddress {
                name: format!("n{id}"),
                transport: listener.local_addr().unwrap().to_string(),
                api: String::new(),
            };
            members.insert(id, address);
            listeners.push((id, listener));
        }
        let mut nodes = Vec::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("hivemind.redb")).unwrap();
            let identity = ca.issue(&format!("{id:016x}")).unwrap();
            let network = network::TransportNetwork::new(identity.connector().unwrap());
            let initial = (id == 1).then(|| members.clone());
            let log = QuorumLog::start(store, id, &timing, network, initial).await.unwrap();
            let shutdown = CancellationToken::new();
            let handler = Arc::new(network::RaftFrames {
                raft: log.raft().clone(),
            });
            tokio::spawn(serve(
                listener,
                identity.acceptor().unwrap(),
                handler,
                Arc::new(TransportCounters::default()),
                shutdown.clone(),
            ));
            nodes.push(TestNode {
                id,
                log,
                shutdown,
                _dir: dir,
            });
        }
        nodes
    }

    /// The leader all `nodes` agree on, other than `not`.
    async fn leader_of(nodes: &[TestNode], not: Option<NodeId>) -> NodeId {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: Vec<Option<NodeId>> = nodes
                .iter()
                .map(|node| node.log.raft().metrics().borrow().current_leader)
                .collect();
            if let Some(Some(leader)) = leaders.first()
                && leaders.iter().all(|seen| *seen == Some(*leader))
                && not != Some(*leader)
            {
                return *leader;
            }
            assert!(tokio::time::Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn event(key: &str) -> NewEvent {
        NewEvent {
            kind: "test.replicated".into(),
            key: key.into(),
            source: "test".into(),
            payload: b"{}".to_vec(),
        }
    }

    async fn wait_for_events(node: &TestNode, count: usize) -> Vec<(u64, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let events = node.log.since(0, "test.", 100).await.unwrap();
            if events.len() >= count {
                return events.into_iter().map(|event| (event.seq, event.key)).collect();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} has {} of {count} events",
                node.id,
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes through the leader of three voters over TLS reach every node in
    /// the same order; when the leader stops, the other two elect a new one
    /// and take writes, and both keep every acknowledged event exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_voters_replicate_and_survive_the_leader() {
        let mut nodes = three_nodes().await;
        let leader = leader_of(&nodes, None).await;
        let leader_node = nodes.iter().find(|node| node.id == leader).unwrap();
        let mut acknowledged = Vec::new();
        for key in ["a", "b", "c"] {
            acknowledged.push((leader_node.log.append(event(key)).await.unwrap(), key.to_string()));
        }
        for node in &nodes {
            assert_eq!(wait_for_events(node, 3).await, acknowledged, "node {}", node.id);
        }

        let position = nodes.iter().position(|node| node.id == leader).unwrap();
        let old = nodes.remove(position);
        old.shutdown.cancel();
        old.log.shutdown().await;
        drop(old);

        let new_leader = leader_of(&nodes, Some(leader)).await;
        let survivor = nodes.iter().find(|node| node.id == new_leader).unwrap();
        acknowledged.push((survivor.log.append(event("d")).await.unwrap(), "d".to_string()));
        for node in &nodes {
            assert_eq!(wait_for_events(node, 4).await, acknowledged, "node {}", node.id);
        }
        for node in nodes {
            node.shutdown.cancel();
            node.log.shutdown().await;
        }
    }

    /// A node left without a quorum refuses writes with a clear error (after
    /// the write timeout, not forever) and still serves what was committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_quorum_refuses_writes_and_keeps_reads() {
        let mut nodes = three_nodes().await;
        let leader = leader_of(&nodes, None).await;
        let leader_node = nodes.iter().find(|node| node.id == leader).unwrap();
        let seq = leader_node.log.append(event("kept")).await.unwrap();
        for node in &nodes {
            wait_for_events(node, 1).await;
        }
        // Stop both followers: the leader is alone.
        let followers: Vec<TestNode> = {
            let (alone, others): (Vec<_>, Vec<_>) = nodes.drain(..).partition(|node| node.id == leader);
            nodes = alone;
            others
        };
        for node in followers {
            node.shutdown.cancel();
            node.log.shutdown().await;
        }
        let alone = &nodes[0];
        let error = alone.log.append(event("lost")).await.unwrap_err();
        assert!(matches!(error, LogError::Unavailable(_)), "{error}");
        assert!(
            error.to_string().contains("quorum") || error.to_string().contains("not committed"),
            "{error}"
        );
        assert_eq!(wait_for_events(alone, 1).await, [(seq, "kept".to_string())]);
        alone.shutdown.cancel();
        alone.log.shutdown().await;
    }
}
