//! Per-role resource limits. The manifest's `[limits]` table becomes a
//! [`RoleLimits`]; the runtime enforces every field.

use std::time::Duration;

/// Linear memory a role may use, summed over its memories: enough for a DNS
/// table of tens of thousands of names, small enough that a runaway role cannot
/// hurt a node with a few GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;

/// Guest time allowed per call. Handlers are meant to be quick; a tenth of a
/// second is far above what a well-behaved handler needs and short enough that
/// a looping role is cut off before clients notice.
pub const DEFAULT_CPU_PER_CALL: Duration = Duration::from_millis(100);

/// Time allowed for `init`, which may build caches from the event log.
pub const DEFAULT_CPU_PER_INIT: Duration = Duration::from_secs(5);

/// Instances of one role that may run at once: one per core on a small node
/// plus headroom for calls that wait on the host (emit, exec).
pub const DEFAULT_WORKERS: u32 = 4;

/// Calls that may wait for a free worker before callers are told the role is
/// overloaded. Bounded so a slow role sheds load instead of piling up memory.
pub const DEFAULT_QUEUE: u32 = 64;

/// Largest response body a role may return: a full nginx config or a large
/// JSON listing fits; a runaway role cannot make the host buffer gigabytes.
pub const DEFAULT_RESPONSE_BYTES: u64 = 4 << 20;

/// Consecutive traps after which a role is marked failed instead of being
/// restarted again.
pub const DEFAULT_MAX_CONSECUTIVE_TRAPS: u32 = 5;

/// Limits the runtime enforces for one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleLimits {
    /// Bytes of linear memory, summed over the instance's memories.
    pub memory_bytes: u64,
    /// Guest time per call to `on-event`, `on-request`, `on-packet`, `on-tick`.
    /// Time spent inside host imports (emit, exec, call, ...) is not counted.
    pub cpu_per_call: Duration,
    /// Guest time for `describe` plus `init` when a version loads.
    pub cpu_per_init: Duration,
    /// Instances that may run at once.
    pub workers: u32,
    /// Calls that may wait for a worker; beyond that, calls fail as overloaded.
    pub queue: u32,
    /// Largest response body `on-request` may return.
    pub response_bytes: u64,
    /// Traps in a row (no successful call between) before the role is failed.
    pub max_consecutive_traps: u32,
}

impl Default for RoleLimits {
    fn default() -> Self {
        RoleLimits {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            cpu_per_call: DEFAULT_CPU_PER_CALL,
            cpu_per_init: DEFAULT_CPU_PER_INIT,
            workers: DEFAULT_WORKERS,
            queue: DEFAULT_QUEUE,
            response_bytes: DEFAULT_RESPONSE_BYTES,
            max_consecutive_traps: DEFAULT_MAX_CONSECUTIVE_TRAPS,
        }
    }
}
