//! What the zone holds: service instances and nodes, built from events.
//!
//! Every entry remembers the seq of the event that set it, and an event no
//! newer than that is ignored, so replays, duplicate deliveries and a
//! bootstrap that overlaps live delivery all converge on the same table.
//! Entries are kept in the role's state (`svc/KEY`, `node/ID`), so a new
//! instance — after a reload, a trap or a restart — starts from the table
//! and only reads the log after its newest seq.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::str::FromStr;

use domain::base::Name;
use hivemind_sdk::{Event, host, state};
use serde::{Deserialize, Serialize};

const SERVICE_KEYS: &str = "svc/";
const NODE_KEYS: &str = "node/";
/// Events read from the log per call while catching up.
const PAGE: u32 = 1000;

/// One instance of a service on one node (one `service.*` event key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub seq: u64,
    pub service: String,
    pub node: String,
    pub address: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    pub healthy: bool,
}

/// A node: its name and address from `node.joined`, its health from the
/// health events; each part ordered by its own seq.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub info_seq: u64,
    pub health_seq: u64,
    pub name: String,
    pub address: Option<IpAddr>,
    pub alive: bool,
}

/// The payload of `service.up`, `service.down` and `service.changed`.
#[derive(Deserialize)]
struct ServicePayload {
    service: String,
    node: String,
    address: String,
    port: u16,
    #[serde(default)]
    tags: Vec<String>,
    healthy: bool,
}

/// The payload of `node.joined`.
#[derive(Deserialize)]
struct JoinedPayload {
    name: String,
    api: String,
}

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
    pub instances: BTreeMap<String, Instance>,
    pub nodes: BTreeMap<String, NodeEntry>,
    /// The newest seq applied or skipped; the log is read after it.
    pub last_seq: u64,
    /// Healthy instances by service name, rebuilt after each change.
    pub services: HashMap<String, Vec<Served>>,
    /// Live nodes by lower-case name and by id.
    pub node_addresses: HashMap<String, IpAddr>,
    /// Addresses answered under `HEX.addr.ZONE`.
    pub addresses: HashMap<String, IpAddr>,
}

/// The IP part of an address (`IP:PORT`, `[IPv6]:PORT` or a bare IP).
pub fn ip_of(address: &str) -> Option<IpAddr> {
    if let Ok(socket) = std::net::SocketAddr::from_str(address) {
        return Some(socket.ip());
    }
    IpAddr::from_str(address).ok()
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
        let mut table = Table::default();
        for key in state::keys(SERVICE_KEYS) {
            if let Some(instance) = state::get_json::<Instance>(&key)? {
                table.last_seq = table.last_seq.max(instance.seq);
                table.instances.insert(key[SERVICE_KEYS.len()..].to_string(), instance);
            }
        }
        for key in state::keys(NODE_KEYS) {
            if let Some(node) = state::get_json::<NodeEntry>(&key)? {
                table.last_seq = table.last_seq.max(node.info_seq).max(node.health_seq);
                table.nodes.insert(key[NODE_KEYS.len()..].to_string(), node);
            }
        }
        table.catch_up(zone)?;
        Ok(table)
    }

    /// Applies every `service.` and `node.` event after `last_seq`.
    pub fn catch_up(&mut self, zone: &str) -> Result<bool, String> {
        let after = self.last_seq;
        let mut changed = false;
        let mut newest = after;
        for prefix in ["service.", "node."] {
            let mut cursor = after;
            loop {
                let page = host::events_since(cursor, prefix, PAGE)
                    .map_err(|error| format!("cannot read the event log: {}", error.message()))?;
                let Some(last) = page.last() else { break };
                cursor = last.seq;
                for event in &page {
                    changed |= self.apply(event)?;
                }
                if page.len() < PAGE as usize {
                    break;
                }
            }
            newest = newest.max(cursor);
        }
        self.last_seq = self.last_seq.max(newest);
        if changed {
            self.rebuild(zone);
        }
        Ok(changed)
    }

    /// Applies one event and stores what it changed; `true` if it changed
    /// the table. The caller rebuilds the answers.
    pub fn apply(&mut self, event: &Event) -> Result<bool, String> {
        self.last_seq = self.last_seq.max(event.seq);
        if let Some(change) = event.kind.strip_prefix("service.") {
            if !matches!(change, "up" | "down" | "changed") {
                return Ok(false);
            }
            if self
                .instances
                .get(&event.key)
                .is_some_and(|known| known.seq >= event.seq)
            {
                return Ok(false);
            }
            let payload: ServicePayload = event.payload_json()?;
            let Some(address) = ip_of(&payload.address) else {
                hivemind_sdk::warn!(
                    "event {} ({} {}): address {:?} is not an IP address; ignored",
                    event.seq,
                    event.kind,
                    event.key,
                    payload.address
                );
                return Ok(false);
            };
            let instance = Instance {
                seq: event.seq,
                service: payload.service.to_ascii_lowercase(),
                node: payload.node,
                address,
                port: payload.port,
                tags: payload.tags,
                healthy: change != "down" && payload.healthy,
            };
            state::set_json(&format!("{SERVICE_KEYS}{}", event.key), &instance)?;
            self.instances.insert(event.key.clone(), instance);
            return Ok(true);
        }
        let Some(change) = event.kind.strip_prefix("node.") else {
            return Ok(false);
        };
        let mut node = self.nodes.get(&event.key).cloned().unwrap_or_default();
        let before = node.clone();
        match change {
            "joined" => {
                if node.info_seq < event.seq {
                    let payload: JoinedPayload = event.payload_json()?;
                    node.info_seq = event.seq;
                    node.name = payload.name;
                    node.address = ip_of(&payload.api);
                }
                if node.health_seq < event.seq {
                    node.health_seq = event.seq;
                    node.alive = true;
                }
            }
            "failed" | "left" | "rejoined" if node.health_seq < event.seq => {
                node.health_seq = event.seq;
                node.alive = change == "rejoined";
            }
            _ => {}
        }
        if node == before {
            return Ok(false);
        }
        state::set_json(&format!("{NODE_KEYS}{}", event.key), &node)?;
        self.nodes.insert(event.key.clone(), node);
        Ok(true)
    }

    /// Rebuilds the lookup maps from the entries.
    pub fn rebuild(&mut self, zone: &str) {
        self.services.clear();
        self.node_addresses.clear();
        self.addresses.clear();
        for (id, node) in &self.nodes {
            if let (true, Some(address)) = (node.alive, node.address) {
                self.node_addresses.insert(node.name.to_ascii_lowercase(), address);
                self.node_addresses.insert(id.clone(), address);
            }
        }
        for instance in self.instances.values() {
            let node = self.nodes.get(&instance.node);
            if !instance.healthy || node.is_some_and(|node| !node.alive) {
                continue;
            }
            let on_node_address = node.is_some_and(|node| node.address == Some(instance.address));
            let target = match node {
                Some(node) if on_node_address => format!("{}.node.{zone}", node.name.to_ascii_lowercase()),
                _ => {
                    let label = address_label(instance.address);
                    self.addresses.insert(label.clone(), instance.address);
                    format!("{label}.addr.{zone}")
                }
            };
            let Ok(target) = Name::from_str(&target) else {
                continue;
            };
            self.services.entry(instance.service.clone()).or_default().push(Served {
                address: instance.address,
                port: instance.port,
                target,
                tags: instance.tags.clone(),
            });
        }
    }
}
