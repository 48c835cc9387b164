//! The Hivemind host: the daemon behind `hivemind up` and the client behind
//! every other `hivemind` command.
//!
//! It owns files, configuration, the store, the API and the life of roles;
//! running WebAssembly is `hivemind-runtime`'s job.
//!
//! # Layout
//! - `config`: the TOML config and its defaults.
//! - `daemon`: start-up and the shutdown protocol.
//! - `store`: the redb database (events, role state, cursors, settings).
//! - `log`: the event log seam ([`log::EventLog`]) and the local backing.
//! - `quorum`: the Raft-replicated event log (openraft over the store),
//!   forwarding to the leader, joins and membership changes.
//! - `enrollment`: how a node becomes a member at start-up.
//! - `membership`: SWIM gossip over UDP, sealed with the cluster key, and
//!   the leader's health decisions from it.
//! - `registry`: the node × role table (log + gossip) roles and the API read.
//! - `roles`: manifests, the role manager, watcher, listeners, delivery, and
//!   the services behind a role's imports.
//! - `transport`: node-to-node TCP + mutual TLS under a cluster CA, framed;
//!   multiplexed connections for role calls.
//! - `connect`: role-to-role calls across nodes, one shared link per peer.
//! - `notify`: the failure notification sink (log + webhook).
//! - `bridge`: TCP proxies routing to the backend the log agreed on.
//! - `probe`: TCP and HTTP health probes (bridges, the roles' `check`).
//! - `api`: the HTTP API; `dashboard`: the web page at `/` (assets built
//!   into the binary); `metrics`: Prometheus series at `/metrics`.
//! - `cli`, `status`, `scaffold`, `role_test`: the command line.

pub mod api;
pub mod api_server;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod dashboard;
pub mod enrollment;
pub mod log;
pub mod membership;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod quorum;
pub mod registry;
pub mod role_test;
pub mod roles;
pub mod saved_node;
pub mod scaffold;
pub mod status;
pub mod store;
pub mod transport;

pub use config::HostConfig;
pub use daemon::Daemon;
