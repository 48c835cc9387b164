//! Role life cycle on a real host: load by dropping a file, replace, delete,
//! partial writes, cache hits, state across reloads, listeners across
//! reloads, pause/resume, disable/enable, event delivery, worker limits.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// Dropping NAME.wasm into the roles directory loads it and its routes answer.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_file_loads_and_answers() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    let info = host.wait_live("probe", &probe()).await;
    assert_eq!(info["state"], "running");
    let reply = host.api().role("probe", "version", &[]).await;
    assert_eq!((reply.status, reply.text()), (200, "0.1.0".to_string()));
    host.stop().await;
}

/// Renaming new bytes over NAME.wasm swaps the version that answers.
#[tokio::test(flavor = "multi_thread")]
async fn replaced_file_reloads() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    host.drop_role("probe", &probe_v2(), None);
    let info = host.wait_live("probe", &probe_v2()).await;
    assert_eq!(info["version"], "0.2.0");
    assert_eq!(host.api().role("probe", "version", &[]).await.text(), "0.2.0");
    host.stop().await;
}

/// Deleting NAME.wasm unloads the role; its routes then say it does not exist.
#[tokio::test(flavor = "multi_thread")]
async fn deleted_file_unloads() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    std::fs::remove_file(host.roles_dir().join("probe.wasm")).unwrap();
    host.wait_role("probe", "unload", |info| info.is_null()).await;
    let reply = host.api().role("probe", "version", &[]).await;
    assert_eq!(reply.status, 404);
    assert!(reply.error().contains("no role named `probe`"), "{}", reply.error());
    host.stop().await;
}

/// A half-written file is rejected while the old version keeps serving; the
/// completed file then loads.
#[tokio::test(flavor = "multi_thread")]
async fn partial_write_keeps_old_version() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;

    let full = probe_v2();
    let half = &full[..full.len() / 2];
    std::fs::write(host.roles_dir().join("probe.wasm"), half).unwrap();
    let error = host.wait_rejected("probe", half).await;
    assert!(error.contains("not a valid WebAssembly component"), "{error}");
    assert_eq!(host.api().role("probe", "version", &[]).await.text(), "0.1.0");

    std::fs::write(host.roles_dir().join("probe.wasm"), &full).unwrap();
    host.wait_live("probe", &full).await;
    assert_eq!(host.api().role("probe", "version", &[]).await.text(), "0.2.0");
    host.stop().await;
}

/// Going back to bytes compiled before loads from the compile cache, and so
/// does a restart.
#[tokio::test(flavor = "multi_thread")]
async fn revert_and_restart_hit_the_compile_cache() {
    let mut host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    let first = host.wait_live("probe", &probe()).await;
    assert_eq!(first["history"][0]["cache_hit"], false);
    host.drop_role("probe", &probe_v2(), None);
    host.wait_live("probe", &probe_v2()).await;
    host.drop_role("probe", &probe(), None);
    let reverted = host.wait_live("probe", &probe()).await;
    assert_eq!(reverted["history"][0]["cache_hit"], true, "{reverted:#}");

    host.restart().await;
    let restarted = host.wait_live("probe", &probe()).await;
    assert_eq!(restarted["history"][0]["cache_hit"], true, "{restarted:#}");
    host.stop().await;
}

/// Role state set through one version is read by the next, and survives a restart.
#[tokio::test(flavor = "multi_thread")]
async fn state_survives_reload_and_restart() {
    let mut host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    assert_eq!(
        host.api().role("probe", "state-set", &["colour", "blue"]).await.status,
        200
    );

    host.drop_role("probe", &probe_v2(), None);
    host.wait_live("probe", &probe_v2()).await;
    assert_eq!(host.api().role("probe", "state-get", &["colour"]).await.text(), "blue");

    host.restart().await;
    host.wait_live("probe", &probe_v2()).await;
    assert_eq!(host.api().role("probe", "state-get", &["colour"]).await.text(), "blue");
    // `init` ran once per load: two loads before the restart, one after.
    assert_eq!(host.api().role("probe", "state-get", &["inits"]).await.text(), "3");
    host.stop().await;
}

