//! [`RoleServices`]: the daemon's implementation of what a role's imports
//! do, with the role's manifest grants enforced here.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hivemind_runtime::{
    CallOutcome, Event, ExecOutput, Export, HealthCheck, HostError, Level, Node, Request, Response, RoleFailure,
    RoleHost,
};

use crate::log::{EventLog, LogError, NewEvent};
use crate::notify::Notifier;
use crate::registry::Registry;
use crate::roles::manager::RoleManager;
use crate::store::Store;
use hivemind_core::files::{Access, write_file};
use hivemind_runtime::manifest::Manifest;

/// Largest file a role may write: configs, not data.
const MAX_WRITE_BYTES: usize = 8 << 20;
/// Output kept from a program a role runs.
const MAX_EXEC_OUTPUT: usize = 1 << 20;
/// Longest a granted program may run.
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// A health check that takes longer than this is a failed one anyway.
const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The host part of a check's `host:port` target, as the grant names it;
/// `default_port` (if any) stands in for a missing port.
fn check_host_of(target: &str, default_port: &str) -> Result<String, HostError> {
    let invalid = || HostError::Invalid(format!("`{target}` is not HOST:PORT"));
    let (host, port) = match target.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => (host, port),
        _ if !default_port.is_empty() => (target, default_port),
        _ => return Err(invalid()),
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid());
    }
    Ok(host.trim_start_matches('[').trim_end_matches(']').to_string())
}

/// Everything a role's imports reach, shared by the daemon's subsystems.
#[derive(Clone)]
pub struct HostParts {
    pub log: Arc<dyn EventLog>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub connect: Arc<crate::connect::Connect>,
    /// Roles running here (name, version), kept by the role manager for
    /// the registry and gossip.
    pub local_roles: tokio::sync::watch::Sender<Vec<(String, String)>>,
    pub notifier: Arc<Notifier>,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
}

pub struct RoleServices {
    name: String,
    manifest: Manifest,
    config_json: String,
    parts: HostParts,
    manager: Weak<RoleManager>,
    metrics: Arc<crate::metrics::RoleMetrics>,
}

impl RoleServices {
    pub fn new(name: &str, manifest: Manifest, parts: HostParts, manager: Weak<RoleManager>) -> Self {
        RoleServices {
            name: name.to_string(),
            config_json: manifest.config_json(),
            manifest,
            metrics: parts.metrics.role(name),
            parts,
            manager,
        }
    }

    fn store_error(&self, error: impl std::fmt::Display) -> HostError {
        HostError::Failed(format!("role state store: {error}"))
    }
}

#[async_trait::async_trait]
impl RoleHost for RoleServices {
    fn role_name(&self) -> &str {
        &self.name
    }

    fn log(&self, level: Level, message: &str) {
        let role = self.name.as_str();
        match level {
            Level::Trace => tracing::trace!(role, "{message}"),
            Level::Debug => tracing::debug!(role, "{message}"),
            Level::Info => tracing::info!(role, "{message}"),
            Level::Warn => tracing::warn!(role, "{message}"),
            Level::Error => tracing::error!(role, "{message}"),
        }
    }

    async fn emit(&self, kind: String, key: String, payload: Vec<u8>) -> Result<u64, HostError> {
        self.manifest.grants.allow_emit(&self.name, &kind)?;
        let source = self.parts.registry.self_id();
        self.parts
            .log
            .append(NewEvent {
                kind,
                key,
                source,
                payload,
            })
            .await
            .map_err(|error| match error {
                LogError::Invalid(text) => HostError::Invalid(text),
                LogError::Unavailable(text) => HostError::Unavailable(text),
                LogError::Store(error) => HostError::Failed(error.to_string()),
            })
    }

    async fn events_since(&self, after: u64, kind_prefix: String, limit: u32) -> Result<Vec<Event>, HostError> {
        let limit = limit.clamp(1, 10_000) as usize;
        let events = self
            .parts
            .log
            .since(after, &kind_prefix, limit)
            .await
            .map_err(|error| HostError::Failed(error.to_string()))?;
        Ok(events.iter().map(|event| event.to_role_event()).collect())
    }

