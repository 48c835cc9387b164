//! A deterministic simulation of gossip: many [`GossipCore`]s in one
//! process over a simulated network that loses and delays packets, driven
//! by a simulated clock. The same seed gives the same run.
//!
//! It answers the questions a real cluster cannot answer cheaply: do a
//! thousand nodes converge, how fast is a crash detected, and does packet
//! loss ever make the leader's [`FailureDecider`] fail a live node. The
//! tests run it; `bench/` prints its figures.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::core::{GossipCore, GossipPreset, Liveness};
use super::decider::{Decision, FailureDecider};
use super::identity::GossipId;
use super::metadata::NodeMetadata;
use super::seal::Sealer;
use crate::quorum::{NodeHealth, NodeId};

#[derive(Debug, Clone)]
pub struct SimulationSetup {
    pub nodes: usize,
    /// Fraction of packets lost, 0.0 to 1.0.
    pub loss: f64,
    /// Nodes killed (never node 0, the deciding leader) once all converged.
    pub crashes: usize,
    pub preset: GossipPreset,
    /// The leader's grace between gossip's "down" and a `node.failed`.
    pub grace: Duration,
    pub seed: u64,
    /// Gives up on convergence or detection after this much simulated time.
    pub limit: Duration,
    /// Keeps running this long after detection, to catch late false
    /// decisions.
    pub linger: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct SimulationReport {
    /// Simulated time from the first join until every node saw every other
    /// alive; `None` if that never happened within the limit.
    pub converged_after: Option<Duration>,
    /// The same in probe periods.
    pub convergence_rounds: Option<f64>,
    /// Simulated time from the crashes until every live node saw every
    /// crashed node down; `None` if not within the limit.
    pub detected_after: Option<Duration>,
    /// Failed decisions the leader made about nodes that were alive.
    pub false_failed: usize,
    /// Failed decisions about crashed nodes (one each is right).
    pub true_failed: usize,
    /// Gossip datagrams sent per node per simulated second.
    pub messages_per_node_per_second: f64,
    pub simulated: Duration,
}

enum Happening {
    Deliver { to: usize, packet: Vec<u8> },
    Timer { node: usize },
}

struct Network {
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    happenings: HashMap<u64, Happening>,
    next_id: u64,
    rng: StdRng,
    loss: f64,
}

impl Network {
    fn push(&mut self, at: Duration, happening: Happening) {
        self.next_id += 1;
        let target = match &happening {
            Happening::Deliver { to, .. } => *to,
            Happening::Timer { node } => *node,
        };
        self.queue.push(Reverse((at, self.next_id, target)));
        self.happenings.insert(self.next_id, happening);
    }

    fn pop(&mut self) -> Option<(Duration, Happening)> {
        let Reverse((at, id, _)) = self.queue.pop()?;
        Some((at, self.happenings.remove(&id).expect("queued happening")))
    }
}

fn address(index: usize) -> SocketAddr {
    let index = index as u32 + 1;
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000 | index), 7946))
}

struct Simulation {
    cores: Vec<GossipCore>,
    crashed: Vec<bool>,
    scheduled: Vec<Option<Duration>>,
    by_address: HashMap<SocketAddr, usize>,
    network: Network,
    sent: u64,
}

impl Simulation {
    /// Sends what node `index` produced and (re)schedules its next timer.
    fn flush(&mut self, index: usize, now: Duration) {
        for (to, packet) in self.cores[index].take_outgoing() {
            self.sent += 1;
            let Some(&target) = self.by_address.get(&to) else {
                continue;
            };
            if self.network.rng.random_bool(self.network.loss) {
                continue;
            }
            let latency = Duration::from_micros(self.network.rng.random_range(200..2000));
            self.network
                .push(now + latency, Happening::Deliver { to: target, packet });
        }
        if let Some(deadline) = self.cores[index].next_deadline()
            && self.scheduled[index].is_none_or(|scheduled| deadline < scheduled)
        {
            self.scheduled[index] = Some(deadline);
            self.network.push(deadline, Happening::Timer { node: index });
        }
    }

    fn step(&mut self) -> Option<Duration> {
        let (now, happening) = self.network.pop()?;
        match happening {
            Happening::Deliver { to, packet } => {
                if !self.crashed[to] {
                    self.cores[to].handle_packet(&packet, now);
                    self.flush(to, now);
                }
            }
            Happening::Timer { node } => {
                if !self.crashed[node] && self.scheduled[node] == Some(now) {
                    self.scheduled[node] = None;
                    self.cores[node].handle_timers(now);
                    self.flush(node, now);
                }
            }
        }
        Some(now)
    }

    fn live(&self) -> usize {
        self.crashed.iter().filter(|crashed| !**crashed).count()
    }

    /// Every live node counts exactly the other live nodes as active.
    fn agreed(&self) -> bool {
        let others = self.live() - 1;
        self.cores
            .iter()
            .zip(&self.crashed)
            .filter(|(_, crashed)| !**crashed)
            .all(|(core, _)| core.active_members() == others)
    }

    fn leader_view(&self) -> HashMap<NodeId, (Liveness, u64)> {
        super::liveness_of(&self.cores[0].members())
    }
}

