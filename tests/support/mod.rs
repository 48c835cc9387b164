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
