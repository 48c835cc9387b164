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
//! - `cluster`: the node table seam (one node for now).
//! - `roles`: manifests, the role manager, watcher, listeners, delivery, and
//!   the services behind a role's imports.
//! - `transport`: node-to-node TCP + mutual TLS under a cluster CA, framed.
//! - `notify`: the failure notification sink (log + webhook).
//! - `api`: the HTTP API.
//! - `cli`, `scaffold`: the command line.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod enrollment;
pub mod log;
pub mod notify;
pub mod quorum;
pub mod roles;
pub mod scaffold;
pub mod store;
pub mod transport;

pub use config::HostConfig;
pub use daemon::Daemon;
