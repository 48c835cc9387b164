//! Which members this node can reach, whether their logs run, and how far
//! their clocks are from this one's: a ping to every other member twice a
//! second. `status` turns it into `healthy` or `degraded` with the missing
//! voters named (failed writes name them too), and warns of clocks apart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::network::PING;
use super::{NodeId, Ping, Pong, QuorumLog};

const PING_EVERY: Duration = Duration::from_millis(500);
/// A member not heard from for this long is unreachable.
const REACHABLE_WITHIN: Duration = Duration::from_millis(2000);
/// Clocks further apart than this are worth a warning: join tokens do not
/// mind (each node counts their TTL on its own clock), but events proposed
/// through a node whose clock is ahead hold the log's times up.
pub const CLOCK_WARN_MS: u64 = 1000;

#[derive(Default)]
pub struct PeerHealth {
    last_answer: Mutex<HashMap<NodeId, Instant>>,
    /// Members whose last answer said their log does not run, and why.
    log_stopped: Mutex<HashMap<NodeId, String>>,
    /// How far each member's clock is ahead of this node's, in ms.
    clock_offset_ms: Mutex<HashMap<NodeId, i64>>,
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

    /// How far `id`'s clock was ahead of this node's at its last answer.
    pub fn clock_offset_ms(&self, id: NodeId) -> Option<i64> {
        self.clock_offset_ms.lock().unwrap().get(&id).copied()
    }

    /// The largest offset, either way, between this node's clock and a
    /// member's.
    pub fn clock_offset_max_ms(&self) -> u64 {
        let offsets = self.clock_offset_ms.lock().unwrap();
        offsets.values().map(|offset| offset.unsigned_abs()).max().unwrap_or(0)
    }

    /// Records `id`'s clock offset, and says so once when it moves past
    /// [`CLOCK_WARN_MS`] (or back within it).
    fn note_clock(&self, id: NodeId, address: &str, offset_ms: i64) {
        let before = self.clock_offset_ms.lock().unwrap().insert(id, offset_ms);
        let apart = |offset: i64| offset.unsigned_abs() > CLOCK_WARN_MS;
        match before {
            Some(before) if apart(before) == apart(offset_ms) => {}
            None if !apart(offset_ms) => {}
            _ if apart(offset_ms) => tracing::warn!(
                member = %address,
                offset_s = offset_ms as f64 / 1000.0,
                "a member's clock is far from this node's: event times follow the fastest clock until they agree; \
                 check time sync (NTP) on both"
            ),
            _ => tracing::info!(member = %address, "a member's clock agrees with this node's again"),
        }
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
                let sent = Instant::now();
                let sent_ms = super::now_ms();
                if let Ok(pong) = log
                    .pool
                    .call::<_, Pong>(&address, PING, &ping, REACHABLE_WITHIN / 2)
                    .await
                    && pong.id == id
                {
                    log.health.last_answer.lock().unwrap().insert(id, Instant::now());
                    if pong.clock_ms != 0 {
                        // The answer was made about half the round trip
                        // after the ping left (NTP's estimate).
                        let midway_ms = sent_ms + sent.elapsed().as_millis() as u64 / 2;
                        log.health
                            .note_clock(id, &address, pong.clock_ms as i64 - midway_ms as i64);
                    }
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
