//! The generated bindings of `wit/` and the store data behind the imports.
//!
//! Everything here is private to the runtime: the rest of the host sees plain
//! types re-exported from the crate root and the [`RoleHost`] trait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::error;
use crate::guest_output::GuestOutput;
use crate::host::RoleHost;
use crate::role::{KeepReply, MAX_KEEP_SKIP};

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "role",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use hivemind::role::host::{ExecOutput, HealthCheck, Level};
pub use hivemind::role::types::{HostError, Node};

/// Data of one instance's store.
pub(crate) struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) host: Arc<dyn RoleHost>,
    pub(crate) memory: MemoryLimiter,
    pub(crate) clock: CallClock,
    /// The guest's stderr, kept to explain traps (e.g. a panic message).
    pub(crate) stderr: GuestOutput,
    /// Set while an `on-packet` call runs: only then may a role keep its reply.
    pub(crate) in_packet: bool,
    /// What the running `on-packet` call asked for with `keep-reply`.
    pub(crate) keep: Option<KeepReply>,
    /// Set when the running call asked to forget kept replies.
    pub(crate) forget_replies: bool,
}

impl InstanceState {
    pub(crate) fn new(host: Arc<dyn RoleHost>, memory_bytes: u64) -> Self {
        let role: Arc<str> = host.role_name().into();
        let stderr = GuestOutput::new(role.clone(), "stderr");
        InstanceState {
            // No preopened directories, no environment, no arguments, no
            // network: a role reaches the world only through `host`. The
            // `wasi:sockets` interfaces are linked (Python's and JavaScript's
            // toolchains import them whether or not a role uses them), but
            // every use of them is refused.
            wasi: WasiCtx::builder()
                .stdout(GuestOutput::new(role, "stdout"))
                .stderr(stderr.clone())
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .build(),
            stderr,
            table: ResourceTable::new(),
            host,
            memory: MemoryLimiter {
                limit: memory_bytes,
                in_use: 0,
                denied: None,
            },
            clock: CallClock::idle(),
            in_packet: false,
            keep: None,
            forget_replies: false,
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Guest time of the call in progress: wall time since the call started minus
/// time spent in host imports, which is the host's work, not the role's.
pub(crate) struct CallClock {
    started: Instant,
    in_host: Duration,
    budget: Duration,
    /// The manifest key that sets `budget`, for the error message.
    budget_key: &'static str,
    pub(crate) exceeded: bool,
}

impl CallClock {
    fn idle() -> Self {
        CallClock {
            started: Instant::now(),
            in_host: Duration::ZERO,
            budget: Duration::MAX,
            budget_key: "",
            exceeded: false,
        }
    }

    pub(crate) fn start(&mut self, budget: Duration, budget_key: &'static str) {
        *self = CallClock {
            started: Instant::now(),
            in_host: Duration::ZERO,
            budget,
            budget_key,
            exceeded: false,
        };
    }

    pub(crate) fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.in_host)
    }

    pub(crate) fn over_budget(&self) -> bool {
        self.guest_time() > self.budget
    }

    /// Why the call was cut off, in an operator's words.
    pub(crate) fn exceeded_message(&self) -> String {
        error::cpu_exceeded(self.budget, self.budget_key)
    }
}

/// Caps the sum of an instance's linear memories and remembers a refusal, so
/// the trap can be explained as a memory limit rather than a bare trap.
pub(crate) struct MemoryLimiter {
    pub(crate) limit: u64,
    in_use: u64,
    pub(crate) denied: Option<u64>,
}

impl MemoryLimiter {
    /// Bytes of linear memory the instance holds now.
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let after = self.in_use + (desired - current) as u64;
        if after > self.limit {
            self.denied = Some(after);
            return Err(wasmtime::Error::msg(error::memory_exceeded(self.limit, after)));
        }
        self.in_use = after;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; a million is far beyond any real
        // role and stops a runaway `table.grow` loop.
        Ok(desired <= 1_000_000)
    }
}

