//! Who is in the cluster, as roles and the API see it.
//!
//! Today a cluster is this one node. This is the seam the membership layer
//! and its registry replace: `nodes` and `self_node` keep their meaning, the
//! source of truth changes.

use std::sync::RwLock;

use hivemind_runtime::Node;

pub struct Cluster {
    id: String,
    name: String,
    address: String,
    roles: RwLock<Vec<String>>,
}

impl Cluster {
    pub fn single(id: String, name: String, address: String) -> Cluster {
        Cluster {
            id,
            name,
            address,
            roles: RwLock::new(Vec::new()),
        }
    }

    pub fn self_id(&self) -> &str {
        &self.id
    }

    /// Records which roles run here (names, sorted).
    pub fn set_roles(&self, mut roles: Vec<String>) {
        roles.sort();
        *self.roles.write().unwrap() = roles;
    }

    pub fn self_node(&self) -> Node {
        Node {
            id: self.id.clone(),
            name: self.name.clone(),
            address: self.address.clone(),
            roles: self.roles.read().unwrap().clone(),
            healthy: true,
        }
    }

    /// Members, optionally only those running `role`. A single node is always
    /// healthy, so `healthy_only` filters nothing yet.
    pub fn nodes(&self, role: Option<&str>, _healthy_only: bool) -> Vec<Node> {
        let node = self.self_node();
        match role {
            Some(role) if !node.roles.iter().any(|running| running == role) => Vec::new(),
            _ => vec![node],
        }
    }
}
