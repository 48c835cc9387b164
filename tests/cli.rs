//! The real `hivemind` binary: `up` with no config, client commands against a
//! host, their JSON output and their errors, and the role scaffold.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// `roles list --json` is an array of objects with name, state, version,
/// digest and last_error.
#[tokio::test(flavor = "multi_thread")]
async fn roles_list_json_has_the_documented_fields() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let output = cli(&host, &["roles", "list", "--json"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let roles: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let role = &roles.as_array().unwrap()[0];
    assert_eq!(role["name"], "probe");
    assert_eq!(role["state"], "running");
    assert_eq!(role["version"], "0.1.0");
    assert_eq!(role["digest"], sha256_hex(&probe()));
    assert!(role.as_object().unwrap().contains_key("last_error"));
    host.stop().await;
}

/// `roles list` prints a human table with the role on one line.
#[tokio::test(flavor = "multi_thread")]
async fn roles_list_prints_a_table() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let output = cli(&host, &["roles", "list"]).await;
    let text = stdout(&output);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.lines()
            .any(|line| line.starts_with("probe") && line.contains("running") && line.contains("0.1.0")),
        "{text}"
    );
    host.stop().await;
}

/// `hivemind role NAME CMD ARGS...` reaches the role's route and prints its body.
#[tokio::test(flavor = "multi_thread")]
async fn role_command_prints_the_body() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    let set = cli(&host, &["role", "probe", "state-set", "answer", "42"]).await;
    assert!(set.status.success(), "{}", stderr(&set));
    let get = cli(&host, &["role", "probe", "state-get", "answer"]).await;
    assert_eq!(stdout(&get), "42\n");
    host.stop().await;
}

