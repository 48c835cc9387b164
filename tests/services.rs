//! The bundled host-events and dns roles across a real 3-node cluster:
//! services registered on one node are answered by every node's DNS, checked
//! with `dig` (Debian's bind9-dnsutils), a real resolver.

mod support;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// The dns manifest for a node of a test: its own port on loopback.
fn dns_manifest(port: u16) -> String {
    format!(
        "[limits]\nworkers = 1\nqueue = 1024\n\n\
         [[listeners]]\nname = \"udp\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\n\
         [[listeners]]\nname = \"tcp\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\n\
         [config]\nzone = \"hive.\"\nttl = 7\n"
    )
}

const HOST_EVENTS_MANIFEST: &str =
    "[limits]\nworkers = 1\n\n[grants]\nemit = [\"service.\"]\ncheck = [\"*\"]\n\n[config]\ncheck_timeout_ms = 300\n";

/// Installs host-events and dns on a node and waits until both run.
fn install_roles(node: &NodeProcess, dns_port: u16) {
    let roles = node.dir.join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    atomic_write(&roles.join("host-events.toml"), HOST_EVENTS_MANIFEST.as_bytes());
    atomic_write(&roles.join("host-events.wasm"), &read(artifacts::ROLE_HOST_EVENTS));
    atomic_write(&roles.join("dns.toml"), dns_manifest(dns_port).as_bytes());
    atomic_write(&roles.join("dns.wasm"), &read(artifacts::ROLE_DNS));
    wait_for(&format!("{}: roles running", node.name), || {
        let output = node.cli(&["roles", "list", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let running = |name: &str| {
            listed
                .as_array()?
                .iter()
                .find(|role| role["name"] == name)
                .map(|role| role["state"] == "running")
        };
        (running("dns")? && running("host-events")?).then_some(())
    });
}

/// `dig` against a node's DNS port, with `args` after the server.
fn dig(port: u16, args: &[&str]) -> String {
    let output = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=1", "+tries=1"])
        .args(args)
        .output()
        .expect("dig runs (Debian package bind9-dnsutils; scripts/test installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `dig`'s answer with every run of whitespace made one space.
fn dig_squashed(port: u16, args: &[&str]) -> String {
    dig(port, args)
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `dig +short`, one line per record, sorted.
fn dig_short(port: u16, args: &[&str]) -> Vec<String> {
    let mut args = args.to_vec();
    args.push("+short");
    let mut lines: Vec<String> = dig(port, &args).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The `status:` and `flags:` of a full `dig` answer.
fn status_and_flags(answer: &str) -> (String, String) {
    let status = answer
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_default()
        .to_string();
    let flags = answer
        .split(";; flags: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default()
        .to_string();
    (status, flags)
}

fn register(node: &NodeProcess, args: &[&str]) -> String {
    let mut full = vec!["role", "host-events", "register"];
    full.extend_from_slice(args);
    let output = node.cli(&full);
    assert!(output.status.success(), "register {args:?}: {}", stderr(&output));
    stdout(&output)
}

/// A TCP service on `address` that health checks can reach.
fn tcp_service(address: &str) -> (TcpListener, u16) {
    let listener = TcpListener::bind(format!("{address}:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Register on node A, resolve on node C within a second; every record
/// type, rcode and flag checked with dig; a killed node's instance leaves.
#[test]
fn a_service_registered_on_one_node_is_answered_by_every_node() {
    let mut cluster = ProcessCluster::bootstrap(3);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for (node, port) in cluster.nodes.iter().zip(&ports) {
        install_roles(node, *port);
    }
    let (a, c) = (0, 2);
    let (_web_a, web_a_port) = tcp_service("127.0.0.11");
    let (_web_b, web_b_port) = tcp_service("127.0.0.12");

    let registered = Instant::now();
    let reply = register(
        &cluster.nodes[a],
        &[
            "web",
            "--port",
            &web_a_port.to_string(),
            "--address",
            "127.0.0.11",
            "--tag",
            "v1",
            "--tag",
            "primary",
            "--check",
            "tcp",
        ],
    );
    assert!(reply.contains("service.up"), "{reply}");
    let answered = wait_for("node C to answer web", || {
        (dig_short(ports[c], &["web.service.hive."]) == ["127.0.0.11"]).then(Instant::now)
    });
    let latency = answered - registered;
    assert!(
        latency < Duration::from_secs(1),
        "node C answered {latency:?} after the registration on node A"
    );

    register(
        &cluster.nodes[1],
        &[
            "web",
            "--port",
            &web_b_port.to_string(),
            "--address",
            "127.0.0.12",
            "--check",
            "tcp",
        ],
    );
    wait_for("both instances on node C", || {
        (dig_short(ports[c], &["web.service.hive."]) == ["127.0.0.11", "127.0.0.12"]).then_some(())
    });

    // A: authoritative, no recursion offered, TTL from the config.
    let full = dig_squashed(ports[c], &["web.service.hive.", "A", "+norec"]);
    let (status, flags) = status_and_flags(&full);
    assert_eq!(status, "NOERROR", "{full}");
    assert_eq!(flags.split_whitespace().collect::<Vec<_>>(), ["qr", "aa"], "{full}");
    for address in ["127.0.0.11", "127.0.0.12"] {
        let record = format!("web.service.hive. 7 IN A {address}");
        assert!(full.lines().any(|line| line == record), "{record} missing: {full}");
    }
    // The order changes between answers (two instances: within 40 tries).
    let first = dig(ports[c], &["web.service.hive.", "+short"]);
    assert!(
        (0..40).any(|_| dig(ports[c], &["web.service.hive.", "+short"]) != first),
        "the instances always come in the same order"
    );

    // SRV: port and target per instance, the targets' addresses added.
    let srv = dig_short(ports[c], &["_web._tcp.service.hive.", "SRV"]);
    let mut expected = [
        format!("1 1 {web_a_port} 7f00000b.addr.hive."),
        format!("1 1 {web_b_port} 7f00000c.addr.hive."),
    ];
    expected.sort();
    assert_eq!(srv, expected);
    let full = dig_squashed(ports[c], &["_web._tcp.service.hive.", "SRV"]);
    assert!(full.contains(";; ADDITIONAL SECTION:"), "{full}");
    assert!(full.contains("7f00000b.addr.hive. 7 IN A 127.0.0.11"), "{full}");
    assert!(full.contains("7f00000c.addr.hive. 7 IN A 127.0.0.12"), "{full}");

    // TXT: the tags; a tag narrows the service.
    assert_eq!(
        dig_short(ports[c], &["web.service.hive.", "TXT"]),
        ["\"v1\" \"primary\""]
    );
    assert_eq!(dig_short(ports[c], &["primary.web.service.hive."]), ["127.0.0.11"]);

    // Nodes by name.
    assert_eq!(dig_short(ports[c], &["n1.node.hive."]), ["127.0.0.1"]);

    // NXDOMAIN with the SOA; REFUSED outside the zone.
    let missing = dig_squashed(ports[c], &["nothing.service.hive."]);
    assert_eq!(status_and_flags(&missing).0, "NXDOMAIN", "{missing}");
    assert!(
        missing.contains(";; AUTHORITY SECTION:\nhive. 7 IN SOA ns.hive. hostmaster.hive. 1 3600 600 86400 7"),
        "{missing}"
    );
    let outside = dig(ports[c], &["example.com."]);
    assert_eq!(status_and_flags(&outside).0, "REFUSED", "{outside}");

    // An answer too big for 512 bytes sets TC over UDP, and comes whole
    // over TCP.
    let long_tags: Vec<String> = (0..6).map(|i| format!("tag{i}-{}", "x".repeat(90))).collect();
    let (_big, big_port) = tcp_service("127.0.0.13");
    let mut args = vec!["big".to_string(), "--port".into(), big_port.to_string()];
    args.extend(["--address".into(), "127.0.0.13".into()]);
    for tag in &long_tags {
        args.extend(["--tag".to_string(), tag.clone()]);
    }
    register(&cluster.nodes[a], &args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for("big on node C", || {
        (dig_short(ports[c], &["big.service.hive.", "+tcp"]) == ["127.0.0.13"]).then_some(())
    });
    let truncated = dig(ports[c], &["big.service.hive.", "TXT", "+noedns", "+ignore"]);
    let (status, flags) = status_and_flags(&truncated);
    assert_eq!(status, "NOERROR", "{truncated}");
    assert!(flags.split_whitespace().any(|flag| flag == "tc"), "{truncated}");
    assert!(truncated.contains("ANSWER: 0"), "{truncated}");
    let whole = dig(ports[c], &["big.service.hive.", "TXT", "+tcp"]);
    assert!(!status_and_flags(&whole).1.contains("tc"), "{whole}");
    for tag in &long_tags {
        assert!(whole.contains(tag.as_str()), "{tag} missing over TCP: {whole}");
    }

    // Node B dies: its instance leaves every answer.
    cluster.nodes[1].kill();
    wait_for("node B's instance to leave node C's answers", || {
        (dig_short(ports[c], &["web.service.hive."]) == ["127.0.0.11"]).then_some(())
    });
    assert_eq!(dig_short(ports[a], &["web.service.hive."]), ["127.0.0.11"]);
    assert_eq!(dig_short(ports[c], &["n2.node.hive."]), Vec::<String>::new());

    // Deregistering on A withdraws it everywhere.
    let output = cluster.nodes[a].cli(&["role", "host-events", "deregister", "web"]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_for("web to be gone on node C", || {
        (dig_short(ports[c], &["web.service.hive."]).is_empty()).then_some(())
    });
}

/// A query built by hand: id, flags, one question, optional extra bytes.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut packet = Vec::new();
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    packet
}

/// Sends `packet` and returns the reply, if one comes within `wait`.
fn exchange(socket: &UdpSocket, server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    socket.set_read_timeout(Some(wait)).unwrap();
    socket.send_to(packet, server).unwrap();
    let mut buffer = [0u8; 4096];
    let (length, _) = socket.recv_from(&mut buffer).ok()?;
    Some(buffer[..length].to_vec())
}

/// Truncated, looping, oversized and random packets never crash or hang the
/// role: each gets FORMERR (or another error rcode) or no answer, and a good
/// query right after is answered.
#[test]
fn malformed_packets_get_formerr_or_nothing_and_the_next_query_is_answered() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    node.start();
    let port = free_port();
    install_roles(&node, port);
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let good = query(0x4242, "n1.node.hive.", 1);
    let reply = exchange(&socket, server, &good, Duration::from_secs(2)).expect("the good query is answered");
    assert_eq!(
        (&reply[..2], reply[3] & 0x0f),
        (&[0x42, 0x42][..], 0),
        "the good query's id and rcode"
    );

    // The hand-made packets are malformed: an answer to one must carry an
    // error rcode. Generated ones may happen to be valid queries.
    let mut corpus: Vec<(String, Vec<u8>)> = Vec::new();
    let whole = query(0x1111, "web.service.hive.", 1);
    for length in 0..whole.len() {
        corpus.push((format!("truncated to {length} bytes"), whole[..length].to_vec()));
    }
    // A name that points at itself, and two that point at each other.
    let mut looping = query(7, "a.", 1);
    looping.truncate(12);
    looping.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    corpus.push(("self-pointing compression".into(), looping));
    let mut mutual = query(8, "a.", 1);
    mutual.truncate(12);
    mutual.extend_from_slice(&[0x01, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]);
    corpus.push(("mutually pointing compression".into(), mutual));
    let mut oversized = query(9, "n1.node.hive.", 1);
    oversized.resize(65_000, 0xff);
    corpus.push(("oversized".into(), oversized));
    let mut two_questions = query(10, "n1.node.hive.", 1);
    two_questions[5] = 2;
    corpus.push(("qdcount 2 with one question".into(), two_questions));
    let mut label_too_long = query(11, "n1.node.hive.", 1);
    label_too_long[12] = 63;
    corpus.push(("label length past the end".into(), label_too_long));
    let mut response = query(12, "n1.node.hive.", 1);
    response[2] |= 0x80;
    corpus.push(("a response, not a query".into(), response));
    let mut update = query(13, "n1.node.hive.", 1);
    update[2] = 5 << 3;
    corpus.push(("opcode UPDATE".into(), update));
    let crafted = corpus.len();
    // Generated: random bytes, and valid queries with random bytes flipped.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000 {
        let packet: Vec<u8> = if i % 2 == 0 {
            let length = (next() % 600) as usize;
            (0..length).map(|_| next() as u8).collect()
        } else {
            let mut packet = query(i as u16, "web.service.hive.", 1);
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % packet.len();
                packet[at] = next() as u8;
            }
            packet
        };
        corpus.push((format!("generated #{i}"), packet));
    }

    // Each packet is followed by the good query (id 0x4242): the role must
    // answer it, and whatever came back for the packet must be a reply to it.
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut answered = 0;
    let mut buffer = [0u8; 4096];
    // Replies may come out of order: one to an earlier packet is fine.
    let mut sent_ids = std::collections::HashSet::new();
    for (index, (what, packet)) in corpus.iter().enumerate() {
        if packet.len() >= 2 {
            sent_ids.insert([packet[0], packet[1]]);
        }
        socket.send_to(packet, server).unwrap();
        socket.send_to(&good, server).unwrap();
        loop {
            let (length, _) = socket
                .recv_from(&mut buffer)
                .unwrap_or_else(|error| panic!("after {what}: the good query got no answer: {error}"));
            let reply = &buffer[..length];
            assert!(reply.len() >= 12, "{what}: a reply shorter than a header");
            if reply[..2] == [0x42, 0x42] && reply[3] & 0x0f == 0 {
                break;
            }
            answered += 1;
            assert!(
                sent_ids.contains(&[reply[0], reply[1]]),
                "{what}: a reply with id {:?} that no packet had",
                &reply[..2]
            );
            assert!(reply[2] & 0x80 != 0, "{what}: the reply is not marked as a response");
            if index < crafted && reply[..2] == packet[..2] && what != "oversized" {
                assert!(reply[3] & 0x0f != 0, "{what}: answered with NOERROR");
            }
        }
    }
    assert!(
        answered > 100,
        "only {answered} of {} packets got a reply",
        corpus.len()
    );
    // On a fresh socket, so no late reply to the corpus gets in the way.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let empty = exchange(&socket, server, &[], Duration::from_millis(200));
    assert!(empty.is_none(), "an empty datagram gets no answer");
    let mut two_questions = query(0x7777, "n1.node.hive.", 1);
    two_questions[5] = 2;
    let reply = exchange(&socket, server, &two_questions, Duration::from_secs(2)).unwrap();
    assert_eq!(
        (&reply[..2], reply[3] & 0x0f),
        (&[0x77, 0x77][..], 1),
        "qdcount 2 gets FORMERR"
    );
    // A service event with a payload the table cannot read is skipped; the
    // events after it still arrive.
    let bad = node.cli(&[
        "events",
        "emit",
        "service.up",
        "bad@nowhere",
        "--payload",
        "{\"port\": \"x\"}",
    ]);
    assert!(bad.status.success(), "{}", stderr(&bad));
    let payload = r#"{"service":"after","node":"n0","address":"127.0.0.77","port":80,"tags":[],"healthy":true}"#;
    let good_event = node.cli(&["events", "emit", "service.up", "after@n0", "--payload", payload]);
    assert!(good_event.status.success(), "{}", stderr(&good_event));
    wait_for("the event after a malformed one to be served", || {
        (dig_short(port, &["after.service.hive."]) == ["127.0.0.77"]).then_some(())
    });
    // Names with names below them are NODATA, not NXDOMAIN (RFC 8020).
    let empty = dig(port, &["service.hive."]);
    assert_eq!(status_and_flags(&empty).0, "NOERROR", "{empty}");
    assert!(node.is_running(), "the host survived");
    let status = node.cli(&["roles", "list", "--json"]);
    let roles: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let dns = roles
        .as_array()
        .unwrap()
        .iter()
        .find(|role| role["name"] == "dns")
        .unwrap();
    assert_eq!(dns["state"], "running", "{dns}");
    node.terminate();
}

/// A node's name belongs to one member: a join under a member's name is
/// refused with the reason (and its token stays unused), and a removed
/// node's name leaves the zone and the node list, even while the removed
/// process still runs.
#[test]
fn a_name_belongs_to_one_member_and_leaves_with_it() {
    let root = tempfile::tempdir().unwrap();
    let mut first = NodeProcess::new(root.path(), "n1", Vec::new());
    first.start();
    let dns_port = free_port();
    install_roles(&first, dns_port);
    let token = |node: &NodeProcess| stdout(&node.cli(&["members", "token"])).trim().to_string();
    let joiner = |dir: &str, name: &str, address: &str, token: String| {
        let args = vec!["--join".into(), first.transport.clone(), "--join-token".into(), token];
        let mut node = NodeProcess::new(root.path(), dir, args);
        node.name = name.to_string();
        node.transport = format!("{address}:{}", free_port());
        node
    };

    let mut second = joiner("n2", "n2", "127.0.0.22", token(&first));
    second.start();
    wait_for("n2 in the zone", || {
        (dig_short(dns_port, &["n2.node.hive."]) == ["127.0.0.22"]).then_some(())
    });

    let mut impostor = joiner("impostor", "N2", "127.0.0.66", token(&first));
    impostor.start();
    let deadline = Instant::now() + PATIENCE;
    while impostor.exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "the impostor was not refused: {}",
            impostor.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(impostor.log().contains("belongs to member"), "{}", impostor.log());
    assert_eq!(dig_short(dns_port, &["n2.node.hive."]), ["127.0.0.22"]);

    let removed = first.cli(&["members", "remove", "n2"]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    wait_for("n2 out of the zone", || {
        dig(dns_port, &["n2.node.hive."]).contains("NXDOMAIN").then_some(())
    });
    wait_for("n2 out of the node list", || {
        let nodes = first.cli(&["members", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&nodes.stdout).ok()?;
        let text = listed.to_string();
        (!text.contains("\"n2\"")).then_some(())
    });
    assert!(second.is_running(), "the removed process still runs");
}
