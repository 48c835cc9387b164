//! The replicated log against etcd, side by side in one run: three
//! `hivemind up` voters and a three-member etcd (Debian's `etcd-server`),
//! both on loopback, both fsyncing every commit.
//!
//! - Write throughput, median and p99 at 1, 16 and 64 concurrent keep-alive
//!   clients spread over the three members, same payload size: ours through
//!   `POST /v1/events`, etcd through its v3 HTTP gateway (`/v3/kv/put`).
//! - Failover: `kill -9` of the leader under load → the first write issued
//!   after the kill that is acknowledged, over 5 kills; median and range.
//!
//! Targets: throughput ≥ etcd's at every concurrency, p99 ≤ etcd's, and a
//! failover median ≤ 1.0 s.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use hivemind_bench::{Api, bootstrap_args, free_port, millis, summarize};
use serde_json::json;

const MEMBERS: usize = 3;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const DURATION: Duration = Duration::from_secs(5);
const KILLS: usize = 5;
const FAILOVER_CLIENTS: usize = 8;
/// Bytes of every written value.
const PAYLOAD_BYTES: usize = 128;
const SECRET: &str = "bench-cluster-secret-0123456789";

/// One member process of either system, restartable with the same command.
struct Member {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Client (HTTP) address.
    client: String,
    child: Option<Child>,
    /// API token (ours) or empty (etcd).
    token_file: Option<std::path::PathBuf>,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.program);
        command.args(&self.args).stdout(Stdio::null()).stderr(Stdio::null());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("cannot start {}", self.program))?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn api(&self) -> Api {
        let token = self
            .token_file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        Api::new(&self.client, token.trim())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum System {
    Hivemind,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Hivemind => "hivemind",
            System::Etcd => "etcd",
        }
    }

    /// One write of `PAYLOAD_BYTES` under `key`.
    fn put(self, api: &Api, key: &str) -> bool {
        let value = "x".repeat(PAYLOAD_BYTES);
        let (path, body) = match self {
            System::Hivemind => (
                "/v1/events",
                json!({ "kind": "bench.put", "key": key, "payload": { "v": value } }),
            ),
            System::Etcd => {
                let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
                (
                    "/v3/kv/put",
                    json!({ "key": encode(&format!("bench/{key}")), "value": encode(&value) }),
                )
            }
        };
        let body = serde_json::to_vec(&body).unwrap();
        matches!(api.send("POST", path, &body, "application/json"), Ok((200, _)))
    }
}

struct Cluster {
    system: System,
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn hivemind() -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let binary = std::env::current_exe()?.with_file_name("hivemind");
        let transports: Vec<String> = (0..MEMBERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut members = Vec::new();
        for (i, transport) in transports.iter().enumerate() {
            let data = dir.path().join(format!("n{i}"));
            let client = format!("127.0.0.1:{}", free_port());
            members.push(Member {
                program: binary.display().to_string(),
                args: bootstrap_args(&data, &format!("n{i}"), &client, transport, &transports),
                env: vec![
                    ("HIVEMIND_CLUSTER_SECRET".into(), SECRET.into()),
                    ("RUST_LOG".into(), "error".into()),
                ],
                client,
                child: None,
                token_file: Some(data.join("token")),
            });
        }
        let mut cluster = Cluster {
            system: System::Hivemind,
            members,
            _dir: dir,
        };
        for member in &mut cluster.members {
            member.start()?;
        }
        Ok(cluster)
    }

