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
use hivemind_runtime::manifest::{ListenerSpec, Manifest};

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

/// What tells one version of a file from another without reading it. A
/// file replaced by rename has a new inode; one rewritten in place has a
/// new change time, which (unlike the modification time `cp -p`, `rsync
/// -a`, `tar x` and builds with a pinned `SOURCE_DATE_EPOCH` set) no one
/// can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified_ns: i128,
    changed_ns: i128,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |seconds: i64, nanos: i64| seconds as i128 * 1_000_000_000 + nanos as i128;
        FileStamp {
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.size(),
            modified_ns: ns(meta.mtime(), meta.mtime_nsec()),
            changed_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file changed so recently that another write within the
    /// clock's granularity could leave the same stamp (git's "racy clean"
    /// entries): such a stamp proves nothing, and the file is read again.
    /// A change time ahead of the clock (the clock was set back) is not
    /// recent: a write now would stamp the file with an earlier time.
    fn is_recent(&self, now_ns: i128) -> bool {
        (0..RECENT_CHANGE_NS).contains(&(now_ns - self.changed_ns))
    }
}

/// A change time younger than this at a scan is not trusted: the kernel
/// stamps files from a clock that ticks every few milliseconds, and a write
/// racing a scan could land within the same tick.
const RECENT_CHANGE_NS: i128 = 1_000_000_000;

/// A role's files as a scan saw them: a change means "look again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    wasm: FileStamp,
    manifest: Option<FileStamp>,
    /// Set when either file changed too recently for its stamp to be
    /// trusted; such a fingerprint equals nothing, so the next scan looks
    /// again.
    recent: bool,
}

impl Fingerprint {
    fn same_files(&self, other: &Fingerprint) -> bool {
        !self.recent && !other.recent && self.wasm == other.wasm && self.manifest == other.manifest
    }
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
    /// A listener the last load could not bind: the load is tried again
    /// once its address is free (see [`RoleManager::sync`]).
    waiting_for_port: Option<ListenerSpec>,
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
                waiting_for_port: None,
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
    /// Files in the roles directory that the last scan ignored, and why.
    ignored_files: Mutex<BTreeMap<String, String>>,
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
            ignored_files: Mutex::new(BTreeMap::new()),
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
        let RolesDirScan { found, ignored } = match scan_roles_dir(&self.roles_dir).await {
            Ok(scan) => scan,
            Err(error) => {
                tracing::warn!(dir = %self.roles_dir.display(), %error, "cannot read the roles directory");
                return;
            }
        };
        self.warn_once_about(ignored);
        for (name, fingerprint) in &found {
            let slot = self.slot_for(name).await;
            let changed = !slot
                .status
                .lock()
                .unwrap()
                .fingerprint
                .as_ref()
                .is_some_and(|seen| seen.same_files(fingerprint));
            if changed {
                slot.status.lock().unwrap().fingerprint = Some(fingerprint.clone());
                let manager = self.clone();
                let name = name.clone();
                self.tasks.spawn(async move { manager.load(&name, false).await });
                continue;
            }
            // A version rejected because its port was taken loads once the
            // port is free, as a service manager would restart it: the
            // files did not change, so nothing else would try again.
            let waiting = slot.status.lock().unwrap().waiting_for_port.clone();
            if let Some(spec) = waiting
                && crate::roles::listeners::can_bind(&spec).await
            {
                tracing::info!(role = %name, listener = %spec.name, address = %spec.address, "the port is free; loading the role again");
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

    /// Logs each file the scan ignored, once while it stays as it is: a
    /// warning every rescan would bury everything else in the log.
    fn warn_once_about(&self, ignored: BTreeMap<String, String>) {
        let mut warned = self.ignored_files.lock().unwrap();
        for (file, why) in not_yet_warned(&warned, &ignored) {
            tracing::warn!(dir = %self.roles_dir.display(), file, "ignoring role file: {why}");
        }
        *warned = ignored;
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
        {
            let mut status = slot.status.lock().unwrap();
            status.loading = Some((digest.clone(), started));
            status.waiting_for_port = None;
        }
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
        let listeners = crate::roles::listeners::prepare(slot, &manifest.listeners)
            .await
            .map_err(|failure| {
                slot.status.lock().unwrap().waiting_for_port = Some(failure.spec);
                failure.message
            })?;
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
        let message = bounded_error(message);
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
            // A version that failed by traps is what the operator must see,
            // even when an older error (a rejected manifest the version
            // outlived) is still on record; that one stays in `history`.
            last_error: current
                .as_ref()
                .and_then(|role| role.stats().failed.map(|why| format!("failed: {why}")))
                .or_else(|| status.last_error.clone()),
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

/// What a scan of the roles directory found.
#[derive(Debug, Default)]
struct RolesDirScan {
    /// `NAME.wasm` files (through links too) with an optional `NAME.toml`.
    found: BTreeMap<String, Fingerprint>,
    /// Files that look like roles but cannot be, by file name, with why.
    ignored: BTreeMap<String, String>,
}

/// Role files in `dir`: `NAME.wasm` with an optional `NAME.toml`. Dotfiles
/// and anything not ending in `.wasm` (such as `NAME.wasm.tmp`) are skipped
/// without a word; a `.wasm` that cannot be a role is reported in `ignored`.
async fn scan_roles_dir(dir: &Path) -> std::io::Result<RolesDirScan> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_nanos() as i128)
            .unwrap_or(0);
        let mut scan = RolesDirScan::default();
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
                scan.ignored.insert(
                    file_name.to_string(),
                    "a role's name is 1-64 lowercase letters, digits, '-' and '_', starting with a letter or digit: rename the file".to_string(),
                );
                continue;
            }
            // Through a link, as an operator who deploys by linking expects.
            let meta = match std::fs::metadata(entry.path()) {
                Ok(meta) if meta.is_file() => meta,
                Ok(_) => {
                    scan.ignored
                        .insert(file_name.to_string(), "it is not a regular file (a directory, a pipe or a device)".to_string());
                    continue;
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    scan.ignored.insert(
                        file_name.to_string(),
                        "it is a symbolic link to a file that does not exist".to_string(),
                    );
                    continue;
                }
                Err(error) => {
                    scan.ignored.insert(file_name.to_string(), format!("cannot read it: {error}"));
                    continue;
                }
            };
            let wasm = FileStamp::of(&meta);
            let manifest = std::fs::metadata(dir.join(format!("{name}.toml")))
                .ok()
                .map(|meta| FileStamp::of(&meta));
            let recent = wasm.is_recent(now_ns) || manifest.is_some_and(|stamp| stamp.is_recent(now_ns));
            scan.found.insert(
                name.to_string(),
                Fingerprint {
                    wasm,
                    manifest,
                    recent,
                },
            );
        }
        Ok(scan)
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the roles directory scan was cancelled (shutting down)",
        ))
    })
}

