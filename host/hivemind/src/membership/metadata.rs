//! What each node tells the others about itself, piggybacked on gossip as
//! foca custom broadcasts: its API and transport addresses, the roles it
//! runs with their versions, and the epoch it is in.
//!
//! Every node keeps the newest metadata it has seen per node
//! ([`MetadataBook`]); newer means a higher (generation, version). A
//! broadcast that brings nothing new is not passed on, so dissemination
//! stops by itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::quorum::NodeId;

/// Largest encoded metadata: it must fit in one gossip packet beside
/// foca's header and a few membership updates.
pub const MAX_METADATA_BYTES: usize = 900;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMetadata {
    pub node: NodeId,
    pub generation: u64,
    /// Bumped by the node each time its metadata changes.
    pub version: u64,
    pub name: String,
    pub api: String,
    pub transport: String,
    /// Roles the node runs: (name, version), sorted by name.
    pub roles: Vec<(String, String)>,
    pub epoch: u64,
}

impl NodeMetadata {
    fn newer_than(&self, other: &NodeMetadata) -> bool {
        (self.generation, self.version) > (other.generation, other.version)
    }

    /// The encoded form, with roles dropped from the end (and a warning) if
    /// the whole would not fit in a packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut metadata = self.clone();
        loop {
            let bytes = postcard::to_allocvec(&metadata).expect("metadata always encodes");
            if bytes.len() <= MAX_METADATA_BYTES || metadata.roles.is_empty() {
                if metadata.roles.len() < self.roles.len() {
                    tracing::warn!(
                        kept = metadata.roles.len(),
                        running = self.roles.len(),
                        "gossip metadata: too many roles to announce in one packet; the rest are left out"
                    );
                }
                return bytes;
            }
            metadata.roles.pop();
        }
    }
}

/// Identifies one broadcast in foca's backlog; a newer one of the same node
/// replaces an older one not yet fully sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataKey {
    node: NodeId,
    generation: u64,
    version: u64,
}

impl foca::Invalidates for MetadataKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && (self.generation, self.version) >= (other.generation, other.version)
    }
}

/// A broadcast that did not decode.
#[derive(Debug, thiserror::Error)]
#[error("gossip metadata does not decode: {0}")]
pub struct MetadataError(#[from] postcard::Error);

/// The newest metadata seen per node; foca's broadcast handler. Foca owns
/// the handler and gives no access to it, so the book is a shared handle:
/// the gossip core keeps a clone to read it.
#[derive(Debug, Default, Clone)]
pub struct MetadataBook {
    shared: Arc<Mutex<BookPages>>,
}

#[derive(Debug, Default)]
pub struct BookPages {
    by_node: HashMap<NodeId, NodeMetadata>,
    /// Set when an entry changed; the reader clears it when it has looked.
    pub changed: bool,
}

impl BookPages {
    pub fn get(&self, node: NodeId) -> Option<&NodeMetadata> {
        self.by_node.get(&node)
    }

    pub fn all(&self) -> impl Iterator<Item = &NodeMetadata> {
        self.by_node.values()
    }
}

impl MetadataBook {
    pub fn read(&self) -> MutexGuard<'_, BookPages> {
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T> foca::BroadcastHandler<T> for MetadataBook {
    type Key = MetadataKey;
    type Error = MetadataError;

    fn receive_item(&mut self, data: &[u8], sender: Option<&T>) -> Result<Option<MetadataKey>, MetadataError> {
        let metadata: NodeMetadata = postcard::from_bytes(data)?;
        let key = MetadataKey {
            node: metadata.node,
            generation: metadata.generation,
            version: metadata.version,
        };
        let mut pages = self.read();
        let is_new = pages
            .by_node
            .get(&metadata.node)
            .is_none_or(|known| metadata.newer_than(known));
        if is_new {
            pages.by_node.insert(metadata.node, metadata);
            pages.changed = true;
        }
        // Our own metadata, added locally, is always (re)sent: that is how
        // a node that joined late learns it.
        Ok((is_new || sender.is_none()).then_some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::BroadcastHandler;

    fn metadata(node: NodeId, generation: u64, version: u64) -> NodeMetadata {
        NodeMetadata {
            node,
            generation,
            version,
            name: format!("n{node}"),
            api: "127.0.0.1:1".into(),
            transport: "127.0.0.1:2".into(),
            roles: vec![("dns".into(), "0.1.0".into())],
            epoch: 1,
        }
    }

    /// Newer metadata replaces older and is passed on; old or repeated
    /// metadata from a peer is kept back.
    #[test]
    fn only_newer_metadata_is_kept_and_passed_on() {
        let mut book = MetadataBook::default();
        let peer = ();
        let v2 = metadata(1, 5, 2).encode();
        let v1 = metadata(1, 5, 1).encode();
        assert!(
            BroadcastHandler::<()>::receive_item(&mut book, &v2, Some(&peer))
                .unwrap()
                .is_some()
        );
        assert!(
            BroadcastHandler::<()>::receive_item(&mut book, &v1, Some(&peer))
                .unwrap()
                .is_none()
        );
        assert!(
            BroadcastHandler::<()>::receive_item(&mut book, &v2, Some(&peer))
                .unwrap()
                .is_none()
        );
        assert_eq!(book.read().get(1).unwrap().version, 2);
        let next_life = metadata(1, 6, 0).encode();
        assert!(
            BroadcastHandler::<()>::receive_item(&mut book, &next_life, Some(&peer))
                .unwrap()
                .is_some()
        );
        assert_eq!(book.read().get(1).unwrap().generation, 6);
    }

    /// Garbage is an error, not a panic, and changes nothing.
    #[test]
    fn garbage_metadata_is_an_error() {
        let mut book = MetadataBook::default();
        assert!(BroadcastHandler::<()>::receive_item(&mut book, &[0xff; 7], Some(&())).is_err());
        assert!(book.read().all().next().is_none());
    }

    /// Metadata with a huge role list still fits in a packet.
    #[test]
    fn oversized_metadata_drops_roles_to_fit() {
        let mut big = metadata(1, 1, 1);
        big.roles = (0..200).map(|i| (format!("role-number-{i}"), "1.2.3".into())).collect();
        let bytes = big.encode();
        assert!(bytes.len() <= MAX_METADATA_BYTES);
        let decoded: NodeMetadata = postcard::from_bytes(&bytes).unwrap();
        assert!(!decoded.roles.is_empty() && decoded.roles.len() < 200);
    }
}
