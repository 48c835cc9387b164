//! The wasmtime engine, its instance allocator, the epoch clock that bounds
//! CPU time, and the compile cache.
//!
//! One [`Runtime`] per host. It compiles role bytes into components (or loads
//! them from the cache), checks what they import, and hands out
//! [`LoadedRole`]s. It does not know about files, manifests or the API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::{InstanceState, Role, RolePre};
use crate::error::LoadError;
use crate::host::RoleHost;
use crate::limits::RoleLimits;
use crate::role::LoadedRole;

/// How often the epoch advances while guest code runs. A looping role is
/// noticed within one tick and yields the thread to other tasks at least
/// this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The longest the epoch clock waits while no guest code runs. Every entry
/// into guest code wakes it at once, so this only lets the thread notice
/// that its engine is gone; each wake-up costs an idle host CPU.
const EPOCH_IDLE_WAIT: Duration = Duration::from_secs(1);

/// Advances the engine's epoch, which interrupts guest code to check its CPU
/// budget, every [`EPOCH_TICK`] while guest code may be running. When no
/// call ran or started since the last tick it waits until one starts: an
/// idle host then does not wake 200 times a second for nothing.
pub(crate) struct EpochClock {
    /// Guest calls running now.
    running: AtomicUsize,
    /// Guest calls ever started. Calls that start and end between ticks
    /// (a busy listener's) keep the clock going, so it does not wait after
    /// each tick only for the next call to pay for waking it.
    started: AtomicU64,
    waiting: AtomicBool,
    stop: AtomicBool,
    thread: std::sync::OnceLock<thread::Thread>,
}

/// Held while guest code runs (see [`EpochClock::enter`]).
pub(crate) struct GuestRunning<'a>(&'a EpochClock);

impl Drop for GuestRunning<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpochClock {
    /// Starts the clock's thread for `engine`; it ends when the engine is
    /// dropped or [`EpochClock::stop`] is called.
    fn start(engine: &Engine) -> anyhow::Result<Arc<EpochClock>> {
        let clock = Arc::new(EpochClock {
            running: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let ticking = clock.clone();
        let engine = engine.weak();
        let handle = thread::Builder::new()
            .name("hivemind-epoch".into())
            .spawn(move || ticking.run(engine))?;
        let _ = clock.thread.set(handle.thread().clone());
        Ok(clock)
    }

    fn run(&self, engine: wasmtime::EngineWeak) {
        let mut seen = self.started.load(Ordering::SeqCst);
        while !self.stop.load(Ordering::SeqCst) {
            thread::sleep(EPOCH_TICK);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
            let started = self.started.load(Ordering::SeqCst);
            if started != seen || self.running.load(Ordering::SeqCst) > 0 {
                seen = started;
                continue;
            }
            // Announce the wait, then look again: a call that starts after
            // this sees `waiting` and wakes the thread (both sides use
            // SeqCst, so one of them sees the other).
            self.waiting.store(true, Ordering::SeqCst);
            if self.started.load(Ordering::SeqCst) == seen && self.running.load(Ordering::SeqCst) == 0 {
                thread::park_timeout(EPOCH_IDLE_WAIT);
            }
            self.waiting.store(false, Ordering::SeqCst);
            seen = self.started.load(Ordering::SeqCst);
        }
    }

    /// Marks guest code as running until the guard is dropped, waking the
    /// clock if it waits.
    pub(crate) fn enter(&self) -> GuestRunning<'_> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst)
            && self.waiting.swap(false, Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        GuestRunning(self)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// Instance slots the pooling allocator reserves. Each slot reserves address
/// space (not memory) for its linear memory; 256 slots cover dozens of roles
/// with several workers each.
pub const DEFAULT_POOL_INSTANCES: u32 = 256;

/// Largest linear memory any role may be granted, the pool's slot size.
pub const DEFAULT_POOL_MAX_MEMORY_BYTES: u64 = 1 << 30;

/// Settings of the runtime, from the `[runtime]` table of the host config.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached, by content hash.
    pub cache_dir: PathBuf,
    /// Instance slots of the pooling allocator; 0 selects on-demand allocation.
    pub pool_instances: u32,
    /// Largest memory one instance may have (caps every manifest's limit).
    pub pool_max_memory_bytes: u64,
}

impl RuntimeConfig {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        RuntimeConfig {
            cache_dir: cache_dir.into(),
            pool_instances: DEFAULT_POOL_INSTANCES,
            pool_max_memory_bytes: DEFAULT_POOL_MAX_MEMORY_BYTES,
        }
    }
}

/// Which instance allocator the engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    Pooling {
        instances: u32,
    },
    /// The pool could not be reserved (address space limited?) or was not
    /// asked for; instances are allocated one by one.
    OnDemand,
}

/// A compiled role, ready to be instantiated.
#[derive(Clone)]
pub struct CompiledRole {
    pub(crate) component: Component,
    /// Hex SHA-256 of the role's bytes.
    pub digest: String,
    /// Whether the compiled code came from the cache.
    pub cache_hit: bool,
}

