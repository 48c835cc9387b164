//! Members whose clocks disagree, one of them run under libfaketime ten
//! minutes ahead: join tokens keep the TTL they were given whoever mints
//! and whoever leads, event times never go back, and `status` names the
//! member whose clock is off.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// How far ahead the fast node's clock runs.
const AHEAD_S: i64 = 600;

/// Runs `node` with its wall clock `AHEAD_S` ahead; its monotonic clock
/// (timers, timeouts) stays true, as on a machine whose time is set wrong.
/// libfaketime is preloaded through `env`, which execs: the `faketime`
/// program would fork, and a kill of it would leave the node running.
fn run_ahead(node: &mut NodeProcess) {
    node.wrapper = vec![
        "env".into(),
        format!("LD_PRELOAD={}", libfaketime().display()),
        format!("FAKETIME=+{AHEAD_S}s"),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
    ];
}

/// Debian's libfaketime (package `faketime`), under the machine's
/// multiarch directory.
fn libfaketime() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|entry| Some(entry.ok()?.path().join("faketime/libfaketime.so.1")))
        .find(|path| path.exists())
        .expect("libfaketime is installed (Debian package faketime; scripts/test installs it)")
}

/// A one-node cluster of a node whose clock is ahead, which then leads.
fn fast_founder() -> ProcessCluster {
    let root = tempfile::tempdir().unwrap();
    let mut founder = NodeProcess::new(root.path(), "n1", Vec::new());
    run_ahead(&mut founder);
    founder.start();
    let cluster = ProcessCluster {
        nodes: vec![founder],
        root,
    };
    cluster.wait_healthy();
    cluster
}

/// `hivemind members token --ttl SECS` through `node`.
fn mint(node: &NodeProcess, ttl_s: u64) -> String {
    let output = node.cli(&["members", "token", "--ttl", &ttl_s.to_string()]);
    assert!(output.status.success(), "{}: {}", node.name, stderr(&output));
    stdout(&output).trim().to_string()
}

/// Waits until the node at `index` of `cluster` is admitted and serves.
fn wait_admitted(cluster: &ProcessCluster, index: usize) -> String {
    cluster.nodes[index].wait_status("the joiner is admitted", |status| {
        status["cluster"]["health"] == "healthy"
    })["node"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until the joiner at `index` gives up, and returns its output.
fn wait_refused(cluster: &mut ProcessCluster, index: usize) -> String {
    let node = &mut cluster.nodes[index];
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = node.exited() {
            assert!(!status.success(), "{} exited cleanly", node.name);
            return node.log();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} was not refused: {}",
            node.name,
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 300 s token minted on a node with a true clock still admits once a
/// node ten minutes ahead decides the join (it led; its clock alone said
/// the token had expired), and a 1 s token minted on the fast node is
/// refused two seconds later by a leader with a true clock (whose clock
/// alone said it had ten minutes left).
#[test]
fn a_join_tokens_ttl_holds_whichever_clocks_mint_it_and_decide() {
    let mut cluster = fast_founder();
    for _ in 0..2 {
        let token = mint(&cluster.nodes[0], 300);
        let joined = cluster.join(0, &["--join-token", &token]);
        wait_admitted(&cluster, joined);
        let name = cluster.nodes[joined].name.clone();
        let promote = cluster.nodes[0].cli(&["members", "promote", &name]);
        assert!(promote.status.success(), "{}", stderr(&promote));
    }
    let leader = cluster.wait_healthy();
    assert_eq!(leader, 0, "the fast founder leads");

    let minted_slow = mint(&cluster.nodes[1], 300);
    let joined = cluster.join(1, &["--join-token", &minted_slow]);
    wait_admitted(&cluster, joined);

    // A leader with a true clock: the fast node goes down, one of the two
    // others is elected, and the fast node comes back as a follower.
    cluster.nodes[0].kill();
    let leader = cluster.wait_healthy();
    assert_ne!(leader, 0);
    cluster.nodes[0].start();
    cluster.wait_healthy();

    let minted_fast = mint(&cluster.nodes[0], 1);
    std::thread::sleep(Duration::from_secs(2));
    let late = cluster.join(0, &["--join-token", &minted_fast]);
    let log = wait_refused(&mut cluster, late);
    assert!(log.contains("the join token has expired"), "{log}");

    // A fresh one from the fast node still admits.
    let minted_fast = mint(&cluster.nodes[0], 300);
    let joined = cluster.join(0, &["--join-token", &minted_fast]);
    wait_admitted(&cluster, joined);
}

/// The members' clock offsets as `node`'s status shows them, by name.
fn clock_offsets(status: &Value) -> Vec<(String, Option<i64>)> {
    status["cluster"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|member| {
            (
                member["name"].as_str().unwrap().to_string(),
                member["clock_offset_ms"].as_i64(),
            )
        })
        .collect()
}

/// Events written through a node ten minutes ahead and then through one
/// with a true clock keep their order in time; each node's status shows
/// how far the other's clock is, and `hivemind status` warns of it.
#[test]
fn event_times_never_go_back_and_status_names_a_clock_that_is_off() {
    let mut cluster = fast_founder();
    let token = mint(&cluster.nodes[0], 300);
    let joined = cluster.join(0, &["--join-token", &token]);
    wait_admitted(&cluster, joined);

    let ahead = cluster.nodes[0].emit("clock.test", "through-the-fast-node").unwrap();
    let behind = cluster.nodes[1].emit("clock.test", "through-the-true-node").unwrap();
    assert!(behind > ahead);
    cluster.converged_events("clock.test", 2);
    let (_, body) = cluster.nodes[1]
        .client()
        .send("GET", "/v1/events?kind=clock.test", b"", "application/json")
        .unwrap();
    let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let times: Vec<u64> = events
        .iter()
        .map(|event| event["timestamp_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(times.len(), 2, "{events:?}");
    assert!(times[1] >= times[0], "event times went back: {times:?}");

    let near =
        |offset: Option<i64>, expected_s: i64| offset.is_some_and(|offset| (offset - expected_s * 1000).abs() < 5_000);
    let status = cluster.nodes[1].wait_status("the fast member's clock offset is known", |status| {
        clock_offsets(status)
            .iter()
            .any(|(name, offset)| name == "n1" && near(*offset, AHEAD_S))
    });
    assert!(
        clock_offsets(&status)
            .iter()
            .any(|(name, offset)| name == "n2" && offset.is_none()),
        "no offset for this node itself: {:?}",
        clock_offsets(&status)
    );
    cluster.nodes[0].wait_status("the true member is behind the fast one", |status| {
        clock_offsets(status)
            .iter()
            .any(|(name, offset)| name == "n2" && near(*offset, -AHEAD_S))
    });
    let output = cluster.nodes[1].cli(&["status"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let warning = stdout(&output)
        .lines()
        .find(|line| line.contains("member n1's clock is"))
        .map(str::to_string);
    assert!(
        warning
            .as_ref()
            .is_some_and(|line| line.contains("s ahead of this node's")),
        "{}",
        stdout(&output)
    );
}
