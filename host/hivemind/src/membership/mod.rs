//! Membership: SWIM gossip (foca) over UDP, sealed with the cluster key.
//!
//! Gossip only *suspects*: it says which members answer, and carries each
//! node's metadata (addresses, roles and their versions, epoch). Whether a
//! member has failed, rejoined or left is *decided* by the leader and
//! committed to the log ([`decider`]); the registry combines both.
//!
//! # Layout
//! - `identity`: node id + gossip address + generation.
//! - `metadata`: what each node announces about itself.
//! - `seal`: the AEAD around every packet.
//! - `core`: foca, its timers and the seal, without sockets or clock.
//! - `decider`: from gossip's view to `node.failed` / `node.rejoined`.
//! - `simulation`: many cores over a simulated lossy network.
//! - this file: the one tokio task that drives a core over a UDP socket.
//!
//! Gossip listens on UDP at the transport's address and port (as Consul's
//! LAN gossip shares its port between TCP and UDP), so a member's gossip
//! address follows from the address the log already holds for it.

pub mod core;
pub mod decider;
pub mod identity;
pub mod metadata;
pub mod seal;
pub mod simulation;
pub mod upkeep;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::core::{GossipCore, GossipCounters, GossipMember, GossipPreset, Liveness};
pub use identity::GossipId;
pub use metadata::NodeMetadata;
pub use seal::Sealer;

use crate::quorum::NodeId;
use crate::transport::Isolation;

/// How often members the log lists but gossip does not hold alive are
/// asked to let this node in; also how often the published view is
/// refreshed (suspicions are not notified by foca).
const SEED_EVERY: Duration = Duration::from_secs(1);

/// What this node's gossip sees, published after every change.
#[derive(Debug, Clone, Default)]
pub struct GossipView {
    pub me: Option<GossipId>,
    pub members: Vec<GossipMember>,
    /// Newest metadata per node, this node's included.
    pub metadata: HashMap<NodeId, NodeMetadata>,
    pub counters: GossipCounters,
}

impl GossipView {
    /// How many members are `liveness`.
    pub fn count(&self, liveness: Liveness) -> usize {
        self.members.iter().filter(|member| member.liveness == liveness).count()
    }

    /// Liveness and generation per node, as the decider wants them.
    pub fn liveness(&self) -> HashMap<NodeId, (Liveness, u64)> {
        liveness_of(&self.members)
    }
}

/// Liveness and generation per node of `members`.
pub fn liveness_of(members: &[GossipMember]) -> HashMap<NodeId, (Liveness, u64)> {
    members
        .iter()
        .map(|member| (member.id.node, (member.liveness, member.id.generation)))
        .collect()
}

/// The UDP address gossip reaches a node at, from its transport address
/// (`ip:port`, or `name:port` resolved once here).
pub async fn gossip_address(transport: &str) -> Option<SocketAddr> {
    if let Ok(addr) = transport.parse() {
        return Some(addr);
    }
    tokio::net::lookup_host(transport).await.ok()?.next()
}

enum Input {
    Seeds(Vec<(NodeId, SocketAddr)>),
    Roles { roles: Vec<(String, String)>, epoch: u64 },
    Size(usize),
    Leave(oneshot::Sender<()>),
}

/// What a gossip task starts from.
pub struct GossipSetup {
    /// UDP address to bind.
    pub bind: SocketAddr,
    /// Address the others send to; port 0 means the bound port.
    pub advertise: SocketAddr,
    pub generation: u64,
    pub metadata: NodeMetadata,
    pub sealer: Sealer,
    pub preset: GossipPreset,
    pub isolation: Isolation,
}

/// The handle to a running gossip task.
#[derive(Clone)]
pub struct Membership {
    inputs: mpsc::UnboundedSender<Input>,
    view: watch::Receiver<Arc<GossipView>>,
    leaving: Arc<std::sync::atomic::AtomicBool>,
    pub local_addr: SocketAddr,
}

