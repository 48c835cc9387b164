//! The smallest useful role: accepts every event and answers `ping` with
//! `pong`. Benchmarks use it to measure the host's own overhead.

use hivemind_sdk::{Description, Event, Request, Response, Role, export_role};

struct Noop;

impl Role for Noop {
    fn describe() -> Description {
        Description::new("noop", env!("CARGO_PKG_VERSION")).subscribe("")
    }

    fn on_event(_event: Event) -> Result<(), String> {
        Ok(())
    }

    fn on_request(_request: Request) -> Response {
        Response {
            status: 200,
            headers: vec![],
            body: b"pong".to_vec(),
        }
    }
}

export_role!(Noop);
