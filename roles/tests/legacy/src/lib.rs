//! A role built against the first published contract, `hivemind:role@0.1.0`
//! (the copy in `tests/fixtures/wit-0.1.0`), with wit-bindgen directly
//! rather than the SDK: it proves that guests built before a
//! semver-compatible addition to `wit/` keep loading and working.

// Generated code; its argument lists follow the WIT, not clippy's taste.
#[allow(clippy::too_many_arguments)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../../tests/fixtures/wit-0.1.0",
        world: "role",
    });
}

use bindings::Guest;
use bindings::hivemind::role::host;
use bindings::hivemind::role::types::{Description, Event, Request, Response};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> Description {
        Description {
            name: "legacy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscribes: vec![],
            tick_interval_ms: 0,
        }
    }

    fn init() -> Result<(), String> {
        Ok(())
    }

    fn on_event(_event: Event) -> Result<(), String> {
        Ok(())
    }

    fn on_request(_request: Request) -> Response {
        let me = host::self_node();
        Response {
            status: 200,
            headers: vec![],
            body: format!("legacy on {}", me.id).into_bytes(),
        }
    }

    fn on_packet(_listener: String, _peer: String, _data: Vec<u8>) -> Option<Vec<u8>> {
        None
    }

    fn on_tick() {}
}

bindings::export!(Legacy with_types_in bindings);
