//! `on-event` dispatch to a trivial role through the runtime: the host's
//! per-call overhead (take a worker, set the CPU deadline, lower the event,
//! call, lift the result, return the worker). Prints median and p99.

use std::sync::Arc;
use std::time::Instant;

use hivemind_bench::{micros, summarize};
use hivemind_harness::SandboxHost;
use hivemind_runtime::{Event, RoleLimits, Runtime, RuntimeConfig};

/// Calls measured after warm-up.
const CALLS: usize = 200_000;
const WARMUP: usize = 10_000;

fn main() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let host_runtime = Runtime::new(RuntimeConfig::new(cache.path()))?;
        let bytes = std::fs::read(hivemind_role_artifacts::ROLE_NOOP)?;
        let compiled = host_runtime.compile(&bytes)?;
        let role = host_runtime
            .load(
                "noop",
                compiled,
                RoleLimits::default(),
                Arc::new(SandboxHost::new("noop", Default::default())),
            )
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
