//! The `nginx` role: renders nginx `upstream` blocks (http and stream) from
//! the healthy instances of the services it is configured for, through
//! templates in its config, into its granted output directory.
//!
//! A change goes live in steps, each checked:
//! 1. events settle for `settle_ms`, so a burst becomes one reload;
//! 2. every upstream with fewer than `min_upstreams` healthy instances keeps
//!    its last rendered servers (and `status` says so);
//! 3. the files are written and `nginx -t` runs; if it fails, the last good
//!    files are written back and the reason is kept in `status`;
//! 4. `nginx -s reload` runs, and the role waits until the probe server in
//!    the http file answers for the new generation: nginx's master exits 0
//!    even when it keeps the old config (a port it cannot bind), so only the
//!    probe tells. Past `confirm_timeout_ms` the last good files are
//!    restored and nginx reloaded again.
//!
//! Commands: `status [--json]`, `render [--dry-run]`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hivemind_sdk::services::{Instance, ServiceTable};
use hivemind_sdk::{Description, Event, Request, Response, Role, export_role, host, state};
use serde::{Deserialize, Serialize};

struct Nginx;

const TICK_MS: u32 = 100;
/// Ticks between reads of the log for events this version may have missed.
const CATCH_UP_EVERY: u32 = 10;

thread_local! {
    static CATCH_UP_COUNTDOWN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
const TABLE_PREFIX: &str = "table";
const PROGRESS_KEY: &str = "progress";
const PROBE_PATH: &str = "/hivemind/generation/";

const DEFAULT_TEMPLATE: &str = "\
{% for upstream in upstreams %}
upstream {{ upstream.name }} {
{%- for server in upstream.servers %}
    server {{ server.endpoint }};
{%- endfor %}
}
{% endfor %}";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    Http,
    Stream,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSpec {
    service: String,
    #[serde(default)]
    kind: Kind,
    name: Option<String>,
    tag: Option<String>,
    min_upstreams: Option<usize>,
}

impl UpstreamSpec {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.service)
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    upstreams: Vec<UpstreamSpec>,
    min_upstreams: usize,
    http_file: String,
    stream_file: String,
    http_template: String,
    stream_template: String,
    validate: Vec<String>,
    reload: Vec<String>,
    probe: String,
    settle_ms: u64,
    confirm_timeout_ms: u64,
    exec_timeout_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstreams: Vec::new(),
            min_upstreams: 1,
            http_file: "http-upstreams.conf".into(),
            stream_file: "stream-upstreams.conf".into(),
            http_template: DEFAULT_TEMPLATE.into(),
            stream_template: DEFAULT_TEMPLATE.into(),
            validate: vec!["nginx".into(), "-t".into()],
            reload: vec!["nginx".into(), "-s".into(), "reload".into()],
            probe: "127.0.0.1:8089".into(),
            settle_ms: 200,
            confirm_timeout_ms: 5000,
            exec_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// The manifest's config, parsed once per instance: it cannot change
    /// without a reload, and `tick` runs ten times a second.
    fn get() -> Result<std::rc::Rc<Config>, String> {
        thread_local! {
            static CONFIG: std::cell::OnceCell<Result<std::rc::Rc<Config>, String>> =
                const { std::cell::OnceCell::new() };
        }
        CONFIG.with(|cell| cell.get_or_init(|| Config::load().map(std::rc::Rc::new)).clone())
    }

    fn load() -> Result<Config, String> {
        let config: Config = host::config()?;
        for (what, command) in [("validate", &config.validate), ("reload", &config.reload)] {
            if command.is_empty() {
                return Err(format!("{what} must name a command, e.g. [\"nginx\", \"-t\"]"));
            }
        }
        for spec in &config.upstreams {
            let name = spec.name();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(format!(
                    "upstream name {name:?} must be letters, digits, '-', '_' or '.'"
                ));
            }
        }
        Ok(config)
    }
}

/// One server line of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Server {
    /// `ADDRESS:PORT`, IPv6 in brackets.
    endpoint: String,
    address: String,
    port: u16,
    node: String,
    tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Upstream {
    name: String,
    service: String,
    servers: Vec<Server>,
}

