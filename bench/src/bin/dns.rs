//! The dns role against dnsmasq (Debian's package), serving the same 1000
//! names, alternating, three rounds, with dnsperf (Debian's package) as the
//! load: (a) saturating load, queries/s and lost queries; (b) a fixed 20k
//! queries/s, the server's CPU per query and p50/p99 latency from a small
//! client beside dnsperf, which also counts the probes each server left
//! unanswered for a second. Each server is pinned to core 0 and the
//! clients to core 1. Then: 20 reloads of the dns role under 20k queries/s,
//! counting lost queries, once on a quiet machine and once with another
//! process keeping the server's core busy; and, on a 3-node cluster, the
//! time from registering a service on node A to node C's first correct
//! answer for it.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use hivemind_bench::{
    HostProcess, Peer, bootstrap_args, busy_core, cpu_time, free_port, list, median, millis, one_node_args,
    require_tools, sha256_hex, summarize, verdict, with_nonce,
};
use serde_json::{Value, json};

const NAMES: usize = 1000;
const ROUNDS: usize = 3;
const SATURATE_SECS: u32 = 8;
const FIXED_SECS: u32 = 8;
const FIXED_RATE: u32 = 20_000;
const RELOADS: u64 = 20;
const TRIALS: usize = 50;
const PATIENCE: Duration = Duration::from_secs(60);

fn dns_manifest(port: u16) -> String {
    format!(
        "[limits]\nworkers = 1\nmemory_mb = 64\n\n\
         [[listeners]]\nname = \"udp\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\n\
         [[listeners]]\nname = \"tcp\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\n\
         [config]\nzone = \"hive.\"\nttl = 5\n"
    )
}

const HOST_EVENTS_MANIFEST: &str = "[limits]\nworkers = 1\n[grants]\nemit = [\"service.\"]\ncheck = [\"*\"]\n";

/// The address of the i-th bench name.
fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// A `hivemind up` process, killed when dropped.
struct Host {
    process: HostProcess,
}

impl Host {
    fn new(process: HostProcess) -> Host {
        Host { process }
    }

    fn install(&self, name: &str, wasm: &[u8], manifest: &str) -> anyhow::Result<()> {
        let roles = self.process.data_dir.join("roles");
        std::fs::create_dir_all(&roles)?;
        std::fs::write(roles.join(format!("{name}.toml")), manifest)?;
        hivemind_bench::drop_role(&roles, name, wasm)
    }

    fn role(&self, name: &str) -> Option<Value> {
        let roles = self.process.api.get_json("/v1/roles").ok()?;
        roles.as_array()?.iter().find(|role| role["name"] == name).cloned()
    }

    fn wait_running(&self, name: &str, digest: Option<&str>) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(role) = self.role(name)
                && role["state"] == "running"
                && digest.is_none_or(|digest| role["digest"].as_str().is_some_and(|d| digest.starts_with(d)))
            {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "role {name} did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.process.child.id()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }
}

/// A DNS query for `name` type A with `id`, built by hand.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut packet = id.to_be_bytes().to_vec();
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]);
    packet
}

/// Whether `reply` answers `id` with NOERROR and ends with the A record
/// `expected` (our queries carry no EDNS, so the last record is the answer).
fn answers(reply: &[u8], id: u16, expected: Ipv4Addr) -> bool {
    reply.len() > 16
        && reply[..2] == id.to_be_bytes()
        && reply[3] & 0x0f == 0
        && u16::from_be_bytes([reply[6], reply[7]]) >= 1
        && reply[reply.len() - 4..] == expected.octets()
}

fn pin(pid: u32, core: u32) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "taskset failed for {pid}");
    Ok(())
}

struct Perf {
    completed: u64,
    lost: u64,
    qps: f64,
}

/// dnsperf (on core 1) against `port` for `seconds`, at `rate` q/s or as
/// fast as the server answers.
fn dnsperf(port: u16, queries: &Path, seconds: u32, rate: Option<u32>) -> anyhow::Result<Perf> {
    let output = dnsperf_command(port, queries, seconds, rate)
        .output()
        .context("dnsperf (Debian package dnsperf)")?;
    perf_figures(&output.stdout)
}

