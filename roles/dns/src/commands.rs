//! `hivemind role dns records` and `hivemind role dns lookup NAME [TYPE]`.

use std::str::FromStr;

use domain::base::iana::Class;
use domain::base::{Message, MessageBuilder, Name, ParsedName, Rtype};
use domain::rdata::AllRecordData;
use hivemind_sdk::Response;
use serde::Serialize;

use crate::Loaded;
use crate::table::address_label;

#[derive(Serialize)]
struct Record {
    name: String,
    r#type: String,
    ttl: u32,
    data: String,
}

fn render(records: &[Record], json: bool) -> Response {
    if json {
        return Response::json(200, records);
    }
    let mut text = String::new();
    for record in records {
        text.push_str(&format!(
            "{:<40} {:>6} IN {:<5} {}\n",
            record.name, record.ttl, record.r#type, record.data
        ));
    }
    Response::text(200, &text)
}

/// Everything the zone answers, one line per record.
pub fn records(loaded: &Loaded, json: bool) -> Response {
    let zone = &loaded.zone.suffix;
    let ttl = loaded.zone.config.ttl;
    let table = &loaded.table;
    let record = |name: String, kind: &str, data: String| Record {
        name,
        r#type: kind.to_string(),
        ttl,
        data,
    };
    let address_type = |address: &std::net::IpAddr| if address.is_ipv4() { "A" } else { "AAAA" };
    let mut records = Vec::new();
    for node in table.services.nodes.values() {
        if let (true, Some(address)) = (node.alive, node.address) {
            records.push(record(
                format!("{}.node.{zone}", node.name.to_ascii_lowercase()),
                address_type(&address),
                address.to_string(),
            ));
        }
    }
    let mut services: Vec<_> = table.by_service.iter().collect();
    services.sort_by(|a, b| a.0.cmp(b.0));
    for (service, instances) in services {
        for served in instances {
            records.push(record(
                format!("{service}.service.{zone}"),
                address_type(&served.address),
                served.address.to_string(),
            ));
        }
        for served in instances {
            records.push(record(
                format!("_{service}._tcp.service.{zone}"),
                "SRV",
                format!("1 1 {} {}.", served.port, served.target),
            ));
        }
        for served in instances.iter().filter(|served| !served.tags.is_empty()) {
            let strings: Vec<String> = served.tags.iter().map(|tag| format!("{tag:?}")).collect();
            records.push(record(format!("{service}.service.{zone}"), "TXT", strings.join(" ")));
        }
    }
    let mut addresses: Vec<_> = table.addresses.values().collect();
    addresses.sort();
    addresses.dedup();
    for address in addresses {
        records.push(record(
            format!("{}.addr.{zone}", address_label(*address)),
            address_type(address),
            address.to_string(),
        ));
    }
    render(&records, json)
}

/// Answers one query through the same path as the listeners, and prints
/// the reply's rcode and records.
pub fn lookup(loaded: &mut Loaded, args: &[&String], json: bool) -> Response {
    const USAGE: &str = "usage: lookup NAME [A|AAAA|SRV|TXT|SOA|NS|ANY] [--json]";
    let (name, qtype) = match args {
        [name] => (name.as_str(), Rtype::A),
        [name, qtype] => match Rtype::from_str(&qtype.to_ascii_uppercase()) {
            Ok(qtype) => (name.as_str(), qtype),
            Err(_) => return Response::error(400, &format!("record type {qtype:?} is unknown; {USAGE}")),
        },
        _ => return Response::error(400, USAGE),
    };
    let Ok(qname) = Name::<Vec<u8>>::from_str(name) else {
        return Response::error(400, &format!("{name:?} is not a domain name"));
    };
    let mut builder = MessageBuilder::new_vec().question();
    if builder.push((&qname, qtype, Class::IN)).is_err() {
        return Response::error(400, &format!("{name:?} does not fit in a DNS query"));
    }
    let Some((reply, _)) = crate::answer(loaded, &builder.finish(), false) else {
        return Response::error(500, "the query got no answer");
    };
    let Ok(message) = Message::from_octets(reply.as_slice()) else {
        return Response::error(500, "the answer does not parse");
    };
    let mut records = Vec::new();
    let sections = [
        ("answer", message.answer()),
        ("authority", message.authority()),
        ("additional", message.additional()),
    ];
    let mut lines = Vec::new();
    for (section, parsed) in sections {
        let Ok(parsed) = parsed else { continue };
        for record in parsed.limit_to::<AllRecordData<_, ParsedName<_>>>().flatten() {
            lines.push(format!("{section}: {record}"));
            records.push(serde_json::json!({
                "section": section,
                "name": record.owner().to_string(),
                "type": record.rtype().to_string(),
                "ttl": record.ttl().as_secs(),
                "data": record.data().to_string(),
            }));
        }
    }
    let rcode = message.header().rcode().to_string();
    if json {
        return Response::json(
            200,
            &serde_json::json!({ "name": name, "type": qtype.to_string(), "rcode": rcode, "records": records }),
        );
    }
    let mut text = format!("{rcode}\n");
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    Response::text(200, &text)
}