/// What the role rendered and where nginx stands, kept in state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Progress {
    /// The last generation written.
    generation: u64,
    /// The last generation nginx was seen serving.
    confirmed: u64,
    /// The files of the confirmed generation (name → contents).
    good: BTreeMap<String, String>,
    /// The template output last written, without the probe, to tell
    /// whether a render changes anything.
    rendered: BTreeMap<String, String>,
    /// Servers last rendered per upstream, kept when too few are healthy.
    kept: BTreeMap<String, Vec<Server>>,
    /// Set when events arrived that are not rendered yet.
    dirty_since_ms: Option<u64>,
    /// A reload waiting for the probe: generation and when it was sent.
    awaiting: Option<(u64, u64)>,
    reloads: u64,
    last_error: Option<String>,
    /// The generation whose failure `last_error` describes: confirming an
    /// older generation (one reloaded before it) does not clear it.
    #[serde(default)]
    failed_generation: u64,
    /// Upstreams held at their last servers, and why.
    held: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

thread_local! {
    /// The instance's copy of the progress in state (read once, written
    /// through), so a tick costs no state read.
    static PROGRESS: std::cell::RefCell<Option<Progress>> = const { std::cell::RefCell::new(None) };
}

fn load_progress() -> Progress {
    PROGRESS.with(|cell| {
        cell.borrow_mut()
            .get_or_insert_with(|| state::get_json(PROGRESS_KEY).ok().flatten().unwrap_or_default())
            .clone()
    })
}

fn save_progress(progress: &Progress) {
    PROGRESS.with(|cell| *cell.borrow_mut() = Some(progress.clone()));
    if let Err(error) = state::set_json(PROGRESS_KEY, progress) {
        hivemind_sdk::error!("{error}");
    }
}

fn endpoint(instance: &Instance) -> String {
    if instance.address.is_ipv6() {
        format!("[{}]:{}", instance.address, instance.port)
    } else {
        format!("{}:{}", instance.address, instance.port)
    }
}

/// The upstreams of `kind` as they should be now; upstreams with too few
/// healthy instances keep what was rendered before (noted in `held`).
fn upstreams(
    config: &Config,
    table: &ServiceTable,
    kind: Kind,
    kept: &BTreeMap<String, Vec<Server>>,
    held: &mut Vec<String>,
) -> Vec<Upstream> {
    let mut rendered = Vec::new();
    for spec in config.upstreams.iter().filter(|spec| spec.kind == kind) {
        let mut servers: Vec<Server> = table
            .serving()
            .filter(|instance| instance.service == spec.service.to_ascii_lowercase())
            .filter(|instance| spec.tag.as_ref().is_none_or(|tag| instance.tags.contains(tag)))
            .map(|instance| Server {
                endpoint: endpoint(instance),
                address: instance.address.to_string(),
                port: instance.port,
                node: instance.node.clone(),
                tags: instance.tags.clone(),
            })
            .collect();
        servers.sort();
        servers.dedup_by(|a, b| a.endpoint == b.endpoint);
        let minimum = spec.min_upstreams.unwrap_or(config.min_upstreams);
        if servers.len() < minimum {
            let previous = kept.get(spec.name());
            held.push(format!(
                "upstream {} has {} healthy instance(s) of {}, fewer than min_upstreams = {minimum}; {}",
                spec.name(),
                servers.len(),
                spec.service,
                if previous.is_some() {
                    "kept its last servers"
                } else {
                    "not rendered"
                }
            ));
            match previous {
                Some(previous) => servers = previous.clone(),
                None => continue,
            }
        }
        if servers.is_empty() {
            // nginx refuses an upstream without servers.
            continue;
        }
        rendered.push(Upstream {
            name: spec.name().to_string(),
            service: spec.service.clone(),
            servers,
        });
    }
    rendered
}

fn render_template(template: &str, upstreams: &[Upstream], generation: u64) -> Result<String, String> {
    let environment = minijinja::Environment::new();
    environment
        .render_str(
            template,
            minijinja::context! { upstreams => upstreams, generation => generation },
        )
        .map_err(|error| format!("template: {error}"))
}

