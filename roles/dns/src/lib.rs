//! The `dns` role: answers DNS for the cluster's zone on a host-owned UDP
//! listener.
//!
//! This version answers for nodes: `NODE.node.ZONE` gives the node's address
//! as A (or AAAA). The zone apex answers SOA and NS; any other name in the
//! zone is NXDOMAIN with the SOA in the authority section (so resolvers cache
//! the negative answer for `ttl` seconds); names outside the zone are
//! REFUSED, because this server does not recurse.
//!
//! Config (`[config]` in dns.toml): `zone` (default `hive.`), `ttl` in
//! seconds (default 5). Commands: `hivemind role dns records` lists what it
//! serves; `hivemind role dns lookup NAME [TYPE]` answers one query as JSON.

use std::net::IpAddr;
use std::str::FromStr;

use domain::base::iana::{Class, Rcode};
use domain::base::{Message, MessageBuilder, Name, Rtype, Serial, Ttl};
use domain::rdata::{A, Aaaa, Ns, Soa};
use hivemind_sdk::{Description, Request, Response, Role, export_role, host};
use serde::Deserialize;

struct Dns;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    zone: String,
    ttl: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            zone: "hive.".into(),
            ttl: 5,
        }
    }
}

impl Config {
    fn load() -> Result<Config, String> {
        let mut config: Config = host::config()?;
        config.zone = config.zone.trim_end_matches('.').to_ascii_lowercase() + ".";
        Ok(config)
    }
}

/// A record this role serves.
#[derive(serde::Serialize)]
struct Answer {
    name: String,
    r#type: &'static str,
    ttl: u32,
    data: String,
}

/// What a name in the zone resolves to.
enum Lookup {
    /// The name exists; these are its records of the asked type (maybe none).
    Records(Vec<(Rtype, IpAddr)>),
    /// The zone apex itself.
    Apex,
    NxDomain,
    Refused,
}

fn lookup(config: &Config, qname: &str, qtype: Rtype) -> Lookup {
    let qname = qname.trim_end_matches('.').to_ascii_lowercase() + ".";
    let Some(inside) = qname.strip_suffix(config.zone.as_str()) else {
        return Lookup::Refused;
    };
    if inside.is_empty() {
        return Lookup::Apex;
    }
    let Some(node_name) = inside.strip_suffix(".node.") else {
        return Lookup::NxDomain;
    };
    let nodes = host::nodes(None, true);
    let Some(node) = nodes
        .iter()
        .find(|node| node.name.eq_ignore_ascii_case(node_name) || node.id == node_name)
    else {
        return Lookup::NxDomain;
    };
    let address = node_ip(&node.address);
    let records = match (address, qtype) {
        (Some(ip @ IpAddr::V4(_)), Rtype::A) => vec![(Rtype::A, ip)],
        (Some(ip @ IpAddr::V6(_)), Rtype::AAAA) => vec![(Rtype::AAAA, ip)],
        (Some(ip @ IpAddr::V4(_)), Rtype::ANY) => vec![(Rtype::A, ip)],
        (Some(ip @ IpAddr::V6(_)), Rtype::ANY) => vec![(Rtype::AAAA, ip)],
        _ => Vec::new(),
    };
    Lookup::Records(records)
}

/// The IP part of a node address (`IP:PORT`, `[IPv6]:PORT` or a bare IP).
fn node_ip(address: &str) -> Option<IpAddr> {
    if let Ok(socket) = std::net::SocketAddr::from_str(address) {
        return Some(socket.ip());
    }
    IpAddr::from_str(address).ok()
}

fn zone_name(config: &Config) -> Result<Name<Vec<u8>>, String> {
    Name::from_str(&config.zone).map_err(|error| format!("zone {:?} is not a domain name: {error}", config.zone))
}

fn soa(config: &Config) -> Result<Soa<Name<Vec<u8>>>, String> {
    let mname = Name::from_str(&format!("ns.{}", config.zone)).map_err(|error| error.to_string())?;
    let rname = Name::from_str(&format!("hostmaster.{}", config.zone)).map_err(|error| error.to_string())?;
    let ttl = Ttl::from_secs(config.ttl);
    Ok(Soa::new(
        mname,
        rname,
        Serial(1),
        Ttl::from_secs(3600),
        Ttl::from_secs(600),
        Ttl::from_secs(86400),
        ttl,
    ))
}

