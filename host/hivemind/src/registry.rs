//! The registry: the node × role table roles, the API and the CLI read.
//!
//! It joins two sources. The log says who is a member and whether the
//! quorum has decided it failed or gone; gossip says who answers now and
//! what each node runs. A node is *healthy* when the log admitted it and
//! holds it live: gossip alone never makes a node healthy (a node the log
//! never admitted is listed, unhealthy, whatever gossip says), and gossip
//! alone never makes one unhealthy either (its suspicion becomes a
//! `node.failed` decision first).
//!
//! `last_changed` counts changes of the table; [`Registry::wait_for_change`]
//! and [`Registry::wait_for_stable`] let callers follow it without polling.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::membership::{GossipView, Liveness};
use crate::quorum::{MemberRecord, NodeAddress, NodeHealth, NodeId, hex_id};

/// One node as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeEntry {
    /// The node id, 16 hex digits.
    pub id: String,
    pub name: String,
    pub api: String,
    pub transport: String,
    /// Roles the node runs: name and version.
    pub roles: Vec<RoleEntry>,
    /// Admitted by the log (a `node.joined` entry).
    pub admitted: bool,
    /// A voter of the current epoch.
    pub voter: bool,
    /// What the log decided: `alive`, `failed` or `left`.
    pub health: NodeHealth,
    /// What this node's gossip sees now; `None` when it has not heard of it.
    pub gossip: Option<Liveness>,
    pub healthy: bool,
    #[serde(rename = "self")]
    pub is_self: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleEntry {
    pub name: String,
    pub version: String,
}

impl NodeEntry {
    pub fn runs(&self, role: &str) -> bool {
        self.roles.iter().any(|entry| entry.name == role)
    }

    pub fn to_role_node(&self) -> hivemind_runtime::Node {
        hivemind_runtime::Node {
            id: self.id.clone(),
            name: self.name.clone(),
            // Where other nodes reach it (the advertised transport address):
            // roles use its IP for the node's services and DNS records.
            address: self.transport.clone(),
            roles: self.roles.iter().map(|role| role.name.clone()).collect(),
            healthy: self.healthy,
        }
    }
}

/// What the table is built from.
#[derive(Debug, Clone, Default)]
pub struct RegistryInputs {
    /// Members as the log's state machine holds them.
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// Addresses from the Raft membership (voters and learners).
    pub addresses: BTreeMap<NodeId, NodeAddress>,
    pub voters: BTreeSet<NodeId>,
    pub gossip: std::sync::Arc<GossipView>,
    /// Roles running on this node (name, version).
    pub local_roles: Vec<(String, String)>,
    /// Nodes the log removed: one that still gossips is not listed.
    pub removed: BTreeSet<NodeId>,
}

/// Builds the table: every admitted member, then every node only gossip
/// knows, sorted by name then id.
pub fn build_table(me: NodeId, me_address: &NodeAddress, inputs: &RegistryInputs) -> Vec<NodeEntry> {
    let liveness: BTreeMap<NodeId, Liveness> = inputs
        .gossip
        .members
        .iter()
        .map(|member| (member.id.node, member.liveness))
        .collect();
    let mut ids: BTreeSet<NodeId> = inputs.members.keys().copied().collect();
    ids.extend(inputs.addresses.keys().copied());
    ids.extend(liveness.keys().copied().filter(|id| !inputs.removed.contains(id)));
    ids.insert(me);
    let mut table: Vec<NodeEntry> = ids
        .into_iter()
        .map(|id| {
            let is_self = id == me;
            let record = inputs.members.get(&id);
            let metadata = inputs.gossip.metadata.get(&id);
            let address = if is_self {
                Some(me_address)
            } else {
                inputs.addresses.get(&id)
            };
            let roles: Vec<(String, String)> = if is_self {
                inputs.local_roles.clone()
            } else {
                metadata.map(|metadata| metadata.roles.clone()).unwrap_or_default()
            };
            let health = record.map(|record| record.health).unwrap_or_default();
            // A single node (or one still forming) is admitted by its own log
            // before the members table names it.
            let admitted = record.is_some() || (is_self && inputs.members.is_empty());
            NodeEntry {
                id: hex_id(id),
                name: address
                    .map(|address| address.name.clone())
                    .or_else(|| metadata.map(|metadata| metadata.name.clone()))
                    .unwrap_or_default(),
                api: address
                    .map(|address| address.api.clone())
                    .or_else(|| metadata.map(|metadata| metadata.api.clone()))
                    .unwrap_or_default(),
                transport: address
                    .map(|address| address.transport.clone())
                    .or_else(|| metadata.map(|metadata| metadata.transport.clone()))
                    .unwrap_or_default(),
                roles: roles
                    .into_iter()
                    .map(|(name, version)| RoleEntry { name, version })
                    .collect(),
                admitted,
                voter: inputs.voters.contains(&id),
                health,
                gossip: if is_self {
                    Some(Liveness::Alive)
                } else {
                    liveness.get(&id).copied()
                },
                healthy: admitted && health == NodeHealth::Alive,
                is_self,
            }
        })
        .collect();
    table.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    table
}

