//! What the log says about each bridge: the committed active backend,
//! routing on or off, pin, drained backends and every node's health
//! reports, folded from `bridge.*` events in log order.
//!
//! Every node folds the same events, so every node's bridges agree; the
//! leader also decides from it (see `policy`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::log::StoredEvent;

/// One node's view of one backend, reported when it changes.
pub const HEALTH: &str = "bridge.health";
/// The leader's decision of the active backend.
pub const ACTIVE: &str = "bridge.active";
/// An operator turned routing on or off.
pub const ROUTING: &str = "bridge.routing";
/// An operator pinned a backend, or unpinned.
pub const PIN: &str = "bridge.pin";
/// An operator drained a backend, or put it back.
pub const DRAIN: &str = "bridge.drain";
/// A node's `[[bridge]]` settings that every node must share.
pub const CONFIG: &str = "bridge.config";
/// A node no longer has a bridge in its config: its config and reports
/// for it are forgotten.
pub const LEFT: &str = "bridge.left";
/// Every kind above starts with this.
pub const PREFIX: &str = "bridge.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub bridge: String,
    pub backend: String,
    /// The reporting node's id (hex).
    pub node: String,
    #[serde(default)]
    pub node_name: String,
    pub healthy: bool,
    #[serde(default)]
    pub detail: String,
}

/// What a node's `[[bridge]]` section says about the decision every node
/// must agree on: the backends by name in priority order, and failback.
/// (Addresses and checks may differ per node.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReport {
    pub bridge: String,
    /// The reporting node's id (hex).
    pub node: String,
    #[serde(default)]
    pub node_name: String,
    pub backends: Vec<String>,
    pub failback: bool,
}

/// A node that dropped a bridge's `[[bridge]]` section says so, so its
/// last health reports stop counting as its view and its last config stops
/// being listed as differing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeLeft {
    pub bridge: String,
    /// The node's id (hex).
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveDecision {
    pub bridge: String,
    /// `None`: no backend to route to.
    pub backend: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingChange {
    pub bridge: String,
    pub enabled: bool,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinChange {
    pub bridge: String,
    /// `None`: unpinned.
    pub backend: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainChange {
    pub bridge: String,
    pub backend: String,
    pub drained: bool,
    pub reason: String,
}

/// A committed value with the entry that set it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Committed<T> {
    pub value: T,
    pub reason: String,
    /// The event's seq; 0 for a default nobody committed.
    pub seq: u64,
    pub timestamp_ms: u64,
}

impl<T> Committed<T> {
    fn from_event(value: T, reason: String, event: &StoredEvent) -> Committed<T> {
        Committed {
            value,
            reason,
            seq: event.seq,
            timestamp_ms: event.timestamp_ms,
        }
    }
}

/// A node's latest report on a backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub node_name: String,
    pub healthy: bool,
    pub detail: String,
    pub seq: u64,
    pub timestamp_ms: u64,
}

/// Everything committed about one bridge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BridgeRecord {
    /// `None` until the leader first decides.
    pub active: Option<Committed<Option<String>>>,
    pub routing: Committed<bool>,
    pub pinned: Option<Committed<String>>,
    /// Drained backends and why.
    pub drained: BTreeMap<String, Committed<()>>,
    /// backend → node id (hex) → its latest report.
    pub reports: BTreeMap<String, BTreeMap<String, Report>>,
    /// node id (hex) → the config it last reported for this bridge.
    pub configs: BTreeMap<String, ConfigReport>,
}

impl Default for BridgeRecord {
    fn default() -> Self {
        BridgeRecord {
            active: None,
            routing: Committed {
                value: true,
                reason: "routing is on until an operator turns it off".into(),
                seq: 0,
                timestamp_ms: 0,
            },
            pinned: None,
            drained: BTreeMap::new(),
            reports: BTreeMap::new(),
            configs: BTreeMap::new(),
        }
    }
}

impl BridgeRecord {
    /// The committed active backend, if any.
    pub fn active_backend(&self) -> Option<&str> {
        self.active.as_ref().and_then(|active| active.value.as_deref())
    }

    pub fn is_drained(&self, backend: &str) -> bool {
        self.drained.contains_key(backend)
    }

