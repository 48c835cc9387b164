//! Write Hivemind roles in Rust.
//!
//! A role is a WebAssembly component that implements the `hivemind:role`
//! contract in `wit/role.wit`. This crate hides the generated bindings: a role
//! author implements [`Role`] — only the handlers they need, every other one
//! has a harmless default — and calls [`export_role!`] once.
//!
//! It owns the Rust view of the contract (types, host calls, typed helpers for
//! JSON events, requests and state). It does not own building: roles are
//! compiled with `cargo build --target wasm32-wasip2 --release` and the
//! resulting `.wasm` is dropped into a host's roles directory.
//!
//! # Example
//!
//! A role that counts `service.up` events per service, keeps the counts in
//! durable state (so a reload or restart keeps them), and serves them at
//! `GET /v1/roles/counter/counts` (`hivemind role counter counts` on the CLI):
//!
//! ```
//! use hivemind_sdk::{Description, Event, Request, Response, Role, export_role, state};
//! use std::collections::BTreeMap;
//!
//! struct Counter;
//!
//! impl Role for Counter {
//!     fn describe() -> Description {
//!         Description::new("counter", env!("CARGO_PKG_VERSION")).subscribe("service.up")
//!     }
//!
//!     fn on_event(event: Event) -> Result<(), String> {
//!         let mut counts: BTreeMap<String, u64> = state::get_json("counts")?.unwrap_or_default();
//!         *counts.entry(event.key.clone()).or_default() += 1;
//!         state::set_json("counts", &counts)
//!     }
//!
//!     fn on_request(request: Request) -> Response {
//!         match request.command() {
//!             "counts" => match state::get_json::<BTreeMap<String, u64>>("counts") {
//!                 Ok(counts) => Response::json(200, &counts.unwrap_or_default()),
//!                 Err(error) => Response::error(500, &error),
//!             },
//!             _ => Response::not_found(&request),
//!         }
//!     }
//! }
//!
//! export_role!(Counter);
//! # fn main() {}
//! ```
//!
//! # Layout
//! - [`Role`] and [`export_role!`]: the handlers and how they are exported.
//! - [`host`]: logging, the event log, nodes, config, calls, files, exec.
//! - [`state`]: the role's durable key-value store.
//! - [`services`]: the cluster's service instances, from the log.
//! - Helpers on [`Event`], [`Request`], [`Response`] and [`Description`].

use serde::Serialize;
use serde::de::DeserializeOwned;

// The generated bindings name this crate by its absolute path, which must
// resolve inside the crate too.
extern crate self as hivemind_sdk;

/// The bindings wit-bindgen generates from `wit/`. Public only so that
/// [`export_role!`] can reach them from the role's crate.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "role",
        pub_export_macro: true,
        default_bindings_module: "::hivemind_sdk::bindings",
        runtime_path: "::hivemind_sdk::wit_bindgen::rt",
    });
}

/// Re-exported so a role needs no direct dependency on wit-bindgen.
pub use wit_bindgen;

pub use bindings::hivemind::role::host::{ExecOutput, HealthCheck, Level};
pub use bindings::hivemind::role::types::{Description, Event, HostError, Node, Request, Response};

/// A role's handlers. Only [`Role::describe`] is required.
///
/// Handlers are associated functions, not methods: the host runs as many
/// instances as the manifest's `workers` allows and may replace any of them at
/// any time, so nothing a handler leaves in memory is guaranteed to be there
/// on the next call. Keep what matters in [`state`].
pub trait Role {
    /// Name, version, subscriptions and tick interval.
    fn describe() -> Description;

    /// Runs once when this version is loaded; an error keeps the previous
    /// version serving and is shown by `hivemind roles list`.
    fn init() -> Result<(), String> {
        Ok(())
    }

    /// A committed event matching a subscribed prefix, in seq order. Called
    /// again after an error, so it must tolerate duplicates.
    fn on_event(_event: Event) -> Result<(), String> {
        Ok(())
    }

    /// A request for the role's own API.
    fn on_request(request: Request) -> Response {
        Response::not_found(&request)
    }

    /// A datagram on a host-owned listener; `Some` bytes are sent back.
    fn on_packet(_listener: String, _peer: String, _data: Vec<u8>) -> Option<Vec<u8>> {
        None
    }

    /// Periodic work, every [`Description::tick_interval_ms`].
    fn on_tick() {}
}

