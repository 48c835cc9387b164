//! What the zone answers: the cluster's service table (see
//! `hivemind_sdk::services`) with the lookup maps queries use, rebuilt after
//! each change so a query costs a hash lookup and no host call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;

use domain::base::Name;
use hivemind_sdk::services::ServiceTable;

use crate::cache::ReplyCache;

/// Where the table lives in the role's state.
const STATE_PREFIX: &str = "table";

/// A healthy instance as answers use it, names already built.
#[derive(Debug, Clone)]
pub struct Served {
    pub address: IpAddr,
    pub port: u16,
    /// The SRV target: `NODE.node.ZONE`, or `HEX.addr.ZONE` when the
    /// instance is not on its node's address.
    pub target: Name<Vec<u8>>,
    pub tags: Vec<String>,
}

#[derive(Default)]
pub struct Table {
    pub services: ServiceTable,
    /// Healthy instances by service name.
    pub by_service: HashMap<String, Vec<Served>>,
    /// Live nodes by lower-case name and by id.
    pub node_addresses: HashMap<String, IpAddr>,
    /// Addresses answered under `HEX.addr.ZONE`.
    pub addresses: HashMap<String, IpAddr>,
    /// Replies given from this table, dropped whenever it changes.
    pub replies: ReplyCache,
}

/// `7f000001` for 127.0.0.1: the label of an address under `addr.ZONE`.
pub fn address_label(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.octets().iter().map(|byte| format!("{byte:02x}")).collect(),
        IpAddr::V6(v6) => v6.octets().iter().map(|byte| format!("{byte:02x}")).collect(),
    }
}

impl Table {
    /// The table in the role's state, caught up with the log.
    pub fn load(zone: &str) -> Result<Table, String> {
        let mut table = Table {
            services: ServiceTable::load(STATE_PREFIX)?,
            ..Table::default()
        };
        table.rebuild(zone);
        Ok(table)
    }

    /// Rebuilds the lookup maps from the service table.
    pub fn rebuild(&mut self, zone: &str) {
        self.replies.clear();
        self.by_service.clear();
        self.node_addresses.clear();
        self.addresses.clear();
        for (id, node) in &self.services.nodes {
            if let (true, Some(address)) = (node.alive, node.address) {
                self.node_addresses.insert(node.name.to_ascii_lowercase(), address);
                self.node_addresses.insert(id.clone(), address);
            }
        }
        for instance in self.services.serving() {
            let node = self.services.nodes.get(&instance.node);
            let target = match node {
                Some(node) if node.address == Some(instance.address) => {
                    format!("{}.node.{zone}", node.name.to_ascii_lowercase())
                }
                _ => {
                    let label = address_label(instance.address);
                    self.addresses.insert(label.clone(), instance.address);
                    format!("{label}.addr.{zone}")
                }
            };
            let Ok(target) = Name::from_str(&target) else {
                continue;
            };
            self.by_service
                .entry(instance.service.clone())
                .or_default()
                .push(Served {
                    address: instance.address,
                    port: instance.port,
                    target,
                    tags: instance.tags.clone(),
                });
        }
    }
}
