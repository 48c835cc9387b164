//! Helpers shared by the integration tests: a real host started in-process
//! on port 0 with its own data directory, an HTTP client for its API, role
//! files dropped into its roles directory the way users do (temp + rename),
//! and the real `hivemind` binary for CLI tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hivemind::{Daemon, HostConfig};
use serde_json::{Value, json};

pub use hivemind_role_artifacts as artifacts;

pub mod backend;

/// How long a test waits for something the host does in the background.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct TestHost {
    pub daemon: Option<Daemon>,
    pub dir: tempfile::TempDir,
    pub config: HostConfig,
}

impl TestHost {
    pub async fn start() -> TestHost {
        let dir = tempfile::tempdir().unwrap();
        let config = HostConfig::for_tests(dir.path());
        Self::start_with(dir, config).await
    }

    pub async fn start_with(dir: tempfile::TempDir, config: HostConfig) -> TestHost {
        let daemon = Daemon::start(config.clone()).await.expect("host starts");
        TestHost {
            daemon: Some(daemon),
            dir,
            config,
        }
    }

    /// Stops the host and starts it again on the same data directory.
    pub async fn restart(&mut self) {
        self.daemon.take().unwrap().shutdown().await;
        self.daemon = Some(Daemon::start(self.config.clone()).await.expect("host restarts"));
    }

    pub async fn stop(mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.shutdown().await;
        }
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn roles_dir(&self) -> PathBuf {
        self.config.roles_dir.clone()
    }

    pub fn api(&self) -> Api {
        Api::new(&self.daemon().api_addr.to_string(), &self.daemon().token)
    }

    /// Drops `wasm` (and an optional manifest) into the roles directory as
    /// NAME.wasm via a temporary file and a rename.
    pub fn drop_role(&self, name: &str, wasm: &[u8], manifest: Option<&str>) {
        let dir = self.roles_dir();
        if let Some(manifest) = manifest {
            atomic_write(&dir.join(format!("{name}.toml")), manifest.as_bytes());
        }
        atomic_write(&dir.join(format!("{name}.wasm")), wasm);
    }

    /// Waits until `check` holds for the role's info (or the role is absent
    /// and `check` accepts `Value::Null`).
    pub async fn wait_role(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let api = self.api();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let info = api.role_info(name).await;
            if check(&info) {
                return info;
            }
            if Instant::now() > deadline {
                panic!("role {name}: gave up waiting for {what}; last info: {info:#}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a version with exactly these bytes serves.
    pub async fn wait_live(&self, name: &str, wasm: &[u8]) -> Value {
        let digest = sha256_hex(wasm);
        self.wait_role(name, &format!("digest {}", &digest[..12]), |info| {
            info["digest"].as_str() == Some(digest.as_str()) && info["loading"].is_null()
        })
        .await
    }

    /// Waits until these bytes were rejected and returns the error.
    pub async fn wait_rejected(&self, name: &str, wasm: &[u8]) -> String {
        let digest = sha256_hex(wasm);
        let info = self
            .wait_role(name, "a rejection", |info| {
                info["last_error_digest"].as_str() == Some(digest.as_str()) && info["loading"].is_null()
            })
            .await;
        info["last_error"].as_str().unwrap_or_default().to_string()
    }
}

pub fn atomic_write(path: &Path, bytes: &[u8]) {
    let name = path.file_name().unwrap().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temp, bytes).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// `wasm` grown to exactly `len` bytes by a custom section at its end,
/// which every loader skips: two different roles of one length.
pub fn padded_to(wasm: &[u8], len: usize) -> Vec<u8> {
    fn leb128(mut value: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                bytes.push(byte);
                return bytes;
            }
            bytes.push(byte | 0x80);
        }
    }
    let extra = len.checked_sub(wasm.len()).expect("room for a section");
    for payload in (0..extra).rev() {
        let mut body = leb128(3);
        body.extend_from_slice(b"pad");
        body.resize(body.len() + payload, 0);
        let mut section = vec![0u8];
        section.extend(leb128(body.len()));
        section.extend(body);
        if section.len() == extra {
            let mut padded = wasm.to_vec();
            padded.extend(section);
            return padded;
        }
    }
    panic!("no custom section is exactly {extra} bytes");
}

/// Sets `path`'s modification time, as `cp -p`, `rsync -a` or a pinned
/// `SOURCE_DATE_EPOCH` leave it.
pub fn set_mtime(path: &Path, time: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|file| file.set_modified(time))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
}