/// The engine and everything shared by all roles.
pub struct Runtime {
    engine: Engine,
    linker: Linker<InstanceState>,
    cache_dir: PathBuf,
    allocator: Allocator,
    max_memory_bytes: u64,
    epoch: Arc<EpochClock>,
}

impl Runtime {
    /// Builds the engine (pooling allocator if it can be reserved), starts the
    /// epoch clock and creates the cache directory.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        // Compiling (cranelift on rayon's pool) is the heaviest work a host
        // does, and never urgent: its threads run at a lower priority so
        // serving threads (DNS packets, bridged bytes, the API) win the CPU
        // while a role compiles. The pool may already exist (another runtime
        // in this process built it); then it stays as it is.
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|index| format!("hivemind-compile-{index}"))
            .start_handler(|_| lower_thread_priority())
            .build_global();
        let (engine, allocator) = build_engine(&config)?;
        let mut linker = Linker::<InstanceState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Role::add_to_linker::<InstanceState, HasSelf<InstanceState>>(&mut linker, |state| state)?;

        std::fs::create_dir_all(&config.cache_dir)
            .map_err(|error| anyhow::anyhow!("create compile cache {}: {error}", config.cache_dir.display()))?;
        // Cache writes a crash cut short; one host owns its cache directory.
        for entry in std::fs::read_dir(&config.cache_dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }

        let epoch = EpochClock::start(&engine)?;

        Ok(Runtime {
            engine,
            linker,
            cache_dir: config.cache_dir,
            allocator,
            max_memory_bytes: config.pool_max_memory_bytes,
            epoch,
        })
    }

    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// Largest memory limit a manifest may ask for.
    pub fn max_memory_bytes(&self) -> u64 {
        self.max_memory_bytes
    }

    /// Compiles `bytes`, or loads the compiled code from the cache when these
    /// exact bytes were compiled before by this engine. Blocking and CPU-heavy
    /// on a miss: call it off the async threads.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledRole, LoadError> {
        check_header(bytes)?;
        let digest = hex::encode(Sha256::digest(bytes));
        let cached = self.cache_path(&digest);
        if cached.exists() {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash (it is in the name),
            // inside the host's own data directory.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => {
                    return Ok(CompiledRole {
                        component,
                        digest,
                        cache_hit: true,
                    });
                }
                Err(error) => {
                    tracing::warn!(path = %cached.display(), %error, "discarding unreadable compile cache entry");
                    let _ = std::fs::remove_file(&cached);
                }
            }
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|error| LoadError::InvalidComponent(format!("{error:#}")))?;
        // The code is compiled and good; a cache that cannot be written
        // costs the next load a compile, not this one its role.
        if let Err(error) = self.store_in_cache(&component, &cached) {
            tracing::warn!(%error, "compiled code not cached; the next load compiles again");
        }
        Ok(CompiledRole {
            component,
            digest,
            cache_hit: false,
        })
    }

    fn cache_path(&self, digest: &str) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        self.cache_dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish()))
    }

    fn store_in_cache(&self, component: &Component, path: &Path) -> Result<(), LoadError> {
        let bytes = component
            .serialize()
            .map_err(|error| LoadError::Cache(format!("{error:#}")))?;
        // Roles with the same bytes (copies under other names) compile at
        // the same time; each write has a temporary file of its own.
        hivemind_core::files::write_file(path, &bytes, hivemind_core::files::Access::Shared)
            .map_err(|error| LoadError::Cache(format!("{}: {error}", path.display())))
    }

    /// Checks imports, instantiates one worker, asks it to `describe` itself
    /// and runs `init`. Only a role that passed all of this is returned.
    pub async fn load(
        &self,
        name: &str,
        compiled: CompiledRole,
        limits: RoleLimits,
        host: Arc<dyn RoleHost>,
    ) -> Result<LoadedRole, LoadError> {
        self.check_imports(&compiled.component)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&compiled.component)
            .map_err(|error| LoadError::Link(format!("{error:#}")))?;
        let pre = RolePre::new(instance_pre).map_err(|error| LoadError::Link(format!("{error:#}")))?;
        LoadedRole::start(name, &self.engine, &self.epoch, pre, compiled.digest, limits, host).await
    }

    /// Refuses imports of interfaces roles are not given, with a hint at the
    /// capability to use instead. (`wasi:sockets` is linked, with every use
    /// refused: see `InstanceState::new`.)
    fn check_imports(&self, component: &Component) -> Result<(), LoadError> {
        let ty = component.component_type();
        for (name, _) in ty.imports(&self.engine) {
            if name.starts_with("wasi:http/") {
                return Err(LoadError::UnsupportedImport {
                    import: name.to_string(),
                    hint: "roles get no HTTP client or server of their own; serve requests through \
                           `on-request` and reach other roles with `call` (componentize-js: build with \
                           `-d http fetch-event`)"
                        .to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.epoch.stop();
    }
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true).epoch_interruption(true);
    // `HIVEMIND_WASM_PERFMAP=1` writes /tmp/perf-PID.map, so `perf report`
    // names the roles' compiled functions.
    if std::env::var_os("HIVEMIND_WASM_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

fn build_engine(settings: &RuntimeConfig) -> anyhow::Result<(Engine, Allocator)> {
    if settings.pool_instances > 0 {
        let mut pool = PoolingAllocationConfig::new();
        let instances = settings.pool_instances;
        pool.total_component_instances(instances)
            // Components from componentize-py carry a dozen core modules and
            // several memories; Rust guests need three or four instances.
            .max_core_instances_per_component(32)
            .max_memories_per_component(8)
            .max_tables_per_component(16)
            .total_core_instances(instances * 8)
            .total_memories(instances * 2)
            .total_tables(instances * 4)
            .total_stacks(instances)
            .max_memory_size(settings.pool_max_memory_bytes as usize)
            .max_component_instance_size(8 << 20)
            .max_core_instance_size(8 << 20)
            .table_elements(100_000);
        let mut config = base_config();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        match Engine::new(&config) {
            Ok(engine) => return Ok((engine, Allocator::Pooling { instances })),
            Err(error) => tracing::warn!(
                %error,
                "cannot reserve the instance pool (is address space limited, e.g. `ulimit -v`?); \
                 falling back to on-demand allocation"
            ),
        }
    }
    Ok((Engine::new(&base_config())?, Allocator::OnDemand))
}

/// Tells random bytes and core modules apart from components before handing
/// them to the compiler, whose messages for these cases are cryptic.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8: version (u16) and layer (u16); layer 0 is a core module,
    // layer 1 a component.
    let layer = u16::from_le_bytes([bytes[6], bytes[7]]);
    if layer == 0 {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

/// How much lower than normal compile threads run (a nice value, 0-19).
const COMPILE_NICENESS: libc::c_int = 10;

/// Lowers the calling thread's CPU priority to [`COMPILE_NICENESS`], for
/// threads that compile roles. On Linux a thread's nice value is its own.
pub fn lower_thread_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no
    // memory of ours.
    unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, COMPILE_NICENESS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no guest code running the epoch clock waits instead of ticking;
    /// entering guest code wakes it, and it ticks for as long as that runs.
    #[test]
    fn the_epoch_clock_waits_while_idle_and_ticks_while_guest_code_runs() {
        let engine = Engine::new(&base_config()).unwrap();
        let clock = EpochClock::start(&engine).unwrap();
        let waits = |clock: &EpochClock| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !clock.waiting.load(Ordering::SeqCst) {
                assert!(std::time::Instant::now() < deadline, "the idle clock never waited");
                thread::sleep(Duration::from_millis(1));
            }
        };
        waits(&clock);
        let running = clock.enter();
        assert!(
            !clock.waiting.load(Ordering::SeqCst),
            "entering guest code wakes the clock"
        );
        for _ in 0..20 {
            thread::sleep(EPOCH_TICK / 2);
            assert!(
                !clock.waiting.load(Ordering::SeqCst),
                "the clock waited while guest code ran"
            );
        }
        drop(running);
        waits(&clock);
        clock.stop();
    }

    /// A pool too large for the address space does not stop the host: the
    /// engine falls back to on-demand allocation.
    #[test]
    fn oversized_pool_falls_back_to_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        // 4 GiB reserved per memory times millions of slots is far beyond the
        // 128 TiB a 47-bit address space offers.
        config.pool_instances = 4_000_000;
        let runtime = Runtime::new(config).unwrap();
        assert_eq!(runtime.allocator(), Allocator::OnDemand);
    }

    /// A modest pool is reserved as configured.
    #[test]
    fn sized_pool_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.pool_instances = 8;
        assert_eq!(
            Runtime::new(config).unwrap().allocator(),
            Allocator::Pooling { instances: 8 }
        );
    }

    /// The header check tells junk, core modules and components apart.
    #[test]
    fn header_check_classifies_files() {
        assert!(matches!(check_header(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    /// Compiling the same bytes twice hits the cache the second time, also
    /// from a new runtime over the same directory (a restart).
    #[test]
    fn compile_cache_is_keyed_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(hivemind_role_artifacts::ROLE_PROBE).unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.pool_instances = 4;
        let first = Runtime::new(config.clone()).unwrap().compile(&bytes).unwrap();
        assert!(!first.cache_hit);
        let again = Runtime::new(config).unwrap().compile(&bytes).unwrap();
        assert!(again.cache_hit);
        assert_eq!(first.digest, again.digest);
    }

    /// The same bytes compiled on several threads at once (copies of a role
    /// under other names) all succeed, and leave one cache entry and no
    /// temp files.
    #[test]
    fn concurrent_compiles_of_the_same_bytes_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(hivemind_role_artifacts::ROLE_PROBE).unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.pool_instances = 4;
        let runtime = Runtime::new(config).unwrap();
        std::thread::scope(|scope| {
            let compiles: Vec<_> = (0..6).map(|_| scope.spawn(|| runtime.compile(&bytes))).collect();
            for compile in compiles {
                compile.join().unwrap().expect("each compile succeeds");
            }
        });
        let cache_files: Vec<String> = std::fs::read_dir(&runtime.cache_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(cache_files.len(), 1, "{cache_files:?}");
        assert!(cache_files[0].ends_with(".cwasm"), "{cache_files:?}");
    }
}
