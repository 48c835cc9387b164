//! Hot reload: rename a changed role into the roles directory of a running
//! `hivemind up` and time until the new version is the one serving (the
//! host's status shows its digest; calls go to it from then on).
//!
//! Cache misses use new bytes each time (the same code with a unique custom
//! section, so everything is compiled again); cache hits alternate between
//! two versions compiled before. Meanwhile a steady load of calls runs
//! (each client calls every `PACE`); every failed call is counted. Prints p50/p99 for both and the
//! failures, and compares with starting a fresh process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hivemind_bench::{HostProcess, drop_role, millis, sha256_hex, summarize, with_nonce};

const RELOADS: usize = 20;
const CLIENTS: usize = 2;
/// Time between one client's calls: 2 clients -> about 1000 calls/s.
const PACE: Duration = Duration::from_millis(2);

fn wait_digest(host: &HostProcess, digest: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = host.api.get("/v1/roles/probe")?;
        // 404 until the host has seen the first file.
        let info: serde_json::Value = if status == 404 {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body)?
        };
        if info["digest"].as_str() == Some(digest) {
            return Ok(());
        }
        if info["last_error_digest"].as_str() == Some(digest) && info["loading"].is_null() {
            anyhow::bail!("reload rejected: {}", info["last_error"]);
        }
        anyhow::ensure!(Instant::now() < deadline, "reload never finished");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let roles = dir.path().join("roles");
    let original = std::fs::read(hivemind_role_artifacts::ROLE_PROBE)?;

    let host = HostProcess::start(dir.path())?;

    let first = with_nonce(&original, 0);
    drop_role(&roles, "probe", &first)?;
    wait_digest(&host, &sha256_hex(&first))?;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (api, stop, failures, calls) = (host.api.clone(), stop.clone(), failures.clone(), calls.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(PACE);
                    match api.get("/v1/roles/probe/version") {
                        Ok((200, _)) => {}
                        other => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "failed call during reload: {:?}",
                                other.map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
                            );
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut misses = Vec::new();
    for nonce in 1..=RELOADS as u64 {
        let bytes = with_nonce(&original, nonce);
        let started = Instant::now();
        drop_role(&roles, "probe", &bytes)?;
        wait_digest(&host, &sha256_hex(&bytes))?;
        misses.push(started.elapsed());
    }
    let mut hits = Vec::new();
    for round in 0..RELOADS {
        let bytes = with_nonce(&original, if round % 2 == 0 { 1 } else { 2 });
        let started = Instant::now();
        drop_role(&roles, "probe", &bytes)?;
        wait_digest(&host, &sha256_hex(&bytes))?;
        hits.push(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }

    let misses = summarize(&mut misses);
    let hits = summarize(&mut hits);
    println!(
        "hot reload of a {} KB role under a steady load ({CLIENTS} clients, one call each every {} ms)",
        original.len() / 1024,
        PACE.as_millis()
    );
    println!(
        "  cache miss: p50 {:.1} ms  p99 {:.1} ms   (target p50 <= 300 ms -> {})",
        millis(misses.median),
        millis(misses.p99),
        if millis(misses.median) <= 300.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  cache hit:  p50 {:.1} ms  p99 {:.1} ms   (target p50 <= 20 ms -> {})",
        millis(hits.median),
        millis(hits.p99),
        if millis(hits.median) <= 20.0 { "met" } else { "NOT met" }
    );
    println!(
        "  calls during {} reloads: {} made, {} failed   (target 0 failed -> {})",
        2 * RELOADS,
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
        if failures.load(Ordering::Relaxed) == 0 {
            "met"
        } else {
            "NOT met"
        }
    );
    host.stop()?;

    // The peer: restarting the whole process instead (warm cache), from
    // spawn until the role serves again.
    let mut restarts = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let host = HostProcess::start(dir.path())?;
        host.wait_roles_running(1)?;
        restarts.push(started.elapsed());
        host.stop()?;
    }
    let restarts = summarize(&mut restarts);
    println!(
        "  peer: restarting the process until the role serves again: p50 {:.1} ms -> a cache-hit reload takes {:.2}x a restart, without dropping a call",
        millis(restarts.median),
        hits.median.as_secs_f64() / restarts.median.as_secs_f64()
    );
    Ok(())
}
