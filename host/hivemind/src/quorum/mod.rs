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
//! - `network`: Raft RPCs and peer requests over the node-to-node transport.
//! - `frames`: the transport's server side: every frame a member answers.
//! - `join`: credentials, the join request and the cluster files.
//! - `health`: pings between members, for `status` and degraded mode.
//! - this file: types, commands, start-up, forwarding to the leader,
//!   admission, membership changes and the `EventLog` implementation.

pub mod frames;
mod health;
pub use health::CLOCK_WARN_MS;
pub mod join;
pub mod network;
mod recovery;
pub mod storage;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::Raft;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::log::{EventLog, LogError, NewEvent, StoredEvent, validate};
use crate::store::Store;
use crate::transport::ClusterCa;
use network::{PeerError, PeerPool};

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
    /// The cluster's identity, written once by the node that formed it,
    /// with the founding members (each gets its `node.joined`; later nodes
    /// get theirs when admitted).
    Formed {
        cluster_id: String,
        secret: String,
        #[serde(default)]
        founders: BTreeMap<NodeId, NodeAddress>,
        #[serde(default)]
        timestamp_ms: u64,
    },
    /// A single-use join token (see [`join`]).
    TokenIssued {
        id: String,
        secret: String,
        /// When it expires by the issuing node's clock: shown to people,
        /// and used to forget old tokens, never to refuse one.
        expires_ms: u64,
        /// How long it is valid, counted by each node's own clock from
        /// when it applied this entry, so that clocks set apart do not
        /// stretch or cut it (0 in entries from before it was kept).
        #[serde(default)]
        ttl_ms: u64,
    },
    /// Commands proposed together: one log entry, one disk write.
    Batch(Vec<Command>),
    /// A node admitted by the quorum: it is added as a learner next.
    /// Applying it consumes `token`, so a token admits one node only.
    NodeJoined {
        id: NodeId,
        address: NodeAddress,
        token: Option<String>,
        timestamp_ms: u64,
    },
    /// The leader's decision about a member's health, from what gossip saw
    /// (see `membership::decider`), or a node's own goodbye. Applied only
    /// when it changes the member's health, so a decision proposed twice
    /// (a leader change midway) is recorded once: as `node.failed`,
    /// `node.rejoined` or `node.left`.
    NodeHealthChanged {
        id: NodeId,
        health: NodeHealth,
        /// The gossip generation the decision is about.
        generation: u64,
        reason: String,
        timestamp_ms: u64,
    },
}

/// A member's health as the log has decided it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    #[default]
    Alive,
    Failed,
    Left,
}

impl NodeHealth {
    /// The event kind recording a change to this health.
    pub fn event_kind(self) -> &'static str {
        match self {
            NodeHealth::Alive => "node.rejoined",
            NodeHealth::Failed => "node.failed",
            NodeHealth::Left => "node.left",
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The event's seq.
    Event { seq: u64 },
    /// The node was admitted; `seq` is its `node.joined` event.
    Joined { seq: u64, epoch: u64 },
    /// The command was refused when applied, for this reason.
    Refused { reason: String },
    /// The results of a batch, in order.
    Batch(Vec<CommandResult>),
    /// Entries without a result (membership, leader blanks, tokens).
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
#[serde(default)]
pub struct ClusterState {
    /// Chosen when the cluster is first formed; never changes.
    pub cluster_id: String,
    /// Proves a node may join; set when the cluster is formed.
    pub secret: String,
    /// Generation of the voter set: bumped by every voter change.
    pub epoch: u64,
    /// Voter ids of the current epoch, to detect a voter change.
    pub voters: Vec<NodeId>,
    /// Every member (voter or learner) and the epoch it joined in.
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// Join tokens not yet used or expired.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Nodes removed from the cluster, oldest first, at most
    /// [`REMOVED_KEPT`]: one still gossiping is not shown as joining.
    pub removed: Vec<NodeId>,
}

/// Removed nodes remembered: enough to cover any that still run after
/// their removal; the list is in every state write, so it is bounded.
pub const REMOVED_KEPT: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Its name when it joined (empty in records from before names were
    /// kept here; the Raft membership has them).
    #[serde(default)]
    pub name: String,
    /// Admitted by `node.joined` and not yet listed by a Raft membership
    /// (its learner is being added): a membership without it removes
    /// nothing then.
    #[serde(default)]
    pub awaiting_learner: bool,
    pub joined_epoch: u64,
    #[serde(default)]
    pub health: NodeHealth,
    /// The gossip generation the last health decision was about.
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub secret: String,
    pub expires_ms: u64,
    #[serde(default)]
    pub ttl_ms: u64,
    /// This node's clock when it applied the token's entry (or installed a
    /// snapshot with it): not the same on every node, and never read by
    /// the state machine, whose results must be.
    #[serde(default)]
    pub learned_ms: u64,
    /// Set when a node joined with it; kept so a replay is told apart
    /// from a token that never existed.
    pub used_by: Option<NodeId>,
}

impl TokenRecord {
    /// Whether the token has expired at `now_ms` of this node's clock: its
    /// TTL counted from when this node learned it, so the verdict does not
    /// depend on how far other members' clocks are from this one's.
    pub fn expired(&self, now_ms: u64) -> bool {
        if self.ttl_ms == 0 || self.learned_ms == 0 {
            return now_ms > self.expires_ms;
        }
        now_ms.saturating_sub(self.learned_ms) > self.ttl_ms
    }
}

/// Writes that find no quorum fail after this long instead of hanging.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Raft timing: settings for a LAN. A follower refuses to vote until it
/// has not heard from the leader for `election_max` (openraft's leader
/// lease), so failover takes a little over `election_max`: a wide
/// `election_min..election_max` range lets candidates try again soon after.
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
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(500),
            snapshot_every: 10_000,
        }
    }
}

pub type HivemindRaft = Raft<TypeConfig>;

/// How a node that has no Raft state yet gets into a cluster.
#[derive(Debug, Clone)]
pub enum Formation {
    /// Wait to be contacted: this node was admitted (or has state already).
    Wait,
    /// Form a one-voter cluster of this node.
    Single { secret: String },
    /// This node is the bootstrap seed: collect the other `peers` (sorted
    /// transport addresses, this node's among them), then form the cluster
    /// with all of them as voters.
    Seed { peers: Vec<String>, secret: String },
}

/// Everything [`QuorumLog::start`] needs.
pub struct QuorumSetup {
    pub store: Store,
    pub id: NodeId,
    pub address: NodeAddress,
    pub timing: Timing,
    pub files: join::ClusterFiles,
    pub formation: Formation,
    /// Fault injection: cuts the node off (tests only; off otherwise).
    pub isolation: crate::transport::Isolation,
}

/// A change of the voter set or the member list, by the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberChange {
    Promote(NodeId),
    Demote(NodeId),
    Remove(NodeId),
}