/// Editing only the manifest reloads the role with the new config.
#[tokio::test(flavor = "multi_thread")]
async fn manifest_edit_reloads() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), Some("[config]\ngreeting = \"hello\"\n"));
    host.wait_live("probe", &probe()).await;
    assert_eq!(
        host.api().role("probe", "config", &[]).await.json(),
        json!({"greeting": "hello"})
    );

    atomic_write(
        &host.roles_dir().join("probe.toml"),
        b"[config]\ngreeting = \"bonjour\"\n",
    );
    wait_config(&host, json!({"greeting": "bonjour"})).await;
    host.stop().await;
}

/// Waits until the probe's `config` command answers `expected`.
async fn wait_config(host: &TestHost, expected: serde_json::Value) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let config = host.api().role("probe", "config", &[]).await.json();
        if config == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the config never became {expected}: {config}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A role file and a manifest rewritten in place with the same length and
/// the same modification time (what `cp -p`, `rsync -a`, `tar x` or a
/// pinned `SOURCE_DATE_EPOCH` build deploy) are loaded, not ignored.
#[tokio::test(flavor = "multi_thread")]
async fn a_same_size_same_mtime_replacement_loads() {
    let host = TestHost::start().await;
    let len = probe().len().max(probe_v2().len()) + 64;
    let (v1, v2) = (padded_to(&probe(), len), padded_to(&probe_v2(), len));
    let pinned = std::time::UNIX_EPOCH + Duration::from_secs(315_532_800);
    let wasm = host.roles_dir().join("probe.wasm");
    let manifest = host.roles_dir().join("probe.toml");
    std::fs::write(&manifest, "[config]\ngreeting = \"hello\"\n").unwrap();
    set_mtime(&manifest, pinned);
    std::fs::write(&wasm, &v1).unwrap();
    set_mtime(&wasm, pinned);
    host.wait_live("probe", &v1).await;
    // Past the window in which a change time is not trusted.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    std::fs::write(&wasm, &v2).unwrap();
    set_mtime(&wasm, pinned);
    let info = host.wait_live("probe", &v2).await;
    assert_eq!(info["version"], "0.2.0");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::write(&manifest, "[config]\ngreeting = \"salut\"\n").unwrap();
    set_mtime(&manifest, pinned);
    wait_config(&host, json!({"greeting": "salut"})).await;
    host.stop().await;
}

/// A role file that is a symbolic link loads from the file it points at,
/// and pointing the link elsewhere loads that file.
#[tokio::test(flavor = "multi_thread")]
async fn a_linked_role_file_loads_and_follows_the_link() {
    let host = TestHost::start().await;
    let releases = tempfile::tempdir().unwrap();
    std::fs::write(releases.path().join("v1.wasm"), probe()).unwrap();
    std::fs::write(releases.path().join("v2.wasm"), probe_v2()).unwrap();
    let link = host.roles_dir().join("probe.wasm");
    std::os::unix::fs::symlink(releases.path().join("v1.wasm"), &link).unwrap();
    host.wait_live("probe", &probe()).await;

    let next = host.roles_dir().join(".probe.wasm.next");
    std::os::unix::fs::symlink(releases.path().join("v2.wasm"), &next).unwrap();
    std::fs::rename(&next, &link).unwrap();
    host.wait_live("probe", &probe_v2()).await;
    host.stop().await;
}

/// A host running the probe with a UDP listener, its manifest, and a client
/// socket connected to the listener.
async fn probe_on_udp() -> (TestHost, String, tokio::net::UdpSocket) {
    let host = TestHost::start().await;
    let (manifest, port) = udp_listener_manifest("echo");
    host.drop_role("probe", &probe(), Some(&manifest));
    host.wait_live("probe", &probe()).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", port)).await.unwrap();
    (host, manifest, client)
}