pub fn probe() -> Vec<u8> {
    read(artifacts::ROLE_PROBE)
}

pub fn probe_v2() -> Vec<u8> {
    read(artifacts::ROLE_PROBE_V2)
}

pub fn misbehave() -> Vec<u8> {
    read(artifacts::ROLE_MISBEHAVE)
}

/// The CLI's API client, used from async tests through `spawn_blocking`.
#[derive(Clone)]
pub struct Api {
    address: String,
    client: hivemind::cli::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| json!({ "raw": self.text() }))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

impl Api {
    pub fn new(address: &str, token: &str) -> Api {
        Api {
            address: address.to_string(),
            client: hivemind::cli::Client::new(address, token),
        }
    }

    /// The same host with another token; `None` sends none.
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api::new(&self.address, token.unwrap_or(""))
    }

    pub async fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Reply {
        let (client, method, path) = (self.client.clone(), method.to_string(), path.to_string());
        tokio::task::spawn_blocking(move || {
            let (status, body) = client
                .send(&method, &path, &body, "application/json")
                .expect("the host answers");
            Reply { status, body }
        })
        .await
        .unwrap()
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, Vec::new()).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, serde_json::to_vec(&body).unwrap()).await
    }

    /// `hivemind role NAME CMD ARGS...` over HTTP.
    pub async fn role(&self, name: &str, command: &str, args: &[&str]) -> Reply {
        self.post(&format!("/v1/roles/{name}/{command}"), json!({ "args": args }))
            .await
    }

    pub async fn role_info(&self, name: &str) -> Value {
        let reply = self.get(&format!("/v1/roles/{name}")).await;
        if reply.status == 404 { Value::Null } else { reply.json() }
    }

    pub async fn emit(&self, kind: &str, key: &str) -> u64 {
        let reply = self
            .post("/v1/events", json!({ "kind": kind, "key": key, "payload": {} }))
            .await;
        assert_eq!(reply.status, 200, "emit {kind}: {}", reply.text());
        reply.json()["seq"].as_u64().unwrap()
    }
}

/// The real `hivemind` binary.
pub fn hivemind_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hivemind")
}

/// Runs the CLI against `host` and returns its output.
pub async fn cli(host: &TestHost, args: &[&str]) -> Output {
    let mut command = Command::new(hivemind_bin());
    command.arg("--data-dir").arg(host.data_dir()).args(args);
    command.env_remove("HIVEMIND_API").env_remove("HIVEMIND_TOKEN");
    tokio::task::spawn_blocking(move || command.output().expect("hivemind runs"))
        .await
        .unwrap()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[path = "../../bench/src/ports.rs"]
mod ports;

/// The tests' ports, below the kernel's ephemeral range (see `ports`): a
/// port the kernel picked for `bind(0)` could be taken by any connection
/// made before a node bound it, and the node then failed to start.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free for both TCP and UDP now (a node's transport uses
/// both), outside the ephemeral range. Each call gives another port.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    ports::free_port_in(TEST_PORTS, &NEXT)
}

/// A role manifest with one UDP listener, `name`, on a free loopback port;
/// and the port.
pub fn udp_listener_manifest(name: &str) -> (String, u16) {
    let port = free_port();
    (
        format!("[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n"),
        port,
    )
}

