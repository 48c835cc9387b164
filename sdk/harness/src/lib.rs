//! Runs a Hivemind role in a sandboxed host, for role authors' tests in any
//! language: give it events, requests and packets; see what it answered,
//! emitted, logged, wrote and stored. `hivemind roles test` is this on the
//! command line; in a Rust role's `cargo test`:
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use hivemind_harness::Harness;
//!
//! let wasm = std::fs::read("target/wasm32-wasip2/release/my_role.wasm")?;
//! let mut role = Harness::load("my-role", &wasm, None).await?;
//! role.event("service.up", "web@n1", br#"{"port": 80}"#).await?;
//! let reply = role.request("GET", "/counts", b"").await?;
//! assert_eq!(reply.status, 200);
//! role.reload().await?; // fresh instances, init again, state kept
//! # Ok(())
//! # }
//! ```
//!
//! The sandbox is the real runtime (same compiler, limits, traps and
//! manifest) behind a host that keeps everything in memory: the log holds
//! the events given and those the role emits; state is a map; grants are
//! checked as a real host checks them, but a granted `write-file` is
//! recorded instead of written, and `exec`, `check` and `call` answer
//! `unavailable` (nothing leaves the sandbox).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hivemind_runtime::manifest::Manifest;
use hivemind_runtime::{
    Description, Event, ExecOutput, HealthCheck, HostError, Level, LoadedRole, MAX_COUNTER_SERIES, Node, Request,
    Response, RoleFailure, RoleHost, Runtime, RuntimeConfig,
};
use serde::Serialize;

/// The node id the sandbox reports as its own (`self-node`, event source).
pub const NODE_ID: &str = "harness";

/// An event the role emitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Emitted {
    pub seq: u64,
    pub kind: String,
    pub key: String,
    /// The payload as text (lossy when it is not UTF-8).
    pub payload: String,
}

/// A line the role logged (through `host.log`, or on stdout/stderr).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Logged {
    pub level: String,
    pub message: String,
}

/// Everything the role did to the sandbox so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    pub emitted: Vec<Emitted>,
    pub logged: Vec<Logged>,
    /// Files `write-file` would have written, by path below the output
    /// directory.
    pub written: BTreeMap<String, String>,
    /// Programs `exec` was asked to run (refused in the sandbox).
    pub exec_requests: Vec<String>,
    /// Failures the runtime reported (traps, init errors, ...).
    pub failures: Vec<String>,
    /// What `count` added up, by series: `NAME{label="value",...}`.
    pub counters: BTreeMap<String, u64>,
}

/// The sandbox's side of the role's imports: a [`RoleHost`] that keeps
/// everything in memory. [`Harness`] runs roles on it; benchmarks that drive
/// `hivemind_runtime` directly use it as their host.
pub struct SandboxHost {
    name: String,
    manifest: Manifest,
    log: Mutex<Vec<Event>>,
    state: Mutex<BTreeMap<String, Vec<u8>>>,
    record: Mutex<Record>,
}

impl SandboxHost {
    /// A host for role `name` with the grants and config of `manifest`.
    pub fn new(name: &str, manifest: Manifest) -> SandboxHost {
        SandboxHost {
            name: name.to_string(),
            manifest,
            log: Mutex::new(Vec::new()),
            state: Mutex::new(BTreeMap::new()),
            record: Mutex::new(Record::default()),
        }
    }

    fn append(&self, kind: String, key: String, source: String, payload: Vec<u8>) -> Event {
        let mut log = self.log.lock().unwrap();
        let event = Event {
            seq: log.last().map_or(1, |last| last.seq + 1),
            epoch: 1,
            kind,
            key,
            source,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |now| now.as_millis() as u64),
            payload,
        };
        log.push(event.clone());
        event
    }
}

fn unavailable<T>(what: &str) -> Result<T, HostError> {
    Err(HostError::Unavailable(format!("the test harness {what}")))
}

#[async_trait::async_trait]
impl RoleHost for SandboxHost {
    fn role_name(&self) -> &str {
        &self.name
    }

    fn count(&self, name: &str, labels: &[(String, String)], delta: u64) -> Result<(), HostError> {
        let mut labels: Vec<String> = labels
            .iter()
            .map(|(label, value)| format!("{label}={value:?}"))
            .collect();
        // One series whatever order the labels come in, as in the daemon.
        labels.sort();
        let series = format!("{name}{{{}}}", labels.join(","));
        let mut record = self.record.lock().unwrap();
        if !record.counters.contains_key(&series) && record.counters.len() >= MAX_COUNTER_SERIES {
            return Err(HostError::Overloaded(format!(
                "counter {name:?}: the role already has {MAX_COUNTER_SERIES} series; label by a bounded set of values"
            )));
        }
        let total = record.counters.entry(series).or_default();
        *total = total.saturating_add(delta);
        Ok(())
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.record.lock().unwrap().logged.push(Logged {
            level: level.into(),
            message: message.into(),
        });
    }

