//! The bridge against HAProxy (Debian's package: mode tcp, splice on) and
//! a direct connection, through one backend, everything on loopback and
//! sharing the machine's cores, in rounds that measure each path back to
//! back. Eight rounds of bulk throughput with iperf3 (Debian's package),
//! and throughput per proxy CPU core (the proxy's CPU time over the run).
//! Then sixteen rounds of the small exchanges:
//!
//! - request/response rate: 64-byte messages over 32 keep-alive
//!   connections for two seconds, and the proxy's CPU time per exchange;
//! - new connections per second: 16 loops of connect, 64-byte exchange,
//!   close for two seconds, and the proxy's CPU time per connection;
//! - latency: one connection's 64-byte ping-pongs, p50 and p99, and the
//!   p99 each proxy adds to the direct one; then again with the client, the
//!   backend and both proxies on one core. On this kind of virtual machine
//!   an idle CPU halts and waking it costs tens of µs, which both proxies
//!   pay on every hop across cores; on one core each hop is a plain switch,
//!   and what is left is the proxy's own latency. The proxy's CPU per
//!   round trip is printed beside: the bridge's threads poll for a moment
//!   after each message before they sleep (`[data_plane] busy_poll_us`),
//!   spending CPU that was idle to skip a wake-up, and this shows its price.
//!
//! With client, backend and proxy sharing two cores, these figures are set
//! by how the cores are shared as much as by the proxy's own work, and a
//! round's comparison of the proxies moves by several percent (tens of µs
//! for a p99) from one round to the next: the more rounds, the narrower
//! their median.
//!
//! In each round the two proxies take turns at going first (a path
//! measured right after another may inherit its leftovers: warm caches,
//! sockets in TIME-WAIT), and a comparison is made round by round: the
//! verdict takes the median of the rounds' ratios (of their p99
//! differences for latency), which the machine's drift between rounds does
//! not move, where the ratio of the paths' medians mixes rounds measured
//! in different weather (it is printed beside). The middle half of the
//! rounds' ratios shows how far the noise reaches: one that spans 1.0 is
//! parity within that noise, whichever side of 1.0 the median falls on.
//!
//! Everything runs in a network namespace of the bench's own, whose
//! loopback lets connect() use every port from 1024: with the machine's
//! default range, connect() gets about 14,000 ports a second to one
//! address and every path's new-connection rate stops there.
//!
//! Then failover, each proxy with its default check settings: the active
//! backend is killed and the time to the first new session that reaches
//! the other backend is measured, both proxies at once, five times.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hivemind_bench::{
    HostProcess, Peer, cpu_time, free_port, list, median, micros, middle_half, millis, one_node_args,
    own_network_namespace, require_tools, summarize, verdict,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rounds of bulk throughput, whose rounds agree closely.
const BULK_ROUNDS: usize = 8;
/// Rounds of the small exchanges (rates and latency), which are short and
/// whose rounds spread the most: more of them narrow the median.
const ROUNDS: usize = 16;
/// Rounds of severing and of failover.
const EVENT_ROUNDS: usize = 5;
const IPERF_SECS: u32 = 5;
/// How long each exchange rate is measured for.
const LOAD: Duration = Duration::from_secs(2);
const KEEPALIVE_CONNECTIONS: usize = 32;
const CONNECTING_LOOPS: usize = 16;
const MESSAGE: usize = 64;
const PINGS: usize = 20_000;
const PATIENCE: Duration = Duration::from_secs(60);

/// A way to the backends: direct, or through a proxy process.
struct Path {
    name: &'static str,
    /// Port reaching the iperf3 server.
    bulk: u16,
    /// Port reaching the echo server.
    echo: u16,
    /// The proxy's process, for its CPU time.
    pid: Option<u32>,
}