/// Exports a type implementing [`Role`] as the component's `role` world.
///
/// Call it exactly once, at the crate root of a `cdylib` crate.
#[macro_export]
macro_rules! export_role {
    ($role:ty) => {
        const _: () = {
            fn hivemind_role_must_implement_role<R: $crate::Role>() {}
            let _ = hivemind_role_must_implement_role::<$role>;
        };

        #[doc(hidden)]
        pub struct HivemindRoleExports;

        impl $crate::bindings::Guest for HivemindRoleExports {
            fn describe() -> $crate::Description {
                <$role as $crate::Role>::describe()
            }
            fn init() -> ::core::result::Result<(), ::std::string::String> {
                <$role as $crate::Role>::init()
            }
            fn on_event(event: $crate::Event) -> ::core::result::Result<(), ::std::string::String> {
                <$role as $crate::Role>::on_event(event)
            }
            fn on_request(request: $crate::Request) -> $crate::Response {
                <$role as $crate::Role>::on_request(request)
            }
            fn on_packet(
                listener: ::std::string::String,
                peer: ::std::string::String,
                data: ::std::vec::Vec<u8>,
            ) -> ::core::option::Option<::std::vec::Vec<u8>> {
                <$role as $crate::Role>::on_packet(listener, peer, data)
            }
            fn on_tick() {
                <$role as $crate::Role>::on_tick()
            }
        }

        $crate::bindings::export!(HivemindRoleExports with_types_in $crate::bindings);
    };
}

impl HostError {
    /// The host's explanation, without the variant name.
    pub fn message(&self) -> &str {
        match self {
            HostError::Denied(text)
            | HostError::Invalid(text)
            | HostError::Unavailable(text)
            | HostError::Overloaded(text)
            | HostError::Failed(text) => text,
        }
    }
}

impl Description {
    /// A description with no subscriptions and no tick.
    pub fn new(name: &str, version: &str) -> Self {
        Description {
            name: name.to_string(),
            version: version.to_string(),
            subscribes: Vec::new(),
            tick_interval_ms: 0,
        }
    }

    /// Also deliver events whose kind starts with `kind_prefix` (`""` = all).
    pub fn subscribe(mut self, kind_prefix: &str) -> Self {
        self.subscribes.push(kind_prefix.to_string());
        self
    }

    /// Call [`Role::on_tick`] every `interval_ms` milliseconds.
    pub fn tick_every(mut self, interval_ms: u32) -> Self {
        self.tick_interval_ms = interval_ms;
        self
    }
}

impl Event {
    /// The payload parsed as JSON.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.payload).map_err(|error| {
            format!(
                "event {} ({} {}): payload is not the expected JSON: {error}",
                self.seq, self.kind, self.key
            )
        })
    }
}

impl Request {
    /// The first path segment: `records` for `/records/web`. The CLI's
    /// `hivemind role NAME CMD ARGS...` arrives as `POST /CMD`.
    pub fn command(&self) -> &str {
        self.path.trim_start_matches('/').split('/').next().unwrap_or("")
    }

    /// Arguments: the CLI sends `{"args": [...]}` as the body; for other
    /// requests these are the path segments after the command.
    pub fn args(&self) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct CliBody {
            args: Vec<String>,
        }
        if let Ok(body) = serde_json::from_slice::<CliBody>(&self.body) {
            return body.args;
        }
        self.path
            .trim_start_matches('/')
            .split('/')
            .skip(1)
            .filter(|segment| !segment.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The value of query parameter `name`, if present (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|error| format!("request body is not the expected JSON: {error}"))
    }
}

impl Response {
    /// A JSON response.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body,
            },
            Err(error) => Self::error(500, &format!("cannot encode response: {error}")),
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, text: &str) -> Self {
        Response {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: text.as_bytes().to_vec(),
        }
    }

    /// A JSON error body `{"error": message}`, the shape the host uses too.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    /// 404 naming the unknown command.
    pub fn not_found(request: &Request) -> Self {
        Self::error(
            404,
            &format!("no such command or route: {} {}", request.method, request.path),
        )
    }
}

pub mod services;

/// Calls into the host: logging, the event log, the node table, config, the
/// connect layer, files and programs.
pub mod host {
    use super::{ExecOutput, HealthCheck, HostError, Level, Node, Request, Response};
    use crate::bindings::hivemind::role::host as raw;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// Writes a line to the host's log, tagged with the role's name.
    pub fn log(level: Level, message: &str) {
        raw::log(level, message)
    }