/// Runs a host import while its time is excluded from the role's CPU budget.
macro_rules! host_time {
    ($state:expr, $body:expr) => {{
        let started = Instant::now();
        let result = $body;
        $state.clock.in_host += started.elapsed();
        result
    }};
}

impl hivemind::role::types::Host for InstanceState {}

impl hivemind::role::host::Host for InstanceState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        host_time!(self, self.host.log(level, &message));
        Ok(())
    }

    async fn emit(&mut self, kind: String, key: String, payload: Vec<u8>) -> wasmtime::Result<Result<u64, HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.emit(kind, key, payload).await))
    }

    async fn events_since(
        &mut self,
        after: u64,
        kind_prefix: String,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<Event>, HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.events_since(after, kind_prefix, limit).await))
    }

    async fn nodes(&mut self, role: Option<String>, healthy_only: bool) -> wasmtime::Result<Vec<Node>> {
        Ok(host_time!(self, self.host.nodes(role.as_deref(), healthy_only)))
    }

    async fn self_node(&mut self) -> wasmtime::Result<Node> {
        Ok(self.host.self_node())
    }

    async fn config(&mut self) -> wasmtime::Result<String> {
        Ok(self.host.config_json())
    }

    async fn call(
        &mut self,
        node: String,
        role: String,
        request: Request,
    ) -> wasmtime::Result<Result<Response, HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.call(node, role, request).await))
    }

    async fn write_file(&mut self, path: String, contents: Vec<u8>) -> wasmtime::Result<Result<(), HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.write_file(path, contents).await))
    }

    async fn exec(
        &mut self,
        program: String,
        args: Vec<String>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<ExecOutput, HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.exec(program, args, timeout_ms).await))
    }

    async fn check(&mut self, target: HealthCheck, timeout_ms: u32) -> wasmtime::Result<Result<u32, HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.check(target, timeout_ms).await))
    }

    async fn count(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        delta: u64,
    ) -> wasmtime::Result<Result<(), HostError>> {
        Ok(host_time!(
            self,
            crate::host::validate_counter(&name, &labels).and_then(|()| self.host.count(&name, &labels, delta))
        ))
    }

    async fn keep_reply(
        &mut self,
        skip: u32,
        tally: Option<(String, Vec<(String, String)>)>,
    ) -> wasmtime::Result<Result<(), HostError>> {
        if !self.in_packet {
            return Ok(Err(HostError::Invalid(
                "keep-reply works only inside on-packet, for the reply that call returns".into(),
            )));
        }
        if skip as usize > MAX_KEEP_SKIP {
            return Ok(Err(HostError::Invalid(format!(
                "keep-reply: skip {skip} is more than {MAX_KEEP_SKIP} bytes; only an ID-like prefix may differ"
            ))));
        }
        if let Some((name, labels)) = &tally
            && let Err(error) = crate::host::validate_counter(name, labels)
        {
            return Ok(Err(error));
        }
        self.keep = Some(KeepReply {
            skip: skip as usize,
            tally,
        });
        Ok(Ok(()))
    }

    async fn forget_replies(&mut self) -> wasmtime::Result<()> {
        self.forget_replies = true;
        Ok(())
    }
}

impl hivemind::role::state::Host for InstanceState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let host = self.host.clone();
        // A store failure here is the host's fault, not the role's: trap the
        // call with the reason rather than pretend the key is absent.
        host_time!(self, host.state_get(key).await)
            .map_err(|error| wasmtime::Error::msg(format!("state store: {error:?}")))
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.state_set(key, value).await))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), HostError>> {
        let host = self.host.clone();
        Ok(host_time!(self, host.state_delete(key).await))
    }

    async fn keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        let host = self.host.clone();
        host_time!(self, host.state_keys(prefix).await)
            .map_err(|error| wasmtime::Error::msg(format!("state store: {error:?}")))
    }
}
