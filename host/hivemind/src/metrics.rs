//! The node's Prometheus metrics, served at `GET /metrics` in the
//! OpenMetrics text format.
//!
//! Two kinds of series, one registry per node (several nodes in one test
//! process never mix):
//! - counted as things happen, in [`NodeMetrics`]: role calls, errors,
//!   traps, overloads, reloads and call latency per role, counters roles
//!   report through the `count` import (as `hivemind_counter_NAME_total`,
//!   a name space of their own, so no role can shadow a host series), and
//!   the log's writes;
//! - read at scrape time from the subsystems that own them, in
//!   [`Snapshot`]: role state and queues, the log's term, leader and
//!   indexes, membership, gossip packets, the bridges and the connect layer.
//!
//! It does not own the figures themselves: each subsystem keeps its own
//! counters (the JSON API shows the same ones), and this module names them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hivemind_runtime::{CallOutcome, Export, HostError, MAX_COUNTER_SERIES};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every series name starts with this.
const PREFIX: &str = "hivemind";
/// The content type of the text `/metrics` serves.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    role: String,
    export: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: String,
}

/// Call latency buckets: 10 µs (a DNS packet) to about 10 s (a slow
/// exec), ×4 apart.
fn call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 4.0, 11))
}

/// One role's series of `family`, one per export.
fn per_export<M: Clone, C: MetricConstructor<M>>(family: &Family<CallLabels, M, C>, role: &str) -> [M; 4] {
    Export::ALL.map(|export| {
        family
            .get_or_create(&CallLabels {
                role: role.to_string(),
                export: export.as_str(),
            })
            .clone()
    })
}

/// The series a node counts as things happen.
pub struct NodeMetrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    errors: Family<CallLabels, Counter>,
    call_seconds: Family<CallLabels, Histogram, fn() -> Histogram>,
    traps: Family<RoleLabel, Counter>,
    overloads: Family<RoleLabel, Counter>,
    reloads: Family<RoleLabel, Counter>,
    kept_replies: Family<RoleLabel, Counter>,
    roles: Mutex<BTreeMap<String, Arc<RoleMetrics>>>,
}

impl NodeMetrics {
    /// Metrics of one node; the log's write series are the log's own.
    pub fn new(log_write_seconds: Histogram, log_write_failures: Counter) -> Arc<NodeMetrics> {
        let mut registry = Registry::with_prefix(PREFIX);
        let calls = Family::<CallLabels, Counter>::default();
        let errors = Family::<CallLabels, Counter>::default();
        let call_seconds = Family::<CallLabels, Histogram, fn() -> Histogram>::new_with_constructor(call_histogram);
        let traps = Family::<RoleLabel, Counter>::default();
        let overloads = Family::<RoleLabel, Counter>::default();
        let reloads = Family::<RoleLabel, Counter>::default();
        let kept_replies = Family::<RoleLabel, Counter>::default();
        registry.register("role_calls", "Calls into a role, by export", calls.clone());
        registry.register(
            "role_errors",
            "Calls a role answered with an error: on-event refused, on-request 5xx",
            errors.clone(),
        );
        registry.register(
            "role_call_seconds",
            "Time a call ran inside the role's worker, queueing not included",
            call_seconds.clone(),
        );
        registry.register(
            "role_traps",
            "Calls that trapped; the instance was discarded",
            traps.clone(),
        );
        registry.register(
            "role_overloads",
            "Calls refused because the role's workers and queue were full",
            overloads.clone(),
        );
        registry.register(
            "role_reloads",
            "New versions of a role that went live, after the first",
            reloads.clone(),
        );
        registry.register(
            "role_kept_replies",
            "Datagrams the host answered from a reply the role let it keep (keep-reply), without a call",
            kept_replies.clone(),
        );
        registry.register(
            "log_write_seconds",
            "Time from a log write's start on this node to its commit",
            log_write_seconds,
        );
        registry.register(
            "log_write_failures",
            "Log writes on this node that failed: no quorum, refused or timed out",
            log_write_failures,
        );
        Arc::new(NodeMetrics {
            registry,
            calls,
            errors,
            call_seconds,
            traps,
            overloads,
            reloads,
            kept_replies,
            roles: Mutex::new(BTreeMap::new()),
        })
    }