    fn nodes(&self, role: Option<&str>, healthy_only: bool) -> Vec<Node> {
        self.parts
            .registry
            .nodes(role, healthy_only)
            .iter()
            .map(|node| node.to_role_node())
            .collect()
    }

    fn self_node(&self) -> Node {
        self.parts.registry.self_node().to_role_node()
    }

    fn config_json(&self) -> String {
        self.config_json.clone()
    }

    async fn call(&self, node: String, role: String, request: Request) -> Result<Response, HostError> {
        if node != self.parts.registry.self_id() {
            return self.parts.connect.call(&node, &role, request).await;
        }
        let Some(manager) = self.manager.upgrade() else {
            return Err(HostError::Unavailable("the host is shutting down".into()));
        };
        manager
            .request(&role, request)
            .await
            .map_err(|error| error.to_host_error())
    }

    async fn write_file(&self, path: String, contents: Vec<u8>) -> Result<(), HostError> {
        let dir = self.manifest.grants.output_dir(&self.name)?;
        let dir = dir.to_path_buf();
        if contents.len() > MAX_WRITE_BYTES {
            return Err(HostError::Invalid(format!(
                "{} bytes is over the {MAX_WRITE_BYTES}-byte file limit",
                contents.len()
            )));
        }
        tokio::task::spawn_blocking(move || write_confined(&dir, &path, &contents))
            .await
            .map_err(|error| HostError::Failed(error.to_string()))?
    }

    async fn check(&self, target: HealthCheck, timeout_ms: u32) -> Result<u32, HostError> {
        let timeout = Duration::from_millis(timeout_ms.max(1) as u64).min(MAX_CHECK_TIMEOUT);
        let (what, host, started) = match &target {
            HealthCheck::Tcp(address) => ("TCP", check_host_of(address, "")?, Instant::now()),
            HealthCheck::Http(url) => {
                let rest = url.strip_prefix("http://").ok_or_else(|| {
                    HostError::Invalid(format!("`{url}` is not an http:// URL; write http://HOST:PORT/PATH"))
                })?;
                (
                    "HTTP",
                    check_host_of(rest.split('/').next().unwrap_or(""), "80")?,
                    Instant::now(),
                )
            }
        };
        self.manifest.grants.allow_check(&self.name, &host)?;
        let outcome = match target {
            HealthCheck::Tcp(address) => crate::probe::tcp(&address, timeout).await,
            HealthCheck::Http(url) => crate::probe::http_get(&url, timeout).await.map(drop),
        };
        match outcome {
            Ok(()) => Ok(started.elapsed().as_millis().min(u32::MAX as u128) as u32),
            Err(reason) => Err(HostError::Unavailable(format!("{what} check failed: {reason}"))),
        }
    }

    async fn exec(&self, program: String, args: Vec<String>, timeout_ms: u32) -> Result<ExecOutput, HostError> {
        let mut argv = vec![program.clone()];
        argv.extend(args.iter().cloned());
        self.manifest.grants.allow_exec(&self.name, &argv)?;
        let timeout = Duration::from_millis(timeout_ms.max(1) as u64).min(MAX_EXEC_TIMEOUT);
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(timeout, command.output()).await {
            Err(_) => {
                return Err(HostError::Failed(format!(
                    "`{}` did not finish within {} ms",
                    argv.join(" "),
                    timeout.as_millis()
                )));
            }
            Ok(Err(error)) => return Err(HostError::Failed(format!("cannot run `{program}`: {error}"))),
            Ok(Ok(output)) => output,
        };
        let cap = |mut bytes: Vec<u8>| {
            bytes.truncate(MAX_EXEC_OUTPUT);
            bytes
        };
        Ok(ExecOutput {
            status: output.status.code().unwrap_or(-1),
            stdout: cap(output.stdout),
            stderr: cap(output.stderr),
        })
    }

    async fn state_get(&self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let role = self.name.clone();
        self.parts
            .store
            .blocking(move |store| store.state_get(&role, &key))
            .await
            .map_err(|error| self.store_error(error))
    }

