//! Clusters of real `hivemind up` processes on loopback: failover under
//! `kill -9`, a full stop and restart, joins, membership changes, epochs.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn text(output: &std::process::Output) -> String {
    format!("{}{}", stdout(output), stderr(output))
}

/// Waits for a process that is expected to give up and returns its log.
fn wait_exit(node: &mut NodeProcess) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = node.exited() {
            return (status, node.log());
        }
        assert!(Instant::now() < deadline, "{} did not exit: {}", node.name, node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three voters under steady writes through every node; `kill -9` of the
/// leader: a new leader is elected and writes resume; once the old leader is
/// back, every acknowledged write is on every node exactly once, at the seq
/// it was acknowledged with, in the same order everywhere.
#[test]
fn kill_9_of_the_leader_under_steady_writes_loses_no_acknowledged_write() {
    let mut cluster = ProcessCluster::bootstrap(3);
    let leader = cluster.wait_healthy();
    let acknowledged = Arc::new(Mutex::new(Vec::<(u64, String, Instant)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(writer, node)| {
            let client = node.client();
            let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{writer}-{n}");
                    n += 1;
                    let body = format!(r#"{{"kind":"test.load","key":"{key}"}}"#);
                    match client.send("POST", "/v1/events", body.as_bytes(), "application/json") {
                        Ok((200, reply)) => {
                            let seq = serde_json::from_slice::<Value>(&reply).unwrap()["seq"]
                                .as_u64()
                                .unwrap();
                            acknowledged.lock().unwrap().push((seq, key, Instant::now()));
                        }
                        // Refused or unreachable: not acknowledged, so no promise.
                        _ => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    cluster.nodes[leader].kill();
    let deadline = Instant::now() + PATIENCE;
    while acknowledged
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, at)| *at > killed_at)
        .count()
        < 50
    {
        assert!(
            Instant::now() < deadline,
            "writes did not resume after the leader was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let new_leader = cluster.wait_healthy();
    assert_ne!(new_leader, leader, "a new leader was elected");

    cluster.nodes[leader].start();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    cluster.wait_healthy();

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 100,
        "only {} writes acknowledged",
        acknowledged.len()
    );
    let events = cluster.converged_events("test.load", acknowledged.len());
    let mut occurrences: HashMap<&str, Vec<u64>> = HashMap::new();
    for (seq, key) in &events {
        occurrences.entry(key).or_default().push(*seq);
    }
    for (seq, key, _) in &acknowledged {
        assert_eq!(
            occurrences.get(key.as_str()),
            Some(&vec![*seq]),
            "acknowledged write {key} (seq {seq}) is on every node exactly once at its seq"
        );
    }
    assert!(
        occurrences.values().all(|seqs| seqs.len() == 1),
        "no write is in the log twice"
    );
    assert!(events.windows(2).all(|pair| pair[0].0 < pair[1].0), "in seq order");
}

/// Stopping all three voters and starting them again keeps the log, the
/// cluster's identity, its epoch and its members; writes work again.
#[test]
fn stopping_and_restarting_all_three_keeps_log_and_state() {
    let mut cluster = ProcessCluster::bootstrap(3);
    let mut acknowledged = Vec::new();
    for n in 0..30 {
        let node = &cluster.nodes[n % 3];
        let key = format!("k{n}");
        acknowledged.push((node.emit("test.restart", &key).unwrap(), key));
    }
    let before = cluster.nodes[0].status().unwrap()["cluster"].clone();
    for node in &mut cluster.nodes {
        assert!(node.terminate().success(), "{} exits cleanly on SIGTERM", node.name);
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_healthy();
    assert_eq!(cluster.converged_events("test.restart", 30), acknowledged);
    let after = cluster.nodes[1].status().unwrap()["cluster"].clone();
    for field in ["cluster_id", "epoch", "voters"] {
        assert_eq!(after[field], before[field], "{field} survives the restart");
    }
    cluster.nodes[2].emit("test.restart", "after").unwrap();
    assert_eq!(cluster.converged_events("test.restart", 31).len(), 31);
}

/// A node joins with a token as a learner (a committed `node.joined`), is
/// promoted to voter (the epoch goes up on every node), demoted and removed;
/// the same token is refused a second time, and so are a wrong secret and a
/// token of another cluster, each with its reason.
#[test]
fn joins_are_decided_by_the_quorum_and_membership_changes_bump_the_epoch() {
    let mut cluster = ProcessCluster::bootstrap(3);
    let token_output = cluster.nodes[0].cli(&["members", "token"]);
    assert!(token_output.status.success(), "{}", text(&token_output));
    let token = stdout(&token_output).trim().to_string();
    let epoch_before = cluster.nodes[0].status().unwrap()["cluster"]["epoch"].as_u64().unwrap();

    let joined = cluster.join(1, &["--join-token", &token]);
    let id = cluster.nodes[joined].wait_status("the joiner serves", |status| status["node"]["id"].is_string())["node"]
        ["id"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.nodes[0].wait_status("the joiner is a learner", |status| {
        status["cluster"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|member| member["id"] == id.as_str() && member["role"] == "learner")
    });
    let joined_events = cluster.converged_events("node.joined", 1);
    assert_eq!(
        joined_events.last().unwrap().1,
        id,
        "admission is a committed node.joined"
    );

    let promote = cluster.nodes[2].cli(&["members", "promote", &cluster.nodes[joined].name]);
    assert!(promote.status.success(), "{}", text(&promote));
    assert!(stdout(&promote).contains("is now a voter"), "{}", text(&promote));
    for node in &cluster.nodes {
        node.wait_status("the epoch went up with the new voter", |status| {
            status["cluster"]["epoch"].as_u64() == Some(epoch_before + 1)
                && status["cluster"]["voters"].as_array().unwrap().len() == 4
        });
    }

    // The same token again, from another node: refused, and why.
    let replay = cluster.join(0, &["--join-token", &token]);
    let (status, log) = wait_exit(&mut cluster.nodes[replay]);
    assert!(!status.success());
    assert!(log.contains("already used"), "{log}");

    let mut wrong_secret = NodeProcess::new(
        cluster.root.path(),
        "wrong-secret",
        vec![
            "--join".into(),
            cluster.nodes[0].transport.clone(),
            "--secret".into(),
            "not-the-secret".into(),
        ],
    );
    wrong_secret.start();
    let (status, log) = wait_exit(&mut wrong_secret);
    assert!(!status.success());
    assert!(log.contains("wrong cluster secret"), "{log}");

    let foreign_token = token.replacen(token.split('.').nth(1).unwrap(), "0000000000000000", 1);
    let mut foreign = NodeProcess::new(
        cluster.root.path(),
        "foreign",
        vec![
            "--join".into(),
            cluster.nodes[0].transport.clone(),
            "--join-token".into(),
            foreign_token,
        ],
    );
    foreign.start();
    let (status, log) = wait_exit(&mut foreign);
    assert!(!status.success());
    assert!(log.contains("unknown cluster id 0000000000000000"), "{log}");

    let demote = cluster.nodes[0].cli(&["members", "demote", &id]);
    assert!(demote.status.success(), "{}", text(&demote));
    cluster.nodes[1].wait_status("demoted to learner, epoch up again", |status| {
        status["cluster"]["epoch"].as_u64() == Some(epoch_before + 2)
            && status["cluster"]["voters"].as_array().unwrap().len() == 3
    });
    let remove = cluster.nodes[1].cli(&["members", "remove", &id]);
    assert!(remove.status.success(), "{}", text(&remove));
    cluster.nodes[2].wait_status("removed", |status| {
        status["cluster"]["members"].as_array().unwrap().len() == 3
    });
    cluster.nodes[joined].wait_status("the removed node knows", |status| {
        status["cluster"]["problem"]
            .as_str()
            .is_some_and(|problem| problem.contains("removed"))
    });
}

/// A voter that is down while the voter set changes comes back at a stale
/// epoch: the log it lacks was compacted away at the epoch change, so it
/// catches up by installing the leader's snapshot, not by appending.
#[test]
fn a_voter_back_at_a_stale_epoch_catches_up_from_a_snapshot() {
    let mut cluster = ProcessCluster::bootstrap(3);
    for n in 0..10 {
        cluster.nodes[0].emit("test.stale", &format!("before{n}")).unwrap();
    }
    cluster.converged_events("test.stale", 10);
    cluster.nodes[2].kill();
    let token = stdout(&cluster.nodes[0].cli(&["members", "token"])).trim().to_string();
    let joined = cluster.join(0, &["--join-token", &token]);
    let name = cluster.nodes[joined].name.clone();
    cluster.nodes[0].wait_status("the joiner is a learner", |status| {
        status["cluster"]["members"].as_array().unwrap().len() == 4
    });
    let promote = cluster.nodes[0].cli(&["members", "promote", &name]);
    assert!(promote.status.success(), "{}", text(&promote));
    let epoch = cluster.nodes[0].status().unwrap()["cluster"]["epoch"].as_u64().unwrap();
    for n in 0..10 {
        cluster.nodes[1].emit("test.stale", &format!("after{n}")).unwrap();
    }
    cluster.nodes[2].start();
    let status = cluster.nodes[2].wait_status("the stale voter caught up", |status| {
        status["cluster"]["epoch"].as_u64() == Some(epoch)
    });
    assert!(
        status["cluster"]["snapshot"].as_u64().is_some(),
        "it installed a snapshot: {:#}",
        status["cluster"]
    );
    cluster.wait_healthy();
    assert_eq!(cluster.converged_events("test.stale", 20).len(), 20);
}

/// Network namespaces joined by a bridge, one per node: a real network
/// between the processes that the test can cut. Removed when dropped.
struct Namespaces {
    hub: String,
    nodes: Vec<String>,
    subnet: String,
}

fn ip(args: &[&str]) {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("the `ip` tool (Debian package iproute2) is needed for network-namespace tests");
    assert!(
        output.status.success(),
        "ip {}: {} (network-namespace tests need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Namespaces {
    fn new(count: usize) -> Namespaces {
        let tag = std::process::id() % 100_000;
        let subnet = format!("10.{}.{}", 200 + tag % 50, tag % 250);
        let hub = format!("hm{tag}hub");
        let namespaces = Namespaces {
            nodes: (1..=count).map(|i| format!("hm{tag}n{i}")).collect(),
            hub: hub.clone(),
            subnet,
        };
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, node) in namespaces.nodes.iter().enumerate() {
            let (port, end) = (format!("port{}", i + 1), "eth0");
            ip(&["netns", "add", node]);
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", end, "netns", node,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            let address = format!("{}/24", namespaces.address(i));
            ip(&["-n", node, "addr", "add", &address, "dev", end]);
            ip(&["-n", node, "link", "set", end, "up"]);
            ip(&["-n", node, "link", "set", "lo", "up"]);
        }
        namespaces
    }

    fn address(&self, index: usize) -> String {
        format!("{}.{}", self.subnet, index + 1)
    }

    /// Takes node `index` off the bridge (or puts it back).
    fn connect(&self, index: usize, connected: bool) {
        let port = format!("port{}", index + 1);
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &port,
            if connected { "up" } else { "down" },
        ]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for namespace in self.nodes.iter().chain([&self.hub]) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", namespace])
                .status();
        }
    }
}

fn cli_json(node: &NodeProcess, args: &[&str]) -> Option<Value> {
    let output = node.cli(args);
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).ok())
        .flatten()
}

fn ns_status(node: &NodeProcess) -> Option<Value> {
    cli_json(node, &["status", "--json"]).map(|both| both["status"].clone())
}

fn ns_events(node: &NodeProcess) -> Vec<String> {
    cli_json(node, &["events", "tail", "--kind", "test.partition", "--json"])
        .and_then(|events| {
            events.as_array().map(|events| {
                events
                    .iter()
                    .map(|event| event["key"].as_str().unwrap().to_string())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn ns_wait(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three nodes in their own network namespaces on a bridge; the leader's
/// link is cut. The cut-off node refuses writes with a clear error and says
/// it is degraded, naming the voters it cannot reach; the other two elect a
/// leader and take writes; when the link is back, all three converge on
/// the majority's events.
#[test]
fn a_partitioned_leader_refuses_writes_and_the_majority_carries_on() {
    let namespaces = Namespaces::new(3);
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProcess> = (0..3)
        .map(|i| {
            let mut node = NodeProcess::new(root.path(), &format!("n{}", i + 1), Vec::new());
            node.api = format!("{}:7480", namespaces.address(i));
            node.transport = format!("{}:7481", namespaces.address(i));
            node.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), namespaces.nodes[i].clone()];
            node
        })
        .collect();
    let peers: Vec<String> = nodes.iter().map(|node| node.transport.clone()).collect();
    for node in &mut nodes {
        node.args = vec!["--bootstrap".into(), "--peers".into(), peers.join(",")];
        node.start();
    }
    let leader_of = |statuses: &[Option<Value>]| -> Option<usize> {
        let leader = statuses[0].as_ref()?["cluster"]["leader"].as_str()?.to_string();
        statuses
            .iter()
            .all(|status| {
                status.as_ref().is_some_and(|status| {
                    status["cluster"]["leader"] == leader.as_str() && status["cluster"]["health"] == "healthy"
                })
            })
            .then(|| {
                statuses
                    .iter()
                    .position(|status| status.as_ref().unwrap()["node"]["id"] == leader.as_str())
            })
            .flatten()
    };
    let mut leader = None;
    ns_wait("the cluster in namespaces became healthy", || {
        leader = leader_of(&nodes.iter().map(ns_status).collect::<Vec<_>>());
        leader.is_some()
    });
    let leader = leader.unwrap();
    let emit = |node: &NodeProcess, key: &str| node.cli(&["events", "emit", "test.partition", key]);
    assert!(emit(&nodes[leader], "before").status.success());

    namespaces.connect(leader, false);
    let refused = emit(&nodes[leader], "minority");
    assert!(!refused.status.success(), "the minority refuses writes");
    assert!(stderr(&refused).contains("not committed"), "{}", stderr(&refused));
    ns_wait("the cut-off node reports degraded with both voters missing", || {
        ns_status(&nodes[leader]).is_some_and(|status| {
            status["cluster"]["health"] == "degraded"
                && status["cluster"]["missing_voters"]
                    .as_array()
                    .is_some_and(|missing| missing.len() == 2)
        })
    });
    let majority: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    ns_wait("the majority took a write", || {
        emit(&nodes[majority[0]], "majority").status.success()
    });

    namespaces.connect(leader, true);
    ns_wait("all three converged on the majority's events", || {
        nodes.iter().all(|node| ns_events(node) == ["before", "majority"])
    });
}

/// A voter removed while it was down comes back with `--join`: the cluster
/// refuses its data as from a stale epoch, so it drops its cluster state,
/// joins afresh as a learner and catches up with everything committed.
#[test]
fn a_node_removed_while_down_rejoins_afresh() {
    let mut cluster = ProcessCluster::bootstrap(3);
    let token = stdout(&cluster.nodes[0].cli(&["members", "token"])).trim().to_string();
    let joined = cluster.join(0, &["--join-token", &token]);
    let name = cluster.nodes[joined].name.clone();
    cluster.nodes[0].wait_status("the joiner is a member", |status| {
        status["cluster"]["members"].as_array().unwrap().len() == 4
    });
    let promote = cluster.nodes[0].cli(&["members", "promote", &name]);
    assert!(promote.status.success(), "{}", text(&promote));
    cluster.nodes[joined].wait_status("the joiner knows it is a voter", |status| {
        status["cluster"]["voters"].as_array().unwrap().len() == 4
    });

    cluster.nodes[joined].kill();
    let remove = cluster.nodes[1].cli(&["members", "remove", &name]);
    assert!(remove.status.success(), "{}", text(&remove));
    for n in 0..5 {
        cluster.nodes[0].emit("test.rejoin", &format!("k{n}")).unwrap();
    }

    let token = stdout(&cluster.nodes[0].cli(&["members", "token"])).trim().to_string();
    cluster.nodes[joined].args = vec![
        "--join".into(),
        cluster.nodes[2].transport.clone(),
        "--join-token".into(),
        token,
    ];
    cluster.nodes[joined].start();
    cluster.nodes[0].wait_status("the node is back as a learner", |status| {
        status["cluster"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|member| member["name"] == name.as_str() && member["role"] == "learner")
    });
    assert_eq!(cluster.converged_events("test.rejoin", 5).len(), 5);
    let log = cluster.nodes[joined].log();
    assert!(log.contains("stale epoch"), "{log}");
}

/// A node restarted with no flags comes back as what it was: its name, its
/// API and transport addresses, and no bundled roles when its first start
/// had none. A start that gives it another name or transport address is
/// refused, naming the file that says what it was and how to move a node.
#[test]
fn a_restart_without_flags_is_the_same_node() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n7", Vec::new());
    let is_n7 = |status: &Value| {
        status["cluster"]["members"].as_array().is_some_and(|members| {
            members
                .iter()
                .any(|member| member["self"] == true && member["name"] == "n7")
        })
    };
    node.start();
    node.wait_status("n7 serves", is_n7);
    assert!(node.terminate().success());

    node.start_plain(&[]);
    let status = node.wait_status("n7 back under its own name", is_n7);
    let me = status["cluster"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|member| member["self"] == true)
        .unwrap()
        .clone();
    assert_eq!(me["transport"], node.transport.as_str(), "{me}");
    assert_eq!(std::fs::read_to_string(node.dir.join("api.addr")).unwrap(), node.api);
    assert!(
        !node.dir.join("roles/dns.wasm").exists(),
        "the first start had no bundled roles, and a restart adds none"
    );
    assert!(node.terminate().success());

    for flags in [["--node-name", "impostor"], ["--transport", "127.0.0.1:1"]] {
        node.start_plain(&flags);
        let (exit, log) = wait_exit(&mut node);
        assert!(!exit.success(), "{flags:?} was accepted: {log}");
        assert!(
            log.contains("node.toml") && log.contains("members remove"),
            "{flags:?}: {log}"
        );
    }
    let refused = node.log();
    assert!(refused.contains("`n7`"), "{refused}");
}
