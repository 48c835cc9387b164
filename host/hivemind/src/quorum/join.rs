//! Joining a cluster: the credentials, the join request and its answer, and
//! the cluster files a member keeps.
//!
//! A node that is not a member has no certificate, so it connects without
//! one and cannot verify the server either. Both sides instead prove they
//! know a shared secret — the cluster secret, or a single-use join token
//! (`hivemind members token`) — by an HMAC over the TLS session's channel
//! binding: the secret never crosses the wire, and a relay in the middle
//! sees two sessions with different bindings, so its proofs fail.
//!
//! Admission is decided by the leader and is a committed `node.joined`
//! entry; the answer carries the cluster CA and a certificate for the new
//! member, which then catches up as a learner.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hivemind_core::files::{Access, write_file};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::network::{JOIN, PeerError};
use super::{NodeAddress, NodeId};
use crate::transport::{self, ClusterCa, NodeIdentity};

/// Prefix of a join token's text, versioned like the frames.
const TOKEN_PREFIX: &str = "hm1";

/// What a node offers to prove it may join.
#[derive(Clone)]
pub enum Credential {
    /// The cluster secret (`--secret` / `HIVEMIND_CLUSTER_SECRET`).
    Secret(String),
    /// A join token: `hm1.CLUSTER_ID.TOKEN_ID.SECRET`.
    Token {
        cluster_id: String,
        id: String,
        secret: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(..)"),
            Credential::Token { cluster_id, id, .. } => write!(f, "Token({cluster_id}.{id})"),
        }
    }
}

impl Credential {
    /// Parses a join token as `hivemind members token` prints it.
    pub fn parse_token(text: &str) -> anyhow::Result<Credential> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        match parts.as_slice() {
            [TOKEN_PREFIX, cluster_id, id, secret]
                if !cluster_id.is_empty() && !id.is_empty() && secret.len() >= 16 =>
            {
                Ok(Credential::Token {
                    cluster_id: cluster_id.to_string(),
                    id: id.to_string(),
                    secret: secret.to_string(),
                })
            }
            _ => bail!(
                "{text:?} is not a join token: expected {TOKEN_PREFIX}.CLUSTER_ID.TOKEN_ID.SECRET as printed by \
                 `hivemind members token`"
            ),
        }
    }

    pub fn token_text(cluster_id: &str, id: &str, secret: &str) -> String {
        format!("{TOKEN_PREFIX}.{cluster_id}.{id}.{secret}")
    }

    fn key(&self) -> &str {
        match self {
            Credential::Secret(secret) => secret,
            Credential::Token { secret, .. } => secret,
        }
    }
}