/// Polls `probe` until it gives a value, for up to [`PATIENCE`].
pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes the bundled roles into `node`'s roles directory before its first
/// start, as `hivemind up` does, with the dns role's listeners on a port of
/// its own (several nodes share this machine); returns that port.
pub fn install_bundled_roles(node: &NodeProcess) -> u16 {
    let roles_dir = node.dir.join("roles");
    std::fs::create_dir_all(&roles_dir).unwrap();
    let dns_port = free_port();
    for (name, wasm, manifest) in artifacts::BUNDLED {
        if let Some(manifest) = manifest {
            let manifest = manifest.replace("127.0.0.1:8600", &format!("127.0.0.1:{dns_port}"));
            std::fs::write(roles_dir.join(format!("{name}.toml")), manifest).unwrap();
        }
        atomic_write(&roles_dir.join(format!("{name}.wasm")), wasm);
    }
    dns_port
}

/// Writes `config` beside the node's data directory and passes it.
pub fn use_config(node: &mut NodeProcess, config: &str) {
    let path = node.dir.with_extension("toml");
    std::fs::write(&path, config).unwrap();
    node.args.extend(["--config".to_string(), path.display().to_string()]);
}

/// The cluster secret the process tests use.
pub const TEST_SECRET: &str = "test-cluster-secret-0123456789";

/// One `hivemind up` process of a multi-node test, with its own data
/// directory and ports; killed when dropped.
pub struct NodeProcess {
    pub name: String,
    pub dir: PathBuf,
    pub api: String,
    pub transport: String,
    /// Arguments after the common ones (`--bootstrap --peers ...`, `--join ...`).
    pub args: Vec<String>,
    /// A command the process runs under (`ip netns exec NS`), if any.
    pub wrapper: Vec<String>,
    child: Option<std::process::Child>,
}

impl NodeProcess {
    pub fn new(root: &Path, name: &str, args: Vec<String>) -> NodeProcess {
        NodeProcess {
            name: name.to_string(),
            dir: root.join(name),
            api: format!("127.0.0.1:{}", free_port()),
            transport: format!("127.0.0.1:{}", free_port()),
            args,
            wrapper: Vec::new(),
            child: None,
        }
    }

