//! `hivemind roles new NAME --lang rust|python|js|c`: a ready-to-build role
//! project whose `./build.sh` writes `NAME.wasm`.
//!
//! Python, JavaScript and C projects are self-contained: they carry a copy of
//! `wit/role.wit` and of their language's SDK file(s) as this binary knows
//! them. A Rust project depends on the SDK crate in the source tree this
//! binary was built from.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hivemind_core::files::{Access, write_file};

use crate::roles::manager::valid_role_name;

/// Where this binary was built from; the Rust SDK is found relative to it.
const SOURCE_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

const ROLE_WIT: &str = include_str!("../../../wit/role.wit");
const PYTHON_SDK: &str = include_str!("../../../sdk/python/hivemind_role/__init__.py");
const JS_SDK: &str = include_str!("../../../sdk/js/hivemind-role.js");
const C_SDK_HEADER: &str = include_str!("../../../sdk/c/hivemind_role.h");
const C_SDK_SOURCE: &str = include_str!("../../../sdk/c/hivemind_role.c");

/// The WASI preview 1 adapter (reactor flavour) of the wasmtime this host
/// runs on: `wasm-tools component new --adapt` needs it to turn a module
/// built against wasi-libc into a component.
pub const WASI_PREVIEW1_ADAPTER: &[u8] =
    wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;

/// The languages `roles new` writes projects for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Python,
    Js,
    C,
}

impl Language {
    /// What the project's `build.sh` needs on PATH.
    pub fn tools(self) -> &'static str {
        match self {
            Language::Rust => "cargo and the wasm32-wasip2 target (rustup target add wasm32-wasip2)",
            Language::Python => "componentize-py (pip install componentize-py==0.25.1)",
            Language::Js => "componentize-js (npm install @bytecodealliance/componentize-js@0.23.0)",
            Language::C => {
                "clang, wasm-ld and wasi-libc (Debian: clang lld wasi-libc libclang-rt-14-dev-wasm32), \
                 wit-bindgen 0.61 and wasm-tools (cargo install wit-bindgen-cli wasm-tools), and hivemind"
            }
        }
    }
}

/// Creates `parent/NAME` for `language` and returns its path.
pub fn new_role(name: &str, parent: &Path, language: Language) -> anyhow::Result<PathBuf> {
    if !valid_role_name(name) {
        bail!(
            "{name:?} is not a role name: use lowercase letters, digits, '-' and '_', starting with a letter or digit"
        );
    }
    let project = parent.join(name);
    if project.exists() {
        bail!("{} already exists; pick another name or --dir", project.display());
    }
    let files = match language {
        Language::Rust => rust_files(name)?,
        Language::Python => python_files(name),
        Language::Js => js_files(name),
        Language::C => c_files(name),
    };
    for (path, contents) in files.into_iter().chain([(format!("{name}.toml"), manifest())]) {
        let path = project.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let access = if path.ends_with("build.sh") {
            Access::Executable
        } else {
            Access::Shared
        };
        write_file(&path, contents.as_bytes(), access)?;
    }
    Ok(project)
}

fn manifest() -> String {
    r#"# Manifest: copy beside NAME.wasm in the roles directory (or pass --manifest).
[limits]
memory_mb = 64
cpu_ms = 100

[grants]
emit = []

[config]
"#
    .to_string()
}

/// `build.sh`: runs `steps` from the project's directory, then says where
/// `NAME.wasm` is.
fn build_script(name: &str, language: Language, steps: &str) -> String {
    format!(
        r#"#!/usr/bin/env bash
# Builds {name}.wasm. Needs {tools}.
set -euo pipefail
cd "$(dirname "$0")"
{steps}
echo "built $PWD/{name}.wasm; install it with: hivemind roles install {name}.wasm"
"#,
        tools = language.tools()
    )
}

fn rust_files(name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let sdk = Path::new(SOURCE_ROOT).join("sdk");
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the Hivemind SDK is not at {} (this binary was built elsewhere); \
             build hivemind from its source tree to scaffold Rust roles",
            sdk.display()
        )
    })?;
    let crate_name = name.replace('_', "-");
    let artifact = name.replace('-', "_");
    let cargo_toml = format!(
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
    );
    let lib_rs = format!(
        r#"//! The `{name}` role.
//!
//! Build: ./build.sh
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
    );
    let steps = format!(
        "cargo build --release --target wasm32-wasip2\n\
         cp \"${{CARGO_TARGET_DIR:-target}}/wasm32-wasip2/release/{artifact}.wasm\" {name}.wasm"
    );
    Ok(vec![
        ("Cargo.toml".into(), cargo_toml),
        ("src/lib.rs".into(), lib_rs),
        ("build.sh".into(), build_script(name, Language::Rust, &steps)),
    ])
}

