//! `on-request` through the HTTP API: a `hivemind up` process serving the
//! noop role, driven by keep-alive clients in this process for a fixed time.
//! Prints requests per second, median and p99 latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hivemind_bench::{HostProcess, drop_role, micros, summarize};

const CLIENTS: usize = 8;
const DURATION: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let host = HostProcess::start(dir.path())?;
    drop_role(
        &dir.path().join("roles"),
        "noop",
        &std::fs::read(hivemind_role_artifacts::ROLE_NOOP)?,
    )?;
    host.wait_roles_running(1)?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let api = host.api.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                let mut failures = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let call = Instant::now();
                    match api.get("/v1/roles/noop/ping") {
                        Ok((200, _)) => samples.push(call.elapsed()),
                        _ => failures += 1,
                    }
                }
                (samples, failures)
            })
        })
        .collect();
    std::thread::sleep(DURATION);
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut failures = 0;
    for client in clients {
        let (mine, failed) = client.join().unwrap();
        samples.extend(mine);
        failures += failed;
    }
    let elapsed = started.elapsed();
    let summary = summarize(&mut samples);
    println!(
        "on-request through the HTTP API ({CLIENTS} keep-alive clients on loopback, {} s)",
        DURATION.as_secs()
    );
    println!(
        "  {:.0} requests/s   median {:.0} us   p99 {:.0} us   failed {failures}",
        summary.count as f64 / elapsed.as_secs_f64(),
        micros(summary.median),
        micros(summary.p99)
    );
    host.stop()
}
