//! The daemon's membership tasks: keeping the registry and gossip in step
//! with the log and the roles, and (on the leader) turning what gossip
//! sees into committed health decisions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Membership;
use super::decider::{Decision, FailureDecider};
use crate::config::GossipSettings;
use crate::quorum::{CommandResult, NodeHealth, NodeId, QuorumLog, hex_id};
use crate::registry::{Registry, RegistryInputs};

/// Applied entries arrive at thousands per second under load; the table is
/// rebuilt at most this often.
const COALESCE: Duration = Duration::from_millis(50);
/// Rebuilt at least this often, whatever woke it.
const REFRESH: Duration = Duration::from_secs(1);
/// How long a health write may wait for a quorum.
const DECISION_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after start a member gossip has never heard of is given to
/// show up before the leader counts it down.
const WARM_UP: Duration = Duration::from_secs(10);

/// Keeps the registry and gossip's seeds, size and roles in step with the
/// log and the role manager until `shutdown`.
pub async fn keep_registry(
    registry: Arc<Registry>,
    quorum: Arc<QuorumLog>,
    membership: Membership,
    mut local_roles: watch::Receiver<Vec<(String, String)>>,
    shutdown: CancellationToken,
) {
    let me = quorum.id();
    let mut gossip = membership.watch();
    let mut applied = quorum.watch_applied();
    let mut resolved: BTreeMap<String, SocketAddr> = BTreeMap::new();
    let mut last_self_rejoin: Option<Instant> = None;
    loop {
        let state = quorum.cluster_state();
        let (addresses, voters) = quorum.member_addresses();
        let mut seeds = Vec::new();
        for (id, address) in &addresses {
            if *id == me {
                continue;
            }
            if let Some(addr) = cached_gossip_address(&address.transport, &mut resolved).await {
                seeds.push((*id, addr));
            }
        }
        membership.set_seeds(seeds);
        membership.size_for(addresses.len());
        let roles = local_roles.borrow_and_update().clone();
        membership.set_roles(roles.clone(), state.epoch);
        // A node the log holds failed or gone, yet running: it says so
        // itself (the leader never decides about itself).
        if let Some(record) = state.members.get(&me)
            && record.health != NodeHealth::Alive
            && !membership.is_leaving()
            && last_self_rejoin.is_none_or(|at| at.elapsed() >= REFRESH * 2)
        {
            last_self_rejoin = Some(Instant::now());
            let generation = membership.view().me.as_ref().map_or(0, |id| id.generation);
            let quorum = quorum.clone();
            tokio::spawn(async move {
                let _ = quorum
                    .record_health(
                        me,
                        NodeHealth::Alive,
                        generation,
                        "the node started again".into(),
                        DECISION_TIMEOUT,
                    )
                    .await;
            });
        }
        registry.update(&RegistryInputs {
            members: state.members,
            addresses,
            voters,
            gossip: membership.view(),
            local_roles: roles,
            removed: state.removed.iter().copied().collect(),
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = gossip.changed() => {}
            _ = applied.changed() => {}
            _ = local_roles.changed() => {}
            _ = tokio::time::sleep(REFRESH) => {}
        }
        tokio::time::sleep(COALESCE).await;
    }
}

/// The UDP address gossip reaches a member at, names resolved once.
async fn cached_gossip_address(transport: &str, resolved: &mut BTreeMap<String, SocketAddr>) -> Option<SocketAddr> {
    if let Some(addr) = resolved.get(transport) {
        return Some(*addr);
    }
    let addr = super::gossip_address(transport).await?;
    resolved.insert(transport.to_string(), addr);
    Some(addr)
}

/// On the leader, every probe period or so: commits `node.failed` for
/// members gossip has held down through the grace, `node.rejoined` for
/// failed ones back alive.
pub async fn decide_health(
    quorum: Arc<QuorumLog>,
    membership: Membership,
    settings: GossipSettings,
    shutdown: CancellationToken,
) {
    let me = quorum.id();
    let origin = Instant::now();
    let mut decider = FailureDecider::new(settings.failed_grace, WARM_UP);
    let every = settings.failed_grace.min(Duration::from_millis(250)) / 2;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !quorum.is_leader() {
            continue;
        }
        let state = quorum.cluster_state();
        let log: BTreeMap<NodeId, NodeHealth> = state.members.iter().map(|(id, record)| (*id, record.health)).collect();
        let view = membership.view();
        for decision in decider.decide(origin.elapsed(), me, &log, &view.liveness()) {
            let (id, health, generation, reason) = match decision {
                Decision::Failed { node, generation } => (
                    node,
                    NodeHealth::Failed,
                    generation,
                    format!("gossip held it down for {:?}", settings.failed_grace),
                ),
                Decision::Rejoined { node, generation } => (
                    node,
                    NodeHealth::Alive,
                    generation,
                    "gossip sees it alive again".to_string(),
                ),
            };
            match quorum
                .record_health(id, health, generation, reason, DECISION_TIMEOUT)
                .await
            {
                Ok(CommandResult::Event { seq }) => {
                    tracing::info!(node = %hex_id(id), ?health, seq, "member health decided");
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "member health decision not committed; trying again"),
            }
        }
    }
}