    async fn emit(&self, kind: String, key: String, payload: Vec<u8>) -> Result<u64, HostError> {
        self.manifest.grants.allow_emit(&self.name, &kind)?;
        let event = self.append(kind, key, NODE_ID.into(), payload);
        self.record.lock().unwrap().emitted.push(Emitted {
            seq: event.seq,
            kind: event.kind,
            key: event.key,
            payload: String::from_utf8_lossy(&event.payload).into_owned(),
        });
        Ok(event.seq)
    }

    async fn events_since(&self, after: u64, kind_prefix: String, limit: u32) -> Result<Vec<Event>, HostError> {
        let log = self.log.lock().unwrap();
        Ok(log
            .iter()
            .filter(|event| event.seq > after && event.kind.starts_with(&kind_prefix))
            .take(limit.clamp(1, 10_000) as usize)
            .cloned()
            .collect())
    }

    fn nodes(&self, role: Option<&str>, _healthy_only: bool) -> Vec<Node> {
        let node = self.self_node();
        if role.is_none_or(|role| role == self.name) {
            vec![node]
        } else {
            Vec::new()
        }
    }

    fn self_node(&self) -> Node {
        Node {
            id: NODE_ID.into(),
            name: NODE_ID.into(),
            address: "127.0.0.1:7946".into(),
            roles: vec![self.name.clone()],
            healthy: true,
        }
    }

    fn config_json(&self) -> String {
        self.manifest.config_json()
    }

    async fn call(&self, _node: String, _role: String, _request: Request) -> Result<Response, HostError> {
        unavailable("has no other roles or nodes to call")
    }

    async fn write_file(&self, path: String, contents: Vec<u8>) -> Result<(), HostError> {
        self.manifest.grants.output_dir(&self.name)?;
        self.record
            .lock()
            .unwrap()
            .written
            .insert(path, String::from_utf8_lossy(&contents).into_owned());
        Ok(())
    }

    async fn exec(&self, program: String, args: Vec<String>, _timeout_ms: u32) -> Result<ExecOutput, HostError> {
        let mut argv = vec![program];
        argv.extend(args);
        self.manifest.grants.allow_exec(&self.name, &argv)?;
        self.record.lock().unwrap().exec_requests.push(argv.join(" "));
        unavailable("runs no programs (the request is recorded)")
    }

    async fn check(&self, _target: HealthCheck, _timeout_ms: u32) -> Result<u32, HostError> {
        unavailable("runs no health checks")
    }

    async fn state_get(&self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.state.lock().unwrap().get(&key).cloned())
    }

    async fn state_set(&self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        self.state.lock().unwrap().insert(key, value);
        Ok(())
    }

    async fn state_delete(&self, key: String) -> Result<(), HostError> {
        self.state.lock().unwrap().remove(&key);
        Ok(())
    }

    async fn state_keys(&self, prefix: String) -> Result<Vec<String>, HostError> {
        let state = self.state.lock().unwrap();
        Ok(state.keys().filter(|key| key.starts_with(&prefix)).cloned().collect())
    }

    fn report(&self, failure: RoleFailure) {
        self.record.lock().unwrap().failures.push(failure.message);
    }
}

/// A role loaded in a sandboxed host.
pub struct Harness {
    runtime: Runtime,
    bytes: Vec<u8>,
    host: Arc<SandboxHost>,
    role: LoadedRole,
    /// Keeps the compile cache for the harness's lifetime.
    _cache: tempfile::TempDir,
}

impl Harness {
    /// Compiles `wasm`, instantiates it and runs `describe` and `init`, with
    /// the limits, grants and config of `manifest` (TOML, as `NAME.toml`).
    pub async fn load(name: &str, wasm: &[u8], manifest: Option<&str>) -> anyhow::Result<Harness> {
        let manifest = match manifest {
            Some(text) => {
                Manifest::parse(Path::new(&format!("{name}.toml")), text, u64::MAX).map_err(anyhow::Error::msg)?
            }
            None => Manifest::default(),
        };
        let cache = tempfile::tempdir().context("a temporary compile cache")?;
        let runtime = Runtime::new(RuntimeConfig::new(cache.path()))?;
        let host = Arc::new(SandboxHost::new(name, manifest));
        let role = start(&runtime, name, wasm, &host).await?;
        Ok(Harness {
            runtime,
            bytes: wasm.to_vec(),
            host,
            role,
            _cache: cache,
        })
    }

    /// What the role said about itself.
    pub fn description(&self) -> &Description {
        self.role.description()
    }

    /// Appends an event to the sandbox's log and, when the role subscribes
    /// to its kind, delivers it. `Ok(Err(_))` is the role's own refusal;
    /// `Err` a trap or a limit.
    pub async fn event(&mut self, kind: &str, key: &str, payload: &[u8]) -> anyhow::Result<Result<(), String>> {
        let event = self
            .host
            .append(kind.into(), key.into(), "test".into(), payload.to_vec());
        if !self.role.subscribes_to(kind) {
            return Ok(Ok(()));
        }
        Ok(self.role.on_event(&event).await?)
    }

