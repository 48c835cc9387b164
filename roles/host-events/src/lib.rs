//! The `host-events` role: publishes what runs on this machine.
//!
//! Services come from the manifest's `[[config.services]]` and from
//! `hivemind role host-events register NAME --port P [--tag T]... [--check
//! tcp|http:/PATH|none] [--address IP]`. Every tick (1 s) each service is
//! checked through the host's `check` import, and a change is published as
//! one event, keyed `NAME@NODE_ID`:
//! - `service.up` when it becomes healthy (or is registered healthy),
//! - `service.down` when its check fails or it is deregistered,
//! - `service.changed` when its port, address, tags or check change.
//!
//! The payload (JSON) carries the service, node id and name, address, port,
//! tags and `healthy`, so a reader needs no other event to act on it. What
//! was last published is kept in the role's state, so a reload or restart
//! publishes nothing that did not change.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use hivemind_sdk::services::ip_of;
use hivemind_sdk::{Description, HostError, Request, Response, Role, export_role, host, state};
use serde::{Deserialize, Serialize};

struct HostEvents;

/// How often services are checked.
const TICK_MS: u32 = 1000;
const REGISTERED: &str = "registered/";
const PUBLISHED: &str = "published/";

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    check_timeout_ms: u32,
    services: Vec<ServiceSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            check_timeout_ms: 1000,
            services: Vec::new(),
        }
    }
}

impl Config {
    fn load() -> Result<Config, String> {
        let config: Config = host::config()?;
        for spec in &config.services {
            spec.validate()
                .map_err(|error| format!("[[config.services]] {:?}: {error}", spec.name))?;
        }
        Ok(config)
    }
}

/// A service as declared: in the manifest or by `register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// `tcp`, `http:/PATH` or `none`; absent means `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    check: Option<String>,
}

/// How a service is checked.
enum Check {
    None,
    Tcp,
    Http(String),
}

fn parse_check(check: Option<&str>) -> Result<Check, String> {
    match check {
        None | Some("none") => Ok(Check::None),
        Some("tcp") => Ok(Check::Tcp),
        Some(other) => match other.strip_prefix("http:") {
            Some(path) if path.starts_with('/') => Ok(Check::Http(path.to_string())),
            _ => Err(format!(
                "check {other:?} is not one of: tcp, http:/PATH (e.g. http:/health), none"
            )),
        },
    }
}

impl ServiceSpec {
    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        let label_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !label_ok {
            return Err(format!(
                "name {name:?} must be a DNS label: 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
            ));
        }
        if self.port == 0 {
            return Err("port must be 1-65535".into());
        }
        if let Some(address) = &self.address {
            IpAddr::from_str(address)
                .map_err(|_| format!("address {address:?} is not an IP address (e.g. 10.0.0.5 or ::1)"))?;
        }
        for tag in &self.tags {
            if tag.is_empty() || tag.len() > 255 || tag.chars().any(|c| c.is_control()) {
                return Err(format!("tag {tag:?} must be 1-255 printable characters"));
            }
        }
        parse_check(self.check.as_deref())?;
        Ok(())
    }
}

/// What was last published for a service: the event's view of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Published {
    service: String,
    node: String,
    node_name: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    check: String,
    healthy: bool,
    /// Why it is (un)healthy, from the last check.
    detail: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deregistered: bool,
    /// Seq of the event that published this (kept in state, not sent).
    #[serde(default, skip_serializing_if = "is_unset")]
    seq: u64,
}

impl Published {
    /// Whether `self` and `other` describe the same service the same way,
    /// apart from health and the check's detail.
    fn same_shape(&self, other: &Published) -> bool {
        self.address == other.address && self.port == other.port && self.tags == other.tags && self.check == other.check
    }
}

fn is_unset(seq: &u64) -> bool {
    *seq == 0
}

/// Where a service comes from, for `list`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Source {
    Config,
    Registered,
}

/// Every declared service by name; the manifest wins over a registration of
/// the same name.
fn declared(config: &Config) -> BTreeMap<String, (ServiceSpec, Source)> {
    let mut services = BTreeMap::new();
    for key in state::keys(REGISTERED) {
        let Ok(Some(spec)) = state::get_json::<ServiceSpec>(&key) else {
            continue;
        };
        services.insert(spec.name.clone(), (spec, Source::Registered));
    }
    for spec in &config.services {
        services.insert(spec.name.clone(), (spec.clone(), Source::Config));
    }
    services
}

fn published(name: &str) -> Option<Published> {
    state::get_json(&format!("{PUBLISHED}{name}")).ok().flatten()
}

