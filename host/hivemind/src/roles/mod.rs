//! Roles on this node: the manager that loads and swaps versions, the
//! watcher on the roles directory, host-owned listeners, event delivery, and
//! the services behind a role's imports. (The manifest format is in
//! `hivemind_runtime::manifest`.)

pub mod delivery;
mod kept;
pub mod listeners;
pub mod manager;
pub mod services;
pub mod watcher;
