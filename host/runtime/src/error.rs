//! Errors of loading a role version and of calling into one.

use std::time::Duration;

/// Why a role version could not be loaded. The previous version, if any,
/// keeps serving; nothing about the host changed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "not a WebAssembly file (it does not start with the \\0asm magic); build the role with `cargo build --target wasm32-wasip2` or another component toolchain"
    )]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component; build for wasm32-wasip2 or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("not a valid WebAssembly component (truncated or corrupt?): {0}")]
    InvalidComponent(String),
    #[error("the role imports `{import}`, which Hivemind does not give roles: {hint}")]
    UnsupportedImport { import: String, hint: String },
    #[error("the role needs imports this host does not provide: {0}")]
    Link(String),
    #[error("`describe` failed: {0}")]
    Describe(String),
    #[error("`init` returned an error: {0}")]
    InitFailed(String),
    #[error("`init` trapped: {0}")]
    InitTrapped(String),
    #[error("cannot read or write the compile cache: {0}")]
    Cache(String),
}

/// Why a call into a role did not produce the role's answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error(
        "role `{role}` is overloaded: {workers} workers busy and {queued} calls queued (limits.workers, limits.queue in the manifest); retry later"
    )]
    Overloaded { role: String, workers: u32, queued: u32 },
    #[error("role `{role}` trapped: {reason}")]
    Trapped { role: String, reason: String },
    #[error(
        "role `{role}` has failed after {traps} traps in a row (last: {last}); fix it and reload it (`hivemind roles reload {role}`)"
    )]
    Failed { role: String, traps: u32, last: String },
    #[error(
        "role `{role}` returned a {size}-byte response; the limit is {limit} bytes (limits.max_response_kb in the manifest)"
    )]
    ResponseTooLarge { role: String, size: u64, limit: u64 },
    #[error("cannot start an instance of role `{role}`: {reason}")]
    Instantiate { role: String, reason: String },
}

/// How a trapped call ended, in words for operators.
pub(crate) fn cpu_exceeded(limit: Duration, manifest_key: &str) -> String {
    format!(
        "exceeded its CPU time limit of {} ms ({manifest_key} in the manifest)",
        limit.as_millis()
    )
}

pub(crate) fn memory_exceeded(limit: u64, wanted: u64) -> String {
    format!(
        "exceeded its memory limit of {} MiB (wanted {} MiB; limits.memory_mb in the manifest)",
        limit >> 20,
        wanted.div_ceil(1 << 20)
    )
}