/// `roles install` returns once the role is live; a bad file exits non-zero
/// with the reason on one line.
#[tokio::test(flavor = "multi_thread")]
async fn install_waits_for_live_or_rejected() {
    let host = TestHost::start().await;
    let work = tempfile::tempdir().unwrap();
    let wasm = work.path().join("probe.wasm");
    std::fs::write(&wasm, probe()).unwrap();
    let manifest = work.path().join("probe-manifest.toml");
    std::fs::write(&manifest, "[config]\nfrom = \"install\"\n").unwrap();
    let installed = cli(
        &host,
        &[
            "roles",
            "install",
            wasm.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    )
    .await;
    assert!(installed.status.success(), "{}", stderr(&installed));
    assert!(
        stdout(&installed).contains("probe 0.1.0 is running"),
        "{}",
        stdout(&installed)
    );
    assert_eq!(host.api().role("probe", "config", &[]).await.json()["from"], "install");

    let junk = work.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let rejected = cli(&host, &["roles", "install", junk.to_str().unwrap()]).await;
    assert!(!rejected.status.success());
    let message = stderr(&rejected);
    assert!(
        message.contains("junk was rejected")
            && message.contains("not a WebAssembly file")
            && message.contains("nothing serves as junk")
            && message.contains("hivemind roles remove junk"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "{message}");

    // A bad version over a running role says the running one stays.
    let bad_probe = work.path().join("probe-bad.wasm");
    std::fs::write(&bad_probe, b"\0asm but not really").unwrap();
    let replaced = cli(
        &host,
        &["roles", "install", bad_probe.to_str().unwrap(), "--name", "probe"],
    )
    .await;
    assert!(!replaced.status.success());
    let message = stderr(&replaced);
    assert!(
        message.contains("probe was rejected")
            && message.contains("probe 0.1.0 (digest ")
            && message.contains("keeps serving"),
        "{message}"
    );
    assert_eq!(host.api().role("probe", "config", &[]).await.json()["from"], "install");
    host.stop().await;
}

/// pause, resume, reload, disable and enable from the CLI print the new state.
#[tokio::test(flavor = "multi_thread")]
async fn role_actions_print_the_new_state() {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    for (verb, state) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("reload", "running"),
        ("disable", "disabled"),
        ("enable", "running"),
    ] {
        let output = cli(&host, &["roles", verb, "probe"]).await;
        assert!(output.status.success(), "{verb}: {}", stderr(&output));
        assert_eq!(stdout(&output), format!("probe: {state}\n"), "{verb}");
    }
    host.stop().await;
}

/// A client with a wrong token, or no host at all, fails with one line.
#[tokio::test(flavor = "multi_thread")]
async fn client_errors_are_one_line() {
    let host = TestHost::start().await;
    let wrong = cli(&host, &["roles", "list", "--token", "nope"]).await;
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("wrong token"), "{}", stderr(&wrong));
    assert_eq!(stderr(&wrong).trim().lines().count(), 1);

    let unknown = cli(&host, &["role", "ghost", "hello"]).await;
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no role named `ghost`"),
        "{}",
        stderr(&unknown)
    );

    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nobody = cli(&host, &["status", "--api", &free_port.to_string()]).await;
    assert!(!nobody.status.success());
    assert!(stderr(&nobody).contains("cannot reach the host"), "{}", stderr(&nobody));

    // A data directory no host has used says so and how to point at one.
    let empty = tempfile::tempdir().unwrap();
    let elsewhere = std::process::Command::new(hivemind_bin())
        .arg("--data-dir")
        .arg(empty.path())
        .arg("status")
        .env_remove("HIVEMIND_TOKEN")
        .env_remove("HIVEMIND_API")
        .output()
        .unwrap();
    assert!(!elsewhere.status.success());
    let message = stderr(&elsewhere);
    assert!(
        message.contains("no host has run with the data directory")
            && message.contains(&empty.path().display().to_string())
            && message.contains("--data-dir"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    host.stop().await;
}

/// `hivemind up` with only a data directory creates it, installs the bundled
/// roles, serves the API with a 0600 token, and exits cleanly on SIGTERM;
/// its log, written to a pipe rather than a terminal, has no colour codes.
#[test]
fn up_starts_with_no_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A manifest prepared before the first start is kept: move the bundled
    // dns role off its default port so this test never collides with a host
    // already running on this machine.
    std::fs::create_dir_all(data.join("roles")).unwrap();
    std::fs::write(
        data.join("roles/dns.toml"),
        "[[listeners]]\nname = \"dns\"\naddress = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let daemon = Command::new(hivemind_bin())
        .args(["--data-dir", data.to_str().unwrap(), "up", "--api", "127.0.0.1:0"])
        .args(["--transport", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        let output = Command::new(hivemind_bin())
            .args(["--data-dir", data.to_str().unwrap(), "status", "--json"])
            .output()
            .unwrap();
        if output.status.success() {
            let status: Value = serde_json::from_slice(&output.stdout).unwrap();
            let roles = status["roles"].as_array().unwrap();
            if roles.len() == artifacts::BUNDLED.len() && roles.iter().all(|role| role["state"] == "running") {
                break status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the host did not come up: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["status"]["cluster"]["mode"], "single-node");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    for (name, _, _) in artifacts::BUNDLED {
        assert!(
            data.join("roles").join(format!("{name}.wasm")).exists(),
            "bundled role {name} not installed"
        );
    }

    unsafe_kill(daemon.id(), 15);
    let output = daemon.wait_with_output().unwrap();
    assert!(output.status.success(), "exit status {:?}", output.status);
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("role loaded"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a piped log: {log:?}");
}

fn unsafe_kill(pid: u32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// `roles new` scaffolds a Rust role whose `./build.sh` builds it offline
/// into NAME.wasm, which loads into a host. (The other languages are in
/// tests/languages.rs.)
#[tokio::test(flavor = "multi_thread")]
async fn scaffolded_role_builds_and_loads() {
    let host = TestHost::start().await;
    let work = tempfile::tempdir().unwrap();
    let created = Command::new(hivemind_bin())
        .args(["roles", "new", "greeter", "--dir", work.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let project = work.path().join("greeter");
    // Reuse the workspace's guest build directory so dependencies are warm.
    let target_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/wasm-roles");
    let script = project.join("build.sh");
    let build = tokio::task::spawn_blocking(move || {
        Command::new(script)
            .env("CARGO_TARGET_DIR", target_dir)
            .env("CARGO_NET_OFFLINE", "true")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let wasm = read(project.join("greeter.wasm").to_str().unwrap());
    host.drop_role("greeter", &wasm, None);
    host.wait_live("greeter", &wasm).await;
    let reply = host.api().role("greeter", "hello", &["world"]).await;
    assert_eq!(reply.text(), "[\"world\"]");
    host.stop().await;
}

/// `roles install` shows progress while a version takes long to load, then
/// reports it live.
#[tokio::test(flavor = "multi_thread")]
async fn install_shows_progress_while_loading() {
    let host = TestHost::start().await;
    let work = tempfile::tempdir().unwrap();
    let wasm = work.path().join("slow.wasm");
    std::fs::write(&wasm, misbehave()).unwrap();
    std::fs::write(
        work.path().join("slow.toml"),
        "[config]\ninit = \"slow\"\ninit_ms = 2600\n",
    )
    .unwrap();
    let output = cli(&host, &["roles", "install", wasm.to_str().unwrap()]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("slow: compiling and initializing"),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).contains("is running"), "{}", stdout(&output));
    host.stop().await;
}

/// `events tail --follow` prints committed events, then new ones as they
/// commit, over the server-sent event stream; the host still stops cleanly
/// with the stream open.
#[tokio::test(flavor = "multi_thread")]
async fn events_tail_follows_new_events() {
    use std::io::BufRead;
    let host = TestHost::start().await;
    let before = host.api().emit("test.follow", "before").await;
    let mut tail = Command::new(hivemind_bin())
        .args([
            "--data-dir",
            host.data_dir().to_str().unwrap(),
            "events",
            "tail",
            "--follow",
            "--json",
            "--kind",
            "test.",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .take(2)
            .map(|line| line.unwrap())
            .collect::<Vec<String>>()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.api().emit("other.kind", "skipped").await;
    let after = host.api().emit("test.follow", "after").await;
    let lines = tokio::task::spawn_blocking(move || lines.join().unwrap())
        .await
        .unwrap();
    let seqs: Vec<u64> = lines
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [before, after], "{lines:?}");
    host.stop().await;
    let _ = tail.kill();
    let _ = tail.wait();
}

/// `roles test` runs a role in a sandbox without a host: events and
/// requests go in; answers, logs and state come out as text and `--json`;
/// state survives `--reload`. A trapping call exits 1, and a malformed
/// events line is refused naming the file and line.
#[test]
fn roles_test_runs_a_role_in_a_sandbox() {
    let work = tempfile::tempdir().unwrap();
    let wasm = work.path().join("rust-counter.wasm");
    std::fs::write(&wasm, read(artifacts::ROLE_RUST_COUNTER)).unwrap();
    let events = work.path().join("events.jsonl");
    std::fs::write(
        &events,
        concat!(
            r#"{"kind": "service.up", "key": "web@n1", "payload": {"port": 80}}"#,
            "\n",
            r#"{"kind": "service.up", "key": "db@n1"}"#,
            "\n\n",
            r#"{"kind": "node.joined", "key": "n2"}"#,
            "\n",
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(hivemind_bin())
            .args(["roles", "test"])
            .arg(&wasm)
            .args(args)
            .output()
            .unwrap()
    };

    let text = run(&["--events", events.to_str().unwrap(), "--request", "GET /counts"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let shown = stdout(&text);
    for line in [
        "loaded rust-counter 0.1.0",
        "event service.up web@n1: ok",
        "GET /counts -> 200",
        r#"{"db":1,"web":1}"#,
        "count/web = 1",
    ] {
        assert!(shown.contains(line), "{line:?} missing from:\n{shown}");
    }

    let json = run(&[
        "--events",
        events.to_str().unwrap(),
        "--reload",
        "--request",
        r#"POST /counts {"args": ["web"]}"#,
        "--json",
    ]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["events"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(report["requests"][0]["response"]["status"], 200, "{report}");
    assert_eq!(report["requests"][0]["response"]["body"], r#"{"web":1}"#, "{report}");
    assert_eq!(report["state"]["count/db"], "1", "{report}");
    let inits = report["logged"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|line| line["message"].as_str().unwrap().starts_with("counting"))
        .count();
    assert_eq!(inits, 2, "init runs on load and on reload: {report}");

    let trapping = work.path().join("misbehave.wasm");
    std::fs::write(&trapping, misbehave()).unwrap();
    let trapped = Command::new(hivemind_bin())
        .args(["roles", "test"])
        .arg(&trapping)
        .args(["--request", "GET /trap"])
        .output()
        .unwrap();
    assert_eq!(trapped.status.code(), Some(1), "{}", stdout(&trapped));
    assert!(stdout(&trapped).contains("GET /trap -> FAILED"), "{}", stdout(&trapped));

    std::fs::write(&events, "{\"kind\": \"service.up\", \"key\": \"a\"}\n{\"kind\": 7}\n").unwrap();
    let malformed = run(&["--events", events.to_str().unwrap()]);
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("events.jsonl line 2"),
        "{}",
        stderr(&malformed)
    );
}
