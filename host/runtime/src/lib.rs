//! The role runtime: loads, limits, isolates and runs Hivemind roles, which
//! are WebAssembly components implementing `wit/role.wit`.
//!
//! This is the only crate that names wasmtime types. It owns compiling (with a
//! content-addressed cache), instantiating, per-call CPU and memory limits,
//! the worker pool of each role and what happens on a trap, and reads the
//! manifest (so every host, the daemon and the test harness, reads it
//! alike). It does not own where role files come from, the API, or what the
//! imports do: a host implements [`RoleHost`] for that.
//!
//! # Layout
//! - `engine`: [`Runtime`] — the engine, pooling allocator with on-demand
//!   fallback, epoch clock, compile cache, import policy.
//! - `role`: [`LoadedRole`] — workers, queue bound, trap backoff, failure.
//! - `host`: [`RoleHost`] — the seam the daemon implements.
//! - `limits`: [`RoleLimits`] and their defaults.
//! - `manifest`: [`manifest::Manifest`], `NAME.toml`: limits, grants,
//!   listeners, config.
//! - `bindings`: the generated bindings and store data (private).
//! - `guest_output`: a role's stdout/stderr (private).
//! - `error`: [`LoadError`], [`CallError`].

mod bindings;
mod engine;
mod error;
mod guest_output;
mod host;
mod limits;
pub mod manifest;
mod role;

pub use bindings::{Description, Event, ExecOutput, HealthCheck, HostError, Level, Node, Request, Response};
pub use engine::{Allocator, CompiledRole, EPOCH_TICK, Runtime, RuntimeConfig, lower_thread_priority};
pub use error::{CallError, LoadError};
pub use host::{CallOutcome, Export, FailureKind, MAX_COUNTER_SERIES, RoleFailure, RoleHost, validate_counter};
pub use limits::RoleLimits;
pub use role::{KeepReply, LoadedRole, MAX_KEEP_SKIP, PacketReply, RoleStats};

/// The version of the role contract this runtime implements.
pub const CONTRACT: &str = "hivemind:role@0.1.3";
