//! `/metrics` and `hivemind status` / `top` against real hosts: the text
//! parses as Prometheus exposition and carries the series operators chart,
//! each node keeps its own, and the terminal summary shows what the
//! dashboard shows.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Instant;

use serde_json::Value;
use support::backend::{Backend, Manner, Session, bridge_section};
use support::*;

/// Parses a scrape; every sample keyed by name and its labels, sorted, as
/// `name{a="1",b="2"}`.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string())))
        .expect("the scrape parses as Prometheus text");
    let mut samples = BTreeMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(name, value)| format!("{name}={value:?}"))
            .collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => value,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |bucket| bucket.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        };
        samples.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
    }
    samples
}

fn scrape(node: &NodeProcess) -> (String, BTreeMap<String, f64>) {
    let (status, body) = node.client().send("GET", "/metrics", b"", "application/json").unwrap();
    let text = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{text}");
    let samples = parse(&text);
    (text, samples)
}

/// The value of the one sample `series` names (`name{label="v",...}`
/// with labels sorted), or a failure listing what the scrape has.
fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| {
        let name = series.split('{').next().unwrap();
        let similar: Vec<&String> = samples.keys().filter(|key| key.starts_with(name)).collect();
        panic!("no series {series}; of that name there are {similar:#?}")
    })
}

fn dig(port: u16, name: &str, qtype: &str) {
    let output = std::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            qtype,
            "+tries=1",
            "+time=2",
            // No random EDNS cookie: a repeated question is then the same
            // datagram, which the host may answer from a kept reply.
            "+nocookie",
        ])
        .output()
        .expect("dig runs (Debian's bind9-dnsutils)");
    assert!(output.status.success(), "dig {name}: {}", stderr(&output));
}

