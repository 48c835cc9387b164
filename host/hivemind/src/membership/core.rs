//! The gossip protocol core: foca, its timers and the packet seal, with no
//! sockets and no clock of its own.
//!
//! The caller owns time (`now`, a duration since any fixed origin) and the
//! network: it feeds received packets to [`GossipCore::handle_packet`],
//! fires timers when [`GossipCore::next_deadline`] passes, and sends what
//! [`GossipCore::take_outgoing`] returns. The daemon's driver does this
//! over UDP with tokio's clock; the simulation does it for a thousand nodes
//! in one process over a lossy simulated network.
//!
//! Timers live in one ordered queue and fire in deadline order: foca
//! requires it (out-of-order timers make it report errors).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{AccumulatingRuntime, Config, Foca, OwnedNotification, PeriodicParams, PostcardCodec, State, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::identity::GossipId;
use super::metadata::{MetadataBook, NodeMetadata};
use super::seal::{SEAL_OVERHEAD, Sealer};
use crate::quorum::NodeId;

/// Largest UDP datagram gossip sends or accepts: under a 1500-byte MTU with
/// room for IP and UDP headers, so packets are never fragmented.
pub const MAX_PACKET_BYTES: usize = 1400;

/// Our own metadata is re-announced at most this often when new members
/// appear, so a late joiner learns it without a storm at start-up.
const REPUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Timing of the failure detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipPreset {
    /// For a LAN: a dead node is agreed down within about 3 s in a small
    /// cluster, and suspicion grows with the log of the cluster size so
    /// large clusters do not flap.
    Lan,
    /// For tests on loopback: everything about 2.5 times faster.
    Fast,
}

impl GossipPreset {
    pub fn parse(text: &str) -> Option<GossipPreset> {
        match text {
            "lan" => Some(GossipPreset::Lan),
            "fast" => Some(GossipPreset::Fast),
            _ => None,
        }
    }

    fn probe_period(self) -> Duration {
        match self {
            GossipPreset::Lan => Duration::from_millis(500),
            GossipPreset::Fast => Duration::from_millis(200),
        }
    }

    /// foca's settings for a cluster of about `members` nodes.
    pub fn config(self, members: usize) -> Config {
        let period = self.probe_period();
        // memberlist's rules: suspicion and retransmissions grow with
        // log10 of the cluster size. Its LAN multiplier is 4 with a 1 s
        // period; 3 with a 0.5 s period detects faster at the same safety
        // against 5% loss (see the simulation test).
        let scale = (members.max(1) as f64).log10().max(1.0);
        let suspicion = period.mul_f64(3.0 * scale);
        let max_transmissions = ((members as f64 + 1.0).log10() * 4.0).ceil().clamp(4.0, 255.0) as u8;
        let (gossip_every, down_announce_every) = match self {
            GossipPreset::Lan => (Duration::from_millis(200), Duration::from_secs(10)),
            GossipPreset::Fast => (Duration::from_millis(80), Duration::from_secs(2)),
        };
        Config {
            probe_period: period,
            probe_rtt: period.mul_f64(0.4),
            num_indirect_probes: NonZeroUsize::new(3).unwrap(),
            max_transmissions: NonZeroU8::new(max_transmissions).unwrap(),
            suspect_to_down_after: suspicion,
            remove_down_after: Some(Duration::from_secs(24 * 3600)),
            max_packet_size: NonZeroUsize::new(MAX_PACKET_BYTES - SEAL_OVERHEAD).unwrap(),
            notify_down_members: true,
            periodic_announce: Some(PeriodicParams {
                frequency: Duration::from_secs(30),
                num_members: NonZeroUsize::new(1).unwrap(),
            }),
            periodic_announce_to_down_members: Some(PeriodicParams {
                frequency: down_announce_every,
                num_members: NonZeroUsize::new(2).unwrap(),
            }),
            periodic_gossip: Some(PeriodicParams {
                frequency: gossip_every,
                num_members: NonZeroUsize::new(3).unwrap(),
            }),
        }
    }
}

/// A member's liveness as this node's gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Alive,
    Suspect,
    Down,
}

/// One member in this node's gossip view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipMember {
    pub id: GossipId,
    pub liveness: Liveness,
}

/// Datagrams this node sent and received, and those it dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipCounters {
    pub sent: u64,
    pub received: u64,
    /// Failed to open under the cluster key (another cluster, forged, torn).
    pub rejected: u64,
    /// Opened, but foca refused it (malformed, from a stale identity, ...).
    pub refused: u64,
}

type FocaInstance = Foca<GossipId, PostcardCodec, StdRng, MetadataBook>;

pub struct GossipCore {
    foca: FocaInstance,
    runtime: AccumulatingRuntime<GossipId>,
    sealer: Sealer,
    preset: GossipPreset,
    sized_for: usize,
    book: MetadataBook,
    timers: BTreeMap<(Duration, u64), Timer<GossipId>>,
    timer_seq: u64,
    now: Duration,
    outgoing: Vec<(SocketAddr, Vec<u8>)>,
    metadata: NodeMetadata,
    republish_due: bool,
    last_republish: Option<Duration>,
    /// Bumped whenever the view or a node's metadata changes.
    changes: u64,
    counters: GossipCounters,
}