#[derive(Default)]
struct Figures {
    gbits: Vec<f64>,
    gbits_per_core: Vec<f64>,
    exchanges: Vec<f64>,
    /// The proxy's CPU per keep-alive exchange, µs.
    exchange_cpu_us: Vec<f64>,
    connections: Vec<f64>,
    connection_errors: Vec<u64>,
    /// The proxy's CPU per new connection, µs.
    connection_cpu_us: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    /// The proxy's CPU per round trip of one connection, cores shared, µs.
    round_trip_cpu_us: Vec<f64>,
    one_core_p50_us: Vec<f64>,
    one_core_p99_us: Vec<f64>,
}

/// Runs futures on a runtime of one thread, so a load generator takes at
/// most one core, as dnsperf or iperf3 would.
fn single_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// An echo server: every byte read is written back.
fn start_echo(runtime: &tokio::runtime::Runtime) -> anyhow::Result<u16> {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    runtime.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 << 10];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// A backend for failover: greets each client with its name and closes.
/// Dropping the handle's task (abort) closes the listener.
fn start_greeter(runtime: &tokio::runtime::Runtime, port: u16, name: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("bind a greeter");
    runtime.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
            });
        }
    })
}

/// A listener that accepts and closes: what the bridge's checks of the
/// benchmark backends dial, so checks do not disturb iperf3.
fn start_check_target(runtime: &tokio::runtime::Runtime) -> anyhow::Result<u16> {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    runtime.spawn(async move { while listener.accept().await.is_ok() {} });
    Ok(port)
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn haproxy_config(frontends: &[(u16, u16, &str)]) -> String {
    let mut text = String::from(
        "global\n    maxconn 4096\n    nbthread 2\n\
         defaults\n    mode tcp\n    option splice-auto\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n",
    );
    for (index, (listen, backend, servers)) in frontends.iter().enumerate() {
        text += &format!(
            "frontend f{index}\n    bind 127.0.0.1:{listen}\n    default_backend b{index}\n\
             backend b{index}\n{}\n",
            if servers.is_empty() {
                format!("    server s 127.0.0.1:{backend}")
            } else {
                servers.to_string()
            }
        );
    }
    text
}

fn start_haproxy(dir: &std::path::Path, config: &str) -> anyhow::Result<Peer> {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Peer)
        .context("haproxy (Debian package haproxy)")
}

fn bridge_section(name: &str, listen: u16, extra: &str, backends: &[(&str, u16, Option<u16>)]) -> String {
    let mut text = format!("[[bridge]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{listen}\"\n{extra}\n");
    for (backend, port, check_port) in backends {
        text += &format!("[[bridge.backends]]\nname = \"{backend}\"\naddress = \"127.0.0.1:{port}\"\n");
        if let Some(check_port) = check_port {
            text += &format!("check_address = \"127.0.0.1:{check_port}\"\n");
        }
        text += "\n";
    }
    text
}

fn start_hivemind(dir: &std::path::Path, config: &str) -> anyhow::Result<HostProcess> {
    let path = dir.join("hivemind.toml");
    std::fs::write(&path, config)?;
    let data = dir.join("data");
    let args = one_node_args(&data, &["--config", &path.display().to_string()]);
    HostProcess::spawn(&data, &args)?.wait_api()
}

fn wait_active(host: &HostProcess, bridge: &str, backend: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = host.api.get_json(&format!("/v1/bridges/{bridge}"))?;
        if status["active"]["backend"] == backend && status["serving"] == true {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bridge {bridge} never routed to {backend}: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// iperf3's received bits per second through `port`, and the proxy's CPU
/// cores used meanwhile.
fn iperf(port: u16, pid: Option<u32>) -> anyhow::Result<(f64, Option<f64>)> {
    let cpu_before = pid.map(cpu_time).transpose()?;
    let started = Instant::now();
    let output = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &IPERF_SECS.to_string(),
            "-J",
        ])
        .output()
        .context("iperf3 (Debian package iperf3)")?;
    let wall = started.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("iperf3 printed no JSON: {}", String::from_utf8_lossy(&output.stderr)))?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no throughput: {}", report["error"]))?;
    let cores = match (pid, cpu_before) {
        (Some(pid), Some(before)) => Some((cpu_time(pid)? - before).as_secs_f64() / wall.as_secs_f64()),
        _ => None,
    };
    Ok((bits, cores))
}