    /// Sends a request (`path` below the role's prefix, with `?query` if
    /// any) and returns the role's response.
    pub async fn request(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Response> {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let request = Request {
            method: method.to_uppercase(),
            path: format!("/{}", path.trim_start_matches('/')),
            query: query.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_vec(),
        };
        Ok(self.role.on_request(&request).await?)
    }

    /// Hands a message to `on-packet` as if it came from `peer` on
    /// `listener`; returns the reply, if any.
    pub async fn packet(&self, listener: &str, peer: &str, data: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.packet_reply(listener, peer, data).await?.reply)
    }

    /// As [`Self::packet`], with whether the role let the host keep the
    /// reply for repeats of the datagram (`keep-reply`) and how.
    pub async fn packet_reply(
        &self,
        listener: &str,
        peer: &str,
        data: &[u8],
    ) -> anyhow::Result<hivemind_runtime::PacketReply> {
        Ok(self.role.on_packet(listener, peer, data).await?)
    }

    /// Runs `on-tick` once.
    pub async fn tick(&self) -> anyhow::Result<()> {
        Ok(self.role.on_tick().await?)
    }

    /// Loads the same bytes again as a host's reload does: fresh instances
    /// and `init` again; the state stays.
    pub async fn reload(&mut self) -> anyhow::Result<()> {
        self.role = start(&self.runtime, &self.host.name, &self.bytes, &self.host).await?;
        Ok(())
    }

    /// Loads new bytes as the next version of the role; the state stays.
    pub async fn upgrade(&mut self, wasm: &[u8]) -> anyhow::Result<()> {
        self.role = start(&self.runtime, &self.host.name, wasm, &self.host).await?;
        self.bytes = wasm.to_vec();
        Ok(())
    }

    /// What the role emitted, logged, wrote and was refused, so far.
    pub fn record(&self) -> Record {
        self.host.record.lock().unwrap().clone()
    }

    /// The role's state, values as text (lossy when not UTF-8).
    pub fn state(&self) -> BTreeMap<String, String> {
        self.host
            .state
            .lock()
            .unwrap()
            .iter()
            .map(|(key, value)| (key.clone(), String::from_utf8_lossy(value).into_owned()))
            .collect()
    }

    /// Sets a state value before the role runs, e.g. to test an upgrade
    /// from state an older version left.
    pub fn set_state(&self, key: &str, value: &[u8]) {
        self.host.state.lock().unwrap().insert(key.into(), value.to_vec());
    }
}

async fn start(runtime: &Runtime, name: &str, wasm: &[u8], host: &Arc<SandboxHost>) -> anyhow::Result<LoadedRole> {
    let compiled = runtime
        .compile(wasm)
        .with_context(|| format!("{name}: cannot compile"))?;
    let host_dyn: Arc<dyn RoleHost> = host.clone();
    runtime
        .load(name, compiled, host.manifest.role_limits(), host_dyn)
        .await
        .with_context(|| format!("{name}: cannot load"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rust_counter() -> Vec<u8> {
        std::fs::read(hivemind_role_artifacts::ROLE_RUST_COUNTER).unwrap()
    }

    /// Events reach the role, its answers come back, and its state is kept
    /// across a reload, as in a real host.
    #[tokio::test]
    async fn events_requests_and_reload() {
        let mut role = Harness::load("rust-counter", &rust_counter(), None).await.unwrap();
        assert_eq!(role.description().subscribes, ["service."]);
        for key in ["web@n1", "web@n2", "db@n1"] {
            role.event("service.up", key, b"{}").await.unwrap().unwrap();
        }
        role.event("node.joined", "n1", b"{}").await.unwrap().unwrap();
        let reply = role.request("GET", "/counts", b"").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&reply.body), r#"{"db":1,"web":2}"#);
        role.reload().await.unwrap();
        let reply = role.request("POST", "/counts", br#"{"args": ["web"]}"#).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&reply.body), r#"{"web":2}"#);
        assert_eq!(role.state()["count/web"], "2");
        assert!(
            role.record()
                .logged
                .iter()
                .any(|line| line.message.contains("counting 2 services")),
            "{:?}",
            role.record().logged
        );
    }

    /// Grants are checked as a real host checks them: without `grants.emit`
    /// an emit is refused with the fix named; with it, it is recorded.
    #[tokio::test]
    async fn emits_follow_the_manifest() {
        let events = std::fs::read(hivemind_role_artifacts::ROLE_HOST_EVENTS).unwrap();
        let manifest = "[config]\nservices = [{ name = \"web\", port = 80, check = \"none\" }]\n";
        let granted = Harness::load(
            "host-events",
            &events,
            Some(&format!("[grants]\nemit = [\"service.\"]\n{manifest}")),
        )
        .await
        .unwrap();
        granted.tick().await.unwrap();
        let emitted = granted.record().emitted;
        assert!(
            emitted
                .iter()
                .any(|event| event.kind == "service.up" && event.key.starts_with("web@")),
            "{emitted:?}"
        );

        let denied = Harness::load("host-events", &events, Some(manifest)).await.unwrap();
        denied.tick().await.unwrap();
        let record = denied.record();
        assert!(record.emitted.is_empty(), "{record:?}");
        assert!(
            record.logged.iter().any(|line| line.message.contains("grants.emit")),
            "{record:?}"
        );
    }
}
