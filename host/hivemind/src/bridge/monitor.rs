//! This node's checks of a bridge's backends: every interval, each backend
//! is checked; `rise` passes in a row bring a down backend up, `fall`
//! failures in a row take an up one down. The first result sets the state
//! at once, so a starting node reports within one interval.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::config::{BridgeConfig, HealthCheck};
use crate::probe::ProbeFailure;

/// What this node concludes about one backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LocalHealth {
    /// `None` until the first check finished.
    pub healthy: Option<bool>,
    /// The last check's outcome, in words.
    pub detail: String,
    #[serde(skip)]
    passes: u32,
    #[serde(skip)]
    failures: u32,
}

impl LocalHealth {
    /// Counts one check result and moves the state when rise or fall is
    /// reached. A check this node could not run counts neither way: the
    /// verdict stays as it was (unknown, if it was), and the detail says
    /// why, so a node out of descriptors never reports a backend down.
    pub fn record(&mut self, outcome: Result<(), ProbeFailure>, rise: u32, fall: u32) {
        match outcome {
            Err(failure @ ProbeFailure::ThisNode(_)) => {
                self.detail = failure.to_string();
            }
            Ok(()) => {
                self.passes += 1;
                self.failures = 0;
                self.detail = "check passed".into();
                if self.healthy.is_none() || self.passes >= rise {
                    self.healthy = Some(true);
                }
            }
            Err(ProbeFailure::Target(reason)) => {
                self.failures += 1;
                self.passes = 0;
                self.detail = reason;
                if self.healthy.is_none() || self.failures >= fall {
                    self.healthy = Some(false);
                }
            }
        }
    }
}

/// Backend name → this node's view, published after every round.
pub type LocalView = BTreeMap<String, LocalHealth>;

/// Runs one check.
pub async fn check(target: &HealthCheck, timeout: std::time::Duration) -> Result<(), ProbeFailure> {
    match target {
        HealthCheck::Tcp { address } => crate::probe::tcp(address, timeout).await,
        HealthCheck::Http { address, path, json } => {
            let url = format!("http://{address}{path}");
            let body = crate::probe::http_get(&url, timeout).await?;
            match json {
                None => Ok(()),
                Some((field, expected)) => crate::probe::json_field_matches(&body, field, expected)
                    .map_err(|reason| ProbeFailure::Target(format!("GET {url}: {reason}"))),
            }
        }
    }
}

/// Checks every backend of `config` each interval until `shutdown`,
/// publishing the view on `view` and notifying `changed` when a verdict
/// or its detail changed.
pub async fn run(
    config: BridgeConfig,
    view: watch::Sender<LocalView>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let outcomes = futures::future::join_all(
            config
                .backends
                .iter()
                .map(|backend| async { (backend.name.clone(), check(&backend.check, config.timeout).await) }),
        )
        .await;
        let modified = view.send_if_modified(|view| {
            let mut modified = false;
            for (backend, outcome) in outcomes {
                let health = view.entry(backend).or_default();
                let before = (health.healthy, health.detail.clone());
                health.record(outcome, config.rise, config.fall);
                modified |= before != (health.healthy, health.detail.clone());
            }
            modified
        });
        if modified {
            changed.notify_one();
        }
        tracing::trace!(bridge = %config.name, took_ms = started.elapsed().as_millis() as u64, "checked backends");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Result<(), ProbeFailure> {
        Err(ProbeFailure::Target("refused".into()))
    }

    /// First result sets the state; then `fall` failures take it down and
    /// `rise` passes bring it back; a single blip changes nothing.
    #[test]
    fn rise_and_fall() {
        let mut health = LocalHealth::default();
        health.record(Ok(()), 2, 3);
        assert_eq!(health.healthy, Some(true));
        health.record(refused(), 2, 3);
        health.record(Ok(()), 2, 3);
        health.record(refused(), 2, 3);
        health.record(refused(), 2, 3);
        assert_eq!(health.healthy, Some(true), "two failures of three");
        health.record(refused(), 2, 3);
        assert_eq!(health.healthy, Some(false));
        assert_eq!(health.detail, "refused");
        health.record(Ok(()), 2, 3);
        assert_eq!(health.healthy, Some(false), "one pass of two");
        health.record(Ok(()), 2, 3);
        assert_eq!(health.healthy, Some(true));
    }

    /// A check this node could not run (out of descriptors) neither takes
    /// an up backend down nor gives an unknown one a verdict, however many
    /// times in a row; the detail says this node is the trouble.
    #[test]
    fn checks_this_node_cannot_run_count_neither_way() {
        let emfile = || {
            Err(ProbeFailure::ThisNode(
                "TCP 127.0.0.1:9: Too many open files (os error 24)".into(),
            ))
        };
        let mut unknown = LocalHealth::default();
        for _ in 0..10 {
            unknown.record(emfile(), 1, 1);
        }
        assert_eq!(unknown.healthy, None);
        assert!(
            unknown.detail.starts_with("cannot check from this node"),
            "{}",
            unknown.detail
        );

        let mut up = LocalHealth::default();
        up.record(Ok(()), 2, 2);
        up.record(refused(), 2, 2);
        for _ in 0..10 {
            up.record(emfile(), 2, 2);
        }
        assert_eq!(up.healthy, Some(true));
        up.record(refused(), 2, 2);
        assert_eq!(
            up.healthy,
            Some(false),
            "the failures that were the backend's still count"
        );
    }
}