    /// The series of role `name`, kept across its versions.
    pub fn role(&self, name: &str) -> Arc<RoleMetrics> {
        let mut roles = self.roles.lock().unwrap();
        if let Some(found) = roles.get(name) {
            return found.clone();
        }
        let role = RoleLabel { role: name.to_string() };
        let metrics = Arc::new(RoleMetrics {
            calls: per_export(&self.calls, name),
            errors: per_export(&self.errors, name),
            seconds: per_export(&self.call_seconds, name),
            traps: self.traps.get_or_create(&role).clone(),
            overloads: self.overloads.get_or_create(&role).clone(),
            reloads: self.reloads.get_or_create(&role).clone(),
            kept_replies: self.kept_replies.get_or_create(&role).clone(),
            reported: Mutex::new(BTreeMap::new()),
        });
        roles.insert(name.to_string(), metrics.clone());
        metrics
    }

    /// The whole exposition: these series, then the scrape-time ones.
    pub fn render(&self, snapshot: Snapshot) -> String {
        let mut text = String::with_capacity(64 << 10);
        let mut scraped = Registry::with_prefix(PREFIX);
        let reported: Vec<(String, Arc<RoleMetrics>)> = self
            .roles
            .lock()
            .unwrap()
            .iter()
            .map(|(name, metrics)| (name.clone(), metrics.clone()))
            .collect();
        scraped.register_collector(Box::new(ReportedCounters(reported)));
        scraped.register_collector(Box::new(snapshot));
        // Writing to a String cannot fail; an encoding error would be a bug
        // in a metric's own encoder, and the page then ends where it failed.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &scraped);
        let _ = prometheus_client::encoding::text::encode_eof(&mut text);
        text
    }
}

/// Label name and value pairs of one series.
type LabelSet = Vec<(String, String)>;
/// A counter's totals by label set.
type SeriesTotals = BTreeMap<LabelSet, u64>;
/// A gauge or counter read from each item of a snapshot: name, help,
/// type, value.
type Figure<T> = (&'static str, &'static str, MetricType, fn(&T) -> u64);

/// One role's series, shared by every version of it.
pub struct RoleMetrics {
    calls: [Counter; 4],
    errors: [Counter; 4],
    seconds: [Histogram; 4],
    traps: Counter,
    overloads: Counter,
    reloads: Counter,
    kept_replies: Counter,
    /// What the role reported through `count`, by counter name, then by
    /// label set.
    reported: Mutex<BTreeMap<String, SeriesTotals>>,
}

impl RoleMetrics {
    /// Counts a finished call (see [`hivemind_runtime::RoleHost::observe_call`]).
    pub fn observe_call(&self, export: Export, outcome: CallOutcome, elapsed: Duration) {
        let index = export.index();
        match outcome {
            CallOutcome::Overloaded => {
                self.overloads.inc();
                return;
            }
            CallOutcome::Trapped => {
                self.traps.inc();
            }
            CallOutcome::Error => {
                self.errors[index].inc();
            }
            CallOutcome::Ok => {}
        }
        self.calls[index].inc();
        self.seconds[index].observe(elapsed.as_secs_f64());
    }

    /// Datagrams answered from the role's kept replies.
    pub fn kept_replies_sent(&self, count: u64) {
        self.kept_replies.inc_by(count);
    }

    /// A new version went live in place of a running one.
    pub fn reloaded(&self) {
        self.reloads.inc();
    }

    /// The `count` import, after the runtime checked names and labels.
    pub fn count(&self, name: &str, labels: &[(String, String)], delta: u64) -> Result<(), HostError> {
        // One series whatever order the role lists its labels in.
        let mut labels = labels.to_vec();
        labels.sort();
        let mut reported = self.reported.lock().unwrap();
        let series_count: usize = reported.values().map(BTreeMap::len).sum();
        let known = reported.get(name).is_some_and(|series| series.contains_key(&labels));
        if !known && series_count >= MAX_COUNTER_SERIES {
            return Err(HostError::Overloaded(format!(
                "counter {name:?}: the role already has {MAX_COUNTER_SERIES} series; label by a bounded set of \
                 values (a kind or a status, not an address or a name)"
            )));
        }
        let total = reported.entry(name.to_string()).or_default().entry(labels).or_default();
        *total = total.saturating_add(delta);
        Ok(())
    }
}

