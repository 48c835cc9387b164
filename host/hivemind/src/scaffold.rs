//! `hivemind roles new NAME`: a ready-to-build Rust role on the SDK.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::roles::manager::valid_role_name;

/// Where this binary was built from; the SDK is found relative to it.
const SOURCE_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// Creates `parent/NAME` and returns its path.
pub fn new_role(name: &str, parent: &Path) -> anyhow::Result<PathBuf> {
    if !valid_role_name(name) {
        bail!(
            "{name:?} is not a role name: use lowercase letters, digits, '-' and '_', starting with a letter or digit"
        );
    }
    let project = parent.join(name);
    if project.exists() {
        bail!("{} already exists; pick another name or --dir", project.display());
    }
    let sdk = Path::new(SOURCE_ROOT).join("sdk");
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the Hivemind SDK is not at {} (this binary was built elsewhere); \
             build hivemind from its source tree to scaffold roles",
            sdk.display()
        )
    })?;
    std::fs::create_dir_all(project.join("src")).with_context(|| format!("cannot create {}", project.display()))?;
    let crate_name = name.replace('_', "-");
    std::fs::write(
        project.join("Cargo.toml"),
        format!(
            r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
hivemind-sdk = {{ path = {sdk:?} }}

# A role builds on its own, not as part of an enclosing workspace.
[workspace]

[profile.release]
opt-level = "s"
strip = true
"#,
            sdk = sdk.display().to_string()
        ),
    )?;
    std::fs::write(
        project.join("src/lib.rs"),
        format!(
            r#"//! The `{name}` role.
//!
//! Build: cargo build --release --target wasm32-wasip2
//! Try:   hivemind role {name} hello world

use hivemind_sdk::{{Description, Event, Request, Response, Role, export_role, info, state}};

struct {type_name};

impl Role for {type_name} {{
    fn describe() -> Description {{
        Description::new("{name}", env!("CARGO_PKG_VERSION")).subscribe("service.")
    }}

    fn on_event(event: Event) -> Result<(), String> {{
        info!("event {{}} {{}} {{}}", event.seq, event.kind, event.key);
        let seen: u64 = state::get_json("events-seen")?.unwrap_or(0);
        state::set_json("events-seen", &(seen + 1))
    }}

    fn on_request(request: Request) -> Response {{
        match request.command() {{
            "hello" => Response::json(200, &request.args()),
            "seen" => Response::json(200, &state::get_json::<u64>("events-seen").ok().flatten().unwrap_or(0)),
            _ => Response::not_found(&request),
        }}
    }}
}}

export_role!({type_name});
"#,
            type_name = type_name(name)
        ),
    )?;
    std::fs::write(
        project.join(format!("{name}.toml")),
        r#"# Manifest: copy beside NAME.wasm in the roles directory (or pass --manifest).
[limits]
memory_mb = 64
cpu_ms = 100

[grants]
emit = []

[config]
"#,
    )?;
    Ok(project)
}

fn type_name(name: &str) -> String {
    let mut out = String::new();
    for part in name.split(['-', '_']).filter(|part| !part.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "Role");
    }
    out
}
