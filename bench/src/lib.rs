//! Shared pieces of the benchmarks: latency summaries, a keep-alive HTTP
//! client for a host, and making a component's bytes unique without changing
//! its code (so the compile cache misses).

use std::time::Duration;

pub mod browser;
pub mod ports;

/// Median, p99 and count of a set of latencies.
pub struct Summary {
    pub count: usize,
    pub median: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn summarize(samples: &mut [Duration]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let at = |quantile: f64| samples[((samples.len() - 1) as f64 * quantile).round() as usize];
    Summary {
        count: samples.len(),
        median: at(0.5),
        p99: at(0.99),
        max: *samples.last().unwrap(),
    }
}

pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Appends a custom section holding `nonce` to a component. The code is
/// unchanged, but the bytes (and so the content hash) differ, which forces a
/// full compile: a cache miss as a real new version would cause.
pub fn with_nonce(component: &[u8], nonce: u64) -> Vec<u8> {
    let name = b"hivemind-bench-nonce";
    let mut payload = Vec::new();
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name);
    payload.extend_from_slice(&nonce.to_le_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    leb128(&mut bytes, payload.len() as u64);
    bytes.extend_from_slice(&payload);
    bytes
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Fails, naming the Debian packages, unless every `(tool, package)` is on
/// the PATH (bench/run installs them).
pub fn require_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map_or(true, |output| output.stdout.is_empty())
        })
        .map(|(_, package)| *package)
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "missing tools; bench/run installs them (Debian packages {})",
        missing.join(", ")
    );
    Ok(())
}

/// Moves this process, and every process and thread it starts from here on,
/// into a network namespace of its own whose loopback offers connect() the
/// whole port range (1024–65535). On the machine's loopback, connect() to
/// one address gets about 14,000 ports a second (half of the default
/// range, each free again a second after its TIME_WAIT), which caps every
/// path's new-connection rate at the same figure and hides how the
/// proxies differ. Call it first in `main`; needs root (CAP_SYS_ADMIN) and
/// `ip` (iproute2).
pub fn own_network_namespace() -> anyhow::Result<()> {
    // SAFETY: unshare takes flags only; it moves the calling thread, which
    // is the only one yet, so everything started later follows it.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "cannot make a network namespace for the bench ({}); run it as root",
            std::io::Error::last_os_error()
        );
    }
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|error| anyhow::anyhow!("ip (Debian package iproute2): {error}"))?;
    anyhow::ensure!(status.success(), "`ip link set lo up` failed in the bench's namespace");
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
        .map_err(|error| anyhow::anyhow!("cannot widen the namespace's ephemeral ports: {error}"))?;
    Ok(())
}