/// `host:port` for `address`, bracketing IPv6.
fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// Checks `spec` now and returns what should be published.
fn observe(spec: &ServiceSpec, config: &Config) -> Published {
    let node = host::self_node();
    let address = spec.address.clone().unwrap_or_else(|| match ip_of(&node.address) {
        Some(ip) => ip.to_string(),
        None => node.address.clone(),
    });
    let target = host_port(&address, spec.port);
    let outcome = match parse_check(spec.check.as_deref()) {
        Ok(Check::None) => Ok("no check".to_string()),
        Ok(Check::Tcp) => {
            host::check_tcp(&target, config.check_timeout_ms).map(|ms| format!("tcp {target} connected in {ms} ms"))
        }
        Ok(Check::Http(path)) => host::check_http(&format!("http://{target}{path}"), config.check_timeout_ms)
            .map(|ms| format!("http GET {target}{path} answered 2xx in {ms} ms")),
        Err(error) => Err(HostError::Invalid(error)),
    };
    let (healthy, detail) = match outcome {
        Ok(detail) => (true, detail),
        Err(error) => (false, error.message().to_string()),
    };
    Published {
        service: spec.name.clone(),
        node: node.id,
        node_name: node.name,
        address,
        port: spec.port,
        tags: spec.tags.clone(),
        check: spec.check.clone().unwrap_or_else(|| "none".into()),
        healthy,
        detail,
        deregistered: false,
        seq: 0,
    }
}

/// Publishes `now` if it differs from `before` in health or shape, and
/// records it. Returns the event kind published, if any.
fn publish(before: Option<&Published>, mut now: Published) -> Result<Option<&'static str>, String> {
    let kind = match before {
        Some(before) if before.healthy == now.healthy && before.same_shape(&now) => return Ok(None),
        Some(before) if before.healthy == now.healthy => "service.changed",
        _ if now.healthy => "service.up",
        _ => "service.down",
    };
    let key = format!("{}@{}", now.service, now.node);
    let seq = host::emit(kind, &key, &now)
        .map_err(|error| format!("cannot publish {kind} for {}: {}", now.service, error.message()))?;
    now.seq = seq;
    state::set_json(&format!("{PUBLISHED}{}", now.service), &now)?;
    Ok(Some(kind))
}

/// Publishes that `name` is gone and forgets it.
fn withdraw(name: &str) -> Result<bool, String> {
    let Some(mut last) = published(name) else {
        return Ok(false);
    };
    last.healthy = false;
    last.deregistered = true;
    last.detail = "deregistered".into();
    let key = format!("{}@{}", last.service, last.node);
    host::emit("service.down", &key, &last)
        .map_err(|error| format!("cannot publish service.down for {name}: {}", error.message()))?;
    state::delete(&format!("{PUBLISHED}{name}"))?;
    Ok(true)
}

/// One pass: checks every declared service, publishes changes, withdraws
/// what is no longer declared.
fn reconcile(config: &Config) {
    let services = declared(config);
    for key in state::keys(PUBLISHED) {
        let name = &key[PUBLISHED.len()..];
        if !services.contains_key(name)
            && let Err(error) = withdraw(name)
        {
            hivemind_sdk::warn!("{error}");
        }
    }
    for (spec, _) in services.values() {
        let before = published(&spec.name);
        if let Err(error) = publish(before.as_ref(), observe(spec, config)) {
            // The log may be without a quorum; the next tick tries again.
            hivemind_sdk::warn!("{error}");
        }
    }
}

/// `register NAME --port P [--tag T]... [--check C] [--address IP]`.
fn parse_register(args: &[String]) -> Result<ServiceSpec, String> {
    const USAGE: &str = "usage: register NAME --port PORT [--tag TAG]... [--check tcp|http:/PATH|none] [--address IP]";
    let mut args = args.iter();
    let name = args
        .next()
        .filter(|name| !name.starts_with('-'))
        .ok_or_else(|| USAGE.to_string())?
        .clone();
    let mut spec = ServiceSpec {
        name,
        port: 0,
        address: None,
        tags: Vec::new(),
        check: None,
    };
    while let Some(flag) = args.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (flag.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))
        };
        match flag {
            "--port" => {
                let text = value()?;
                spec.port = text
                    .parse()
                    .map_err(|_| format!("--port {text:?} is not a port number (1-65535)"))?;
            }
            "--tag" => spec.tags.push(value()?),
            "--check" => spec.check = Some(value()?),
            "--address" => spec.address = Some(value()?),
            other => return Err(format!("unknown option {other:?}; {USAGE}")),
        }
    }
    if spec.port == 0 {
        return Err(format!("--port is required; {USAGE}"));
    }
    spec.validate()?;
    Ok(spec)
}

