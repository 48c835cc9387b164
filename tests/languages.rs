//! Roles in Python, JavaScript and C: each example under `roles/examples`
//! builds offline with its language's toolchain (installed by
//! `scripts/role-toolchains`) and runs in a real host: init, events, requests,
//! a reload and a restart, with its state kept across both, a counter
//! through its SDK's `count` at the host's `/metrics`, and a UDP reply the
//! host keeps through its SDK's `keep_reply`.
//! `hivemind roles new --lang` projects build with their own `./build.sh`
//! and load too.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// Python and JavaScript components are 12–20 MB; compiling one can take
/// tens of seconds on a loaded machine, longer than the usual patience.
const COMPILE_PATIENCE: Duration = Duration::from_secs(300);

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// PATH with the toolchains in front, as `scripts/role-toolchains` names
/// them (it installs what is missing; `scripts/test` has run it already).
fn tool_path() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(REPO).join("scripts/role-toolchains");
        let output = Command::new(&script)
            .output()
            .unwrap_or_else(|error| panic!("{}: {error}", script.display()));
        assert!(
            output.status.success(),
            "scripts/role-toolchains failed; the Python, JavaScript and C role toolchains are missing:\n{}",
            stderr(&output)
        );
        let mut dirs: Vec<PathBuf> = stdout(&output).lines().map(PathBuf::from).collect();
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        std::env::join_paths(dirs).unwrap().into_string().unwrap()
    })
}

/// Fails, naming the tool, when any of `tools` is not on the PATH.
fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = std::env::split_paths(tool_path()).any(|dir| dir.join(tool).is_file());
        assert!(found, "{tool} is not on the PATH scripts/role-toolchains gives");
    }
}

/// Runs `script` (a build script) with the toolchains on PATH and `hivemind`
/// as this build's binary; panics with its output when it fails.
async fn run_build(script: &Path, args: &[&str]) {
    let mut command = Command::new(script);
    command
        .args(args)
        .env("PATH", tool_path())
        .env("HIVEMIND", hivemind_bin());
    let shown = script.display().to_string();
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|error| panic!("{shown}: {error}"));
    assert!(
        output.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        stdout(&output),
        stderr(&output)
    );
}

/// Builds `roles/examples/NAME` with its `build` script.
async fn build_example(name: &str, work: &Path) -> Vec<u8> {
    let out = work.join(format!("{name}.wasm"));
    let script = Path::new(REPO).join("roles/examples").join(name).join("build");
    run_build(&script, &[out.to_str().unwrap()]).await;
    read(out.to_str().unwrap())
}