impl std::fmt::Debug for RoleMetrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RoleMetrics")
    }
}

/// The `count` counters of every role, as `counter_NAME_total`.
#[derive(Debug)]
struct ReportedCounters(Vec<(String, Arc<RoleMetrics>)>);

impl Collector for ReportedCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // Two roles may report a counter of the same name: one family, told
        // apart by the `role` label.
        let mut by_name: BTreeMap<String, Vec<(LabelSet, u64)>> = BTreeMap::new();
        for (role, metrics) in &self.0 {
            for (name, series) in metrics.reported.lock().unwrap().iter() {
                let family = by_name.entry(name.clone()).or_default();
                for (labels, total) in series {
                    let mut with_role = Vec::with_capacity(labels.len() + 1);
                    with_role.push(("role".to_string(), role.clone()));
                    with_role.extend(labels.iter().cloned());
                    family.push((with_role, *total));
                }
            }
        }
        for (name, series) in by_name {
            let metric_name = format!("counter_{name}");
            let mut family = encoder.encode_descriptor(
                &metric_name,
                "A counter the role reports through its count import",
                None,
                MetricType::Counter,
            )?;
            for (labels, total) in &series {
                ConstCounter::new(*total).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// One role's figures at scrape time.
#[derive(Debug, Clone)]
pub struct RoleGauges {
    pub name: String,
    pub state: &'static str,
    pub version: String,
    pub queued: u32,
    pub busy_workers: u32,
    pub workers: u32,
}

/// One bridge backend's figures on this node.
#[derive(Debug, Clone)]
pub struct BackendGauges {
    pub name: String,
    pub active: bool,
    pub sessions: crate::bridge::proxy::BackendCountersView,
}

/// One bridge's figures on this node.
#[derive(Debug, Clone)]
pub struct BridgeGauges {
    pub name: String,
    pub routing: bool,
    pub serving: bool,
    pub refused: u64,
    pub backend_changes: u64,
    pub backends: Vec<BackendGauges>,
}

/// Figures read from the subsystems when `/metrics` is asked for.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub roles: Vec<RoleGauges>,
    pub log: crate::quorum::LogGauges,
    pub epoch: u64,
    pub degraded: bool,
    pub members: [(&'static str, u64); 3],
    pub gossip: crate::membership::GossipCounters,
    pub bridges: Vec<BridgeGauges>,
    pub connect_links: u64,
    pub connect_calls: u64,
    pub connect_failed: u64,
    pub last_seq: u64,
}

/// Every state a role can be in, so a state's series goes to 0 rather than
/// vanishing when the role leaves it.
const ROLE_STATES: [&str; 5] = ["loading", "running", "paused", "disabled", "failed"];

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.encode_roles(&mut encoder)?;
        self.encode_log(&mut encoder)?;
        self.encode_membership(&mut encoder)?;
        self.encode_bridges(&mut encoder)?;
        counter(
            &mut encoder,
            "connect_calls",
            "Calls this node's roles made to roles on other nodes",
            self.connect_calls,
        )?;
        counter(
            &mut encoder,
            "connect_failed",
            "Calls to other nodes that failed",
            self.connect_failed,
        )?;
        gauge(
            &mut encoder,
            "connect_links",
            "Open connections to other nodes for role calls",
            self.connect_links as i64,
        )
    }
}

impl Snapshot {
    fn encode_roles(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(
            "role_state",
            "1 for the state each role is in, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for role in &self.roles {
            for state in ROLE_STATES {
                let labels = [("role", role.name.as_str()), ("state", state)];
                ConstGauge::new(i64::from(role.state == state)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "role_info",
            "The version each role runs, as a label",
            None,
            MetricType::Gauge,
        )?;
        for role in self.roles.iter().filter(|role| !role.version.is_empty()) {
            let labels = [("role", role.name.as_str()), ("version", role.version.as_str())];
            ConstGauge::new(1).encode(family.encode_family(&labels)?)?;
        }
        let per_role: [Figure<RoleGauges>; 3] = [
            (
                "role_queue_depth",
                "Calls waiting for a worker",
                MetricType::Gauge,
                |role| u64::from(role.queued),
            ),
            (
                "role_busy_workers",
                "Workers running a call now",
                MetricType::Gauge,
                |role| u64::from(role.busy_workers),
            ),
            (
                "role_workers",
                "Workers a role may run at once",
                MetricType::Gauge,
                |role| u64::from(role.workers),
            ),
        ];
        for (name, help, _, value) in per_role {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for role in &self.roles {
                let labels = [("role", role.name.as_str())];
                ConstGauge::new(value(role) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn encode_log(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let log = &self.log;
        let figures: [(&str, &str, u64); 12] = [
            ("log_term", "The current Raft term", log.term),
            (
                "log_is_leader",
                "1 when this node leads the log",
                u64::from(log.is_leader),
            ),
            (
                "log_has_leader",
                "1 when this node knows a leader",
                u64::from(log.has_leader),
            ),
            ("log_last_index", "The last index in this node's log", log.last_index),
            (
                "log_commit_index",
                "The highest index this node knows committed",
                log.committed,
            ),
            ("log_applied_index", "The last index applied here", log.applied),
            (
                "log_apply_lag",
                "Committed entries not yet applied here",
                log.committed.saturating_sub(log.applied),
            ),
            ("log_voters", "Voters in the cluster configuration", log.voters as u64),
            (
                "log_reachable_voters",
                "Voters this node reaches whose logs run, itself included",
                log.reachable_voters as u64,
            ),
            (
                "log_core_running",
                "1 while this node's Raft core runs; 0 after it stopped (a full disk, an I/O error) until it restarts",
                u64::from(log.core_running),
            ),
            (
                "member_clock_offset_max_ms",
                "The largest offset, either way, between this node's clock and a member's it pings, in ms",
                log.clock_offset_max_ms,
            ),
            (
                "log_epoch",
                "The cluster epoch (generation of the voter set)",
                self.epoch,
            ),
        ];
        for (name, help, value) in figures {
            gauge(encoder, name, help, value as i64)?;
        }
        counter(
            encoder,
            "log_core_restarts",
            "Raft cores started in place of a stopped one since this process started",
            log.core_restarts,
        )?;
        gauge(
            encoder,
            "cluster_degraded",
            "1 when this node cannot write: no quorum or no leader seen, not yet admitted, or removed",
            i64::from(self.degraded),
        )?;
        gauge(
            encoder,
            "log_last_seq",
            "The newest event seq applied here",
            self.last_seq as i64,
        )
    }

    fn encode_membership(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(
            "members",
            "Members as this node's gossip sees them, by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in self.members {
            ConstGauge::new(count as i64).encode(family.encode_family(&[("state", state)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "gossip_packets",
            "Gossip packets, by direction",
            None,
            MetricType::Counter,
        )?;
        for (direction, count) in [("sent", self.gossip.sent), ("received", self.gossip.received)] {
            ConstCounter::new(count).encode(family.encode_family(&[("direction", direction)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "gossip_packets_rejected",
            "Gossip packets dropped: not sealed with the cluster key (rejected) or refused by the protocol",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in [("unsealed", self.gossip.rejected), ("refused", self.gossip.refused)] {
            ConstCounter::new(count).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }

    fn encode_bridges(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let per_bridge: [Figure<BridgeGauges>; 4] = [
            ("bridge_routing", "1 when routing is on", MetricType::Gauge, |bridge| {
                u64::from(bridge.routing)
            }),
            (
                "bridge_serving",
                "1 when this node's bridge accepts clients and has a backend",
                MetricType::Gauge,
                |bridge| u64::from(bridge.serving),
            ),
            (
                "bridge_refused",
                "Clients closed at once: routing off or no backend",
                MetricType::Counter,
                |bridge| bridge.refused,
            ),
            (
                "bridge_backend_changes",
                "Times this node's route moved to another backend",
                MetricType::Counter,
                |bridge| bridge.backend_changes,
            ),
        ];
        for (name, help, kind, value) in per_bridge {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for bridge in &self.bridges {
                let labels = [("bridge", bridge.name.as_str())];
                let metric = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(bridge)).encode(metric)?,
                    _ => ConstGauge::new(value(bridge) as i64).encode(metric)?,
                }
            }
        }
        let per_backend: [Figure<BackendGauges>; 7] = [
            (
                "bridge_active",
                "1 for the backend this node routes to",
                MetricType::Gauge,
                |backend| u64::from(backend.active),
            ),
            (
                "bridge_sessions",
                "Bridged connections open now",
                MetricType::Gauge,
                |backend| backend.sessions.current,
            ),
            (
                "bridge_sessions_opened",
                "Bridged connections opened",
                MetricType::Counter,
                |backend| backend.sessions.total,
            ),
            (
                "bridge_severed",
                "Bridged connections severed because the route moved or routing went off",
                MetricType::Counter,
                |backend| backend.sessions.severed,
            ),
            (
                "bridge_connect_failures",
                "Connections to the backend that failed",
                MetricType::Counter,
                |backend| backend.sessions.connect_failures,
            ),
            (
                "bridge_bytes_to_backend",
                "Bytes copied from clients to the backend",
                MetricType::Counter,
                |backend| backend.sessions.bytes_to_backend,
            ),
            (
                "bridge_bytes_to_client",
                "Bytes copied from the backend to clients",
                MetricType::Counter,
                |backend| backend.sessions.bytes_to_client,
            ),
        ];
        for (name, help, kind, value) in per_backend {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for bridge in &self.bridges {
                for backend in &bridge.backends {
                    let labels = [("bridge", bridge.name.as_str()), ("backend", backend.name.as_str())];
                    let metric = family.encode_family(&labels)?;
                    match kind {
                        MetricType::Counter => ConstCounter::new(value(backend)).encode(metric)?,
                        _ => ConstGauge::new(value(backend) as i64).encode(metric)?,
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn node() -> Arc<NodeMetrics> {
        NodeMetrics::new(Histogram::new([0.001]), Counter::default())
    }

    /// Counts add up per series, labels in any order are one series, and
    /// they are served as `hivemind_counter_NAME_total` with the role's name.
    #[test]
    fn reported_counters_add_up_under_their_own_name() {
        let metrics = node();
        let dns = metrics.role("dns");
        dns.count("queries", &labels(&[("qtype", "A"), ("rcode", "NOERROR")]), 2)
            .unwrap();
        dns.count("queries", &labels(&[("rcode", "NOERROR"), ("qtype", "A")]), 3)
            .unwrap();
        metrics.role("other").count("queries", &[], 1).unwrap();
        let text = metrics.render(Snapshot::default());
        assert!(
            text.contains("hivemind_counter_queries_total{role=\"dns\",qtype=\"A\",rcode=\"NOERROR\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("hivemind_counter_queries_total{role=\"other\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE hivemind_counter_queries counter").count(),
            1,
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    /// Past the series limit a new series is refused as `overloaded`, and
    /// the series already kept still count.
    #[test]
    fn a_role_keeps_at_most_the_series_limit() {
        let role = node().role("chatty");
        for index in 0..MAX_COUNTER_SERIES {
            role.count("hits", &labels(&[("client", &index.to_string())]), 1)
                .unwrap();
        }
        let refused = role.count("hits", &labels(&[("client", "one-too-many")]), 1);
        assert!(matches!(refused, Err(HostError::Overloaded(_))), "{refused:?}");
        role.count("hits", &labels(&[("client", "0")]), 1).unwrap();
    }

    /// A call's outcome lands in the right series: calls, errors, traps;
    /// an overloaded call is not a call.
    #[test]
    fn calls_are_counted_by_export_and_outcome() {
        let metrics = node();
        let role = metrics.role("probe");
        role.observe_call(Export::Request, CallOutcome::Ok, Duration::from_micros(50));
        role.observe_call(Export::Request, CallOutcome::Error, Duration::from_micros(50));
        role.observe_call(Export::Event, CallOutcome::Trapped, Duration::from_micros(50));
        role.observe_call(Export::Event, CallOutcome::Overloaded, Duration::ZERO);
        let text = metrics.render(Snapshot::default());
        for line in [
            "hivemind_role_calls_total{role=\"probe\",export=\"on-request\"} 2",
            "hivemind_role_errors_total{role=\"probe\",export=\"on-request\"} 1",
            "hivemind_role_calls_total{role=\"probe\",export=\"on-event\"} 1",
            "hivemind_role_traps_total{role=\"probe\"} 1",
            "hivemind_role_overloads_total{role=\"probe\"} 1",
            "hivemind_role_call_seconds_count{role=\"probe\",export=\"on-request\"} 2",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }
}