impl Membership {
    /// Binds `setup.bind` (UDP) and starts gossiping as `setup.metadata.node`.
    pub async fn start(
        setup: GossipSetup,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Membership, tokio::task::JoinHandle<()>)> {
        let GossipSetup {
            bind,
            advertise,
            generation,
            metadata,
            sealer,
            preset,
            isolation,
        } = setup;
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|error| anyhow::anyhow!("cannot bind UDP {bind} for gossip: {error}"))?;
        let local_addr = socket.local_addr()?;
        let advertise = if advertise.port() == 0 {
            SocketAddr::new(advertise.ip(), local_addr.port())
        } else {
            advertise
        };
        let id = GossipId {
            node: metadata.node,
            addr: advertise,
            generation,
        };
        let core = GossipCore::new(id, metadata, sealer, preset, rand::random());
        let (inputs, receiver) = mpsc::unbounded_channel();
        let (publish, view) = watch::channel(Arc::new(GossipView::default()));
        let driver = Driver {
            core,
            socket,
            origin: Instant::now(),
            seeds: Vec::new(),
            publish,
            published_at: u64::MAX,
            isolation,
        };
        let task = tokio::spawn(driver.run(receiver, shutdown));
        Ok((
            Membership {
                inputs,
                view,
                leaving: Default::default(),
                local_addr,
            },
            task,
        ))
    }

    /// The members the log lists, to be announced to until gossip holds
    /// them alive.
    pub fn set_seeds(&self, seeds: Vec<(NodeId, SocketAddr)>) {
        let _ = self.inputs.send(Input::Seeds(seeds));
    }

    /// The roles this node runs (name, version) and its epoch.
    pub fn set_roles(&self, roles: Vec<(String, String)>, epoch: u64) {
        let _ = self.inputs.send(Input::Roles { roles, epoch });
    }

    /// Re-tunes the failure detector for a cluster of `members`.
    pub fn size_for(&self, members: usize) {
        let _ = self.inputs.send(Input::Size(members));
    }

    /// Marks this node as on its way out: from now on it no longer asks to
    /// be recorded alive again (its own `node.left` must stand).
    pub fn mark_leaving(&self) {
        self.leaving.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tells the cluster this node is leaving; returns once the goodbye is
    /// sent (or the task is gone).
    pub async fn leave(&self) {
        let (done, wait) = oneshot::channel();
        if self.inputs.send(Input::Leave(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }

    pub fn view(&self) -> Arc<GossipView> {
        self.view.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Arc<GossipView>> {
        self.view.clone()
    }
}

struct Driver {
    core: GossipCore,
    socket: UdpSocket,
    origin: Instant,
    seeds: Vec<(NodeId, SocketAddr)>,
    publish: watch::Sender<Arc<GossipView>>,
    published_at: u64,
    isolation: Isolation,
}

impl Driver {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>, shutdown: CancellationToken) {
        let mut buffer = vec![0u8; core::MAX_PACKET_BYTES + 1];
        let mut seed_tick = tokio::time::interval(SEED_EVERY);
        seed_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.core.next_deadline().map(|deadline| self.origin + deadline);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                received = self.socket.recv_from(&mut buffer) => match received {
                    Ok((length, _from)) if !self.isolation.is_on() => {
                        let now = self.now();
                        // A datagram longer than any we send is not ours.
                        if length <= core::MAX_PACKET_BYTES {
                            self.core.handle_packet(&buffer[..length], now);
                        } else {
                            self.core.handle_packet(&[], now);
                        }
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "gossip: receive failed"),
                },
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    self.core.handle_timers(now);
                }
                input = inputs.recv() => match input {
                    None => break,
                    // Sent on every registry refresh; only new seeds are
                    // announced to at once, the rest wait for the tick.
                    Some(Input::Seeds(seeds)) if seeds != self.seeds => {
                        self.seeds = seeds;
                        self.announce_to_missing();
                    }
                    Some(Input::Seeds(_)) => {}
                    Some(Input::Roles { roles, epoch }) => self.core.set_roles_and_epoch(roles, epoch),
                    Some(Input::Size(members)) => self.core.size_for(members),
                    Some(Input::Leave(done)) => {
                        let now = self.now();
                        self.core.leave(now);
                        self.send_outgoing().await;
                        let _ = done.send(());
                        break;
                    }
                },
                _ = seed_tick.tick() => {
                    self.announce_to_missing();
                    self.published_at = u64::MAX;
                }
            }
            self.send_outgoing().await;
            self.publish_if_changed();
        }
    }

    /// Announces to every seed gossip does not hold alive or suspect.
    fn announce_to_missing(&mut self) {
        let me = self.core.identity().node;
        let active: Vec<NodeId> = self
            .core
            .members()
            .into_iter()
            .filter(|member| member.liveness != Liveness::Down)
            .map(|member| member.id.node)
            .collect();
        let now = self.now();
        for (node, addr) in self.seeds.clone() {
            if node != me && !active.contains(&node) {
                self.core.announce(node, addr, now);
            }
        }
    }

    async fn send_outgoing(&mut self) {
        let outgoing = self.core.take_outgoing();
        if self.isolation.is_on() {
            return;
        }
        for (to, packet) in outgoing {
            if let Err(error) = self.socket.send_to(&packet, to).await {
                tracing::debug!(%to, %error, "gossip: send failed");
            }
        }
    }

    fn publish_if_changed(&mut self) {
        if self.core.changes() == self.published_at {
            return;
        }
        self.published_at = self.core.changes();
        let members = self.core.members();
        let me = self.core.identity().clone();
        let mut metadata = HashMap::new();
        for node in members.iter().map(|member| member.id.node).chain([me.node]) {
            if let Some(known) = self.core.metadata(node) {
                metadata.insert(node, known);
            }
        }
        let view = GossipView {
            me: Some(me),
            members,
            metadata,
            counters: self.core.counters(),
        };
        // Counters move with every packet: they are refreshed in place
        // without waking watchers, which only care about membership.
        self.publish.send_if_modified(|current| {
            let changed = current.members != view.members || current.metadata != view.metadata || current.me != view.me;
            *current = Arc::new(view);
            changed
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