/// A host-owned UDP listener answers every datagram while the role is
/// replaced back and forth: the port is never unbound.
#[tokio::test(flavor = "multi_thread")]
async fn udp_listener_answers_through_reloads() {
    let (host, manifest, client) = probe_on_udp().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut answered = std::collections::BTreeSet::new();
            let mut sent = 0u32;
            let mut buffer = [0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let message = format!("ping-{sent}");
                client.send(message.as_bytes()).await.unwrap();
                sent += 1;
                let reply = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
                    .await
                    .unwrap_or_else(|_| panic!("no answer to {message}"))
                    .unwrap();
                let reply = String::from_utf8_lossy(&buffer[..reply]).into_owned();
                assert!(reply.ends_with(&message), "{reply} is not an answer to {message}");
                answered.insert(reply.split(' ').next().unwrap().to_string());
            }
            (sent, answered)
        })
    };
    for round in 0..6 {
        let bytes = if round % 2 == 0 { probe_v2() } else { probe() };
        host.drop_role("probe", &bytes, Some(&manifest));
        host.wait_live("probe", &bytes).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, versions) = sender.await.unwrap();
    assert!(sent > 10, "only {sent} datagrams were sent");
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), ["0.1.0", "0.2.0"]);
    host.stop().await;
}

/// A roles directory deleted and made again is watched again at once: with
/// the periodic rescan an hour away, a role dropped into the new directory
/// loads, and so does a second one dropped after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_roles_directory_is_watched_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = hivemind::HostConfig::for_tests(dir.path());
    config.rescan = Duration::from_secs(3600);
    let host = TestHost::start_with(dir, config).await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    std::fs::remove_dir_all(host.roles_dir()).unwrap();
    std::fs::create_dir(host.roles_dir()).unwrap();
    host.drop_role("probe", &probe_v2(), None);
    host.wait_live("probe", &probe_v2()).await;
    host.drop_role("second", &probe(), None);
    host.wait_live("second", &probe()).await;
    host.stop().await;
}

/// A version whose listener's port is taken is rejected with the reason,
/// and loads by itself once the port is free, though its files never
/// changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_listener_whose_port_was_taken_binds_once_it_is_free() {
    let host = TestHost::start().await;
    let (manifest, port) = udp_listener_manifest("echo");
    let squatter = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    host.drop_role("probe", &probe(), Some(&manifest));
    let error = host.wait_rejected("probe", &probe()).await;
    assert!(
        error.contains("cannot bind udp") && error.contains(&port.to_string()),
        "{error}"
    );
    drop(squatter);
    host.wait_live("probe", &probe()).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", port)).await.unwrap();
    let reply = String::from_utf8(exchange(&client, b"after").await).unwrap();
    assert!(reply.ends_with("after"), "{reply}");
    host.stop().await;
}

/// Datagrams from many clients at once, queued together (the listener
/// takes them in batches), each get their reply at their own sender, over
/// IPv4 and IPv6.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_from_many_clients_gets_each_reply_at_its_sender() {
    const CLIENTS: usize = 8;
    const EACH: usize = 20;
    let host = TestHost::start().await;
    let free = |address: &str| std::net::UdpSocket::bind(address).unwrap().local_addr().unwrap();
    let (v4, v6) = (free("127.0.0.1:0"), free("[::1]:0"));
    let manifest =
        format!("[[listeners]]\nname = \"v4\"\naddress = \"{v4}\"\n[[listeners]]\nname = \"v6\"\naddress = \"{v6}\"\n");
    host.drop_role("probe", &probe(), Some(&manifest));
    host.wait_live("probe", &probe()).await;

    let mut clients = Vec::new();
    for index in 0..CLIENTS {
        let (bind, server) = if index % 2 == 0 {
            ("127.0.0.1:0", v4)
        } else {
            ("[::1]:0", v6)
        };
        let client = tokio::net::UdpSocket::bind(bind).await.unwrap();
        client.connect(server).await.unwrap();
        clients.push(client);
    }
    // Every client sends its whole burst before any reads a reply.
    for (index, client) in clients.iter().enumerate() {
        for n in 0..EACH {
            client.send(format!("c{index}-{n}").as_bytes()).await.unwrap();
        }
    }
    for (index, client) in clients.iter().enumerate() {
        let mut buffer = [0u8; 256];
        let mut got = std::collections::BTreeSet::new();
        while got.len() < EACH {
            let length = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
                .await
                .unwrap_or_else(|_| panic!("client {index} got {} of {EACH} replies", got.len()))
                .unwrap();
            let reply = String::from_utf8_lossy(&buffer[..length]).into_owned();
            let message = reply.split(' ').nth(1).unwrap_or_default().to_string();
            assert!(
                message.starts_with(&format!("c{index}-")),
                "client {index} got {reply:?}"
            );
            got.insert(message);
        }
    }
    host.stop().await;
}

