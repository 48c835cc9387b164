//! A role that opens a TCP connection itself, so its component imports
//! `wasi:sockets`: the host must refuse to load it and say why.

use hivemind_sdk::{Description, Request, Response, Role, export_role};

struct Sockets;

impl Role for Sockets {
    fn describe() -> Description {
        Description::new("sockets", env!("CARGO_PKG_VERSION"))
    }

    fn on_request(_request: Request) -> Response {
        match std::net::TcpStream::connect("127.0.0.1:1") {
            Ok(_) => Response::text(200, "connected"),
            Err(error) => Response::error(500, &error.to_string()),
        }
    }
}

export_role!(Sockets);
