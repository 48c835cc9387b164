//! The `dns` role: answers DNS for the cluster's zone (default `hive.`) on
//! host-owned UDP and TCP listeners. It is authoritative for the zone and
//! does not recurse: names outside it are REFUSED.
//!
//! - `NODE.node.ZONE` A/AAAA: a live node's address (by name or id).
//! - `SERVICE.service.ZONE` A/AAAA: the healthy instances' addresses, in a
//!   new random order per answer; TXT: each instance's tags; SRV: as below.
//! - `TAG.SERVICE.service.ZONE`: the same, only instances with that tag.
//! - `_SERVICE._tcp.service.ZONE` SRV: port and target per healthy
//!   instance, the targets' addresses in the additional section.
//! - `HEX.addr.ZONE` A/AAAA: an SRV target for an instance that is not on
//!   its node's address (`7f000001` is 127.0.0.1).
//! - The apex answers SOA and NS. A name without records is NXDOMAIN, and a
//!   name without records of the asked type (or with names only below it,
//!   like `service.ZONE`) is NODATA, both with the SOA so resolvers cache
//!   the answer for `ttl` seconds.
//!
//! EDNS0 is answered (payload size `edns_payload`); an answer bigger than the
//! client's UDP size is sent empty with the TC bit so it retries over TCP.
//!
//! The table comes from `service.*` and `node.*` events (see `table.rs`) and
//! lives in the instance's memory, so a query costs no host call. The
//! manifest runs one instance (`workers = 1`): events and queries then see
//! the same table. Commands: `records [--json]`, `lookup NAME [TYPE]`.

mod cache;
mod metrics;
mod table;

use std::cell::RefCell;
use std::net::IpAddr;
use std::str::FromStr;

use domain::base::iana::{Class, Opcode, OptRcode, Rcode};
use domain::base::message_builder::{AdditionalBuilder, AnswerBuilder, AuthorityBuilder, PushError, StaticCompressor};
use domain::base::record::ComposeRecord;
use domain::base::{Message, MessageBuilder, Name, ParsedName, Question, Rtype, Serial, ToName, Ttl};
use domain::rdata::{A, Aaaa, Ns, Soa, Srv, Txt};
use hivemind_sdk::{Description, Event, Request, Response, Role, export_role, host};
use serde::Deserialize;

use crate::table::{Served, Table};

struct Dns;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    zone: String,
    ttl: u32,
    /// The UDP payload size announced in EDNS answers.
    edns_payload: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            zone: "hive.".into(),
            ttl: 5,
            edns_payload: 1232,
        }
    }
}

/// What the zone needs besides the table, built once per instance.
struct Zone {
    config: Config,
    /// `hive.`, lower case with the final dot.
    suffix: String,
    apex: Name<Vec<u8>>,
    ns: Name<Vec<u8>>,
    soa: Soa<Name<Vec<u8>>>,
    /// This node's address: the answer for `ns.ZONE`.
    self_address: Option<IpAddr>,
}

impl Zone {
    fn load() -> Result<Zone, String> {
        let mut config: Config = host::config()?;
        config.zone = config.zone.trim_end_matches('.').to_ascii_lowercase() + ".";
        if config.edns_payload < 512 {
            return Err(format!(
                "edns_payload {} is below 512, the DNS minimum",
                config.edns_payload
            ));
        }
        let name = |text: String| {
            Name::<Vec<u8>>::from_str(&text)
                .map_err(|error| format!("zone {:?} does not make a domain name ({text}): {error}", config.zone))
        };
        let apex = name(config.zone.clone())?;
        let ns = name(format!("ns.{}", config.zone))?;
        let soa = Soa::new(
            ns.clone(),
            name(format!("hostmaster.{}", config.zone))?,
            Serial(1),
            Ttl::from_secs(3600),
            Ttl::from_secs(600),
            Ttl::from_secs(86400),
            Ttl::from_secs(config.ttl),
        );
        Ok(Zone {
            suffix: config.zone.clone(),
            apex,
            ns,
            soa,
            self_address: hivemind_sdk::services::ip_of(&host::self_node().address),
            config,
        })
    }
}

