//! The quorum log on one node: durable across restarts, compacted to the
//! latest event per kind+key by snapshots, and what a late role sees.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

fn seqs_and_keys(events: &Value) -> Vec<(u64, String)> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|event| {
            (
                event["seq"].as_u64().unwrap(),
                event["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Acknowledged events are all there, in the same order, after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn events_survive_a_restart() {
    let mut host = TestHost::start().await;
    let mut acknowledged = Vec::new();
    for key in ["a", "b", "c", "d", "e"] {
        acknowledged.push((host.api().emit("test.durable", key).await, key.to_string()));
    }
    host.restart().await;
    let events = host.api().get("/v1/events?kind=test.durable").await.json();
    assert_eq!(seqs_and_keys(&events), acknowledged);
    let next = host.api().emit("test.durable", "f").await;
    assert!(
        next > acknowledged.last().unwrap().0,
        "seqs keep growing after a restart"
    );
    host.stop().await;
}

/// Past the snapshot threshold the stream keeps only the latest event of
/// each kind+key (older ones of the same key are gone), across a restart,
/// and a role loaded afterwards bootstraps from exactly that.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_compact_to_the_latest_per_kind_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = hivemind::HostConfig::for_tests(dir.path());
    config.raft.snapshot_every = 20;
    let mut host = TestHost::start_with(dir, config).await;
    let api = host.api();
    let mut last_web = 0;
    for _ in 0..30 {
        last_web = api.emit("test.service", "web").await;
    }
    let db = api.emit("test.service", "db").await;
    for _ in 0..30 {
        api.emit("test.noise", "tick").await;
    }

    let deadline = Instant::now() + PATIENCE;
    loop {
        let events = api.get("/v1/events?kind=test.service").await.json();
        if seqs_and_keys(&events) == [(last_web, "web".to_string()), (db, "db".to_string())] {
            break;
        }
        assert!(Instant::now() < deadline, "never compacted: {events}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    host.restart().await;
    let events = host.api().get("/v1/events?kind=test.service").await.json();
    assert_eq!(
        seqs_and_keys(&events),
        [(last_web, "web".to_string()), (db, "db".to_string())]
    );

    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let after = host.api().emit("test.after", "late").await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = host.api().role("probe", "seen", &[]).await.json();
        let seen: Vec<u64> = serde_json::from_value(seen).unwrap();
        if seen.last() == Some(&after) {
            // The compacted part gives one event per kind+key; entries after
            // the last snapshot follow in full, all in seq order.
            assert_eq!(&seen[..2], [last_web, db], "{seen:?}");
            assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "{seen:?}");
            break;
        }
        assert!(Instant::now() < deadline, "late role saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.stop().await;
}

/// The status reports the cluster as a single voter that leads itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_host_is_a_one_voter_cluster() {
    let host = TestHost::start().await;
    let status = host.api().get("/v1/status").await.json();
    let cluster = &status["cluster"];
    assert_eq!(cluster["mode"], "single-node", "{status:#}");
    assert_eq!(cluster["health"], "healthy", "{status:#}");
    assert_eq!(cluster["leader"], status["node"]["id"], "{status:#}");
    assert_eq!(cluster["voters"], json!([status["node"]["id"]]), "{status:#}");
    host.stop().await;
}

/// A corrupt or truncated store file stops start-up with an error naming
/// the file and what to do; the file is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_store_is_reported_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = hivemind::HostConfig::for_tests(dir.path());
    let store = dir.path().join("hivemind.redb");

    std::fs::write(&store, b"this is not a database, it is a sandwich").unwrap();
    let error = hivemind::Daemon::start(config.clone())
        .await
        .err()
        .expect("start-up refuses a corrupt store");
    let message = format!("{error:#}");
    assert!(
        message.contains("hivemind.redb") && message.contains("corrupt"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&store).unwrap(),
        b"this is not a database, it is a sandwich"
    );

    // A real store cut in half.
    std::fs::remove_file(&store).unwrap();
    let host = TestHost::start_with(tempfile::tempdir().unwrap(), config.clone()).await;
    host.api().emit("test.kept", "a").await;
    host.stop().await;
    let bytes = std::fs::read(&store).unwrap();
    std::fs::write(&store, &bytes[..bytes.len() / 2]).unwrap();
    match hivemind::Daemon::start(config).await {
        Err(error) => assert!(format!("{error:#}").contains("hivemind.redb"), "{error:#}"),
        // redb may recover a file cut after its last durable commit; then
        // the acknowledged event must still be there.
        Ok(daemon) => {
            let api = Api::new(&daemon.api_addr.to_string(), &daemon.token);
            let events = api.get("/v1/events?kind=test.kept").await.json();
            assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
            daemon.shutdown().await;
        }
    }
}

/// The Raft log's own file, corrupt, stops start-up with an error naming
/// it; the file is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_raft_log_is_reported_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = hivemind::HostConfig::for_tests(dir.path());
    let log = dir.path().join("raft.redb");
    std::fs::write(&log, b"not a log either").unwrap();
    let error = hivemind::Daemon::start(config)
        .await
        .err()
        .expect("start-up refuses a corrupt Raft log");
    let message = format!("{error:#}");
    assert!(
        message.contains("raft.redb") && message.contains("corrupt"),
        "{message}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), b"not a log either");
}
