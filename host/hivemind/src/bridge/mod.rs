//! Bridges: TCP proxies that route every client to the one backend the
//! cluster agreed on.
//!
//! The active backend is a committed log entry (`bridge.active`), never a
//! node's own choice, so every node's bridge routes to the same backend:
//!
//! - `monitor`: each node checks each backend and (here) reports its view
//!   as `bridge.health` when it changes.
//! - `policy`: the leader decides from the reports of live members and
//!   commits `bridge.active` with a reason.
//! - `ledger`: every node folds `bridge.*` events into what is committed;
//!   the follower task turns that into each bridge's [`proxy::Route`].
//! - `proxy` and `relay`: the data path; sessions are severed when the
//!   committed route moves away from their backend.
//!
//! Operators act through committed entries too (`bridge.routing`,
//! `bridge.pin`, `bridge.drain`), each with a reason; see [`Bridges::act`].
//! A node cut off from the quorum keeps its last committed route (or, with
//! `when_isolated = "stop"`, refuses clients) and never picks a backend.

pub mod busy_poll;
pub mod cli;
pub mod config;
pub mod ledger;
pub mod monitor;
pub mod policy;
pub mod proxy;
pub mod relay;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::log::{EventLog, LogError, NewEvent};
use crate::quorum::{NodeHealth, QuorumLog, hex_id};
use config::{BridgeConfig, WhenIsolated};
use ledger::{ActiveDecision, BridgeLeft, ConfigReport, DrainChange, HealthReport, Ledger, PinChange, RoutingChange};
use monitor::LocalView;
use proxy::{BridgeCounters, Route};

/// How often a node checks whether it still reaches a quorum.
const ISOLATION_CHECK: Duration = Duration::from_millis(100);
/// How often a failed health report is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How often the leader decides even without a bridge event.
const DECIDE_EVERY: Duration = Duration::from_millis(250);
/// Events read per page while catching up.
const PAGE: usize = 1000;
/// How long an operator action waits to see its entry applied here.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// One configured bridge on this node.
struct Bridge {
    config: Arc<BridgeConfig>,
    route: watch::Sender<Route>,
    local: watch::Receiver<LocalView>,
    counters: Arc<BridgeCounters>,
}

/// Every bridge of this node and the tasks that keep them.
pub struct Bridges {
    log: Arc<QuorumLog>,
    node: String,
    node_name: String,
    bridges: Vec<Bridge>,
    ledger: watch::Sender<Arc<Ledger>>,
    isolated: AtomicBool,
    /// Notified by the monitors when a backend's local health changes.
    views_changed: Arc<tokio::sync::Notify>,
    /// Set once the ledger has been read up to the end of the log.
    caught_up: AtomicBool,
    /// On a node without bridges: cancelled once the log holds nothing
    /// left from bridges this node had before, which ends the tasks.
    nothing_left: CancellationToken,
}

/// An operator's action on a bridge; each needs a reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// Turn routing on or off.
    pub enabled: Option<bool>,
    /// Pin this backend (`null`: unpin).
    #[serde(default, with = "serde_with_double_option")]
    pub pin: Option<Option<String>>,
    /// Drain this backend.
    pub drain: Option<String>,
    /// Put a drained backend back.
    pub undrain: Option<String>,
    #[serde(default)]
    pub reason: String,
}

/// `"pin": null` (unpin) told apart from no `pin` at all.
mod serde_with_double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(deserializer).map(Some)
    }
}

/// Why an operator action was not taken; `status` is the HTTP status.
#[derive(Debug)]
pub struct ActionError {
    pub status: u16,
    pub message: String,
}

impl ActionError {
    fn new(status: u16, message: impl Into<String>) -> ActionError {
        ActionError {
            status,
            message: message.into(),
        }
    }
}