/// The instance's zone and table; `None` until first used.
struct Loaded {
    zone: Zone,
    table: Table,
    /// xorshift state for shuffling answers.
    shuffle: u64,
}

thread_local! {
    static LOADED: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    static LOAD_ERROR_LOGGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on the instance's table, loading it from state first if this
/// instance has none yet.
fn with_loaded<T>(f: impl FnOnce(&mut Loaded) -> T) -> Result<T, String> {
    LOADED.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let zone = Zone::load()?;
            let table = Table::load(&zone.suffix)?;
            *slot = Some(Loaded {
                shuffle: 0x9e37_79b9_7f4a_7c15 ^ table.services.last_seq,
                zone,
                table,
            });
        }
        Ok(f(slot.as_mut().expect("loaded above")))
    })
}

/// Where a name in the zone points.
enum Found<'a> {
    Apex,
    NameServer,
    Node(IpAddr),
    Address(IpAddr),
    /// Healthy instances of a service, filtered by tag when asked.
    Service(Vec<&'a Served>),
    /// `_SERVICE._tcp`: SRV only.
    ServiceSrv(Vec<&'a Served>),
    /// A name with names below it but no records of its own
    /// (`service.ZONE`, `node.ZONE`, ...): NOERROR without records, as
    /// NXDOMAIN would tell resolvers nothing exists below it (RFC 8020).
    Empty,
    NxDomain,
    Refused,
}

/// The question's name as `find` wants it: lower case, labels joined by
/// dots, with the final dot. Bytes that no served name has (a dot inside a
/// label, control characters, ...) become `\x01`, so such a name can still
/// be told inside or outside the zone but never matches a record. Built by
/// hand because formatting the name through `Display` was a tenth of the
/// cost of a query.
fn normal_name(qname: &ParsedName<&[u8]>) -> String {
    let mut name = String::with_capacity(64);
    for label in qname.iter() {
        if label.is_root() {
            break;
        }
        for &byte in label.as_slice() {
            let byte = byte.to_ascii_lowercase();
            let plain = byte.is_ascii_graphic() && byte != b'.' && byte != b'\\';
            name.push(if plain { byte as char } else { '\x01' });
        }
        name.push('.');
    }
    if name.is_empty() {
        name.push('.');
    }
    name
}

fn find<'a>(zone: &Zone, table: &'a Table, qname: &str) -> Found<'a> {
    let inside = if qname == zone.suffix {
        ""
    } else {
        match qname
            .strip_suffix(zone.suffix.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        {
            Some(inside) => inside,
            None => return Found::Refused,
        }
    };
    if inside.is_empty() {
        return Found::Apex;
    }
    if inside == "ns" {
        return Found::NameServer;
    }
    let labels: Vec<&str> = inside.rsplit('.').collect();
    let instances = |service: &str, tag: Option<&str>| -> Vec<&'a Served> {
        table
            .by_service
            .get(service)
            .map(|all| {
                all.iter()
                    .filter(|served| tag.is_none_or(|tag| served.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))))
                    .collect()
            })
            .unwrap_or_default()
    };
    let found = match labels.as_slice() {
        ["node", name] => table.node_addresses.get(*name).map(|address| Found::Node(*address)),
        ["addr", label] => table.addresses.get(*label).map(|address| Found::Address(*address)),
        ["service", "_tcp", service] => service
            .strip_prefix('_')
            .map(|service| Found::ServiceSrv(instances(service, None))),
        ["service"] | ["node"] | ["addr"] | ["service", "_tcp"] => Some(Found::Empty),
        ["service", service] => Some(Found::Service(instances(service, None))),
        ["service", service, tag] => Some(Found::Service(instances(service, Some(tag)))),
        _ => None,
    };
    match found {
        Some(Found::Service(list) | Found::ServiceSrv(list)) if list.is_empty() => Found::NxDomain,
        Some(found) => found,
        None => Found::NxDomain,
    }
}