/// Exchanges per second over keep-alive connections.
fn keepalive_rate(client: &tokio::runtime::Runtime, port: u16) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + LOAD;
    client.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..KEEPALIVE_CONNECTIONS {
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                stream.set_nodelay(true)?;
                let message = [7u8; MESSAGE];
                let mut answer = [0u8; MESSAGE];
                while tokio::time::Instant::now() < deadline {
                    stream.write_all(&message).await?;
                    stream.read_exact(&mut answer).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / LOAD.as_secs_f64())
}

/// New connections (each one 64-byte exchange) per second, and failures.
fn connection_rate(client: &tokio::runtime::Runtime, port: u16) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + LOAD;
    client.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONNECTING_LOOPS {
            let (done, failed) = (done.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let exchange = async {
                        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                        stream.set_nodelay(true)?;
                        stream.write_all(&[7u8; MESSAGE]).await?;
                        let mut answer = [0u8; MESSAGE];
                        stream.read_exact(&mut answer).await?;
                        std::io::Result::Ok(())
                    };
                    match exchange.await {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    (
        done.load(Ordering::Relaxed) as f64 / LOAD.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

/// One connection's ping-pong round trips.
fn round_trips(port: u16) -> anyhow::Result<Vec<Duration>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let message = [7u8; MESSAGE];
    let mut answer = [0u8; MESSAGE];
    let mut samples = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let started = Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut answer)?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// The proxy's CPU time so far (none for the direct path).
fn proxy_cpu(path: &Path) -> anyhow::Result<Option<Duration>> {
    path.pid.map(cpu_time).transpose()
}

/// The proxy's CPU per operation in µs since `before`, over a [`LOAD`]
/// run at `rate` operations a second.
fn proxy_cpu_per_operation(path: &Path, before: Option<Duration>, rate: f64) -> anyhow::Result<Option<f64>> {
    let (Some(before), Some(now)) = (before, proxy_cpu(path)?) else {
        return Ok(None);
    };
    Ok(Some(
        (now - before).as_secs_f64() * 1e6 / (rate * LOAD.as_secs_f64()).max(1.0),
    ))
}

/// Bulk throughput, and the proxy's CPU for it.
fn measure_bulk(path: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let (bits, cores) = iperf(path.bulk, path.pid)?;
    figures.gbits.push(bits / 1e9);
    if let Some(cores) = cores {
        figures.gbits_per_core.push(bits / 1e9 / cores.max(0.01));
    }
    Ok(())
}

/// Keep-alive exchanges and new connections per second, with the proxy's
/// CPU for each; then one connection's latency with the cores shared and
/// on one core.
fn measure_exchanges(
    path: &Path,
    pids: &[u32],
    client: &tokio::runtime::Runtime,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let before = proxy_cpu(path)?;
    let exchanges = keepalive_rate(client, path.echo)?;
    figures.exchanges.push(exchanges);
    figures
        .exchange_cpu_us
        .extend(proxy_cpu_per_operation(path, before, exchanges)?);
    let before = proxy_cpu(path)?;
    let (rate, errors) = connection_rate(client, path.echo);
    figures.connections.push(rate);
    figures.connection_errors.push(errors);
    figures
        .connection_cpu_us
        .extend(proxy_cpu_per_operation(path, before, rate)?);
    let before = proxy_cpu(path)?;
    let mut samples = round_trips(path.echo)?;
    if let (Some(before), Some(now)) = (before, proxy_cpu(path)?) {
        figures
            .round_trip_cpu_us
            .push((now - before).as_secs_f64() * 1e6 / PINGS as f64);
    }
    let summary = summarize(&mut samples);
    figures.p50_us.push(micros(summary.median));
    figures.p99_us.push(micros(summary.p99));
    let mut samples = on_one_core(pids, || round_trips(path.echo))?;
    let summary = summarize(&mut samples);
    figures.one_core_p50_us.push(micros(summary.median));
    figures.one_core_p99_us.push(micros(summary.p99));
    Ok(())
}

/// Runs `work` with every thread of this process (client and backends) and
/// of `pids` (the proxies) allowed only the first CPU this process may use,
/// then gives them back the CPUs this process had.
fn on_one_core<T>(pids: &[u32], work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let threads = |pid: u32| -> anyhow::Result<Vec<libc::pid_t>> {
        std::fs::read_dir(format!("/proc/{pid}/task"))?
            .map(|entry| Ok(entry?.file_name().to_string_lossy().parse()?))
            .collect()
    };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // fills it for thread 0 (the caller) and only reads the size given.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let first = (0..libc::CPU_SETSIZE as usize)
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .context("no CPU allowed")?;
    // SAFETY: as above, a zeroed set is empty; CPU_SET marks one CPU of it.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(first, &mut one) };
    let set = |thread: libc::pid_t, cpus: &libc::cpu_set_t| {
        // SAFETY: sched_setaffinity reads the set for the call; a thread
        // that ended meanwhile only makes it fail, which is ignored.
        unsafe { libc::sched_setaffinity(thread, std::mem::size_of::<libc::cpu_set_t>(), cpus) };
    };
    // None of these processes sets affinities of its own, so every thread
    // goes back to what this one had, threads started meanwhile included.
    let set_all = |cpus: &libc::cpu_set_t| -> anyhow::Result<()> {
        for pid in pids.iter().copied().chain([std::process::id()]) {
            threads(pid)?.into_iter().for_each(|thread| set(thread, cpus));
        }
        Ok(())
    };
    set_all(&one)?;
    let outcome = work();
    set_all(&allowed)?;
    outcome
}

/// Said of a comparison whose rounds fall on both sides of parity.
fn noise_note(spans_parity: bool) -> &'static str {
    if spans_parity {
        " (parity within the rounds' noise)"
    } else {
        ""
    }
}

const SEVERED: usize = 100;

/// Opens [`SEVERED`] sessions through the echo bridge, turns its routing
/// off, and returns how long after the request the last one was cut; then
/// turns routing back on.
fn time_to_sever(client: &tokio::runtime::Runtime, host: &HostProcess, port: u16) -> anyhow::Result<Duration> {
    let mut sessions = Vec::new();
    for _ in 0..SEVERED {
        let mut stream = client.block_on(tokio::net::TcpStream::connect(("127.0.0.1", port)))?;
        // One exchange proves the session reaches the backend.
        client.block_on(async {
            stream.write_all(&[7u8; MESSAGE]).await?;
            let mut answer = [0u8; MESSAGE];
            stream.read_exact(&mut answer).await
        })?;
        sessions.push(stream);
    }
    let cut = client.block_on(async {
        let waits: Vec<_> = sessions
            .into_iter()
            .map(|mut stream| {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64];
                    // End of stream or reset: either way, cut.
                    while let Ok(read) = stream.read(&mut buffer).await {
                        if read == 0 {
                            break;
                        }
                    }
                    Instant::now()
                })
            })
            .collect();
        let asked = Instant::now();
        let (status, reply) = {
            let api = host.api.clone();
            tokio::task::spawn_blocking(move || {
                api.send(
                    "PATCH",
                    "/v1/bridges/echo",
                    br#"{"enabled": false, "reason": "bench: sever"}"#,
                    "application/json",
                )
            })
            .await??
        };
        anyhow::ensure!(
            status == 200,
            "disabling the echo bridge: {}",
            String::from_utf8_lossy(&reply)
        );
        let mut last = asked;
        for wait in waits {
            last = last.max(tokio::time::timeout(PATIENCE, wait).await??);
        }
        anyhow::Ok(last - asked)
    })?;
    let (status, reply) = host.api.send(
        "PATCH",
        "/v1/bridges/echo",
        br#"{"enabled": true, "reason": "bench: sever done"}"#,
        "application/json",
    )?;
    anyhow::ensure!(
        status == 200,
        "enabling the echo bridge: {}",
        String::from_utf8_lossy(&reply)
    );
    wait_active(host, "echo", "echo")?;
    Ok(cut)
}

