//! The roles under `roles/`, built for `wasm32-wasip2` by this crate's
//! `build.rs`: a path constant per role (e.g. [`ROLE_PROBE`]) for tests, and
//! [`BUNDLED`], the bytes of the roles the `hivemind` binary ships with.
//!
//! Depending on this crate is all a test needs for `cargo test` to build the
//! guests it uses.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));