/// Runs one simulation.
pub fn run(setup: &SimulationSetup) -> SimulationReport {
    let sealer = Sealer::from_secret(b"simulated cluster");
    let mut cores = Vec::with_capacity(setup.nodes);
    let mut by_address = HashMap::new();
    for index in 0..setup.nodes {
        let node = index as NodeId + 1;
        let id = GossipId {
            node,
            addr: address(index),
            generation: 1,
        };
        let metadata = NodeMetadata {
            node,
            generation: 1,
            version: 0,
            name: format!("node-{node}"),
            api: format!("{}:8500", address(index).ip()),
            transport: format!("{}:7946", address(index).ip()),
            roles: vec![("dns".into(), "0.1.0".into()), ("nginx".into(), "0.1.0".into())],
            epoch: 1,
        };
        let mut core = GossipCore::new(id, metadata, sealer.clone(), setup.preset, setup.seed ^ node);
        core.size_for(setup.nodes);
        cores.push(core);
        by_address.insert(address(index), index);
    }
    let mut simulation = Simulation {
        cores,
        crashed: vec![false; setup.nodes],
        scheduled: vec![None; setup.nodes],
        by_address,
        network: Network {
            queue: BinaryHeap::new(),
            happenings: HashMap::new(),
            next_id: 0,
            rng: StdRng::seed_from_u64(setup.seed),
            loss: setup.loss,
        },
        sent: 0,
    };
    // Joins are staggered a few milliseconds apart, each announcing to node 0
    // the way a node announces to the members its log lists.
    for index in 1..setup.nodes {
        let at = Duration::from_millis(5 * index as u64);
        let target = address(0);
        simulation.cores[index].announce(1, target, at);
        simulation.flush(index, at);
    }
    simulation.flush(0, Duration::ZERO);

    let probe_period = setup.preset.config(setup.nodes).probe_period;
    let check_every = Duration::from_millis(100);
    let mut report = SimulationReport::default();
    let mut decider = FailureDecider::new(setup.grace, Duration::from_secs(3600));
    let mut log: BTreeMap<NodeId, NodeHealth> = (1..=setup.nodes as NodeId)
        .map(|node| (node, NodeHealth::Alive))
        .collect();
    let mut next_check = check_every;
    let mut next_reannounce = Duration::from_secs(1);
    let mut crashed_at: Option<Duration> = None;
    let mut stop_at: Option<Duration> = None;
    let mut crash_rng = StdRng::seed_from_u64(setup.seed.wrapping_add(1));
    let mut now = Duration::ZERO;
    while let Some(at) = simulation.step() {
        now = at;
        if now < next_check {
            continue;
        }
        next_check = now + check_every;
        // Like the daemon's driver, a node gossip has not let in yet asks
        // again every second (its announce or the reply may have been lost).
        if now >= next_reannounce {
            next_reannounce = now + Duration::from_secs(1);
            for index in 1..setup.nodes {
                if !simulation.crashed[index] && simulation.cores[index].active_members() == 0 {
                    simulation.cores[index].announce(1, address(0), now);
                    simulation.flush(index, now);
                }
            }
        }
        // The leader (node 0) decides as the daemon would.
        for decision in decider.decide(now, 1, &log, &simulation.leader_view()) {
            match decision {
                Decision::Failed { node, .. } => {
                    if simulation.crashed[(node - 1) as usize] {
                        report.true_failed += 1;
                    } else {
                        report.false_failed += 1;
                    }
                    log.insert(node, NodeHealth::Failed);
                }
                Decision::Rejoined { node, .. } => {
                    log.insert(node, NodeHealth::Alive);
                }
            }
        }
        if let Some(stop) = stop_at {
            if now >= stop {
                break;
            }
            continue;
        }
        let agreed = simulation.agreed();
        match crashed_at {
            None if agreed => {
                report.converged_after = Some(now);
                report.convergence_rounds = Some(now.as_secs_f64() / probe_period.as_secs_f64());
                if setup.crashes == 0 {
                    stop_at = Some(now + setup.linger);
                    continue;
                }
                let mut killed = 0;
                while killed < setup.crashes {
                    let victim = crash_rng.random_range(1..setup.nodes);
                    if !simulation.crashed[victim] {
                        simulation.crashed[victim] = true;
                        killed += 1;
                    }
                }
                crashed_at = Some(now);
            }
            None if now > setup.limit => break,
            Some(crash) if agreed => {
                report.detected_after = Some(now - crash);
                stop_at = Some(now + setup.linger);
            }
            Some(crash) if now - crash > setup.limit => break,
            _ => {}
        }
    }
    report.simulated = now;
    report.messages_per_node_per_second = simulation.sent as f64 / setup.nodes as f64 / now.as_secs_f64().max(1e-9);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(nodes: usize, loss: f64, crashes: usize) -> SimulationSetup {
        SimulationSetup {
            nodes,
            loss,
            crashes,
            preset: GossipPreset::Lan,
            grace: Duration::from_secs(1),
            seed: 7,
            limit: Duration::from_secs(600),
            linger: Duration::from_secs(10),
        }
    }

    /// A thousand nodes over a network losing 5% of packets converge, every
    /// live node sees the crashed ones down, and the leader never decides
    /// a live node failed.
    #[test]
    fn a_thousand_nodes_converge_and_detect_crashes_without_false_failures() {
        let report = run(&setup(1000, 0.05, 5));
        eprintln!("{report:?}");
        assert!(report.converged_after.is_some(), "never converged: {report:?}");
        assert!(
            report.detected_after.is_some(),
            "crashes never detected by all: {report:?}"
        );
        assert_eq!(report.false_failed, 0, "{report:?}");
        assert_eq!(report.true_failed, 5, "{report:?}");
    }

    /// The same seed gives the same run.
    #[test]
    fn the_simulation_is_deterministic() {
        let first = run(&setup(30, 0.05, 2));
        let second = run(&setup(30, 0.05, 2));
        assert_eq!(first.converged_after, second.converged_after);
        assert_eq!(first.detected_after, second.detected_after);
        assert!(first.converged_after.is_some() && first.detected_after.is_some());
    }
}