/// Polls `port` every 10 ms until a new session is greeted by `backend`.
fn time_until_greeted(port: u16, backend: &str, since: Instant) -> Option<Duration> {
    while since.elapsed() < PATIENCE {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_ok() && line.trim() == backend {
                return Some(since.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn greeted_by(port: u16) -> Option<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line.trim().to_string())
}

fn main() -> anyhow::Result<()> {
    require_tools(&[("haproxy", "haproxy"), ("iperf3", "iperf3"), ("ip", "iproute2")])?;
    own_network_namespace()?;
    // HAProxy's maxconn and the bridge's sessions need descriptors; both
    // inherit this limit.
    hivemind_core::limits::raise_descriptor_limit();
    let root = tempfile::tempdir()?;
    let backends = single_thread();
    let client = single_thread();
    let echo = start_echo(&backends)?;
    let check_target = start_check_target(&backends)?;
    let iperf_port = free_port();
    let _iperf_server = Command::new("iperf3")
        .args(["-s", "-p", &iperf_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Peer)
        .context("iperf3 (Debian package iperf3)")?;
    wait_port(iperf_port)?;

    // The failover backends and both proxies' sections for them.
    let (greeter_a, greeter_b) = (free_port(), free_port());
    let mut running_a = Some(start_greeter(&backends, greeter_a, "a"));
    let _running_b = start_greeter(&backends, greeter_b, "b");

    let (haproxy_bulk, haproxy_echo, haproxy_failover) = (free_port(), free_port(), free_port());
    let failover_servers =
        format!("    server a 127.0.0.1:{greeter_a} check\n    server b 127.0.0.1:{greeter_b} check backup");
    let haproxy_dir = root.path().join("haproxy");
    std::fs::create_dir_all(&haproxy_dir)?;
    let haproxy = start_haproxy(
        &haproxy_dir,
        &haproxy_config(&[
            (haproxy_bulk, iperf_port, ""),
            (haproxy_echo, echo, ""),
            (haproxy_failover, 0, &failover_servers),
        ]),
    )?;
    wait_port(haproxy_echo)?;

    let (bridge_bulk, bridge_echo, bridge_failover) = (free_port(), free_port(), free_port());
    let hivemind_dir = root.path().join("hivemind");
    std::fs::create_dir_all(&hivemind_dir)?;
    // The failover bridge fails back, as HAProxy does from a backup
    // server, so every round starts on a.
    let host = start_hivemind(
        &hivemind_dir,
        &(bridge_section("bulk", bridge_bulk, "", &[("iperf", iperf_port, Some(check_target))])
            + &bridge_section("echo", bridge_echo, "", &[("echo", echo, Some(check_target))])
            + &bridge_section(
                "failover",
                bridge_failover,
                "failback = true",
                &[("a", greeter_a, None), ("b", greeter_b, None)],
            )),
    )?;
    let host_pid = host.child.id();
    wait_active(&host, "bulk", "iperf")?;
    wait_active(&host, "echo", "echo")?;
    wait_active(&host, "failover", "a")?;

    let paths = [
        Path {
            name: "direct",
            bulk: iperf_port,
            echo,
            pid: None,
        },
        Path {
            name: "haproxy",
            bulk: haproxy_bulk,
            echo: haproxy_echo,
            pid: Some(haproxy.id()),
        },
        Path {
            name: "bridge",
            bulk: bridge_bulk,
            echo: bridge_echo,
            pid: Some(host_pid),
        },
    ];
    let mut figures: Vec<Figures> = paths.iter().map(|_| Figures::default()).collect();
    let proxies: Vec<u32> = paths.iter().filter_map(|path| path.pid).collect();
    // The proxies take turns at going first (see the module's comment).
    let order = |round: usize| if round.is_multiple_of(2) { [0, 1, 2] } else { [0, 2, 1] };
    for round in 0..BULK_ROUNDS {
        for index in order(round) {
            measure_bulk(&paths[index], &mut figures[index])?;
        }
    }
    for round in 0..ROUNDS {
        for index in order(round) {
            measure_exchanges(&paths[index], &proxies, &client, &mut figures[index])?;
        }
    }

    println!(
        "bridge vs HAProxy (mode tcp, splice-auto) and direct, {BULK_ROUNDS} rounds of bulk throughput and {ROUNDS} of small exchanges, all on loopback sharing the cores"
    );
    for (path, figures) in paths.iter().zip(&figures) {
        println!(
            "  {:<8} iperf3 {} Gb/s{}; {KEEPALIVE_CONNECTIONS} keep-alive connections {} exchanges/s{}; new connections {} /s (failed {:?}){}; one connection p50 {} us, p99 {} us{}; on one core p50 {} us, p99 {} us",
            path.name,
            list(&figures.gbits, 1),
            if figures.gbits_per_core.is_empty() {
                String::new()
            } else {
                format!(" ({} Gb/s per proxy core)", list(&figures.gbits_per_core, 1))
            },
            list(&figures.exchanges, 0),
            if figures.exchange_cpu_us.is_empty() {
                String::new()
            } else {
                format!(", {} us of proxy CPU each", list(&figures.exchange_cpu_us, 2))
            },
            list(&figures.connections, 0),
            figures.connection_errors,
            if figures.connection_cpu_us.is_empty() {
                String::new()
            } else {
                format!(", {} us of proxy CPU each", list(&figures.connection_cpu_us, 1))
            },
            list(&figures.p50_us, 1),
            list(&figures.p99_us, 1),
            if figures.round_trip_cpu_us.is_empty() {
                String::new()
            } else {
                format!(" with {} us of proxy CPU each", list(&figures.round_trip_cpu_us, 1))
            },
            list(&figures.one_core_p50_us, 1),
            list(&figures.one_core_p99_us, 1),
        );
    }
    let [direct, theirs, ours] = &figures[..] else {
        unreachable!()
    };
    for (what, ours, theirs) in [
        ("throughput", &ours.gbits, &theirs.gbits),
        (
            "throughput per proxy core",
            &ours.gbits_per_core,
            &theirs.gbits_per_core,
        ),
        ("keep-alive exchanges/s", &ours.exchanges, &theirs.exchanges),
        ("new connections/s", &ours.connections, &theirs.connections),
    ] {
        let rounds: Vec<f64> = ours.iter().zip(theirs).map(|(ours, theirs)| ours / theirs).collect();
        let value = median(&rounds);
        let (low, high) = middle_half(&rounds);
        println!(
            "  {what}: bridge / HAProxy = {value:.3}x, rounds' middle half {low:.3}-{high:.3}x{}; ratio of the medians {:.3}x   (target >= 1.0x -> {})",
            noise_note(low < 1.0 && high > 1.0),
            median(ours) / median(theirs),
            verdict(value >= 1.0)
        );
    }
    for (what, value) in [
        (
            "keep-alive exchange",
            median(&ours.exchange_cpu_us) / median(&theirs.exchange_cpu_us),
        ),
        (
            "new connection",
            median(&ours.connection_cpu_us) / median(&theirs.connection_cpu_us),
        ),
        (
            "round trip of one connection, cores shared",
            median(&ours.round_trip_cpu_us) / median(&theirs.round_trip_cpu_us),
        ),
    ] {
        println!(
            "  proxy CPU per {what}: bridge / HAProxy = {value:.3}x   (context, not a target: below 1.0x the bridge spends less)"
        );
    }
    for (what, ours, theirs, direct) in [
        ("cores shared", &ours.p99_us, &theirs.p99_us, &direct.p99_us),
        (
            "all on one core",
            &ours.one_core_p99_us,
            &theirs.one_core_p99_us,
            &direct.one_core_p99_us,
        ),
    ] {
        let added_ours = median(ours) - median(direct);
        let added_theirs = median(theirs) - median(direct);
        // Within a round both proxies are set against the same direct
        // path, so the difference of their added p99s is that of their p99s.
        let rounds: Vec<f64> = ours.iter().zip(theirs).map(|(ours, theirs)| ours - theirs).collect();
        let difference = median(&rounds);
        let (low, high) = middle_half(&rounds);
        println!(
            "  added p99, {what}: bridge - HAProxy = {difference:.1} us, rounds' middle half {low:.1} to {high:.1} us{}; added to the direct p99's median: bridge {added_ours:.1} us, HAProxy {added_theirs:.1} us   (target <= HAProxy's -> {})",
            noise_note(low < 0.0 && high > 0.0),
            verdict(difference <= 0.0)
        );
    }

    // Busy polling stops with the traffic: each proxy's CPU over a quiet
    // second (the host's also carries its checks, Raft and gossip).
    std::thread::sleep(Duration::from_millis(200));
    let quiet_before = (cpu_time(host_pid)?, cpu_time(haproxy.id())?);
    std::thread::sleep(Duration::from_secs(1));
    let quiet = (
        cpu_time(host_pid)? - quiet_before.0,
        cpu_time(haproxy.id())? - quiet_before.1,
    );
    println!(
        "  CPU in a quiet second after the traffic: bridge's host {:.1} ms, HAProxy {:.1} ms   (context: busy polling ends with the traffic)",
        millis(quiet.0),
        millis(quiet.1)
    );

    // Severing: 100 open sessions, routing turned off; the time until the
    // last of them is cut, from the request (its commit included).
    let mut sever_times = Vec::new();
    for _ in 0..EVENT_ROUNDS {
        sever_times.push(millis(time_to_sever(&client, &host, bridge_echo)?));
    }
    println!(
        "  routing off -> {SEVERED} open sessions severed: {} ms after the request, commit included   (target <= 100 ms -> {})",
        list(&sever_times, 1),
        verdict(median(&sever_times) <= 100.0)
    );

    // Failover: kill a, time both proxies to their first session on b.
    let mut ours_failover = Vec::new();
    let mut theirs_failover = Vec::new();
    for round in 0..EVENT_ROUNDS {
        if round > 0 {
            running_a = Some(start_greeter(&backends, greeter_a, "a"));
            let deadline = Instant::now() + PATIENCE;
            while greeted_by(bridge_failover).as_deref() != Some("a")
                || greeted_by(haproxy_failover).as_deref() != Some("a")
            {
                anyhow::ensure!(Instant::now() < deadline, "the proxies did not return to a");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        running_a.take().expect("a runs").abort();
        let killed = Instant::now();
        let bridge_wait = std::thread::spawn(move || time_until_greeted(bridge_failover, "b", killed));
        let haproxy_wait = std::thread::spawn(move || time_until_greeted(haproxy_failover, "b", killed));
        ours_failover.push(millis(
            bridge_wait
                .join()
                .expect("a waiter")
                .context("the bridge never reached b")?,
        ));
        theirs_failover.push(millis(
            haproxy_wait
                .join()
                .expect("a waiter")
                .context("HAProxy never reached b")?,
        ));
    }
    println!(
        "  failover (default checks): bridge {} ms, HAProxy {} ms   (target bridge <= 2000 ms -> {})",
        list(&ours_failover, 0),
        list(&theirs_failover, 0),
        verdict(median(&ours_failover) <= 2000.0)
    );

    drop(haproxy);
    host.stop()?;
    Ok(())
}
