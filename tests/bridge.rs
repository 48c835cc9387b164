//! Bridges across real `hivemind` processes on loopback, in front of real
//! TCP backends run by the test: every node routes to the one backend the
//! log committed, they fail over together, and operators' actions reach
//! every node.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use support::backend::{Backend, Manner, Session, bridge_section};
use support::*;

/// Which backend a new session through `port` reaches (`None`: closed at once).
fn route_of(port: u16) -> Option<String> {
    Session::open(port).map(|(_, greeting)| greeting)
}

fn bridge_status(node: &NodeProcess, bridge: &str) -> Value {
    let (status, body) = node
        .client()
        .send("GET", &format!("/v1/bridges/{bridge}"), b"", "application/json")
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

fn active_of(node: &NodeProcess, bridge: &str) -> Value {
    bridge_status(node, bridge)["active"]["backend"].clone()
}

/// Waits until every node's committed active is `backend` and a new
/// session through every node's port reaches it.
fn wait_all_route(nodes: &[&NodeProcess], bridge: &str, ports: &[u16], backend: &str) {
    for (node, port) in nodes.iter().zip(ports) {
        wait_for(&format!("{} routes {bridge} to {backend}", node.name), || {
            (active_of(node, bridge) == backend && route_of(*port).as_deref() == Some(backend)).then_some(())
        });
    }
}

fn patch(node: &NodeProcess, bridge: &str, body: Value) -> (u16, Value) {
    let (status, reply) = node
        .client()
        .send(
            "PATCH",
            &format!("/v1/bridges/{bridge}"),
            &serde_json::to_vec(&body).unwrap(),
            "application/json",
        )
        .unwrap();
    (status, serde_json::from_slice(&reply).unwrap_or(Value::Null))
}

/// The whole life of two bridges on three nodes: agreement, failover with
/// severing, no failback (and failback when asked), disable/enable, pin,
/// unpin and drain, each seen the same way on every node.
#[test]
fn every_node_routes_to_the_committed_backend() {
    let mut a = Backend::start("a", Manner::Greet);
    let b = Backend::start("b", Manner::Greet);
    let c = Backend::start("c", Manner::Greet);
    let app_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let back_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let order = [(&a, ""), (&b, ""), (&c, "")];
    let cluster = ProcessCluster::bootstrap_configured(3, |index, node| {
        let config = bridge_section("app", app_ports[index], "", &order)
            + &bridge_section("back", back_ports[index], "failback = true", &order);
        use_config(node, &config);
    });
    let nodes: Vec<&NodeProcess> = cluster.nodes.iter().collect();

    wait_all_route(&nodes, "app", &app_ports, "a");
    wait_all_route(&nodes, "back", &back_ports, "a");
    let mut sessions: Vec<Session> = app_ports
        .iter()
        .map(|port| {
            let (mut session, greeting) = Session::open(*port).unwrap();
            assert_eq!(greeting, "a");
            assert!(session.echoes("hello"));
            session
        })
        .collect();

    // Kill the active backend: every node severs its sessions and moves
    // to the same next one.
    a.kill();
    for (index, session) in sessions.iter_mut().enumerate() {
        session.wait_closed(&format!("node {index}'s session to a after a died"));
    }
    wait_all_route(&nodes, "app", &app_ports, "b");
    wait_all_route(&nodes, "back", &back_ports, "b");
    let status = bridge_status(nodes[1], "app");
    let reason = status["active"]["reason"].as_str().unwrap();
    assert!(reason.contains("a failed its checks"), "{status:#}");

    // Back again: `app` stays on b (no failback), `back` returns to a.
    a.resume();
    wait_all_route(&nodes, "back", &back_ports, "a");
    for (node, port) in nodes.iter().zip(&app_ports) {
        wait_for("every node sees a up again", || {
            let status = bridge_status(node, "app");
            (status["backends"][0]["health"]["up"] == 3).then_some(())
        });
        assert_eq!(route_of(*port).as_deref(), Some("b"), "{}", node.name);
        assert_eq!(active_of(node, "app"), "b");
    }

    // Disable on one node: new clients are refused and sessions severed
    // everywhere; the other bridge is untouched.
    let (mut on_first, _) = Session::open(app_ports[0]).unwrap();
    let (mut other_bridge, _) = Session::open(back_ports[0]).unwrap();
    let output = nodes[1].cli(&["bridge", "disable", "app", "--reason", "maintenance window 42"]);
    assert!(output.status.success(), "{}", stderr(&output));
    on_first.wait_closed("a session when routing went off");
    for (node, port) in nodes.iter().zip(&app_ports) {
        wait_for(&format!("{} refuses app clients", node.name), || {
            let status = bridge_status(node, "app");
            (status["routing"]["enabled"] == false
                && status["routing"]["reason"] == "maintenance window 42"
                && route_of(*port).is_none())
            .then_some(())
        });
    }
    assert!(other_bridge.echoes("still here"), "the other bridge kept its session");
    let output = nodes[2].cli(&["bridge", "enable", "app", "--reason", "done"]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_all_route(&nodes, "app", &app_ports, "b");

    // Pin c: everyone moves there and b's sessions are severed; unpinned,
    // c stays while healthy.
    let (mut on_b, _) = Session::open(app_ports[2]).unwrap();
    let output = nodes[0].cli(&["bridge", "pin", "app", "c", "--reason", "testing c", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reply["pinned"]["backend"], "c", "{reply:#}");
    on_b.wait_closed("a session to b after the pin");
    wait_all_route(&nodes, "app", &app_ports, "c");
    assert!(
        nodes[1]
            .cli(&["bridge", "unpin", "app", "--reason", "c is fine"])
            .status
            .success()
    );
    wait_for("the pin is gone", || {
        bridge_status(nodes[2], "app")["pinned"].is_null().then_some(())
    });
    assert_eq!(active_of(nodes[2], "app"), "c");
    assert_eq!(route_of(app_ports[2]).as_deref(), Some("c"));

    // Drain c: the first healthy backend takes over, c's session finishes
    // on its own.
    let (mut on_c, greeting) = Session::open(app_ports[1]).unwrap();
    assert_eq!(greeting, "c");
    let output = nodes[2].cli(&["bridge", "drain", "app", "c", "--reason", "upgrading c"]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_all_route(&nodes, "app", &app_ports, "a");
    assert!(on_c.echoes("drained but alive"), "a drained backend keeps its sessions");
    let status = bridge_status(nodes[0], "app");
    assert_eq!(status["backends"][2]["drained"]["reason"], "upgrading c", "{status:#}");
    assert!(
        nodes[2]
            .cli(&["bridge", "drain", "app", "c", "--undo", "--reason", "upgraded"])
            .status
            .success()
    );

    // Status in text names the active backend and the routing.
    let output = nodes[0].cli(&["bridge", "status"]);
    let text = stdout(&output);
    assert!(
        text.contains("bridge    app") && text.contains("bridge    back"),
        "{text}"
    );
    assert!(text.contains("routing   on"), "{text}");
}

/// A node whose `[[bridge]]` lists the backends in another order (and
/// fails back) is named on the other nodes' status and in `hivemind
/// bridge status`, and names them in turn; a bridge configured alike
/// shows nothing.
#[test]
fn a_bridge_configured_differently_on_another_node_is_named() {
    let a = Backend::start("a", Manner::Greet);
    let b = Backend::start("b", Manner::Greet);
    let cluster = ProcessCluster::bootstrap_configured(3, |index, node| {
        let app = if index == 1 {
            bridge_section("app", free_port(), "failback = true", &[(&b, ""), (&a, "")])
        } else {
            bridge_section("app", free_port(), "", &[(&a, ""), (&b, "")])
        };
        use_config(
            node,
            &(app + &bridge_section("same", free_port(), "", &[(&a, ""), (&b, "")])),
        );
    });
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    let differs = wait_for("n1 names n2's different app bridge", || {
        let differs = bridge_status(first, "app")["config_differs"].clone();
        (differs.as_array()?.len() == 1).then_some(differs)
    });
    assert_eq!(differs[0]["node_name"], second.name.as_str(), "{differs:#}");
    assert_eq!(differs[0]["backends"], json!(["b", "a"]), "{differs:#}");
    assert_eq!(differs[0]["failback"], true, "{differs:#}");
    // n2 differs from both others.
    wait_for("n2 names n1's and n3's", || {
        let differs = bridge_status(second, "app")["config_differs"].clone();
        let mut names: Vec<String> = differs
            .as_array()?
            .iter()
            .filter(|other| other["backends"] == json!(["a", "b"]))
            .map(|other| text_of(&other["node_name"]))
            .collect();
        names.sort();
        (names == [first.name.clone(), cluster.nodes[2].name.clone()]).then_some(())
    });
    for node in [first, second] {
        let same = bridge_status(node, "same");
        assert_eq!(same["config_differs"], json!([]), "{same:#}");
    }
    let text = stdout(&first.cli(&["bridge", "status", "app"]));
    assert!(
        text.contains(&format!("WARNING   {}'s [[bridge]] differs", second.name)) && text.contains("backends b, a"),
        "{text}"
    );

    // n2 drops its app section and n3 every section: their configs and
    // health reports stop counting, so a stale view cannot keep a dead
    // backend active, and nothing is listed as differing.
    let mut cluster = cluster;
    let third_name = cluster.nodes[2].name.clone();
    for (index, config) in [
        (1, bridge_section("same", free_port(), "", &[(&a, ""), (&b, "")])),
        (2, String::new()),
    ] {
        let node = &mut cluster.nodes[index];
        node.terminate();
        std::fs::write(node.dir.with_extension("toml"), config).unwrap();
        node.start();
    }
    let first = &cluster.nodes[0];
    wait_for("n1 hears only itself on app", || {
        let app = bridge_status(first, "app");
        let only_n1 = app["backends"].as_array()?.iter().all(|backend| {
            backend["seen_by"]
                .as_array()
                .is_some_and(|seen| seen.iter().all(|report| report["node_name"] == first.name.as_str()))
        });
        (only_n1 && app["config_differs"] == json!([])).then_some(())
    });
    // n2 still reports on the bridge it kept; n3 on none.
    wait_for("n2 still reports on same", || {
        let same = bridge_status(first, "same");
        let names: Vec<String> = same["backends"][0]["seen_by"]
            .as_array()?
            .iter()
            .map(|report| text_of(&report["node_name"]))
            .collect();
        (names.contains(&cluster.nodes[1].name) && !names.contains(&third_name)).then_some(())
    });
}

/// Bad operator input is refused with a message that says what to do,
/// and nothing is committed.
#[test]
fn operator_mistakes_are_refused() {
    let a = Backend::start("a", Manner::Greet);
    let port = free_port();
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    use_config(&mut node, &bridge_section("app", port, "", &[(&a, "")]));
    node.start();
    wait_for("the bridge routes to a", || {
        (route_of(port).as_deref() == Some("a")).then_some(())
    });

    let output = node.cli(&["bridge", "disable", "app"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("a reason is required"), "{}", stderr(&output));
    let (status, reply) = patch(&node, "app", json!({ "enabled": false }));
    assert_eq!(status, 400);
    assert!(reply["error"].as_str().unwrap().contains("reason"), "{reply}");
    let (status, reply) = patch(&node, "app", json!({ "pin": "zz", "reason": "x" }));
    assert_eq!(status, 400);
    assert!(reply["error"].as_str().unwrap().contains("its backends: a"), "{reply}");
    let (status, reply) = patch(&node, "nope", json!({ "enabled": false, "reason": "x" }));
    assert_eq!(status, 404);
    assert!(
        reply["error"].as_str().unwrap().contains("this node has: app"),
        "{reply}"
    );
    let (status, _) = patch(&node, "app", json!({ "enabled": false, "pin": "a", "reason": "x" }));
    assert_eq!(status, 400, "two actions at once");
    let (status, reply) = node
        .client()
        .send(
            "POST",
            "/v1/events",
            br#"{"kind": "bridge.routing", "key": "app", "payload": {"bridge": "app", "enabled": false, "reason": "sneaky"}}"#,
            "application/json",
        )
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&reply));
    assert_eq!(bridge_status(&node, "app")["routing"]["enabled"], true);
    assert_eq!(route_of(port).as_deref(), Some("a"));

    // A config mistake stops the start with the bridge and key named.
    let mut broken = NodeProcess::new(root.path(), "n2", Vec::new());
    use_config(
        &mut broken,
        &bridge_section("app", free_port(), "when_isolated = \"maybe\"", &[(&a, "")]),
    );
    broken.start();
    let status = wait_for("the misconfigured node exits", || broken.exited());
    assert!(!status.success());
    let log = broken.log();
    assert!(log.contains("when_isolated") && log.contains("\"app\""), "{log}");
    // A listen address in use is named too.
    let mut clash = NodeProcess::new(root.path(), "n3", Vec::new());
    use_config(&mut clash, &bridge_section("app", port, "", &[(&a, "")]));
    clash.start();
    let status = wait_for("the clashing node exits", || clash.exited());
    assert!(!status.success());
    assert!(
        clash.log().contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        clash.log()
    );
}

/// Two of three nodes hang: the third cannot reach a quorum. It keeps
/// routing to the committed backend (or, with `when_isolated = "stop"`,
/// refuses clients), and when that backend dies it does not pick another
/// on its own; once the quorum is back, the cluster's choice reaches it.
#[test]
fn a_node_cut_off_from_the_quorum_never_chooses_on_its_own() {
    let mut a = Backend::start("a", Manner::Greet);
    let b = Backend::start("b", Manner::Greet);
    let keep_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let stop_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let order = [(&a, ""), (&b, "")];
    let cluster = ProcessCluster::bootstrap_configured(3, |index, node| {
        let config = bridge_section("keep", keep_ports[index], "interval_ms = 100", &order)
            + &bridge_section(
                "stop",
                stop_ports[index],
                "interval_ms = 100\nwhen_isolated = \"stop\"",
                &order,
            );
        use_config(node, &config);
    });
    let nodes: Vec<&NodeProcess> = cluster.nodes.iter().collect();
    wait_all_route(&nodes, "keep", &keep_ports, "a");
    wait_all_route(&nodes, "stop", &stop_ports, "a");

    nodes[1].pause();
    nodes[2].pause();
    let cut_off = nodes[0];
    wait_for("node 1 knows it is cut off", || {
        bridge_status(cut_off, "keep")["isolated"]
            .as_bool()
            .unwrap()
            .then_some(())
    });
    assert_eq!(route_of(keep_ports[0]).as_deref(), Some("a"), "keep routes on");
    wait_for("the stop bridge refuses clients", || {
        route_of(stop_ports[0]).is_none().then_some(())
    });
    let status = bridge_status(cut_off, "stop");
    assert_eq!(status["serving"], false);
    assert!(
        status["serving_reason"].as_str().unwrap().contains("quorum"),
        "{status:#}"
    );

    a.kill();
    wait_for("node 1 sees a down itself", || {
        (bridge_status(cut_off, "keep")["backends"][0]["local"]["healthy"] == false).then_some(())
    });
    // Several check rounds later it still holds the committed choice and
    // sends nobody to b.
    for _ in 0..10 {
        assert_eq!(active_of(cut_off, "keep"), "a");
        assert_ne!(route_of(keep_ports[0]).as_deref(), Some("b"));
        std::thread::sleep(Duration::from_millis(100));
    }

    nodes[1].resume();
    nodes[2].resume();
    wait_all_route(&nodes, "keep", &keep_ports, "b");
    wait_all_route(&nodes, "stop", &stop_ports, "b");
}

/// A thousand concurrent sessions; idle sessions do not hold up a busy
/// one; a backend refusing connections closes clients at once; a backend
/// that accepts and never answers holds only its own sessions, fails an
/// HTTP check by its timeout, and its session is severed when the route
/// leaves it.
#[test]
fn many_idle_and_stuck_sessions() {
    // A thousand clients and the backend's thousand accepted sockets need
    // more than the usual 1024 descriptors in this process too.
    let limit = hivemind_core::limits::raise_descriptor_limit();
    assert!(
        limit >= 4096,
        "the hard limit on open files is {limit}; raise it to run this test"
    );
    let a = Backend::start("a", Manner::Greet);
    let silent = Backend::start("silent", Manner::Silent);
    let refusing = Backend::start("refusing", Manner::Greet);
    let refusing_address = refusing.address();
    drop(refusing);
    let port = free_port();
    let side_port = free_port();
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    let silent_check = format!(
        "check = \"http\"\ncheck_address = \"{}\"\npath = \"/health\"",
        silent.address()
    );
    let config = bridge_section(
        "app",
        port,
        "interval_ms = 100\ntimeout_ms = 300",
        &[(&a, ""), (&silent, &silent_check)],
    ) + &format!("[[bridge.backends]]\nname = \"refusing\"\naddress = \"{refusing_address}\"\n\n")
        + &bridge_section("side", side_port, "", &[(&a, "")]);
    use_config(&mut node, &config);
    node.start();
    wait_for("the bridge routes to a", || {
        (route_of(port).as_deref() == Some("a")).then_some(())
    });

    let mut sessions: Vec<Session> = (0..1000)
        .map(|index| {
            let (session, greeting) = Session::open(port).unwrap_or_else(|| panic!("session {index} was closed"));
            assert_eq!(greeting, "a");
            session
        })
        .collect();
    for (index, session) in sessions.iter_mut().enumerate().step_by(37) {
        assert!(session.echoes(&format!("busy {index}")));
    }
    // The probe sessions of the wait above may still be closing.
    wait_for("1000 sessions counted", || {
        (bridge_status(&node, "app")["backends"][0]["sessions"]["current"] == 1000).then_some(())
    });
    // The 999 others sit idle; this one is answered.
    assert!(sessions[500].echoes("not starved"));
    drop(sessions);
    wait_for("the sessions are counted closed", || {
        (bridge_status(&node, "app")["backends"][0]["sessions"]["current"] == 0).then_some(())
    });

    // The silent backend fails its HTTP check by timeout.
    wait_for("silent is reported down", || {
        let status = bridge_status(&node, "app");
        let local = &status["backends"][1]["local"];
        (local["healthy"] == false && local["detail"].as_str()?.contains("GET")).then_some(())
    });
    // Pinned anyway, a client gets no answer, while the other bridge serves.
    let (status, _) = patch(&node, "app", json!({ "pin": "silent", "reason": "try silent" }));
    assert_eq!(status, 200);
    wait_for("app routes to silent", || {
        (active_of(&node, "app") == "silent").then_some(())
    });
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut stuck = Session {
        writer: stream.try_clone().unwrap(),
        reader: BufReader::new(stream),
    };
    writeln!(stuck.writer, "anyone?").unwrap();
    assert_eq!(stuck.line(), None, "the silent backend answers nothing");
    assert_eq!(route_of(side_port).as_deref(), Some("a"));
    let (status, _) = patch(&node, "app", json!({ "pin": "refusing", "reason": "try refusing" }));
    assert_eq!(status, 200);
    stuck.wait_closed("the session to silent after the pin moved");

    // Pinned to a backend that refuses: clients are closed at once and counted.
    wait_for("app routes to refusing", || {
        (active_of(&node, "app") == "refusing").then_some(())
    });
    assert_eq!(route_of(port), None);
    let status = bridge_status(&node, "app");
    assert!(
        status["backends"][2]["sessions"]["connect_failures"].as_u64().unwrap() >= 1,
        "{status:#}"
    );
    let (status, _) = patch(&node, "app", json!({ "pin": null, "reason": "back to normal" }));
    assert_eq!(status, 200);
    wait_for("app routes to a again", || {
        (route_of(port).as_deref() == Some("a")).then_some(())
    });
}

/// A node that runs out of descriptors cannot check its backends, and
/// that is news about the node, not about them: no backend is reported
/// down, no session is severed, and once descriptors are back the node
/// answers again and keeps the same route.
#[test]
fn a_node_out_of_descriptors_reports_no_backend_down() {
    let a = Backend::start("a", Manner::Greet);
    let b = Backend::start("b", Manner::Greet);
    let port = free_port();
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    use_config(
        &mut node,
        &bridge_section("app", port, "interval_ms = 100\nfall = 1", &[(&a, ""), (&b, "")]),
    );
    node.start();
    wait_for("the bridge routes to a", || {
        (route_of(port).as_deref() == Some("a")).then_some(())
    });
    let reports_of_a = || {
        node.events("bridge.health")
            .into_iter()
            .filter(|(_, key)| key.starts_with("app/a@"))
            .count()
    };
    wait_for("a is reported up", || (reports_of_a() == 1).then_some(()));
    let (mut session, _) = Session::open(port).unwrap();

    // The lowest free descriptor number becomes the limit: every socket
    // the node opens from here (a check's connect included) gets EMFILE.
    let limit = node.descriptor_limit();
    let held = node.descriptors();
    let lowest_free = (0..).find(|number| !held.contains(number)).unwrap();
    node.set_descriptor_limit(u64::from(lowest_free));
    // Twenty check intervals; one failure would take a down with fall = 1.
    std::thread::sleep(Duration::from_secs(2));
    node.set_descriptor_limit(limit);

    assert!(session.echoes("still routed"), "the session was severed");
    assert_eq!(reports_of_a(), 1, "the node reported a backend it could not check");
    assert_eq!(route_of(port).as_deref(), Some("a"));
    let status = bridge_status(&node, "app");
    assert_eq!(status["active"]["backend"], "a", "{status:#}");
}

/// At `max_sessions` a bridge stops accepting: the next client waits in
/// the backlog, is not refused, and gets its session when one ends.
#[test]
fn a_full_bridge_makes_clients_wait() {
    let a = Backend::start("a", Manner::Greet);
    let port = free_port();
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    use_config(&mut node, &bridge_section("app", port, "max_sessions = 2", &[(&a, "")]));
    node.start();
    wait_for("the bridge routes to a", || {
        (route_of(port).as_deref() == Some("a")).then_some(())
    });
    let first = Session::open(port).unwrap();
    let (mut second, _) = Session::open(port).unwrap();
    wait_for("two sessions counted", || {
        (bridge_status(&node, "app")["sessions"]["current"] == 2).then_some(())
    });

    let waiting = TcpStream::connect(("127.0.0.1", port)).unwrap();
    waiting.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut waiting = BufReader::new(waiting);
    let mut greeting = String::new();
    let read = std::io::BufRead::read_line(&mut waiting, &mut greeting);
    assert!(
        matches!(&read, Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "a third client was served or refused: {read:?} {greeting:?}"
    );
    let status = bridge_status(&node, "app");
    assert_eq!(status["sessions"]["max"], 2, "{status:#}");
    assert!(status["sessions"]["times_full"].as_u64().unwrap() >= 1, "{status:#}");
    assert!(second.echoes("the open sessions are served"));

    drop(first);
    waiting
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::BufRead::read_line(&mut waiting, &mut greeting).unwrap();
    assert_eq!(greeting.trim_end(), "a");
}