    async fn state_set(&self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        if key.is_empty() || key.len() > 1024 || key.contains('\0') {
            return Err(HostError::Invalid("state keys are 1-1024 bytes without NUL".into()));
        }
        let role = self.name.clone();
        self.parts
            .store
            .blocking(move |store| store.state_set(&role, &key, &value))
            .await
            .map_err(|error| self.store_error(error))
    }

    async fn state_delete(&self, key: String) -> Result<(), HostError> {
        let role = self.name.clone();
        self.parts
            .store
            .blocking(move |store| store.state_delete(&role, &key))
            .await
            .map_err(|error| self.store_error(error))
    }

    async fn state_keys(&self, prefix: String) -> Result<Vec<String>, HostError> {
        let role = self.name.clone();
        self.parts
            .store
            .blocking(move |store| store.state_keys(&role, &prefix))
            .await
            .map_err(|error| self.store_error(error))
    }

    fn count(&self, name: &str, labels: &[(String, String)], delta: u64) -> Result<(), HostError> {
        self.metrics.count(name, labels, delta)
    }

    fn kept_replies_sent(&self, count: u64) {
        self.metrics.kept_replies_sent(count);
    }

    fn observe_call(&self, export: Export, outcome: CallOutcome, elapsed: Duration) {
        self.metrics.observe_call(export, outcome, elapsed);
    }

    fn report(&self, failure: RoleFailure) {
        self.parts.notifier.report(failure);
    }
}

/// `relative` inside `dir`, refusing absolute paths and `..`.
fn confined_path(dir: &Path, relative: &str) -> Result<PathBuf, HostError> {
    let path = Path::new(relative);
    let plain = !relative.is_empty() && path.components().all(|part| matches!(part, Component::Normal(_)));
    if !plain {
        return Err(HostError::Invalid(format!(
            "path {relative:?} must be relative to the granted directory, without `..`"
        )));
    }
    Ok(dir.join(path))
}

/// Writes `relative` inside `dir`, creating the directories on the way.
/// None of them may be a symbolic link: a link planted in the output
/// directory would otherwise carry the write outside the grant.
fn write_confined(dir: &Path, relative: &str, contents: &[u8]) -> Result<(), HostError> {
    let target = confined_path(dir, relative)?;
    let refused = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::InvalidInput => HostError::Invalid(error.to_string()),
        _ => HostError::Failed(error.to_string()),
    };
    let mut parent = dir.to_path_buf();
    let mut parts: Vec<Component> = Path::new(relative).components().collect();
    parts.pop();
    for part in parts {
        parent.push(part);
        match std::fs::symlink_metadata(&parent) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(HostError::Invalid(format!(
                    "cannot write {}: {} is not a directory (a link or a file); hivemind writes only below real directories",
                    target.display(),
                    parent.display()
                )));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&parent)
                    .map_err(|error| HostError::Failed(format!("cannot create {}: {error}", parent.display())))?;
            }
            Err(error) => return Err(HostError::Failed(format!("cannot read {}: {error}", parent.display()))),
        }
    }
    write_file(&target, contents, Access::Shared).map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths that would leave the granted directory are refused.
    #[test]
    fn write_paths_stay_inside_the_grant() {
        let dir = Path::new("/out");
        assert_eq!(confined_path(dir, "a/b.conf").unwrap(), PathBuf::from("/out/a/b.conf"));
        assert!(confined_path(dir, "../etc/passwd").is_err());
        assert!(confined_path(dir, "/etc/passwd").is_err());
        assert!(confined_path(dir, "").is_err());
    }

    /// A link planted inside the output directory does not carry a write
    /// outside it, whether it stands for a directory on the way or for the
    /// file itself.
    #[test]
    fn writes_do_not_follow_links_out_of_the_grant() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, out.join("conf.d")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("victim"), out.join("upstreams.conf")).unwrap();

        let error = write_confined(&out, "conf.d/web.conf", b"x").unwrap_err();
        assert!(matches!(error, HostError::Invalid(_)), "{error:?}");
        let error = write_confined(&out, "upstreams.conf", b"x").unwrap_err();
        assert!(matches!(error, HostError::Invalid(_)), "{error:?}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

        write_confined(&out, "sites/a/web.conf", b"ok").unwrap();
        assert_eq!(std::fs::read(out.join("sites/a/web.conf")).unwrap(), b"ok");
    }
}
