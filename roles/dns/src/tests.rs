//! The answer path on a table built in memory (no host calls).

use std::net::IpAddr;

use domain::base::iana::{Class, Rcode};
use domain::base::{Message, MessageBuilder, Name, Rtype};

use super::*;
use hivemind_sdk::services::Instance;

fn zone() -> Zone {
    let config = Config::default();
    let name = |text: &str| Name::<Vec<u8>>::from_str(text).unwrap();
    Zone {
        suffix: "hive.".into(),
        apex: name("hive."),
        ns: name("ns.hive."),
        soa: Soa::new(
            name("ns.hive."),
            name("hostmaster.hive."),
            Serial(1),
            Ttl::from_secs(3600),
            Ttl::from_secs(600),
            Ttl::from_secs(86400),
            Ttl::from_secs(config.ttl),
        ),
        self_address: Some("127.0.0.1".parse().unwrap()),
        config,
    }
}

fn loaded(instances: &[(&str, &str, u16, &[&str])]) -> Loaded {
    let mut table = Table::default();
    for (index, (service, address, port, tags)) in instances.iter().enumerate() {
        table.services.instances.insert(
            format!("{service}@node{index}"),
            Instance {
                seq: index as u64 + 1,
                service: service.to_string(),
                node: format!("node{index}"),
                address: address.parse::<IpAddr>().unwrap(),
                port: *port,
                tags: tags.iter().map(|tag| tag.to_string()).collect(),
                healthy: true,
            },
        );
    }
    table.rebuild("hive.");
    Loaded {
        zone: zone(),
        table,
        shuffle: 1,
    }
}

fn query(name: &str, qtype: Rtype) -> Vec<u8> {
    let mut builder = MessageBuilder::new_vec().question();
    builder
        .push((Name::<Vec<u8>>::from_str(name).unwrap(), qtype, Class::IN))
        .unwrap();
    builder.finish()
}

/// An answer bigger than 512 bytes over UDP without EDNS comes back empty
/// with TC set; over TCP it comes whole.
#[test]
fn an_answer_too_big_for_udp_is_truncated() {
    let long = ["a".repeat(200), "b".repeat(200), "c".repeat(200)];
    let tags: Vec<&str> = long.iter().map(String::as_str).collect();
    let mut loaded = loaded(&[("big", "127.0.0.1", 80, &tags)]);
    let request = query("big.service.hive.", Rtype::TXT);
    let (reply, _) = answer(&mut loaded, &request, true).expect("an answer over UDP");
    let message = Message::from_octets(reply.as_slice()).unwrap();
    assert!(message.header().tc());
    assert_eq!(message.header().rcode(), Rcode::NOERROR);
    assert_eq!(message.header_counts().ancount(), 0);
    let (reply, _) = answer(&mut loaded, &request, false).expect("an answer over TCP");
    let message = Message::from_octets(reply.as_slice()).unwrap();
    assert!(!message.header().tc());
    assert_eq!(message.header_counts().ancount(), 1);
}

fn with_id(mut query: Vec<u8>, id: u16) -> Vec<u8> {
    query[..2].copy_from_slice(&id.to_be_bytes());
    query
}

fn addresses(reply: &[u8]) -> Vec<IpAddr> {
    let message = Message::from_octets(reply).unwrap();
    message
        .answer()
        .unwrap()
        .limit_to::<A>()
        .map(|record| IpAddr::V4(record.unwrap().data().addr()))
        .collect()
}

/// A question asked again gets the kept reply under its own ID, and a
/// change to the table is answered from the next query on.
#[test]
fn a_repeated_question_is_answered_from_the_kept_reply_until_the_table_changes() {
    let mut loaded = loaded(&[("web", "127.0.0.10", 80, &[])]);
    let (first, first_same_for_all) =
        answer(&mut loaded, &with_id(query("web.service.hive.", Rtype::A), 1), true).unwrap();
    let (again, again_same_for_all) =
        answer(&mut loaded, &with_id(query("web.service.hive.", Rtype::A), 2), true).unwrap();
    assert!(
        first_same_for_all && again_same_for_all,
        "a single instance's reply may be kept by the host too"
    );
    assert_eq!(&again[..2], &2u16.to_be_bytes(), "the reply carries the query's ID");
    assert_eq!(first[2..], again[2..], "the same question gets the same reply");
    assert_eq!(addresses(&again), ["127.0.0.10".parse::<IpAddr>().unwrap()]);

    let instance = loaded.table.services.instances.get_mut("web@node0").unwrap();
    instance.address = "127.0.0.11".parse().unwrap();
    loaded.table.rebuild("hive.");
    let (changed, _) = answer(&mut loaded, &with_id(query("web.service.hive.", Rtype::A), 3), true).unwrap();
    assert_eq!(addresses(&changed), ["127.0.0.11".parse::<IpAddr>().unwrap()]);
}

/// A service with several instances is answered in a new order per query:
/// its replies are never kept.
#[test]
fn several_instances_are_shuffled_per_query_not_kept() {
    let instances: Vec<(&str, String)> = (0..5).map(|n| ("web", format!("127.0.0.{}", 10 + n))).collect();
    let instances: Vec<(&str, &str, u16, &[&str])> = instances
        .iter()
        .map(|(service, address)| (*service, address.as_str(), 80, &[][..]))
        .collect();
    let mut loaded = loaded(&instances);
    let mut orders = std::collections::HashSet::new();
    for id in 0..20 {
        let (reply, same_for_all) =
            answer(&mut loaded, &with_id(query("web.service.hive.", Rtype::A), id), true).unwrap();
        assert!(!same_for_all, "a shuffled reply must not be kept by the host");
        orders.insert(addresses(&reply));
    }
    assert!(orders.iter().all(|order| order.len() == 5));
    assert!(orders.len() > 1, "20 answers came in one order: {orders:?}");
}

/// A query with two OPT records is FORMERR (RFC 6891 §6.1.1); one is fine.
#[test]
fn two_opt_records_are_a_format_error() {
    let mut loaded = loaded(&[("web", "127.0.0.1", 80, &[])]);
    let with_opts = |count: usize| {
        let mut builder = MessageBuilder::new_vec().question();
        builder
            .push((
                Name::<Vec<u8>>::from_str("web.service.hive.").unwrap(),
                Rtype::A,
                Class::IN,
            ))
            .unwrap();
        let mut additional = builder.additional();
        for _ in 0..count {
            additional.opt(|_| Ok(())).unwrap();
        }
        additional.finish()
    };
    let rcode = |reply: Vec<u8>| Message::from_octets(reply).unwrap().opt_rcode();
    let (reply, _) = answer(&mut loaded, &with_opts(2), true).unwrap();
    assert_eq!(rcode(reply), OptRcode::FORMERR);
    let (reply, _) = answer(&mut loaded, &with_opts(1), true).unwrap();
    assert_eq!(rcode(reply), OptRcode::NOERROR);
}

/// A zone transfer (AXFR, IXFR) is refused: the zone is not transferred.
#[test]
fn zone_transfers_are_refused() {
    let mut loaded = loaded(&[("web", "127.0.0.1", 80, &[])]);
    for qtype in [Rtype::AXFR, Rtype::IXFR] {
        let (reply, _) = answer(&mut loaded, &query("hive.", qtype), false).unwrap();
        assert_eq!(
            Message::from_octets(reply).unwrap().header().rcode(),
            Rcode::REFUSED,
            "{qtype}"
        );
    }
}
