//! What every Hivemind layer shares and none of them owns: [`files`], the
//! one way this project writes a file; [`limits`], what a node may hold at
//! once and how it tells its own shortage from a peer's fault; [`slots`],
//! the bound on a listener's connections that closes idle ones first.
//!
//! It holds no wasmtime and no axum; a crate at any layer may use it.

pub mod files;
pub mod limits;
pub mod slots;