    /// Appends an event with a JSON payload; returns its seq once durable.
    pub fn emit<T: Serialize + ?Sized>(kind: &str, key: &str, payload: &T) -> Result<u64, HostError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|error| HostError::Invalid(format!("payload is not JSON-encodable: {error}")))?;
        raw::emit(kind, key, &payload)
    }

    /// Appends an event with raw payload bytes.
    pub fn emit_raw(kind: &str, key: &str, payload: &[u8]) -> Result<u64, HostError> {
        raw::emit(kind, key, payload)
    }

    /// Events after `after` whose kind starts with `kind_prefix`.
    pub fn events_since(after: u64, kind_prefix: &str, limit: u32) -> Result<Vec<super::Event>, HostError> {
        raw::events_since(after, kind_prefix, limit)
    }

    /// Cluster members, optionally only those running `role`.
    pub fn nodes(role: Option<&str>, healthy_only: bool) -> Vec<Node> {
        raw::nodes(role, healthy_only)
    }

    /// This node.
    pub fn self_node() -> Node {
        raw::self_node()
    }

    /// The manifest's `[config]` table as a typed value.
    pub fn config<T: DeserializeOwned>() -> Result<T, String> {
        serde_json::from_str(&raw::config())
            .map_err(|error| format!("role config in the manifest's [config] table: {error}"))
    }

    /// Calls `role` on `node`.
    pub fn call(node: &str, role: &str, request: &Request) -> Result<Response, HostError> {
        raw::call(node, role, request)
    }

    /// Writes a file inside the role's granted output directory.
    pub fn write_file(path: &str, contents: &[u8]) -> Result<(), HostError> {
        raw::write_file(path, contents)
    }

    /// Runs a granted program.
    pub fn exec(program: &str, args: &[String], timeout_ms: u32) -> Result<ExecOutput, HostError> {
        raw::exec(program, args, timeout_ms)
    }

    /// Checks that a TCP connection to `address` (`host:port`) opens within
    /// `timeout_ms`; `Ok` with the milliseconds it took. The host must be
    /// listed in the manifest's `grants.check`.
    pub fn check_tcp(address: &str, timeout_ms: u32) -> Result<u32, HostError> {
        raw::check(&HealthCheck::Tcp(address.to_string()), timeout_ms)
    }

    /// Checks that a GET of `url` (`http://host:port/path`) answers 2xx
    /// within `timeout_ms`; `Ok` with the milliseconds it took.
    pub fn check_http(url: &str, timeout_ms: u32) -> Result<u32, HostError> {
        raw::check(&HealthCheck::Http(url.to_string()), timeout_ms)
    }

    /// Adds `delta` to the role's counter `name` for `labels`; the host
    /// serves it at `/metrics` as `hivemind_counter_NAME_total{role, labels}`.
    /// Names are `[a-z_][a-z0-9_]*`. Each call crosses into the host, so a
    /// hot path should sum in memory and report in batches.
    pub fn count(name: &str, labels: &[(&str, &str)], delta: u64) -> Result<(), HostError> {
        raw::count(name, &owned_labels(labels), delta)
    }

    /// Labels as the generated bindings take them.
    fn owned_labels(labels: &[(&str, &str)]) -> Vec<(String, String)> {
        labels
            .iter()
            .map(|(label, value)| (label.to_string(), value.to_string()))
            .collect()
    }

    /// Inside `on_packet` for a UDP datagram: lets the host answer later
    /// datagrams on the same listener that match this one after its first
    /// `skip` bytes with the reply being returned (its first `skip` bytes
    /// taken from each datagram), without calling the role. Only for a reply
    /// that depends on nothing but the datagram and what the role holds in
    /// memory; the host forgets kept replies after an event or a request,
    /// and when the role calls [`forget_replies`]. With `tally`, each reuse
    /// adds one to that counter as [`count`] would.
    pub fn keep_reply(skip: u32, tally: Option<(&str, &[(&str, &str)])>) -> Result<(), HostError> {
        let tally = tally.map(|(name, labels)| (name, owned_labels(labels)));
        raw::keep_reply(skip, tally.as_ref().map(|(name, labels)| (*name, labels.as_slice())))
    }

    /// Forgets every reply kept with [`keep_reply`] once this call ends:
    /// for a change to the answers that no event or request brought (a
    /// tick that caught up with the log, a timer).
    pub fn forget_replies() {
        raw::forget_replies()
    }
}

/// Logs at info level with `format!` arguments.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::host::log($crate::Level::Info, &::std::format!($($arg)*)) };
}

/// Logs at warn level with `format!` arguments.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::host::log($crate::Level::Warn, &::std::format!($($arg)*)) };
}

/// Logs at error level with `format!` arguments.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::host::log($crate::Level::Error, &::std::format!($($arg)*)) };
}

/// The role's durable key-value store, private to the role.
pub mod state {
    use crate::bindings::hivemind::role::state as raw;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// Raw bytes under `key`.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        raw::get(key)
    }

    /// Stores raw bytes under `key`.
    pub fn set(key: &str, value: &[u8]) -> Result<(), String> {
        raw::set(key, value).map_err(|error| format!("state set {key}: {error}"))
    }

    /// Removes `key`.
    pub fn delete(key: &str) -> Result<(), String> {
        raw::delete(key).map_err(|error| format!("state delete {key}: {error}"))
    }

    /// Keys starting with `prefix`, in order.
    pub fn keys(prefix: &str) -> Vec<String> {
        raw::keys(prefix)
    }

    /// The JSON value under `key`, `None` when absent.
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, String> {
        match raw::get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| format!("state {key}: not the expected JSON: {error}")),
        }
    }

    /// Stores `value` as JSON under `key`.
    pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|error| format!("state {key}: {error}"))?;
        set(key, &bytes)
    }
}
