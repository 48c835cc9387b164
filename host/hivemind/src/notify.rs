//! The notification sink for role failures: always the log, and a webhook
//! when the config names one. The webhook is best effort — a slow or dead
//! receiver never delays the host — and recent failures stay queryable.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hivemind_runtime::{FailureKind, RoleFailure};
use serde::Serialize;

/// Failures kept for `GET /v1/status`.
const RECENT: usize = 50;
/// A webhook receiver gets this long to answer.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub node: String,
    pub role: String,
    pub kind: &'static str,
    pub message: String,
    pub timestamp_ms: u64,
}

pub struct Notifier {
    node: String,
    webhook: Option<String>,
    recent: Mutex<VecDeque<Notification>>,
}

impl Notifier {
    pub fn new(node: String, webhook: Option<String>) -> Notifier {
        Notifier {
            node,
            webhook,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn report(&self, failure: RoleFailure) {
        match failure.kind {
            FailureKind::Trapped | FailureKind::LoadRejected => {
                tracing::warn!(role = %failure.role, kind = failure.kind.as_str(), "{}", failure.message)
            }
            FailureKind::Failed => {
                tracing::error!(role = %failure.role, kind = failure.kind.as_str(), "{}", failure.message)
            }
        }
        let notification = Notification {
            node: self.node.clone(),
            role: failure.role,
            kind: failure.kind.as_str(),
            message: failure.message,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        {
            let mut recent = self.recent.lock().unwrap();
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(notification.clone());
        }
        if let Some(url) = self.webhook.clone() {
            // Off the async threads and off the caller's path.
            std::thread::spawn(move || post_webhook(&url, &notification));
        }
    }

    pub fn recent(&self) -> Vec<Notification> {
        self.recent.lock().unwrap().iter().cloned().collect()
    }
}

fn post_webhook(url: &str, notification: &Notification) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .build()
        .into();
    if let Err(error) = agent.post(url).send_json(notification) {
        tracing::warn!(%url, %error, "cannot deliver a role failure to the webhook (notify.webhook)");
    }
}