/// The middle value; of an even count, the mean of the two middle ones
/// (taking either would lean the verdict of a ratio one way).
pub fn median(values: &[f64]) -> f64 {
    let sorted = sorted(values);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// The values a quarter of the way in from each end: the middle half of
/// the values lies between them, as many below the first as above the
/// second.
pub fn middle_half(values: &[f64]) -> (f64, f64) {
    let sorted = sorted(values);
    let quarter = sorted.len() / 4;
    (sorted[quarter], sorted[sorted.len() - 1 - quarter])
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// Each round's figure, `a / b / c`.
pub fn list(values: &[f64], digits: usize) -> String {
    values
        .iter()
        .map(|value| format!("{value:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// How a figure compares with its target, in the words the README uses.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// CPU time (user + system) process `pid` has used so far, from /proc.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat has no command name"))?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The CLI's API client: blocking, keep-alive.
pub use hivemind::cli::Client as Api;

/// The benches' ports, below the range the tests use, so a bench beside
/// them picks other ones.
const BENCH_PORTS: std::ops::Range<u16> = 15_000..20_000;

/// A loopback port free for both TCP and UDP now, outside the ephemeral
/// range (see [`ports`]). Each call gives another port.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    ports::free_port_in(BENCH_PORTS, &NEXT)
}

/// Arguments of `hivemind up` for one bootstrap voter of a cluster on
/// loopback whose voters' transports are `peers`.
pub fn bootstrap_args(
    data_dir: &std::path::Path,
    name: &str,
    api: &str,
    transport: &str,
    peers: &[String],
) -> Vec<String> {
    [
        "--data-dir",
        &data_dir.display().to_string(),
        "up",
        "--no-bundled-roles",
        "--node-name",
        name,
        "--api",
        api,
        "--transport",
        transport,
        "--bootstrap",
        "--peers",
        &peers.join(","),
    ]
    .map(String::from)
    .to_vec()
}

/// Arguments of `hivemind up` for a one-node host in `data_dir` on
/// ephemeral loopback ports, without the bundled roles, then `extra`.
pub fn one_node_args(data_dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let data = data_dir.display().to_string();
    let mut args: Vec<String> = [
        "--data-dir",
        &data,
        "up",
        "--no-bundled-roles",
        "--api",
        "127.0.0.1:0",
        "--transport",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

/// A `hivemind up` process started from the binary next to this benchmark.
pub struct HostProcess {
    pub child: std::process::Child,
    pub api: Api,
    pub data_dir: std::path::PathBuf,
}

/// The cluster secret the benchmarks' hosts share.
pub const BENCH_SECRET: &str = "bench-cluster-secret-0123456789";

/// A `hivemind up` process whose API may not answer yet.
pub struct SpawnedHost {
    child: std::process::Child,
    data_dir: std::path::PathBuf,
}

impl SpawnedHost {
    /// Waits until the host's API answers.
    pub fn wait_api(self) -> anyhow::Result<HostProcess> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let (Ok(address), Ok(token)) = (
                std::fs::read_to_string(self.data_dir.join("api.addr")),
                std::fs::read_to_string(self.data_dir.join("token")),
            ) {
                let api = Api::new(address.trim(), token.trim());
                if api.get("/v1/status").is_ok() {
                    return Ok(HostProcess {
                        child: self.child,
                        api,
                        data_dir: self.data_dir,
                    });
                }
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "hivemind did not come up in {}",
                self.data_dir.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A benchmark that stops early (an error, a panic) must not leave its
/// hosts running to load the next measurement.
impl Drop for HostProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl HostProcess {
    /// Starts `hivemind up` on `data_dir` and waits until its API answers.
    pub fn start(data_dir: &std::path::Path) -> anyhow::Result<HostProcess> {
        let data = data_dir.display().to_string();
        let args = [
            "--data-dir",
            &data,
            "up",
            "--api",
            "127.0.0.1:0",
            "--transport",
            "127.0.0.1:0",
        ]
        .map(String::from);
        HostProcess::spawn(data_dir, &args)?.wait_api()
    }

    /// Starts `hivemind ARGS...` (which name `data_dir` with `--data-dir`)
    /// without waiting for its API (bootstrap voters answer only once all
    /// of them run).
    pub fn spawn(data_dir: &std::path::Path, args: &[String]) -> anyhow::Result<SpawnedHost> {
        let binary = std::env::current_exe()?.with_file_name("hivemind");
        let _ = std::fs::remove_file(data_dir.join("api.addr"));
        let child = std::process::Command::new(&binary)
            .args(args)
            .env("HIVEMIND_CLUSTER_SECRET", BENCH_SECRET)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot start {}: {error}; build it with cargo build --release -p hivemind",
                    binary.display()
                )
            })?;
        Ok(SpawnedHost {
            child,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Waits until every role is running.
    pub fn wait_roles_running(&self, expected: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let roles = self.api.get_json("/v1/roles")?;
            let roles = roles.as_array().cloned().unwrap_or_default();
            if roles.len() >= expected && roles.iter().all(|role| role["state"] == "running") {
                return Ok(());
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "roles did not start: {roles:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resident set size in MiB, from /proc.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc status"))?;
        Ok(kib / 1024.0)
    }

    /// SIGTERM, then wait.
    pub fn stop(mut self) -> anyhow::Result<()> {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        Ok(())
    }
}

/// Copies `wasm` into `roles_dir/NAME.wasm` through a temporary file.
pub fn drop_role(roles_dir: &std::path::Path, name: &str, wasm: &[u8]) -> anyhow::Result<()> {
    let temp = roles_dir.join(format!(".{name}.wasm.tmp"));
    std::fs::write(&temp, wasm)?;
    std::fs::rename(&temp, roles_dir.join(format!("{name}.wasm")))?;
    Ok(())
}

/// The SHA-256 of `bytes` in hex, as the API shows role digests.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A peer process (dnsmasq, HAProxy, ...), killed when dropped, so a bench
/// that stops early leaves none behind.
pub struct Peer(pub std::process::Child);

impl Peer {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

/// A process that keeps core `core` busy (a shell spinning), as another
/// program on the machine would, until dropped.
pub fn busy_core(core: u32) -> anyhow::Result<Peer> {
    std::process::Command::new("taskset")
        .args(["-c", &core.to_string(), "sh", "-c", "while :; do :; done"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(Peer)
        .map_err(|error| anyhow::anyhow!("taskset (Debian package util-linux): {error}"))
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::{median, middle_half};

    /// An even count's median lies between its two middle values, so a
    /// ratio's verdict leans neither way.
    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    /// Of eight values, the middle half is the third to the sixth: two
    /// below it and two above.
    #[test]
    fn middle_half_leaves_a_quarter_out_at_each_end() {
        let values = [8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0];
        assert_eq!(middle_half(&values), (3.0, 6.0));
    }
}
