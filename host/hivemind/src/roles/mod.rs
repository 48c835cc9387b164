//! Roles on this node: the manifest format, the manager that loads and
//! swaps versions, the watcher on the roles directory, host-owned
//! listeners, event delivery, and the services behind a role's imports.

pub mod delivery;
pub mod listeners;
pub mod manager;
pub mod manifest;
pub mod services;
pub mod watcher;