/// One record of an answer.
enum Data {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Srv(u16, Name<Vec<u8>>),
    Txt(Txt<Vec<u8>>),
    Soa,
    Ns,
}

impl Data {
    fn address(address: IpAddr) -> Data {
        match address {
            IpAddr::V4(v4) => Data::A(v4),
            IpAddr::V6(v6) => Data::Aaaa(v6),
        }
    }

    fn rtype(&self) -> Rtype {
        match self {
            Data::A(_) => Rtype::A,
            Data::Aaaa(_) => Rtype::AAAA,
            Data::Srv(..) => Rtype::SRV,
            Data::Txt(_) => Rtype::TXT,
            Data::Soa => Rtype::SOA,
            Data::Ns => Rtype::NS,
        }
    }
}

/// Whose name a record carries.
enum Owner {
    /// The question's name, as the client wrote it.
    Query,
    Apex,
    Named(Name<Vec<u8>>),
}

struct Reply {
    /// Whether the answer's order was drawn for this query (several
    /// instances), so the next query must not get the same reply.
    shuffled: bool,
    rcode: Rcode,
    answer: Vec<(Owner, Data)>,
    authority: Vec<(Owner, Data)>,
    additional: Vec<(Owner, Data)>,
}

fn txt_of(tags: &[String]) -> Option<Txt<Vec<u8>>> {
    let mut builder = domain::rdata::rfc1035::TxtBuilder::<Vec<u8>>::new();
    for tag in tags {
        builder.append_slice(tag.as_bytes()).ok()?;
        builder.close_charstr();
    }
    builder.finish().ok()
}

/// Fisher-Yates with xorshift: a cheap new order per answer.
fn shuffle<T>(items: &mut [T], state: &mut u64) {
    for index in (1..items.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        items.swap(index, (*state % (index as u64 + 1)) as usize);
    }
}

/// The records for `qtype` at `qname`.
fn resolve(loaded: &mut Loaded, qname: &str, qtype: Rtype) -> Reply {
    let Loaded {
        zone,
        table,
        shuffle: state,
    } = loaded;
    let mut reply = Reply {
        shuffled: false,
        rcode: Rcode::NOERROR,
        answer: Vec::new(),
        authority: Vec::new(),
        additional: Vec::new(),
    };
    let wants = |rtype: Rtype| qtype == rtype || qtype == Rtype::ANY;
    let push_address = |reply: &mut Reply, address: IpAddr| {
        let data = Data::address(address);
        if wants(data.rtype()) {
            reply.answer.push((Owner::Query, data));
        }
    };
    match find(zone, table, qname) {
        Found::Refused => reply.rcode = Rcode::REFUSED,
        Found::NxDomain => reply.rcode = Rcode::NXDOMAIN,
        Found::Empty => {}
        Found::Apex => {
            if wants(Rtype::SOA) {
                reply.answer.push((Owner::Query, Data::Soa));
            }
            if wants(Rtype::NS) {
                reply.answer.push((Owner::Query, Data::Ns));
                if let Some(address) = zone.self_address {
                    reply
                        .additional
                        .push((Owner::Named(zone.ns.clone()), Data::address(address)));
                }
            }
        }
        Found::NameServer => {
            if let Some(address) = zone.self_address {
                push_address(&mut reply, address);
            }
        }
        Found::Node(address) | Found::Address(address) => push_address(&mut reply, address),
        Found::Service(mut instances) => {
            reply.shuffled = instances.len() > 1;
            shuffle(&mut instances, state);
            let mut seen = Vec::new();
            for served in &instances {
                if !seen.contains(&served.address) {
                    seen.push(served.address);
                    push_address(&mut reply, served.address);
                }
            }
            if wants(Rtype::TXT) {
                let mut tag_sets: Vec<&[String]> = Vec::new();
                for served in &instances {
                    if !served.tags.is_empty() && !tag_sets.contains(&served.tags.as_slice()) {
                        tag_sets.push(&served.tags);
                    }
                }
                for tags in tag_sets {
                    if let Some(txt) = txt_of(tags) {
                        reply.answer.push((Owner::Query, Data::Txt(txt)));
                    }
                }
            }
            if qtype == Rtype::SRV {
                srv_records(&mut reply, &instances);
            }
        }
        Found::ServiceSrv(mut instances) => {
            reply.shuffled = instances.len() > 1;
            shuffle(&mut instances, state);
            if wants(Rtype::SRV) {
                srv_records(&mut reply, &instances);
            }
        }
    }
    if reply.rcode != Rcode::REFUSED && reply.answer.is_empty() {
        reply.authority.push((Owner::Apex, Data::Soa));
    }
    reply
}

