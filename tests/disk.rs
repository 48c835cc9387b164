//! A node whose disk fills, on a tmpfs the test mounts and fills: it says
//! so (status, metrics, the leader's view), refuses to serve the reads it
//! knows are stale, and runs again by itself once space returns.

mod support;

use serde_json::{Value, json};
use support::*;

/// A tmpfs large enough for a node's files and a few hundred events.
const DISK_BYTES: u64 = 64 << 20;

/// One event with a payload big enough that the log must grow its files.
fn emit_large(node: &NodeProcess, key: &str) -> Result<u64, String> {
    node.emit_event(&json!({ "kind": "disk.test", "key": key, "payload": "x".repeat(8000) }))
}

/// `GET /v1/events` on `node`: the status and the body's text.
fn read_events(node: &NodeProcess) -> (u16, String) {
    let (status, body) = node
        .client()
        .send("GET", "/v1/events?kind=disk.&limit=10000", b"", "application/json")
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One metric's value on `node`.
fn metric(node: &NodeProcess, name: &str) -> Option<f64> {
    let (_, body) = node.client().send("GET", "/metrics", b"", "text/plain").unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A voter whose disk fills: its core stops, and instead of looking healthy
/// and serving reads that miss events it acknowledged, it says why, the
/// leader names it, and its reads are refused. Freed space brings it back
/// with every event.
#[test]
fn a_voter_whose_disk_fills_says_so_and_recovers() {
    let mut disk = None;
    let cluster = ProcessCluster::bootstrap_configured(3, |index, node| {
        if index == 2 {
            disk = Some(Tmpfs::mount(&node.dir, DISK_BYTES));
        }
    });
    let disk = disk.unwrap();
    let leader = cluster.wait_healthy();
    let full = &cluster.nodes[2];
    for i in 0..5 {
        full.emit("disk.test", &format!("before-{i}")).unwrap();
    }
    assert_eq!(cluster.converged_events("disk.test", 5).len(), 5);

    let taken = disk.fill();
    assert!(taken > 0, "the filler took no space");
    // Written through the full node: forwarded, so the cluster commits
    // them and the node acknowledges them although it cannot store them.
    let mut acknowledged = 5;
    for i in 0..200 {
        if emit_large(full, &format!("during-{i}")).is_ok() {
            acknowledged += 1;
        }
        if full
            .status()
            .is_some_and(|status| status["cluster"]["health"] == "degraded")
        {
            break;
        }
    }
    let status = full.wait_status("the full node says its log stopped", |status| {
        status["cluster"]["health"] == "degraded"
            && status["cluster"]["problem"]
                .as_str()
                .is_some_and(|problem| problem.contains("log stopped"))
    });
    let problem = status["cluster"]["problem"].as_str().unwrap().to_string();
    assert!(
        problem.contains("No space left on device") || problem.contains("KiB free"),
        "the reason names the full disk: {problem}"
    );
    assert_eq!(metric(full, "hivemind_log_core_running"), Some(0.0));

    let (code, body) = read_events(full);
    assert_eq!(code, 503, "the full node serves no stale reads: {body}");
    assert!(body.contains("stale"), "the refusal says why: {body}");

    let leader_view = cluster.nodes[leader].wait_status("the leader names the stopped member", |status| {
        status["cluster"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|member| member["name"] == "n3" && member["log_stopped"].is_string())
    });
    assert_eq!(
        leader_view["cluster"]["health"], "healthy",
        "two of three voters still make a quorum"
    );

    disk.free();
    full.wait_status("the full node runs again once space returns", |status| {
        status["cluster"]["health"] == "healthy"
    });
    assert_eq!(metric(full, "hivemind_log_core_running"), Some(1.0));
    assert!(metric(full, "hivemind_log_core_restarts_total").unwrap_or(0.0) >= 1.0);
    let events = cluster.converged_events("disk.test", acknowledged);
    assert_eq!(events.len(), acknowledged, "every acknowledged event is on every node");
}

/// A lone node whose disk fills refuses writes with the reason, and takes
/// them again by itself once space returns, with nothing lost.
#[test]
fn a_lone_node_whose_disk_fills_takes_writes_again_once_space_returns() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    let disk = Tmpfs::mount(&node.dir, DISK_BYTES);
    node.start();
    node.wait_status("the node leads its cluster", |status| {
        status["cluster"]["health"] == "healthy"
    });
    let before = emit_large(&node, "before").unwrap();

    disk.fill();
    let refused = (0..200)
        .find_map(|i| emit_large(&node, &format!("during-{i}")).err())
        .expect("a write to a full disk is refused");
    assert!(
        refused.contains("HTTP 503"),
        "a full disk is the node's trouble, not the caller's: {refused}"
    );
    node.wait_status("the node says its log stopped", |status| {
        status["cluster"]["problem"]
            .as_str()
            .is_some_and(|problem| problem.contains("log stopped"))
    });

    disk.free();
    node.wait_status("the node runs again once space returns", |status| {
        status["cluster"]["health"] == "healthy"
    });
    let after = wait_for("a write after space returned", || emit_large(&node, "after").ok());
    assert!(after > before);
    let (code, body) = read_events(&node);
    assert_eq!(code, 200, "{body}");
    let events: Vec<Value> = serde_json::from_str(&body).unwrap();
    let keys: Vec<&str> = events.iter().filter_map(|event| event["key"].as_str()).collect();
    assert!(keys.contains(&"before") && keys.contains(&"after"), "{keys:?}");
}
