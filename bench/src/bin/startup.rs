//! Start-up and idle memory: `hivemind up` with the bundled roles and a warm
//! compile cache, from spawn until the API answers and every role runs; then
//! the resident memory after the host has been idle for a few seconds.
//! The first (cold) start, which compiles the roles, is shown for contrast.

use std::time::{Duration, Instant};

use hivemind_bench::{HostProcess, millis, summarize};

const STARTS: usize = 10;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let roles = hivemind_role_artifacts::BUNDLED.len();

    let started = Instant::now();
    let host = HostProcess::start(dir.path())?;
    host.wait_roles_running(roles)?;
    let cold = started.elapsed();
    host.stop()?;

    let mut warm = Vec::new();
    for _ in 0..STARTS {
        let started = Instant::now();
        let host = HostProcess::start(dir.path())?;
        host.wait_roles_running(roles)?;
        warm.push(started.elapsed());
        host.stop()?;
    }
    let warm = summarize(&mut warm);

    let host = HostProcess::start(dir.path())?;
    host.wait_roles_running(roles)?;
    std::thread::sleep(Duration::from_secs(3));
    let rss = host.rss_mib()?;
    host.stop()?;

    println!("start-up to serving with {roles} bundled roles");
    println!("  cold (compiles every role): {:.0} ms", millis(cold));
    println!(
        "  warm cache: p50 {:.1} ms  max {:.1} ms over {STARTS} starts   (target <= 500 ms -> {})",
        millis(warm.median),
        millis(warm.max),
        if millis(warm.median) <= 500.0 { "met" } else { "NOT met" }
    );
    println!(
        "  idle RSS: {rss:.1} MiB   (target <= 60 MiB -> {})",
        if rss <= 60.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