    /// A `Command` for the `hivemind` binary under this node's wrapper.
    fn command(&self) -> Command {
        match self.wrapper.split_first() {
            None => Command::new(hivemind_bin()),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(hivemind_bin());
                command
            }
        }
    }

    /// Starts the process (again); its output is appended to `NAME.log`
    /// beside its data directory.
    pub fn start(&mut self) {
        let mut args: Vec<String> = ["--no-bundled-roles", "--node-name", &self.name, "--api", &self.api]
            .into_iter()
            .chain(["--transport", &self.transport])
            .map(String::from)
            .collect();
        args.extend(self.args.iter().cloned());
        self.spawn(&args);
    }

    /// Starts the process with `hivemind --data-dir DIR up ARGS` and no
    /// other flags, as an operator restarting a node by hand would.
    pub fn start_plain(&mut self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        self.spawn(&args);
    }

    fn spawn(&mut self, up_args: &[String]) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = self
            .command()
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("up")
            .args(up_args)
            .env("HIVEMIND_CLUSTER_SECRET", TEST_SECRET)
            .env("RUST_LOG", "info,openraft=error")
            .env("HIVEMIND_GOSSIP_PRESET", "fast")
            .env_remove("HIVEMIND_API")
            .env_remove("HIVEMIND_TOKEN")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("hivemind starts");
        self.child = Some(child);
    }

    /// `kill -9`: no shutdown, nothing flushed but what was durable.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit after SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id, while running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The descriptors the process holds now, by number.
    pub fn descriptors(&self) -> Vec<u32> {
        let mut numbers: Vec<u32> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        numbers.sort_unstable();
        numbers
    }

    /// The process's soft limit on open files.
    pub fn descriptor_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let line = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }

    /// Sets the process's soft limit on open files (`prlimit --pid`).
    pub fn set_descriptor_limit(&self, soft: u64) {
        let status = Command::new("prlimit")
            .args(["--pid", &self.pid().to_string(), &format!("--nofile={soft}:")])
            .status()
            .expect("prlimit (util-linux) runs");
        assert!(status.success(), "prlimit --nofile={soft}: on {}", self.name);
    }

    /// SIGSTOP: the process stays but answers nothing, as a hung or
    /// cut-off machine would.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// Whether the process exited by itself, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// A client of this node's API (the token file appears at start-up).
    pub fn client(&self) -> hivemind::cli::Client {
        let token_path = self.dir.join("token");
        let deadline = Instant::now() + PATIENCE;
        let token = loop {
            if let Ok(token) = std::fs::read_to_string(&token_path)
                && !token.trim().is_empty()
            {
                break token.trim().to_string();
            }
            assert!(Instant::now() < deadline, "{} wrote no token", self.name);
            std::thread::sleep(Duration::from_millis(20));
        };
        hivemind::cli::Client::new(&self.api, &token)
    }

    /// `/v1/status`, or `None` while the API does not answer.
    pub fn status(&self) -> Option<Value> {
        if !self.is_running() {
            return None;
        }
        let (status, body) = self.client().send("GET", "/v1/status", b"", "application/json").ok()?;
        (status == 200).then(|| serde_json::from_slice(&body).ok()).flatten()
    }

    /// Events of `kind` as (seq, key), in order.
    pub fn events(&self, kind: &str) -> Vec<(u64, String)> {
        let mut all = Vec::new();
        let mut since = 0;
        loop {
            let path = format!("/v1/events?kind={kind}&since={since}&limit=10000");
            let (status, body) = self.client().send("GET", &path, b"", "application/json").unwrap();
            assert_eq!(status, 200, "{}: {}", self.name, String::from_utf8_lossy(&body));
            let page: Vec<Value> = serde_json::from_slice(&body).unwrap();
            if page.is_empty() {
                return all;
            }
            for event in page {
                since = event["seq"].as_u64().unwrap();
                all.push((since, event["key"].as_str().unwrap().to_string()));
            }
        }
    }

    /// Appends one event through this node; `Ok(seq)` when acknowledged.
    pub fn emit(&self, kind: &str, key: &str) -> Result<u64, String> {
        self.emit_event(&json!({ "kind": kind, "key": key }))
    }

    /// Appends `event` (kind, key, payload) through this node; `Ok(seq)`
    /// when acknowledged.
    pub fn emit_event(&self, event: &Value) -> Result<u64, String> {
        let body = serde_json::to_vec(event).unwrap();
        match self.client().send("POST", "/v1/events", &body, "application/json") {
            Ok((200, reply)) => Ok(serde_json::from_slice::<Value>(&reply).unwrap()["seq"]
                .as_u64()
                .unwrap()),
            Ok((status, reply)) => Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&reply))),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Waits until this node's status satisfies `check`.
    pub fn wait_status(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.status()
                && check(&status)
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what}; last status {:#?}",
                self.name,
                self.status().map(|status| status["cluster"].clone())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a `hivemind` client command against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .env_remove("HIVEMIND_API")
            .env_remove("HIVEMIND_TOKEN")
            .output()
            .expect("hivemind runs")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
        // A failed test's process output goes with the temp directory:
        // print its end, which usually says why.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            eprintln!("---- the end of {}'s output ----\n{tail}", self.name);
        }
    }
}

/// How much of a node's output a failed test prints.
const LOG_TAIL_LINES: usize = 40;

/// Several `hivemind up` processes on loopback.
pub struct ProcessCluster {
    // Fields drop in order: the nodes first, so a failed test can still
    // print their logs from `root` before it is deleted.
    pub nodes: Vec<NodeProcess>,
    pub root: tempfile::TempDir,
}