/// The probe server: answers the generation's path, nothing else.
fn probe_block(probe: &str, generation: u64) -> String {
    format!(
        "\n# Confirms to the hivemind nginx role that this file is live.\n\
         server {{\n    listen {probe};\n    location = {PROBE_PATH}{generation} {{ return 204; }}\n    location / {{ return 404; }}\n}}\n"
    )
}

/// The files for the current table: template output per file.
struct Render {
    outputs: BTreeMap<String, String>,
    kept: BTreeMap<String, Vec<Server>>,
    held: Vec<String>,
}

fn render(config: &Config, table: &ServiceTable, progress: &Progress, generation: u64) -> Result<Render, String> {
    let mut held = Vec::new();
    let mut outputs = BTreeMap::new();
    let mut kept = BTreeMap::new();
    for (kind, file, template) in [
        (Kind::Http, &config.http_file, &config.http_template),
        (Kind::Stream, &config.stream_file, &config.stream_template),
    ] {
        let upstreams = upstreams(config, table, kind, &progress.kept, &mut held);
        if kind == Kind::Stream && upstreams.is_empty() && !progress.rendered.contains_key(file) {
            continue;
        }
        for upstream in &upstreams {
            kept.insert(upstream.name.clone(), upstream.servers.clone());
        }
        outputs.insert(file.clone(), render_template(template, &upstreams, generation)?);
    }
    Ok(Render { outputs, kept, held })
}

/// Writes `files`, adding the probe to the http file.
fn write_files(
    config: &Config,
    outputs: &BTreeMap<String, String>,
    generation: u64,
) -> Result<BTreeMap<String, String>, String> {
    let mut written = BTreeMap::new();
    for (file, contents) in outputs {
        let mut contents = format!(
            "# Written by the hivemind nginx role (generation {generation}); edits are overwritten.\n{contents}"
        );
        if file == &config.http_file && !config.probe.is_empty() {
            contents.push_str(&probe_block(&config.probe, generation));
        }
        host::write_file(file, contents.as_bytes())
            .map_err(|error| format!("cannot write {file}: {}", error.message()))?;
        written.insert(file.clone(), contents);
    }
    Ok(written)
}

fn run(config: &Config, command: &[String]) -> Result<(), String> {
    let output = host::exec(&command[0], &command[1..], config.exec_timeout_ms)
        .map_err(|error| format!("`{}`: {}", command.join(" "), error.message()))?;
    if output.status == 0 {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "`{}` exited with {}: {}",
        command.join(" "),
        output.status,
        stderr.trim()
    ))
}

/// Puts the last good files back after `error`: a file written now that
/// has no good version gets an empty one, so nginx never restarts on a
/// rejected file. `reload` when nginx may already run the bad files.
fn roll_back(config: &Config, progress: &mut Progress, written: &[String], reload: bool, error: String) {
    hivemind_sdk::error!("{error}");
    let mut message = error;
    let mut restore: BTreeMap<&String, &str> = progress
        .good
        .iter()
        .map(|(file, contents)| (file, contents.as_str()))
        .collect();
    for file in written {
        restore
            .entry(file)
            .or_insert("# No configuration nginx accepted yet.\n");
    }
    for (file, contents) in restore {
        if let Err(failed) = host::write_file(file, contents.as_bytes()) {
            message.push_str(&format!("; restoring {file} failed too: {}", failed.message()));
        }
    }
    if reload && let Err(failed) = run(config, &config.reload) {
        message.push_str(&format!("; reloading the restored config failed: {failed}"));
    }
    if progress.good.is_empty() {
        message.push_str("; there was no earlier good config, so the files are empty");
    } else {
        message.push_str(&format!("; restored generation {}", progress.confirmed));
    }
    progress.rendered.clear();
    progress.last_error = Some(message);
    progress.failed_generation = progress.generation;
}

