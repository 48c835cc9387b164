//! Which members this node can reach, and whether their logs run: a ping
//! to every other member twice a second. `status` turns it into `healthy` or `degraded` with the missing
//! voters named, and failed writes name them too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::network::PING;
use super::{NodeId, Ping, Pong, QuorumLog};

const PING_EVERY: Duration = Duration::from_millis(500);
/// A member not heard from for this long is unreachable.
const REACHABLE_WITHIN: Duration = Duration::from_millis(2000);

#[derive(Default)]
pub struct PeerHealth {
    last_answer: Mutex<HashMap<NodeId, Instant>>,
    /// Members whose last answer said their log does not run, and why.
    log_stopped: Mutex<HashMap<NodeId, String>>,
    /// Set when the leader answered that this node is not in its
    /// membership: it was removed (at the leader's epoch).
    removed_at_epoch: Mutex<Option<u64>>,
}

impl PeerHealth {
    pub fn reachable(&self, id: NodeId) -> bool {
        self.last_answer
            .lock()
            .unwrap()
            .get(&id)
            .is_some_and(|seen| seen.elapsed() < REACHABLE_WITHIN)
    }

    /// Why `id`'s log does not run, as it last said.
    pub fn log_stopped(&self, id: NodeId) -> Option<String> {
        self.log_stopped.lock().unwrap().get(&id).cloned()
    }

    /// Whether `id` answers and its log runs: only then can it vote.
    pub fn voting(&self, id: NodeId) -> bool {
        self.reachable(id) && !self.log_stopped.lock().unwrap().contains_key(&id)
    }

    pub fn removed_at_epoch(&self) -> Option<u64> {
        *self.removed_at_epoch.lock().unwrap()
    }
}

pub async fn watch(log: Arc<QuorumLog>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(PING_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let peers: Vec<(NodeId, String)> = log
            .member_addresses()
            .0
            .into_iter()
            .filter(|(id, _)| *id != log.id)
            .map(|(id, node)| (id, node.transport))
            .collect();
        for (id, address) in peers {
            let log = log.clone();
            tokio::spawn(async move {
                let ping = Ping { from: log.id };
                if let Ok(pong) = log
                    .pool
                    .call::<_, Pong>(&address, PING, &ping, REACHABLE_WITHIN / 2)
                    .await
                    && pong.id == id
                {
                    log.health.last_answer.lock().unwrap().insert(id, Instant::now());
                    let mut stopped = log.health.log_stopped.lock().unwrap();
                    match pong.log_stopped {
                        Some(reason) => {
                            if stopped.insert(id, reason.clone()).is_none() {
                                tracing::warn!(member = %address, %reason, "a member's log stopped");
                            }
                        }
                        None => {
                            if stopped.remove(&id).is_some() {
                                tracing::info!(member = %address, "a member's log runs again");
                            }
                        }
                    }
                    drop(stopped);
                    // Only the leader's membership is surely the latest.
                    if pong.leader {
                        let mut flag = log.health.removed_at_epoch.lock().unwrap();
                        if !pong.member && flag.is_none() {
                            tracing::error!(
                                epoch = pong.epoch,
                                "the leader no longer lists this node: it was removed from the cluster and takes no \
                                 part in the quorum. To join again, move its data directory away and start it with \
                                 --join"
                            );
                        }
                        *flag = (!pong.member).then_some(pong.epoch);
                    }
                }
            });
        }
    }
}
