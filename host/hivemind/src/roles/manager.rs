//! The set of roles on this node and each one's life: load, reload, unload,
//! pause, disable, and the tasks that feed it (event delivery, ticks,
//! host-owned listeners).
//!
//! A role is a [`RoleSlot`] named after its file. The slot holds the version
//! that serves (`current`), the operator's intent (`mode`) and what happened
//! last. A new version replaces `current` only after it compiled and its
//! `init` succeeded; calls already running keep their `Arc` of the old one and
//! finish on it. Listeners belong to the slot, not the version, so a reload
//! never unbinds a port.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hivemind_runtime::{
    CallError, FailureKind, HostError, LoadedRole, Request, Response, RoleFailure, RoleStats, Runtime,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::roles::delivery;
use crate::roles::listeners::Listener;
use crate::roles::services::{HostParts, RoleServices};
use hivemind_runtime::manifest::Manifest;

/// Reload records kept per role.
const HISTORY: usize = 20;

/// What the operator asked a role to be. Persisted, so a restart keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Active,
    Paused,
    Disabled,
}

/// The state shown to users: one of loading, running, paused, disabled, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleState {
    Loading,
    Running,
    Paused,
    Disabled,
    Failed,
}

impl RoleState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleState::Loading => "loading",
            RoleState::Running => "running",
            RoleState::Paused => "paused",
            RoleState::Disabled => "disabled",
            RoleState::Failed => "failed",
        }
    }
}

/// Size and modification time of a role's files: a change means "look again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    wasm: (u64, SystemTime),
    manifest: Option<(u64, SystemTime)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    pub digest: String,
    pub version: Option<String>,
    /// `loaded`, `rejected` or `unchanged`.
    pub outcome: &'static str,
    pub error: Option<String>,
    pub cache_hit: bool,
    pub load_ms: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadingInfo {
    pub digest: String,
    pub elapsed_ms: u64,
}

struct SlotStatus {
    mode: Mode,
    fingerprint: Option<Fingerprint>,
    manifest_text: Option<String>,
    loading: Option<(String, Instant)>,
    last_error: Option<String>,
    last_error_digest: Option<String>,
    history: VecDeque<ReloadRecord>,
}

pub struct RoleSlot {
    pub name: String,
    current: RwLock<Option<Arc<LoadedRole>>>,
    status: Mutex<SlotStatus>,
    load_lock: tokio::sync::Mutex<()>,
    listeners: Mutex<Vec<Listener>>,
    /// Bumped whenever `current` or `mode` changes; tasks wait on it.
    changed: watch::Sender<u64>,
    /// Delivery and tick tasks, aborted when the role is unloaded or disabled.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Every task working for this slot is spawned here, so shutdown can
    /// wait for all of them.
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

impl RoleSlot {
    fn new(name: &str, mode: Mode, tracker: TaskTracker, shutdown: CancellationToken) -> RoleSlot {
        RoleSlot {
            name: name.to_string(),
            current: RwLock::new(None),
            status: Mutex::new(SlotStatus {
                mode,
                fingerprint: None,
                manifest_text: None,
                loading: None,
                last_error: None,
                last_error_digest: None,
                history: VecDeque::new(),
            }),
            load_lock: tokio::sync::Mutex::new(()),
            listeners: Mutex::new(Vec::new()),
            changed: watch::Sender::new(0),
            tasks: Mutex::new(Vec::new()),
            tracker,
            shutdown,
        }
    }

    pub fn current(&self) -> Option<Arc<LoadedRole>> {
        self.current.read().unwrap().clone()
    }

    pub fn mode(&self) -> Mode {
        self.status.lock().unwrap().mode
    }