/// Renders, validates and reloads if the table's upstreams changed.
fn apply(config: &Config, table: &ServiceTable, progress: &mut Progress) {
    let generation = progress.generation + 1;
    let rendered = match render(config, table, progress, generation) {
        Ok(rendered) => rendered,
        Err(error) => {
            progress.last_error = Some(format!("{error}; the files were not changed"));
            progress.failed_generation = generation;
            hivemind_sdk::error!("{error}");
            return;
        }
    };
    progress.held = rendered.held;
    if rendered.outputs == progress.rendered {
        return;
    }
    progress.generation = generation;
    let files: Vec<String> = rendered.outputs.keys().cloned().collect();
    let written = match write_files(config, &rendered.outputs, generation) {
        Ok(written) => written,
        Err(error) => return roll_back(config, progress, &files, false, error),
    };
    if let Err(error) = run(config, &config.validate) {
        let error = format!("nginx rejected generation {generation}: {error}");
        return roll_back(config, progress, &files, false, error);
    }
    if let Err(error) = run(config, &config.reload) {
        let error = format!("reloading generation {generation} failed: {error}");
        return roll_back(config, progress, &files, true, error);
    }
    progress.rendered = rendered.outputs;
    progress.kept = rendered.kept;
    progress.reloads += 1;
    if config.probe.is_empty() {
        confirm(progress, generation, written);
    } else {
        remember_pending(&written);
        progress.awaiting = Some((generation, now_ms()));
    }
}

const PENDING_KEY: &str = "pending-files";

/// Keeps the files written but not yet seen live until they are confirmed.
fn remember_pending(written: &BTreeMap<String, String>) {
    if let Err(error) = state::set_json(PENDING_KEY, written) {
        hivemind_sdk::error!("{error}");
    }
}

fn confirm(progress: &mut Progress, generation: u64, written: BTreeMap<String, String>) {
    progress.confirmed = generation;
    progress.good = written;
    progress.awaiting = None;
    if progress.failed_generation <= generation {
        progress.last_error = None;
    }
    hivemind_sdk::info!("nginx serves generation {generation}");
}

/// Checks whether nginx serves the awaited generation.
fn check_awaited(config: &Config, progress: &mut Progress) {
    let Some((generation, since)) = progress.awaiting else {
        return;
    };
    let url = format!("http://{}{PROBE_PATH}{generation}", config.probe);
    match host::check_http(&url, 500) {
        Ok(_) => {
            let written = state::get_json(PENDING_KEY).ok().flatten().unwrap_or_default();
            confirm(progress, generation, written);
        }
        Err(error) if now_ms().saturating_sub(since) > config.confirm_timeout_ms => {
            progress.awaiting = None;
            let files: Vec<String> = progress.rendered.keys().cloned().collect();
            roll_back(
                config,
                progress,
                &files,
                true,
                format!(
                    "nginx accepted the reload of generation {generation} but is not serving it after {} ms \
                     ({url}: {}); see nginx's error log (a listen address it cannot bind?)",
                    config.confirm_timeout_ms,
                    error.message()
                ),
            );
        }
        Err(_) => {}
    }
}

fn with_table<T>(f: impl FnOnce(&mut ServiceTable) -> T) -> Result<T, String> {
    thread_local! {
        static TABLE: std::cell::RefCell<Option<ServiceTable>> = const { std::cell::RefCell::new(None) };
    }
    TABLE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(ServiceTable::load(TABLE_PREFIX)?);
        }
        Ok(f(slot.as_mut().expect("loaded above")))
    })
}

fn tick() -> Result<(), String> {
    let config = Config::get()?;
    if config.upstreams.is_empty() {
        return Ok(());
    }
    let mut progress = load_progress();
    let before = serde_json::to_string(&progress).unwrap_or_default();
    if progress.awaiting.is_some() {
        check_awaited(&config, &mut progress);
    } else {
        // Events arrive through on-event; reading the log as well, now and
        // then, catches what a predecessor took while this version loaded.
        let changed = CATCH_UP_COUNTDOWN.with(|countdown| {
            let due = countdown.get() == 0;
            countdown.set(if due { CATCH_UP_EVERY } else { countdown.get() - 1 });
            if due {
                with_table(|table| table.catch_up())?
            } else {
                Ok(false)
            }
        })?;
        if changed && progress.dirty_since_ms.is_none() {
            progress.dirty_since_ms = Some(now_ms());
        }
        if let Some(since) = progress.dirty_since_ms
            && now_ms().saturating_sub(since) >= config.settle_ms
        {
            progress.dirty_since_ms = None;
            with_table(|table| apply(&config, table, &mut progress))?;
        }
    }
    if serde_json::to_string(&progress).unwrap_or_default() != before {
        save_progress(&progress);
    }
    Ok(())
}