fn srv_records(reply: &mut Reply, instances: &[&Served]) {
    let mut targets: Vec<(&Name<Vec<u8>>, IpAddr)> = Vec::new();
    for served in instances {
        reply
            .answer
            .push((Owner::Query, Data::Srv(served.port, served.target.clone())));
        if !targets.iter().any(|(target, _)| *target == &served.target) {
            targets.push((&served.target, served.address));
        }
    }
    for (target, address) in targets {
        reply
            .additional
            .push((Owner::Named(target.clone()), Data::address(address)));
    }
}

type Builder = StaticCompressor<Vec<u8>>;

/// The message sections records are pushed to.
trait Section {
    fn push_record(&mut self, record: impl ComposeRecord) -> Result<(), PushError>;
}

impl Section for AnswerBuilder<Builder> {
    fn push_record(&mut self, record: impl ComposeRecord) -> Result<(), PushError> {
        self.push(record)
    }
}

impl Section for AuthorityBuilder<Builder> {
    fn push_record(&mut self, record: impl ComposeRecord) -> Result<(), PushError> {
        self.push(record)
    }
}

impl Section for AdditionalBuilder<Builder> {
    fn push_record(&mut self, record: impl ComposeRecord) -> Result<(), PushError> {
        self.push(record)
    }
}

/// Pushes one record, its owner resolved to a name.
fn push_owned(
    section: &mut impl Section,
    zone: &Zone,
    qname: &ParsedName<&[u8]>,
    owner: &Owner,
    data: &Data,
) -> Result<(), PushError> {
    match owner {
        Owner::Query => push_data(section, zone, qname, data),
        Owner::Apex => push_data(section, zone, &zone.apex, data),
        Owner::Named(name) => push_data(section, zone, name, data),
    }
}

fn push_data(section: &mut impl Section, zone: &Zone, owner: impl ToName, data: &Data) -> Result<(), PushError> {
    let ttl = zone.config.ttl;
    match data {
        Data::A(v4) => section.push_record((owner, Class::IN, ttl, A::new(*v4))),
        Data::Aaaa(v6) => section.push_record((owner, Class::IN, ttl, Aaaa::new(*v6))),
        Data::Srv(port, target) => section.push_record((owner, Class::IN, ttl, Srv::new(1, 1, *port, target))),
        Data::Txt(txt) => section.push_record((owner, Class::IN, ttl, txt)),
        Data::Soa => section.push_record((owner, Class::IN, ttl, &zone.soa)),
        Data::Ns => section.push_record((owner, Class::IN, ttl, Ns::new(&zone.ns))),
    }
}

