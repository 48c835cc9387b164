//! Roles per language: the counter example in Rust, Python, JavaScript and C
//! (`roles/examples`), each built with its toolchain (`scripts/role-toolchains`)
//! and run through the host's runtime in this process. Prints per language:
//! component size, first compile, cached load (compiled code read from the
//! cache, then instantiate + describe + init, as a restart or revert does),
//! and the `on-request` call: a not-found answer (the call's own overhead)
//! and `counts` over three services in state; median and p99.
//!
//! Targets: cached load <= 100 ms for every example; call overhead within
//! 10x of the Rust example's.
//!
//! For Python and JavaScript, a floor row measures the smallest component
//! the toolchain makes (a constant answer, no SDK): what any role in that
//! language pays per call.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hivemind_bench::{Summary, micros, millis, summarize, verdict};
use hivemind_harness::SandboxHost;
use hivemind_runtime::{Event, LoadedRole, Request, RoleLimits, Runtime, RuntimeConfig};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Cached loads measured per language.
const LOADS: usize = 5;
/// Calls measured per kind of request, after as many again to warm up.
const CALLS: usize = 3000;

/// The smallest Python role: constant answers, straight on the bindings.
const PYTHON_FLOOR: &str = r#"
import wit_world
from wit_world.imports import types

class WitWorld(wit_world.WitWorld):
    def describe(self):
        return types.Description("floor", "0.1.0", [], 0)
    def init(self):
        pass
    def on_event(self, event):
        pass
    def on_request(self, request):
        return types.Response(404, [], b'{"error":"no"}')
    def on_packet(self, listener, peer, data):
        return None
    def on_tick(self):
        pass
"#;

/// The smallest JavaScript role.
const JS_FLOOR: &str = r#"
const body = new TextEncoder().encode('{"error":"no"}');
export function describe() { return { name: "floor", version: "0.1.0", subscribes: [], tickIntervalMs: 0 }; }
export function init() {}
export function onEvent(event) {}
export function onRequest(request) { return { status: 404, headers: [], body }; }
export function onPacket(listener, peer, data) { return undefined; }
export function onTick() {}
"#;

struct Figures {
    language: &'static str,
    /// A floor row: no SDK, no `counts`.
    floor: bool,
    bytes: usize,
    first_compile: Duration,
    cached_read: Duration,
    cached_start: Duration,
    not_found: Summary,
    counts: Option<Summary>,
}

