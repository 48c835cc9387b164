//! The command line: `hivemind up` runs a host; every other command is a
//! client of a host's HTTP API.
//!
//! Client commands find the API through `--api` / `HIVEMIND_API`, else the
//! `api.addr` file a host writes into its data directory, else the default
//! address; and the token through `--token` / `HIVEMIND_TOKEN`, else the data
//! directory's `token` file. Output is a human table by default and JSON with
//! `--json`; failures exit non-zero with a one-line reason.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{DEFAULT_API, default_data_dir};
use crate::daemon::{API_ADDR_FILE, TOKEN_FILE};

#[derive(Debug, Parser)]
#[command(
    name = "hivemind",
    version,
    about = "Hivemind: a cluster daemon whose work is done by hot-loaded WebAssembly roles",
    long_about = "Hivemind runs one host per machine. What a host does for its users (DNS, nginx \
                  upstreams, publishing services) is done by roles: WebAssembly components loaded \
                  from a directory and reloaded when their file changes.\n\n\
                  Start a one-node cluster with `hivemind up`; every other command talks to a \
                  running host over its HTTP API."
)]
pub struct Cli {
    /// The host's data directory: where `up` keeps its state, and where client
    /// commands find the API address and token.
    #[arg(long, global = true, env = "HIVEMIND_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// API address of the host, e.g. 127.0.0.1:7480 [default: from DATA_DIR/api.addr]
    #[arg(long, env = "HIVEMIND_API", value_name = "ADDR")]
    pub api: Option<String>,
    /// API token [default: from DATA_DIR/token]
    #[arg(long, env = "HIVEMIND_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a host: a one-node cluster with the bundled roles unless configured otherwise.
    #[command(after_long_help = concat!(
        "The config file (--config): every key is optional; this example sets each one.\n\n",
        include_str!("config-example.toml")
    ))]
    Up(UpArgs),
    /// Show the cluster at a glance: this node, the leader and log, every
    /// node's health and roles, this node's roles, bridges, recent failures.
    Status {
        /// Redraw every `--interval` until interrupted (as `hivemind top`).
        #[arg(long)]
        watch: bool,
        /// How often `--watch` redraws: 500ms, 2s, 1m (at least 100ms).
        #[arg(long, value_name = "DURATION", value_parser = parse_interval, default_value = "2s", requires = "watch")]
        interval: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// `hivemind status`, redrawn live with calls/s and write latency;
    /// Ctrl-C ends it. With --json, one JSON object per line per refresh.
    Top {
        /// How often to redraw: 500ms, 2s, 1m (at least 100ms).
        #[arg(long, value_name = "DURATION", value_parser = parse_interval, default_value = "2s")]
        interval: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the address of the host's web dashboard, with the token in the
    /// link's fragment (browsers do not send it to the server; the page
    /// keeps it for the tab's session).
    Dashboard {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage roles: list, install, enable, disable, pause, resume, reload, scaffold.
    Roles {
        #[command(subcommand)]
        command: RolesCommand,
    },
    /// Run a role's own command: `hivemind role NAME CMD [ARGS...]` calls
    /// POST /v1/roles/NAME/CMD with {"args": [ARGS...]} and prints the answer
    /// (`--json` is passed on to the role).
    Role {
        /// The role.
        name: String,
        /// The role's command (the first path segment of its route).
        cmd: String,
        /// Arguments passed to the role as {"args": [...]}.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read and append events of the log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// TCP bridges: status, and routing on/off, pin, drain (each with a reason).
    Bridge {
        #[command(subcommand)]
        command: crate::bridge::cli::BridgeCommand,
    },
    /// Cluster members: each node, its roles and health (the registry);
    /// promote/demote voters, remove, join tokens.
    Members {
        #[command(subcommand)]
        command: Option<MembersCommand>,
        #[command(flatten)]
        filter: NodesFilter,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// List members: id, name, voter or learner, health, gossip, roles.
    List {
        #[command(flatten)]
        filter: NodesFilter,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a learner a voter (bumps the epoch).
    Promote {
        /// Node id (hex) or name.
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a voter a learner (bumps the epoch).
    Demote {
        /// Node id (hex) or name.
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a member from the cluster.
    Remove {
        /// Node id (hex) or name.
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a single-use join token for `hivemind up --join ADDR --join-token TOKEN`.
    Token {
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        ttl: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Which nodes `hivemind members` lists, and whether it waits first.
#[derive(Debug, Args, Default)]
pub struct NodesFilter {
    /// Only nodes running this role.
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// Only healthy nodes (admitted and not decided failed or gone).
    #[arg(long)]
    pub healthy: bool,
    /// First wait until membership has not changed for this long
    /// (e.g. 2s, 500ms); gives up after a minute.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait_stable: Option<Duration>,
}

/// `2s`, `500ms`, `1m` or a number of seconds.
/// A redraw interval: a duration of at least 100 ms, so a watch never
/// hammers the API.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < Duration::from_millis(100) {
        return Err(format!("{text:?} is too short: redraw at most every 100ms"));
    }
    Ok(interval)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write e.g. 2s, 500ms or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown unit `{other}` in `{text}`; use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory watched for NAME.wasm (+ NAME.toml) [default: DATA_DIR/roles]
    #[arg(long, value_name = "DIR")]
    pub roles_dir: Option<PathBuf>,
    /// Address the HTTP API listens on [default: 127.0.0.1:7480]
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,
    /// This node's name [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Address the node-to-node transport listens on [default: 127.0.0.1:7481]
    #[arg(long, value_name = "ADDR")]
    pub transport: Option<String>,
    /// Transport address other nodes dial, when not the one listened on.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Form a new cluster of 3 or 5 voters with --peers (first start only).
    #[arg(long, requires = "peers")]
    pub bootstrap: bool,
    /// The bootstrap voters' transport addresses, this node's among them;
    /// the same list on every peer.
    #[arg(long, value_name = "ADDR,ADDR,ADDR", value_delimiter = ',', requires = "bootstrap")]
    pub peers: Vec<String>,
    /// Join the cluster of the node at this transport address, as a learner.
    #[arg(long, value_name = "ADDR", conflicts_with = "bootstrap")]
    pub join: Option<String>,
    /// A join token from `hivemind members token`, for --join.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HIVEMIND_JOIN_TOKEN",
        hide_env_values = true,
        requires = "join"
    )]
    pub join_token: Option<String>,
    /// The cluster secret: bootstrap peers prove it to each other, and --join
    /// without a token proves it.
    #[arg(long, value_name = "SECRET", env = "HIVEMIND_CLUSTER_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Do not write the bundled roles into the roles directory on first start.
    #[arg(long)]
    pub no_bundled_roles: bool,
    /// Gossip timing: `lan` (default; a dead node is agreed down in about
    /// 3 s) or `fast` (for clusters on one machine, e.g. tests).
    #[arg(long, value_name = "PRESET", env = "HIVEMIND_GOSSIP_PRESET")]
    pub gossip_preset: Option<String>,
}

impl UpArgs {
    /// The flags as config keys, to lay over the config file. Each value is
    /// checked here, so a mistake names its flag rather than a config key.
    pub fn as_config(&self, data_dir: Option<PathBuf>) -> anyhow::Result<crate::config::FileConfig> {
        let address = |flag: &str, value: &Option<String>, example: &str| -> anyhow::Result<Option<String>> {
            if let Some(text) = value {
                text.parse::<std::net::SocketAddr>()
                    .map_err(|error| anyhow::anyhow!("{flag} {text:?}: {error}; expected an address like {example}"))?;
            }
            Ok(value.clone())
        };
        let mut flags = crate::config::FileConfig {
            data_dir,
            roles_dir: self.roles_dir.clone(),
            api: address("--api", &self.api, "127.0.0.1:7480")?,
            transport: address("--transport", &self.transport, "127.0.0.1:7481")?,
            advertise: self.advertise.clone(),
            node_name: self.node_name.clone(),
            install_bundled_roles: self.no_bundled_roles.then_some(false),
            ..Default::default()
        };
        flags.cluster.secret.clone_from(&self.secret);
        if self.bootstrap || self.join.is_some() {
            // Checked as a whole, so the error speaks of the flags.
            crate::config::ClusterMode::from_parts(self.peers.clone(), self.join.clone(), self.join_token.clone())?;
            flags.cluster.bootstrap_peers.clone_from(&self.peers);
            flags.cluster.join.clone_from(&self.join);
            flags.cluster.join_token.clone_from(&self.join_token);
        }
        if let Some(preset) = &self.gossip_preset {
            crate::membership::GossipPreset::parse(preset)
                .ok_or_else(|| anyhow::anyhow!("--gossip-preset {preset:?}: expected `lan` or `fast`"))?;
            flags.gossip.preset = Some(preset.clone());
        }
        Ok(flags)
    }
}

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// List roles with state, version, digest and last error.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one role in detail.
    Show {
        /// The role's name, as `hivemind roles list` shows it.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Enable a disabled role (loads it again).
    Enable(RoleAction),
    /// Disable a role: stop it and free its instances and ports, across restarts.
    Disable(RoleAction),
    /// Pause a role: it stays loaded but takes no requests, events or packets.
    Pause(RoleAction),
    /// Resume a paused role; held events are delivered.
    Resume(RoleAction),
    /// Load a role's file again (fresh instances, init again); clears a failure.
    Reload(RoleAction),
    /// Install or replace a role and wait until it is live or rejected.
    Install {
        /// The component, NAME.wasm.
        file: PathBuf,
        /// Its manifest [default: NAME.toml beside the file, if present]
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Role name [default: the file stem]
        #[arg(long)]
        name: Option<String>,
        /// Give up waiting after this many seconds (the host keeps compiling).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a role's files from the host, which unloads it.
    Remove(RoleAction),
    /// Create a new role project in ./NAME whose `./build.sh` writes NAME.wasm.
    New {
        /// The role's name: the project directory and NAME.wasm.
        name: String,
        /// The language the role is written in.
        #[arg(long, value_enum, default_value = "rust")]
        lang: crate::scaffold::Language,
        /// Parent directory of the new project.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run a role in a sandboxed host (no daemon needed): deliver events,
    /// send requests, and print what it answered, emitted, logged and stored.
    /// Exits 1 when an event is refused or a call traps.
    Test(crate::role_test::TestArgs),
    /// Write the WASI preview 1 adapter matching this host, for
    /// `wasm-tools component new --adapt` (C roles built on wasi-libc).
    WasiAdapter {
        /// Where to write it.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RoleAction {
    /// The role's name, as `hivemind roles list` shows it.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append an event.
    Emit {
        /// Dotted kind, e.g. `service.up`; roles subscribe to kind prefixes.
        kind: String,
        /// What the event is about, e.g. a service name; snapshots keep the
        /// latest event of each kind and key.
        key: String,
        /// JSON payload.
        #[arg(long, default_value = "{}")]
        payload: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print events after a seq; with --follow, keep printing new ones.
    Tail {
        /// Print events after this seq; 0 starts at the oldest kept.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep the connection open and print events as they commit.
        #[arg(long)]
        follow: bool,
        /// Only kinds starting with this.
        #[arg(long, default_value = "")]
        kind: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Without a terminal, `roles install` reports compile progress this often.
const PROGRESS_EVERY_MS: u64 = 2000;

/// An API client for one host (blocking, keep-alive).
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn resolve(data_dir: Option<&Path>, args: &ClientArgs) -> anyhow::Result<Client> {
        let data_dir = data_dir.map(Path::to_path_buf).unwrap_or_else(default_data_dir);
        let api = match &args.api {
            Some(api) => api.clone(),
            None => std::fs::read_to_string(data_dir.join(API_ADDR_FILE))
                .map(|text| text.trim().to_string())
                .unwrap_or_else(|_| DEFAULT_API.to_string()),
        };
        let token = match &args.token {
            Some(token) => token.clone(),
            None => {
                let path = data_dir.join(TOKEN_FILE);
                match std::fs::read_to_string(&path) {
                    Ok(text) => text.trim().to_string(),
                    // No token file: most likely no host ever ran with this
                    // data directory, e.g. one started with --data-dir and
                    // a client without it.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                        "no host has run with the data directory {dir} (it holds no {TOKEN_FILE} file): \
                         start one with `hivemind up --data-dir {dir}`, give the running host's directory \
                         with --data-dir or HIVEMIND_DATA_DIR, or pass --api and --token",
                        dir = data_dir.display()
                    ),
                    Err(error) => anyhow::bail!(
                        "cannot read the API token {}: {error}; pass --token, set HIVEMIND_TOKEN, or make it readable",
                        path.display()
                    ),
                }
            }
        };
        Ok(Client::new(&api, &token))
    }

    /// A client for the host at `api` (`HOST:PORT` or a URL) using `token`.
    pub fn new(api: &str, token: &str) -> Client {
        let base = if api.starts_with("http://") || api.starts_with("https://") {
            api.to_string()
        } else {
            format!("http://{api}")
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Client {
            base,
            token: token.to_string(),
            agent,
        }
    }

    /// Sends a request and returns the status and body, whatever the status.
    /// An empty token sends no `Authorization` header.
    pub fn send(&self, method: &str, path: &str, body: &[u8], content_type: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", content_type);
        if !self.token.is_empty() {
            request = request.header("authorization", format!("Bearer {}", self.token));
        }
        let mut response = self.agent.run(request.body(body.to_vec())?).map_err(|error| {
            anyhow::anyhow!(
                "cannot reach the host at {} ({method} {path}): {error}; is `hivemind up` running?",
                self.base
            )
        })?;
        let status = response.status().as_u16();
        let body = response.body_mut().with_config().limit(64 << 20).read_to_vec()?;
        Ok((status, body))
    }

    /// GETs a streaming response and calls `on_line` for each line until
    /// the host ends it.
    pub fn stream_lines(&self, path: &str, mut on_line: impl FnMut(&str) -> anyhow::Result<()>) -> anyhow::Result<()> {
        use std::io::BufRead;
        let mut request = self.agent.get(format!("{}{path}", self.base));
        if !self.token.is_empty() {
            request = request.header("authorization", format!("Bearer {}", self.token));
        }
        let response = request.call().map_err(|error| {
            anyhow::anyhow!(
                "cannot reach the host at {} (GET {path}): {error}; is `hivemind up` running?",
                self.base
            )
        })?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        if !(200..300).contains(&status) {
            json_or_error(status, &body.read_to_vec().unwrap_or_default())?;
        }
        let reader = std::io::BufReader::new(body.into_reader());
        for line in reader.lines() {
            on_line(&line?)?;
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        self.send("GET", path, &[], "application/json")
    }

    /// The API's base URL, `http://HOST:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API token this client sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// GET returning JSON, turning an error status into the API's message.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(path)?;
        json_or_error(status, &body)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let (status, reply) = self.send("POST", path, &serde_json::to_vec(body)?, "application/json")?;
        json_or_error(status, &reply)
    }
}

pub(crate) fn json_or_error(status: u16, body: &[u8]) -> anyhow::Result<Value> {
    let value: Value =
        serde_json::from_slice(body).unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(body) }));
    if !(200..300).contains(&status) {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        bail!("{message} (HTTP {status})");
    }
    Ok(value)
}

/// Runs a client command; `up` is handled by `main`.
pub fn run_client(data_dir: Option<&Path>, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(_) => unreachable!("`up` runs the daemon"),
        Command::Status {
            watch,
            interval,
            client,
        } => {
            let api = Client::resolve(data_dir, &client)?;
            crate::status::run(&api, client.json, watch.then_some(interval))?;
        }
        Command::Top { interval, client } => {
            let api = Client::resolve(data_dir, &client)?;
            crate::status::run(&api, client.json, Some(interval))?;
        }
        Command::Dashboard { client } => {
            let api = Client::resolve(data_dir, &client)?;
            // The token may hold characters a fragment must escape.
            let token: String = api
                .token()
                .bytes()
                .map(|byte| match byte {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
                    other => format!("%{other:02X}"),
                })
                .collect();
            let url = format!("{}/#token={token}", api.base());
            if client.json {
                print_json(&json!({ "url": url }));
            } else {
                println!("{url}");
            }
        }
        Command::Roles { command } => run_roles(data_dir, command)?,
        Command::Bridge { command } => crate::bridge::cli::run(data_dir, command)?,
        Command::Role {
            name,
            cmd,
            args,
            client,
        } => {
            let api = Client::resolve(data_dir, &client)?;
            // `--json` right after CMD is read as the client's flag; the
            // role's commands take it too, so it is passed on.
            let mut args = args;
            if client.json && !args.iter().any(|arg| arg == "--json") {
                args.push("--json".into());
            }
            let body = serde_json::to_vec(&json!({ "args": args }))?;
            let (status, reply) = api.send("POST", &format!("/v1/roles/{name}/{cmd}"), &body, "application/json")?;
            if !(200..300).contains(&status) {
                let message = serde_json::from_slice::<Value>(&reply)
                    .ok()
                    .and_then(|value| value.get("error").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&reply).trim().to_string());
                bail!("{message} (HTTP {status})");
            }
            let mut stdout = std::io::stdout();
            stdout.write_all(&reply)?;
            if !reply.ends_with(b"\n") && !reply.is_empty() {
                stdout.write_all(b"\n")?;
            }
        }
        Command::Members {
            command,
            filter,
            client,
        } => members(data_dir, command, filter, client)?,
        Command::Events { command } => match command {
            EventsCommand::Emit {
                kind,
                key,
                payload,
                client,
            } => {
                let payload: Value = serde_json::from_str(&payload).with_context(|| {
                    format!("--payload {payload:?} is not JSON (quote it: --payload '{{\"port\": 80}}')")
                })?;
                let api = Client::resolve(data_dir, &client)?;
                let reply = api.post_json("/v1/events", &json!({ "kind": kind, "key": key, "payload": payload }))?;
                if client.json {
                    print_json(&reply);
                } else {
                    println!("appended as seq {}", reply["seq"]);
                }
            }
            EventsCommand::Tail {
                since,
                follow,
                kind,
                client,
            } => {
                let api = Client::resolve(data_dir, &client)?;
                if follow {
                    api.stream_lines(&format!("/v1/events/stream?since={since}&kind={kind}"), |line| {
                        let Some(data) = line.strip_prefix("data:") else {
                            return Ok(());
                        };
                        let event: Value = serde_json::from_str(data.trim())?;
                        if client.json {
                            println!("{event}");
                        } else {
                            print_event(&event);
                        }
                        std::io::stdout().flush()?;
                        Ok(())
                    })?;
                    return Ok(());
                }
                let events = api.get_json(&format!("/v1/events?since={since}&kind={kind}"))?;
                if client.json {
                    print_json(&events);
                } else {
                    for event in events.as_array().into_iter().flatten() {
                        print_event(event);
                    }
                }
            }
        },
    }
    Ok(())
}

fn run_roles(data_dir: Option<&Path>, command: RolesCommand) -> anyhow::Result<()> {
    match command {
        RolesCommand::List { client } => {
            let roles = Client::resolve(data_dir, &client)?.get_json("/v1/roles")?;
            if client.json {
                print_json(&roles);
            } else {
                print_roles(&roles);
            }
        }
        RolesCommand::Show { name, client } => {
            let role = Client::resolve(data_dir, &client)?.get_json(&format!("/v1/roles/{name}"))?;
            print_json(&role);
        }
        RolesCommand::Enable(action) => role_action(data_dir, action, "enable")?,
        RolesCommand::Disable(action) => role_action(data_dir, action, "disable")?,
        RolesCommand::Pause(action) => role_action(data_dir, action, "pause")?,
        RolesCommand::Resume(action) => role_action(data_dir, action, "resume")?,
        RolesCommand::Reload(action) => role_action(data_dir, action, "reload")?,
        RolesCommand::Remove(action) => {
            let api = Client::resolve(data_dir, &action.client)?;
            let (status, body) = api.send(
                "DELETE",
                &format!("/v1/role-files/{}", action.name),
                &[],
                "application/json",
            )?;
            let reply = json_or_error(status, &body)?;
            if action.client.json {
                print_json(&reply);
            } else {
                println!("removed {}", action.name);
            }
        }
        RolesCommand::Install {
            file,
            manifest,
            name,
            timeout,
            client,
        } => install(
            data_dir,
            &file,
            manifest.as_deref(),
            name,
            Duration::from_secs(timeout),
            &client,
        )?,
        RolesCommand::New { name, lang, dir } => {
            let path = crate::scaffold::new_role(&name, &dir, lang)?;
            println!("created {}", path.display());
            println!("build it:   {}/build.sh   (needs {})", path.display(), lang.tools());
            println!("install it: hivemind roles install {}/{name}.wasm", path.display());
        }
        RolesCommand::Test(args) => crate::role_test::run(args)?,
        RolesCommand::WasiAdapter { output } => {
            hivemind_core::files::write_file(
                &output,
                crate::scaffold::WASI_PREVIEW1_ADAPTER,
                hivemind_core::files::Access::Shared,
            )?;
        }
    }
    Ok(())
}

fn role_action(data_dir: Option<&Path>, action: RoleAction, verb: &str) -> anyhow::Result<()> {
    let api = Client::resolve(data_dir, &action.client)?;
    let info = api.post_json(&format!("/v1/roles/{}/{verb}", action.name), &json!({}))?;
    if action.client.json {
        print_json(&info);
    } else {
        println!("{}: {}", action.name, text(&info["state"]));
    }
    Ok(())
}

/// Uploads the manifest (if any) then the component, and follows the role's
/// status until a version with these bytes is live or was rejected.
fn install(
    data_dir: Option<&Path>,
    file: &Path,
    manifest: Option<&Path>,
    name: Option<String>,
    timeout: Duration,
    client: &ClientArgs,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = match name {
        Some(name) => name,
        None => file
            .file_stem()
            .and_then(|stem| stem.to_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{}: cannot take a role name from this file name; pass --name",
                    file.display()
                )
            })?,
    };
    let manifest_path = manifest.map(Path::to_path_buf).or_else(|| {
        let beside = file.with_extension("toml");
        beside.exists().then_some(beside)
    });
    let api = Client::resolve(data_dir, client)?;
    if let Some(path) = &manifest_path {
        let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (status, body) = api.send("PUT", &format!("/v1/role-files/{name}.toml"), &text, "application/toml")?;
        json_or_error(status, &body)?;
    }
    let digest = hex::encode(Sha256::digest(&bytes));
    let (status, body) = api.send(
        "PUT",
        &format!("/v1/role-files/{name}.wasm"),
        &bytes,
        "application/wasm",
    )?;
    json_or_error(status, &body)?;

    let started = Instant::now();
    let interactive = std::io::stderr().is_terminal() && !client.json;
    let mut last_progress = 0;
    loop {
        let (status, body) = api.get(&format!("/v1/roles/{name}"))?;
        if status == 200 {
            let info: Value = serde_json::from_slice(&body)?;
            if info["digest"].as_str() == Some(digest.as_str()) && info["loading"].is_null() {
                if client.json {
                    print_json(&info);
                } else {
                    clear_progress(interactive);
                    println!(
                        "{name} {} is {} (digest {})",
                        text(&info["version"]),
                        text(&info["state"]),
                        &digest[..12]
                    );
                }
                return Ok(());
            }
            if info["last_error_digest"].as_str() == Some(digest.as_str()) && info["loading"].is_null() {
                clear_progress(interactive);
                // Say what serves now: the version before, or nothing (the
                // rejected file stays in the roles directory either way).
                let now = if info["state"] == "running" {
                    format!(
                        "{name} {} (digest {}) keeps serving",
                        text(&info["version"]),
                        short_digest(&info["digest"])
                    )
                } else {
                    format!(
                        "nothing serves as {name}; its file stays until a good one replaces it or \
                         `hivemind roles remove {name}`"
                    )
                };
                bail!("{name} was rejected: {}; {now}", text(&info["last_error"]));
            }
            // On a terminal the line updates in place; otherwise one line
            // every few seconds of a long compile, so logs stay short.
            if let Some(ms) = info["loading"]["elapsed_ms"].as_u64() {
                let line = format!("{name}: compiling and initializing ({:.1} s)", ms as f64 / 1000.0);
                if interactive {
                    eprint!("\r{line}\x1b[K");
                } else if !client.json && ms / PROGRESS_EVERY_MS > last_progress {
                    eprintln!("{line}");
                    last_progress = ms / PROGRESS_EVERY_MS;
                }
            }
        }
        if started.elapsed() > timeout {
            clear_progress(interactive);
            bail!(
                "{name} is not live after {} s; `hivemind roles show {name}` shows its progress",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn clear_progress(interactive: bool) {
    if interactive {
        eprint!("\r\x1b[K");
    }
}

fn print_event(event: &Value) {
    println!(
        "{:>6}  {:<20} {:<24} {}",
        event["seq"],
        text(&event["kind"]),
        text(&event["key"]),
        event["payload"]
    );
}

pub(crate) fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn short_digest(value: &Value) -> String {
    value
        .as_str()
        .map(|digest| digest[..12.min(digest.len())].to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_roles(roles: &Value) {
    println!(
        "{:<20} {:<9} {:<10} {:<13} LAST ERROR",
        "NAME", "STATE", "VERSION", "DIGEST"
    );
    for role in roles.as_array().into_iter().flatten() {
        let error = text(&role["last_error"]);
        let error: String = error.chars().take(80).collect();
        println!(
            "{:<20} {:<9} {:<10} {:<13} {}",
            text(&role["name"]),
            text(&role["state"]),
            text(&role["version"]),
            short_digest(&role["digest"]),
            error
        );
    }
}

fn members(
    data_dir: Option<&Path>,
    command: Option<MembersCommand>,
    filter: NodesFilter,
    client: ClientArgs,
) -> anyhow::Result<()> {
    let (action, node, client) = match command {
        Some(MembersCommand::List { filter, client }) => return list_nodes(data_dir, &filter, &client),
        None => return list_nodes(data_dir, &filter, &client),
        Some(MembersCommand::Promote { node, client }) => ("promote", node, client),
        Some(MembersCommand::Demote { node, client }) => ("demote", node, client),
        Some(MembersCommand::Remove { node, client }) => ("remove", node, client),
        Some(MembersCommand::Token { ttl, client }) => {
            let api = Client::resolve(data_dir, &client)?;
            let reply = api.post_json("/v1/cluster/tokens", &json!({ "ttl_secs": ttl }))?;
            if client.json {
                print_json(&reply);
            } else {
                println!("{}", text(&reply["token"]));
            }
            return Ok(());
        }
    };
    let api = Client::resolve(data_dir, &client)?;
    let reply = api.post_json(&format!("/v1/cluster/members/{node}/{action}"), &json!({}))?;
    if client.json {
        print_json(&reply);
    } else {
        println!("{}", text(&reply["message"]));
    }
    Ok(())
}

fn list_nodes(data_dir: Option<&Path>, filter: &NodesFilter, client: &ClientArgs) -> anyhow::Result<()> {
    let api = Client::resolve(data_dir, client)?;
    let mut query = vec![];
    if let Some(role) = &filter.role {
        query.push(format!("role={role}"));
    }
    if filter.healthy {
        query.push("healthy=true".to_string());
    }
    if let Some(quiet) = filter.wait_stable {
        query.push(format!("wait_stable_ms={}&timeout_ms=60000", quiet.as_millis()));
    }
    let reply = api.get_json(&format!("/v1/nodes?{}", query.join("&")))?;
    if client.json {
        print_json(&reply);
    } else {
        print_nodes(&reply["nodes"]);
        if reply["stable"] == json!(false) {
            eprintln!("(membership was still changing after a minute)");
        }
    }
    Ok(())
}

fn print_nodes(nodes: &Value) {
    println!(
        "{:<16}  {:<16}  {:<7}  {:<7}  {:<7}  ROLES",
        "ID", "NAME", "VOTE", "HEALTH", "GOSSIP"
    );
    for node in nodes.as_array().into_iter().flatten() {
        let name = if node["self"] == json!(true) {
            format!("{} (this)", text(&node["name"]))
        } else {
            text(&node["name"])
        };
        let vote = match (node["admitted"] == json!(true), node["voter"] == json!(true)) {
            (false, _) => "-",
            (true, true) => "voter",
            (true, false) => "learner",
        };
        let health = match (node["admitted"] == json!(true), node["healthy"] == json!(true)) {
            (false, _) => "unknown".to_string(),
            (true, true) => "healthy".to_string(),
            (true, false) => text(&node["health"]),
        };
        let roles: Vec<String> = node["roles"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|role| format!("{}@{}", text(&role["name"]), text(&role["version"])))
            .collect();
        println!(
            "{:<16}  {:<16}  {:<7}  {:<7}  {:<7}  {}",
            text(&node["id"]),
            name,
            vote,
            health,
            text(&node["gossip"]),
            if roles.is_empty() {
                "-".to_string()
            } else {
                roles.join(", ")
            }
        );
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    /// Durations take ms, s, m or bare seconds; anything else is refused
    /// with the fix in the message.
    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2x").unwrap_err().contains("use ms, s or m"));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
        assert!(parse_duration("-1s").unwrap_err().contains("not a duration"));
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every command, argument and option `--help` lists says what it is.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for argument in command.get_arguments() {
                let id = argument.get_id().as_str();
                if argument.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if argument.get_help().is_none() && argument.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "hivemind", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    /// `hivemind up --help` ends with the annotated config file, every
    /// section included.
    #[test]
    fn up_help_shows_the_config_file() {
        let mut command = Cli::command();
        let up = command.find_subcommand_mut("up").unwrap();
        let help = up.render_long_help().to_string();
        for section in [
            "[cluster]",
            "[raft]",
            "[gossip]",
            "[data_plane]",
            "[[bridge]]",
            "[[bridge.backends]]",
        ] {
            assert!(help.contains(section), "{section} is missing from:\n{help}");
        }
    }
}