/// Encodes `reply` for `request`; when it does not fit in `limit` bytes the
/// answer is sent without records and with the TC bit.
fn encode(
    zone: &Zone,
    request: &Message<&[u8]>,
    question: &Question<ParsedName<&[u8]>>,
    reply: &Reply,
    limit: usize,
    edns: Option<u16>,
) -> Option<Vec<u8>> {
    // The OPT record takes 11 bytes; keep room for it under the limit.
    let room = if edns.is_some() { 11 } else { 0 };
    match build(zone, request, question, reply, limit - room, edns, false) {
        Ok(message) => Some(message),
        Err(PushError::ShortBuf | PushError::LimitExceeded) => {
            build(zone, request, question, reply, limit - room, edns, true).ok()
        }
        Err(_) => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn build(
    zone: &Zone,
    request: &Message<&[u8]>,
    question: &Question<ParsedName<&[u8]>>,
    reply: &Reply,
    limit: usize,
    edns: Option<u16>,
    truncated: bool,
) -> Result<Vec<u8>, PushError> {
    let mut message =
        MessageBuilder::from_target(StaticCompressor::new(Vec::with_capacity(512))).map_err(|_| PushError::ShortBuf)?;
    message.set_push_limit(limit);
    // What `start_answer` does, with the question already parsed instead
    // of parsed again from the request.
    let header = message.header_mut();
    header.set_id(request.header().id());
    header.set_qr(true);
    header.set_opcode(request.header().opcode());
    header.set_rd(request.header().rd());
    header.set_rcode(reply.rcode);
    header.set_aa(reply.rcode != Rcode::REFUSED);
    header.set_ra(false);
    header.set_tc(truncated);
    let mut questions = message.question();
    questions.push(question)?;
    let mut answer = questions.answer();
    let qname = question.qname();
    let mut additional = if truncated {
        answer.additional()
    } else {
        for (owner, data) in &reply.answer {
            push_owned(&mut answer, zone, qname, owner, data)?;
        }
        let mut authority = answer.authority();
        for (owner, data) in &reply.authority {
            push_owned(&mut authority, zone, qname, owner, data)?;
        }
        let mut additional = authority.additional();
        for (owner, data) in &reply.additional {
            // Additional records are optional (RFC 2181 9): stop at the
            // first that does not fit instead of truncating.
            if push_owned(&mut additional, zone, qname, owner, data).is_err() {
                break;
            }
        }
        additional
    };
    finish_edns(&mut additional, edns, OptRcode::NOERROR)?;
    Ok(additional.finish().into_target())
}

/// Adds the OPT record when the query had one.
fn finish_edns(
    additional: &mut AdditionalBuilder<Builder>,
    edns: Option<u16>,
    rcode: OptRcode,
) -> Result<(), PushError> {
    let Some(payload) = edns else { return Ok(()) };
    additional.opt(|opt| {
        opt.set_udp_payload_size(payload);
        if rcode != OptRcode::NOERROR {
            opt.set_rcode(rcode);
        }
        Ok(())
    })
}

/// A reply to a message that is not a query we can answer.
fn error_reply(request: &Message<&[u8]>, rcode: OptRcode, edns: Option<u16>) -> Option<Vec<u8>> {
    let builder = MessageBuilder::from_target(StaticCompressor::new(Vec::with_capacity(64))).ok()?;
    let mut answer = builder.start_error(request, rcode.rcode());
    answer.header_mut().set_ra(false);
    let mut additional = answer.additional();
    finish_edns(&mut additional, edns, rcode).ok()?;
    Some(additional.finish().into_target())
}

/// Answers one DNS message: the reply, and whether every query with these
/// bytes after the ID gets the same one (so it may be kept). `None` for
/// input that gets no answer at all (too short for a header, or itself a
/// response).
fn answer(loaded: &mut Loaded, query: &[u8], over_udp: bool) -> Option<(Vec<u8>, bool)> {
    if let Some(reply) = loaded.table.replies.get(query, over_udp) {
        return Some((reply, true));
    }
    let request = Message::from_octets(query).ok()?;
    if request.header().qr() {
        return None;
    }
    let announced = loaded.zone.config.edns_payload;
    let client_edns = request.opt();
    let edns = client_edns.as_ref().map(|_| announced);
    // Error replies are not kept: malformed input should not fill a cache.
    let refuse = |rcode| error_reply(&request, rcode, edns).map(|reply| (reply, false));
    if request.header().opcode() != Opcode::QUERY {
        return refuse(OptRcode::NOTIMP);
    }
    if client_edns.as_ref().is_some_and(|opt| opt.version() > 0) {
        return refuse(OptRcode::BADVERS);
    }
    // RFC 6891 §6.1.1: a message with more than one OPT record is FORMERR.
    let opt_records = request.additional().map_or(0, |section| {
        section
            .filter_map(Result::ok)
            .filter(|record| record.rtype() == Rtype::OPT)
            .count()
    });
    let Ok(question) = request.sole_question() else {
        return refuse(OptRcode::FORMERR);
    };
    if opt_records > 1 {
        return refuse(OptRcode::FORMERR);
    }
    if question.qclass() != Class::IN && question.qclass() != Class::ANY {
        return refuse(OptRcode::REFUSED);
    }
    // The zone is built from the log on every node; it is not transferred.
    if matches!(question.qtype(), Rtype::AXFR | Rtype::IXFR) {
        return refuse(OptRcode::REFUSED);
    }
    let limit = if over_udp {
        let client = client_edns.as_ref().map(|opt| opt.udp_payload_size()).unwrap_or(512);
        client.clamp(512, announced.max(512)) as usize
    } else {
        u16::MAX as usize
    };
    let reply = resolve(loaded, &normal_name(question.qname()), question.qtype());
    let encoded = encode(&loaded.zone, &request, &question, &reply, limit, edns)?;
    if !reply.shuffled {
        loaded.table.replies.put(query, over_udp, &encoded);
    }
    Some((encoded, !reply.shuffled))
}

impl Role for Dns {
    fn describe() -> Description {
        Description::new("dns", env!("CARGO_PKG_VERSION"))
            .subscribe("service.")
            .subscribe("node.")
            // Catches up with the log now and then: events applied by the
            // previous version while this one was loading reach it here.
            .tick_every(1000)
    }

    fn init() -> Result<(), String> {
        with_loaded(|_| ())
    }

    fn on_event(event: Event) -> Result<(), String> {
        with_loaded(|loaded| {
            if loaded.table.services.apply(&event)? {
                loaded.table.rebuild(&loaded.zone.suffix);
            }
            Ok(())
        })?
    }

    fn on_tick() {
        metrics::flush();
        let outcome = with_loaded(|loaded| {
            if loaded.table.services.catch_up()? {
                loaded.table.rebuild(&loaded.zone.suffix);
                // Replies the host kept came from the old table.
                hivemind_sdk::host::forget_replies();
            }
            Ok::<(), String>(())
        });
        if let Err(error) | Ok(Err(error)) = outcome {
            hivemind_sdk::warn!("{error}");
        }
    }

    fn on_packet(_listener: String, peer: String, data: Vec<u8>) -> Option<Vec<u8>> {
        let over_udp = !peer.starts_with("tcp://");
        match with_loaded(|loaded| answer(loaded, &data, over_udp)) {
            Ok(Some((reply, same_for_all))) => {
                metrics::record(&data, Some(&reply));
                if same_for_all && over_udp {
                    // Repeats of this query are then answered by the host,
                    // and counted there under the same labels.
                    let (qtype, rcode) = metrics::labels(&data, &reply);
                    let tally = [("qtype", qtype), ("rcode", rcode)];
                    if let Err(error) = hivemind_sdk::host::keep_reply(2, Some(("dns_queries", &tally))) {
                        hivemind_sdk::warn!("the host cannot keep replies: {error:?}");
                    }
                }
                Some(reply)
            }
            Ok(None) => {
                metrics::record(&data, None);
                None
            }
            Err(error) => {
                // Said once per instance; every query would repeat it.
                LOAD_ERROR_LOGGED.with(|logged| {
                    if !logged.replace(true) {
                        hivemind_sdk::error!("queries get no answer: {error}");
                    }
                });
                None
            }
        }
    }

    fn on_request(request: Request) -> Response {
        let args = request.args();
        let json = args.iter().any(|arg| arg == "--json");
        let args: Vec<&String> = args.iter().filter(|arg| *arg != "--json").collect();
        let outcome = with_loaded(|loaded| match request.command() {
            "records" => commands::records(loaded, json),
            "lookup" => commands::lookup(loaded, &args, json),
            other => Response::error(
                404,
                &format!("no command {other:?}; dns has: records [--json], lookup NAME [TYPE] [--json]"),
            ),
        });
        outcome.unwrap_or_else(|error| Response::error(500, &error))
    }
}

mod commands;

export_role!(Dns);

#[cfg(test)]
mod tests;