    /// The version that should handle work now: loaded, active, not failed.
    pub fn serving(&self) -> Option<Arc<LoadedRole>> {
        if self.mode() != Mode::Active {
            return None;
        }
        self.current().filter(|role| !role.is_failed())
    }

    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub fn state(&self) -> RoleState {
        let status = self.status.lock().unwrap();
        let current = self.current();
        match (status.mode, current) {
            (Mode::Disabled, _) => RoleState::Disabled,
            // A role seen but not yet through its first load (no version,
            // no error) is loading, not failed.
            (_, None) if status.loading.is_some() || status.last_error.is_none() => RoleState::Loading,
            (_, None) => RoleState::Failed,
            (_, Some(role)) if role.stats().failed.is_some() => RoleState::Failed,
            (Mode::Paused, Some(_)) => RoleState::Paused,
            (Mode::Active, Some(_)) => RoleState::Running,
        }
    }

    fn stop_tasks(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// A role as `GET /v1/roles` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoleInfo {
    pub name: String,
    pub state: RoleState,
    pub mode: Mode,
    pub version: Option<String>,
    pub digest: Option<String>,
    pub last_error: Option<String>,
    /// Digest of the bytes `last_error` is about.
    pub last_error_digest: Option<String>,
    /// A version being compiled or initialized right now.
    pub loading: Option<LoadingInfo>,
    pub subscribes: Vec<String>,
    pub listeners: Vec<ListenerInfo>,
    pub stats: Option<StatsInfo>,
    pub history: Vec<ReloadRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub protocol: &'static str,
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatsInfo {
    pub calls: u64,
    pub traps: u64,
    pub overloads: u64,
    /// Instances retired after a call for holding most of their memory
    /// limit (the next call starts a fresh one).
    pub recycled: u64,
    /// Datagrams the host answered from the role's kept replies, without a
    /// call (not in `calls`).
    pub kept_replies: u64,
    pub consecutive_traps: u32,
    pub busy_workers: u32,
    pub queued: u32,
    pub workers: u32,
    pub queue: u32,
}

impl StatsInfo {
    fn new(stats: RoleStats, role: &LoadedRole) -> Self {
        StatsInfo {
            calls: stats.calls,
            traps: stats.traps,
            overloads: stats.overloads,
            recycled: stats.recycled,
            kept_replies: stats.kept_replies,
            consecutive_traps: stats.consecutive_traps,
            busy_workers: stats.busy_workers,
            queued: stats.queued,
            workers: role.limits().workers,
            queue: role.limits().queue,
        }
    }
}

/// Why a request to a role got no answer from it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RoleError {
    #[error("no role named `{0}` on this node; `hivemind roles list` shows the roles")]
    NoSuchRole(String),
    #[error("role `{0}` is paused; `hivemind roles resume {0}` resumes it")]
    Paused(String),
    #[error("role `{0}` is disabled; `hivemind roles enable {0}` enables it")]
    Disabled(String),
    #[error("role `{name}` is not loaded: {reason}")]
    NotLoaded { name: String, reason: String },
    #[error("cannot record the role's new mode: {0}")]
    Store(String),
    #[error(transparent)]
    Call(#[from] CallError),
}

impl RoleError {
    /// The HTTP status this error is served with.
    pub fn http_status(&self) -> u16 {
        match self {
            RoleError::NoSuchRole(_) => 404,
            RoleError::Paused(_) | RoleError::Disabled(_) | RoleError::NotLoaded { .. } => 503,
            RoleError::Store(_) => 500,
            RoleError::Call(CallError::Overloaded { .. }) => 429,
            RoleError::Call(CallError::Failed { .. }) => 503,
            RoleError::Call(_) => 502,
        }
    }

    pub fn to_host_error(&self) -> HostError {
        match self {
            RoleError::Call(CallError::Overloaded { .. }) => HostError::Overloaded(self.to_string()),
            RoleError::Call(_) => HostError::Failed(self.to_string()),
            _ => HostError::Unavailable(self.to_string()),
        }
    }
}

pub struct RoleManager {
    runtime: Arc<Runtime>,
    parts: HostParts,
    roles_dir: PathBuf,
    slots: RwLock<BTreeMap<String, Arc<RoleSlot>>>,
    shutdown: CancellationToken,
    /// Every task the manager spawns (loads, delivery, ticks, listeners,
    /// datagram handlers), so [`RoleManager::stop`] can wait for all.
    tasks: TaskTracker,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mode_setting(name: &str) -> String {
    format!("role.{name}.mode")
}

/// A role name is the file stem: lowercase letters, digits, `-` and `_`.
pub fn valid_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

impl RoleManager {
    pub fn new(runtime: Arc<Runtime>, parts: HostParts, roles_dir: PathBuf, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(RoleManager {
            runtime,
            parts,
            roles_dir,
            slots: RwLock::new(BTreeMap::new()),
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    pub fn roles_dir(&self) -> &Path {
        &self.roles_dir
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn slot(&self, name: &str) -> Option<Arc<RoleSlot>> {
        self.slots.read().unwrap().get(name).cloned()
    }

    fn slot_or_error(&self, name: &str) -> Result<Arc<RoleSlot>, RoleError> {
        self.slot(name).ok_or_else(|| RoleError::NoSuchRole(name.to_string()))
    }

    pub fn names(&self) -> Vec<String> {
        self.slots.read().unwrap().keys().cloned().collect()
    }

    /// Looks at the roles directory and loads, reloads or unloads whatever
    /// changed since the last look. Loads run in the background.
    pub async fn sync(self: &Arc<Self>) {
        let found = match scan_roles_dir(&self.roles_dir).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(dir = %self.roles_dir.display(), %error, "cannot read the roles directory");
                return;
            }
        };
        for (name, fingerprint) in &found {
            let slot = self.slot_for(name).await;
            let changed = slot.status.lock().unwrap().fingerprint.as_ref() != Some(fingerprint);
            if changed {
                slot.status.lock().unwrap().fingerprint = Some(fingerprint.clone());
                let manager = self.clone();
                let name = name.clone();
                self.tasks.spawn(async move { manager.load(&name, false).await });
            }
        }
        let gone: Vec<String> = self
            .names()
            .into_iter()
            .filter(|name| !found.contains_key(name))
            .collect();
        for name in gone {
            self.unload(&name).await;
        }
    }

    async fn slot_for(&self, name: &str) -> Arc<RoleSlot> {
        if let Some(slot) = self.slot(name) {
            return slot;
        }
        let key = mode_setting(name);
        let saved = self
            .parts
            .store
            .blocking(move |store| store.setting(&key))
            .await
            .ok()
            .flatten();
        let mode = match saved.as_deref() {
            Some("paused") => Mode::Paused,
            Some("disabled") => Mode::Disabled,
            _ => Mode::Active,
        };
        self.slots
            .write()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(RoleSlot::new(name, mode, self.tasks.clone(), self.shutdown.clone())))
            .clone()
    }

    /// Loads the role's files as its new version. With `force`, the same
    /// bytes are loaded again (a fresh `init`); without it they are skipped.
    /// Returns the error when the new version was rejected.
    pub async fn load(self: &Arc<Self>, name: &str, force: bool) -> Result<(), String> {
        let slot = self.slot_for(name).await;
        let _serialized = slot.load_lock.lock().await;
        if slot.mode() == Mode::Disabled {
            return Ok(());
        }
        let wasm_path = self.roles_dir.join(format!("{name}.wasm"));
        let manifest_path = self.roles_dir.join(format!("{name}.toml"));
        let bytes = match tokio::fs::read(&wasm_path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                let message = format!("cannot read {}: {error}", wasm_path.display());
                self.reject(&slot, "", message.clone(), Duration::ZERO);
                return Err(message);
            }
        };
        let manifest_text = match tokio::fs::read_to_string(&manifest_path).await {
            Ok(text) => Some(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                let message = format!("cannot read {}: {error}", manifest_path.display());
                self.reject(&slot, "", message.clone(), Duration::ZERO);
                return Err(message);
            }
        };
        let digest = hex::encode(Sha256::digest(&bytes));
        let unchanged = slot.current().is_some_and(|role| role.digest() == digest)
            && slot.status.lock().unwrap().manifest_text == manifest_text;
        if unchanged && !force {
            return Ok(());
        }

        let started = Instant::now();
        slot.status.lock().unwrap().loading = Some((digest.clone(), started));
        let result = self
            .build_version(&slot, name, bytes, &manifest_path, manifest_text.as_deref())
            .await;
        match result {
            Ok((role, cache_hit)) => {
                let version = role.description().version.clone();
                {
                    let mut status = slot.status.lock().unwrap();
                    status.loading = None;
                    status.last_error = None;
                    status.last_error_digest = None;
                    status.manifest_text = manifest_text;
                    push_history(
                        &mut status.history,
                        ReloadRecord {
                            digest: digest.clone(),
                            version: Some(version.clone()),
                            outcome: "loaded",
                            error: None,
                            cache_hit,
                            load_ms: started.elapsed().as_millis() as u64,
                            at_ms: now_ms(),
                        },
                    );
                }
                if slot.current.write().unwrap().replace(Arc::new(role)).is_some() {
                    self.parts.metrics.role(name).reloaded();
                }
                self.ensure_tasks(&slot);
                slot.bump();
                self.publish_roles();
                tracing::info!(
                    role = name,
                    %version,
                    digest = &digest[..12],
                    cache_hit,
                    load_ms = started.elapsed().as_millis() as u64,
                    "role loaded"
                );
                Ok(())
            }
            Err(message) => {
                self.reject(&slot, &digest, message.clone(), started.elapsed());
                Err(message)
            }
        }
    }

    async fn build_version(
        self: &Arc<Self>,
        slot: &Arc<RoleSlot>,
        name: &str,
        bytes: Vec<u8>,
        manifest_path: &Path,
        manifest_text: Option<&str>,
    ) -> Result<(LoadedRole, bool), String> {
        let manifest = match manifest_text {
            Some(text) => Manifest::parse(manifest_path, text, self.runtime.max_memory_bytes())?,
            None => Manifest::default(),
        };
        let runtime = self.runtime.clone();
        // A thread of its own at a lower priority (as are wasmtime's compile
        // threads): a compile must not starve the roles that are serving.
        let (sender, answer) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("hivemind-compile".into())
            .spawn(move || {
                hivemind_runtime::lower_thread_priority();
                let _ = sender.send(runtime.compile(&bytes));
            })
            .map_err(|error| format!("cannot start a compile thread: {error}"))?;
        let compiled = answer
            .await
            .map_err(|_| "the compile thread ended without an answer".to_string())?
            .map_err(|error| error.to_string())?;
        let cache_hit = compiled.cache_hit;
        // Bind new listeners before the version can go live, so a port that
        // is taken rejects the version instead of breaking the running one.
        let listeners = crate::roles::listeners::prepare(slot, &manifest.listeners).await?;
        let services = Arc::new(RoleServices::new(
            name,
            manifest.clone(),
            self.parts.clone(),
            Arc::downgrade(self),
        ));
        let role = self
            .runtime
            .load(name, compiled, manifest.role_limits(), services)
            .await
            .map_err(|error| error.to_string())?;
        crate::roles::listeners::commit(slot, listeners);
        Ok((role, cache_hit))
    }

    fn reject(&self, slot: &RoleSlot, digest: &str, message: String, took: Duration) {
        let has_current = slot.current().is_some();
        {
            let mut status = slot.status.lock().unwrap();
            status.loading = None;
            status.last_error = Some(message.clone());
            status.last_error_digest = Some(digest.to_string());
            push_history(
                &mut status.history,
                ReloadRecord {
                    digest: digest.to_string(),
                    version: None,
                    outcome: "rejected",
                    error: Some(message.clone()),
                    cache_hit: false,
                    load_ms: took.as_millis() as u64,
                    at_ms: now_ms(),
                },
            );
        }
        slot.bump();
        let consequence = if has_current {
            "the previous version keeps serving"
        } else {
            "the role is not running"
        };
        self.parts.notifier.report(RoleFailure {
            role: slot.name.clone(),
            kind: FailureKind::LoadRejected,
            message: format!("role `{}`: new version rejected ({consequence}): {message}", slot.name),
        });
    }

    /// Starts the delivery and tick tasks of a slot if they are not running.
    fn ensure_tasks(self: &Arc<Self>, slot: &Arc<RoleSlot>) {
        let mut tasks = slot.tasks.lock().unwrap();
        tasks.retain(|task| !task.is_finished());
        if tasks.is_empty() {
            tasks.push(self.tasks.spawn(delivery::deliver_events(
                slot.clone(),
                self.parts.log.clone(),
                self.parts.store.clone(),
                self.shutdown.clone(),
            )));
            tasks.push(
                self.tasks
                    .spawn(delivery::run_ticks(slot.clone(), self.shutdown.clone())),
            );
        }
    }

    /// The role's file is gone: stop everything it had. Its state and
    /// cursor stay in the store in case it comes back.
    pub async fn unload(&self, name: &str) {
        let Some(slot) = self.slots.write().unwrap().remove(name) else {
            return;
        };
        let _serialized = slot.load_lock.lock().await;
        slot.stop_tasks();
        slot.listeners.lock().unwrap().clear();
        *slot.current.write().unwrap() = None;
        slot.bump();
        self.publish_roles();
        tracing::info!(role = name, "role unloaded (its file was removed)");
    }

    fn publish_roles(&self) {
        let running = self
            .slots
            .read()
            .unwrap()
            .values()
            .filter_map(|slot| {
                let current = slot.current()?;
                Some((slot.name.clone(), current.description().version.clone()))
            })
            .collect();
        self.parts.local_roles.send_replace(running);
    }

    async fn set_mode(&self, slot: &RoleSlot, mode: Mode) -> Result<(), RoleError> {
        let key = mode_setting(&slot.name);
        let value = match mode {
            Mode::Active => None,
            Mode::Paused => Some("paused"),
            Mode::Disabled => Some("disabled"),
        };
        self.parts
            .store
            .blocking(move |store| store.set_setting(&key, value))
            .await
            .map_err(|error| RoleError::Store(error.to_string()))?;
        slot.status.lock().unwrap().mode = mode;
        slot.bump();
        Ok(())
    }

    /// Pauses (`paused`) or resumes a role that is not disabled.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), RoleError> {
        let slot = self.slot_or_error(name)?;
        if slot.mode() == Mode::Disabled {
            return Err(RoleError::Disabled(name.to_string()));
        }
        self.set_mode(&slot, if paused { Mode::Paused } else { Mode::Active })
            .await
    }

    /// Stops the role and frees its instances and listeners; it stays
    /// disabled across restarts until enabled.
    pub async fn disable(&self, name: &str) -> Result<(), RoleError> {
        let slot = self.slot_or_error(name)?;
        let _serialized = slot.load_lock.lock().await;
        self.set_mode(&slot, Mode::Disabled).await?;
        slot.stop_tasks();
        slot.listeners.lock().unwrap().clear();
        *slot.current.write().unwrap() = None;
        slot.bump();
        self.publish_roles();
        Ok(())
    }

    pub async fn enable(self: &Arc<Self>, name: &str) -> Result<(), RoleError> {
        let slot = self.slot_or_error(name)?;
        self.set_mode(&slot, Mode::Active).await?;
        if slot.current().is_none() {
            self.load(name, true).await.map_err(|reason| RoleError::NotLoaded {
                name: name.into(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Loads the role's files again (fresh instances, `init` again); this
    /// also clears a failed state.
    pub async fn reload(self: &Arc<Self>, name: &str) -> Result<(), RoleError> {
        let slot = self.slot_or_error(name)?;
        if slot.mode() == Mode::Disabled {
            return Err(RoleError::Disabled(name.to_string()));
        }
        self.load(name, true).await.map_err(|reason| RoleError::NotLoaded {
            name: name.into(),
            reason,
        })
    }

    /// Serves a request with the role's current version.
    pub async fn request(&self, name: &str, request: Request) -> Result<Response, RoleError> {
        let role = self.serving(name)?;
        Ok(role.on_request(&request).await?)
    }

    fn serving(&self, name: &str) -> Result<Arc<LoadedRole>, RoleError> {
        let slot = self.slot_or_error(name)?;
        match slot.mode() {
            Mode::Paused => return Err(RoleError::Paused(name.to_string())),
            Mode::Disabled => return Err(RoleError::Disabled(name.to_string())),
            Mode::Active => {}
        }
        let Some(role) = slot.current() else {
            let reason = slot
                .status
                .lock()
                .unwrap()
                .last_error
                .clone()
                .unwrap_or_else(|| "it is still loading".to_string());
            return Err(RoleError::NotLoaded {
                name: name.to_string(),
                reason,
            });
        };
        Ok(role)
    }

    pub fn info(&self, name: &str) -> Option<RoleInfo> {
        let slot = self.slot(name)?;
        let current = slot.current();
        let state = slot.state();
        let status = slot.status.lock().unwrap();
        let listeners = slot
            .listeners
            .lock()
            .unwrap()
            .iter()
            .map(|listener| ListenerInfo {
                name: listener.name.clone(),
                protocol: listener.protocol().as_str(),
                address: listener.local_addr.to_string(),
            })
            .collect();
        Some(RoleInfo {
            name: slot.name.clone(),
            state,
            mode: status.mode,
            version: current.as_ref().map(|role| role.description().version.clone()),
            digest: current.as_ref().map(|role| role.digest().to_string()),
            last_error: status.last_error.clone().or_else(|| {
                current
                    .as_ref()
                    .and_then(|role| role.stats().failed.map(|why| format!("failed: {why}")))
            }),
            last_error_digest: status.last_error_digest.clone(),
            loading: status.loading.as_ref().map(|(digest, since)| LoadingInfo {
                digest: digest.clone(),
                elapsed_ms: since.elapsed().as_millis() as u64,
            }),
            subscribes: current
                .as_ref()
                .map(|role| role.description().subscribes.clone())
                .unwrap_or_default(),
            listeners,
            stats: current.as_ref().map(|role| StatsInfo::new(role.stats(), role)),
            history: status.history.iter().rev().cloned().collect(),
        })
    }

    pub fn list(&self) -> Vec<RoleInfo> {
        self.names().iter().filter_map(|name| self.info(name)).collect()
    }

    /// Daemon shutdown, after the shutdown token was cancelled: waits for
    /// every task the manager spawned, then drops every role version, so no
    /// instance, socket or store handle outlives this call.
    pub async fn stop(&self) {
        // Tasks see the cancelled token and end on their own; aborting them
        // instead could leave a store operation running on a blocking thread.
        self.tasks.close();
        self.tasks.wait().await;
        let slots = std::mem::take(&mut *self.slots.write().unwrap());
        for slot in slots.values() {
            *slot.current.write().unwrap() = None;
        }
    }

    pub(crate) fn slot_listeners(slot: &RoleSlot) -> std::sync::MutexGuard<'_, Vec<Listener>> {
        slot.listeners.lock().unwrap()
    }
}

fn push_history(history: &mut VecDeque<ReloadRecord>, record: ReloadRecord) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(record);
}

/// Role files in `dir`: `NAME.wasm` with an optional `NAME.toml`. Dotfiles
/// and anything not ending in `.wasm` (such as `NAME.wasm.tmp`) are ignored.
async fn scan_roles_dir(dir: &Path) -> std::io::Result<BTreeMap<String, Fingerprint>> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else { continue };
            let Some(name) = file_name.strip_suffix(".wasm") else {
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            if !valid_role_name(name) {
                tracing::warn!(
                    file = file_name,
                    "ignoring role file: names are lowercase letters, digits, '-' and '_' (rename it)"
                );
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let manifest = std::fs::metadata(dir.join(format!("{name}.toml")))
                .ok()
                .map(|meta| (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)));
            found.insert(
                name.to_string(),
                Fingerprint {
                    wasm: (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)),
                    manifest,
                },
            );
        }
        Ok(found)
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the roles directory scan was cancelled (shutting down)",
        ))
    })
}
