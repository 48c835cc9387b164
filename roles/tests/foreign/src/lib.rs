//! A role that also imports an interface no Hivemind host provides
//! (`acme:weather/forecast`): the host must refuse it and name the import.

mod weather {
    wit_bindgen::generate!({
        inline: r#"
            package acme:weather;
            interface forecast {
                today: func() -> string;
            }
            world weather {
                import forecast;
            }
        "#,
    });
}

use hivemind_sdk::{Description, Request, Response, Role, export_role};

struct Foreign;

impl Role for Foreign {
    fn describe() -> Description {
        Description::new("foreign", env!("CARGO_PKG_VERSION"))
    }

    fn on_request(_request: Request) -> Response {
        Response::text(200, &weather::acme::weather::forecast::today())
    }
}

export_role!(Foreign);