/// HMAC-SHA256 of `parts` under `key`.
fn mac(key: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    for part in parts {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// The joiner's proof: it knows `key` and speaks on this session as `id`.
pub fn client_proof(key: &str, binding: &[u8; 32], id: NodeId) -> String {
    hex::encode(mac(key, &[b"join-client", binding, &id.to_be_bytes()]))
}

/// The answering node's proof: it knows `key` too, on this session.
pub fn server_proof(key: &str, binding: &[u8; 32]) -> String {
    hex::encode(mac(key, &[b"join-server", binding]))
}

/// Compares two proofs in constant time.
/// Why node `id` may not join under `name`, when another member holds it:
/// a node's name is its DNS name, and two nodes under one name would have
/// the newer take the older's records. Names compare as DNS does, without
/// regard to case. `members` are the other nodes' ids and names.
pub fn name_taken_by<'a>(
    name: &str,
    id: NodeId,
    members: impl IntoIterator<Item = (NodeId, &'a str)>,
) -> Option<String> {
    let (holder, _) = members
        .into_iter()
        .find(|(other, other_name)| *other != id && !other_name.is_empty() && other_name.eq_ignore_ascii_case(name))?;
    Some(format!(
        "the name `{name}` belongs to member {holder:016x}: start the joining node with another --node-name, or, if \
         it replaces that machine, remove the old member first (`hivemind members remove {name}`)"
    ))
}

pub fn proofs_match(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sent by a node asking to join (frame [`JOIN`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub id: NodeId,
    pub address: NodeAddress,
    /// The join token's id; `None` when proving the cluster secret.
    pub token: Option<String>,
    /// [`client_proof`] in hex.
    pub proof: String,
    /// The cluster the joiner expects (from its token) or whose data it has.
    pub cluster_id: Option<String>,
    /// The epoch of the joiner's data, if it has any.
    pub epoch: Option<u64>,
    /// In bootstrap mode: the `--peers` list the joiner was given, sorted.
    pub bootstrap_peers: Option<Vec<String>>,
}

/// Why a join was refused; the joiner acts on some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The secret or token does not prove anything.
    WrongCredential,
    /// The joiner expects, or has data of, another cluster.
    UnknownCluster,
    /// The joiner's data is from an older epoch and the cluster no longer
    /// lists it: it must drop its cluster state and join afresh.
    StaleEpoch,
    /// No leader, or the cluster is still forming: try again shortly.
    NotReady,
    /// Anything else (a used or expired token, a bad address).
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JoinReply {
    Admitted(Box<Admission>),
    Refused { kind: Refusal, reason: String },
}

impl JoinReply {
    pub fn refused(kind: Refusal, reason: impl Into<String>) -> JoinReply {
        JoinReply::Refused {
            kind,
            reason: reason.into(),
        }
    }
}

/// What an admitted node needs to be a member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admission {
    pub cluster_id: String,
    pub epoch: u64,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// [`server_proof`] in hex.
    pub server_proof: String,
}

/// A refused join, with what the joiner should do about it.
#[derive(Debug, thiserror::Error)]
#[error("{address} refused the join: {reason}")]
pub struct JoinRefused {
    pub address: String,
    pub kind: Refusal,
    pub reason: String,
}

/// Asks the node at `address` to admit this one. `request` is completed
/// with the proof for this session. A refusal comes back as [`JoinRefused`].
pub async fn request_join(
    address: &str,
    credential: &Credential,
    mut request: JoinRequest,
    timeout: Duration,
) -> anyhow::Result<Admission> {
    let connector = transport::joiner_connector()?;
    let mut connection = transport::connect(address, &connector, timeout)
        .await
        .with_context(|| format!("cannot reach {address} to join"))?;
    let binding = connection.channel_binding();
    request.proof = client_proof(credential.key(), &binding, request.id);
    if let Credential::Token { id, cluster_id, .. } = credential {
        request.token = Some(id.clone());
        request.cluster_id.get_or_insert_with(|| cluster_id.clone());
    }
    let body = serde_json::to_vec(&request)?;
    let (kind, reply) = tokio::time::timeout(timeout, connection.request(JOIN, &body))
        .await
        .with_context(|| format!("{address} did not answer the join within {timeout:?}"))?
        .with_context(|| format!("join through {address}"))?;
    if kind != JOIN {
        bail!(
            "{address} answered the join with frame kind {kind}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    match serde_json::from_slice::<JoinReply>(&reply).with_context(|| format!("{address}: bad join reply"))? {
        JoinReply::Refused { kind, reason } => Err(JoinRefused {
            address: address.to_string(),
            kind,
            reason,
        }
        .into()),
        JoinReply::Admitted(admission) => {
            if !proofs_match(&admission.server_proof, &server_proof(credential.key(), &binding)) {
                bail!(
                    "{address} admitted this node but could not prove it knows the cluster secret or token; \
                     not trusting it (is something between the two nodes?)"
                );
            }
            Ok(*admission)
        }
    }
}

/// Maps a peer failure to a join reply the joiner understands.
pub fn unreachable_leader(error: PeerError) -> JoinReply {
    JoinReply::refused(Refusal::NotReady, format!("the leader could not be asked: {error}"))
}

/// What a member keeps in `DATA_DIR/cluster`: which cluster its data
/// belongs to, the cluster CA and its own certificate.
pub struct ClusterFiles {
    pub cluster_id: String,
    pub ca: ClusterCa,
    pub identity: NodeIdentity,
}

#[derive(Serialize, Deserialize)]
struct ClusterIdFile {
    cluster_id: String,
}

impl ClusterFiles {
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("cluster")
    }

    /// The files in `dir`, or `None` when this node has never been a member.
    pub fn load(dir: &Path) -> anyhow::Result<Option<ClusterFiles>> {
        let id_path = dir.join("cluster.json");
        let text = match std::fs::read_to_string(&id_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", id_path.display())),
        };
        let ClusterIdFile { cluster_id } = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a cluster file; restore it, or move the directory {} away to join a cluster afresh",
                id_path.display(),
                dir.display()
            )
        })?;
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).with_context(|| format!("cannot read {}", dir.join(name).display()))
        };
        let ca = ClusterCa::from_pem(&read("ca.pem")?, &read("ca.key")?, &cluster_id)?;
        let identity = NodeIdentity {
            cert_pem: read("node.pem")?,
            key_pem: read("node.key")?,
            ca_pem: ca.cert_pem().to_string(),
        };
        Ok(Some(ClusterFiles {
            cluster_id,
            ca,
            identity,
        }))
    }

    /// Writes the files; `cluster.json` last, so a crash midway leaves no
    /// half-membership behind.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.ca.save(dir)?;
        write_file(&dir.join("node.pem"), self.identity.cert_pem.as_bytes(), Access::Shared)?;
        write_file(&dir.join("node.key"), self.identity.key_pem.as_bytes(), Access::Private)?;
        let id = serde_json::to_string(&ClusterIdFile {
            cluster_id: self.cluster_id.clone(),
        })?;
        write_file(&dir.join("cluster.json"), id.as_bytes(), Access::Private)?;
        Ok(())
    }

    /// The files an admission carries.
    pub fn from_admission(admission: &Admission) -> anyhow::Result<ClusterFiles> {
        let ca = ClusterCa::from_pem(&admission.ca_cert_pem, &admission.ca_key_pem, &admission.cluster_id)?;
        Ok(ClusterFiles {
            cluster_id: admission.cluster_id.clone(),
            identity: NodeIdentity {
                cert_pem: admission.cert_pem.clone(),
                key_pem: admission.key_pem.clone(),
                ca_pem: ca.cert_pem().to_string(),
            },
            ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token prints and parses back; other text is refused with the format.
    #[test]
    fn tokens_round_trip() {
        let text = Credential::token_text("c0ffee", "abcd", "0123456789abcdef0123");
        let Credential::Token { cluster_id, id, secret } = Credential::parse_token(&text).unwrap() else {
            panic!("not a token");
        };
        assert_eq!((cluster_id.as_str(), id.as_str()), ("c0ffee", "abcd"));
        assert_eq!(secret, "0123456789abcdef0123");
        let error = Credential::parse_token("hunter2").unwrap_err().to_string();
        assert!(error.contains("hm1.CLUSTER_ID.TOKEN_ID.SECRET"), "{error}");
    }

    /// Proofs depend on the key, the session and the node id.
    #[test]
    fn proofs_bind_key_session_and_node() {
        let binding = [7u8; 32];
        let proof = client_proof("secret", &binding, 1);
        assert!(proofs_match(&proof, &client_proof("secret", &binding, 1)));
        assert!(!proofs_match(&proof, &client_proof("other", &binding, 1)));
        assert!(!proofs_match(&proof, &client_proof("secret", &[8u8; 32], 1)));
        assert!(!proofs_match(&proof, &client_proof("secret", &binding, 2)));
        assert!(!proofs_match(&proof, &server_proof("secret", &binding)));
    }
}
