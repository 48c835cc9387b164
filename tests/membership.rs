//! Membership on clusters of real `hivemind up` processes on loopback:
//! gossip converges, a `kill -9`ed node is decided failed exactly once and
//! rejoins under a new generation, a node of another cluster never gets in,
//! and roles call each other across nodes over one connection per peer.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// `GET /v1/nodes` on `node`, once `check` holds for it.
fn wait_nodes(node: &NodeProcess, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(reply) = node.client().get_json("/v1/nodes") {
            let nodes = reply["nodes"].as_array().cloned().unwrap_or_default();
            if check(&nodes) {
                return nodes;
            }
            assert!(Instant::now() < deadline, "{}: {what}; nodes now {nodes:#?}", node.name);
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what}; the API does not answer",
            node.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn entry<'a>(nodes: &'a [Value], id: &str) -> Option<&'a Value> {
    nodes.iter().find(|node| node["id"] == json!(id))
}

fn node_id(node: &NodeProcess) -> String {
    node.status().expect("status")["node"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every node lists all `count` nodes healthy, each alive on gossip.
fn wait_converged(cluster: &ProcessCluster, count: usize) {
    for node in cluster.nodes.iter().filter(|node| node.is_running()) {
        wait_nodes(node, "every node healthy and alive on gossip", |nodes| {
            nodes.len() == count
                && nodes
                    .iter()
                    .all(|node| node["healthy"] == json!(true) && node["gossip"] == json!("alive"))
        });
    }
}

/// Five nodes converge; a killed one is seen down by every other and the
/// log holds exactly one `node.failed` for it; restarted (a new gossip
/// generation), it rejoins with exactly one `node.rejoined`.
#[test]
fn a_killed_node_is_failed_once_and_rejoins() {
    let mut cluster = ProcessCluster::bootstrap(5);
    wait_converged(&cluster, 5);
    let victim = 4;
    let victim_id = node_id(&cluster.nodes[victim]);
    let generation_before = cluster.nodes[victim].status().unwrap()["gossip"]["generation"].clone();

    // A long-poll for the next change, answered by the kill.
    let watcher = cluster.nodes[0].client();
    let since = watcher.get_json("/v1/nodes").unwrap()["last_changed"].as_u64().unwrap();
    let long_poll = std::thread::spawn(move || {
        watcher
            .get_json(&format!("/v1/nodes?wait_change_since={since}&timeout_ms=60000"))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !long_poll.is_finished(),
        "the long-poll answered before anything changed"
    );

    cluster.nodes[victim].kill();
    let changed = long_poll.join().unwrap();
    assert!(changed["last_changed"].as_u64().unwrap() > since, "{changed}");
    for node in cluster.nodes.iter().filter(|node| node.is_running()) {
        wait_nodes(node, "the killed node is decided failed", |nodes| {
            entry(nodes, &victim_id).is_some_and(|entry| {
                entry["healthy"] == json!(false)
                    && entry["health"] == json!("failed")
                    && entry["gossip"] == json!("down")
            })
        });
    }
    let failed = cluster.converged_events("node.failed", 1);
    assert_eq!(
        failed.iter().filter(|(_, key)| *key == victim_id).count(),
        1,
        "{failed:?}"
    );

    cluster.nodes[victim].start();
    wait_converged(&cluster, 5);
    let generation_after = cluster.nodes[victim].status().unwrap()["gossip"]["generation"].clone();
    assert!(
        generation_after.as_u64() > generation_before.as_u64(),
        "{generation_before} -> {generation_after}"
    );
    let rejoined = cluster.converged_events("node.rejoined", 1);
    assert_eq!(
        rejoined.iter().filter(|(_, key)| *key == victim_id).count(),
        1,
        "{rejoined:?}"
    );
    let failed = cluster.converged_events("node.failed", 1);
    assert_eq!(
        failed.iter().filter(|(_, key)| *key == victim_id).count(),
        1,
        "{failed:?}"
    );
}

/// A node stopped cleanly says goodbye: `node.left`, never `node.failed`.
#[test]
fn a_clean_stop_is_recorded_as_left() {
    let mut cluster = ProcessCluster::bootstrap(3);
    wait_converged(&cluster, 3);
    let leaving_id = node_id(&cluster.nodes[2]);
    assert!(cluster.nodes[2].terminate().success());
    wait_nodes(&cluster.nodes[0], "the stopped node is listed as left", |nodes| {
        entry(nodes, &leaving_id).is_some_and(|entry| entry["health"] == json!("left"))
    });
    let (status, table) = cluster.nodes[0]
        .client()
        .send("GET", "/v1/nodes?format=text", b"", "text/plain")
        .unwrap();
    let table = String::from_utf8_lossy(&table).into_owned();
    assert_eq!(status, 200, "{table}");
    assert!(
        table
            .lines()
            .any(|line| line.starts_with(&cluster.nodes[2].name) && line.contains("left")),
        "{table}"
    );
    let left = cluster.converged_events("node.left", 1);
    assert_eq!(left.iter().filter(|(_, key)| *key == leaving_id).count(), 1, "{left:?}");
    // Well past the failure detector and the grace: still no node.failed.
    std::thread::sleep(Duration::from_secs(3));
    let failed = cluster.nodes[0].events("node.failed");
    assert!(
        failed.is_empty(),
        "{failed:?}; left {leaving_id}, log {:?}",
        cluster.nodes[0].events("node.")
    );
}

/// A node of another cluster (another key) gossiping at a member is never
/// listed: its packets fail to open and are counted as rejected.
#[test]
fn a_node_with_another_cluster_key_never_appears() {
    let cluster = ProcessCluster::bootstrap(3);
    wait_converged(&cluster, 3);
    let target: std::net::SocketAddr = cluster.nodes[0].transport.parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let intruder_id = 0x0bad_0bad_0bad_0badu64;
    let (membership, task) = runtime.block_on(async {
        let setup = hivemind::membership::GossipSetup {
            bind: "127.0.0.1:0".parse().unwrap(),
            advertise: "127.0.0.1:0".parse().unwrap(),
            generation: 1,
            metadata: hivemind::membership::NodeMetadata {
                node: intruder_id,
                generation: 1,
                version: 0,
                name: "intruder".into(),
                api: String::new(),
                transport: String::new(),
                roles: vec![],
                epoch: 1,
            },
            sealer: hivemind::membership::Sealer::from_secret(b"some other cluster's key"),
            preset: hivemind::membership::GossipPreset::Fast,
            isolation: Default::default(),
        };
        hivemind::membership::Membership::start(setup, shutdown.clone())
            .await
            .unwrap()
    });
    let member_id = u64::from_str_radix(&node_id(&cluster.nodes[0]), 16).unwrap();
    membership.set_seeds(vec![(member_id, target)]);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = cluster.nodes[0].status().unwrap();
        if status["gossip"]["packets_rejected"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rejected packets counted: {}",
            status["gossip"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let intruder = format!("{intruder_id:016x}");
    for node in &cluster.nodes {
        let nodes = wait_nodes(node, "three nodes", |nodes| nodes.len() == 3);
        assert!(entry(&nodes, &intruder).is_none(), "{nodes:#?}");
    }
    assert!(membership.view().members.is_empty(), "the intruder learned of members");
    shutdown.cancel();
    runtime.block_on(task).unwrap();
}

/// Installs the probe role on `node` and waits until it runs.
fn install_probe(node: &NodeProcess) {
    std::fs::create_dir_all(node.dir.join("roles")).unwrap();
    atomic_write(&node.dir.join("roles/probe.wasm"), &probe());
    let deadline = Instant::now() + PATIENCE;
    while node
        .client()
        .get_json("/v1/roles/probe")
        .map_or(true, |info| info["state"] != json!("running"))
    {
        assert!(Instant::now() < deadline, "{}: the probe role did not start", node.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn call(from: &NodeProcess, to: &str, path: &str) -> (u16, String) {
    call_with(&from.client(), to, path)
}

fn call_with(client: &hivemind::cli::Client, to: &str, path: &str) -> (u16, String) {
    let body = serde_json::to_vec(&json!({ "args": [to, "probe", path] })).unwrap();
    let (status, reply) = client
        .send("POST", "/v1/roles/probe/call", &body, "application/json")
        .unwrap();
    (status, String::from_utf8_lossy(&reply).into_owned())
}

/// A role calls a role on other nodes: many concurrent calls share one
/// connection per peer; a call in flight to a node that dies fails at once
/// with the connection's closing (not its timeout); the node back, calls
/// work again over a new connection.
#[test]
fn role_calls_share_one_connection_per_peer_and_fail_fast() {
    let mut cluster = ProcessCluster::bootstrap(3);
    wait_converged(&cluster, 3);
    for node in &cluster.nodes {
        install_probe(node);
    }
    // Every node must see the others run the role before calling them.
    wait_nodes(&cluster.nodes[0], "all nodes run the probe role", |nodes| {
        nodes
            .iter()
            .all(|node| node["roles"].as_array().is_some_and(|roles| !roles.is_empty()))
    });
    let peers = [node_id(&cluster.nodes[1]), node_id(&cluster.nodes[2])];

    std::thread::scope(|scope| {
        for round in 0..16 {
            let (cluster, peers) = (&cluster, &peers);
            scope.spawn(move || {
                let (status, body) = call(&cluster.nodes[0], &peers[round % 2], "version");
                assert_eq!(status, 200, "{body}");
            });
        }
    });
    let connect = &cluster.nodes[0].status().unwrap()["connect"];
    assert_eq!(connect["opened"], json!(2), "{connect}");
    assert_eq!(connect["open_links"], json!(2), "{connect}");

    // `hivemind members` shows each node, its roles and its health.
    let listing = cluster.nodes[1].cli(&["members", "--wait-stable", "300ms"]);
    let text = stdout(&listing);
    assert!(listing.status.success(), "{text}{}", stderr(&listing));
    for node in &cluster.nodes {
        let line = text
            .lines()
            .find(|line| line.contains(&node.name))
            .unwrap_or_else(|| panic!("{} is not listed:\n{text}", node.name));
        assert!(line.contains("healthy") && line.contains("probe@"), "{line}");
    }

    let doomed = peers[1].clone();
    let caller_client = cluster.nodes[0].client();
    let in_flight = std::thread::scope(|scope| {
        let caller = scope.spawn(|| call_with(&caller_client, &doomed, "sleep/1500"));
        std::thread::sleep(Duration::from_millis(300));
        cluster.nodes[2].kill();
        caller.join().unwrap()
    });
    assert_eq!(in_flight.0, 503, "{in_flight:?}");
    assert!(
        in_flight.1.contains("connection closed"),
        "failed for another reason: {in_flight:?}"
    );

    cluster.nodes[2].start();
    wait_converged(&cluster, 3);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = call(&cluster.nodes[0], &doomed, "version");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "calls to the restarted node keep failing: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect = &cluster.nodes[0].status().unwrap()["connect"];
    assert_eq!(connect["opened"], json!(3), "{connect}");
}