impl Bridges {
    /// Binds every bridge's listener (an address in use is an error naming
    /// the bridge) and starts its monitor, data path, and the shared
    /// follower, reporter and decider tasks.
    pub async fn start(
        configs: Vec<BridgeConfig>,
        data_plane: &crate::config::DataPlaneSettings,
        log: Arc<QuorumLog>,
        node_name: String,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(Arc<Bridges>, Vec<tokio::task::JoinHandle<()>>)> {
        let mut tasks = Vec::new();
        let mut bridges = Vec::new();
        let views_changed = Arc::new(tokio::sync::Notify::new());
        // Every listener first: a port in use stops the start before any
        // thread exists. Each data-plane thread gets its own.
        let threads = data_plane.threads;
        let mut bound = Vec::new();
        for config in configs {
            let listeners = proxy::bind_listeners(config.listen, threads).map_err(|error| {
                anyhow::anyhow!(
                    "bridge {:?} cannot listen on {} ({error}); free the port or change `listen` in its [[bridge]] \
                     section",
                    config.name,
                    config.listen
                )
            })?;
            bound.push((config, listeners));
        }
        let plane = if bound.is_empty() {
            None
        } else {
            let (plane, stopped) = proxy::DataPlane::start(threads, data_plane.busy_poll, shutdown)?;
            tasks.push(stopped);
            Some(plane)
        };
        for (config, listeners) in bound {
            let config = Arc::new(config);
            let (route, route_seen) = watch::channel(Route {
                enabled: false,
                reason: "reading the log".into(),
                ..Route::default()
            });
            let (local_sender, local) = watch::channel(LocalView::new());
            let counters = Arc::new(BridgeCounters::new(&config));
            tasks.push(tokio::spawn(monitor::run(
                (*config).clone(),
                local_sender,
                views_changed.clone(),
                shutdown.clone(),
            )));
            plane.as_ref().expect("a data plane when there are bridges").serve(
                listeners,
                config.clone(),
                route_seen,
                counters.clone(),
                shutdown,
            )?;
            tracing::info!(bridge = %config.name, listen = %config.listen, "bridge listening");
            bridges.push(Bridge {
                config,
                route,
                local,
                counters,
            });
        }
        let bridges = Arc::new(Bridges {
            node: hex_id(log.id()),
            log,
            node_name,
            bridges,
            ledger: watch::channel(Arc::new(Ledger::default())).0,
            isolated: AtomicBool::new(false),
            views_changed,
            caught_up: AtomicBool::new(false),
            nothing_left: CancellationToken::new(),
        });
        // A node without bridges still follows and reports until it has
        // said it left the bridges it had before (`bridge.left`).
        tasks.push(tokio::spawn(bridges.clone().follow(shutdown.clone())));
        tasks.push(tokio::spawn(bridges.clone().report(shutdown.clone())));
        if !bridges.bridges.is_empty() {
            tasks.push(tokio::spawn(bridges.clone().decide(shutdown.clone())));
        }
        Ok((bridges, tasks))
    }

    fn bridge(&self, name: &str) -> Result<&Bridge, ActionError> {
        self.bridges
            .iter()
            .find(|bridge| bridge.config.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.bridges.iter().map(|bridge| bridge.config.name.as_str()).collect();
                ActionError::new(
                    404,
                    if known.is_empty() {
                        format!("no bridge named {name:?}: this node has no [[bridge]] sections in its config")
                    } else {
                        format!("no bridge named {name:?}; this node has: {}", known.join(", "))
                    },
                )
            })
    }

    /// Folds new `bridge.*` events as they commit and updates every route.
    async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut applied = self.log.watch_last();
        let mut ticker = tokio::time::interval(ISOLATION_CHECK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        // Read the log at start, after each commit, and after a failed read.
        let mut read_log = true;
        let mut first = true;
        loop {
            let mut changed = false;
            if read_log {
                read_log = false;
                let mut ledger: Option<Ledger> = None;
                loop {
                    let after = ledger
                        .as_ref()
                        .map_or_else(|| self.ledger.borrow().last_seq, |ledger| ledger.last_seq);
                    // Every kind is read so the cursor moves past events that
                    // are not the bridges' (a prefix filter would rescan them).
                    match self.log.since(after, "", PAGE).await {
                        Ok(events) if events.is_empty() => break,
                        Ok(events) => {
                            let ledger = ledger.get_or_insert_with(|| (**self.ledger.borrow()).clone());
                            for event in events.iter().filter(|event| event.kind.starts_with(ledger::PREFIX)) {
                                ledger.apply(event);
                            }
                            ledger.last_seq = ledger.last_seq.max(events.last().map_or(0, |event| event.seq));
                            warned = false;
                        }
                        Err(error) => {
                            if !warned && !self.bridges.is_empty() {
                                tracing::warn!(%error, "bridges cannot read the log; keeping the last routes");
                                warned = true;
                            }
                            read_log = true;
                            break;
                        }
                    }
                }
                if let Some(ledger) = ledger {
                    self.ledger.send_replace(Arc::new(ledger));
                    changed = true;
                }
                if !read_log && !self.caught_up.swap(true, Ordering::Relaxed) {
                    // The reporter judges what is left only from a full read.
                    self.ledger.send_modify(|_| {});
                }
            }
            let isolated = !self.log.has_quorum();
            let was_isolated = self.isolated.swap(isolated, Ordering::Relaxed);
            if isolated != was_isolated {
                changed = true;
                // A node without bridges routes nothing: nothing to say.
                if !self.bridges.is_empty() {
                    if isolated {
                        tracing::warn!("this node cannot reach a quorum: bridges keep their last committed routes");
                    } else {
                        tracing::info!("this node reaches a quorum again");
                    }
                }
            }
            if changed || first {
                first = false;
                self.update_routes(isolated);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.nothing_left.cancelled() => return,
                _ = applied.changed() => read_log = true,
                _ = ticker.tick() => {}
            }
        }
    }