    /// Whether the log holds anything `node` said about this bridge: its
    /// config or a health report.
    pub fn heard_from(&self, node: &str) -> bool {
        self.configs.contains_key(node) || self.reports.values().any(|reports| reports.contains_key(node))
    }

    /// How many of `nodes` last reported `backend` up, and how many down.
    pub fn votes(&self, backend: &str, nodes: &BTreeSet<String>) -> (usize, usize) {
        let Some(reports) = self.reports.get(backend) else {
            return (0, 0);
        };
        reports
            .iter()
            .filter(|(node, _)| nodes.contains(*node))
            .fold(
                (0, 0),
                |(up, down), (_, report)| {
                    if report.healthy { (up + 1, down) } else { (up, down + 1) }
                },
            )
    }
}

/// The fold of every `bridge.*` event read so far.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub bridges: BTreeMap<String, BridgeRecord>,
    /// The seq of the last event folded.
    pub last_seq: u64,
}

impl Ledger {
    /// Folds one event. Malformed payloads are skipped with a warning: an
    /// event written by hand through the API must not stop the bridges.
    pub fn apply(&mut self, event: &StoredEvent) {
        self.last_seq = self.last_seq.max(event.seq);
        if let Err(error) = self.fold(event) {
            tracing::warn!(seq = event.seq, kind = %event.kind, %error, "skipping a malformed bridge event");
        }
    }

