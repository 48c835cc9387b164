//! Counts the service events of each service, durably, and serves the
//! counts: the same role as the Python, JavaScript and C examples beside it.
//!
//! `hivemind role rust-counter counts` (or GET /v1/roles/rust-counter/counts)
//! answers {"SERVICE": N, ...}; `counts SERVICE` answers one count. The counts
//! live in the role's state, so they survive reloads, new versions and
//! restarts. On a UDP listener, a datagram of a two-byte ID and `counts` is
//! answered with the ID and the counts as JSON; the host keeps that reply
//! and answers repeats itself until the next event (`keep_reply`).

use std::collections::BTreeMap;

use hivemind_sdk::{Description, Event, Request, Response, Role, export_role, host, info, state};

const COUNT_PREFIX: &str = "count/";

struct ServiceCounter;

impl Role for ServiceCounter {
    fn describe() -> Description {
        Description::new("rust-counter", env!("CARGO_PKG_VERSION")).subscribe("service.")
    }

    fn init() -> Result<(), String> {
        info!("counting {} services so far", state::keys(COUNT_PREFIX).len());
        Ok(())
    }

    fn on_event(event: Event) -> Result<(), String> {
        // The host redelivers after an error, so an event already counted
        // (seq at or below the last one) is skipped.
        if event.seq <= state::get_json::<u64>("last-seq")?.unwrap_or(0) {
            return Ok(());
        }
        let service = event.key.split('@').next().unwrap_or_default();
        let key = format!("{COUNT_PREFIX}{service}");
        // Also a counter at the host's /metrics, labelled from a fixed set
        // (any role may emit any service.* kind); best effort, as metrics are.
        let change = match event.kind.as_str() {
            "service.up" => "up",
            "service.down" => "down",
            _ => "other",
        };
        let _ = host::count("service_events", &[("change", change)], 1);
        let count: u64 = state::get_json(&key)?.unwrap_or(0);
        state::set_json(&key, &(count + 1))?;
        state::set_json("last-seq", &event.seq)
    }

    fn on_request(request: Request) -> Response {
        if request.command() != "counts" {
            return Response::not_found(&request);
        }
        let counts = counts();
        match request.args().first() {
            None => Response::json(200, &counts),
            Some(service) => match counts.get(service) {
                Some(count) => Response::json(200, &BTreeMap::from([(service, count)])),
                None => Response::error(404, &format!("no events counted for service {service:?}")),
            },
        }
    }

    fn on_packet(_listener: String, _peer: String, data: Vec<u8>) -> Option<Vec<u8>> {
        let (id, question) = data.split_at_checked(2)?;
        if question != b"counts" {
            return None;
        }
        let mut reply = id.to_vec();
        reply.extend_from_slice(&serde_json::to_vec(&counts()).ok()?);
        // Only events change the counts, and the host forgets kept replies
        // after each one.
        let _ = host::keep_reply(2, Some(("count_queries", &[("kind", "counts")])));
        Some(reply)
    }
}

/// Events counted per service.
fn counts() -> BTreeMap<String, u64> {
    state::keys(COUNT_PREFIX)
        .into_iter()
        .filter_map(|key| {
            let count = state::get_json(&key).ok().flatten()?;
            Some((key[COUNT_PREFIX.len()..].to_string(), count))
        })
        .collect()
}

export_role!(ServiceCounter);