struct Table {
    nodes: Vec<NodeEntry>,
    changed_at: Instant,
}

pub struct Registry {
    me: NodeId,
    me_address: NodeAddress,
    table: RwLock<Table>,
    /// The change counter: `last_changed`.
    changes: watch::Sender<u64>,
}

impl Registry {
    pub fn new(me: NodeId, me_address: NodeAddress) -> Registry {
        let nodes = build_table(me, &me_address, &RegistryInputs::default());
        Registry {
            me,
            me_address,
            table: RwLock::new(Table {
                nodes,
                changed_at: Instant::now(),
            }),
            changes: watch::channel(1).0,
        }
    }

    pub fn self_id(&self) -> String {
        hex_id(self.me)
    }

    /// Rebuilds the table; bumps `last_changed` when it differs.
    pub fn update(&self, inputs: &RegistryInputs) {
        let nodes = build_table(self.me, &self.me_address, inputs);
        let mut table = self.table.write().unwrap();
        if table.nodes != nodes {
            table.nodes = nodes;
            table.changed_at = Instant::now();
            drop(table);
            self.changes.send_modify(|counter| *counter += 1);
        }
    }

    /// Nodes, only those running `role` when given, only healthy ones when
    /// `healthy_only`.
    pub fn nodes(&self, role: Option<&str>, healthy_only: bool) -> Vec<NodeEntry> {
        self.table
            .read()
            .unwrap()
            .nodes
            .iter()
            .filter(|node| role.is_none_or(|role| node.runs(role)))
            .filter(|node| !healthy_only || node.healthy)
            .cloned()
            .collect()
    }

    pub fn node(&self, id: &str) -> Option<NodeEntry> {
        self.table
            .read()
            .unwrap()
            .nodes
            .iter()
            .find(|node| node.id == id)
            .cloned()
    }

    pub fn self_node(&self) -> NodeEntry {
        self.node(&self.self_id()).expect("the table always lists this node")
    }