    fn fold(&mut self, event: &StoredEvent) -> Result<(), serde_json::Error> {
        let payload = event.payload.clone();
        match event.kind.as_str() {
            HEALTH => {
                let report: HealthReport = serde_json::from_value(payload)?;
                self.bridges
                    .entry(report.bridge)
                    .or_default()
                    .reports
                    .entry(report.backend)
                    .or_default()
                    .insert(
                        report.node,
                        Report {
                            node_name: report.node_name,
                            healthy: report.healthy,
                            detail: report.detail,
                            seq: event.seq,
                            timestamp_ms: event.timestamp_ms,
                        },
                    );
            }
            CONFIG => {
                let report: ConfigReport = serde_json::from_value(payload)?;
                let record = self.bridges.entry(report.bridge.clone()).or_default();
                // Reports on a backend the node no longer has are stale.
                for (backend, reports) in &mut record.reports {
                    if !report.backends.contains(backend) {
                        reports.remove(&report.node);
                    }
                }
                record.configs.insert(report.node.clone(), report);
            }
            LEFT => {
                let left: BridgeLeft = serde_json::from_value(payload)?;
                if let Some(record) = self.bridges.get_mut(&left.bridge) {
                    record.configs.remove(&left.node);
                    for reports in record.reports.values_mut() {
                        reports.remove(&left.node);
                    }
                }
            }
            ACTIVE => {
                let decision: ActiveDecision = serde_json::from_value(payload)?;
                self.bridges.entry(decision.bridge).or_default().active =
                    Some(Committed::from_event(decision.backend, decision.reason, event));
            }
            ROUTING => {
                let change: RoutingChange = serde_json::from_value(payload)?;
                self.bridges.entry(change.bridge).or_default().routing =
                    Committed::from_event(change.enabled, change.reason, event);
            }
            PIN => {
                let change: PinChange = serde_json::from_value(payload)?;
                let record = self.bridges.entry(change.bridge).or_default();
                record.pinned = change
                    .backend
                    .map(|backend| Committed::from_event(backend, change.reason, event));
            }
            DRAIN => {
                let change: DrainChange = serde_json::from_value(payload)?;
                let record = self.bridges.entry(change.bridge).or_default();
                if change.drained {
                    record
                        .drained
                        .insert(change.backend, Committed::from_event((), change.reason, event));
                } else {
                    record.drained.remove(&change.backend);
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub fn record(&self, bridge: &str) -> BridgeRecord {
        self.bridges.get(bridge).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn event(seq: u64, kind: &str, payload: serde_json::Value) -> StoredEvent {
        StoredEvent {
            seq,
            epoch: 1,
            kind: kind.into(),
            key: "k".into(),
            source: "test".into(),
            timestamp_ms: seq * 10,
            payload,
        }
    }

    /// Each kind lands where status and policy read it; a later event
    /// replaces an earlier one; undrain and unpin clear.
    #[test]
    fn folds_each_kind() {
        let mut ledger = Ledger::default();
        for (seq, kind, payload) in [
            (
                1,
                HEALTH,
                json!({"bridge": "db", "backend": "a", "node": "n1", "healthy": true}),
            ),
            (
                2,
                HEALTH,
                json!({"bridge": "db", "backend": "a", "node": "n2", "healthy": false, "detail": "refused"}),
            ),
            (3, ACTIVE, json!({"bridge": "db", "backend": "a", "reason": "first"})),
            (
                4,
                ROUTING,
                json!({"bridge": "db", "enabled": false, "reason": "maintenance"}),
            ),
            (5, PIN, json!({"bridge": "db", "backend": "b", "reason": "testing b"})),
            (
                6,
                DRAIN,
                json!({"bridge": "db", "backend": "a", "drained": true, "reason": "upgrade"}),
            ),
            (
                7,
                HEALTH,
                json!({"bridge": "db", "backend": "a", "node": "n2", "healthy": true}),
            ),
            (
                8,
                CONFIG,
                json!({"bridge": "db", "node": "n2", "backends": ["b", "a"], "failback": true}),
            ),
        ] {
            ledger.apply(&event(seq, kind, payload));
        }
        let record = ledger.record("db");
        assert_eq!(record.active_backend(), Some("a"));
        assert!(!record.routing.value);
        assert_eq!(record.routing.reason, "maintenance");
        assert_eq!(record.pinned.as_ref().unwrap().value, "b");
        assert!(record.is_drained("a"));
        let nodes: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        assert_eq!(record.votes("a", &nodes), (2, 0));
        assert_eq!(record.configs["n2"].backends, ["b", "a"]);
        assert!(record.configs["n2"].failback);
        assert_eq!(ledger.last_seq, 8);

        ledger.apply(&event(
            9,
            PIN,
            json!({"bridge": "db", "backend": null, "reason": "done"}),
        ));
        ledger.apply(&event(
            10,
            DRAIN,
            json!({"bridge": "db", "backend": "a", "drained": false, "reason": "back"}),
        ));
        let record = ledger.record("db");
        assert!(record.pinned.is_none() && !record.is_drained("a"));
    }

    /// A node's reports stop counting once it says it left the bridge, or
    /// reports a config without the backend; other nodes' stay.
    #[test]
    fn a_node_that_left_no_longer_counts() {
        let mut ledger = Ledger::default();
        let nodes: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        for (seq, node, backend) in [(1, "n1", "a"), (2, "n2", "a"), (3, "n1", "b"), (4, "n2", "b")] {
            ledger.apply(&event(
                seq,
                HEALTH,
                json!({"bridge": "db", "backend": backend, "node": node, "healthy": true}),
            ));
        }
        ledger.apply(&event(
            5,
            CONFIG,
            json!({"bridge": "db", "node": "n2", "backends": ["a"], "failback": false}),
        ));
        let record = ledger.record("db");
        assert_eq!(record.votes("a", &nodes), (2, 0));
        assert_eq!(record.votes("b", &nodes), (1, 0), "n2 no longer has b");
        assert!(record.heard_from("n2"));

        ledger.apply(&event(6, LEFT, json!({"bridge": "db", "node": "n2"})));
        let record = ledger.record("db");
        assert_eq!(record.votes("a", &nodes), (1, 0));
        assert!(!record.configs.contains_key("n2"));
        assert!(!record.heard_from("n2") && record.heard_from("n1"));
    }

    /// A malformed payload is skipped and the next event still applies.
    #[test]
    fn malformed_event_is_skipped() {
        let mut ledger = Ledger::default();
        ledger.apply(&event(1, ACTIVE, json!("not an object")));
        ledger.apply(&event(
            2,
            ACTIVE,
            json!({"bridge": "db", "backend": "a", "reason": "r"}),
        ));
        assert_eq!(ledger.record("db").active_backend(), Some("a"));
        assert_eq!(ledger.last_seq, 2);
    }
}