/// Sends `datagram` and returns the reply.
async fn exchange(client: &tokio::net::UdpSocket, datagram: &[u8]) -> Vec<u8> {
    client.send(datagram).await.unwrap();
    let mut buffer = [0u8; 512];
    let length = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("no answer to {:?}", String::from_utf8_lossy(datagram)))
        .unwrap();
    buffer[..length].to_vec()
}

/// Asks the probe `IDkeep:TEXT`; returns the reply's ID and the text after
/// it (`VERSION call N TEXT`).
async fn ask_kept(client: &tokio::net::UdpSocket, id: u16, text: &str) -> (u16, String) {
    let mut datagram = id.to_be_bytes().to_vec();
    datagram.extend_from_slice(format!("keep:{text}").as_bytes());
    let reply = exchange(client, &datagram).await;
    assert!(reply.len() > 2, "short reply {reply:?}");
    (
        u16::from_be_bytes([reply[0], reply[1]]),
        String::from_utf8_lossy(&reply[2..]).into_owned(),
    )
}

/// N in the probe's `VERSION call N TEXT`.
fn call_number(reply: &str) -> u64 {
    reply
        .split(' ')
        .nth(2)
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no call number in {reply:?}"))
}

/// A reply the role let the host keep (`keep-reply`) answers repeats of its
/// datagram without a call to the role (its call count stays), each under
/// the repeat's own ID, and the repeats reach the role's tally counter. A
/// request, an event, the role's `forget-replies` and a new version each
/// make the next repeat the role's own again. Outside `on-packet`, or with
/// more than 16 bytes to take from the datagram, `keep-reply` is refused.
#[tokio::test(flavor = "multi_thread")]
async fn kept_replies_answer_repeats_until_the_role_changes() {
    let (host, manifest, client) = probe_on_udp().await;

    let (id, first) = ask_kept(&client, 1, "x").await;
    assert_eq!(id, 1);
    assert!(first.starts_with("0.1.0 call "), "{first}");
    let call = call_number(&first);
    for id in 2..=6 {
        let (got, text) = ask_kept(&client, id, "x").await;
        assert_eq!(got, id, "a kept reply carries the repeat's own ID");
        assert_eq!(text, first, "a repeat is answered with the kept reply, without a call");
    }
    let (_, other) = ask_kept(&client, 7, "y").await;
    assert_eq!(call_number(&other), call + 1, "another datagram is the role's");

    // The five repeats are counted on the role's tally, and as the host's
    // answers, within a second or so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let tally = "hivemind_counter_probe_kept_total{role=\"probe\",kind=\"keep\"} 5";
    let sent = "hivemind_role_kept_replies_total{role=\"probe\"} 5";
    loop {
        let metrics = host.api().get("/metrics").await.text();
        if metrics.lines().any(|line| line == tally) && metrics.lines().any(|line| line == sent) {
            break;
        }
        assert!(Instant::now() < deadline, "no `{tally}` and `{sent}` in\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The role's status says so too, apart from its calls.
    let stats = &host.api().role_info("probe").await["stats"];
    assert_eq!(stats["kept_replies"], 5, "{stats}");

    // A request may change what the role answers: the next repeat is its own.
    assert_eq!(host.api().role("probe", "version", &[]).await.status, 200);
    let (_, after_request) = ask_kept(&client, 8, "x").await;
    assert_eq!(call_number(&after_request), call + 2);
    let (_, kept_again) = ask_kept(&client, 9, "x").await;
    assert_eq!(kept_again, after_request, "kept again after the request");

    // So may an event, once the role has handled it (delivery is async).
    host.api().emit("test.kept", "k").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 10;
    loop {
        let (_, text) = ask_kept(&client, id, "x").await;
        if call_number(&text) == call + 3 {
            break;
        }
        assert_eq!(text, after_request, "a repeat is either the kept reply or a new call");
        assert!(Instant::now() < deadline, "the event never made the next repeat a call");
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The role's own forget-replies.
    assert_eq!(exchange(&client, b"forget").await, b"forgot");
    let (_, after_forget) = ask_kept(&client, 100, "x").await;
    assert_eq!(call_number(&after_forget), call + 4);

    // A new version answers for itself from the first repeat.
    host.drop_role("probe", &probe_v2(), Some(&manifest));
    host.wait_live("probe", &probe_v2()).await;
    let (_, from_v2) = ask_kept(&client, 101, "x").await;
    assert!(from_v2.starts_with("0.2.0 call "), "{from_v2}");

    // Refusals name what is wrong.
    let refused = String::from_utf8(exchange(&client, b"keep-too-much").await).unwrap();
    assert!(refused.contains("skip 17") && refused.contains("16"), "{refused}");
    let outside = host.api().role("probe", "keep", &[]).await;
    assert_eq!(outside.status, 400);
    assert!(outside.text().contains("only inside on-packet"), "{}", outside.text());
    host.stop().await;
}

/// Committed events reach a subscribed role in seq order, only the kinds it
/// subscribed to, including events the role emitted itself.
#[tokio::test(flavor = "multi_thread")]
async fn events_are_delivered_in_order() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), Some("[grants]\nemit = [\"test.\"]\n"));
    host.wait_live("probe", &probe()).await;
    let api = host.api();
    let first = api.emit("test.one", "a").await;
    api.emit("other.kind", "b").await;
    let third = api.emit("test.two", "c").await;
    let emitted = api.role("probe", "emit", &["test.three", "d"]).await;
    assert_eq!(emitted.status, 200, "{}", emitted.text());
    let fourth = emitted.json()["seq"].as_u64().unwrap();

    let expected = json!([first, third, fourth]);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = api.role("probe", "seen", &[]).await.json();
        if seen == expected {
            break;
        }
        assert!(Instant::now() < deadline, "seen {seen}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.stop().await;
}

/// A paused role refuses requests and holds events; resuming delivers them.
#[tokio::test(flavor = "multi_thread")]
async fn pause_holds_work_and_resume_releases_it() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let api = host.api();

    let paused = api.post("/v1/roles/probe/pause", json!({})).await;
    assert_eq!(paused.json()["state"], "paused");
    let refused = api.role("probe", "version", &[]).await;
    assert_eq!(refused.status, 503);
    assert!(refused.error().contains("paused"), "{}", refused.error());
    let seq = api.emit("test.held", "x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let resumed = api.post("/v1/roles/probe/resume", json!({})).await;
    assert_eq!(resumed.json()["state"], "running");
    let deadline = Instant::now() + PATIENCE;
    while api.role("probe", "seen", &[]).await.json() != json!([seq]) {
        assert!(Instant::now() < deadline, "held event never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.stop().await;
}

/// A disabled role stays disabled across a restart until it is enabled.
#[tokio::test(flavor = "multi_thread")]
async fn disable_persists_across_restart() {
    let mut host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    assert_eq!(
        host.api().post("/v1/roles/probe/disable", json!({})).await.json()["state"],
        "disabled"
    );

    host.restart().await;
    let info = host
        .wait_role("probe", "the disabled role", |info| !info.is_null())
        .await;
    assert_eq!(info["state"], "disabled");
    assert_eq!(host.api().role("probe", "version", &[]).await.status, 503);

    assert_eq!(
        host.api().post("/v1/roles/probe/enable", json!({})).await.json()["state"],
        "running"
    );
    assert_eq!(host.api().role("probe", "version", &[]).await.text(), "0.1.0");
    host.stop().await;
}

/// With one worker and a queue of one, a third concurrent call is refused as
/// overloaded with a message naming the limits, and the others complete.
#[tokio::test(flavor = "multi_thread")]
async fn full_queue_answers_overloaded() {
    let host = TestHost::start().await;
    host.drop_role(
        "probe",
        &probe(),
        Some("[limits]\nworkers = 1\nqueue = 1\ncpu_ms = 5000\n"),
    );
    host.wait_live("probe", &probe()).await;
    let api = host.api();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.role("probe", "sleep", &["600"]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    let mut errors = Vec::new();
    for call in calls {
        let reply = call.await.unwrap();
        statuses.push(reply.status);
        if reply.status != 200 {
            errors.push(reply.error());
        }
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429], "{errors:?}");
    assert!(
        errors[0].contains("overloaded") && errors[0].contains("limits.queue"),
        "{}",
        errors[0]
    );
    host.stop().await;
}

/// Installing through the API writes the file atomically and loads it.
#[tokio::test(flavor = "multi_thread")]
async fn api_install_writes_and_loads() {
    let host = TestHost::start().await;
    let reply = host.api().send("PUT", "/v1/role-files/probe.wasm", probe()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    host.wait_live("probe", &probe()).await;
    assert!(host.roles_dir().join("probe.wasm").exists());
    host.stop().await;
}

/// The bundled dns role answers an A query for this node over UDP on its
/// host-owned listener, and REFUSED for a name outside its zone.
#[tokio::test(flavor = "multi_thread")]
async fn bundled_dns_answers_for_this_node() {
    let host = TestHost::start().await;
    let (_, dns, _) = artifacts::BUNDLED
        .iter()
        .find(|(name, _, _)| *name == "dns")
        .expect("dns is bundled");
    let manifest = "[[listeners]]\nname = \"dns\"\naddress = \"127.0.0.1:0\"\n[config]\nzone = \"hive.\"\n";
    host.drop_role("dns", dns, Some(manifest));
    let info = host.wait_live("dns", dns).await;
    let address: std::net::SocketAddr = info["listeners"][0]["address"].as_str().unwrap().parse().unwrap();

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |name: &str| {
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        query
    };
    let mut reply = [0u8; 512];
    client.send_to(&ask("test-node.node.hive."), address).await.unwrap();
    let length = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply[..2], &[0x12, 0x34], "reply id");
    assert_eq!(reply[3] & 0x0f, 0, "rcode NOERROR");
    assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
    assert_eq!(&reply[length - 4..length], &[127, 0, 0, 1], "the node's address");

    client.send_to(&ask("example.com."), address).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.recv(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply[3] & 0x0f, 5, "rcode REFUSED");
    host.stop().await;
}

/// A call that started on the old version finishes on it, even though a new
/// version went live while it ran.
#[tokio::test(flavor = "multi_thread")]
async fn calls_in_flight_finish_on_the_old_version() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), Some("[limits]\ncpu_ms = 5000\n"));
    host.wait_live("probe", &probe()).await;
    let api = host.api();
    let slow = tokio::spawn(async move { api.role("probe", "sleep", &["1500"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.drop_role("probe", &probe_v2(), Some("[limits]\ncpu_ms = 5000\n"));
    host.wait_live("probe", &probe_v2()).await;
    assert_eq!(host.api().role("probe", "version", &[]).await.text(), "0.2.0");
    let reply = slow.await.unwrap();
    assert_eq!((reply.status, reply.text()), (200, "slept 0.1.0".to_string()));
    host.stop().await;
}

/// While a new version runs a slow `init`, the role shows `loading` and the
/// old version keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn old_version_serves_during_a_slow_init() {
    let host = TestHost::start().await;
    host.drop_role("slow", &misbehave(), None);
    host.wait_live("slow", &misbehave()).await;
    std::fs::write(
        host.roles_dir().join("slow.toml"),
        "[config]\ninit = \"slow\"\ninit_ms = 1500\n",
    )
    .unwrap();
    let info = host
        .wait_role("slow", "the new version to start loading", |info| {
            !info["loading"].is_null()
        })
        .await;
    assert_eq!(info["state"], "running");
    assert_eq!(host.api().role("slow", "ok", &[]).await.text(), "ok");
    host.wait_role("slow", "the slow init to finish", |info| info["loading"].is_null())
        .await;
    host.stop().await;
}

/// Dotfiles and `*.tmp` in the roles directory are never loaded.
#[tokio::test(flavor = "multi_thread")]
async fn dotfiles_and_temp_files_are_ignored() {
    let host = TestHost::start().await;
    std::fs::write(host.roles_dir().join(".hidden.wasm"), probe()).unwrap();
    std::fs::write(host.roles_dir().join("half.wasm.tmp"), probe()).unwrap();
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let names: Vec<String> = host
        .api()
        .get("/v1/roles")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|role| role["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["probe"]);
    host.stop().await;
}

/// A role sees no environment variables and no files: WASI gives it nothing.
#[tokio::test(flavor = "multi_thread")]
async fn roles_get_no_ambient_environment_or_files() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let ambient = host.api().role("probe", "ambient", &[]).await.json();
    assert_eq!(ambient["env"], 0, "{ambient}");
    assert_eq!(ambient["root_entries"], 0, "{ambient}");
    assert_ne!(ambient["file"], "readable", "{ambient}");
    host.stop().await;
}

/// `call` reaches a role on this node and answers `unavailable`, naming
/// the problem, for a node that is not a member.
#[tokio::test(flavor = "multi_thread")]
async fn call_reaches_local_roles_and_refuses_other_nodes() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.drop_role("noop", &read(artifacts::ROLE_NOOP), None);
    host.wait_live("probe", &probe()).await;
    host.wait_live("noop", &read(artifacts::ROLE_NOOP)).await;
    let me = host.api().role("probe", "self", &[]).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let local = host.api().role("probe", "call", &[&me, "noop", "ping"]).await;
    assert_eq!((local.status, local.text()), (200, "pong".to_string()));
    let remote = host
        .api()
        .role("probe", "call", &["some-other-node", "noop", "ping"])
        .await;
    assert_eq!(remote.status, 503);
    assert!(remote.error().contains("not a member"), "{}", remote.error());
    host.stop().await;
}

/// A role built against the first contract, `hivemind:role@0.1.0`, loads
/// and works on a host that implements a later, compatible one.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_built_against_the_first_contract_still_loads() {
    let host = TestHost::start().await;
    let legacy = read(artifacts::ROLE_LEGACY);
    host.drop_role("legacy", &legacy, None);
    host.wait_live("legacy", &legacy).await;
    let reply = host.api().role("legacy", "hello", &[]).await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().starts_with("legacy on "), "{}", reply.text());
    host.stop().await;
}