fn register(config: &Config, args: &[String]) -> Response {
    let spec = match parse_register(args) {
        Ok(spec) => spec,
        Err(error) => return Response::error(400, &error),
    };
    if config.services.iter().any(|declared| declared.name == spec.name) {
        return Response::error(
            409,
            &format!(
                "service {:?} is declared in the role's manifest (host-events.toml); change it there",
                spec.name
            ),
        );
    }
    if let Err(error) = state::set_json(&format!("{REGISTERED}{}", spec.name), &spec) {
        return Response::error(500, &error);
    }
    let before = published(&spec.name);
    let now = observe(&spec, config);
    let summary = format!(
        "{} {}:{} {} ({})",
        spec.name,
        now.address,
        now.port,
        if now.healthy { "up" } else { "down" },
        now.detail
    );
    match publish(before.as_ref(), now) {
        Ok(Some(kind)) => Response::text(200, &format!("registered {summary}; published {kind}\n")),
        Ok(None) => Response::text(200, &format!("registered {summary}; unchanged\n")),
        // Kept registered: the next tick publishes once the log takes writes.
        Err(error) => Response::error(
            503,
            &format!("registered {summary}, but {error}; it is retried every second"),
        ),
    }
}

fn deregister(config: &Config, args: &[String]) -> Response {
    let [name] = args else {
        return Response::error(400, "usage: deregister NAME");
    };
    if config.services.iter().any(|declared| &declared.name == name) {
        return Response::error(
            409,
            &format!("service {name:?} is declared in the role's manifest (host-events.toml); remove it there"),
        );
    }
    let key = format!("{REGISTERED}{name}");
    if state::get(&key).is_none() {
        return Response::error(
            404,
            &format!("no registered service {name:?}; see `hivemind role host-events list`"),
        );
    }
    if let Err(error) = state::delete(&key) {
        return Response::error(500, &error);
    }
    match withdraw(name) {
        Ok(_) => Response::text(200, &format!("deregistered {name}; published service.down\n")),
        Err(error) => Response::error(
            503,
            &format!("deregistered {name}, but {error}; it is retried every second"),
        ),
    }
}

#[derive(Serialize)]
struct Listed {
    name: String,
    source: Source,
    port: u16,
    address: String,
    tags: Vec<String>,
    check: String,
    status: &'static str,
    detail: String,
}

fn list(config: &Config, json: bool) -> Response {
    let rows: Vec<Listed> = declared(config)
        .into_values()
        .map(|(spec, source)| {
            let last = published(&spec.name);
            Listed {
                name: spec.name.clone(),
                source,
                port: spec.port,
                address: last
                    .as_ref()
                    .map(|last| last.address.clone())
                    .or(spec.address.clone())
                    .unwrap_or_default(),
                tags: spec.tags.clone(),
                check: spec.check.clone().unwrap_or_else(|| "none".into()),
                status: match &last {
                    None => "pending",
                    Some(last) if last.healthy => "up",
                    Some(_) => "down",
                },
                detail: last.map(|last| last.detail).unwrap_or_default(),
            }
        })
        .collect();
    if json {
        return Response::json(200, &rows);
    }
    let mut text = format!(
        "{:<20} {:<10} {:<24} {:<6} {:<14} {:<20} {}\n",
        "NAME", "SOURCE", "ADDRESS", "STATUS", "CHECK", "TAGS", "DETAIL"
    );
    for row in &rows {
        text.push_str(&format!(
            "{:<20} {:<10} {:<24} {:<6} {:<14} {:<20} {}\n",
            row.name,
            match row.source {
                Source::Config => "config",
                Source::Registered => "registered",
            },
            format!("{}:{}", row.address, row.port),
            row.status,
            row.check,
            row.tags.join(","),
            row.detail
        ));
    }
    Response::text(200, &text)
}

impl Role for HostEvents {
    fn describe() -> Description {
        Description::new("host-events", env!("CARGO_PKG_VERSION")).tick_every(TICK_MS)
    }

    fn init() -> Result<(), String> {
        Config::load().map(|_| ())
    }

    fn on_tick() {
        match Config::load() {
            Ok(config) => reconcile(&config),
            Err(error) => hivemind_sdk::error!("{error}"),
        }
    }

    fn on_request(request: Request) -> Response {
        let config = match Config::load() {
            Ok(config) => config,
            Err(error) => return Response::error(500, &error),
        };
        // `--json` is for `list`; the CLI passes it to every command.
        let json = request.args().iter().any(|arg| arg == "--json");
        let args: Vec<String> = request.args().into_iter().filter(|arg| arg != "--json").collect();
        match request.command() {
            "register" => register(&config, &args),
            "deregister" => deregister(&config, &args),
            "list" => list(&config, json),
            _ => Response::error(
                404,
                &format!(
                    "no command {:?}; host-events has: register NAME --port P [--tag T] [--check tcp|http:/PATH] \
                     [--address IP], deregister NAME, list [--json]",
                    request.command()
                ),
            ),
        }
    }
}

export_role!(HostEvents);