/// The leader's answer to a forwarded write.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum ForwardReply {
    Done(CommandResult),
    /// Not the leader (any more): nothing was written, ask again.
    NotLeader,
    Failed(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct ForwardedJoin {
    request: join::JoinRequest,
    channel_binding: [u8; 32],
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Ping {
    pub from: NodeId,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Pong {
    pub id: NodeId,
    pub epoch: u64,
    /// Whether the pinging node is in this node's membership.
    pub member: bool,
    /// Whether the answering node leads (its membership is the latest).
    pub leader: bool,
    /// Why the answering node's log does not run, if it does not: it is
    /// then no voter in any quorum.
    #[serde(default)]
    pub log_stopped: Option<String>,
    /// The answering node's clock (ms since the epoch) when it answered:
    /// the pinging node compares it with its own (0 from older nodes).
    #[serde(default)]
    pub clock_ms: u64,
}

/// The leader's current snapshot, for a node that comes back at a stale
/// epoch (frame `FETCH_SNAPSHOT`).
#[derive(Serialize, Deserialize)]
struct FetchedSnapshot {
    vote: openraft::Vote<NodeId>,
    meta: openraft::SnapshotMeta<NodeId, NodeAddress>,
    /// The snapshot's bytes (JSON text, see `storage`).
    data: String,
}

/// A bootstrap seed's peers collected so far.
struct Bootstrap {
    peers: Vec<String>,
    secret: String,
    collected: std::sync::Mutex<BTreeMap<NodeId, NodeAddress>>,
}

/// One member as `/v1/status` and `hivemind members` show it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub id: String,
    pub name: String,
    pub transport: String,
    pub api: String,
    /// `voter` or `learner`.
    pub role: &'static str,
    pub reachable: bool,
    pub joined_epoch: u64,
    pub leader: bool,
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Why the member's log does not run (as it said when last pinged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_stopped: Option<String>,
    /// How far the member's clock is ahead of this node's (behind when
    /// negative), as its last answer to a ping showed; none for this node
    /// and for members not heard from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
}

/// What `/v1/status` shows of the quorum.
#[derive(Debug, Clone, Serialize)]
pub struct QuorumStatus {
    pub cluster_id: String,
    pub epoch: u64,
    /// `healthy`, or `degraded` when no quorum of voters is reachable from
    /// here or no leader is known.
    pub health: &'static str,
    /// Why the cluster is degraded, in words.
    pub problem: Option<String>,
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied: u64,
    /// Last log index covered by this node's snapshot (built here or
    /// installed from the leader).
    pub snapshot: Option<u64>,
    pub voters: Vec<String>,
    /// Voters this node cannot reach, as `name (id)`.
    pub missing_voters: Vec<String>,
    pub members: Vec<MemberStatus>,
}

/// The quorum log as the host's [`EventLog`].
pub struct QuorumLog {
    /// The running Raft core: replaced by a new one when it stops (see
    /// `recovery`), so every use reads it here afresh.
    core: CoreSlot,
    /// What a new core is built from.
    rebuild: Rebuild,
    core_health: recovery::CoreHealth,
    store: Store,
    applied: watch::Receiver<u64>,
    id: NodeId,
    ca: ClusterCa,
    pool: Arc<PeerPool>,
    health: health::PeerHealth,
    bootstrap: Option<Bootstrap>,
    /// The secret to record when this node formed the cluster.
    forming_secret: Option<String>,
    /// Commands for this node's log, proposed in batches.
    proposals: tokio::sync::mpsc::Sender<Submission>,
    /// Proposals under way: with none, a command is proposed at once by
    /// its caller, without a trip through the batcher.
    proposing: Arc<std::sync::atomic::AtomicUsize>,
    /// Commands for the leader's log, forwarded in batches.
    forwards: tokio::sync::mpsc::Sender<ForwardSubmission>,
    /// Forwards under way: with none, a command is forwarded at once by its
    /// caller.
    forwarding: Arc<std::sync::atomic::AtomicUsize>,
    cluster_id: String,
    pub writes: WriteStats,
}

/// The running core, shared with the batcher that proposes through it.
type CoreSlot = Arc<std::sync::RwLock<HivemindRaft>>;

/// What a core is made of besides the store: a new one gets the same.
struct Rebuild {
    config: Arc<openraft::Config>,
    network: network::TransportNetwork,
    /// The committed index, applied seq and cluster facts the host reads.
    kept: storage::Kept,
}

/// Log writes this node asked for: how long the committed ones took, and
/// how many failed (no quorum, refused, timed out).
pub struct WriteStats {
    /// Seconds from a write's start to its commit, as the metrics serve it.
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    /// Committed writes, and their summed time, for `/v1/status`.
    pub count: std::sync::atomic::AtomicU64,
    pub total_micros: std::sync::atomic::AtomicU64,
    pub failures: prometheus_client::metrics::counter::Counter,
}

impl Default for WriteStats {
    fn default() -> Self {
        WriteStats {
            // 100 µs to about 13 s: a loopback commit takes about a
            // millisecond; an election under way, seconds.
            seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
            ),
            count: Default::default(),
            total_micros: Default::default(),
            failures: Default::default(),
        }
    }
}

impl WriteStats {
    fn record(&self, took: Duration) {
        self.seconds.observe(took.as_secs_f64());
        self.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.total_micros
            .fetch_add(took.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The log's figures that metrics serve, read without waiting.
#[derive(Debug, Clone, Default)]
pub struct LogGauges {
    pub term: u64,
    pub is_leader: bool,
    pub has_leader: bool,
    pub last_index: u64,
    pub committed: u64,
    pub applied: u64,
    pub voters: usize,
    /// Voters that answer and whose logs run, this node included.
    pub reachable_voters: usize,
    /// Whether this node's Raft core runs.
    pub core_running: bool,
    /// Cores started in place of a stopped one.
    pub core_restarts: u64,
    /// The largest offset between this node's clock and a member's, in ms.
    pub clock_offset_max_ms: u64,
}

/// Why the leader's log did not take a command.
#[derive(Debug, Clone)]
enum Rejected {
    /// Not the leader: nothing was written; the leader, if known.
    NotLeader(Option<NodeAddress>),
    Failed(String),
}

type Submission = (Command, tokio::sync::oneshot::Sender<Result<CommandResult, Rejected>>);

/// Most commands proposed as one log entry.
const MAX_BATCH: usize = 1024;
/// Batches proposed at once; more wait (and grow) in the queue.
const BATCHES_IN_FLIGHT: usize = 4;

/// Waits for one submission and takes those already queued behind it.
async fn next_batch<T>(queue: &mut tokio::sync::mpsc::Receiver<T>) -> Option<Vec<T>> {
    let mut batch = vec![queue.recv().await?];
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(submission) => batch.push(submission),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// One command for `commands`: itself when alone, else a batch.
fn combine(mut commands: Vec<Command>) -> Command {
    if commands.len() == 1 {
        commands.pop().expect("one")
    } else {
        Command::Batch(commands)
    }
}

/// Group commit: commands that arrive while earlier ones are being
/// committed are proposed together as one entry, so one disk write and one
/// replication round carry many. openraft proposes every `client_write` as
/// its own entry, which caps throughput at one write per fsync.
async fn propose_batches(
    core: CoreSlot,
    mut queue: tokio::sync::mpsc::Receiver<Submission>,
    proposing: Arc<std::sync::atomic::AtomicUsize>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(batch) = next_batch(&mut queue).await else {
            return;
        };
        let raft = core.read().unwrap().clone();
        let proposing = proposing.clone();
        tokio::spawn(async move {
            let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
            let count = replies.len();
            let results = propose_now(&raft, &proposing, combine(commands), count).await;
            drop(permit);
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        });
    }
}

/// Proposes `command` (`count` commands combined) as one entry and returns
/// each command's result; `proposing` counts proposals under way.
async fn propose_now(
    raft: &HivemindRaft,
    proposing: &std::sync::atomic::AtomicUsize,
    command: Command,
    count: usize,
) -> Vec<Result<CommandResult, Rejected>> {
    proposing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let outcome = raft.client_write(command).await;
    proposing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    match outcome {
        Ok(written) => match written.data {
            CommandResult::Batch(results) if count > 1 => results.into_iter().map(Ok).collect(),
            result => vec![Ok(result); count],
        },
        Err(error) => {
            let rejected = match error.forward_to_leader() {
                Some(forward) => Rejected::NotLeader(forward.leader_node.clone()),
                None => Rejected::Failed(format!("the write was not committed: {error}")),
            };
            vec![Err(rejected); count]
        }
    }
}

type ForwardSubmission = (
    String,
    Command,
    tokio::sync::oneshot::Sender<Result<ForwardReply, PeerError>>,
);

/// Group commit on a follower: writes forwarded to the same leader while
/// earlier ones are on their way go as one batch in one frame.
async fn forward_batches(
    pool: Arc<PeerPool>,
    mut queue: tokio::sync::mpsc::Receiver<ForwardSubmission>,
    forwarding: Arc<std::sync::atomic::AtomicUsize>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(batch) = next_batch(&mut queue).await else {
            return;
        };
        let mut by_leader: BTreeMap<String, Vec<(Command, _)>> = BTreeMap::new();
        for (leader, command, reply) in batch {
            by_leader.entry(leader).or_default().push((command, reply));
        }
        let permit = Arc::new(permit);
        for (leader, group) in by_leader {
            let (pool, permit, forwarding) = (pool.clone(), permit.clone(), forwarding.clone());
            tokio::spawn(async move {
                let (commands, replies): (Vec<Command>, Vec<_>) = group.into_iter().unzip();
                let count = replies.len();
                let outcomes = forward_now(&pool, &forwarding, &leader, combine(commands), count).await;
                drop(permit);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            });
        }
    }
}

/// Forwards `command` (`count` commands combined) to the leader at
/// `leader` in one frame and returns each command's outcome; `forwarding`
/// counts forwards under way.
async fn forward_now(
    pool: &PeerPool,
    forwarding: &std::sync::atomic::AtomicUsize,
    leader: &str,
    command: Command,
    count: usize,
) -> Vec<Result<ForwardReply, PeerError>> {
    forwarding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let outcome = pool
        .call::<_, ForwardReply>(leader, network::FORWARD_WRITE, &command, MEMBERSHIP_TIMEOUT)
        .await;
    forwarding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    match outcome {
        Ok(ForwardReply::Done(CommandResult::Batch(results))) if count > 1 => results
            .into_iter()
            .map(|result| Ok(ForwardReply::Done(result)))
            .collect(),
        outcome => vec![outcome; count],
    }
}

/// How long a membership change may take before it is reported failed.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(10);

/// A node id as users see it: 16 hex digits.
pub fn hex_id(id: NodeId) -> String {
    format!("{id:016x}")
}

impl QuorumLog {
    /// Starts Raft for this node. A node forming a one-voter cluster serves
    /// only once it leads; every other node serves at once (degraded until
    /// a leader is known).
    pub async fn start(setup: QuorumSetup) -> anyhow::Result<Arc<QuorumLog>> {
        let QuorumSetup {
            store,
            id,
            address,
            timing,
            files,
            formation,
            isolation,
        } = setup;
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
        let (mut log_store, state_machine, kept) = storage::open(&store, None)?;
        log_store.set_node_id(id);
        let applied = kept.applied.subscribe();
        let connector = files.identity.connector()?;
        let network = network::TransportNetwork::new(connector.clone(), isolation.clone());
        let raft = Raft::new(id, config.clone(), network.clone(), log_store, state_machine).await?;
        let initialized = raft.is_initialized().await?;
        let (bootstrap, forming_secret) = match formation {
            Formation::Wait => (None, None),
            Formation::Single { secret } => (None, Some(secret)),
            Formation::Seed { peers, secret } => {
                let collected = BTreeMap::from([(id, address.clone())]);
                let bootstrap = (!initialized).then(|| Bootstrap {
                    peers,
                    secret: secret.clone(),
                    collected: std::sync::Mutex::new(collected),
                });
                (bootstrap, Some(secret))
            }
        };
        let single = forming_secret.is_some() && bootstrap.is_none() && !initialized;
        let (proposals, queue) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        let proposing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let core: CoreSlot = Arc::new(std::sync::RwLock::new(raft));
        tokio::spawn(propose_batches(core.clone(), queue, proposing.clone()));
        let pool = Arc::new(PeerPool::new(connector, isolation));
        let (forwards, queue) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        let forwarding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(forward_batches(pool.clone(), queue, forwarding.clone()));
        let log = Arc::new(QuorumLog {
            writes: WriteStats::default(),
            proposals,
            proposing,
            forwards,
            forwarding,
            core,
            rebuild: Rebuild { config, network, kept },
            core_health: recovery::CoreHealth::default(),
            store,
            applied,
            id,
            ca: files.ca,
            pool,
            health: health::PeerHealth::default(),
            bootstrap,
            forming_secret,
            cluster_id: files.cluster_id,
        });
        if single {
            log.raft().initialize(BTreeMap::from([(id, address.clone())])).await?;
        }
        // (Metrics lag `initialize`: a node that just formed its cluster
        // is a lone voter whatever they say yet.)
        let leads_alone = single
            || log
                .raft()
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .eq([id]);
        if leads_alone {
            // A lone voter elects itself within one election timeout; serve
            // only once writes can succeed.
            log.raft()
                .wait(Some(timing.election_max * 10))
                .metrics(
                    |metrics| metrics.current_leader == Some(id),
                    "this node leads its one-voter cluster",
                )
                .await
                .map_err(|error| anyhow::anyhow!("the cluster log did not elect this node as leader: {error}"))?;
            log.ensure_formed().await;
            // A lone node restarted on other addresses tells its future
            // joiners where it is now.
            let listed = log
                .raft()
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&id)
                .cloned();
            if listed.as_ref() != Some(&address) {
                let changes = openraft::ChangeMembers::SetNodes(BTreeMap::from([(id, address)]));
                if let Err(error) = log.raft().change_membership(changes, true).await {
                    tracing::warn!(%error, "could not record this node's new addresses");
                }
            }
        }
        Ok(log)
    }

    /// The running Raft core (a handle: cheap to clone).
    pub fn raft(&self) -> HivemindRaft {
        self.core.read().unwrap().clone()
    }

    /// Why this node's log does not run, if it does not.
    pub fn core_problem(&self) -> Option<String> {
        self.core_health.problem()
    }

    /// Watches this node's Raft core and replaces it when it stops.
    pub async fn watch_core(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        recovery::watch(self, shutdown).await
    }

    /// Stops the core (if it still runs), reopens the store's files and
    /// starts a new core on them. Refused while the data directory has
    /// almost no free space: the new core would stop at its first write.
    async fn restart_core(&self) -> anyhow::Result<()> {
        let directory = self.store.directory();
        let free = hivemind_core::limits::free_bytes(directory)
            .map_err(|error| anyhow::anyhow!("cannot measure the free space in {}: {error}", directory.display()))?;
        if free < recovery::MIN_FREE_BYTES {
            anyhow::bail!(
                "{} has {} KiB free; it needs at least {} KiB",
                directory.display(),
                free / 1024,
                recovery::MIN_FREE_BYTES / 1024
            );
        }
        let old = self.raft();
        if let Err(error) = old.shutdown().await {
            tracing::debug!(%error, "the stopped core's shutdown");
        }
        drop(old);
        self.store
            .reopen(Duration::from_secs(10))
            .await
            .map_err(|error| anyhow::anyhow!("reopening the data store: {error}"))?;
        let (mut log_store, state_machine, _) = storage::open(&self.store, Some(&self.rebuild.kept))?;
        log_store.set_node_id(self.id);
        let raft = Raft::new(
            self.id,
            self.rebuild.config.clone(),
            self.rebuild.network.clone(),
            log_store,
            state_machine,
        )
        .await?;
        *self.core.write().unwrap() = raft;
        Ok(())
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// True while this node leads.
    pub fn is_leader(&self) -> bool {
        self.raft().metrics().borrow().current_leader == Some(self.id)
    }

    /// Every member's addresses as the Raft membership holds them, and
    /// which members vote.
    pub fn member_addresses(&self) -> (BTreeMap<NodeId, NodeAddress>, std::collections::BTreeSet<NodeId>) {
        let metrics = self.raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let addresses = membership.nodes().map(|(id, node)| (*id, node.clone())).collect();
        (addresses, membership.voter_ids().collect())
    }

    /// Wakes on every entry applied here.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Commits a decision about a member's health (or this node's goodbye);
    /// recorded only if it changes that member's health.
    pub async fn record_health(
        &self,
        id: NodeId,
        health: NodeHealth,
        generation: u64,
        reason: String,
        timeout: Duration,
    ) -> Result<CommandResult, LogError> {
        let command = Command::NodeHealthChanged {
            id,
            health,
            generation,
            reason,
            timestamp_ms: now_ms(),
        };
        self.write(command, timeout).await
    }

    /// The cluster this node's data belongs to.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The cluster facts as last applied here.
    pub fn cluster_state(&self) -> ClusterState {
        self.rebuild.kept.cluster.read().unwrap().clone()
    }

    /// Records the cluster's identity once this node formed it (no-op when
    /// it is already recorded or this node did not form the cluster).
    async fn ensure_formed(&self) {
        let Some(secret) = &self.forming_secret else { return };
        if !self.cluster_state().cluster_id.is_empty() {
            return;
        }
        let command = Command::Formed {
            cluster_id: self.cluster_id.clone(),
            secret: secret.clone(),
            founders: self.member_addresses().0,
            timestamp_ms: now_ms(),
        };
        if let Err(error) = self.write(command, WRITE_TIMEOUT).await {
            tracing::warn!(%error, "the cluster's identity is not recorded yet; trying again");
        }
    }

    /// Keeps trying to record the cluster's identity until it is (a task of
    /// the node that formed a cluster of several voters).
    pub async fn finish_forming(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if self.forming_secret.is_none() {
            return;
        }
        loop {
            if self.raft().is_initialized().await.unwrap_or(false) {
                self.ensure_formed().await;
                if !self.cluster_state().cluster_id.is_empty() {
                    return;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Pings every other member twice a second; `status` reports who answered.
    pub async fn watch_peers(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        health::watch(self, shutdown).await
    }

    /// Commits `command`, on the leader: here if this node leads, else
    /// forwarded to it. Fails after `timeout` when no quorum commits it.
    /// Only a write the leader certainly did not take is sent again, so a
    /// write is never committed twice.
    async fn write(&self, command: Command, timeout: Duration) -> Result<CommandResult, LogError> {
        let started = Instant::now();
        let result = self.write_once(command, timeout).await;
        match &result {
            Ok(_) => self.writes.record(started.elapsed()),
            Err(_) => {
                self.writes.failures.inc();
            }
        }
        result
    }

    async fn write_once(&self, command: Command, timeout: Duration) -> Result<CommandResult, LogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(self.no_quorum(timeout));
            }
            // Straight to a known leader elsewhere; else this node's log,
            // which takes it or names the leader.
            let leader = match self.leader() {
                Some((leader, node)) if leader != self.id => Some(node),
                _ => match tokio::time::timeout(remaining, self.propose(command.clone())).await {
                    Err(_) => return Err(self.no_quorum(timeout)),
                    Ok(Ok(result)) => return Ok(result),
                    Ok(Err(Rejected::NotLeader(leader))) => leader,
                    Ok(Err(Rejected::Failed(reason))) => return Err(LogError::Unavailable(reason)),
                },
            };
            let Some(leader) = leader else {
                // An election is under way.
                tokio::time::sleep(Duration::from_millis(25).min(remaining)).await;
                continue;
            };
            match tokio::time::timeout(remaining, self.forward(&leader.transport, command.clone()))
                .await
                .unwrap_or_else(|_| Err(PeerError::NoAnswer(format!("no answer within {remaining:?}"))))
            {
                Ok(ForwardReply::Done(result)) => return Ok(result),
                Ok(ForwardReply::Failed(reason)) => return Err(LogError::Unavailable(reason)),
                Ok(ForwardReply::NotLeader) | Err(PeerError::NotSent(_)) => {
                    tokio::time::sleep(Duration::from_millis(25).min(remaining)).await;
                }
                Err(PeerError::NoAnswer(error)) => {
                    return Err(LogError::Unavailable(format!(
                        "the leader {} did not answer ({error}); the write may or may not have been committed",
                        leader.name
                    )));
                }
                Err(PeerError::Refused(reason)) => return Err(LogError::Unavailable(reason)),
            }
        }
    }

    fn no_quorum(&self, timeout: Duration) -> LogError {
        let missing = self.missing_voters();
        let who = if missing.is_empty() {
            String::new()
        } else {
            format!(" (unreachable voters: {})", missing.join(", "))
        };
        LogError::Unavailable(format!(
            "the write was not committed within {} s: no quorum of voters is reachable{who}",
            timeout.as_secs_f32()
        ))
    }

    /// Proposes `command` to this node's log (batched with others).
    async fn propose(&self, command: Command) -> Result<CommandResult, Rejected> {
        if let Some(stopped) = self.core_problem() {
            return Err(Rejected::Failed(stopped));
        }
        let idle = self.proposing.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.proposals.capacity() == self.proposals.max_capacity();
        if idle {
            let mut results = propose_now(&self.raft(), &self.proposing, command, 1).await;
            return results.pop().expect("one result per command");
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.proposals
            .try_send((command, reply))
            .map_err(|_| Rejected::Failed("too many writes are waiting for the log; try again".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(Rejected::Failed("the log stopped".into())))
    }

    /// Forwards `command` to the leader at `leader` (batched with others).
    async fn forward(&self, leader: &str, command: Command) -> Result<ForwardReply, PeerError> {
        let idle = self.forwarding.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.forwards.capacity() == self.forwards.max_capacity();
        if idle {
            let mut outcomes = forward_now(&self.pool, &self.forwarding, leader, command, 1).await;
            return outcomes.pop().expect("one outcome per command");
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.forwards
            .try_send((leader.to_string(), command, reply))
            .map_err(|_| PeerError::NotSent("too many writes are waiting to be forwarded".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(PeerError::NotSent("the forwarder stopped".into())))
    }

    /// A forwarded write, on the leader.
    async fn write_as_leader(&self, command: Command) -> ForwardReply {
        match tokio::time::timeout(WRITE_TIMEOUT, self.propose(command)).await {
            Err(_) => ForwardReply::Failed(self.no_quorum(WRITE_TIMEOUT).to_string()),
            Ok(Ok(result)) => ForwardReply::Done(result),
            Ok(Err(Rejected::NotLeader(_))) => ForwardReply::NotLeader,
            Ok(Err(Rejected::Failed(reason))) => ForwardReply::Failed(reason),
        }
    }

    /// The leader's transport address and name, if one is known.
    fn leader(&self) -> Option<(NodeId, NodeAddress)> {
        let metrics = self.raft().metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node))
    }

    /// Issues a single-use join token valid for `ttl`.
    pub async fn issue_token(&self, ttl: Duration) -> Result<(String, u64), LogError> {
        let id = hex::encode(rand::random::<[u8; 4]>());
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let ttl_ms = ttl.as_millis() as u64;
        let expires_ms = now_ms() + ttl_ms;
        let command = Command::TokenIssued {
            id: id.clone(),
            secret: secret.clone(),
            expires_ms,
            ttl_ms,
        };
        self.write(command, WRITE_TIMEOUT).await?;
        Ok((join::Credential::token_text(&self.cluster_id, &id, &secret), expires_ms))
    }

    /// Answers a join request that arrived on this node.
    pub async fn admit(&self, request: join::JoinRequest, binding: [u8; 32]) -> join::JoinReply {
        if let Some(bootstrap) = &self.bootstrap
            && !self.raft().is_initialized().await.unwrap_or(true)
        {
            return self.admit_bootstrap_peer(bootstrap, request, binding).await;
        }
        match self.leader() {
            Some((leader, _)) if leader == self.id => self.admit_as_leader(request, binding).await,
            Some((_, node)) => {
                let forwarded = ForwardedJoin {
                    request,
                    channel_binding: binding,
                };
                self.pool
                    .call(&node.transport, network::FORWARD_JOIN, &forwarded, MEMBERSHIP_TIMEOUT)
                    .await
                    .unwrap_or_else(join::unreachable_leader)
            }
            None => join::JoinReply::refused(
                join::Refusal::NotReady,
                "the cluster has no leader right now (is a quorum of voters up?); try again",
            ),
        }
    }

    async fn admit_bootstrap_peer(
        &self,
        bootstrap: &Bootstrap,
        request: join::JoinRequest,
        binding: [u8; 32],
    ) -> join::JoinReply {
        use join::{JoinReply, Refusal};
        if !join::proofs_match(
            &request.proof,
            &join::client_proof(&bootstrap.secret, &binding, request.id),
        ) {
            return JoinReply::refused(
                Refusal::WrongCredential,
                "wrong cluster secret: give every bootstrap peer the same --secret",
            );
        }
        if request.bootstrap_peers.as_ref() != Some(&bootstrap.peers) {
            return JoinReply::refused(
                Refusal::Other,
                format!(
                    "this node bootstraps with --peers {} but the joiner was given {}; give every peer the same list",
                    bootstrap.peers.join(","),
                    request
                        .bootstrap_peers
                        .map(|peers| peers.join(","))
                        .unwrap_or_else(|| "none".into())
                ),
            );
        }
        if !bootstrap.peers.contains(&request.address.transport) {
            return JoinReply::refused(
                Refusal::Other,
                format!(
                    "the joiner's transport address {} is not one of --peers {}",
                    request.address.transport,
                    bootstrap.peers.join(",")
                ),
            );
        }
        let members = {
            let mut collected = bootstrap.collected.lock().unwrap();
            collected.insert(request.id, request.address.clone());
            let complete = bootstrap
                .peers
                .iter()
                .all(|peer| collected.values().any(|address| &address.transport == peer));
            complete.then(|| collected.clone())
        };
        let admission = match self.admission(request.id, 0, &bootstrap.secret, &binding) {
            Ok(admission) => admission,
            Err(reply) => return reply,
        };
        if let Some(members) = members {
            tracing::info!(
                voters = members.len(),
                "every bootstrap peer has asked to join; forming the cluster"
            );
            // The peers start their Raft once they have this answer; the
            // seed's vote requests are retried until they do.
            if let Err(error) = self.raft().initialize(members).await {
                tracing::warn!(%error, "forming the cluster");
            }
        }
        JoinReply::Admitted(Box::new(admission))
    }

    /// Certificates and proof for an admitted node.
    fn admission(
        &self,
        id: NodeId,
        epoch: u64,
        key: &str,
        binding: &[u8; 32],
    ) -> Result<join::Admission, join::JoinReply> {
        let identity = self.ca.issue(&hex_id(id)).map_err(|error| {
            join::JoinReply::refused(join::Refusal::Other, format!("cannot issue a certificate: {error:#}"))
        })?;
        Ok(join::Admission {
            cluster_id: self.cluster_id.clone(),
            epoch,
            ca_cert_pem: self.ca.cert_pem().to_string(),
            ca_key_pem: self.ca.key_pem(),
            cert_pem: identity.cert_pem,
            key_pem: identity.key_pem,
            server_proof: join::server_proof(key, binding),
        })
    }

    /// Decides a join, on the leader: checks cluster id, credential and
    /// epoch, commits `node.joined` (which consumes a token) and adds the
    /// node as a learner.
    async fn admit_as_leader(&self, request: join::JoinRequest, binding: [u8; 32]) -> join::JoinReply {
        use join::{JoinReply, Refusal};
        let state = self.cluster_state();
        let secret = if state.secret.is_empty() {
            self.forming_secret.clone().unwrap_or_default()
        } else {
            state.secret.clone()
        };
        if secret.is_empty() {
            return JoinReply::refused(Refusal::NotReady, "the cluster is still forming; try again");
        }
        if let Some(theirs) = &request.cluster_id
            && theirs != &self.cluster_id
        {
            let hint = if request.epoch.is_some() {
                "the joining node has data of that cluster: move its data directory away to join this one"
            } else {
                "the join token is for another cluster"
            };
            return JoinReply::refused(
                Refusal::UnknownCluster,
                format!(
                    "unknown cluster id {theirs}: this is cluster {}; {hint}",
                    self.cluster_id
                ),
            );
        }
        let key = match &request.token {
            None => secret,
            Some(token) => match state.tokens.get(token) {
                Some(record) => record.secret.clone(),
                None => {
                    return JoinReply::refused(
                        Refusal::WrongCredential,
                        "the join token is unknown to this cluster (expired long ago, or never issued); \
                         ask for a new one with `hivemind members token`",
                    );
                }
            },
        };
        if !join::proofs_match(&request.proof, &join::client_proof(&key, &binding, request.id)) {
            let what = if request.token.is_some() {
                "wrong join token"
            } else {
                "wrong cluster secret"
            };
            return JoinReply::refused(Refusal::WrongCredential, what);
        }
        // Decided here, by the leader's clock, and not when `node.joined`
        // applies: every node must reach the same result there.
        if let Some(token) = &request.token
            && state
                .tokens
                .get(token)
                .is_some_and(|record| record.used_by.is_none() && record.expired(now_ms()))
        {
            return JoinReply::refused(
                Refusal::Other,
                "the join token has expired; ask for a new one with `hivemind members token`",
            );
        }
        if let Err(error) = request.address.transport.parse::<std::net::SocketAddr>() {
            return JoinReply::refused(
                Refusal::Other,
                format!(
                    "the joiner's transport address {:?} is not ip:port ({error})",
                    request.address.transport
                ),
            );
        }
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        let listed = membership.get_node(&request.id).is_some();
        // Checked again when `node.joined` applies; here it also covers
        // members whose records predate names in them.
        if let Some(reason) = join::name_taken_by(
            &request.address.name,
            request.id,
            membership.nodes().map(|(id, node)| (*id, node.name.as_str())),
        ) {
            return JoinReply::refused(Refusal::Other, reason);
        }
        if let Some(epoch) = request.epoch
            && epoch < state.epoch
            && !listed
        {
            return JoinReply::refused(
                Refusal::StaleEpoch,
                format!(
                    "stale epoch: the joining node's data is from epoch {epoch}, the cluster is at epoch {} and no \
                     longer lists it; it must drop its cluster state and catch up from a snapshot",
                    state.epoch
                ),
            );
        }
        if !listed {
            let command = Command::NodeJoined {
                id: request.id,
                address: request.address.clone(),
                token: request.token.clone(),
                timestamp_ms: now_ms(),
            };
            match self.write(command, WRITE_TIMEOUT).await {
                Ok(CommandResult::Refused { reason }) => return JoinReply::refused(Refusal::Other, reason),
                Ok(_) => {}
                Err(error) => return JoinReply::refused(Refusal::NotReady, error.to_string()),
            }
            match tokio::time::timeout(
                MEMBERSHIP_TIMEOUT,
                self.raft().add_learner(request.id, request.address.clone(), false),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return JoinReply::refused(Refusal::NotReady, format!("adding the learner: {error}")),
                Err(_) => return JoinReply::refused(Refusal::NotReady, "adding the learner timed out; try again"),
            }
            tracing::info!(node = %request.address, id = %hex_id(request.id), "admitted a node as learner");
        }
        let epoch = self.cluster_state().epoch;
        match self.admission(request.id, epoch, &key, &binding) {
            Ok(admission) => JoinReply::Admitted(Box::new(admission)),
            Err(reply) => reply,
        }
    }

    /// Applies `change` on the leader (forwarded there from any node).
    pub async fn change_member(&self, change: MemberChange) -> Result<String, LogError> {
        match self.leader() {
            Some((leader, _)) if leader == self.id => self.change_as_leader(change).await,
            Some((_, node)) => self
                .pool
                .call::<_, Result<String, String>>(&node.transport, network::FORWARD_ADMIN, &change, MEMBERSHIP_TIMEOUT)
                .await
                .map_err(|error| LogError::Unavailable(format!("the leader could not be asked: {error}")))?
                .map_err(LogError::Unavailable),
            None => Err(LogError::Unavailable(
                "the cluster has no leader right now (is a quorum of voters up?)".into(),
            )),
        }
    }

    async fn change_as_leader(&self, change: MemberChange) -> Result<String, LogError> {
        use openraft::ChangeMembers;
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let name_of = |id: NodeId| {
            membership
                .get_node(&id)
                .map(|node| format!("{} ({})", node.name, hex_id(id)))
                .unwrap_or_else(|| hex_id(id))
        };
        let (target, changes, retain, done) = match change {
            MemberChange::Promote(id) => {
                if voters.contains(&id) {
                    return Ok(format!("{} is already a voter", name_of(id)));
                }
                if membership.get_node(&id).is_none() {
                    return Err(LogError::Invalid(format!("no member {}", hex_id(id))));
                }
                (id, ChangeMembers::AddVoterIds([id].into()), true, "is now a voter")
            }
            MemberChange::Demote(id) => {
                if !voters.contains(&id) {
                    return Err(LogError::Invalid(format!("{} is not a voter", name_of(id))));
                }
                if voters.len() == 1 {
                    return Err(LogError::Invalid(format!(
                        "{} is the only voter; promote another member first",
                        name_of(id)
                    )));
                }
                (id, ChangeMembers::RemoveVoters([id].into()), true, "is now a learner")
            }
            MemberChange::Remove(id) => {
                if membership.get_node(&id).is_none() {
                    return Err(LogError::Invalid(format!("no member {}", hex_id(id))));
                }
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(LogError::Invalid(format!(
                            "{} is the only voter; it cannot be removed",
                            name_of(id)
                        )));
                    }
                    (id, ChangeMembers::RemoveVoters([id].into()), false, "was removed")
                } else {
                    (id, ChangeMembers::RemoveNodes([id].into()), false, "was removed")
                }
            }
        };
        let name = name_of(target);
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, self.raft().change_membership(changes, retain)).await {
            Err(_) => {
                return Err(LogError::Unavailable(format!(
                    "the membership change was not committed within {} s: {}",
                    MEMBERSHIP_TIMEOUT.as_secs(),
                    self.no_quorum(MEMBERSHIP_TIMEOUT)
                )));
            }
            Ok(Err(error)) => return Err(LogError::Unavailable(format!("the membership change failed: {error}"))),
            Ok(Ok(_)) => {}
        }
        let epoch = self.cluster_state().epoch;
        self.compact_after_epoch_change().await;
        Ok(format!("{name} {done}; the cluster is at epoch {epoch}"))
    }

    /// After the voter set changed, snapshots and purges the log, so that a
    /// node still at an older epoch catches up from a snapshot of the
    /// current state rather than by replaying the old epoch's entries.
    async fn compact_after_epoch_change(&self) {
        let applied = self.raft().metrics().borrow().last_applied;
        if self.raft().trigger().snapshot().await.is_err() {
            return;
        }
        let built = self
            .raft()
            .wait(Some(MEMBERSHIP_TIMEOUT))
            .metrics(|metrics| metrics.snapshot >= applied, "snapshot after the epoch change")
            .await;
        if let Ok(metrics) = built
            && let Some(snapshot) = metrics.snapshot
        {
            let _ = self.raft().trigger().purge_log(snapshot.index).await;
        }
    }

    /// A health ping from another member.
    async fn pong(&self, ping: Ping) -> Pong {
        let member = self
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&ping.from)
            .is_some();
        let leader = self.raft().metrics().borrow().current_leader == Some(self.id);
        Pong {
            id: self.id,
            epoch: self.cluster_state().epoch,
            member,
            leader,
            log_stopped: self.core_problem(),
            clock_ms: now_ms(),
        }
    }

    /// The current snapshot, fresh, on the leader.
    async fn snapshot_for_peer(&self) -> Result<FetchedSnapshot, String> {
        let metrics = self.raft().metrics().borrow().clone();
        if metrics.current_leader != Some(self.id) {
            return Err("not the leader".into());
        }
        self.raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|error| error.to_string())?;
        self.raft()
            .wait(Some(MEMBERSHIP_TIMEOUT))
            .metrics(
                |now| now.snapshot >= metrics.last_applied,
                "a snapshot of everything applied",
            )
            .await
            .map_err(|error| error.to_string())?;
        let snapshot = self
            .raft()
            .get_snapshot()
            .await
            .map_err(|error| error.to_string())?
            .ok_or("no snapshot")?;
        Ok(FetchedSnapshot {
            vote: self.raft().metrics().borrow().vote,
            meta: snapshot.meta,
            data: String::from_utf8(snapshot.snapshot.into_inner()).map_err(|error| error.to_string())?,
        })
    }

    /// Before this node serves its transport: if the members it knows are at
    /// a later epoch (the voter set changed while it was down), installs the
    /// leader's snapshot instead of replaying the old epoch's log.
    pub async fn resync_if_stale(&self) {
        let ours = self.cluster_state().epoch;
        let peers: Vec<(NodeId, NodeAddress)> = {
            let metrics = self.raft().metrics().borrow().clone();
            metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, node)| (*id, node.clone()))
                .collect()
        };
        if peers.is_empty() {
            return;
        }
        let ping = Ping { from: self.id };
        for (_, node) in &peers {
            let Ok(pong) = self
                .pool
                .call::<_, Pong>(&node.transport, network::PING, &ping, Duration::from_secs(1))
                .await
            else {
                continue;
            };
            if !(pong.leader && pong.member && pong.epoch > ours) {
                continue;
            }
            tracing::info!(
                ours,
                cluster = pong.epoch,
                leader = %node,
                "this node's data is from an older epoch; installing the leader's snapshot"
            );
            let fetched: Result<FetchedSnapshot, _> = self
                .pool
                .call(&node.transport, network::FETCH_SNAPSHOT, &ping, MEMBERSHIP_TIMEOUT)
                .await;
            match fetched {
                Ok(fetched) => {
                    let snapshot = openraft::storage::Snapshot {
                        meta: fetched.meta,
                        snapshot: Box::new(Cursor::new(fetched.data.into_bytes())),
                    };
                    match self.raft().install_full_snapshot(fetched.vote, snapshot).await {
                        Ok(_) => tracing::info!("installed the leader's snapshot"),
                        Err(error) => tracing::warn!(%error, "installing the leader's snapshot"),
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "could not fetch the leader's snapshot; catching up from its log instead")
                }
            }
            return;
        }
    }

    /// Whether this node reaches a majority of the voters (itself
    /// included): without that, nothing it proposes can commit.
    pub fn has_quorum(&self) -> bool {
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let reachable = voters
            .iter()
            .filter(|id| **id == self.id || self.health.voting(**id))
            .count();
        reachable * 2 > voters.len()
    }

    fn missing_voters(&self) -> Vec<String> {
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        membership
            .voter_ids()
            .filter(|id| *id != self.id && !self.health.voting(*id))
            .map(|id| {
                let who = match membership.get_node(&id) {
                    Some(node) => format!("{} ({})", node.name, hex_id(id)),
                    None => hex_id(id),
                };
                match self.health.log_stopped(id) {
                    Some(_) if self.health.reachable(id) => format!("{who}: its log stopped"),
                    _ => who,
                }
            })
            .collect()
    }

    /// Term, leader and indexes for metrics, without touching the store.
    pub fn gauges(&self) -> LogGauges {
        let metrics = self.raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        LogGauges {
            term: metrics.current_term,
            is_leader: metrics.current_leader == Some(self.id),
            has_leader: metrics.current_leader.is_some(),
            last_index: metrics.last_log_index.unwrap_or(0),
            // Applied implies committed; after a restart the store hears of
            // commits only from the next one on.
            committed: self
                .rebuild
                .kept
                .committed
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0)),
            applied: metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0),
            reachable_voters: voters
                .iter()
                .filter(|id| **id == self.id || self.health.voting(**id))
                .count(),
            core_running: self.core_health.running(),
            core_restarts: self.core_health.restarts(),
            clock_offset_max_ms: self.health.clock_offset_max_ms(),
            voters: voters.len(),
        }
    }

    /// Leader, term, members and health as this node sees them (node ids
    /// in hex, as everywhere users see them).
    pub async fn status(&self) -> QuorumStatus {
        let metrics = self.raft().metrics().borrow().clone();
        let state = self.cluster_state();
        let membership = metrics.membership_config.membership();
        let voter_ids: Vec<NodeId> = membership.voter_ids().collect();
        let members: Vec<MemberStatus> = membership
            .nodes()
            .map(|(id, node)| MemberStatus {
                id: hex_id(*id),
                name: node.name.clone(),
                transport: node.transport.clone(),
                api: node.api.clone(),
                role: if voter_ids.contains(id) { "voter" } else { "learner" },
                reachable: *id == self.id || self.health.reachable(*id),
                joined_epoch: state
                    .members
                    .get(id)
                    .map(|member| member.joined_epoch)
                    .unwrap_or_default(),
                leader: metrics.current_leader == Some(*id),
                is_self: *id == self.id,
                log_stopped: if *id == self.id {
                    self.core_problem()
                } else {
                    self.health.log_stopped(*id)
                },
                clock_offset_ms: (*id != self.id).then(|| self.health.clock_offset_ms(*id)).flatten(),
            })
            .collect();
        let reachable_voters = members
            .iter()
            .filter(|member| member.role == "voter" && member.reachable && member.log_stopped.is_none())
            .count();
        let missing_voters = self.missing_voters();
        let problem = if let Some(stopped) = self.core_problem() {
            Some(stopped)
        } else if let Some(epoch) = self.health.removed_at_epoch() {
            Some(format!(
                "this node was removed from the cluster (the cluster is at epoch {epoch}); to join again, move its \
                 data directory away and start it with --join"
            ))
        } else if voter_ids.is_empty() {
            Some("this node is not in a cluster yet: it waits to be added by the leader".to_string())
        } else if reachable_voters <= voter_ids.len() / 2 {
            Some(format!(
                "no quorum: {reachable_voters} of {} voters reachable; unreachable: {}",
                voter_ids.len(),
                missing_voters.join(", ")
            ))
        } else if metrics.current_leader.is_none() {
            Some("no leader: an election is under way".to_string())
        } else {
            None
        };
        QuorumStatus {
            cluster_id: self.cluster_id.clone(),
            epoch: state.epoch,
            health: if problem.is_some() { "degraded" } else { "healthy" },
            problem,
            leader: metrics.current_leader.map(hex_id),
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0),
            snapshot: metrics.snapshot.map(|log_id| log_id.index),
            voters: voter_ids.into_iter().map(hex_id).collect(),
            missing_voters,
            members,
        }
    }

    pub async fn shutdown(&self) {
        if let Err(error) = self.raft().shutdown().await {
            tracing::warn!(%error, "raft did not shut down cleanly");
        }
    }
}

