//! What a role's imports reach: the [`RoleHost`] trait.
//!
//! The runtime owns the WebAssembly side of every import (argument checks,
//! time accounting, traps); the daemon implements [`RoleHost`] once per loaded
//! role with that role's grants and config. This is the seam later subsystems
//! plug into: the event log's backing, the node table and the connect layer
//! change behind it, never the WIT.

use std::time::Duration;

use crate::{Event, ExecOutput, HealthCheck, HostError, Level, Node, Request, Response};

/// Longest counter or label name a role may use.
pub const MAX_COUNTER_NAME: usize = 64;
/// Most labels on one counter.
pub const MAX_COUNTER_LABELS: usize = 8;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 128;
/// Most series of `count` counters one role may keep: a role that labels
/// by an unbounded value (a client address, a query name) would otherwise
/// grow the host's memory and every scrape without limit.
pub const MAX_COUNTER_SERIES: usize = 1000;
/// Name endings a counter may not have.
const RESERVED_SUFFIXES: [&str; 6] = ["_total", "_count", "_sum", "_bucket", "_created", "_info"];

/// The host services one role's instances call into. One value per loaded
/// version of a role, shared by all its instances.
#[async_trait::async_trait]
pub trait RoleHost: Send + Sync + 'static {
    /// The role's name, for logs and errors.
    fn role_name(&self) -> &str;

    /// A line from the role's `log` import.
    fn log(&self, level: Level, message: &str);

    /// Appends an event to the cluster log; checks the role's emit grant.
    async fn emit(&self, kind: String, key: String, payload: Vec<u8>) -> Result<u64, HostError>;

    /// Events after `after` whose kind starts with `kind_prefix`.
    async fn events_since(&self, after: u64, kind_prefix: String, limit: u32) -> Result<Vec<Event>, HostError>;

    /// Cluster members, optionally only those running `role`.
    fn nodes(&self, role: Option<&str>, healthy_only: bool) -> Vec<Node>;

    /// The node this host runs.
    fn self_node(&self) -> Node;

    /// The role's `[config]` table as JSON.
    fn config_json(&self) -> String;

    /// The connect layer: `role`'s `on-request` on `node`.
    async fn call(&self, node: String, role: String, request: Request) -> Result<Response, HostError>;

    /// Writes inside the role's granted output directory.
    async fn write_file(&self, path: String, contents: Vec<u8>) -> Result<(), HostError>;

    /// Runs a granted program.
    async fn exec(&self, program: String, args: Vec<String>, timeout_ms: u32) -> Result<ExecOutput, HostError>;

    /// Runs one granted health check; `Ok` with the milliseconds it took.
    async fn check(&self, target: HealthCheck, timeout_ms: u32) -> Result<u32, HostError>;

    /// The role's durable state.
    async fn state_get(&self, key: String) -> Result<Option<Vec<u8>>, HostError>;
    async fn state_set(&self, key: String, value: Vec<u8>) -> Result<(), HostError>;
    async fn state_delete(&self, key: String) -> Result<(), HostError>;
    async fn state_keys(&self, prefix: String) -> Result<Vec<String>, HostError>;

    /// The role's `count` import: adds `delta` to a counter. `name` and
    /// `labels` have passed [`validate_counter`]. Hosts that keep no
    /// counters accept and drop them.
    fn count(&self, name: &str, labels: &[(String, String)], delta: u64) -> Result<(), HostError> {
        let _ = (name, labels, delta);
        Ok(())
    }

    /// The host answered `count` datagrams from replies the role let it
    /// keep (`keep-reply`), without calling the role.
    fn kept_replies_sent(&self, count: u64) {
        let _ = count;
    }

    /// A call into the role ended: which export, how, and how long it ran
    /// in its worker (queueing and starting an instance not included).
    fn observe_call(&self, export: Export, outcome: CallOutcome, elapsed: Duration) {
        let _ = (export, outcome, elapsed);
    }

    /// A role failure the operator must hear about (a trap, a role marked
    /// failed). Implementations log it and may forward it elsewhere.
    fn report(&self, failure: RoleFailure);
}

/// A failure of a role, as reported to the notification sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleFailure {
    pub role: String,
    pub kind: FailureKind,
    /// Human-readable description, including what to do.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An instance trapped and was discarded; the role keeps serving.
    Trapped,
    /// The role trapped too often in a row and no longer serves.
    Failed,
    /// A new version was rejected; the previous one keeps serving.
    LoadRejected,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trapped => "trapped",
            FailureKind::Failed => "failed",
            FailureKind::LoadRejected => "load-rejected",
        }
    }
}