fn dnsperf_command(port: u16, queries: &Path, seconds: u32, rate: Option<u32>) -> Command {
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &seconds.to_string(), "-q", "500"]);
    if let Some(rate) = rate {
        command.args(["-Q", &rate.to_string()]);
    }
    command
}

/// dnsperf at `rate` q/s until [`UntilStopped::stop`], which interrupts
/// it (it then prints its figures for the time it ran).
struct UntilStopped(std::process::Child);

impl UntilStopped {
    fn start(port: u16, queries: &Path, rate: u32) -> anyhow::Result<UntilStopped> {
        dnsperf_command(port, queries, 3600, Some(rate))
            .stdout(Stdio::piped())
            .spawn()
            .map(UntilStopped)
            .context("dnsperf (Debian package dnsperf)")
    }

    fn stop(mut self) -> anyhow::Result<Perf> {
        // taskset execs dnsperf, so the child is dnsperf itself.
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status()?;
        let output = std::mem::replace(&mut self.0, Command::new("true").spawn()?).wait_with_output()?;
        perf_figures(&output.stdout)
    }
}

impl Drop for UntilStopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn perf_figures(stdout: &[u8]) -> anyhow::Result<Perf> {
    let text = String::from_utf8_lossy(stdout);
    let field = |label: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .with_context(|| format!("dnsperf printed no {label:?}:\n{text}"))
    };
    Ok(Perf {
        completed: field("Queries completed:")? as u64,
        lost: field("Queries lost:")? as u64,
        qps: field("Queries per second:")?,
    })
}

/// Round-trip times of the probes one client sent, and how many of them
/// got no answer within a second (left out of the times).
struct Probes {
    samples: Vec<Duration>,
    unanswered: u64,
}

/// One query per millisecond for `duration`.
fn latencies(port: u16, duration: Duration) -> anyhow::Result<Probes> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let server: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut samples = Vec::new();
    let mut unanswered = 0;
    let started = Instant::now();
    let mut buffer = [0u8; 1500];
    let mut id = 0u16;
    while started.elapsed() < duration {
        id = id.wrapping_add(1);
        let i = id as usize % NAMES;
        let sent = Instant::now();
        socket.send_to(&query(id, &format!("svc{i}.service.hive.")), server)?;
        loop {
            match socket.recv_from(&mut buffer) {
                Ok((length, _)) if buffer[..2] == id.to_be_bytes() => {
                    anyhow::ensure!(answers(&buffer[..length], id, address(i)), "wrong answer for svc{i}");
                    samples.push(sent.elapsed());
                    break;
                }
                // A late answer to an earlier probe.
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    unanswered += 1;
                    break;
                }
                Err(error) => return Err(error).context("a latency probe"),
            }
        }
        std::thread::sleep(Duration::from_millis(1).saturating_sub(sent.elapsed()));
    }
    Ok(Probes { samples, unanswered })
}

struct Figures {
    saturated_qps: Vec<f64>,
    saturated_lost: Vec<u64>,
    cpu_per_query: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    unanswered: Vec<u64>,
}

impl Figures {
    fn new() -> Figures {
        Figures {
            saturated_qps: vec![],
            saturated_lost: vec![],
            cpu_per_query: vec![],
            p50: vec![],
            p99: vec![],
            unanswered: vec![],
        }
    }
}

