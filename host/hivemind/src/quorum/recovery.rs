//! A Raft core that stopped is noticed, reported and replaced.
//!
//! openraft stops its core for good when the log or the state machine
//! cannot be written (a full disk, an I/O error), and redb then refuses
//! every call on that file until it is reopened. Left alone, such a node
//! looks healthy and serves reads that are more and more stale. So this
//! watch marks the node degraded with the reason, the log refuses reads
//! while it is stopped, and once the cause is gone (free space again) it
//! reopens the files and starts a new core on them, which catches up from
//! the leader like any follower after a restart.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::QuorumLog;

/// A new core is tried after this pause, doubled after each failure.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);
/// Less free space than this under the data directory, and a new core would
/// stop again at its first write: wait for more.
pub const MIN_FREE_BYTES: u64 = 1 << 20;

/// Whether this node's core runs, and how often it was replaced.
#[derive(Default)]
pub struct CoreHealth {
    stopped: Mutex<Option<Stopped>>,
    restarts: AtomicU64,
}

struct Stopped {
    reason: String,
    since: Instant,
    /// Why the last try to start a new core failed.
    waiting: Option<String>,
}

impl CoreHealth {
    /// Why this node's log does not run, in words, or `None` while it runs.
    pub fn problem(&self) -> Option<String> {
        let stopped = self.stopped.lock().unwrap();
        let stopped = stopped.as_ref()?;
        let mut text = format!(
            "this node's log stopped {} s ago: {}",
            stopped.since.elapsed().as_secs(),
            stopped.reason
        );
        if let Some(waiting) = &stopped.waiting {
            text.push_str(&format!("; not restarted yet: {waiting}"));
        }
        text.push_str(". It restarts by itself once the cause is fixed");
        Some(text)
    }

    pub fn running(&self) -> bool {
        self.stopped.lock().unwrap().is_none()
    }

    /// Cores started in place of a stopped one since this process started.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

/// Watches this node's core until `shutdown`, replacing it whenever it stops.
pub async fn watch(log: std::sync::Arc<QuorumLog>, shutdown: CancellationToken) {
    loop {
        let reason = tokio::select! {
            _ = shutdown.cancelled() => return,
            reason = stopped(&log) => reason,
        };
        if shutdown.is_cancelled() {
            return;
        }
        tracing::error!(
            %reason,
            "this node's log stopped: it takes no part in the quorum and serves no reads until it runs again; it \
             restarts by itself once the cause is fixed"
        );
        *log.core_health.stopped.lock().unwrap() = Some(Stopped {
            reason,
            since: Instant::now(),
            waiting: None,
        });
        let mut pause = FIRST_PAUSE;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            match log.restart_core().await {
                Ok(()) => {
                    tracing::info!("this node's log runs again on a new core; it catches up from the leader");
                    *log.core_health.stopped.lock().unwrap() = None;
                    log.core_health.restarts.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(error) => {
                    let error = format!("{error:#}");
                    tracing::warn!(%error, "this node's log is not restarted yet");
                    if let Some(stopped) = log.core_health.stopped.lock().unwrap().as_mut() {
                        stopped.waiting = Some(error);
                    }
                    pause = (pause * 2).min(LONGEST_PAUSE);
                }
            }
        }
    }
}

/// Returns why the running core stopped, or why it must: a write to the
/// node's store failed, and that file takes nothing until it is reopened,
/// which the core's handles prevent.
async fn stopped(log: &QuorumLog) -> String {
    let mut metrics = log.raft().metrics();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        let state = metrics.borrow_and_update().running_state.clone();
        if let Err(fatal) = state {
            return fatal.to_string();
        }
        if let Some(failure) = log.store.failure() {
            return format!("a write to the data store failed: {failure}");
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                return "the Raft core ended".to_string();
            },
            _ = poll.tick() => {}
        }
    }
}
