//! Gossip suspects, the quorum decides: what the leader commits about
//! members from what its gossip sees.
//!
//! A member the log holds as live that gossip has held down (or has not
//! seen at all since this node started, past a warm-up) for a whole grace
//! period is decided failed; a member the log holds as failed or gone that
//! gossip sees alive again is decided rejoined. The decisions are proposals:
//! applying them is idempotent in the state machine, so a leader change
//! mid-decision never writes one twice. Pure logic, no clock of its own:
//! the daemon and the simulation drive it the same way.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::core::Liveness;
use crate::quorum::{NodeHealth, NodeId};

/// A proposal for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Failed { node: NodeId, generation: u64 },
    Rejoined { node: NodeId, generation: u64 },
}

#[derive(Debug)]
pub struct FailureDecider {
    grace: Duration,
    warm_up: Duration,
    started: Option<Duration>,
    down_since: HashMap<NodeId, Duration>,
}

impl FailureDecider {
    /// `grace`: how long gossip must hold a member down before it is
    /// decided failed. `warm_up`: how long after start a member gossip has
    /// never seen is given to show up.
    pub fn new(grace: Duration, warm_up: Duration) -> FailureDecider {
        FailureDecider {
            grace,
            warm_up,
            started: None,
            down_since: HashMap::new(),
        }
    }

    /// Decisions due at `now`. `log` is each admitted member's health as the
    /// log has it; `gossip` is each member's liveness and generation as
    /// this node's gossip sees it. `me` is never decided about.
    pub fn decide(
        &mut self,
        now: Duration,
        me: NodeId,
        log: &BTreeMap<NodeId, NodeHealth>,
        gossip: &HashMap<NodeId, (Liveness, u64)>,
    ) -> Vec<Decision> {
        let started = *self.started.get_or_insert(now);
        let warmed_up = now.saturating_sub(started) >= self.warm_up;
        self.down_since.retain(|node, _| log.contains_key(node));
        let mut decisions = Vec::new();
        for (&node, health) in log {
            if node == me {
                continue;
            }
            let seen = gossip.get(&node).copied();
            match health {
                NodeHealth::Alive => {
                    let down = match seen {
                        Some((Liveness::Down, _)) => true,
                        Some(_) => false,
                        None => warmed_up,
                    };
                    if !down {
                        self.down_since.remove(&node);
                        continue;
                    }
                    let since = *self.down_since.entry(node).or_insert(now);
                    if now.saturating_sub(since) >= self.grace {
                        decisions.push(Decision::Failed {
                            node,
                            generation: seen.map_or(0, |(_, generation)| generation),
                        });
                    }
                }
                NodeHealth::Failed | NodeHealth::Left => {
                    self.down_since.remove(&node);
                    if let Some((Liveness::Alive, generation)) = seen {
                        decisions.push(Decision::Rejoined { node, generation });
                    }
                }
            }
        }
        decisions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(1);

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A member held down through the grace period is decided failed; one
    /// that comes back within it is not.
    #[test]
    fn down_through_the_grace_is_failed_and_a_blip_is_not() {
        let mut decider = FailureDecider::new(GRACE, ms(5000));
        let log = BTreeMap::from([(1, NodeHealth::Alive), (2, NodeHealth::Alive), (3, NodeHealth::Alive)]);
        let mut gossip = HashMap::from([(2, (Liveness::Down, 7)), (3, (Liveness::Down, 9))]);
        assert!(decider.decide(ms(0), 1, &log, &gossip).is_empty());
        gossip.insert(3, (Liveness::Alive, 9));
        assert!(decider.decide(ms(500), 1, &log, &gossip).is_empty());
        gossip.insert(3, (Liveness::Down, 9));
        assert_eq!(
            decider.decide(ms(1000), 1, &log, &gossip),
            vec![Decision::Failed { node: 2, generation: 7 }]
        );
    }

    /// A failed member gossip sees alive again is decided rejoined; the
    /// deciding node never decides about itself.
    #[test]
    fn a_failed_member_alive_again_rejoins() {
        let mut decider = FailureDecider::new(GRACE, ms(5000));
        let log = BTreeMap::from([(1, NodeHealth::Failed), (2, NodeHealth::Failed)]);
        let gossip = HashMap::from([(2, (Liveness::Alive, 8))]);
        assert_eq!(
            decider.decide(ms(0), 1, &log, &gossip),
            vec![Decision::Rejoined { node: 2, generation: 8 }]
        );
    }

    /// A member gossip never saw counts as down only after the warm-up.
    #[test]
    fn an_unseen_member_waits_for_the_warm_up() {
        let mut decider = FailureDecider::new(GRACE, ms(3000));
        let log = BTreeMap::from([(1, NodeHealth::Alive), (2, NodeHealth::Alive)]);
        let gossip = HashMap::new();
        assert!(decider.decide(ms(0), 1, &log, &gossip).is_empty());
        assert!(decider.decide(ms(3000), 1, &log, &gossip).is_empty());
        assert_eq!(
            decider.decide(ms(4000), 1, &log, &gossip),
            vec![Decision::Failed { node: 2, generation: 0 }]
        );
    }
}