/// One node with the bundled roles, a bridge and some DNS traffic: its
/// scrape parses, needs the token, and carries per-role, log, membership,
/// bridge series and the dns role's own query counters.
#[test]
fn metrics_parse_and_carry_every_series() {
    let backend = Backend::start("a", Manner::Greet);
    let root = tempfile::tempdir().unwrap();
    let bridge_port = free_port();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    let dns_port = install_bundled_roles(&node);
    use_config(&mut node, &bridge_section("app", bridge_port, "", &[(&backend, "")]));
    node.start();
    wait_for("the dns role", || {
        let (status, body) = node
            .client()
            .send("GET", "/v1/roles/dns", b"", "application/json")
            .ok()?;
        let info: Value = serde_json::from_slice(&body).ok()?;
        (status == 200 && info["state"] == "running").then_some(())
    });
    dig(dns_port, "n1.node.hive.", "A");
    dig(dns_port, "nothing.service.hive.", "SRV");
    dig(dns_port, "example.com.", "A");
    let (mut session, greeting) = wait_for("a session through the bridge", || Session::open(bridge_port));
    assert_eq!(greeting, "a");
    assert!(session.echoes("hello"));
    node.emit("metrics.check", "one").unwrap();

    // The dns role reports its counts once a second.
    let (text, samples) = wait_for("the dns role's query counters", || {
        let (text, samples) = scrape(&node);
        samples
            .contains_key(r#"hivemind_counter_dns_queries_total{qtype="A",rcode="REFUSED",role="dns"}"#)
            .then_some((text, samples))
    });
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    for (qtype, rcode) in [("A", "NOERROR"), ("SRV", "NXDOMAIN"), ("A", "REFUSED")] {
        let series = format!(r#"hivemind_counter_dns_queries_total{{qtype="{qtype}",rcode="{rcode}",role="dns"}}"#);
        assert_eq!(value(&samples, &series), 1.0, "{series}");
    }

    // Per role.
    assert!(value(&samples, r#"hivemind_role_calls_total{export="on-packet",role="dns"}"#) >= 3.0);
    assert!(value(&samples, r#"hivemind_role_calls_total{export="on-event",role="dns"}"#) >= 1.0);
    for series in [
        r#"hivemind_role_errors_total{export="on-request",role="nginx"}"#,
        r#"hivemind_role_traps_total{role="dns"}"#,
        r#"hivemind_role_overloads_total{role="dns"}"#,
        r#"hivemind_role_reloads_total{role="dns"}"#,
        r#"hivemind_role_state{role="dns",state="failed"}"#,
    ] {
        assert_eq!(value(&samples, series), 0.0, "{series}");
    }
    // Read at scrape time, so only their presence is certain.
    value(&samples, r#"hivemind_role_queue_depth{role="dns"}"#);
    value(&samples, r#"hivemind_role_kept_replies_total{role="dns"}"#);
    value(&samples, r#"hivemind_role_busy_workers{role="host-events"}"#);
    assert_eq!(value(&samples, r#"hivemind_role_workers{role="dns"}"#), 1.0);
    assert_eq!(
        value(&samples, r#"hivemind_role_state{role="dns",state="running"}"#),
        1.0
    );
    assert_eq!(
        value(&samples, r#"hivemind_role_info{role="dns",version="0.1.0"}"#),
        1.0
    );
    assert!(
        value(
            &samples,
            r#"hivemind_role_call_seconds_count{export="on-packet",role="dns"}"#
        ) >= 3.0
    );
    assert!(
        value(
            &samples,
            r#"hivemind_role_call_seconds_sum{export="on-packet",role="dns"}"#
        ) > 0.0
    );
    assert!(
        text.contains(r#"hivemind_role_call_seconds_bucket{le="+Inf",role="dns",export="on-packet"}"#),
        "latency buckets"
    );

    // The log.
    assert!(value(&samples, "hivemind_log_term{}") >= 1.0);
    assert_eq!(value(&samples, "hivemind_log_is_leader{}"), 1.0);
    assert_eq!(value(&samples, "hivemind_cluster_degraded{}"), 0.0);
    let committed = value(&samples, "hivemind_log_commit_index{}");
    let applied = value(&samples, "hivemind_log_applied_index{}");
    assert!(
        committed >= 2.0 && applied >= 2.0 && committed >= applied,
        "commit {committed}, applied {applied}"
    );
    value(&samples, "hivemind_log_apply_lag{}");
    assert_eq!(value(&samples, "hivemind_log_write_failures_total{}"), 0.0);
    assert!(value(&samples, "hivemind_log_write_seconds_count{}") >= 1.0);
    assert!(value(&samples, "hivemind_log_last_seq{}") >= 1.0);

    // Membership and gossip (a lone node gossips with no one).
    assert_eq!(value(&samples, r#"hivemind_members{state="alive"}"#), 0.0);
    assert_eq!(
        value(&samples, r#"hivemind_gossip_packets_total{direction="sent"}"#),
        0.0
    );
    assert_eq!(
        value(&samples, r#"hivemind_gossip_packets_rejected_total{reason="unsealed"}"#),
        0.0
    );

    // The bridge: the open session, its bytes, the route's first move.
    let bridge = |name: &str| format!(r#"{name}{{backend="a",bridge="app"}}"#);
    assert_eq!(value(&samples, &bridge("hivemind_bridge_sessions")), 1.0);
    assert_eq!(value(&samples, &bridge("hivemind_bridge_sessions_opened_total")), 1.0);
    assert_eq!(value(&samples, &bridge("hivemind_bridge_active")), 1.0);
    assert_eq!(value(&samples, &bridge("hivemind_bridge_severed_total")), 0.0);
    assert_eq!(value(&samples, &bridge("hivemind_bridge_bytes_to_backend_total")), 6.0);
    // "a\n" then "hello\n" echoed.
    assert_eq!(value(&samples, &bridge("hivemind_bridge_bytes_to_client_total")), 8.0);
    assert_eq!(value(&samples, r#"hivemind_bridge_routing{bridge="app"}"#), 1.0);
    assert_eq!(
        value(&samples, r#"hivemind_bridge_backend_changes_total{bridge="app"}"#),
        1.0
    );

    // The bridge's severs count once routing goes off.
    let (status, _) = node
        .client()
        .send(
            "PATCH",
            "/v1/bridges/app",
            br#"{"enabled": false, "reason": "metrics test"}"#,
            "application/json",
        )
        .unwrap();
    assert_eq!(status, 200);
    session.wait_closed("the session after routing went off");
    let (_, samples) = scrape(&node);
    assert_eq!(value(&samples, &bridge("hivemind_bridge_severed_total")), 1.0);
    assert_eq!(value(&samples, r#"hivemind_bridge_routing{bridge="app"}"#), 0.0);

    // Without the token, nothing.
    let anonymous = hivemind::cli::Client::new(&node.api, "");
    let (status, body) = anonymous.send("GET", "/metrics", b"", "application/json").unwrap();
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
}

/// Two hosts in one process: calls into a role on one show in its own
/// scrape only.
#[tokio::test]
async fn nodes_in_one_process_keep_their_own_metrics() {
    let first = TestHost::start().await;
    let second = TestHost::start().await;
    for host in [&first, &second] {
        host.drop_role("probe", &probe(), None);
        host.wait_role("probe", "running", |info| info["state"] == "running")
            .await;
    }
    for _ in 0..3 {
        let reply = first.api().role("probe", "version", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let calls = |text: &str| {
        parse(text)
            .get(r#"hivemind_role_calls_total{export="on-request",role="probe"}"#)
            .copied()
    };
    assert_eq!(calls(&first.api().get("/metrics").await.text()), Some(3.0));
    assert_eq!(calls(&second.api().get("/metrics").await.text()), Some(0.0));
    first.stop().await;
    second.stop().await;
}

/// `hivemind status` shows the node, its roles (with their kept replies)
/// and its bridge;
/// `--json` carries the same four reads; `hivemind top` redraws with a
/// calls/s figure once it has two samples.
#[test]
fn status_and_top_summarize_the_node() {
    let backend = Backend::start("a", Manner::Greet);
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    let dns_port = install_bundled_roles(&node);
    use_config(&mut node, &bridge_section("app", free_port(), "", &[(&backend, "")]));
    node.start();
    wait_for("three running roles", || {
        let output = node.cli(&["status"]);
        let text = stdout(&output);
        (output.status.success() && text.matches(" running ").count() == 3).then_some(text)
    });
    let text = stdout(&node.cli(&["status"]));
    for expected in [
        "NODES",
        "n1 (this)",
        "ROLES (this node)",
        "BRIDGES",
        "app ",
        "host-events",
        "nginx",
        "dns",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(text.contains("single-node") && text.contains("HEALTHY"), "{text}");
    // Each role's row carries the datagrams the host answered from its kept
    // replies, beside its calls: a repeated question is one.
    let kept = wait_for("a dns answer from a kept reply", || {
        dig(dns_port, "n1.node.hive.", "A");
        let json: Value = serde_json::from_slice(&node.cli(&["status", "--json"]).stdout).unwrap();
        let roles = json["roles"].as_array().cloned().unwrap_or_default();
        let dns = roles.iter().find(|role| role["name"] == "dns")?;
        dns["stats"]["kept_replies"].as_u64().filter(|&kept| kept > 0)
    });
    let text = stdout(&node.cli(&["status"]));
    assert!(text.contains(" KEPT "), "{text}");
    let dns_row = text
        .lines()
        .find(|line| line.trim_start().starts_with("dns "))
        .unwrap_or_else(|| panic!("no dns row:\n{text}"));
    assert_eq!(
        dns_row.split_whitespace().nth(5),
        Some(kept.to_string().as_str()),
        "{dns_row:?}"
    );

    let json: Value = serde_json::from_slice(&node.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["status"]["node"]["name"], "n1");
    assert_eq!(json["roles"].as_array().unwrap().len(), 3);
    assert_eq!(json["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(json["bridges"][0]["name"], "app");

    // `top` without a terminal prints frame after frame; the third frame's
    // start means the second is whole.
    let mut top = std::process::Command::new(hivemind_bin())
        .arg("--data-dir")
        .arg(&node.dir)
        .args(["top", "--interval", "1s"])
        .env_remove("HIVEMIND_API")
        .env_remove("HIVEMIND_TOKEN")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut output = BufReader::new(top.stdout.take().unwrap());
    let mut frames = String::new();
    let deadline = Instant::now() + PATIENCE;
    while frames.matches("ROLES (this node)").count() < 3 && Instant::now() < deadline {
        // Calls between frames give the role a rate to show.
        node.client()
            .send(
                "POST",
                "/v1/roles/host-events/list",
                br#"{"args": []}"#,
                "application/json",
            )
            .unwrap();
        let mut line = String::new();
        if output.read_line(&mut line).unwrap() == 0 {
            break;
        }
        frames.push_str(&line);
    }
    top.kill().unwrap();
    top.wait().unwrap();
    let second = frames
        .split("ROLES (this node)")
        .nth(2)
        .unwrap_or_else(|| panic!("no second frame:\n{frames}"));
    let row = second
        .lines()
        .find(|line| line.trim_start().starts_with("host-events"))
        .unwrap_or_else(|| panic!("no host-events row:\n{second}"));
    let rate: f64 = row
        .split_whitespace()
        .nth(4)
        .and_then(|rate| rate.parse().ok())
        .unwrap_or_else(|| panic!("no calls/s in {row:?}"));
    assert!(rate > 0.0, "{row}");
}