/// A tiny HTTP server: 200 on `/ok`, 500 on anything else.
async fn http_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 1024];
                let read = stream.read(&mut request).await.unwrap_or(0);
                let status = if request[..read].starts_with(b"GET /ok ") {
                    "200 OK"
                } else {
                    "500 Oops"
                };
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    address
}

/// `check` probes TCP and HTTP targets the manifest grants: a listening
/// port and a 2xx answer are healthy, a closed port and a 500 are not (with
/// the reason), and an ungranted host is denied naming the grant.
#[tokio::test(flavor = "multi_thread")]
async fn health_checks_run_only_on_granted_hosts() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), Some("[grants]\ncheck = [\"127.0.0.1\"]\n"));
    host.wait_live("probe", &probe()).await;
    let server = http_server().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let check = |kind: &'static str, target: String| {
        let api = host.api();
        async move { api.role("probe", "check", &[kind, &target]).await.json() }
    };
    let open = check("tcp", server.to_string()).await;
    assert_eq!(open["healthy"], true, "{open}");
    let refused = check("tcp", closed.to_string()).await;
    assert_eq!(refused["healthy"], false, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains(&closed.to_string()),
        "{refused}"
    );
    let ok = check("http", format!("http://{server}/ok")).await;
    assert_eq!(ok["healthy"], true, "{ok}");
    let failing = check("http", format!("http://{server}/broken")).await;
    assert_eq!(failing["healthy"], false, "{failing}");
    assert!(failing["error"].as_str().unwrap().contains("500"), "{failing}");
    let denied = check("tcp", "localhost:80".to_string()).await;
    assert_eq!(denied["denied"], true, "{denied}");
    assert!(denied["error"].as_str().unwrap().contains("grants.check"), "{denied}");
    let garbage = check("tcp", "no-port-here".to_string()).await;
    assert_eq!(garbage["healthy"], false, "{garbage}");
    assert!(garbage["error"].as_str().unwrap().contains("HOST:PORT"), "{garbage}");
    host.stop().await;
}
