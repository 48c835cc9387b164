//! What a role's imports reach: the [`RoleHost`] trait.
//!
//! The runtime owns the WebAssembly side of every import (argument checks,
//! time accounting, traps); the daemon implements [`RoleHost`] once per loaded
//! role with that role's grants and config. This is the seam later subsystems
//! plug into: the event log's backing, the node table and the connect layer
//! change behind it, never the WIT.

use crate::{Event, ExecOutput, HealthCheck, HostError, Level, Node, Request, Response};

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