    fn etcd() -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let peers: Vec<String> = (0..MEMBERS)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, peer)| format!("e{i}={peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let client = format!("127.0.0.1:{}", free_port());
            let url = format!("http://{client}");
            members.push(Member {
                program: "etcd".into(),
                args: [
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    &dir.path().join(format!("e{i}")).display().to_string(),
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-token",
                    "hivemind-bench",
                    "--initial-cluster-state",
                    "new",
                    "--log-level",
                    "error",
                    "--logger",
                    "zap",
                ]
                .map(String::from)
                .to_vec(),
                env: Vec::new(),
                client,
                child: None,
                token_file: None,
            });
        }
        let mut cluster = Cluster {
            system: System::Etcd,
            members,
            _dir: dir,
        };
        for member in &mut cluster.members {
            member
                .start()
                .context("etcd is needed for this benchmark: apt-get install etcd-server (bench/run installs it)")?;
        }
        Ok(cluster)
    }

    /// The index of the member every running member names as leader.
    fn leader(&self) -> Option<usize> {
        let mut agreed = None;
        let mut ids = Vec::new();
        for member in &self.members {
            if member.child.is_none() {
                ids.push(None);
                continue;
            }
            let (own, leader) = match self.system {
                System::Hivemind => {
                    let status = member.api().get_json("/v1/status").ok()?;
                    if status["cluster"]["health"] != "healthy" {
                        return None;
                    }
                    (
                        status["node"]["id"].as_str()?.to_string(),
                        status["cluster"]["leader"].as_str()?.to_string(),
                    )
                }
                System::Etcd => {
                    let status = member.api().post_json("/v3/maintenance/status", &json!({})).ok()?;
                    let leader = status["leader"].as_str()?.to_string();
                    if leader == "0" {
                        return None;
                    }
                    (status["header"]["member_id"].as_str()?.to_string(), leader)
                }
            };
            if agreed.get_or_insert(leader.clone()) != &leader {
                return None;
            }
            ids.push(Some(own));
        }
        let leader = agreed?;
        ids.iter().position(|id| id.as_deref() == Some(leader.as_str()))
    }

    fn wait_leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(leader) = self.leader()
                && self.system.put(&self.members[leader].api(), "warm-up")
            {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                bail!("{} did not elect a leader", self.system.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Load {
    writes_per_second: f64,
    median: Duration,
    p99: Duration,
    failed: u64,
}

/// `clients` closed-loop writers spread over the members for `DURATION`.
fn throughput(cluster: &Cluster, clients: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|worker| {
            let api = cluster.members[worker % MEMBERS].api();
            let (system, stop) = (cluster.system, stop.clone());
            std::thread::spawn(move || {
                let (mut samples, mut failed, mut n) = (Vec::new(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let call = Instant::now();
                    n += 1;
                    if system.put(&api, &format!("c{worker}-{n}")) {
                        samples.push(call.elapsed());
                    } else {
                        failed += 1;
                    }
                }
                (samples, failed)
            })
        })
        .collect();
    std::thread::sleep(DURATION);
    stop.store(true, Ordering::Relaxed);
    let (mut samples, mut failed) = (Vec::new(), 0);
    for worker in workers {
        let (mine, failures) = worker.join().unwrap();
        samples.extend(mine);
        failed += failures;
    }
    let elapsed = started.elapsed();
    let summary = summarize(&mut samples);
    Load {
        writes_per_second: summary.count as f64 / elapsed.as_secs_f64(),
        median: summary.median,
        p99: summary.p99,
        failed,
    }
}

/// Kills the leader under load and times the first write issued after the
/// kill that is acknowledged; then brings the member back.
fn failover(cluster: &mut Cluster) -> anyhow::Result<Duration> {
    let leader = cluster.wait_leader()?;
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let survivors: Vec<usize> = (0..MEMBERS).filter(|i| *i != leader).collect();
    let workers: Vec<_> = (0..FAILOVER_CLIENTS)
        .map(|worker| {
            let api = cluster.members[survivors[worker % survivors.len()]].api();
            let (system, stop, killed_at) = (cluster.system, stop.clone(), killed_at.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let issued = Instant::now();
                    let after_kill = killed_at.lock().unwrap().is_some_and(|killed| issued >= killed);
                    n += 1;
                    if system.put(&api, &format!("f{worker}-{n}")) {
                        if after_kill {
                            return Some(Instant::now());
                        }
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                None
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let kill_time = Instant::now();
    *killed_at.lock().unwrap() = Some(kill_time);
    cluster.members[leader].kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !workers.iter().any(|worker| worker.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let first = workers
        .into_iter()
        .filter_map(|worker| worker.join().unwrap())
        .min()
        .context("no write was acknowledged within 30 s of the kill")?;
    cluster.members[leader].start()?;
    cluster.wait_leader()?;
    // Let the restarted member catch up before the next kill.
    std::thread::sleep(Duration::from_millis(1000));
    Ok(first - kill_time)
}

fn main() -> anyhow::Result<()> {
    let mut results = Vec::new();
    for system in [System::Hivemind, System::Etcd] {
        let mut cluster = match system {
            System::Hivemind => Cluster::hivemind()?,
            System::Etcd => Cluster::etcd()?,
        };
        cluster.wait_leader()?;
        let loads: Vec<Load> = CONCURRENCY
            .iter()
            .map(|clients| throughput(&cluster, *clients))
            .collect();
        let mut failovers = Vec::new();
        for _ in 0..KILLS {
            failovers.push(failover(&mut cluster)?);
        }
        results.push((system, loads, failovers));
    }

    println!(
        "replicated writes, 3 members each on loopback, both fsyncing; {PAYLOAD_BYTES}-byte values, keep-alive \
         clients spread over the members, {} s per step",
        DURATION.as_secs()
    );
    println!(
        "{:>8}  {:>9}  {:>10}  {:>9}  {:>9}  {:>7}",
        "clients", "system", "writes/s", "p50 ms", "p99 ms", "failed"
    );
    for (step, clients) in CONCURRENCY.iter().enumerate() {
        for (system, loads, _) in &results {
            let load = &loads[step];
            println!(
                "{clients:>8}  {:>9}  {:>10.0}  {:>9.2}  {:>9.2}  {:>7}",
                system.name(),
                load.writes_per_second,
                millis(load.median),
                millis(load.p99),
                load.failed
            );
        }
        let (ours, theirs) = (&results[0].1[step], &results[1].1[step]);
        println!(
            "{:>8}  ratios: throughput {:.2}x etcd (target >= 1.0), p99 {:.2}x etcd (target <= 1.0)",
            "",
            ours.writes_per_second / theirs.writes_per_second,
            ours.p99.as_secs_f64() / theirs.p99.as_secs_f64()
        );
    }
    println!(
        "failover: kill -9 of the leader under load -> first acknowledged write issued after the kill ({KILLS} kills)"
    );
    let mut medians = Vec::new();
    for (system, _, failovers) in &mut results {
        let mut sorted = failovers.clone();
        sorted.sort();
        let median = sorted[sorted.len() / 2];
        medians.push(median);
        println!(
            "  {:>9}: median {:.2} s   range {:.2}-{:.2} s   all {:?}",
            system.name(),
            median.as_secs_f64(),
            sorted[0].as_secs_f64(),
            sorted[sorted.len() - 1].as_secs_f64(),
            failovers
                .iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
        );
    }
    println!(
        "  ratio: {:.2}x etcd; hivemind median target <= 1.0 s",
        medians[0].as_secs_f64() / medians[1].as_secs_f64()
    );
    Ok(())
}
