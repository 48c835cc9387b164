//! Membership figures.
//!
//! - Detection: five `hivemind up` hosts on loopback with the LAN gossip
//!   preset; `kill -9` one, then time until every survivor's gossip holds it
//!   down, and until every survivor lists it unhealthy (the committed
//!   `node.failed`). Median over 10 kills. Target: gossip agreement ≤ 3 s
//!   (memberlist's LAN defaults need about 8 s or more at 100 nodes by its
//!   own formula).
//! - Simulation: convergence and detection at 10, 100 and 1000 nodes over a
//!   network losing 5% of packets; messages per node per second; false
//!   `node.failed` decisions (target 0).
//! - Role calls: one role calling another on a second node over the shared
//!   connection, median and p99 round trip and calls/s, beside the same
//!   request answered by the local role.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hivemind::membership::GossipPreset;
use hivemind::membership::simulation::{SimulationSetup, run};
use hivemind_bench::{Api, bootstrap_args, free_port, millis, summarize};
use serde_json::{Value, json};

const HOSTS: usize = 5;
const KILLS: usize = 10;
const SECRET: &str = "bench-cluster-secret-0123456789";
const PATIENCE: Duration = Duration::from_secs(60);
const CALLS: usize = 2000;
const CALL_THREADS: usize = 16;

