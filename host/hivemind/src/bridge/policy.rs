//! The leader's choice of a bridge's active backend, from what the log
//! holds: a pure function, so every case is a unit test.
//!
//! - A pinned backend is active, whatever the checks say: the operator
//!   knows something they do not.
//! - Otherwise the current active stays while it is healthy and not
//!   drained; no failback to a backend earlier in the order unless the
//!   bridge has `failback = true`.
//! - When it fails (or is drained), the first healthy, undrained backend in
//!   order takes over; with none, the active becomes none.
//!
//! Health is the reports of the members the log holds alive: a candidate
//! needs a majority of them to see it up; the current active stays up
//! while at least half do, so one node with a bad path to it cannot move
//! the whole cluster.

use std::collections::BTreeSet;

use super::config::BridgeConfig;
use super::ledger::BridgeRecord;

/// The new active backend and why, or `None` when nothing should change.
pub fn decide(
    config: &BridgeConfig,
    record: &BridgeRecord,
    alive: &BTreeSet<String>,
) -> Option<(Option<String>, String)> {
    let current = record.active_backend();
    let configured = |name: &str| config.backends.iter().any(|backend| backend.name == name);
    let up_for_candidate = |name: &str| {
        let (up, down) = record.votes(name, alive);
        up > down
    };
    let up_for_current = |name: &str| {
        let (up, down) = record.votes(name, alive);
        up > 0 && up >= down
    };
    let choice = if let Some(pin) = record.pinned.as_ref().filter(|pin| configured(&pin.value)) {
        (
            Some(pin.value.clone()),
            format!("pinned by an operator: {}", pin.reason),
        )
    } else {
        let usable = |name: &str| {
            !record.is_drained(name)
                && if Some(name) == current {
                    up_for_current(name)
                } else {
                    up_for_candidate(name)
                }
        };
        let best = config
            .backends
            .iter()
            .map(|backend| backend.name.as_str())
            .find(|name| usable(name));
        match current {
            Some(current) if configured(current) && usable(current) => match best {
                Some(best) if best != current && config.failback => (
                    Some(best.to_string()),
                    format!("failback: {best} is healthy again and comes before {current}"),
                ),
                _ => return None,
            },
            _ => {
                let why_not_current = match current {
                    None => "no backend was active".to_string(),
                    Some(current) if !configured(current) => format!("{current} is no longer configured"),
                    Some(current) if record.is_drained(current) => {
                        format!("{current} is drained: {}", record.drained[current].reason)
                    }
                    Some(current) => {
                        let (up, down) = record.votes(current, alive);
                        format!("{current} failed its checks on {down} of {} nodes", up + down)
                    }
                };
                match best {
                    Some(best) => (
                        Some(best.to_string()),
                        format!("{why_not_current}; {best} is the first healthy backend"),
                    ),
                    None => (None, format!("{why_not_current}; no backend is healthy")),
                }
            }
        }
    };
    let unchanged = match &record.active {
        Some(active) => active.value == choice.0,
        // Nothing decided yet and nothing to route to: nothing to commit.
        None => choice.0.is_none(),
    };
    (!unchanged).then_some(choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::config::{BackendConfig, HealthCheck, WhenIsolated};
    use crate::bridge::ledger::{Committed, Report};

    fn config(failback: bool) -> BridgeConfig {
        BridgeConfig {
            name: "db".into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            backends: ["a", "b", "c"]
                .into_iter()
                .map(|name| BackendConfig {
                    name: name.into(),
                    address: "127.0.0.1:2".into(),
                    check: HealthCheck::Tcp {
                        address: "127.0.0.1:2".into(),
                    },
                })
                .collect(),
            interval: Default::default(),
            timeout: Default::default(),
            rise: 1,
            fall: 1,
            failback,
            when_isolated: WhenIsolated::Keep,
            connect_timeout: Default::default(),
            splice: true,
            max_sessions: None,
        }
    }

    fn committed<T>(value: T) -> Committed<T> {
        Committed {
            value,
            reason: "because".into(),
            seq: 1,
            timestamp_ms: 0,
        }
    }

    /// A record where each of nodes n1..n3 reports each backend as the
    /// string says: `up` is the backends all three see up.
    fn record(active: Option<&str>, up: &[&str]) -> BridgeRecord {
        let mut record = BridgeRecord {
            active: active.map(|name| committed(Some(name.to_string()))),
            ..Default::default()
        };
        for backend in ["a", "b", "c"] {
            for node in ["n1", "n2", "n3"] {
                report(&mut record, backend, node, up.contains(&backend));
            }
        }
        record
    }

    fn report(record: &mut BridgeRecord, backend: &str, node: &str, healthy: bool) {
        record.reports.entry(backend.into()).or_default().insert(
            node.into(),
            Report {
                node_name: node.into(),
                healthy,
                detail: String::new(),
                seq: 1,
                timestamp_ms: 0,
            },
        );
    }

    fn alive() -> BTreeSet<String> {
        ["n1", "n2", "n3"].into_iter().map(String::from).collect()
    }

    fn chosen(decision: Option<(Option<String>, String)>) -> Option<Option<String>> {
        decision.map(|(backend, _)| backend)
    }

    /// The first decision takes the first healthy backend in order.
    #[test]
    fn first_decision_is_first_healthy() {
        let decision = decide(&config(false), &record(None, &["b", "c"]), &alive());
        assert_eq!(chosen(decision), Some(Some("b".into())));
    }

    /// No reports yet: nothing is committed.
    #[test]
    fn nothing_before_reports() {
        assert_eq!(decide(&config(false), &BridgeRecord::default(), &alive()), None);
    }

    /// A healthy active stays even when an earlier backend recovers.
    #[test]
    fn no_failback_by_default() {
        assert_eq!(decide(&config(false), &record(Some("b"), &["a", "b"]), &alive()), None);
    }

    /// With failback, the earlier backend takes over again.
    #[test]
    fn failback_when_asked() {
        let decision = decide(&config(true), &record(Some("b"), &["a", "b"]), &alive());
        assert_eq!(chosen(decision), Some(Some("a".into())));
    }

    /// A failed active is replaced by the first healthy one, and the reason says so.
    #[test]
    fn failover_names_the_failure() {
        let (backend, reason) = decide(&config(false), &record(Some("a"), &["c"]), &alive()).unwrap();
        assert_eq!(backend.as_deref(), Some("c"));
        assert!(reason.contains("a failed its checks on 3 of 3 nodes"), "{reason}");
    }

    /// No healthy backend at all: the active becomes none.
    #[test]
    fn none_healthy_clears_the_active() {
        let decision = decide(&config(false), &record(Some("a"), &[]), &alive());
        assert_eq!(chosen(decision), Some(None));
    }

    /// One node of three seeing the active down does not move it; a
    /// candidate seen up by one node of three is not chosen.
    #[test]
    fn minority_views_do_not_move_the_active() {
        let mut record = record(Some("a"), &["a"]);
        report(&mut record, "a", "n1", false);
        assert_eq!(decide(&config(false), &record, &alive()), None);

        let mut record = self::record(Some("a"), &[]);
        report(&mut record, "b", "n1", true);
        report(&mut record, "c", "n1", true);
        report(&mut record, "c", "n2", true);
        let decision = decide(&config(false), &record, &alive());
        assert_eq!(chosen(decision), Some(Some("c".into())));
    }

    /// Reports of nodes the log does not hold alive do not count.
    #[test]
    fn reports_of_failed_nodes_do_not_count() {
        let mut record = record(Some("a"), &["a", "b"]);
        for node in ["n2", "n3"] {
            report(&mut record, "a", node, false);
        }
        let only_n1: BTreeSet<String> = ["n1".to_string()].into();
        assert_eq!(decide(&config(false), &record, &only_n1), None);
        assert_eq!(
            chosen(decide(&config(false), &record, &alive())),
            Some(Some("b".into()))
        );
    }

    /// A pin wins over health; unpinned, the pinned backend stays while healthy.
    #[test]
    fn pin_wins() {
        let mut record = record(Some("a"), &["a", "b"]);
        record.pinned = Some(committed("c".to_string()));
        let (backend, reason) = decide(&config(false), &record, &alive()).unwrap();
        assert_eq!(backend.as_deref(), Some("c"));
        assert!(reason.starts_with("pinned"), "{reason}");

        let mut record = self::record(Some("b"), &["a", "b"]);
        record.pinned = None;
        assert_eq!(decide(&config(false), &record, &alive()), None);
    }

    /// Draining the active moves it to the next healthy backend, and a
    /// drained backend is never chosen.
    #[test]
    fn drain_moves_the_active() {
        let mut record = record(Some("a"), &["a", "b", "c"]);
        record.drained.insert("a".into(), committed(()));
        record.drained.insert("b".into(), committed(()));
        let (backend, reason) = decide(&config(false), &record, &alive()).unwrap();
        assert_eq!(backend.as_deref(), Some("c"));
        assert!(reason.contains("a is drained"), "{reason}");
    }
}