fn measure(pid: u32, port: u16, queries: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let saturated = dnsperf(port, queries, SATURATE_SECS, None)?;
    figures.saturated_qps.push(saturated.qps);
    figures.saturated_lost.push(saturated.lost);
    let before = cpu_time(pid)?;
    let probe = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        latencies(port, Duration::from_secs(FIXED_SECS as u64 - 4))
    });
    let fixed = dnsperf(port, queries, FIXED_SECS, Some(FIXED_RATE))?;
    let Probes {
        mut samples,
        unanswered,
    } = probe.join().expect("latency client")?;
    let cpu = cpu_time(pid)? - before;
    let served = fixed.completed + samples.len() as u64;
    figures.cpu_per_query.push(cpu.as_secs_f64() * 1e6 / served as f64);
    figures.unanswered.push(unanswered);
    anyhow::ensure!(!samples.is_empty(), "no latency probe to port {port} was answered");
    let summary = summarize(&mut samples);
    figures.p50.push(summary.median.as_secs_f64() * 1e6);
    figures.p99.push(summary.p99.as_secs_f64() * 1e6);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    require_tools(&[
        ("dnsperf", "dnsperf"),
        ("dnsmasq", "dnsmasq-base"),
        ("taskset", "util-linux"),
    ])?;
    let root = tempfile::tempdir()?;
    let queries = root.path().join("queries.txt");
    let hosts = root.path().join("dnsmasq.hosts");
    let mut query_lines = String::new();
    let mut host_lines = String::new();
    for i in 0..NAMES {
        query_lines.push_str(&format!("svc{i}.service.hive A\n"));
        host_lines.push_str(&format!("{} svc{i}.service.hive\n", address(i)));
    }
    std::fs::write(&queries, query_lines)?;
    std::fs::write(&hosts, host_lines)?;

    // The dns role on one host, with the same 1000 names.
    let dns_port = free_port();
    let data = root.path().join("host");
    let args = one_node_args(&data, &[]);
    let host = Host::new(HostProcess::spawn(&data, &args)?.wait_api()?);
    let dns_wasm = std::fs::read(hivemind_role_artifacts::ROLE_DNS)?;
    host.install("dns", &dns_wasm, &dns_manifest(dns_port))?;
    host.wait_running("dns", None)?;
    for i in 0..NAMES {
        let payload = json!({
            "service": format!("svc{i}"), "node": "bench", "address": address(i).to_string(),
            "port": 80, "tags": [], "healthy": true,
        });
        let body = json!({ "kind": "service.up", "key": format!("svc{i}@bench"), "payload": payload });
        let (status, reply) =
            host.process
                .api
                .send("POST", "/v1/events", &serde_json::to_vec(&body)?, "application/json")?;
        anyhow::ensure!(status < 300, "emit: {}", String::from_utf8_lossy(&reply));
    }
    let last = NAMES - 1;
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        socket.send_to(&query(7, &format!("svc{last}.service.hive.")), ("127.0.0.1", dns_port))?;
        let mut buffer = [0u8; 512];
        if let Ok((length, _)) = socket.recv_from(&mut buffer)
            && answers(&buffer[..length], 7, address(last))
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the dns role never answered for svc{last}");
    }
    pin(host.pid(), 0)?;

    let dnsmasq_port = free_port();
    let dnsmasq = Command::new("dnsmasq")
        .args([
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--port={dnsmasq_port}"))
        .arg("--user=root")
        .arg(format!("--pid-file={}", root.path().join("dnsmasq.pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Peer)
        .context("dnsmasq (Debian package dnsmasq-base)")?;
    std::thread::sleep(Duration::from_millis(500));
    pin(dnsmasq.id(), 0)?;

    let mut ours = Figures::new();
    let mut theirs = Figures::new();
    for _ in 0..ROUNDS {
        measure(dnsmasq.id(), dnsmasq_port, &queries, &mut theirs)?;
        measure(host.pid(), dns_port, &queries, &mut ours)?;
    }
    drop(dnsmasq);

    println!("dns role vs dnsmasq, {NAMES} names, {ROUNDS} rounds (server on core 0, dnsperf on core 1)");
    let qps_ratio = median(&ours.saturated_qps) / median(&theirs.saturated_qps);
    println!(
        "  saturating: dns role {} q/s (lost {:?}), dnsmasq {} q/s (lost {:?}): {qps_ratio:.2}x   (target >= 1.0x -> {})",
        list(&ours.saturated_qps, 0),
        ours.saturated_lost,
        list(&theirs.saturated_qps, 0),
        theirs.saturated_lost,
        verdict(qps_ratio >= 1.0)
    );
    let cpu_ratio = median(&ours.cpu_per_query) / median(&theirs.cpu_per_query);
    println!(
        "  at {FIXED_RATE} q/s, CPU per query: dns role {} us, dnsmasq {} us: {cpu_ratio:.2}x   (target <= 1.0x -> {})",
        list(&ours.cpu_per_query, 1),
        list(&theirs.cpu_per_query, 1),
        verdict(cpu_ratio <= 1.0)
    );
    let p99_ratio = median(&ours.p99) / median(&theirs.p99);
    println!(
        "  at {FIXED_RATE} q/s, latency: dns role p50 {} us p99 {} us; dnsmasq p50 {} us p99 {} us: p99 {p99_ratio:.2}x   (target <= 1.5x -> {})",
        list(&ours.p50, 0),
        list(&ours.p99, 0),
        list(&theirs.p50, 0),
        list(&theirs.p99, 0),
        verdict(p99_ratio <= 1.5)
    );
    println!(
        "  latency probes unanswered within 1 s: dns role {:?}, dnsmasq {:?}   (target 0 -> {})",
        ours.unanswered,
        theirs.unanswered,
        verdict(
            ours.unanswered
                .iter()
                .chain(&theirs.unanswered)
                .all(|count| *count == 0)
        )
    );

    // Reloads under load: a new build of the role (a nonce in a custom
    // section) 20 times while dnsperf sends 20k q/s; then again with a
    // process spinning on the server's core.
    reloads_under_load(&host, &dns_wasm, dns_port, &queries, 0, "quiet machine")?;
    let busy = busy_core(0)?;
    reloads_under_load(
        &host,
        &dns_wasm,
        dns_port,
        &queries,
        RELOADS,
        "busy core beside the server",
    )?;
    drop(busy);
    drop(host);

    register_to_answer(root.path())?;
    Ok(())
}

/// `RELOADS` new builds of the dns role (nonces after `first_nonce`) while
/// dnsperf sends `FIXED_RATE` q/s; prints the queries lost.
fn reloads_under_load(
    host: &Host,
    dns_wasm: &[u8],
    dns_port: u16,
    queries: &Path,
    first_nonce: u64,
    machine: &str,
) -> anyhow::Result<()> {
    let load = UntilStopped::start(dns_port, queries, FIXED_RATE)?;
    std::thread::sleep(Duration::from_secs(1));
    let (overflows_before, stolen_before) = (udp_receive_buffer_errors()?, stolen_ticks()?);
    let server_drops_before = udp_socket_drops(dns_port)?;
    let mut reload_times = Vec::new();
    for nonce in first_nonce + 1..=first_nonce + RELOADS {
        let bytes = with_nonce(dns_wasm, nonce);
        let digest = sha256_hex(&bytes);
        let started = Instant::now();
        hivemind_bench::drop_role(&host.process.data_dir.join("roles"), "dns", &bytes)?;
        host.wait_running("dns", Some(&digest))?;
        reload_times.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    // dnsperf counts a query lost after 5 s without an answer; one still
    // waiting when it is interrupted is counted neither way.
    std::thread::sleep(Duration::from_secs(6));
    let reloaded = load.stop()?;
    let overflows = udp_receive_buffer_errors()? - overflows_before;
    let server_drops = udp_socket_drops(dns_port)? - server_drops_before;
    let stolen = stolen_ticks()? - stolen_before;
    let reload_times = summarize(&mut reload_times);
    println!(
        "  {RELOADS} reloads under {FIXED_RATE} q/s, {machine}: {} queries, {} lost   (target 0 -> {}); reload p50 {:.0} ms; \
         datagrams the kernel dropped at the server's full socket: {server_drops} (at any socket: {overflows}); \
         CPU time stolen by the hypervisor: {} ms",
        reloaded.completed,
        reloaded.lost,
        verdict(reloaded.lost == 0),
        millis(reload_times.median),
        stolen * 10
    );
    Ok(())
}

/// The kernel's count of datagrams dropped because a socket's receive
/// buffer was full (`Udp: RcvbufErrors` in /proc/net/snmp), machine-wide:
/// tells a server that fell behind from one that dropped queries itself.
fn udp_receive_buffer_errors() -> anyhow::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp")?;
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp: "));
    let (names, values) = (udp.next(), udp.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("/proc/net/snmp has no Udp lines");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .context("/proc/net/snmp: no Udp RcvbufErrors")
}

/// Datagrams the kernel dropped at the UDP socket bound to 127.0.0.1:`port`
/// since it was made (the `drops` column of /proc/net/udp).
fn udp_socket_drops(port: u16) -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp")?;
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(1) == Some(&local.as_str()))
        .and_then(|fields| fields.last().and_then(|drops| drops.parse().ok()))
        .with_context(|| format!("/proc/net/udp: no socket on 127.0.0.1:{port}"))
}

/// Ticks (10 ms) all CPUs lost to other guests of the hypervisor (`steal`
/// in /proc/stat): a pause no scheduling on this machine can prevent.
fn stolen_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat is empty")?;
    cpu.split_whitespace()
        .nth(8)
        .and_then(|steal| steal.parse().ok())
        .context("/proc/stat: no steal column")
}

/// 3 nodes; a service registered on A, timed until C answers it.
fn register_to_answer(root: &Path) -> anyhow::Result<()> {
    let transports: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut spawned = Vec::new();
    for (i, transport) in transports.iter().enumerate() {
        let dir = root.join(format!("n{i}"));
        let api = format!("127.0.0.1:{}", free_port());
        let args = bootstrap_args(&dir, &format!("n{i}"), &api, transport, &transports);
        spawned.push(HostProcess::spawn(&dir, &args)?);
    }
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for spawned in spawned {
        let node = Host::new(spawned.wait_api()?);
        let port = free_port();
        node.install(
            "host-events",
            &std::fs::read(hivemind_role_artifacts::ROLE_HOST_EVENTS)?,
            HOST_EVENTS_MANIFEST,
        )?;
        node.install(
            "dns",
            &std::fs::read(hivemind_role_artifacts::ROLE_DNS)?,
            &dns_manifest(port),
        )?;
        nodes.push(node);
        ports.push(port);
    }
    for node in &nodes {
        node.wait_running("dns", None)?;
        node.wait_running("host-events", None)?;
    }
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut samples = Vec::new();
    let mut buffer = [0u8; 1500];
    for trial in 0..TRIALS {
        let name = format!("reg{trial}");
        let expected = Ipv4Addr::new(127, 0, 9, trial as u8 + 1);
        let body = json!({ "args": [name, "--port", "80", "--address", expected.to_string()] });
        let started = Instant::now();
        let (status, reply) = nodes[0].process.api.send(
            "POST",
            "/v1/roles/host-events/register",
            &serde_json::to_vec(&body)?,
            "application/json",
        )?;
        anyhow::ensure!(status < 300, "register: {}", String::from_utf8_lossy(&reply));
        let id = trial as u16 + 1;
        let packet = query(id, &format!("{name}.service.hive."));
        loop {
            socket.send_to(&packet, ("127.0.0.1", ports[2]))?;
            if let Ok((length, _)) = socket.recv_from(&mut buffer)
                && answers(&buffer[..length], id, expected)
            {
                break;
            }
            anyhow::ensure!(started.elapsed() < PATIENCE, "node C never answered {name}");
        }
        samples.push(started.elapsed());
    }
    let summary = summarize(&mut samples);
    println!(
        "  register on node A -> first correct answer on node C: median {:.1} ms, p99 {:.1} ms over {TRIALS}   (target median <= 100 ms -> {})",
        millis(summary.median),
        millis(summary.p99),
        verdict(millis(summary.median) <= 100.0)
    );
    Ok(())
}
