//! Bad input gets a clear error, the host stays up, and other roles keep
//! serving: broken files, bad manifests, misbehaving roles, bad API calls.

mod support;

use serde_json::json;
use support::*;

/// Starts a host with the well-behaved probe role loaded.
async fn host_with_probe() -> TestHost {
    let host = TestHost::start().await;
    host.drop_role("probe", &probe(), None);
    host.wait_live("probe", &probe()).await;
    host
}

/// Asserts the probe still answers, i.e. the host and other roles are fine.
async fn assert_probe_serves(host: &TestHost) {
    let reply = host.api().role("probe", "version", &[]).await;
    assert_eq!((reply.status, reply.text()), (200, "0.1.0".to_string()));
}

/// Random bytes named x.wasm are rejected as "not a WebAssembly file".
#[tokio::test(flavor = "multi_thread")]
async fn random_bytes() {
    let host = host_with_probe().await;
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    host.drop_role("x", &junk, None);
    let error = host.wait_rejected("x", &junk).await;
    assert!(error.contains("not a WebAssembly file"), "{error}");
    assert_eq!(host.api().role_info("x").await["state"], "failed");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A truncated copy of a good role is rejected as an invalid component.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_component() {
    let host = host_with_probe().await;
    let good = misbehave();
    let truncated = &good[..good.len() * 2 / 3];
    host.drop_role("cut", truncated, None);
    let error = host.wait_rejected("cut", truncated).await;
    assert!(error.contains("not a valid WebAssembly component"), "{error}");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A core module is rejected with the way to turn it into a component.
#[tokio::test(flavor = "multi_thread")]
async fn core_module_is_not_a_component() {
    let host = host_with_probe().await;
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    host.drop_role("core", &core_module, None);
    let error = host.wait_rejected("core", &core_module).await;
    assert!(
        error.contains("core WebAssembly module") && error.contains("wasm-tools component new"),
        "{error}"
    );
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A component importing wasi:sockets loads (Python's and JavaScript's
/// toolchains import it), but its attempt to connect is refused: the
/// listener it aims at never sees a connection.
#[tokio::test(flavor = "multi_thread")]
async fn component_using_sockets_is_denied_them() {
    let host = host_with_probe().await;
    let sockets = read(artifacts::ROLE_SOCKETS);
    host.drop_role("sockets", &sockets, None);
    host.wait_live("sockets", &sockets).await;
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let address = target.local_addr().unwrap().to_string();
    let reply = host.api().role("sockets", "connect", &[&address]).await;
    assert_eq!(reply.status, 500, "{}", reply.text());
    assert!(reply.text().to_lowercase().contains("denied"), "{}", reply.text());
    assert_eq!(
        target.accept().map_err(|error| error.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "the role reached the listener"
    );
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A component importing an interface the host does not provide is refused
/// with the import named.
#[tokio::test(flavor = "multi_thread")]
async fn component_importing_an_unknown_interface() {
    let host = host_with_probe().await;
    let foreign = read(artifacts::ROLE_FOREIGN);
    host.drop_role("foreign", &foreign, None);
    let error = host.wait_rejected("foreign", &foreign).await;
    assert!(error.contains("acme:weather/forecast"), "{error}");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A misspelt manifest key is refused with file, line and key; the role's
/// previous version keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn manifest_with_misspelt_key() {
    let host = host_with_probe().await;
    std::fs::write(
        host.roles_dir().join("probe.toml"),
        "[limits]\nworkers = 2\nmemroy_mb = 8\n",
    )
    .unwrap();
    let info = host
        .wait_role("probe", "the manifest error", |info| !info["last_error"].is_null())
        .await;
    let error = info["last_error"].as_str().unwrap();
    assert!(
        error.contains("probe.toml") && error.contains("line 3") && error.contains("memroy_mb"),
        "{error}"
    );
    assert_eq!(info["state"], "running");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A manifest value of the wrong type is refused with the line and key.
#[tokio::test(flavor = "multi_thread")]
async fn manifest_with_wrong_type() {
    let host = host_with_probe().await;
    host.drop_role("typed", &misbehave(), Some("[limits]\ncpu_ms = \"fast\"\n"));
    let error = host.wait_rejected("typed", &misbehave()).await;
    assert!(
        error.contains("typed.toml") && error.contains("line 2") && error.contains("cpu_ms"),
        "{error}"
    );
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A role whose init traps is rejected with the trap named.
#[tokio::test(flavor = "multi_thread")]
async fn init_traps() {
    let host = host_with_probe().await;
    host.drop_role("init-trap", &misbehave(), Some("[config]\ninit = \"trap\"\n"));
    let error = host.wait_rejected("init-trap", &misbehave()).await;
    assert!(
        error.contains("`init` trapped") && error.contains("unreachable"),
        "{error}"
    );
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A role whose init loops forever is cut off by its init CPU limit.
#[tokio::test(flavor = "multi_thread")]
async fn init_loops() {
    let host = host_with_probe().await;
    host.drop_role(
        "init-loop",
        &misbehave(),
        Some("[limits]\ninit_cpu_ms = 200\n[config]\ninit = \"loop\"\n"),
    );
    let error = host.wait_rejected("init-loop", &misbehave()).await;
    assert!(error.contains("CPU time limit of 200 ms"), "{error}");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A new version whose init fails is not swapped in: the old one keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn failing_init_keeps_old_version() {
    let host = host_with_probe().await;
    host.drop_role("flaky", &misbehave(), None);
    host.wait_live("flaky", &misbehave()).await;
    std::fs::write(host.roles_dir().join("flaky.toml"), "[config]\ninit = \"fail\"\n").unwrap();
    let info = host
        .wait_role("flaky", "the init error", |info| !info["last_error"].is_null())
        .await;
    assert!(
        info["last_error"].as_str().unwrap().contains("init refused on purpose"),
        "{info:#}"
    );
    assert_eq!(info["state"], "running");
    assert_eq!(host.api().role("flaky", "ok", &[]).await.text(), "ok");
    host.stop().await;
}

/// Calls that loop, hog memory, trap, panic or answer 10 MB each fail with
/// their own explanation; the role and the host keep serving.
#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_calls_are_contained() {
    let host = host_with_probe().await;
    // The call budget is wall time less host time, so on a busy machine
    // touching 64 MiB can outlast the default 100 ms; a second keeps the
    // memory limit the one `hog` reaches first.
    host.drop_role(
        "misbehave",
        &misbehave(),
        Some("[limits]\nmax_consecutive_traps = 100\ncpu_ms = 1000\n"),
    );
    host.wait_live("misbehave", &misbehave()).await;
    let api = host.api();
    for (command, status, expected) in [
        ("loop", 502, "CPU time limit of 1000 ms"),
        ("hog", 502, "memory limit of 64 MiB"),
        ("trap", 502, "unreachable"),
        ("panic", 502, "misbehave panicked on purpose"),
        ("huge", 502, "10485760-byte response"),
    ] {
        let reply = api.role("misbehave", command, &[]).await;
        assert_eq!(reply.status, status, "{command}: {}", reply.text());
        assert!(reply.error().contains(expected), "{command}: {}", reply.error());
        assert_eq!(api.role("misbehave", "ok", &[]).await.text(), "ok", "after {command}");
        assert_probe_serves(&host).await;
    }
    host.stop().await;
}

/// Time a call spends asleep in WASI counts against `cpu_ms`, as the guide
/// says (only this contract's host calls are the host's time): a 400 ms
/// sleep is stopped at a 100 ms budget, and the role serves on.
#[tokio::test(flavor = "multi_thread")]
async fn sleeping_in_wasi_counts_against_cpu_ms() {
    let host = host_with_probe().await;
    host.drop_role("misbehave", &misbehave(), Some("[limits]\ncpu_ms = 100\n"));
    host.wait_live("misbehave", &misbehave()).await;
    let api = host.api();
    let slept = api.role("misbehave", "sleep", &["400"]).await;
    assert_eq!(slept.status, 502, "{}", slept.text());
    assert!(slept.error().contains("CPU time limit of 100 ms"), "{}", slept.error());
    let short = api.role("misbehave", "sleep", &["10"]).await;
    assert_eq!((short.status, short.text()), (200, "slept".to_string()));
    host.stop().await;
}

/// A role whose heap only grows (here 1 MiB a call, kept) never traps at its
/// memory limit: past three quarters of it, its instance is retired after
/// the call and the next call starts a fresh one.
#[tokio::test(flavor = "multi_thread")]
async fn an_ever_growing_heap_is_recycled_before_its_limit() {
    let host = host_with_probe().await;
    host.drop_role(
        "misbehave",
        &misbehave(),
        Some("[limits]\nmemory_mb = 16\nworkers = 1\n"),
    );
    host.wait_live("misbehave", &misbehave()).await;
    let api = host.api();
    let mut most_held = 0;
    for call in 0..40 {
        let reply = api.role("misbehave", "leak", &[]).await;
        assert_eq!(reply.status, 200, "call {call}: {}", reply.text());
        most_held = most_held.max(reply.text().parse::<u32>().unwrap());
    }
    assert!(most_held < 16, "an instance held {most_held} MiB of a 16 MiB limit");
    let stats = &api.role_info("misbehave").await["stats"];
    assert_eq!(stats["traps"], 0, "{stats}");
    assert!(stats["recycled"].as_u64().unwrap() >= 3, "{stats}");
    host.stop().await;
}

/// Traps in a row mark the role failed and report it; a reload brings it back.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_traps_fail_the_role_until_reload() {
    let host = host_with_probe().await;
    host.drop_role("misbehave", &misbehave(), Some("[limits]\nmax_consecutive_traps = 3\n"));
    host.wait_live("misbehave", &misbehave()).await;
    let api = host.api();
    // Each trap is a 502; the one that reaches the limit answers 503 failed.
    for expected in [502, 502, 503] {
        assert_eq!(api.role("misbehave", "trap", &[]).await.status, expected);
    }
    let refused = api.role("misbehave", "ok", &[]).await;
    assert_eq!(refused.status, 503);
    assert!(refused.error().contains("failed after 3 traps"), "{}", refused.error());
    assert_eq!(api.role_info("misbehave").await["state"], "failed");
    let status = api.get("/v1/status").await.json();
    let reported = status["recent_failures"].as_array().unwrap();
    assert!(
        reported
            .iter()
            .any(|failure| failure["kind"] == "failed" && failure["role"] == "misbehave"),
        "{status:#}"
    );

    assert_eq!(
        api.post("/v1/roles/misbehave/reload", json!({})).await.json()["state"],
        "running"
    );
    assert_eq!(api.role("misbehave", "ok", &[]).await.text(), "ok");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// Calls queued behind the ones that fail a role are refused at once with
/// the reason; none of them runs (and traps) in turn.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_roles_queued_calls_are_refused_not_run() {
    let host = host_with_probe().await;
    host.drop_role(
        "misbehave",
        &misbehave(),
        Some("[limits]\nworkers = 1\nqueue = 64\ncpu_ms = 300\nmax_consecutive_traps = 3\n"),
    );
    host.wait_live("misbehave", &misbehave()).await;
    let calls = (0..12).map(|_| {
        let api = host.api();
        tokio::spawn(async move { api.role("misbehave", "loop", &[]).await })
    });
    let mut statuses = Vec::new();
    for reply in futures::future::join_all(calls).await {
        let reply = reply.unwrap();
        if reply.status == 503 {
            assert!(reply.error().contains("failed after 3 traps"), "{}", reply.error());
        }
        statuses.push(reply.status);
    }
    statuses.sort();
    assert_eq!(statuses, [[502; 2].as_slice(), &[503; 10]].concat(), "{statuses:?}");
    let stats = &host.api().role_info("misbehave").await["stats"];
    assert_eq!(stats["traps"], 3, "only the calls that failed the role ran: {stats}");
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// A role that fails by traps shows that failure as its error, not an older
/// one (here a rejected manifest) that its running version outlived.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_role_shows_its_failure_not_an_older_error() {
    let host = host_with_probe().await;
    host.drop_role("misbehave", &misbehave(), Some("[limits]\nmax_consecutive_traps = 2\n"));
    host.wait_live("misbehave", &misbehave()).await;
    std::fs::write(
        host.roles_dir().join("misbehave.toml"),
        "[limits]\nmax_consecutive_traps = 2\nmemroy_mb = 8\n",
    )
    .unwrap();
    host.wait_role("misbehave", "the manifest error", |info| !info["last_error"].is_null())
        .await;
    let api = host.api();
    for _ in 0..2 {
        api.role("misbehave", "trap", &[]).await;
    }
    let info = api.role_info("misbehave").await;
    assert_eq!(info["state"], "failed", "{info:#}");
    let error = info["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("failed: ") && error.contains("unreachable"),
        "{error}"
    );
    let listed = api.get("/v1/roles").await.json();
    let listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|role| role["name"] == "misbehave")
        .unwrap();
    assert_eq!(listed["last_error"], info["last_error"], "{listed:#}");
    host.stop().await;
}

/// Role failures are POSTed to the configured webhook as JSON.
#[tokio::test(flavor = "multi_thread")]
async fn failures_reach_the_webhook() {
    let receiver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", receiver.local_addr().unwrap());
    let captured = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = receiver.accept().unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        let body_complete = |request: &[u8]| {
            let text = String::from_utf8_lossy(request);
            text.split_once("\r\n\r\n")
                .is_some_and(|(_, body)| serde_json::from_str::<serde_json::Value>(body).is_ok())
        };
        while !body_complete(&request) {
            let read = stream.read(&mut buffer).unwrap();
            if read == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..read]);
        }
        let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        String::from_utf8_lossy(&request).into_owned()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut config = hivemind::HostConfig::for_tests(dir.path());
    config.webhook = Some(url);
    let host = TestHost::start_with(dir, config).await;
    host.drop_role("misbehave", &misbehave(), None);
    host.wait_live("misbehave", &misbehave()).await;
    host.api().role("misbehave", "trap", &[]).await;
    let request = tokio::task::spawn_blocking(move || captured.join().unwrap())
        .await
        .unwrap();
    assert!(request.starts_with("POST /hook"), "{request}");
    let body: serde_json::Value = serde_json::from_str(request.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        (body["role"].as_str(), body["kind"].as_str()),
        (Some("misbehave"), Some("trapped")),
        "{body:#}"
    );
    host.stop().await;
}

/// API calls without a token or with a wrong one are refused with 401 and
/// a message saying where the token is.
#[tokio::test(flavor = "multi_thread")]
async fn api_requires_the_token() {
    let host = host_with_probe().await;
    let api = host.api();
    let missing = api.with_token(None).send("GET", "/v1/roles", Vec::new()).await;
    assert_eq!(missing.status, 401);
    assert!(missing.error().contains("missing bearer token"), "{}", missing.error());
    let wrong = api
        .with_token(Some("not-the-token"))
        .send("GET", "/v1/roles", Vec::new())
        .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.error().contains("wrong token"), "{}", wrong.error());
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// An unknown role name is a 404 that says how to list roles.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_role_name() {
    let host = host_with_probe().await;
    let info = host.api().get("/v1/roles/nope").await;
    let route = host.api().post("/v1/roles/nope/version", json!({})).await;
    for reply in [info, route] {
        assert_eq!(reply.status, 404);
        assert!(
            reply.error().contains("no role named `nope`") && reply.error().contains("roles list"),
            "{}",
            reply.error()
        );
    }
    host.stop().await;
}

/// Bad event bodies and invalid kinds are refused with the rule broken.
#[tokio::test(flavor = "multi_thread")]
async fn bad_events_are_refused() {
    let host = host_with_probe().await;
    let api = host.api();
    let bad_kind = api.post("/v1/events", json!({ "kind": "has space", "key": "k" })).await;
    assert_eq!(bad_kind.status, 400);
    assert!(bad_kind.error().contains("kind"), "{}", bad_kind.error());
    let not_json = api.send("POST", "/v1/events", b"{nope".to_vec()).await;
    assert_eq!(not_json.status, 400);
    assert!(not_json.error().contains("must be JSON"), "{}", not_json.error());
    let denied = api.role("probe", "emit", &["service.up", "web"]).await;
    assert_eq!(denied.status, 403);
    assert!(denied.error().contains("grants.emit"), "{}", denied.error());
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// Garbage on the node-to-node port of a running host — random bytes, a
/// 4 GB length prefix from a member, a certificate of another CA, a Raft
/// frame from a non-member, a replayed join token — is each refused or
/// dropped; the host keeps committing writes.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_transport_port() {
    use hivemind::quorum::join::{self, ClusterFiles, Credential, JoinRefused, JoinRequest};
    use hivemind::quorum::{NodeAddress, network};
    use hivemind::transport::{self, ClusterCa};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let host = TestHost::start().await;
    let address = host.daemon().transport_addr.clone();
    let closed_within = |mut stream: tokio::net::TcpStream| async move {
        let mut buffer = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    };

    let mut raw = tokio::net::TcpStream::connect(&address).await.unwrap();
    let junk: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let _ = raw.write_all(&junk).await;
    assert!(closed_within(raw).await, "random bytes: connection dropped");

    let files = ClusterFiles::load(&ClusterFiles::dir(host.data_dir()))
        .unwrap()
        .unwrap();
    let member = files.ca.issue("0000000000000bad").unwrap();
    let huge = async {
        let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("node.hivemind").unwrap();
        let mut tls = member.connector().unwrap().connect(name, stream).await.unwrap();
        tls.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        tls.write_all(&[transport::PROTOCOL_VERSION, 10, 0, 0]).await.unwrap();
        tls.flush().await.unwrap();
        let mut buffer = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buffer)).await,
            Ok(Ok(0) | Err(_))
        )
    };
    assert!(huge.await, "a 4 GB length prefix: connection dropped");

    let stranger = ClusterCa::generate("other").unwrap().issue("x").unwrap();
    let refused = transport::connect(&address, &stranger.connector().unwrap(), Duration::from_secs(5)).await;
    let handshake_failed = match refused {
        Err(_) => true,
        Ok(mut connection) => connection.request(network::VOTE, b"{}").await.is_err(),
    };
    assert!(handshake_failed, "a certificate of another CA is refused");

    let joiner = transport::joiner_connector().unwrap();
    let mut outsider = transport::connect(&address, &joiner, Duration::from_secs(5))
        .await
        .unwrap();
    let (kind, reason) = outsider.request(network::APPEND_ENTRIES, b"{}").await.unwrap();
    assert_eq!(kind, network::REFUSED);
    assert!(String::from_utf8_lossy(&reason).contains("cluster certificate"));

    let token = host
        .api()
        .post("/v1/cluster/tokens", json!({ "ttl_secs": 60 }))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let credential = Credential::parse_token(&token).unwrap();
    let request = |id: u64| JoinRequest {
        id,
        address: NodeAddress {
            name: format!("joiner-{id}"),
            transport: "127.0.0.1:9".into(),
            api: "127.0.0.1:9".into(),
        },
        token: None,
        proof: String::new(),
        cluster_id: None,
        epoch: None,
        bootstrap_peers: None,
    };
    join::request_join(&address, &credential, request(0xa1), Duration::from_secs(10))
        .await
        .expect("the first use of a token admits");
    let replay = join::request_join(&address, &credential, request(0xa2), Duration::from_secs(10))
        .await
        .unwrap_err();
    let refused = replay.downcast_ref::<JoinRefused>().expect("a refusal, not a failure");
    assert!(refused.reason.contains("already used"), "{}", refused.reason);

    host.api().emit("test.after-garbage", "k").await;
    host.stop().await;
}

/// An upload never writes through a link: not one planted under the
/// temporary name uploads once used (`.NAME.upload-PID.tmp`), and not one
/// standing where the role file goes, which is refused with 409 naming it.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_never_write_through_links() {
    let host = TestHost::start().await;
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    let planted = format!(".probe.wasm.upload-{}.tmp", std::process::id());
    std::os::unix::fs::symlink(&victim, host.roles_dir().join(planted)).unwrap();

    let reply = host.api().send("PUT", "/v1/role-files/probe.wasm", probe()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    host.wait_live("probe", &probe()).await;
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");

    std::os::unix::fs::symlink(&victim, host.roles_dir().join("other.wasm")).unwrap();
    let reply = host.api().send("PUT", "/v1/role-files/other.wasm", probe()).await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(
        reply.error().contains("other.wasm") && reply.error().contains("symbolic link"),
        "{}",
        reply.error()
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    host.stop().await;
}

/// Concurrent uploads of one role file all succeed, and the file on disk
/// is exactly one of the uploads, never a mix or a false error.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uploads_of_one_file_never_mix() {
    let host = TestHost::start().await;
    let versions = [probe(), probe_v2()];
    for round in 0..3 {
        let uploads = (0..16).map(|upload| {
            let (api, bytes) = (host.api(), versions[upload % 2].clone());
            tokio::spawn(async move { api.send("PUT", "/v1/role-files/probe.wasm", bytes).await })
        });
        for reply in futures::future::join_all(uploads).await {
            let reply = reply.unwrap();
            assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        }
        let on_disk = std::fs::read(host.roles_dir().join("probe.wasm")).unwrap();
        assert!(versions.contains(&on_disk), "round {round}: the file matches no upload");
    }
    let leftovers: Vec<_> = std::fs::read_dir(host.roles_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    host.stop().await;
}

/// One raw HTTP/1.1 exchange with the host's API: status code and body.
fn raw_http(host: &TestHost, head: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(host.daemon().api_addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let request = format!(
        "{head}\r\nHost: hivemind\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    // A server may answer before it read the whole body, and close.
    let _ = stream.write_all(body);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The bearer scheme is case-insensitive (RFC 9110 §11.1): `bearer` and
/// `BEARER` work as `Bearer` does.
#[tokio::test(flavor = "multi_thread")]
async fn the_bearer_scheme_is_case_insensitive() {
    let host = TestHost::start().await;
    let token = host.daemon().token.clone();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (status, body) = raw_http(
            &host,
            &format!("GET /v1/roles HTTP/1.1\r\nAuthorization: {scheme} {token}"),
            b"",
        );
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    let (status, _) = raw_http(
        &host,
        &format!("GET /v1/roles HTTP/1.1\r\nAuthorization: Basic {token}"),
        b"",
    );
    assert_eq!(status, 401, "another scheme is still refused");
    host.stop().await;
}

/// A body over a route's limit is a JSON 413 that names the limit: an event
/// (the payload limit plus room), a request to a role.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_get_a_json_413_naming_the_limit() {
    let host = host_with_probe().await;
    let token = host.daemon().token.clone();
    let payload = "x".repeat(200 << 10);
    let event = format!(r#"{{"kind": "big", "key": "k", "payload": "{payload}"}}"#);
    let (status, body) = raw_http(
        &host,
        &format!("POST /v1/events HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json"),
        event.as_bytes(),
    );
    assert_eq!(status, 413, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(error["error"].as_str().unwrap().contains("at most"), "{error}");

    let (status, body) = raw_http(
        &host,
        &format!("POST /v1/roles/probe/echo HTTP/1.1\r\nAuthorization: Bearer {token}"),
        &vec![b'x'; 9 << 20],
    );
    assert_eq!(status, 413, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(
        error["error"].as_str().unwrap().contains(&(8u64 << 20).to_string()),
        "{error}"
    );
    assert_probe_serves(&host).await;
    host.stop().await;
}

/// Idle connections lock no one out: a node allowed only 256 descriptors
/// is sent 300 connections that never speak to its API and 300 to its DNS
/// listener over TCP, and still answers a query over TCP within one try
/// of five seconds (half the idle timeout: the listener let it in by
/// closing the connection idle the longest) and its API's status.
#[test]
fn idle_connections_lock_no_one_out() {
    let limit = hivemind_core::limits::raise_descriptor_limit();
    assert!(
        limit >= 2048,
        "the hard limit on open files is {limit}; raise it to run this test"
    );
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    node.wrapper = vec!["prlimit".into(), "--nofile=256:256".into()];
    let dns_port = install_bundled_roles(&node);
    node.start();
    let dig = |port: u16| {
        let output = std::process::Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+tcp",
                "+time=5",
                "+tries=1",
                "+short",
            ])
            .arg("n1.node.hive.")
            .output()
            .expect("dig (bind9-dnsutils) runs");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    wait_for("the dns role answers over TCP", || {
        (dig(dns_port) == "127.0.0.1").then_some(())
    });

    let api_port: u16 = node.api.rsplit(':').next().unwrap().parse().unwrap();
    let idle: Vec<std::net::TcpStream> = [api_port, dns_port]
        .into_iter()
        .flat_map(|port| (0..300).map(move |_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()))
        .collect();
    assert_eq!(dig(dns_port), "127.0.0.1", "a TCP query behind 300 idle connections");
    let status = node.status().expect("the API answers behind 300 idle connections");
    assert_eq!(status["node"]["name"], "n1", "{status:#}");
    assert!(node.descriptors().len() < 256);
    drop(idle);
    assert!(node.is_running());
}
