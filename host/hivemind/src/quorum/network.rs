//! Raft RPCs and the control plane's other requests over the node-to-node
//! transport.
//!
//! [`TransportNetwork`] is openraft's network: one lazily opened transport
//! connection per peer, re-opened after any failure, each RPC a request frame
//! with a JSON body. [`PeerPool`] carries everything else (forwarded writes
//! and joins, membership changes, health pings). The server side of all of
//! them is `frames::ClusterFrames`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_rustls::TlsConnector;

use super::{NodeAddress, NodeId, TypeConfig};
use crate::transport::{self, Isolation, TlsConnection};

/// Frame kinds of Raft requests; a reply carries the request's kind.
pub const APPEND_ENTRIES: u8 = 10;
pub const VOTE: u8 = 11;
pub const INSTALL_SNAPSHOT: u8 = 12;
/// A node that is not a member yet asks to join (the only frame a peer
/// without a cluster certificate may send).
pub const JOIN: u8 = 20;
/// A write forwarded to the leader.
pub const FORWARD_WRITE: u8 = 21;
/// A join forwarded to the leader, with the joiner's channel binding.
pub const FORWARD_JOIN: u8 = 22;
/// Health ping between members.
pub const PING: u8 = 23;
/// A membership change forwarded to the leader.
pub const FORWARD_ADMIN: u8 = 24;
/// A node back at a stale epoch asks the leader for its snapshot.
pub const FETCH_SNAPSHOT: u8 = 25;
/// Reply kind: the request was understood and refused; the body says why.
pub const REFUSED: u8 = 254;
/// Reply kind for a request the server could not decode.
pub const MALFORMED: u8 = 255;

/// How long opening a connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct TransportNetwork {
    connector: TlsConnector,
    isolation: Isolation,
}

impl TransportNetwork {
    pub fn new(connector: TlsConnector, isolation: Isolation) -> Self {
        TransportNetwork { connector, isolation }
    }
}

impl RaftNetworkFactory<TypeConfig> for TransportNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddress) -> PeerClient {
        PeerClient {
            target,
            address: node.transport.clone(),
            connector: self.connector.clone(),
            isolation: self.isolation.clone(),
            connection: None,
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    address: String,
    connector: TlsConnector,
    isolation: Isolation,
    connection: Option<TlsConnection>,
}

impl PeerClient {
    /// Sends one RPC; any transport failure drops the connection so the
    /// next RPC opens a fresh one.
    async fn call<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &mut self,
        kind: u8,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeAddress, E>> {
        let body = serde_json::to_vec(request).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        if self.isolation.is_on() {
            self.connection = None;
            return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
                "this node is isolated",
            ))));
        }
        let result = tokio::time::timeout(option.hard_ttl(), async {
            if self.connection.is_none() {
                self.connection = Some(transport::connect(&self.address, &self.connector, CONNECT_TIMEOUT).await?);
            }
            let connection = self.connection.as_mut().expect("connected above");
            connection.request(kind, &body).await
        })
        .await;
        let (reply_kind, payload) = match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                self.connection = None;
                return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
                    format!("{}: {error:#}", self.address),
                ))));
            }
            Err(_) => {
                self.connection = None;
                return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
                    format!("{}: no answer within {:?}", self.address, option.hard_ttl()),
                ))));
            }
        };
        if reply_kind != kind {
            self.connection = None;
            return Err(RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
                "{} answered with frame kind {reply_kind}",
                self.address
            )))));
        }
        let outcome: Result<Resp, E> =
            serde_json::from_slice(&payload).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        outcome.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddress, RaftError<NodeId>>> {
        self.call(APPEND_ENTRIES, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, NodeAddress, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(INSTALL_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddress, RaftError<NodeId>>> {
        self.call(VOTE, &rpc, &option).await
    }
}

/// Why a request to a peer got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// Nothing was sent (no connection): trying again is safe.
    #[error("{0}")]
    NotSent(String),
    /// Sent, but no answer came: the peer may or may not have acted on it.
    #[error("{0}")]
    NoAnswer(String),
    /// The peer answered that it refuses the request, saying why.
    #[error("{0}")]
    Refused(String),
}

/// Idle connections kept per peer; more concurrent requests open more.
const IDLE_PER_PEER: usize = 16;

/// Connections to peers for requests other than Raft's own, pooled so that
/// concurrent requests do not queue behind each other on one connection.
pub struct PeerPool {
    connector: TlsConnector,
    isolation: Isolation,
    idle: Mutex<HashMap<String, Vec<TlsConnection>>>,
}

impl PeerPool {
    pub fn new(connector: TlsConnector, isolation: Isolation) -> Self {
        PeerPool {
            connector,
            isolation,
            idle: Mutex::default(),
        }
    }

    /// Sends one request to `address` and returns the reply's body; the
    /// reply must be of the request's kind (or [`REFUSED`]).
    pub async fn request(&self, address: &str, kind: u8, body: &[u8], timeout: Duration) -> Result<Bytes, PeerError> {
        if self.isolation.is_on() {
            self.idle.lock().unwrap().clear();
            return Err(PeerError::NotSent("this node is isolated".into()));
        }
        let mut connection = loop {
            let pooled = self.idle.lock().unwrap().get_mut(address).and_then(Vec::pop);
            match pooled {
                // A connection the peer closed while idle (it restarted, say)
                // would swallow the request: skip it.
                Some(mut connection) => {
                    if !connection.is_closed() {
                        break connection;
                    }
                }
                None => {
                    break transport::connect(address, &self.connector, CONNECT_TIMEOUT.min(timeout))
                        .await
                        .map_err(|error| PeerError::NotSent(format!("{error:#}")))?;
                }
            }
        };
        match tokio::time::timeout(timeout, connection.request(kind, body)).await {
            Ok(Ok((reply_kind, payload))) if reply_kind == kind => {
                let mut idle = self.idle.lock().unwrap();
                let list = idle.entry(address.to_string()).or_default();
                if list.len() < IDLE_PER_PEER {
                    list.push(connection);
                }
                Ok(payload)
            }
            Ok(Ok((REFUSED, payload))) => Err(PeerError::Refused(String::from_utf8_lossy(&payload).into_owned())),
            Ok(Ok((other, payload))) => Err(PeerError::Refused(format!(
                "{address} answered with frame kind {other}: {}",
                String::from_utf8_lossy(&payload)
            ))),
            Ok(Err(error)) => Err(PeerError::NoAnswer(format!("{address}: {error:#}"))),
            Err(_) => Err(PeerError::NoAnswer(format!("{address}: no answer within {timeout:?}"))),
        }
    }

    /// [`PeerPool::request`] with JSON bodies both ways.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        address: &str,
        kind: u8,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let body = serde_json::to_vec(request).map_err(|error| PeerError::NotSent(error.to_string()))?;
        let reply = self.request(address, kind, &body, timeout).await?;
        serde_json::from_slice(&reply).map_err(|error| PeerError::NoAnswer(format!("{address}: bad reply: {error}")))
    }
}
