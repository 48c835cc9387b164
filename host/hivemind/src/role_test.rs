//! `hivemind roles test FILE.wasm`: a role in the sandboxed host of
//! `hivemind-harness`, driven from the command line, for authors in any
//! language and for CI.
//!
//! Order of work: load (describe, init), each event of `--events` in file
//! order, `--reload` if given, then each `--request` in order.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use hivemind_harness::Harness;
use serde_json::{Value, json};

use crate::cli::print_json;

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The component, NAME.wasm.
    file: PathBuf,
    /// Its manifest: limits, grants and config [default: NAME.toml beside
    /// the file, if present].
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Events to deliver, one JSON object per line:
    /// {"kind": "service.up", "key": "web@n1", "payload": {...}}
    /// (a string payload is sent as it is, anything else as JSON).
    #[arg(long, value_name = "FILE.jsonl")]
    events: Option<PathBuf>,
    /// A request to send after the events, "METHOD PATH [BODY]" as one
    /// argument (e.g. --request 'GET /counts' or
    /// --request 'POST /counts {"args": ["web"]}'); may be given many times.
    #[arg(long, value_name = "'METHOD PATH [BODY]'")]
    request: Vec<String>,
    /// Reload the role (fresh instances, init again, state kept) after the
    /// events and before the requests.
    #[arg(long)]
    reload: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// One line of `--events`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    kind: String,
    key: String,
    #[serde(default)]
    payload: Value,
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let failed = runtime.block_on(test(args))?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the test and prints it; true when an event was refused or a call
/// failed.
async fn test(args: TestArgs) -> anyhow::Result<bool> {
    let name = args
        .file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .with_context(|| format!("{}: not a NAME.wasm file name", args.file.display()))?
        .to_string();
    let wasm = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let manifest_path = args
        .manifest
        .clone()
        .or_else(|| Some(args.file.with_extension("toml")).filter(|path| path.exists()));
    let manifest = match &manifest_path {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?),
        None => None,
    };
    let events = match &args.events {
        Some(path) => read_events(path)?,
        None => Vec::new(),
    };
    let mut requests = Vec::new();
    for request in &args.request {
        let mut parts = request.trim().splitn(3, char::is_whitespace);
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
            bail!("--request {request:?}: write it as 'METHOD PATH [BODY]', e.g. 'GET /counts'");
        };
        let body = parts.next().unwrap_or_default().trim().to_string();
        requests.push((method.to_string(), path.to_string(), body));
    }

    let mut role = Harness::load(&name, &wasm, manifest.as_deref()).await?;
    let mut failed = false;
    let description = role.description().clone();
    let mut event_results = Vec::new();
    for line in events {
        let payload = match &line.payload {
            Value::String(text) => text.clone().into_bytes(),
            Value::Null => b"{}".to_vec(),
            other => other.to_string().into_bytes(),
        };
        let outcome = match role.event(&line.kind, &line.key, &payload).await {
            Ok(Ok(())) => json!({ "ok": true }),
            Ok(Err(refusal)) => json!({ "ok": false, "refused": refusal }),
            Err(error) => json!({ "ok": false, "error": format!("{error:#}") }),
        };
        failed |= outcome["ok"] == false;
        event_results.push(json!({ "kind": line.kind, "key": line.key, "outcome": outcome }));
    }
    if args.reload {
        role.reload().await?;
    }
    let mut responses = Vec::new();
    for (method, path, body) in &requests {
        let body = body.as_bytes();
        let answer = match role.request(method, path, body).await {
            Ok(response) => json!({
                "status": response.status,
                "headers": response.headers,
                "body": String::from_utf8_lossy(&response.body),
            }),
            Err(error) => {
                failed = true;
                json!({ "error": format!("{error:#}") })
            }
        };
        responses.push(json!({ "method": method, "path": path, "response": answer }));
    }

    let record = role.record();
    let report = json!({
        "role": {
            "name": name,
            "version": description.version,
            "subscribes": description.subscribes,
            "manifest": manifest_path,
        },
        "events": event_results,
        "reloaded": args.reload,
        "requests": responses,
        "emitted": record.emitted,
        "logged": record.logged,
        "written": record.written,
        "exec_requests": record.exec_requests,
        "failures": record.failures,
        "counters": record.counters,
        "state": role.state(),
    });
    if args.json {
        print_json(&report);
    } else {
        print_report(&report);
    }
    Ok(failed)
}

