//! A role that opens a TCP connection itself (to the `IP:PORT` in its
//! request's arguments), so its component imports `wasi:sockets`. The host
//! links those imports, as Python's and JavaScript's toolchains need, but
//! must refuse every use of them.

use hivemind_sdk::{Description, Request, Response, Role, export_role};

struct Sockets;

impl Role for Sockets {
    fn describe() -> Description {
        Description::new("sockets", env!("CARGO_PKG_VERSION"))
    }

    fn on_request(request: Request) -> Response {
        let Some(address) = request.args().into_iter().next() else {
            return Response::error(400, "usage: connect IP:PORT");
        };
        match std::net::TcpStream::connect(address.as_str()) {
            Ok(_) => Response::text(200, "connected"),
            Err(error) => Response::error(500, &error.to_string()),
        }
    }
}

export_role!(Sockets);