pub(crate) fn now_ms() -> u64 {
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
        match self.write(command, WRITE_TIMEOUT).await? {
            CommandResult::Event { seq } => Ok(seq),
            other => Err(LogError::Unavailable(format!("the log answered {other:?} to an event"))),
        }
    }

    async fn since(&self, after: u64, kind_prefix: &str, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        // The local copy lags the cluster by every event since the stop,
        // including the ones this node forwarded and acknowledged.
        if let Some(stopped) = self.core_problem() {
            return Err(LogError::Unavailable(format!(
                "{stopped}; this node's copy of the log is stale, so read the events from another node"
            )));
        }
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
    use crate::transport::{ClusterCa, Isolation, TransportCounters, serve};
    use tokio_util::sync::CancellationToken;

    struct TestNode {
        id: NodeId,
        log: Arc<QuorumLog>,
        isolation: Isolation,
        shutdown: CancellationToken,
        _dir: tempfile::TempDir,
    }

    impl TestNode {
        /// Stops its transport server and its Raft.
        async fn stop(self) {
            self.shutdown.cancel();
            self.log.shutdown().await;
        }
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
            let identity = ca.issue(&hex_id(id)).unwrap();
            let isolation = Isolation::default();
            let files = join::ClusterFiles {
                cluster_id: "test".into(),
                ca: ClusterCa::from_pem(ca.cert_pem(), &ca.key_pem(), "test").unwrap(),
                identity: identity.clone(),
            };
            let log = QuorumLog::start(QuorumSetup {
                store,
                id,
                address: members[&id].clone(),
                timing: timing.clone(),
                files,
                formation: Formation::Wait,
                isolation: isolation.clone(),
            })
            .await
            .unwrap();
            let shutdown = CancellationToken::new();
            tokio::spawn(serve(
                listener,
                identity.acceptor().unwrap(),
                Arc::new(frames::ClusterFrames {
                    log: log.clone(),
                    roles: Default::default(),
                }),
                Arc::new(TransportCounters::default()),
                isolation.clone(),
                shutdown.clone(),
            ));
            tokio::spawn(log.clone().watch_peers(shutdown.clone()));
            nodes.push(TestNode {
                id,
                log,
                isolation,
                shutdown,
                _dir: dir,
            });
        }
        nodes[0].log.raft().initialize(members).await.unwrap();
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
        old.stop().await;

        let new_leader = leader_of(&nodes, Some(leader)).await;
        let survivor = nodes.iter().find(|node| node.id == new_leader).unwrap();
        acknowledged.push((survivor.log.append(event("d")).await.unwrap(), "d".to_string()));
        for node in &nodes {
            assert_eq!(wait_for_events(node, 4).await, acknowledged, "node {}", node.id);
        }
        for node in nodes {
            node.stop().await;
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
            node.stop().await;
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

    /// The leader is cut off (its transport drops everything, both ways):
    /// it refuses writes with a clear error within the write timeout and
    /// reports itself degraded, naming the voters it cannot reach; the other
    /// two elect a leader and carry on; once healed, the cut-off node has
    /// exactly the majority's events, not its own refused write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_isolated_leader_refuses_writes_while_the_majority_carries_on() {
        let nodes = three_nodes().await;
        let leader = leader_of(&nodes, None).await;
        let cut = nodes.iter().find(|node| node.id == leader).unwrap();
        let mut acknowledged = vec![(cut.log.append(event("before")).await.unwrap(), "before".to_string())];
        for node in &nodes {
            wait_for_events(node, 1).await;
        }

        cut.isolation.set(true);
        let started = tokio::time::Instant::now();
        let error = cut.log.append(event("minority")).await.unwrap_err();
        assert!(started.elapsed() < WRITE_TIMEOUT + Duration::from_secs(1), "fails fast");
        assert!(error.to_string().contains("not committed"), "{error}");
        let majority: Vec<&TestNode> = nodes.iter().filter(|node| node.id != leader).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let new_leader = loop {
            let seen = majority[0].log.raft().metrics().borrow().current_leader;
            if let Some(seen) = seen
                && seen != leader
                && majority[1].log.raft().metrics().borrow().current_leader == Some(seen)
            {
                break seen;
            }
            assert!(tokio::time::Instant::now() < deadline, "the majority elected no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let writer = majority.iter().find(|node| node.id == new_leader).unwrap();
        acknowledged.push((
            writer.log.append(event("majority")).await.unwrap(),
            "majority".to_string(),
        ));
        let status = cut.log.status().await;
        assert_eq!(status.health, "degraded", "{status:?}");
        assert_eq!(status.missing_voters.len(), 2, "{status:?}");

        cut.isolation.set(false);
        for node in &nodes {
            assert_eq!(wait_for_events(node, 2).await, acknowledged, "node {}", node.id);
        }
        for node in nodes {
            node.stop().await;
        }
    }

    /// A vote request from a node that is not a member (one removed from
    /// the cluster, still campaigning) is refused, not counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_non_member_gets_no_vote() {
        let nodes = three_nodes().await;
        leader_of(&nodes, None).await;
        let target = nodes[1]
            .log
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&2)
            .cloned();
        let request = openraft::raft::VoteRequest::new(openraft::Vote::new(1000, 99), None);
        let answer = nodes[0]
            .log
            .pool
            .request(
                &target.unwrap().transport,
                network::VOTE,
                &serde_json::to_vec(&request).unwrap(),
                Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(answer, Err(PeerError::Refused(ref reason)) if reason.contains("not a member")),
            "{answer:?}"
        );
        assert!(
            nodes[1].log.raft().metrics().borrow().current_term < 1000,
            "the request left no trace"
        );
        for node in nodes {
            node.stop().await;
        }
    }
}