fn main() -> anyhow::Result<()> {
    let toolchains = Command::new(Path::new(REPO).join("scripts/role-toolchains"))
        .output()
        .context("scripts/role-toolchains")?;
    anyhow::ensure!(
        toolchains.status.success(),
        "scripts/role-toolchains failed:\n{}",
        String::from_utf8_lossy(&toolchains.stderr)
    );
    let mut path: Vec<std::path::PathBuf> = String::from_utf8(toolchains.stdout)?.lines().map(Into::into).collect();
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let path = std::env::join_paths(path)?;
    let hivemind = Path::new(REPO).join("target/release/hivemind");

    let work = tempfile::tempdir()?;
    let mut components = vec![("rust", std::fs::read(hivemind_role_artifacts::ROLE_RUST_COUNTER)?)];
    let floors = build_floors(work.path(), &path)?;
    for (language, example) in [("python", "python-counter"), ("js", "js-counter"), ("c", "c-counter")] {
        let out = work.path().join(format!("{example}.wasm"));
        let build = Path::new(REPO).join("roles/examples").join(example).join("build");
        let output = Command::new(&build)
            .arg(&out)
            .env("PATH", &path)
            .env("HIVEMIND", &hivemind)
            .output()
            .with_context(|| build.display().to_string())?;
        anyhow::ensure!(
            output.status.success(),
            "{} failed:\n{}",
            build.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        components.push((language, std::fs::read(&out)?));
    }
    components.extend(floors);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let figures = runtime.block_on(async {
        let mut figures = Vec::new();
        for (language, bytes) in &components {
            figures.push(measure(language, bytes, work.path()).await?);
        }
        anyhow::Ok(figures)
    })?;

    let rust_overhead = micros(figures[0].not_found.median);
    let counts = |figure: &Figures| match &figure.counts {
        Some(counts) => format!("{:>14.1} / {:>5.1} us", micros(counts.median), micros(counts.p99)),
        None => format!("{:>24}", "-"),
    };
    println!("roles per language: the counter example, run in-process by the host's runtime");
    println!(
        "  {:<13} {:>9} {:>14} {:>26} {:>24} {:>24} {:>10}",
        "",
        "size",
        "first compile",
        "cached load (read+start)",
        "call: not found p50/p99",
        "call: counts p50/p99",
        "vs Rust"
    );
    for figure in &figures {
        println!(
            "  {:<13} {:>7.1}MB {:>11.0} ms {:>12.1} ms ({:.1}+{:.1}) {:>14.1} / {:>5.1} us {} {:>9.1}x",
            figure.language,
            figure.bytes as f64 / 1e6,
            millis(figure.first_compile),
            millis(figure.cached_read + figure.cached_start),
            millis(figure.cached_read),
            millis(figure.cached_start),
            micros(figure.not_found.median),
            micros(figure.not_found.p99),
            counts(figure),
            micros(figure.not_found.median) / rust_overhead,
        );
    }
    let examples = || figures.iter().filter(|figure| !figure.floor);
    let slowest_load = examples()
        .map(|figure| figure.cached_read + figure.cached_start)
        .max()
        .unwrap_or_default();
    let worst_ratio = examples()
        .map(|figure| micros(figure.not_found.median) / rust_overhead)
        .fold(0.0, f64::max);
    println!(
        "  cached load, slowest: {:.1} ms   (target <= 100 ms for every example -> {})",
        millis(slowest_load),
        verdict(slowest_load <= Duration::from_millis(100))
    );
    println!(
        "  call overhead, largest: {worst_ratio:.1}x Rust's   (target <= 10x -> {})",
        verdict(worst_ratio <= 10.0)
    );
    Ok(())
}

async fn measure(language: &'static str, bytes: &[u8], work: &Path) -> anyhow::Result<Figures> {
    let label: String = language.chars().filter(char::is_ascii_alphanumeric).collect();
    let cache = work.join(format!("cache-{label}"));
    let name = format!("{label}-counter");

    let started = Instant::now();
    Runtime::new(RuntimeConfig::new(&cache))?.compile(bytes)?;
    let first_compile = started.elapsed();

    // As a restart does: a new runtime finds the compiled code in its cache.
    let runtime = Runtime::new(RuntimeConfig::new(&cache))?;
    let mut reads = Vec::new();
    let mut starts = Vec::new();
    let mut role = None;
    for _ in 0..LOADS {
        let started = Instant::now();
        let compiled = runtime.compile(bytes)?;
        anyhow::ensure!(compiled.cache_hit, "{language}: the second compile missed the cache");
        let read = started.elapsed();
        let loaded = runtime
            .load(
                &name,
                compiled,
                RoleLimits::default(),
                Arc::new(SandboxHost::new(&name, Default::default())),
            )
            .await?;
        starts.push(started.elapsed() - read);
        reads.push(read);
        role = Some(loaded);
    }
    let role = role.expect("at least one load");

    for (seq, key) in [(1, "web@n1"), (2, "web@n2"), (3, "db@n1"), (4, "queue@n1")] {
        let event = Event {
            seq,
            epoch: 1,
            kind: "service.up".into(),
            key: key.into(),
            source: "bench".into(),
            timestamp_ms: 0,
            payload: b"{}".to_vec(),
        };
        role.on_event(&event).await?.map_err(anyhow::Error::msg)?;
    }
    let floor = language.ends_with("(floor)");
    let not_found = calls(&role, "/nothing-here", 404).await?;
    let counts = if floor {
        None
    } else {
        Some(calls(&role, "/counts", 200).await?)
    };
    Ok(Figures {
        language,
        floor,
        bytes: bytes.len(),
        first_compile,
        cached_read: summarize(&mut reads).median,
        cached_start: summarize(&mut starts).median,
        not_found,
        counts,
    })
}

/// Times `CALLS` GETs of `path`, each expected to answer `status`.
async fn calls(role: &LoadedRole, path: &str, status: u16) -> anyhow::Result<Summary> {
    let request = Request {
        method: "GET".into(),
        path: path.into(),
        query: String::new(),
        headers: vec![],
        body: vec![],
    };
    let mut samples = Vec::with_capacity(CALLS);
    for call in 0..CALLS * 2 {
        let started = Instant::now();
        let response = role.on_request(&request).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            response.status == status,
            "{} {path}: {} {}",
            role.name(),
            response.status,
            String::from_utf8_lossy(&response.body)
        );
        if call >= CALLS {
            samples.push(elapsed);
        }
    }
    Ok(summarize(&mut samples))
}

/// Builds the floor components of Python and JavaScript.
fn build_floors(work: &Path, path: &std::ffi::OsStr) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let wit = Path::new(REPO).join("wit");
    let python = work.join("python-floor");
    std::fs::create_dir_all(&python)?;
    std::fs::write(python.join("app.py"), PYTHON_FLOOR)?;
    let mut componentize_py = Command::new("componentize-py");
    componentize_py
        .arg("-d")
        .arg(&wit)
        .args(["-w", "role", "componentize", "-p", ".", "app", "-o", "floor.wasm"])
        .current_dir(&python);
    let js = work.join("js-floor");
    std::fs::create_dir_all(&js)?;
    std::fs::write(js.join("role.js"), JS_FLOOR)?;
    let mut componentize_js = Command::new("componentize-js");
    componentize_js
        .arg("role.js")
        .arg("--wit")
        .arg(&wit)
        .args(["-n", "role", "-d", "http", "fetch-event", "-o", "floor.wasm"])
        .current_dir(&js);
    let mut floors = Vec::new();
    for (label, mut command, dir) in [
        ("python (floor)", componentize_py, python),
        ("js (floor)", componentize_js, js),
    ] {
        let output = command
            .env("PATH", path)
            .output()
            .with_context(|| format!("{command:?}"))?;
        anyhow::ensure!(
            output.status.success(),
            "{command:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        floors.push((label, std::fs::read(dir.join("floor.wasm"))?));
    }
    Ok(floors)
}