    /// Recomputes every bridge's route from the ledger; sessions see a
    /// changed route at once.
    fn update_routes(&self, isolated: bool) {
        let ledger = self.ledger.borrow().clone();
        for bridge in &self.bridges {
            let route = route_for(&bridge.config, &ledger.record(&bridge.config.name), isolated);
            bridge.route.send_if_modified(|current| {
                if *current == route {
                    return false;
                }
                if current.backend.as_ref().map(|(name, _)| name) != route.backend.as_ref().map(|(name, _)| name) {
                    bridge.counters.backend_changes.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    bridge = %bridge.config.name,
                    backend = route.backend.as_ref().map(|(name, _)| name.as_str()).unwrap_or("none"),
                    enabled = route.enabled,
                    reason = %route.reason,
                    "route changed"
                );
                *current = route;
                true
            });
        }
    }

    /// Commits this node's view of a backend whenever it differs from the
    /// last one the log holds from this node, and this node's config of
    /// each bridge (`bridge.config`) whenever the log holds another.
    async fn report(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ledger_seen = self.ledger.subscribe();
        let mut ticker = tokio::time::interval(RETRY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.views_changed.notified() => {}
                _ = ledger_seen.changed() => {}
                _ = ticker.tick() => {}
            }
            if !self.log.has_quorum() || !self.caught_up.load(Ordering::Relaxed) {
                continue;
            }
            let ledger = self.ledger.borrow().clone();
            let left: Vec<&String> = ledger
                .bridges
                .iter()
                .filter(|(name, record)| {
                    record.heard_from(&self.node) && !self.bridges.iter().any(|bridge| &bridge.config.name == *name)
                })
                .map(|(name, _)| name)
                .collect();
            for name in &left {
                let gone = BridgeLeft {
                    bridge: (*name).clone(),
                    node: self.node.clone(),
                };
                match self.append(ledger::LEFT, format!("{name}@{}", self.node), &gone).await {
                    Ok(seq) => {
                        tracing::info!(bridge = %name, seq, "this node no longer has the bridge; its reports are withdrawn");
                        self.wait_applied(seq, APPLY_WAIT).await;
                    }
                    Err(error) => tracing::debug!(%error, "cannot withdraw a bridge's reports; retrying"),
                }
            }
            if self.bridges.is_empty() {
                if left.is_empty() {
                    self.nothing_left.cancel();
                    return;
                }
                continue;
            }
            for bridge in &self.bridges {
                let record = ledger.record(&bridge.config.name);
                let config = self.config_report(bridge);
                if record.configs.get(&self.node) != Some(&config) {
                    let key = format!("{}@{}", bridge.config.name, self.node);
                    match self.append(ledger::CONFIG, key, &config).await {
                        Ok(seq) => self.wait_applied(seq, APPLY_WAIT).await,
                        Err(error) => tracing::debug!(%error, "cannot report the bridge's config; retrying"),
                    }
                }
                let view = bridge.local.borrow().clone();
                for (backend, health) in view {
                    let Some(healthy) = health.healthy else { continue };
                    let committed = record
                        .reports
                        .get(&backend)
                        .and_then(|reports| reports.get(&self.node))
                        .map(|report| report.healthy);
                    if committed == Some(healthy) {
                        continue;
                    }
                    let report = HealthReport {
                        bridge: bridge.config.name.clone(),
                        backend: backend.clone(),
                        node: self.node.clone(),
                        node_name: self.node_name.clone(),
                        healthy,
                        detail: health.detail.clone(),
                    };
                    let key = format!("{}/{backend}@{}", bridge.config.name, self.node);
                    match self.append(ledger::HEALTH, key, &report).await {
                        Ok(seq) => {
                            warned = false;
                            tracing::info!(bridge = %bridge.config.name, %backend, healthy, detail = %health.detail, seq, "reported backend health");
                            self.wait_applied(seq, APPLY_WAIT).await;
                        }
                        Err(error) => {
                            if !warned {
                                tracing::warn!(%error, "cannot report backend health; retrying");
                                warned = true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// On the leader: commits a new active backend whenever the policy
    /// says so.
    async fn decide(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ledger_seen = self.ledger.subscribe();
        // Membership health (whose reports count) changes without a
        // bridge event; the tick catches it.
        let mut ticker = tokio::time::interval(DECIDE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ledger_seen.changed() => {}
                _ = ticker.tick() => {}
            }
            // Without a quorum nothing can commit: a cut-off leader waits.
            if !self.log.is_leader() || !self.log.has_quorum() {
                continue;
            }
            let alive = self.alive_members();
            let ledger = self.ledger.borrow().clone();
            for bridge in &self.bridges {
                let record = ledger.record(&bridge.config.name);
                let Some((backend, reason)) = policy::decide(&bridge.config, &record, &alive) else {
                    continue;
                };
                let decision = ActiveDecision {
                    bridge: bridge.config.name.clone(),
                    backend: backend.clone(),
                    reason: reason.clone(),
                };
                match self.append(ledger::ACTIVE, bridge.config.name.clone(), &decision).await {
                    Ok(seq) => {
                        tracing::info!(bridge = %bridge.config.name, backend = backend.as_deref().unwrap_or("none"), %reason, seq, "decided the active backend");
                        // Decide again only from a ledger that holds this.
                        self.wait_applied(seq, APPLY_WAIT).await;
                    }
                    Err(error) => {
                        tracing::warn!(bridge = %bridge.config.name, %error, "cannot commit the active backend")
                    }
                }
            }
        }
    }

    /// What this node's `[[bridge]]` section says that every node must share.
    fn config_report(&self, bridge: &Bridge) -> ConfigReport {
        ConfigReport {
            bridge: bridge.config.name.clone(),
            node: self.node.clone(),
            node_name: self.node_name.clone(),
            backends: bridge
                .config
                .backends
                .iter()
                .map(|backend| backend.name.clone())
                .collect(),
            failback: bridge.config.failback,
        }
    }

    /// Members the log holds alive (hex ids): their reports count.
    fn alive_members(&self) -> BTreeSet<String> {
        let state = self.log.cluster_state();
        self.log
            .member_addresses()
            .0
            .into_keys()
            .filter(|id| {
                state
                    .members
                    .get(id)
                    .is_none_or(|member| member.health == NodeHealth::Alive)
            })
            .map(hex_id)
            .collect()
    }

    async fn append(&self, kind: &str, key: String, payload: &impl serde::Serialize) -> Result<u64, LogError> {
        self.log
            .append(NewEvent {
                kind: kind.into(),
                key,
                source: self.node.clone(),
                payload: serde_json::to_vec(payload).unwrap_or_default(),
            })
            .await
    }

    /// Waits (at most `limit`) until the ledger has folded `seq`.
    async fn wait_applied(&self, seq: u64, limit: Duration) {
        let mut seen = self.ledger.subscribe();
        let _ = tokio::time::timeout(limit, seen.wait_for(|ledger| ledger.last_seq >= seq)).await;
    }

    /// Takes an operator action: validated against this node's config,
    /// committed, and applied here before the new status is returned.
    pub async fn act(&self, name: &str, action: Action) -> Result<Value, ActionError> {
        let bridge = self.bridge(name)?;
        let reason = action.reason.trim().to_string();
        if reason.is_empty() {
            return Err(ActionError::new(
                400,
                "a reason is required: say why, e.g. {\"enabled\": false, \"reason\": \"db-1 maintenance\"} \
                 (CLI: --reason TEXT)",
            ));
        }
        let chosen = [
            action.enabled.is_some(),
            action.pin.is_some(),
            action.drain.is_some(),
            action.undrain.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if chosen != 1 {
            return Err(ActionError::new(
                400,
                "give exactly one of \"enabled\" (true/false), \"pin\" (a backend, or null to unpin), \"drain\" or \
                 \"undrain\" (a backend), with a \"reason\"",
            ));
        }
        let known = |backend: &str| -> Result<(), ActionError> {
            if bridge.config.backends.iter().any(|known| known.name == backend) {
                Ok(())
            } else {
                let names: Vec<&str> = bridge.config.backends.iter().map(|known| known.name.as_str()).collect();
                Err(ActionError::new(
                    400,
                    format!(
                        "bridge {name:?} has no backend {backend:?}; its backends: {}",
                        names.join(", ")
                    ),
                ))
            }
        };
        let bridge_name = bridge.config.name.clone();
        let written = if let Some(enabled) = action.enabled {
            let change = RoutingChange {
                bridge: bridge_name.clone(),
                enabled,
                reason,
            };
            self.append(ledger::ROUTING, bridge_name.clone(), &change).await
        } else if let Some(pin) = action.pin {
            if let Some(backend) = &pin {
                known(backend)?;
            }
            let change = PinChange {
                bridge: bridge_name.clone(),
                backend: pin,
                reason,
            };
            self.append(ledger::PIN, bridge_name.clone(), &change).await
        } else {
            let (backend, drained) = match (action.drain, action.undrain) {
                (Some(backend), _) => (backend, true),
                (None, Some(backend)) => (backend, false),
                (None, None) => unreachable!("one action was counted"),
            };
            known(&backend)?;
            let change = DrainChange {
                bridge: bridge_name.clone(),
                backend: backend.clone(),
                drained,
                reason,
            };
            self.append(ledger::DRAIN, format!("{bridge_name}/{backend}"), &change)
                .await
        };
        let seq = written.map_err(|error| match error {
            LogError::Unavailable(_) => ActionError::new(503, error.to_string()),
            other => ActionError::new(500, other.to_string()),
        })?;
        self.wait_applied(seq, APPLY_WAIT).await;
        self.status(name).await
    }

    /// This node's figures of every bridge, for metrics.
    pub fn gauges(&self) -> Vec<crate::metrics::BridgeGauges> {
        let ledger = self.ledger.borrow().clone();
        self.bridges
            .iter()
            .map(|bridge| {
                let record = ledger.record(&bridge.config.name);
                let route = bridge.route.borrow().clone();
                let routed = route.backend.as_ref().map(|(name, _)| name.as_str());
                crate::metrics::BridgeGauges {
                    name: bridge.config.name.clone(),
                    routing: record.routing.value,
                    serving: route.serving(),
                    refused: bridge.counters.refused.load(Ordering::Relaxed),
                    backend_changes: bridge.counters.backend_changes.load(Ordering::Relaxed),
                    backends: bridge
                        .counters
                        .backends
                        .iter()
                        .map(|(name, counters)| crate::metrics::BackendGauges {
                            name: name.clone(),
                            active: routed == Some(name.as_str()),
                            sessions: counters.view(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Every bridge's status on this node.
    pub async fn list(&self) -> Vec<Value> {
        let mut all = Vec::new();
        for bridge in &self.bridges {
            if let Ok(status) = self.status(&bridge.config.name).await {
                all.push(status);
            }
        }
        all
    }

    /// One bridge: the committed decision, routing, each backend's health
    /// as each node sees it, and this node's sessions and bytes.
    pub async fn status(&self, name: &str) -> Result<Value, ActionError> {
        let bridge = self.bridge(name)?;
        let record = self.ledger.borrow().record(name);
        let route = bridge.route.borrow().clone();
        let local = bridge.local.borrow().clone();
        let alive = self.alive_members();
        let active = record.active_backend().map(str::to_string);
        let backends: Vec<Value> = bridge
            .config
            .backends
            .iter()
            .map(|backend| {
                let (up, down) = record.votes(&backend.name, &alive);
                let seen_by: Vec<Value> = record
                    .reports
                    .get(&backend.name)
                    .into_iter()
                    .flatten()
                    .map(|(node, report)| {
                        json!({
                            "node": node,
                            "node_name": report.node_name,
                            "healthy": report.healthy,
                            "detail": report.detail,
                            "counted": alive.contains(node),
                            "seq": report.seq,
                            "timestamp_ms": report.timestamp_ms,
                        })
                    })
                    .collect();
                let counters = bridge.counters.backends.get(&backend.name).map(|counters| counters.view());
                json!({
                    "name": backend.name,
                    "address": backend.address,
                    "check": backend.check.describe(),
                    "active": active.as_deref() == Some(backend.name.as_str()),
                    "health": {
                        "up": up,
                        "down": down,
                        "verdict": if up + down == 0 { "unknown" } else if up > down { "up" } else { "down" },
                    },
                    "seen_by": seen_by,
                    "local": local.get(&backend.name),
                    "drained": record.drained.get(&backend.name).map(|drained| json!({"reason": drained.reason, "seq": drained.seq})),
                    "sessions": counters,
                })
            })
            .collect();
        // Members whose section differs from this node's: they may be told
        // to route to a backend they do not have, or decide differently.
        let own = self.config_report(bridge);
        let differs: Vec<Value> = record
            .configs
            .values()
            .filter(|config| {
                alive.contains(&config.node) && (config.backends != own.backends || config.failback != own.failback)
            })
            .map(|config| {
                json!({
                    "node": config.node,
                    "node_name": config.node_name,
                    "backends": config.backends,
                    "failback": config.failback,
                })
            })
            .collect();
        let current: u64 = bridge
            .counters
            .backends
            .values()
            .map(|counters| counters.current.load(Ordering::Relaxed))
            .sum();
        Ok(json!({
            "name": bridge.config.name,
            "listen": bridge.config.listen.to_string(),
            "node": { "id": self.node, "name": self.node_name },
            "routing": {
                "enabled": record.routing.value,
                "reason": record.routing.reason,
                "seq": record.routing.seq,
            },
            "serving": route.serving(),
            "serving_reason": route.reason,
            "isolated": self.isolated.load(Ordering::Relaxed),
            "active": record.active.as_ref().map(|active| json!({
                "backend": active.value,
                "reason": active.reason,
                "seq": active.seq,
                "since_ms": active.timestamp_ms,
            })),
            "pinned": record.pinned.as_ref().map(|pin| json!({"backend": pin.value, "reason": pin.reason, "seq": pin.seq})),
            "failback": bridge.config.failback,
            "when_isolated": bridge.config.when_isolated,
            "sessions": {
                "current": current,
                "refused": bridge.counters.refused.load(Ordering::Relaxed),
                "max": bridge.counters.max_sessions,
                "times_full": bridge.counters.full.load(Ordering::Relaxed),
            },
            "backend_changes": bridge.counters.backend_changes.load(Ordering::Relaxed),
            "config_differs": differs,
            "backends": backends,
        }))
    }
}

/// This node's route for a bridge from what is committed.
fn route_for(config: &BridgeConfig, record: &ledger::BridgeRecord, isolated: bool) -> Route {
    let draining = record.drained.keys().cloned().collect();
    if isolated && config.when_isolated == WhenIsolated::Stop {
        return Route {
            enabled: false,
            reason: "this node cannot reach a quorum and the bridge has when_isolated = \"stop\"".into(),
            backend: None,
            draining,
        };
    }
    if !record.routing.value {
        return Route {
            enabled: false,
            reason: format!("routing is off: {}", record.routing.reason),
            backend: None,
            draining,
        };
    }
    let Some(active) = &record.active else {
        return Route {
            enabled: true,
            reason: "no active backend decided yet: waiting for health reports".into(),
            backend: None,
            draining,
        };
    };
    let backend = active.value.as_ref().and_then(|name| {
        config
            .backends
            .iter()
            .find(|backend| &backend.name == name)
            .map(|backend| (backend.name.clone(), backend.address.clone()))
    });
    let reason = match (&active.value, &backend) {
        (Some(name), None) => format!("the active backend {name} is not in this node's [[bridge]] config"),
        _ => active.reason.clone(),
    };
    Route {
        enabled: true,
        reason,
        backend,
        draining,
    }
}
