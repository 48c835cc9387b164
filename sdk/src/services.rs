//! The cluster's services as the log tells them: a table of service
//! instances and nodes built from `service.*` and `node.*` events, for roles
//! that serve or render them (DNS answers, proxy upstreams).
//!
//! Every entry remembers the seq of the event that set it, and an event no
//! newer than that is ignored, so replays, duplicate deliveries and a
//! catch-up that overlaps live delivery all converge on the same table.
//! Entries are kept in the role's state under a prefix (`PREFIX/svc/KEY`,
//! `PREFIX/node/ID`), so a new instance — after a reload, a trap or a
//! restart — starts from the table and reads only the log after it.
//!
//! Subscribe to `service.` and `node.`, call [`ServiceTable::apply`] from
//! `on-event`, and [`ServiceTable::catch_up`] from `on-tick` (a version that
//! was loading while its predecessor took an event gets it there).
//!
//! The events: `service.up`, `service.down` and `service.changed`, keyed
//! `SERVICE@NODE_ID` by the host-events role, with a JSON payload of at
//! least `service`, `node`, `address`, `port`, `tags` and `healthy`;
//! `node.joined` (name and transport address) and `node.failed`, `node.left`,
//! `node.removed`, `node.rejoined`, keyed by node id.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Event, host, state};

/// Events read from the log per call while catching up.
const PAGE: u32 = 1000;

/// One instance of a service on one node (one `service.*` event key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Seq of the event that set it.
    pub seq: u64,
    pub service: String,
    /// Id of the node it runs on.
    pub node: String,
    pub address: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its own check passed when last published.
    pub healthy: bool,
}

/// A node: name and address from `node.joined`, health from the health
/// events; each part ordered by its own seq.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub info_seq: u64,
    pub health_seq: u64,
    pub name: String,
    pub address: Option<IpAddr>,
    pub alive: bool,
}

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

#[derive(Deserialize)]
struct JoinedPayload {
    name: String,
    /// The address other nodes reach it at (its advertised transport).
    transport: String,
}

/// The event's payload, or `None` (logged) when it is not the JSON this
/// table reads: one bad event, from any writer of the log, must not stop
/// every event after it.
fn payload_or_warn<T: serde::de::DeserializeOwned>(event: &Event) -> Option<T> {
    match event.payload_json() {
        Ok(payload) => Some(payload),
        Err(error) => {
            crate::warn!("{error}; ignored");
            None
        }
    }
}

/// The IP part of an address (`IP:PORT`, `[IPv6]:PORT` or a bare IP).
pub fn ip_of(address: &str) -> Option<IpAddr> {
    if let Ok(socket) = std::net::SocketAddr::from_str(address) {
        return Some(socket.ip());
    }
    IpAddr::from_str(address).ok()
}

/// Instances and nodes by key, each with the seq that set it.
#[derive(Debug, Default)]
pub struct ServiceTable {
    /// By event key (`SERVICE@NODE_ID`).
    pub instances: BTreeMap<String, Instance>,
    /// By node id.
    pub nodes: BTreeMap<String, NodeEntry>,
    /// The newest seq applied or skipped; the log is read after it.
    pub last_seq: u64,
    /// Where in the role's state the entries live; empty keeps them in
    /// memory only.
    prefix: String,
}

impl ServiceTable {
    /// An empty table kept in memory only (for tests and tools).
    pub fn in_memory() -> ServiceTable {
        ServiceTable::default()
    }

    /// The table stored under `prefix` in the role's state, caught up with
    /// the log.
    pub fn load(prefix: &str) -> Result<ServiceTable, String> {
        let mut table = ServiceTable {
            prefix: prefix.to_string(),
            ..ServiceTable::default()
        };
        let services = format!("{prefix}/svc/");
        for key in state::keys(&services) {
            if let Some(instance) = state::get_json::<Instance>(&key)? {
                table.last_seq = table.last_seq.max(instance.seq);
                table.instances.insert(key[services.len()..].to_string(), instance);
            }
        }
        let nodes = format!("{prefix}/node/");
        for key in state::keys(&nodes) {
            if let Some(node) = state::get_json::<NodeEntry>(&key)? {
                table.last_seq = table.last_seq.max(node.info_seq).max(node.health_seq);
                table.nodes.insert(key[nodes.len()..].to_string(), node);
            }
        }
        table.catch_up()?;
        Ok(table)
    }

    /// Applies every `service.` and `node.` event after `last_seq`; `true`
    /// if the table changed.
    pub fn catch_up(&mut self) -> Result<bool, String> {
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
        Ok(changed)
    }

    /// Applies one event and stores what it changed; `true` if it changed
    /// the table. Events of other kinds, and ones no newer than what the
    /// table holds for their key, change nothing.
    pub fn apply(&mut self, event: &Event) -> Result<bool, String> {
        // `last_seq` is not moved here: a live event may be newer than
        // events a predecessor took while this version loaded, and only
        // `catch_up`, reading the log in order, may skip past those.
        if let Some(change) = event.kind.strip_prefix("service.") {
            return self.apply_service(event, change);
        }
        let Some(change) = event.kind.strip_prefix("node.") else {
            return Ok(false);
        };
        let mut node = self.nodes.get(&event.key).cloned().unwrap_or_default();
        let before = node.clone();
        match change {
            "joined" => {
                if node.info_seq < event.seq {
                    let Some(payload) = payload_or_warn::<JoinedPayload>(event) else {
                        return Ok(false);
                    };
                    node.info_seq = event.seq;
                    node.name = payload.name;
                    node.address = ip_of(&payload.transport);
                }
                if node.health_seq < event.seq {
                    node.health_seq = event.seq;
                    node.alive = true;
                }
            }
            "failed" | "left" | "removed" | "rejoined" if node.health_seq < event.seq => {
                node.health_seq = event.seq;
                node.alive = change == "rejoined";
            }
            _ => {}
        }
        if node == before {
            return Ok(false);
        }
        self.store(&format!("node/{}", event.key), &node)?;
        self.nodes.insert(event.key.clone(), node);
        Ok(true)
    }

    fn apply_service(&mut self, event: &Event, change: &str) -> Result<bool, String> {
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
        let Some(payload) = payload_or_warn::<ServicePayload>(event) else {
            return Ok(false);
        };
        let Some(address) = ip_of(&payload.address) else {
            crate::warn!(
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
        self.store(&format!("svc/{}", event.key), &instance)?;
        self.instances.insert(event.key.clone(), instance);
        Ok(true)
    }

    fn store<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        if self.prefix.is_empty() {
            return Ok(());
        }
        state::set_json(&format!("{}/{key}", self.prefix), value)
    }

    /// Whether `instance` should be served: its check passed and its node
    /// is not failed or gone (a node the table has not heard of counts as
    /// alive).
    pub fn is_serving(&self, instance: &Instance) -> bool {
        instance.healthy && self.nodes.get(&instance.node).is_none_or(|node| node.alive)
    }

    /// The instances to serve, in key order.
    pub fn serving(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values().filter(|instance| self.is_serving(instance))
    }
}