fn read_events(path: &std::path::Path) -> anyhow::Result<Vec<EventLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(event) => events.push(event),
            Err(error) => bail!(
                "{} line {}: {error}; each line is {{\"kind\": \"...\", \"key\": \"...\", \"payload\": ...}}",
                path.display(),
                index + 1
            ),
        }
    }
    Ok(events)
}

fn print_report(report: &Value) {
    let role = &report["role"];
    let subscribes: Vec<String> = role["subscribes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|prefix| format!("{:?}", prefix.as_str().unwrap_or_default()))
        .collect();
    println!(
        "loaded {} {} (subscribes to {})",
        role["name"].as_str().unwrap_or_default(),
        role["version"].as_str().unwrap_or_default(),
        if subscribes.is_empty() {
            "nothing".to_string()
        } else {
            subscribes.join(", ")
        }
    );
    for event in report["events"].as_array().into_iter().flatten() {
        let outcome = &event["outcome"];
        let result = if outcome["ok"] == true {
            "ok".to_string()
        } else if let Some(refused) = outcome["refused"].as_str() {
            format!("REFUSED: {refused}")
        } else {
            format!("FAILED: {}", outcome["error"].as_str().unwrap_or_default())
        };
        println!(
            "event {} {}: {result}",
            event["kind"].as_str().unwrap_or_default(),
            event["key"].as_str().unwrap_or_default()
        );
    }
    if report["reloaded"] == true {
        println!("reloaded");
    }
    for request in report["requests"].as_array().into_iter().flatten() {
        let response = &request["response"];
        let head = format!(
            "{} {}",
            request["method"].as_str().unwrap_or_default(),
            request["path"].as_str().unwrap_or_default()
        );
        match response["error"].as_str() {
            Some(error) => println!("{head} -> FAILED: {error}"),
            None => {
                println!("{head} -> {}", response["status"]);
                println!("  {}", response["body"].as_str().unwrap_or_default());
            }
        }
    }
    let section = |title: &str, lines: Vec<String>| {
        if !lines.is_empty() {
            println!("{title}:");
            for line in lines {
                println!("  {line}");
            }
        }
    };
    let items = |key: &str| report[key].as_array().cloned().unwrap_or_default();
    section(
        "emitted",
        items("emitted")
            .iter()
            .map(|event| {
                format!(
                    "seq {} {} {} {}",
                    event["seq"],
                    event["kind"].as_str().unwrap_or_default(),
                    event["key"].as_str().unwrap_or_default(),
                    event["payload"].as_str().unwrap_or_default()
                )
            })
            .collect(),
    );
    section(
        "logged",
        items("logged")
            .iter()
            .map(|line| {
                format!(
                    "{:<5} {}",
                    line["level"].as_str().unwrap_or_default(),
                    line["message"].as_str().unwrap_or_default()
                )
            })
            .collect(),
    );
    let map_lines = |key: &str| -> Vec<String> {
        report[key]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, value)| format!("{name} = {}", value.as_str().unwrap_or_default()))
            .collect()
    };
    section("written", map_lines("written"));
    section(
        "exec requested (not run in the sandbox)",
        items("exec_requests")
            .iter()
            .map(|line| line.as_str().unwrap_or_default().to_string())
            .collect(),
    );
    section(
        "failures",
        items("failures")
            .iter()
            .map(|line| line.as_str().unwrap_or_default().to_string())
            .collect(),
    );
    section(
        "counted",
        report["counters"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(series, total)| format!("{series} += {total}"))
            .collect(),
    );
    section("state", map_lines("state"));
}