/// Longest line of an error kept as a role's `last_error`, and longest
/// error: a parser quoting a 10 MB line of a bad manifest must not make
/// every `roles list` tens of megabytes.
const MAX_ERROR_LINE: usize = 240;
const MAX_ERROR_BYTES: usize = 4096;

/// `message` with each over-long line cut, and the whole cut, where it says
/// how much was left out.
fn bounded_error(message: String) -> String {
    if message.len() <= MAX_ERROR_BYTES && message.lines().all(|line| line.len() <= MAX_ERROR_LINE) {
        return message;
    }
    let cut = |text: &str, limit: usize| {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes left out)", &text[..end], text.len() - end)
    };
    let lines: Vec<String> = message
        .lines()
        .map(|line| {
            if line.len() > MAX_ERROR_LINE {
                cut(line, MAX_ERROR_LINE)
            } else {
                line.to_string()
            }
        })
        .collect();
    let joined = lines.join("\n");
    if joined.len() > MAX_ERROR_BYTES {
        cut(&joined, MAX_ERROR_BYTES)
    } else {
        joined
    }
}

/// The ignored files of this scan that were not ignored for the same
/// reason by the last one.
fn not_yet_warned<'a>(
    warned: &'a BTreeMap<String, String>,
    ignored: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    ignored.iter().filter(|(file, why)| warned.get(*file) != Some(*why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(path: &Path) -> FileStamp {
        FileStamp::of(&std::fs::metadata(path).unwrap())
    }

    /// A file rewritten in place with the same length and its modification
    /// time set back (what `cp -p` does) has another stamp, as has one
    /// replaced by rename (`rsync -a`, `tar x`).
    #[test]
    fn same_size_and_mtime_rewrites_change_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("role.wasm");
        let write_pinned = |path: &Path, bytes: &[u8]| {
            std::fs::write(path, bytes).unwrap();
            let pinned = UNIX_EPOCH + Duration::from_secs(315_532_800);
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(pinned).unwrap();
        };
        write_pinned(&path, b"version one");
        let first = stamp(&path);

        std::thread::sleep(Duration::from_millis(20));
        write_pinned(&path, b"version two");
        let rewritten = stamp(&path);
        assert_eq!((first.len, first.modified_ns), (rewritten.len, rewritten.modified_ns));
        assert_ne!(first, rewritten);

        let other = dir.path().join("other");
        write_pinned(&other, b"version 3!!");
        std::fs::rename(&other, &path).unwrap();
        assert_ne!(rewritten, stamp(&path));
    }

    /// A fingerprint of files changed within the last second equals no
    /// other, so the next scan reads them again; an older one is trusted.
    #[test]
    fn recent_changes_are_not_trusted() {
        let stamp = FileStamp {
            device: 1,
            inode: 2,
            len: 3,
            modified_ns: 0,
            changed_ns: 10 * RECENT_CHANGE_NS,
        };
        assert!(stamp.is_recent(10 * RECENT_CHANGE_NS + 5));
        assert!(!stamp.is_recent(11 * RECENT_CHANGE_NS));
        assert!(
            !stamp.is_recent(9 * RECENT_CHANGE_NS),
            "a change time ahead of the clock"
        );
        let print = |recent| Fingerprint {
            wasm: stamp,
            manifest: None,
            recent,
        };
        assert!(print(false).same_files(&print(false)));
        assert!(!print(true).same_files(&print(true)));
        assert!(!print(false).same_files(&print(true)));
    }

    /// A scan loads role files through links, and names what it ignores:
    /// a bad name, a link to nothing, a directory.
    #[tokio::test]
    async fn scan_follows_links_and_names_what_it_ignores() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("dns-v2.wasm"), b"bytes").unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("dns-v2.wasm"), dir.path().join("dns.wasm")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("gone.wasm"), dir.path().join("broken.wasm")).unwrap();
        std::fs::write(dir.path().join("Bad Name.wasm"), b"bytes").unwrap();
        std::fs::create_dir(dir.path().join("folder.wasm")).unwrap();
        std::fs::write(dir.path().join(".hidden.wasm"), b"bytes").unwrap();
        std::fs::write(dir.path().join("dns.wasm.tmp"), b"bytes").unwrap();

        let scan = scan_roles_dir(dir.path()).await.unwrap();
        assert_eq!(scan.found.keys().collect::<Vec<_>>(), ["dns"]);
        assert_eq!(scan.found["dns"].wasm.len, 5, "the link's target, not the link");
        assert_eq!(
            scan.ignored.keys().collect::<Vec<_>>(),
            ["Bad Name.wasm", "broken.wasm", "folder.wasm"]
        );
        assert!(scan.ignored["broken.wasm"].contains("does not exist"));
        assert!(scan.ignored["folder.wasm"].contains("not a regular file"));
        assert!(scan.ignored["Bad Name.wasm"].contains("rename"));
    }

    /// An error quoting a huge line keeps its start and says how much was
    /// cut; a short error is kept as it is.
    #[test]
    fn long_errors_are_cut() {
        assert_eq!(bounded_error("short\nerror".into()), "short\nerror");
        let huge = format!("manifest x.toml: line 2\n{}\nexpected a table", "é".repeat(5 << 20));
        let bounded = bounded_error(huge);
        assert!(bounded.len() < MAX_ERROR_BYTES + 64, "{} bytes", bounded.len());
        assert!(bounded.starts_with("manifest x.toml: line 2\n"));
        assert!(bounded.contains("bytes left out") && bounded.ends_with("expected a table"));
    }

    /// Each ignored file is warned about once while its reason stays the
    /// same, and again if the reason changes.
    #[test]
    fn ignored_files_are_warned_about_once() {
        let first: BTreeMap<String, String> = [("A.wasm".to_string(), "bad name".to_string())].into();
        let none = BTreeMap::new();
        assert_eq!(not_yet_warned(&none, &first).count(), 1);
        assert_eq!(not_yet_warned(&first, &first).count(), 0);
        let changed: BTreeMap<String, String> = [("A.wasm".to_string(), "a directory".to_string())].into();
        assert_eq!(not_yet_warned(&first, &changed).count(), 1);
    }
}
