//! `on-event` dispatch to a trivial role through the runtime: the host's
//! per-call overhead (take a worker, set the CPU deadline, lower the event,
//! call, lift the result, return the worker). Prints median and p99.

use std::sync::Arc;
use std::time::Instant;

use hivemind_bench::{micros, summarize};
use hivemind_runtime::{
    Event, ExecOutput, HostError, Level, Node, Request, Response, RoleFailure, RoleHost, RoleLimits, Runtime,
    RuntimeConfig,
};

/// Calls measured after warm-up.
const CALLS: usize = 200_000;
const WARMUP: usize = 10_000;

struct QuietHost;

#[async_trait::async_trait]
impl RoleHost for QuietHost {
    fn role_name(&self) -> &str {
        "noop"
    }
    fn log(&self, _: Level, _: &str) {}
    async fn emit(&self, _: String, _: String, _: Vec<u8>) -> Result<u64, HostError> {
        Ok(0)
    }
    async fn events_since(&self, _: u64, _: String, _: u32) -> Result<Vec<Event>, HostError> {
        Ok(Vec::new())
    }
    fn nodes(&self, _: Option<&str>, _: bool) -> Vec<Node> {
        Vec::new()
    }
    fn self_node(&self) -> Node {
        Node {
            id: "bench".into(),
            name: "bench".into(),
            address: String::new(),
            roles: vec![],
            healthy: true,
        }
    }
    fn config_json(&self) -> String {
        "{}".into()
    }
    async fn call(&self, _: String, _: String, _: Request) -> Result<Response, HostError> {
        Err(HostError::Unavailable("bench".into()))
    }
    async fn write_file(&self, _: String, _: Vec<u8>) -> Result<(), HostError> {
        Ok(())
    }
    async fn exec(&self, _: String, _: Vec<String>, _: u32) -> Result<ExecOutput, HostError> {
        Err(HostError::Denied("bench".into()))
    }
    async fn check(&self, _: hivemind_runtime::HealthCheck, _: u32) -> Result<u32, HostError> {
        Err(HostError::Denied("bench".into()))
    }
    async fn state_get(&self, _: String) -> Result<Option<Vec<u8>>, HostError> {
        Ok(None)
    }
    async fn state_set(&self, _: String, _: Vec<u8>) -> Result<(), HostError> {
        Ok(())
    }
    async fn state_delete(&self, _: String) -> Result<(), HostError> {
        Ok(())
    }
    async fn state_keys(&self, _: String) -> Result<Vec<String>, HostError> {
        Ok(Vec::new())
    }
    fn report(&self, failure: RoleFailure) {
        eprintln!("{}", failure.message);
    }
}

fn main() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let host_runtime = Runtime::new(RuntimeConfig::new(cache.path()))?;
        let bytes = std::fs::read(hivemind_role_artifacts::ROLE_NOOP)?;
        let compiled = host_runtime.compile(&bytes)?;
        let role = host_runtime
            .load("noop", compiled, RoleLimits::default(), Arc::new(QuietHost))
            .await?;
        let event = Event {
            seq: 1,
            epoch: 1,
            kind: "service.up".into(),
            key: "web".into(),
            source: "bench".into(),
            timestamp_ms: 0,
            payload: br#"{"address":"10.0.0.1","port":80,"tags":["a","b"]}"#.to_vec(),
        };
        for _ in 0..WARMUP {
            role.on_event(&event).await?.map_err(anyhow::Error::msg)?;
        }
        let mut samples = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let started = Instant::now();
            role.on_event(&event).await?.map_err(anyhow::Error::msg)?;
            samples.push(started.elapsed());
        }
        let summary = summarize(&mut samples);
        println!(
            "on-event dispatch to a trivial role ({} calls, one worker)",
            summary.count
        );
        println!(
            "  median {:.2} us   p99 {:.2} us   max {:.1} us",
            micros(summary.median),
            micros(summary.p99),
            micros(summary.max)
        );
        println!(
            "  target: median <= 5 us -> {}",
            if micros(summary.median) <= 5.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        anyhow::Ok(())
    })
}