impl GossipCore {
    /// A node that knows no one yet. `seed` makes its random choices
    /// reproducible (the simulation); the daemon passes a random one.
    pub fn new(id: GossipId, metadata: NodeMetadata, sealer: Sealer, preset: GossipPreset, seed: u64) -> GossipCore {
        let sized_for = 8;
        let book = MetadataBook::default();
        let foca = Foca::with_custom_broadcast(
            id,
            preset.config(sized_for),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
            book.clone(),
        );
        let mut core = GossipCore {
            foca,
            runtime: AccumulatingRuntime::new(),
            sealer,
            preset,
            sized_for,
            book,
            timers: BTreeMap::new(),
            timer_seq: 0,
            now: Duration::ZERO,
            outgoing: Vec::new(),
            metadata,
            republish_due: true,
            last_republish: None,
            changes: 0,
            counters: GossipCounters::default(),
        };
        core.metadata.generation = core.foca.identity().generation;
        core.publish_metadata();
        core
    }

    pub fn identity(&self) -> &GossipId {
        self.foca.identity()
    }

    /// Asks the node at `addr` (believed to be `node`) to let us in.
    pub fn announce(&mut self, node: NodeId, addr: SocketAddr, now: Duration) {
        self.now = now;
        let result = self.foca.announce(GossipId::placeholder(node, addr), &mut self.runtime);
        self.after_step(result);
    }

    /// A datagram from the network.
    pub fn handle_packet(&mut self, packet: &[u8], now: Duration) {
        self.now = now;
        self.counters.received += 1;
        let Ok(plain) = self.sealer.open(packet) else {
            self.counters.rejected += 1;
            return;
        };
        let result = self.foca.handle_data(&plain, &mut self.runtime);
        if result.is_err() {
            self.counters.refused += 1;
        }
        self.after_step(result);
    }

    /// When the next timer is due, if any.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.timers.keys().next().map(|(deadline, _)| *deadline)
    }

    /// Fires every timer due by `now`, oldest first.
    pub fn handle_timers(&mut self, now: Duration) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((deadline, _), timer) = entry.remove_entry();
            self.now = deadline.max(self.now);
            let result = self.foca.handle_timer(timer, &mut self.runtime);
            self.after_step(result);
        }
        self.now = now.max(self.now);
        self.maybe_republish();
    }

    /// Changes what this node announces about itself (addresses stay).
    pub fn set_roles_and_epoch(&mut self, roles: Vec<(String, String)>, epoch: u64) {
        if self.metadata.roles == roles && self.metadata.epoch == epoch {
            return;
        }
        self.metadata.roles = roles;
        self.metadata.epoch = epoch;
        self.metadata.version += 1;
        self.publish_metadata();
    }

    /// Re-tunes suspicion and retransmissions for a cluster of `members`.
    pub fn size_for(&mut self, members: usize) {
        let members = members.max(1);
        if members == self.sized_for {
            return;
        }
        self.sized_for = members;
        if let Err(error) = self.foca.set_config(self.preset.config(members)) {
            tracing::warn!(%error, "gossip: cannot re-tune for {members} members");
        }
    }

    /// Tells a few members we are leaving, then stops answering.
    pub fn leave(&mut self, now: Duration) {
        self.now = now;
        let result = self.foca.leave_cluster(&mut self.runtime);
        self.after_step(result);
    }

    /// Datagrams to send: (destination, sealed packet).
    pub fn take_outgoing(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.outgoing)
    }

    /// Every member this node knows of (not itself), with its liveness.
    pub fn members(&self) -> Vec<GossipMember> {
        self.foca
            .iter_membership_state()
            .map(|member| GossipMember {
                id: member.id().clone(),
                liveness: match member.state() {
                    State::Alive => Liveness::Alive,
                    State::Suspect => Liveness::Suspect,
                    State::Down => Liveness::Down,
                },
            })
            .collect()
    }

    /// The newest metadata known for `node` (ours included).
    pub fn metadata(&self, node: NodeId) -> Option<NodeMetadata> {
        if node == self.metadata.node {
            return Some(self.metadata.clone());
        }
        self.book.read().get(node).cloned()
    }

    /// Members gossip holds alive or suspect (not itself).
    pub fn active_members(&self) -> usize {
        self.foca.num_members()
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn counters(&self) -> GossipCounters {
        self.counters
    }

    fn publish_metadata(&mut self) {
        let bytes = self.metadata.encode();
        if let Err(error) = self.foca.add_broadcast(&bytes) {
            tracing::warn!(%error, "gossip: cannot announce this node's metadata");
        }
        self.last_republish = Some(self.now);
        self.republish_due = false;
        self.changes += 1;
    }

    fn maybe_republish(&mut self) {
        let recently = self
            .last_republish
            .is_some_and(|last| self.now.saturating_sub(last) < REPUBLISH_EVERY);
        if self.republish_due && !recently {
            self.publish_metadata();
        }
    }

    fn after_step(&mut self, result: Result<(), foca::Error>) {
        if let Err(error) = result {
            tracing::trace!(%error, "gossip: foca refused an input");
        }
        while let Some((to, data)) = self.runtime.to_send() {
            self.counters.sent += 1;
            self.outgoing.push((to.addr, self.sealer.seal(&data)));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.insert((self.now + after, self.timer_seq), timer);
        }
        while let Some(notification) = self.runtime.to_notify() {
            self.changes += 1;
            match notification {
                OwnedNotification::MemberUp(_) => self.republish_due = true,
                OwnedNotification::Rejoin(id) => {
                    // We were declared down and came back under a new
                    // generation: our metadata follows it.
                    self.metadata.generation = id.generation;
                    self.metadata.version = 0;
                    self.republish_due = true;
                }
                _ => {}
            }
        }
        if std::mem::take(&mut self.book.read().changed) {
            self.changes += 1;
        }
        self.maybe_republish();
    }
}