/// The export a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Export {
    Event,
    Request,
    Packet,
    Tick,
}

impl Export {
    pub const ALL: [Export; 4] = [Export::Event, Export::Request, Export::Packet, Export::Tick];

    /// Its place in [`Export::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Export::Event => "on-event",
            Export::Request => "on-request",
            Export::Packet => "on-packet",
            Export::Tick => "on-tick",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    /// The role answered with an error: `on-event` returned one, or
    /// `on-request` answered 5xx.
    Error,
    /// The instance trapped (panic, limit, deadline), or no instance could
    /// be started for the call.
    Trapped,
    /// The call was refused because the role's workers and queue were full;
    /// it never ran.
    Overloaded,
}

/// Checks a `count` import's counter name and labels against the contract's
/// rules, so every host exports the same series.
pub fn validate_counter(name: &str, labels: &[(String, String)]) -> Result<(), HostError> {
    fn valid_name(text: &str) -> bool {
        !text.is_empty()
            && text.len() <= MAX_COUNTER_NAME
            && !text.starts_with(|c: char| c.is_ascii_digit())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }
    if !valid_name(name) {
        return Err(HostError::Invalid(format!(
            "counter name {name:?}: use [a-z_][a-z0-9_]*, at most {MAX_COUNTER_NAME} bytes"
        )));
    }
    // Prometheus adds these to names itself (a counter's `_total`, a
    // histogram's parts); a counter ending in one would read as another kind.
    if let Some(suffix) = RESERVED_SUFFIXES.iter().find(|suffix| name.ends_with(*suffix)) {
        return Err(HostError::Invalid(format!(
            "counter name {name:?}: do not end it in {suffix:?}; the host adds `_total` itself"
        )));
    }
    if labels.len() > MAX_COUNTER_LABELS {
        return Err(HostError::Invalid(format!(
            "counter {name:?} has {} labels; at most {MAX_COUNTER_LABELS} are allowed",
            labels.len()
        )));
    }
    for (index, (label, value)) in labels.iter().enumerate() {
        if !valid_name(label) {
            return Err(HostError::Invalid(format!(
                "counter {name:?}: label name {label:?}: use [a-z_][a-z0-9_]*, at most {MAX_COUNTER_NAME} bytes"
            )));
        }
        if label.starts_with("__") {
            return Err(HostError::Invalid(format!(
                "counter {name:?}: label {label:?}: names starting with `__` are Prometheus's own"
            )));
        }
        if label == "role" {
            return Err(HostError::Invalid(format!(
                "counter {name:?}: the label `role` is set by the host; name yours differently"
            )));
        }
        if labels[..index].iter().any(|(earlier, _)| earlier == label) {
            return Err(HostError::Invalid(format!(
                "counter {name:?}: label {label:?} is given twice"
            )));
        }
        if value.len() > MAX_LABEL_VALUE {
            return Err(HostError::Invalid(format!(
                "counter {name:?}: the value of label {label:?} is {} bytes; at most {MAX_LABEL_VALUE} are allowed",
                value.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_counter;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Names and labels Prometheus accepts pass; the rest are refused.
    #[test]
    fn counter_names_follow_the_contract() {
        assert!(validate_counter("dns_queries", &labels(&[("qtype", "A"), ("rcode", "NOERROR")])).is_ok());
        assert!(validate_counter("Queries", &[]).is_err());
        assert!(validate_counter("9lives", &[]).is_err());
        assert!(validate_counter("", &[]).is_err());
        assert!(validate_counter(&"a".repeat(65), &[]).is_err());
        assert!(validate_counter("ok", &labels(&[("role", "x")])).is_err());
        assert!(validate_counter("ok", &labels(&[("a", "1"), ("a", "2")])).is_err());
        assert!(validate_counter("ok", &labels(&[("a-b", "1")])).is_err());
        assert!(validate_counter("ok", &labels(&[("__name__", "x")])).is_err());
        assert!(validate_counter("queries_total", &[]).is_err());
        assert!(validate_counter("latency_bucket", &[]).is_err());
        assert!(validate_counter("ok", &labels(&[("a", &"v".repeat(129))])).is_err());
        let nine: Vec<_> = (0..9).map(|i| (format!("l{i}"), String::new())).collect();
        assert!(validate_counter("ok", &nine).is_err());
    }
}