/// Answers one DNS query; `None` for input that is not a query at all.
fn answer(config: &Config, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_octets(query).ok()?;
    if request.header().qr() {
        return None;
    }
    let Ok(question) = request.sole_question() else {
        let builder = MessageBuilder::new_vec().start_error(&request, Rcode::FORMERR);
        return Some(builder.finish());
    };
    let qname = question.qname().to_string();
    let qtype = question.qtype();
    let zone = zone_name(config).ok()?;
    let ttl = config.ttl;
    let outcome = lookup(config, &qname, qtype);
    let rcode = match outcome {
        Lookup::Refused => Rcode::REFUSED,
        Lookup::NxDomain => Rcode::NXDOMAIN,
        _ => Rcode::NOERROR,
    };
    let mut builder = MessageBuilder::new_vec().start_answer(&request, rcode).ok()?;
    builder.header_mut().set_aa(!matches!(outcome, Lookup::Refused));
    builder.header_mut().set_ra(false);
    let owner = question.qname();
    match outcome {
        Lookup::Refused => return Some(builder.finish()),
        Lookup::Apex => match qtype {
            Rtype::SOA | Rtype::ANY => {
                builder.push((&zone, ttl, soa(config).ok()?)).ok()?;
            }
            Rtype::NS => {
                let ns = Name::<Vec<u8>>::from_str(&format!("ns.{}", config.zone)).ok()?;
                builder.push((&zone, ttl, Ns::new(ns))).ok()?;
            }
            _ => {
                let mut authority = builder.authority();
                authority.push((&zone, ttl, soa(config).ok()?)).ok()?;
                return Some(authority.finish());
            }
        },
        Lookup::Records(records) if records.is_empty() => {
            let mut authority = builder.authority();
            authority.push((&zone, ttl, soa(config).ok()?)).ok()?;
            return Some(authority.finish());
        }
        Lookup::Records(records) => {
            for (_, ip) in records {
                match ip {
                    IpAddr::V4(v4) => builder.push((owner, Class::IN, ttl, A::new(v4))).ok()?,
                    IpAddr::V6(v6) => builder.push((owner, Class::IN, ttl, Aaaa::new(v6))).ok()?,
                }
            }
        }
        Lookup::NxDomain => {
            let mut authority = builder.authority();
            authority.push((&zone, ttl, soa(config).ok()?)).ok()?;
            return Some(authority.finish());
        }
    }
    Some(builder.finish())
}

fn records(config: &Config) -> Vec<Answer> {
    host::nodes(None, true)
        .into_iter()
        .filter_map(|node| {
            let ip = node_ip(&node.address)?;
            Some(Answer {
                name: format!("{}.node.{}", node.name.to_ascii_lowercase(), config.zone),
                r#type: if ip.is_ipv4() { "A" } else { "AAAA" },
                ttl: config.ttl,
                data: ip.to_string(),
            })
        })
        .collect()
}

impl Role for Dns {
    fn describe() -> Description {
        Description::new("dns", env!("CARGO_PKG_VERSION"))
    }

    fn init() -> Result<(), String> {
        let config = Config::load()?;
        zone_name(&config)?;
        Ok(())
    }

    fn on_packet(_listener: String, _peer: String, data: Vec<u8>) -> Option<Vec<u8>> {
        let config = Config::load().ok()?;
        answer(&config, &data)
    }

    fn on_request(request: Request) -> Response {
        let config = match Config::load() {
            Ok(config) => config,
            Err(error) => return Response::error(500, &error),
        };
        let args = request.args();
        match request.command() {
            "records" => Response::json(200, &records(&config)),
            "lookup" => {
                let Some(name) = args.first() else {
                    return Response::error(400, "usage: lookup NAME [A|AAAA|SOA|NS|ANY]");
                };
                let qtype = match args.get(1).map(|kind| kind.to_ascii_uppercase()).as_deref() {
                    None | Some("A") => Rtype::A,
                    Some("AAAA") => Rtype::AAAA,
                    Some("SOA") => Rtype::SOA,
                    Some("NS") => Rtype::NS,
                    Some("ANY") => Rtype::ANY,
                    Some(other) => return Response::error(400, &format!("record type {other} is not served")),
                };
                let (status, body) = match lookup(&config, name, qtype) {
                    Lookup::Refused => ("REFUSED", Vec::new()),
                    Lookup::NxDomain => ("NXDOMAIN", Vec::new()),
                    Lookup::Apex => ("NOERROR", vec![format!("{} SOA", config.zone)]),
                    Lookup::Records(records) => (
                        "NOERROR",
                        records.into_iter().map(|(kind, ip)| format!("{kind} {ip}")).collect(),
                    ),
                };
                Response::json(
                    200,
                    &serde_json::json!({ "name": name, "rcode": status, "answers": body }),
                )
            }
            _ => Response::not_found(&request),
        }
    }
}

export_role!(Dns);
