//! A well-behaved role that exercises every host capability, for tests.
//!
//! Commands (`hivemind role probe CMD ARGS...` or `/v1/roles/probe/CMD`):
//! `version`, `echo` (the body back), `state-get KEY`, `state-set KEY VALUE`,
//! `emit KIND KEY [JSON]`, `events [AFTER]`, `seen` (seqs delivered to
//! `on-event`), `self`, `nodes`, `config`, `call NODE ROLE CMD`,
//! `write PATH TEXT`, `exec PROGRAM ARGS...`, `sleep MS` (answers `slept VERSION`),
//! `ambient` (what WASI gives it: environment size, a file read, `/` listing).
//! Datagrams on any listener are answered with `VERSION DATA`, but for:
//! `IDkeep:TEXT` (a two-byte ID first), answered `ID VERSION call N TEXT`
//! with N counting such calls, and kept by the host (`keep-reply`, tallied
//! as `probe_kept`); `forget` (calls `forget-replies`); `keep-too-much`
//! (a refused `keep-reply`, answered with the error).

use hivemind_sdk::{Description, Event, Request, Response, Role, export_role, host, state};

struct Probe;

const VERSION: &str = env!("CARGO_PKG_VERSION");

thread_local! {
    /// `keep:` datagrams this instance was called for.
    static PACKET_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Role for Probe {
    fn describe() -> Description {
        Description::new("probe", VERSION).subscribe("test.")
    }

    fn init() -> Result<(), String> {
        let inits: u64 = state::get_json("inits")?.unwrap_or(0);
        state::set_json("inits", &(inits + 1))
    }

    fn on_event(event: Event) -> Result<(), String> {
        let mut seen: Vec<u64> = state::get_json("seen")?.unwrap_or_default();
        seen.push(event.seq);
        state::set_json("seen", &seen)
    }

    fn on_request(request: Request) -> Response {
        let args = request.args();
        let arg = |index: usize| args.get(index).map(String::as_str).unwrap_or("");
        match request.command() {
            "version" => Response::text(200, VERSION),
            // keep-reply is for on-packet only: this shows the refusal.
            "keep" => match host::keep_reply(2, None) {
                Ok(()) => Response::text(200, "kept"),
                Err(error) => Response::error(400, error.message()),
            },
            "echo" => Response {
                status: 200,
                headers: vec![],
                body: request.body.clone(),
            },
            "state-get" => match state::get(arg(0)) {
                Some(value) => Response {
                    status: 200,
                    headers: vec![],
                    body: value,
                },
                None => Response::error(404, &format!("no state key {}", arg(0))),
            },
            "state-set" => match state::set(arg(0), arg(1).as_bytes()) {
                Ok(()) => Response::text(200, "ok"),
                Err(error) => Response::error(500, &error),
            },
            "emit" => {
                let payload = if arg(2).is_empty() { "{}" } else { arg(2) };
                match host::emit_raw(arg(0), arg(1), payload.as_bytes()) {
                    Ok(seq) => Response::json(200, &serde_json::json!({ "seq": seq })),
                    Err(error) => Response::error(403, error.message()),
                }
            }
            "events" => {
                let after = arg(0).parse().unwrap_or(0);
                match host::events_since(after, "", 1000) {
                    Ok(events) => {
                        let list: Vec<_> = events
                            .iter()
                            .map(|event| serde_json::json!({"seq": event.seq, "kind": event.kind, "key": event.key}))
                            .collect();
                        Response::json(200, &list)
                    }
                    Err(error) => Response::error(500, error.message()),
                }
            }
            "seen" => Response::json(
                200,
                &state::get_json::<Vec<u64>>("seen").ok().flatten().unwrap_or_default(),
            ),
            "self" => {
                let node = host::self_node();
                Response::json(
                    200,
                    &serde_json::json!({"id": node.id, "name": node.name, "healthy": node.healthy, "roles": node.roles}),
                )
            }
            "nodes" => {
                let nodes: Vec<String> = host::nodes(None, false).into_iter().map(|node| node.id).collect();
                Response::json(200, &nodes)
            }
            "config" => match host::config::<serde_json::Value>() {
                Ok(config) => Response::json(200, &config),
                Err(error) => Response::error(500, &error),
            },
            "call" => {
                let inner = Request {
                    method: "POST".into(),
                    path: format!("/{}", arg(2)),
                    query: String::new(),
                    headers: vec![],
                    body: vec![],
                };
                match host::call(arg(0), arg(1), &inner) {
                    Ok(response) => response,
                    Err(error) => Response::error(503, error.message()),
                }
            }
            "write" => match host::write_file(arg(0), arg(1).as_bytes()) {
                Ok(()) => Response::text(200, "ok"),
                Err(error) => Response::error(403, error.message()),
            },
            "exec" => match host::exec(arg(0), &args[1.min(args.len())..], 5000) {
                Ok(output) => Response::json(
                    200,
                    &serde_json::json!({
                        "status": output.status,
                        "stdout": String::from_utf8_lossy(&output.stdout),
                        "stderr": String::from_utf8_lossy(&output.stderr),
                    }),
                ),
                Err(error) => Response::error(403, error.message()),
            },
            "check" => {
                let result = match arg(0) {
                    "tcp" => host::check_tcp(arg(1), 2000),
                    _ => host::check_http(arg(1), 2000),
                };
                match result {
                    Ok(millis) => Response::json(200, &serde_json::json!({ "healthy": true, "ms": millis })),
                    Err(error) => Response::json(
                        200,
                        &serde_json::json!({
                            "healthy": false,
                            "denied": matches!(error, hivemind_sdk::HostError::Denied(_)),
                            "error": error.message(),
                        }),
                    ),
                }
            }
            "sleep" => {
                let millis = arg(0).parse().unwrap_or(100);
                std::thread::sleep(std::time::Duration::from_millis(millis));
                Response::text(200, &format!("slept {VERSION}"))
            }
            "ambient" => {
                let file = match std::fs::read_to_string("/etc/hostname") {
                    Ok(_) => "readable".to_string(),
                    Err(error) => error.to_string(),
                };
                let preopens = std::fs::read_dir("/").map(|entries| entries.count()).unwrap_or(0);
                Response::json(
                    200,
                    &serde_json::json!({ "env": std::env::vars().count(), "file": file, "root_entries": preopens }),
                )
            }
            _ => Response::not_found(&request),
        }
    }

    fn on_packet(_listener: String, _peer: String, data: Vec<u8>) -> Option<Vec<u8>> {
        // `IDkeep:TEXT` (a two-byte ID first): the reply may be kept.
        if let Some(text) = data.get(2..).and_then(|rest| rest.strip_prefix(b"keep:")) {
            let call = PACKET_CALLS.with(|calls| {
                calls.set(calls.get() + 1);
                calls.get()
            });
            let mut reply = data[..2].to_vec();
            reply.extend_from_slice(format!("{VERSION} call {call} ").as_bytes());
            reply.extend_from_slice(text);
            if let Err(error) = host::keep_reply(2, Some(("probe_kept", &[("kind", "keep")]))) {
                return Some(format!("keep-reply failed: {}", error.message()).into_bytes());
            }
            return Some(reply);
        }
        match data.as_slice() {
            b"forget" => {
                host::forget_replies();
                return Some(b"forgot".to_vec());
            }
            b"keep-too-much" => {
                let outcome = host::keep_reply(17, None).map_err(|error| error.message().to_string());
                return Some(format!("{outcome:?}").into_bytes());
            }
            _ => {}
        }
        let mut reply = format!("{VERSION} ").into_bytes();
        reply.extend_from_slice(&data);
        Some(reply)
    }
}

export_role!(Probe);
