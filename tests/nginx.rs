//! The bundled nginx role against a real nginx (Debian's package, started
//! here with its config, pid file and logs in a temp dir) proxying to real
//! backends: registrations flip the upstream and requests follow, too few
//! healthy instances keep the last upstream, a config nginx rejects or
//! cannot apply leaves the old one serving, and a burst is one reload.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// A backend that answers every HTTP request (or TCP connection) with `name`.
fn backend(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_millis(200))).ok();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    port
}

/// GET / through nginx; the body, or the error.
fn get(port: u16) -> String {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    };
    attempt().unwrap_or_else(|error| format!("error: {error}"))
}

/// Raw TCP through nginx's stream proxy: what the backend sent first.
fn through_stream(port: u16) -> String {
    get(port)
}

fn wait_until(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Nginx {
    dir: PathBuf,
    conf: PathBuf,
}

impl Nginx {
    /// Writes the config and placeholder includes, and starts nginx.
    fn start(dir: &Path, http_port: u16, stream_port: u16) -> Nginx {
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        // Until the role renders, the upstreams point nowhere.
        std::fs::write(
            out.join("http-upstreams.conf"),
            "upstream web { server 127.0.0.1:1; }\n",
        )
        .unwrap();
        std::fs::write(
            out.join("stream-upstreams.conf"),
            "upstream db { server 127.0.0.1:1; }\n",
        )
        .unwrap();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 1;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
                 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
                 include {d}/out/http-upstreams.conf;\n\
                 server {{ listen 127.0.0.1:{http_port}; location / {{ proxy_pass http://web; }} }}\n}}\n\
                 stream {{\n  include {d}/out/stream-upstreams.conf;\n\
                 server {{ listen 127.0.0.1:{stream_port}; proxy_pass db; }}\n}}\n"
            ),
        )
        .unwrap();
        let status = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .status()
            .expect("nginx runs (Debian packages nginx-light and libnginx-mod-stream; scripts/test installs them)");
        assert!(status.success(), "nginx did not start: {}", read_log(dir));
        Nginx {
            dir: dir.to_path_buf(),
            conf,
        }
    }

    fn command(&self, extra: &[&str]) -> Vec<String> {
        let mut command = vec![
            "nginx".to_string(),
            "-p".into(),
            self.dir.display().to_string(),
            "-c".into(),
            self.conf.display().to_string(),
        ];
        command.extend(extra.iter().map(|arg| arg.to_string()));
        command
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("nginx").args(&self.command(&["-s", "stop"])[1..]).status();
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn nginx_manifest(nginx: &Nginx, probe: u16, http_template: Option<&str>) -> String {
    let template = http_template
        .map(|template| format!("http_template = '''{template}'''\n"))
        .unwrap_or_default();
    format!(
        "[limits]\nworkers = 1\n\n[grants]\nwrite_dir = \"{}\"\nexec = [\"nginx\"]\ncheck = [\"127.0.0.1\"]\n\n\
         [config]\nvalidate = {}\nreload = {}\nprobe = \"127.0.0.1:{probe}\"\nsettle_ms = 700\n\
         confirm_timeout_ms = 2000\n{template}\n\
         [[config.upstreams]]\nservice = \"web\"\n\n\
         [[config.upstreams]]\nservice = \"db\"\nkind = \"stream\"\n",
        nginx.dir.join("out").display(),
        toml_list(&nginx.command(&["-t"])),
        toml_list(&nginx.command(&["-s", "reload"])),
    )
}

fn install(node: &NodeProcess, name: &str, wasm: &[u8], manifest: &str) {
    let roles = node.dir.join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    atomic_write(&roles.join(format!("{name}.toml")), manifest.as_bytes());
    atomic_write(&roles.join(format!("{name}.wasm")), wasm);
}

fn nginx_status(node: &NodeProcess) -> Value {
    let output = node.cli(&["role", "nginx", "status", "--json"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| Value::String(stderr(&output)))
}

fn running(node: &NodeProcess, name: &str) -> Option<String> {
    let output = node.cli(&["roles", "list", "--json"]);
    let roles: Value = serde_json::from_slice(&output.stdout).ok()?;
    roles
        .as_array()?
        .iter()
        .find(|role| role["name"] == name && role["state"] == "running")
        .and_then(|role| role["digest"].as_str().map(str::to_string))
}

/// Polls the role's status until `done` holds; panics with the last one.
fn wait_status(node: &NodeProcess, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = nginx_status(node);
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn register(node: &NodeProcess, name: &str, port: u16) {
    let output = node.cli(&["role", "host-events", "register", name, "--port", &port.to_string()]);
    assert!(output.status.success(), "register {name}: {}", stderr(&output));
}

/// Registrations flip the upstream and requests follow; `min_upstreams`
/// holds the last one; a template nginx rejects and a config it cannot
/// apply both leave the old one serving; a burst of changes is one reload.
#[test]
fn nginx_follows_registrations_and_keeps_serving_through_bad_configs() {
    let root = tempfile::tempdir().unwrap();
    let (http_port, stream_port, probe) = (free_port(), free_port(), free_port());
    let nginx = Nginx::start(&root.path().join("nginx"), http_port, stream_port);
    let mut node = NodeProcess::new(root.path(), "n1", Vec::new());
    node.start();
    install(
        &node,
        "host-events",
        &read(artifacts::ROLE_HOST_EVENTS),
        "[limits]\nworkers = 1\n[grants]\nemit = [\"service.\"]\ncheck = [\"*\"]\n",
    );
    install(
        &node,
        "nginx",
        &read(artifacts::ROLE_NGINX),
        &nginx_manifest(&nginx, probe, None),
    );
    wait_until("the roles to run", || {
        running(&node, "nginx").is_some() && running(&node, "host-events").is_some()
    });
    let (a, b, db) = (backend("A"), backend("B"), backend("DB"));

    // Register: nginx proxies to A, and the stream proxy to the db.
    register(&node, "web", a);
    register(&node, "db", db);
    wait_until("requests through nginx to reach A", || get(http_port) == "A");
    wait_until("the stream proxy to reach the db", || {
        through_stream(stream_port) == "DB"
    });
    let status = wait_status(&node, "nginx to be seen serving the new config", |status| {
        status["awaiting"].is_null() && status["generation"].as_u64() > Some(0)
    });
    assert_eq!(status["confirmed"], status["generation"], "{status}");
    assert!(status["last_error"].is_null(), "{status}");

    // Moving the service to B flips the upstream.
    register(&node, "web", b);
    wait_until("requests to follow to B", || get(http_port) == "B");

    // No healthy instance left: min_upstreams (1) keeps B.
    let output = node.cli(&["role", "host-events", "deregister", "web"]);
    assert!(output.status.success(), "{}", stderr(&output));
    wait_status(&node, "the role to hold the upstream", |status| {
        status["held"].to_string().contains("upstream web has 0 healthy")
    });
    assert_eq!(get(http_port), "B", "the held upstream still serves");

    // A burst of changes within the settle time is one reload.
    let reloads = nginx_status(&node)["reloads"].as_u64().unwrap();
    for port in [a, b, a] {
        register(&node, "web", port);
    }
    wait_until("the burst to land on A", || get(http_port) == "A");
    std::thread::sleep(Duration::from_millis(1500));
    let status = nginx_status(&node);
    assert_eq!(status["reloads"].as_u64().unwrap(), reloads + 1, "{status}");

    // A template nginx rejects: `nginx -t` fails, the last good files stay.
    let broken = "{% for upstream in upstreams %}upstream {{ upstream.name }} { bogus_directive on; }{% endfor %}";
    install(
        &node,
        "nginx",
        &read(artifacts::ROLE_NGINX),
        &nginx_manifest(&nginx, probe, Some(broken)),
    );
    // Forced renders are retried until the role runs with the new manifest.
    wait_until("a forced render with the broken template", || {
        stdout(&node.cli(&["role", "nginx", "render"])).contains("nginx rejected")
    });
    let status = nginx_status(&node);
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("bogus_directive"),
        "{status}"
    );
    assert_eq!(get(http_port), "A", "the old config still serves");
    let written = std::fs::read_to_string(nginx.dir.join("out/http-upstreams.conf")).unwrap();
    assert!(!written.contains("bogus_directive"), "{written}");

    // A config nginx accepts but cannot apply (its port is taken): the
    // probe never answers, so the role restores the last good config.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let unbindable = format!(
        "{{% for upstream in upstreams %}}upstream {{{{ upstream.name }}}} {{ {{% for server in upstream.servers %}}server {{{{ server.endpoint }}}}; {{% endfor %}}}}{{% endfor %}}\nserver {{ listen 127.0.0.1:{}; }}",
        taken.local_addr().unwrap().port()
    );
    install(
        &node,
        "nginx",
        &read(artifacts::ROLE_NGINX),
        &nginx_manifest(&nginx, probe, Some(&unbindable)),
    );
    wait_until("the role to notice nginx kept the old config", || {
        let output = node.cli(&["role", "nginx", "render"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let status = wait_status(&node, "the reload to be confirmed or rolled back", |status| {
            status["awaiting"].is_null()
        });
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("is not serving it")
    });
    assert_eq!(get(http_port), "A", "the old config still serves");
    let log = read_log(&nginx.dir);
    let tail: Vec<&str> = log.lines().rev().take(8).collect();
    assert!(
        log.contains("Address already in use"),
        "nginx's log does not show the failed bind; status {}, log ends {tail:#?}",
        nginx_status(&node)
    );
    node.terminate();
}