struct Host {
    name: String,
    data: std::path::PathBuf,
    api: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Host {
    fn start(&mut self) -> anyhow::Result<()> {
        let binary = std::env::current_exe()?.with_file_name("hivemind");
        let child = Command::new(binary)
            .args(&self.args)
            .env("HIVEMIND_CLUSTER_SECRET", SECRET)
            .env("RUST_LOG", "error")
            .env_remove("HIVEMIND_GOSSIP_PRESET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start hivemind")?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn client(&self) -> Option<Api> {
        let token = std::fs::read_to_string(self.data.join("token")).ok()?;
        Some(Api::new(&self.api, token.trim()))
    }

    fn nodes(&self) -> Option<Vec<Value>> {
        let reply = self.client()?.get_json("/v1/nodes").ok()?;
        reply["nodes"].as_array().cloned()
    }

    fn id(&self) -> anyhow::Result<String> {
        let status = self.client().context("no token yet")?.get_json("/v1/status")?;
        Ok(status["node"]["id"].as_str().context("no node id")?.to_string())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_cluster(dir: &std::path::Path) -> anyhow::Result<Vec<Host>> {
    let transports: Vec<String> = (0..HOSTS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut hosts = Vec::new();
    for (i, transport) in transports.iter().enumerate() {
        let data = dir.join(format!("n{i}"));
        let api = format!("127.0.0.1:{}", free_port());
        let args = bootstrap_args(&data, &format!("n{i}"), &api, transport, &transports);
        let mut host = Host {
            name: format!("n{i}"),
            data,
            api,
            args,
            child: None,
        };
        host.start()?;
        hosts.push(host);
    }
    Ok(hosts)
}

/// Waits until every running host lists all hosts healthy and alive.
fn wait_converged(hosts: &[Host]) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let converged = hosts.iter().filter(|host| host.child.is_some()).all(|host| {
            host.nodes().is_some_and(|nodes| {
                nodes.len() == HOSTS
                    && nodes
                        .iter()
                        .all(|node| node["healthy"] == json!(true) && node["gossip"] == json!("alive"))
            })
        });
        if converged {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not converge within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One kill: (every survivor's gossip holds it down, every survivor lists
/// it unhealthy), from the kill.
fn detect_once(hosts: &mut [Host], victim: usize) -> anyhow::Result<(Duration, Duration)> {
    let victim_id = hosts[victim].id()?;
    hosts[victim].kill();
    let killed = Instant::now();
    let survivors: Vec<usize> = (0..hosts.len()).filter(|i| *i != victim).collect();
    let mut gossip_down = vec![None; hosts.len()];
    let mut decided = vec![None; hosts.len()];
    while survivors
        .iter()
        .any(|&s| gossip_down[s].is_none() || decided[s].is_none())
    {
        if killed.elapsed() > PATIENCE {
            bail!(
                "{} was not seen down by every survivor within {PATIENCE:?}",
                hosts[victim].name
            );
        }
        for &survivor in &survivors {
            let Some(nodes) = hosts[survivor].nodes() else { continue };
            let Some(entry) = nodes.iter().find(|node| node["id"] == json!(victim_id)) else {
                continue;
            };
            if gossip_down[survivor].is_none() && entry["gossip"] == json!("down") {
                gossip_down[survivor] = Some(killed.elapsed());
            }
            if decided[survivor].is_none() && entry["healthy"] == json!(false) {
                decided[survivor] = Some(killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let last = |times: &[Option<Duration>]| times.iter().flatten().max().copied().unwrap_or_default();
    Ok((last(&gossip_down), last(&decided)))
}

fn detection(hosts: &mut [Host]) -> anyhow::Result<()> {
    println!("detection: {HOSTS} hosts on loopback, LAN preset, kill -9 one -> every survivor agrees ({KILLS} kills)");
    let mut gossip = Vec::new();
    let mut decided = Vec::new();
    for kill in 0..KILLS {
        let victim = kill % HOSTS;
        let (down, failed) = detect_once(hosts, victim)?;
        gossip.push(down);
        decided.push(failed);
        hosts[victim].start()?;
        wait_converged(hosts)?;
    }
    for (what, samples) in [
        ("gossip holds it down", &mut gossip),
        ("node.failed committed and seen", &mut decided),
    ] {
        let all: Vec<String> = samples
            .iter()
            .map(|sample| format!("{:.2}", sample.as_secs_f64()))
            .collect();
        let summary = summarize(samples);
        println!(
            "  {what:<32} median {:.2} s   range {:.2}-{:.2} s   all {all:?}",
            summary.median.as_secs_f64(),
            samples.iter().min().unwrap().as_secs_f64(),
            samples.iter().max().unwrap().as_secs_f64()
        );
    }
    println!("  target: gossip agreement median <= 3 s (memberlist LAN defaults: ~8 s or more at 100 nodes)");
    Ok(())
}

fn simulation() {
    println!("simulation: SWIM over a simulated network losing 5% of packets, LAN preset, 0.5 s grace");
    println!(
        "  {:>5}  {:>12}  {:>8}  {:>12}  {:>14}  {:>12}",
        "nodes", "converged s", "rounds", "detected s", "msgs/node/s", "false fails"
    );
    for nodes in [10, 100, 1000] {
        let started = Instant::now();
        let report = run(&SimulationSetup {
            nodes,
            loss: 0.05,
            crashes: (nodes / 200).max(1),
            preset: GossipPreset::Lan,
            grace: Duration::from_millis(500),
            seed: 42,
            limit: Duration::from_secs(600),
            linger: Duration::from_secs(10),
        });
        let seconds =
            |value: Option<Duration>| value.map_or("never".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
        println!(
            "  {:>5}  {:>12}  {:>8}  {:>12}  {:>14.1}  {:>12}   ({:.0} s to simulate)",
            nodes,
            seconds(report.converged_after),
            report
                .convergence_rounds
                .map_or("-".to_string(), |rounds| format!("{rounds:.1}")),
            seconds(report.detected_after),
            report.messages_per_node_per_second,
            report.false_failed,
            started.elapsed().as_secs_f64()
        );
    }
    println!("  target: 0 false node.failed decisions");
}

fn post_role(api: &Api, path: &str, args: Value) -> anyhow::Result<(u16, Vec<u8>)> {
    let body = serde_json::to_vec(&json!({ "args": args }))?;
    api.send("POST", path, &body, "application/json")
}

fn calls(hosts: &[Host]) -> anyhow::Result<()> {
    let probe = std::fs::read(hivemind_role_artifacts::ROLE_PROBE)?;
    for host in &hosts[..2] {
        let dir = host.data.join("roles");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(".probe.wasm.tmp"), &probe)?;
        std::fs::rename(dir.join(".probe.wasm.tmp"), dir.join("probe.wasm"))?;
    }
    let api = hosts[0].client().context("no token")?;
    let peer = hosts[1].id()?;
    let deadline = Instant::now() + PATIENCE;
    while !matches!(
        post_role(&api, "/v1/roles/probe/call", json!([peer, "probe", "version"])),
        Ok((200, _))
    ) {
        if Instant::now() > deadline {
            bail!("the probe role never answered a call across nodes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let measure = |path: &str, args: Value| -> anyhow::Result<Vec<Duration>> {
        let mut samples = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let started = Instant::now();
            let (status, body) = post_role(&api, path, args.clone())?;
            if status != 200 {
                bail!("{path} answered {status}: {}", String::from_utf8_lossy(&body));
            }
            samples.push(started.elapsed());
        }
        Ok(samples)
    };
    let mut local = measure("/v1/roles/probe/version", json!([]))?;
    let mut remote = measure("/v1/roles/probe/call", json!([peer, "probe", "version"]))?;
    let local = summarize(&mut local);
    let remote = summarize(&mut remote);
    println!("role calls: API -> probe role on n0 -> call -> probe role on n1 ({CALLS} sequential)");
    println!(
        "  local request (no call)    median {:.3} ms   p99 {:.3} ms",
        millis(local.median),
        millis(local.p99)
    );
    println!(
        "  with a call to n1          median {:.3} ms   p99 {:.3} ms   (the call adds {:.3} ms at the median)",
        millis(remote.median),
        millis(remote.p99),
        millis(remote.median.saturating_sub(local.median))
    );
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..CALL_THREADS)
        .map(|_| {
            let (done, stop, peer) = (done.clone(), stop.clone(), peer.clone());
            let api = hosts[0].client().expect("token");
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if matches!(
                        post_role(&api, "/v1/roles/probe/call", json!([peer, "probe", "version"])),
                        Ok((200, _))
                    ) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let window = Duration::from_secs(5);
    std::thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    let status = api.get_json("/v1/status")?;
    println!(
        "  {CALL_THREADS} concurrent callers: {:.0} calls/s; connections n0 opened to its peers: {}",
        done.load(Ordering::Relaxed) as f64 / window.as_secs_f64(),
        status["connect"]["opened"]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    simulation();
    println!();
    let dir = tempfile::tempdir()?;
    let mut hosts = start_cluster(dir.path())?;
    wait_converged(&hosts)?;
    detection(&mut hosts)?;
    println!();
    calls(&hosts)?;
    Ok(())
}
