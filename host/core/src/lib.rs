//! What every Hivemind layer shares and none of them owns.
//!
//! Today that is [`files`]: the one way this project writes a file. It
//! holds no wasmtime, no axum, no sockets; a crate at any layer may use it.

pub mod files;