impl ProcessCluster {
    /// `count` voters formed with `--bootstrap --peers`, all started.
    pub fn bootstrap(count: usize) -> ProcessCluster {
        Self::bootstrap_configured(count, |_, _| {})
    }

    /// Like [`Self::bootstrap`], with `configure(index, node)` called on
    /// each node before it starts (to add arguments or write files).
    pub fn bootstrap_configured(count: usize, mut configure: impl FnMut(usize, &mut NodeProcess)) -> ProcessCluster {
        let root = tempfile::tempdir().unwrap();
        let mut nodes: Vec<NodeProcess> = (1..=count)
            .map(|i| NodeProcess::new(root.path(), &format!("n{i}"), Vec::new()))
            .collect();
        let peers: Vec<String> = nodes.iter().map(|node| node.transport.clone()).collect();
        for (index, node) in nodes.iter_mut().enumerate() {
            node.args = vec!["--bootstrap".into(), "--peers".into(), peers.join(",")];
            configure(index, node);
            node.start();
        }
        let cluster = ProcessCluster { root, nodes };
        cluster.wait_healthy();
        cluster
    }

    /// Adds a node that joins through `via` with `extra` arguments (a token,
    /// say), started.
    pub fn join(&mut self, via: usize, extra: &[&str]) -> usize {
        let name = format!("n{}", self.nodes.len() + 1);
        let mut args = vec!["--join".to_string(), self.nodes[via].transport.clone()];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let mut node = NodeProcess::new(self.root.path(), &name, args);
        node.start();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Waits until every running node is healthy and they agree on a leader;
    /// returns the leader's index.
    pub fn wait_healthy(&self) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(leader) = self.agreed_leader() {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy: {:#?}",
                self.nodes
                    .iter()
                    .map(|node| node.status().map(|status| status["cluster"].clone()))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agreed_leader(&self) -> Option<usize> {
        let mut leader = None;
        for node in self.nodes.iter().filter(|node| node.is_running()) {
            let status = node.status()?;
            if status["cluster"]["health"] != "healthy" {
                return None;
            }
            let id = status["cluster"]["leader"].as_str()?.to_string();
            if leader.get_or_insert(id.clone()) != &id {
                return None;
            }
        }
        let leader = leader?;
        self.nodes.iter().position(|node| {
            node.status()
                .is_some_and(|status| status["node"]["id"].as_str() == Some(leader.as_str()))
        })
    }

    /// Waits until every running node has the same events of `kind`, at
    /// least `count` of them, and returns them.
    pub fn converged_events(&self, kind: &str, count: usize) -> Vec<(u64, String)> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen: Vec<Vec<(u64, String)>> = self
                .nodes
                .iter()
                .filter(|node| node.is_running())
                .map(|node| node.events(kind))
                .collect();
            if seen[0].len() >= count && seen.iter().all(|events| events == &seen[0]) {
                return seen[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "the nodes did not converge on {count} events of {kind}: {:?}",
                seen.iter().map(Vec::len).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A tmpfs of `size` bytes mounted at a directory for one test, so the
/// test can fill a node's disk and free it again; unmounted when dropped
/// (lazily: a node still running keeps its files until it exits).
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount runs");
        assert!(
            output.status.success(),
            "this test mounts a tmpfs at {} and needs root (CAP_SYS_ADMIN): {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Takes every free byte with a file of its own (`.filler`) and
    /// returns how many it took.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path.join(".filler")).unwrap();
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut taken = 0;
        loop {
            match filler.write(&chunk) {
                Ok(0) => break,
                Ok(written) => taken += written as u64,
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(error) => panic!("filling {}: {error}", self.path.display()),
            }
        }
        taken
    }

    /// Frees what [`Tmpfs::fill`] took.
    pub fn free(&self) {
        std::fs::remove_file(self.path.join(".filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