fn python_files(name: &str) -> Vec<(String, String)> {
    let app = format!(
        r#""""The `{name}` role.

Build: ./build.sh
Try:   hivemind role {name} hello world
"""

import hivemind_role as hm


class {type_name}(hm.Role):
    name = "{name}"
    version = "0.1.0"
    subscribes = ["service."]

    def on_event(self, event):
        hm.host.info(f"event {{event.seq}} {{event.kind}} {{event.key}}")
        hm.state.set_json("events-seen", hm.state.get_json("events-seen", 0) + 1)

    def on_request(self, request):
        if request.command == "hello":
            return hm.Response.json(request.args)
        if request.command == "seen":
            return hm.Response.json(hm.state.get_json("events-seen", 0))
        return hm.Response.not_found(request)


WitWorld = hm.export({type_name})
"#,
        type_name = type_name(name)
    );
    let steps = format!("componentize-py -d wit -w role componentize -p . app -o {name}.wasm >/dev/null");
    vec![
        ("app.py".into(), app),
        ("hivemind_role/__init__.py".into(), PYTHON_SDK.into()),
        ("wit/role.wit".into(), ROLE_WIT.into()),
        ("build.sh".into(), build_script(name, Language::Python, &steps)),
    ]
}

fn js_files(name: &str) -> Vec<(String, String)> {
    let role = format!(
        r#"// The `{name}` role.
//
// Build: ./build.sh
// Try:   hivemind role {name} hello world

import {{ defineRole, host, Response, state }} from "./hivemind-role.js";

export const {{ describe, init, onEvent, onRequest, onPacket, onTick }} = defineRole({{
  name: "{name}",
  version: "0.1.0",
  subscribes: ["service."],

  onEvent(event) {{
    host.info(`event ${{event.seq}} ${{event.kind}} ${{event.key}}`);
    state.setJson("events-seen", state.getJson("events-seen", 0) + 1);
  }},

  onRequest(request) {{
    if (request.command === "hello") return Response.json(request.args);
    if (request.command === "seen") return Response.json(state.getJson("events-seen", 0));
    return Response.notFound(request);
  }},
}});
"#
    );
    // `-d http fetch-event`: no wasi:http, which roles are not given.
    let steps = format!("componentize-js role.js --wit wit -n role -d http fetch-event -o {name}.wasm >/dev/null");
    vec![
        ("role.js".into(), role),
        ("hivemind-role.js".into(), JS_SDK.into()),
        ("wit/role.wit".into(), ROLE_WIT.into()),
        ("build.sh".into(), build_script(name, Language::Js, &steps)),
    ]
}

fn c_files(name: &str) -> Vec<(String, String)> {
    let role = format!(
        r#"// The `{name}` role.
//
// Build: ./build.sh
// Try:   hivemind role {name} hello world

#include <stdlib.h>
#include <string.h>

#include "hivemind_role.h"

void exports_role_describe(role_description_t *ret) {{
    ret->name = hm_string("{name}");
    ret->version = hm_string("0.1.0");
    ret->subscribes.len = 1;
    ret->subscribes.ptr = malloc(sizeof(role_string_t));
    ret->subscribes.ptr[0] = hm_string("service.");
    ret->tick_interval_ms = 0;
}}

bool exports_role_init(role_string_t *err) {{
    (void)err;
    return true;
}}

bool exports_role_on_event(role_event_t *event, role_string_t *err) {{
    char *error = NULL;
    bool ok = hm_state_set_int("events-seen", hm_state_get_int("events-seen", 0) + 1, &error);
    if (!ok) {{
        *err = hm_string(error);
        free(error);
    }}
    role_event_free(event);
    return ok;
}}

void exports_role_on_request(role_request_t *request, role_response_t *ret) {{
    char *command = hm_request_command(request);
    hm_buffer_t body = {{0}};
    if (strcmp(command, "hello") == 0) {{
        hm_buffer_push(&body, "[");
        char *arg;
        for (size_t i = 0; (arg = hm_request_arg(request, i)) != NULL; i++) {{
            if (i > 0) {{
                hm_buffer_push(&body, ",");
            }}
            hm_buffer_push_json_string(&body, arg);
            free(arg);
        }}
        hm_buffer_push(&body, "]");
        hm_response_json(ret, 200, body.text);
    }} else if (strcmp(command, "seen") == 0) {{
        hm_buffer_push_int(&body, hm_state_get_int("events-seen", 0));
        hm_response_json(ret, 200, body.text);
    }} else {{
        hm_response_error(ret, 404, "no such command: try hello or seen");
    }}
    free(body.text);
    free(command);
    role_request_free(request);
}}

bool exports_role_on_packet(role_string_t *listener, role_string_t *peer, role_list_u8_t *data,
                            role_list_u8_t *ret) {{
    (void)ret;
    role_string_free(listener);
    role_string_free(peer);
    role_list_u8_free(data);
    return false;
}}

void exports_role_on_tick(void) {{}}
"#
    );
    let steps = format!(
        r#"mkdir -p bindings
wit-bindgen c wit --world role --out-dir bindings >/dev/null
clang --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor -O2 -Wall -Wextra \
    -I bindings -I . -o bindings/core.wasm \
    bindings/role.c bindings/role_component_type.o hivemind_role.c role.c
# wasi-libc speaks WASI preview 1; the adapter turns that into the
# preview 2 imports a component has.
"${{HIVEMIND:-hivemind}}" roles wasi-adapter --output bindings/wasi_snapshot_preview1.wasm
wasm-tools component new bindings/core.wasm --adapt bindings/wasi_snapshot_preview1.wasm -o {name}.wasm"#
    );
    vec![
        ("role.c".into(), role),
        ("hivemind_role.h".into(), C_SDK_HEADER.into()),
        ("hivemind_role.c".into(), C_SDK_SOURCE.into()),
        ("wit/role.wit".into(), ROLE_WIT.into()),
        ("build.sh".into(), build_script(name, Language::C, &steps)),
    ]
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
