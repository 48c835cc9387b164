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
    let reply = answer(&mut loaded, &request, true).expect("an answer over UDP");
    let message = Message::from_octets(reply.as_slice()).unwrap();
    assert!(message.header().tc());
    assert_eq!(message.header().rcode(), Rcode::NOERROR);
    assert_eq!(message.header_counts().ancount(), 0);
    let reply = answer(&mut loaded, &request, false).expect("an answer over TCP");
    let message = Message::from_octets(reply.as_slice()).unwrap();
    assert!(!message.header().tc());
    assert_eq!(message.header_counts().ancount(), 1);
}