    /// Counts changes of the table; starts at 1.
    pub fn last_changed(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Waits until `last_changed` passes `since` or `timeout` ends; returns
    /// the counter then.
    pub async fn wait_for_change(&self, since: u64, timeout: Duration) -> u64 {
        let mut changes = self.changes.subscribe();
        let _ = tokio::time::timeout(timeout, changes.wait_for(|counter| *counter > since)).await;
        self.last_changed()
    }

    /// Waits until the table has not changed for `quiet`; false if that
    /// did not happen within `timeout`.
    pub async fn wait_for_stable(&self, quiet: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut changes = self.changes.subscribe();
        loop {
            let stable_at = self.table.read().unwrap().changed_at + quiet;
            let now = Instant::now();
            if now >= stable_at {
                return true;
            }
            if now >= deadline {
                return false;
            }
            changes.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep_until(stable_at.min(deadline)) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// The table for humans, one node per line.
    pub fn dump(&self) -> String {
        let table = self.table.read().unwrap();
        let mut text = String::new();
        for node in &table.nodes {
            let roles: Vec<String> = node
                .roles
                .iter()
                .map(|role| format!("{}@{}", role.name, role.version))
                .collect();
            text.push_str(&format!(
                "{:<16} {} {:<8} {:<7} gossip={:<7} {}{}\n",
                node.name,
                node.id,
                if node.healthy { "healthy" } else { "down" },
                format!("{:?}", node.health).to_lowercase(),
                node.gossip
                    .map(|liveness| format!("{liveness:?}").to_lowercase())
                    .unwrap_or_else(|| "unknown".into()),
                roles.join(","),
                if node.is_self { " (self)" } else { "" },
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{GossipId, GossipMember, NodeMetadata};
    use std::sync::Arc;

    fn address(name: &str) -> NodeAddress {
        NodeAddress {
            name: name.into(),
            transport: format!("{name}:1"),
            api: format!("{name}:2"),
        }
    }

    fn gossip(members: &[(NodeId, Liveness)], roles_of: &[(NodeId, &str)]) -> Arc<GossipView> {
        Arc::new(GossipView {
            me: None,
            members: members
                .iter()
                .map(|&(node, liveness)| GossipMember {
                    id: GossipId {
                        node,
                        addr: "127.0.0.1:1".parse().unwrap(),
                        generation: 1,
                    },
                    liveness,
                })
                .collect(),
            metadata: roles_of
                .iter()
                .map(|&(node, role)| {
                    (
                        node,
                        NodeMetadata {
                            node,
                            generation: 1,
                            version: 1,
                            name: format!("gossip-{node}"),
                            api: String::new(),
                            transport: String::new(),
                            roles: vec![(role.into(), "1.0.0".into())],
                            epoch: 1,
                        },
                    )
                })
                .collect(),
            counters: Default::default(),
        })
    }

    /// Health is the log's decision: a failed member is unhealthy though
    /// gossip sees it, a live member healthy though gossip suspects it, and
    /// a node only gossip knows is never healthy.
    #[test]
    fn health_is_what_the_log_decided() {
        let members = BTreeMap::from([
            (1, MemberRecord::default()),
            (2, MemberRecord::default()),
            (
                3,
                MemberRecord {
                    health: NodeHealth::Failed,
                    ..MemberRecord::default()
                },
            ),
        ]);
        let inputs = RegistryInputs {
            members,
            addresses: BTreeMap::from([(1, address("a")), (2, address("b")), (3, address("c"))]),
            voters: BTreeSet::from([1, 2, 3]),
            gossip: gossip(
                &[
                    (2, Liveness::Suspect),
                    (3, Liveness::Alive),
                    (8, Liveness::Alive),
                    (9, Liveness::Alive),
                ],
                &[(2, "dns"), (9, "dns")],
            ),
            local_roles: vec![("nginx".into(), "0.1.0".into())],
            removed: BTreeSet::from([8]),
        };
        let table = build_table(1, &address("a"), &inputs);
        assert!(
            table.iter().all(|node| node.id != hex_id(8)),
            "a removed node that still gossips is not listed"
        );
        let by_id = |id: NodeId| table.iter().find(|node| node.id == hex_id(id)).unwrap();
        assert!(by_id(1).healthy && by_id(1).is_self && by_id(1).runs("nginx"));
        assert!(by_id(2).healthy && by_id(2).runs("dns"));
        assert!(!by_id(3).healthy);
        assert!(!by_id(9).healthy && !by_id(9).admitted && by_id(9).name == "gossip-9");

        let registry = Registry::new(1, address("a"));
        registry.update(&inputs);
        let dump = registry.dump();
        assert_eq!(dump.lines().count(), 4, "{dump}");
        assert!(
            dump.lines()
                .any(|line| line.starts_with("a ") && line.contains("healthy") && line.contains("nginx@0.1.0")),
            "{dump}"
        );
        assert!(
            dump.lines()
                .any(|line| line.starts_with("c ") && line.contains("failed")),
            "{dump}"
        );
    }

    /// `last_changed` moves only when the table changes, and waiters wake.
    #[tokio::test]
    async fn waiters_wake_on_change_only() {
        let registry = Arc::new(Registry::new(1, address("a")));
        let start = registry.last_changed();
        registry.update(&RegistryInputs::default());
        assert_eq!(registry.last_changed(), start, "an identical table is no change");
        let waiter = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.wait_for_change(start, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        registry.update(&RegistryInputs {
            gossip: gossip(&[(2, Liveness::Alive)], &[]),
            ..RegistryInputs::default()
        });
        assert_eq!(waiter.await.unwrap(), start + 1);
        assert_eq!(
            registry.wait_for_change(start + 1, Duration::from_millis(50)).await,
            start + 1
        );
    }

    /// `wait_for_stable` returns once the table has been quiet long enough,
    /// and gives up when changes keep coming past the timeout.
    #[tokio::test]
    async fn wait_for_stable_waits_for_quiet() {
        let registry = Arc::new(Registry::new(1, address("a")));
        let churn = {
            let registry = registry.clone();
            tokio::spawn(async move {
                for round in 0..20u64 {
                    registry.update(&RegistryInputs {
                        gossip: gossip(&[(round + 2, Liveness::Alive)], &[]),
                        ..RegistryInputs::default()
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        assert!(
            !registry
                .wait_for_stable(Duration::from_millis(200), Duration::from_millis(150))
                .await
        );
        churn.await.unwrap();
        assert!(
            registry
                .wait_for_stable(Duration::from_millis(100), Duration::from_secs(5))
                .await
        );
    }
}
