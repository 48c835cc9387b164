//! The transport's server side: every frame a node answers.
//!
//! A peer without a cluster certificate may only ask to join; everything
//! else (Raft RPCs, forwarded writes, joins and membership changes, pings)
//! needs one.

use std::sync::Arc;

use bytes::Bytes;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::network::{
    APPEND_ENTRIES, FETCH_SNAPSHOT, FORWARD_ADMIN, FORWARD_JOIN, FORWARD_WRITE, INSTALL_SNAPSHOT, JOIN, MALFORMED,
    PING, REFUSED, VOTE,
};
use super::{Command, ForwardedJoin, MemberChange, NodeId, Ping, QuorumLog, TypeConfig, join};
use crate::transport::{FrameHandler, Peer};

pub struct ClusterFrames {
    pub log: Arc<QuorumLog>,
    /// Where role calls from peers go; set once the role manager exists
    /// (it starts after the transport). Until then calls are refused as
    /// unavailable.
    pub roles: Arc<std::sync::OnceLock<std::sync::Weak<crate::roles::manager::RoleManager>>>,
}

fn reply<T: Serialize>(kind: u8, outcome: &T) -> (u8, Vec<u8>) {
    match serde_json::to_vec(outcome) {
        Ok(body) => (kind, body),
        Err(error) => (MALFORMED, error.to_string().into_bytes()),
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, (u8, Vec<u8>)> {
    serde_json::from_slice(payload).map_err(|error| (MALFORMED, error.to_string().into_bytes()))
}

#[async_trait::async_trait]
impl FrameHandler for ClusterFrames {
    async fn handle(&self, peer: &Peer, kind: u8, payload: Bytes) -> (u8, Vec<u8>) {
        if !peer.member && kind != JOIN {
            tracing::warn!(peer = %peer.address, kind, "transport: a non-member sent a member-only request; refused");
            return (
                REFUSED,
                b"this request needs a cluster certificate; join the cluster first".to_vec(),
            );
        }
        let raft = self.log.raft();
        match kind {
            APPEND_ENTRIES => match decode::<AppendEntriesRequest<TypeConfig>>(&payload) {
                Ok(request) => reply(kind, &raft.append_entries(request).await),
                Err(error) => error,
            },
            VOTE => match decode::<VoteRequest<NodeId>>(&payload) {
                Ok(request) => {
                    // A node removed from the cluster still thinks it is a
                    // voter and may campaign; it gets no vote here.
                    let candidate = request.vote.leader_id().voted_for();
                    let membership = raft.metrics().borrow().membership_config.membership().clone();
                    let known = membership.nodes().next().is_none()
                        || candidate.is_some_and(|candidate| membership.get_node(&candidate).is_some());
                    if known {
                        reply(kind, &raft.vote(request).await)
                    } else {
                        tracing::debug!(peer = %peer.address, ?candidate, "vote request from a non-member refused");
                        (REFUSED, b"the candidate is not a member of this cluster".to_vec())
                    }
                }
                Err(error) => error,
            },
            INSTALL_SNAPSHOT => match decode::<InstallSnapshotRequest<TypeConfig>>(&payload) {
                Ok(request) => reply(kind, &raft.install_snapshot(request).await),
                Err(error) => error,
            },
            JOIN => match decode::<join::JoinRequest>(&payload) {
                Ok(request) => {
                    let answer = self.log.admit(request.clone(), peer.channel_binding).await;
                    if let join::JoinReply::Refused { reason, .. } = &answer {
                        tracing::warn!(peer = %peer.address, node = %request.address, %reason, "join refused");
                    }
                    reply(kind, &answer)
                }
                Err(error) => error,
            },
            FORWARD_JOIN => match decode::<ForwardedJoin>(&payload) {
                Ok(forwarded) => {
                    let answer = self
                        .log
                        .admit_as_leader(forwarded.request, forwarded.channel_binding)
                        .await;
                    reply(kind, &answer)
                }
                Err(error) => error,
            },
            FORWARD_WRITE => match decode::<Command>(&payload) {
                Ok(command) => reply(kind, &self.log.write_as_leader(command).await),
                Err(error) => error,
            },
            FORWARD_ADMIN => match decode::<MemberChange>(&payload) {
                Ok(change) => {
                    let outcome = self
                        .log
                        .change_as_leader(change)
                        .await
                        .map_err(|error| error.to_string());
                    reply(kind, &outcome)
                }
                Err(error) => error,
            },
            PING => match decode::<Ping>(&payload) {
                Ok(ping) => reply(kind, &self.log.pong(ping).await),
                Err(error) => error,
            },
            FETCH_SNAPSHOT => match self.log.snapshot_for_peer().await {
                Ok(snapshot) => reply(kind, &snapshot),
                Err(reason) => (REFUSED, reason.into_bytes()),
            },
            crate::connect::ROLE_CALL => match self.roles.get() {
                Some(manager) => crate::connect::serve_call(manager, &payload).await,
                None => crate::connect::serve_call(&std::sync::Weak::new(), &payload).await,
            },
            other => (MALFORMED, format!("unknown frame kind {other}").into_bytes()),
        }
    }
}
