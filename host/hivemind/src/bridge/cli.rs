//! `hivemind bridge ...`: status and operator actions, through the API.

use std::path::Path;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::{Client, ClientArgs, json_or_error, print_json, text};

#[derive(Debug, Subcommand)]
pub enum BridgeCommand {
    /// Show every bridge (or one): active backend and why, routing, each
    /// backend's health as each node sees it, this node's sessions and bytes.
    Status {
        /// One bridge, by its [[bridge]] name [default: all].
        name: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Turn routing on: new clients are bridged to the active backend again.
    Enable {
        /// The bridge, by its [[bridge]] name.
        name: String,
        /// Why (recorded in the log with the change; required).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Turn routing off: new clients are closed at once and every bridged
    /// session is severed, on every node.
    Disable {
        /// The bridge, by its [[bridge]] name.
        name: String,
        /// Why (recorded in the log with the change; required).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make BACKEND the active one whatever its checks say, until unpinned.
    Pin {
        /// The bridge, by its [[bridge]] name.
        name: String,
        /// One of its backends, by name.
        backend: String,
        /// Why (recorded in the log with the change; required).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Let the health policy choose again (the pinned backend stays while healthy).
    Unpin {
        /// The bridge, by its [[bridge]] name.
        name: String,
        /// Why (recorded in the log with the change; required).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take BACKEND out of the choice: if active, the next healthy backend
    /// takes over; its sessions are left to finish.
    Drain {
        /// The bridge, by its [[bridge]] name.
        name: String,
        /// One of its backends, by name.
        backend: String,
        /// Put a drained backend back instead.
        #[arg(long)]
        undo: bool,
        /// Why (recorded in the log with the change; required).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub fn run(data_dir: Option<&Path>, command: BridgeCommand) -> anyhow::Result<()> {
    let (name, body, reason, client) = match command {
        BridgeCommand::Status { name, client } => {
            let api = Client::resolve(data_dir, &client)?;
            let bridges = match &name {
                Some(name) => json!([api.get_json(&format!("/v1/bridges/{name}"))?]),
                None => api.get_json("/v1/bridges")?,
            };
            if client.json {
                print_json(if name.is_some() { &bridges[0] } else { &bridges });
            } else if bridges.as_array().is_none_or(Vec::is_empty) {
                println!("no bridges: add [[bridge]] sections to the host config (see `hivemind up --help`)");
            } else {
                for bridge in bridges.as_array().into_iter().flatten() {
                    print_bridge(bridge);
                }
            }
            return Ok(());
        }
        BridgeCommand::Enable { name, reason, client } => (name, json!({ "enabled": true }), reason, client),
        BridgeCommand::Disable { name, reason, client } => (name, json!({ "enabled": false }), reason, client),
        BridgeCommand::Pin {
            name,
            backend,
            reason,
            client,
        } => (name, json!({ "pin": backend }), reason, client),
        BridgeCommand::Unpin { name, reason, client } => (name, json!({ "pin": null }), reason, client),
        BridgeCommand::Drain {
            name,
            backend,
            undo,
            reason,
            client,
        } => {
            let key = if undo { "undrain" } else { "drain" };
            (name, json!({ key: backend }), reason, client)
        }
    };
    let Some(reason) = reason.filter(|reason| !reason.trim().is_empty()) else {
        bail!("a reason is required: add --reason TEXT (it is recorded in the log with the change)");
    };
    let mut body = body;
    body["reason"] = Value::String(reason);
    let api = Client::resolve(data_dir, &client)?;
    let (status, reply) = api.send(
        "PATCH",
        &format!("/v1/bridges/{name}"),
        &serde_json::to_vec(&body)?,
        "application/json",
    )?;
    let reply = json_or_error(status, &reply)?;
    if client.json {
        print_json(&reply);
    } else {
        print_bridge(&reply);
    }
    Ok(())
}

fn print_bridge(bridge: &Value) {
    let active = &bridge["active"];
    println!("bridge    {} on {}", text(&bridge["name"]), text(&bridge["listen"]));
    println!(
        "active    {} ({})",
        text(&active["backend"]),
        if active.is_null() {
            "no decision yet".into()
        } else {
            text(&active["reason"])
        }
    );
    let routing = &bridge["routing"];
    if routing["enabled"] == true {
        println!("routing   on");
    } else {
        println!("routing   OFF: {}", text(&routing["reason"]));
    }
    if bridge["serving"] != true {
        println!("this node refuses clients: {}", text(&bridge["serving_reason"]));
    }
    for other in bridge["config_differs"].as_array().into_iter().flatten() {
        let backends: Vec<String> = other["backends"].as_array().into_iter().flatten().map(text).collect();
        println!(
            "WARNING   {}'s [[bridge]] differs from this node's: backends {}, failback {}",
            text(&other["node_name"]),
            backends.join(", "),
            text(&other["failback"])
        );
    }
    if !bridge["pinned"].is_null() {
        println!(
            "pinned    {} ({})",
            text(&bridge["pinned"]["backend"]),
            text(&bridge["pinned"]["reason"])
        );
    }
    println!(
        "{:<12} {:<22} {:<7} {:<9} {:>8} {:>8} {:>12} {:>12}  seen by",
        "BACKEND", "ADDRESS", "ACTIVE", "HEALTH", "SESSIONS", "TOTAL", "BYTES IN", "BYTES OUT"
    );
    for backend in bridge["backends"].as_array().into_iter().flatten() {
        let health = &backend["health"];
        let (up, down) = (health["up"].as_u64().unwrap_or(0), health["down"].as_u64().unwrap_or(0));
        let mut verdict = format!("{} {up}/{}", text(&health["verdict"]), up + down);
        if !backend["drained"].is_null() {
            verdict = format!("drained ({})", text(&backend["drained"]["reason"]));
        }
        let seen: Vec<String> = backend["seen_by"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|report| {
                format!(
                    "{}:{}",
                    text(&report["node_name"]),
                    if report["healthy"] == true { "up" } else { "down" }
                )
            })
            .collect();
        let sessions = &backend["sessions"];
        println!(
            "{:<12} {:<22} {:<7} {:<9} {:>8} {:>8} {:>12} {:>12}  {}",
            text(&backend["name"]),
            text(&backend["address"]),
            if backend["active"] == true { "yes" } else { "" },
            verdict,
            text(&sessions["current"]),
            text(&sessions["total"]),
            text(&sessions["bytes_to_backend"]),
            text(&sessions["bytes_to_client"]),
            seen.join(" ")
        );
    }
    println!();
}
