//! Who a node is on the gossip layer: node id, gossip address and
//! generation.
//!
//! The node id is foca's `Addr`: two identities with the same id are the
//! same node, and the higher generation wins. A restarted node takes a new,
//! higher generation, so it rejoins at once instead of fighting its own
//! previous life; a node wrongly declared down renews itself (generation +
//! 1) and rejoins without an operator.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::quorum::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GossipId {
    pub node: NodeId,
    /// Where this node receives gossip (UDP).
    pub addr: SocketAddr,
    /// Grows with every start of the node and every renewal.
    pub generation: u64,
}

impl GossipId {
    /// The identity to announce to when only the node's id and address are
    /// known (from the log's member table): generation 0 loses to any real
    /// one, and foca accepts an announce for any generation of its id.
    pub fn placeholder(node: NodeId, addr: SocketAddr) -> GossipId {
        GossipId {
            node,
            addr,
            generation: 0,
        }
    }
}

impl foca::Identity for GossipId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(GossipId {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// The generation for this start: past any earlier one of this node, even
/// when the clock went back (`previous` is what the last start used).
pub fn next_generation(previous: Option<u64>, now_ms: u64) -> u64 {
    // Renewals add 1 each; a start leaves room for many of them.
    const RENEWAL_ROOM: u64 = 1 << 16;
    match previous {
        Some(previous) => now_ms.max(previous + RENEWAL_ROOM),
        None => now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    /// A later generation of the same node wins; a renewal is a later one.
    #[test]
    fn the_later_generation_wins() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let old = GossipId {
            node: 7,
            addr,
            generation: 10,
        };
        let renewed = old.renew().unwrap();
        assert_eq!(renewed.addr(), old.addr());
        assert!(renewed.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&renewed));
    }

    /// A start after a clock step back still gets a higher generation.
    #[test]
    fn generations_grow_even_when_the_clock_goes_back() {
        let first = next_generation(None, 5_000_000);
        let second = next_generation(Some(first), 1_000);
        assert!(second > first);
        assert_eq!(next_generation(Some(first), first * 2), first * 2);
    }
}