fn status(args: &[String]) -> Response {
    let progress = load_progress();
    if args.iter().any(|arg| arg == "--json") {
        return Response::json(
            200,
            &serde_json::json!({
                "generation": progress.generation,
                "confirmed": progress.confirmed,
                "awaiting": progress.awaiting.map(|(generation, _)| generation),
                "reloads": progress.reloads,
                "last_error": progress.last_error,
                "held": progress.held,
                "upstreams": progress.kept,
            }),
        );
    }
    let mut text = format!(
        "generation {} written, {} confirmed live; {} reload(s)\n",
        progress.generation, progress.confirmed, progress.reloads
    );
    if Config::get().is_ok_and(|config| config.upstreams.is_empty()) {
        text.push_str("no upstreams configured: list them as [[config.upstreams]] in nginx.toml\n");
    }
    if let Some((generation, _)) = progress.awaiting {
        text.push_str(&format!("waiting for nginx to serve generation {generation}\n"));
    }
    for (name, servers) in &progress.kept {
        let endpoints: Vec<&str> = servers.iter().map(|server| server.endpoint.as_str()).collect();
        text.push_str(&format!("upstream {name}: {}\n", endpoints.join(" ")));
    }
    for held in &progress.held {
        text.push_str(&format!("held: {held}\n"));
    }
    if let Some(error) = &progress.last_error {
        text.push_str(&format!("last error: {error}\n"));
    }
    Response::text(200, &text)
}

fn render_command(args: &[String]) -> Response {
    let config = match Config::get() {
        Ok(config) => config,
        Err(error) => return Response::error(500, &error),
    };
    let dry_run = args.iter().any(|arg| arg == "--dry-run");
    let mut progress = load_progress();
    let outcome = with_table(|table| {
        table.catch_up()?;
        if dry_run {
            let rendered = render(&config, table, &progress, progress.generation + 1)?;
            let mut text = String::new();
            for (file, contents) in &rendered.outputs {
                text.push_str(&format!("# {file}\n{contents}\n"));
            }
            for held in &rendered.held {
                text.push_str(&format!("# held: {held}\n"));
            }
            return Ok(text);
        }
        progress.dirty_since_ms = None;
        // Forced: render even when nothing seems to have changed.
        progress.rendered.clear();
        apply(&config, table, &mut progress);
        save_progress(&progress);
        Ok(match &progress.last_error {
            Some(error) => format!("generation {}: {error}\n", progress.generation),
            None => format!("generation {} written and reloaded\n", progress.generation),
        })
    });
    match outcome.and_then(|inner| inner) {
        Ok(text) => Response::text(200, &text),
        Err(error) => Response::error(500, &error),
    }
}

impl Role for Nginx {
    fn describe() -> Description {
        Description::new("nginx", env!("CARGO_PKG_VERSION"))
            .subscribe("service.")
            .subscribe("node.")
            .tick_every(TICK_MS)
    }

    fn init() -> Result<(), String> {
        Config::get()?;
        with_table(|_| ())
    }

    fn on_event(event: Event) -> Result<(), String> {
        if with_table(|table| table.apply(&event))?? {
            let mut progress = load_progress();
            if progress.dirty_since_ms.is_none() {
                progress.dirty_since_ms = Some(now_ms());
                save_progress(&progress);
            }
        }
        Ok(())
    }

    fn on_tick() {
        if let Err(error) = tick() {
            hivemind_sdk::error!("{error}");
        }
    }

    fn on_request(request: Request) -> Response {
        let args = request.args();
        match request.command() {
            "status" => status(&args),
            "render" => render_command(&args),
            other => Response::error(
                404,
                &format!("no command {other:?}; nginx has: status [--json], render [--dry-run]"),
            ),
        }
    }
}

export_role!(Nginx);