/// Waits until the role serves `wasm` (compiling may take long), and returns
/// its info.
async fn wait_serving(host: &TestHost, name: &str, wasm: &[u8]) -> Value {
    let digest = sha256_hex(wasm);
    let deadline = Instant::now() + COMPILE_PATIENCE;
    loop {
        let info = host.api().role_info(name).await;
        if info["state"] == "running" && info["digest"].as_str().is_some_and(|d| digest.starts_with(d)) {
            return info;
        }
        if info["last_error_digest"]
            .as_str()
            .is_some_and(|d| digest.starts_with(d))
        {
            panic!("{name} was rejected: {}", info["last_error"]);
        }
        assert!(
            Instant::now() < deadline,
            "{name} is not running after {COMPILE_PATIENCE:?}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The latest entry of a role's load history.
fn last_load(info: &Value) -> &Value {
    info["history"]
        .as_array()
        .and_then(|history| history.last())
        .unwrap_or(&Value::Null)
}

/// Asks the role for its counts until they are `expected` (events are
/// delivered asynchronously).
async fn wait_counts(host: &TestHost, name: &str, expected: Value) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = host.api().role(name, "counts", &[]).await;
        if reply.status == 200 && reply.json() == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} counts: {} {} (want {expected})",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The example for one language, end to end: it builds, loads (while it
/// compiles, another role and the API keep answering), counts events per
/// service, answers its command and its errors, and keeps its counts across
/// a reload and a host restart, which loads it from the compile cache.
async fn example_runs_in_a_host(name: &str, tools: &[&str]) {
    require_tools(tools);
    let work = tempfile::tempdir().unwrap();
    let wasm = build_example(name, work.path()).await;
    example_serves(name, &wasm).await;
}

/// The example's counts over UDP: a datagram of a two-byte ID and
/// `counts`, answered with the ID and the counts as JSON.
async fn counts_over_udp(port: u16, id: u16) -> Value {
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut datagram = id.to_be_bytes().to_vec();
    datagram.extend_from_slice(b"counts");
    client.send_to(&datagram, ("127.0.0.1", port)).await.unwrap();
    let mut buffer = [0u8; 1024];
    let length = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
        .await
        .expect("no answer to a counts datagram")
        .unwrap();
    assert_eq!(buffer[..2], id.to_be_bytes(), "the reply carries the datagram's ID");
    serde_json::from_slice(&buffer[2..length])
        .unwrap_or_else(|error| panic!("{error}: {:?}", String::from_utf8_lossy(&buffer[..length])))
}

async fn example_serves(name: &str, wasm: &[u8]) {
    let mut host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let (manifest, port) = udp_listener_manifest("counts");
    host.drop_role(name, wasm, Some(&manifest));
    // A compile in progress blocks neither the API nor other roles: while
    // the host shows this role loading, the probe answers.
    let mut answered_while_loading = 0;
    let deadline = Instant::now() + COMPILE_PATIENCE;
    while answered_while_loading < 10 && Instant::now() < deadline {
        let state = host.api().role_info(name).await["state"].clone();
        if state == "running" || state == "failed" {
            break;
        }
        let reply = host.api().role("probe", "version", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        if !host.api().role_info(name).await["loading"].is_null() {
            answered_while_loading += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = wait_serving(&host, name, wasm).await;
    assert_eq!(last_load(&info)["cache_hit"], false, "{info}");
    // Python and JavaScript components take seconds to compile; a small one
    // may be running before the first look.
    if wasm.len() > 4 << 20 {
        assert!(answered_while_loading > 0, "{name} was never seen loading: {info}");
    }

    host.api().emit("service.up", "web@n1").await;
    host.api().emit("service.down", "web@n1").await;
    host.api().emit("service.up", "db@n1").await;
    host.api().emit("node.joined", "n1").await; // not subscribed: not counted
    wait_counts(&host, name, json!({ "web": 2, "db": 1 })).await;
    // The SDK's `count` reached the host's metrics.
    let metrics = host.api().get("/metrics").await.text();
    for (change, total) in [("up", 2), ("down", 1)] {
        let series = format!(r#"hivemind_counter_service_events_total{{role="{name}",change="{change}"}} {total}"#);
        assert!(
            metrics.contains(&series),
            "{series} in:
{metrics}"
        );
    }

    // Over UDP the role lets the host keep its reply (its SDK's
    // `keep_reply`): a repeat is the host's, counted on the role's tally.
    // The last event's call may still be ending when its counts show (its
    // state is written first), and its end forgets replies kept meanwhile,
    // so repeats go out until one is answered from a kept reply.
    let tally = format!(r#"hivemind_counter_count_queries_total{{role="{name}",kind="counts"}} "#);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 1;
    loop {
        assert_eq!(counts_over_udp(port, id).await, json!({ "web": 2, "db": 1 }));
        let metrics = host.api().get("/metrics").await.text();
        let kept = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&tally))
            .and_then(|count| count.parse::<u64>().ok());
        if kept.is_some_and(|kept| kept >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `{tally}` after {id} queries in\n{metrics}"
        );
        id += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let one = host.api().role(name, "counts", &["web"]).await;
    assert_eq!((one.status, one.json()), (200, json!({ "web": 2 })));
    let unknown = host.api().role(name, "counts", &["nope"]).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(
        unknown.json()["error"].as_str().unwrap().contains("nope"),
        "{}",
        unknown.text()
    );
    let bogus = host.api().role(name, "bogus", &[]).await;
    assert_eq!(bogus.status, 404, "{}", bogus.text());

    // A reload starts fresh instances and runs init again; the counts are
    // state, so they stay.
    let reloaded = host.api().post(&format!("/v1/roles/{name}/reload"), json!({})).await;
    assert_eq!(reloaded.json()["state"], "running", "{}", reloaded.text());
    wait_counts(&host, name, json!({ "web": 2, "db": 1 })).await;
    host.api().emit("service.changed", "web@n1").await;
    wait_counts(&host, name, json!({ "web": 3, "db": 1 })).await;
    // The event made the kept reply stale; the host forgot it.
    assert_eq!(counts_over_udp(port, 3).await, json!({ "web": 3, "db": 1 }));

    // A restart loads the compiled code from the cache; state stays.
    host.restart().await;
    let info = wait_serving(&host, name, wasm).await;
    assert_eq!(last_load(&info)["cache_hit"], true, "{info}");
    wait_counts(&host, name, json!({ "web": 3, "db": 1 })).await;
    host.stop().await;
}

/// The Rust example (built with the workspace) behaves the same; it is the
/// yardstick the others are measured against.
#[tokio::test(flavor = "multi_thread")]
async fn rust_example_runs_in_a_host() {
    example_serves("rust-counter", &read(artifacts::ROLE_RUST_COUNTER)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_example_runs_in_a_host() {
    example_runs_in_a_host("python-counter", &["componentize-py"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn js_example_runs_in_a_host() {
    example_runs_in_a_host("js-counter", &["componentize-js"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn c_example_runs_in_a_host() {
    example_runs_in_a_host("c-counter", &["clang", "wasm-ld", "wit-bindgen", "wasm-tools"]).await;
}

/// `roles new NAME --lang LANG` writes a project whose `./build.sh` makes
/// NAME.wasm, which loads, answers `hello`, and counts events in state.
async fn scaffolded_role_builds_and_loads(language: &str, tools: &[&str]) {
    require_tools(tools);
    let work = tempfile::tempdir().unwrap();
    let name = format!("hello-{language}");
    let created = Command::new(hivemind_bin())
        .args(["roles", "new", &name, "--lang", language, "--dir"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    assert!(stdout(&created).contains("build.sh"), "{}", stdout(&created));
    let project = work.path().join(&name);
    run_build(&project.join("build.sh"), &[]).await;
    let wasm = read(project.join(format!("{name}.wasm")).to_str().unwrap());

    let host = TestHost::start().await;
    let manifest = std::fs::read_to_string(project.join(format!("{name}.toml"))).unwrap();
    host.drop_role(&name, &wasm, Some(&manifest));
    wait_serving(&host, &name, &wasm).await;
    let reply = host.api().role(&name, "hello", &["world", "a \"quoted\" word"]).await;
    assert_eq!(
        (reply.status, reply.json()),
        (200, json!(["world", "a \"quoted\" word"])),
        "{}",
        reply.text()
    );
    host.api().emit("service.up", "web@n1").await;
    let deadline = Instant::now() + PATIENCE;
    while host.api().role(&name, "seen", &[]).await.json() != json!(1) {
        assert!(Instant::now() < deadline, "{name} never counted the event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scaffolded_python_role_builds_and_loads() {
    scaffolded_role_builds_and_loads("python", &["componentize-py"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scaffolded_js_role_builds_and_loads() {
    scaffolded_role_builds_and_loads("js", &["componentize-js"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scaffolded_c_role_builds_and_loads() {
    scaffolded_role_builds_and_loads("c", &["clang", "wasm-ld", "wit-bindgen", "wasm-tools"]).await;
}
