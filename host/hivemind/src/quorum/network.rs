//! Raft RPCs over the node-to-node transport.
//!
//! [`TransportNetwork`] is openraft's network: one lazily opened transport
//! connection per peer, re-opened after any failure, each RPC a request frame
//! with a JSON body. [`RaftFrames`] is the server side: it decodes a frame,
//! hands it to the local Raft and encodes the outcome.

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

use super::{HivemindRaft, NodeAddress, NodeId, TypeConfig};
use crate::transport::{self, Connection, FrameHandler};

/// Frame kinds of Raft requests; a reply carries the request's kind.
pub const APPEND_ENTRIES: u8 = 10;
pub const VOTE: u8 = 11;
pub const INSTALL_SNAPSHOT: u8 = 12;
/// Reply kind for a request the server could not decode.
pub const MALFORMED: u8 = 255;

/// How long opening a connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type TlsConnection = Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

#[derive(Clone)]
pub struct TransportNetwork {
    connector: TlsConnector,
}

impl TransportNetwork {
    pub fn new(connector: TlsConnector) -> Self {
        TransportNetwork { connector }
    }
}

impl RaftNetworkFactory<TypeConfig> for TransportNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddress) -> PeerClient {
        PeerClient {
            target,
            address: node.transport.clone(),
            connector: self.connector.clone(),
            connection: None,
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    address: String,
    connector: TlsConnector,
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

/// The transport's handler for Raft frames.
pub struct RaftFrames {
    pub raft: HivemindRaft,
}

fn reply<T: Serialize>(kind: u8, outcome: &T) -> (u8, Vec<u8>) {
    match serde_json::to_vec(outcome) {
        Ok(body) => (kind, body),
        Err(error) => (MALFORMED, error.to_string().into_bytes()),
    }
}

#[async_trait::async_trait]
impl FrameHandler for RaftFrames {
    async fn handle(&self, kind: u8, payload: Bytes) -> (u8, Vec<u8>) {
        match kind {
            APPEND_ENTRIES => match serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(&payload) {
                Ok(request) => reply(kind, &self.raft.append_entries(request).await),
                Err(error) => (MALFORMED, error.to_string().into_bytes()),
            },
            VOTE => match serde_json::from_slice::<VoteRequest<NodeId>>(&payload) {
                Ok(request) => reply(kind, &self.raft.vote(request).await),
                Err(error) => (MALFORMED, error.to_string().into_bytes()),
            },
            INSTALL_SNAPSHOT => match serde_json::from_slice::<InstallSnapshotRequest<TypeConfig>>(&payload) {
                Ok(request) => reply(kind, &self.raft.install_snapshot(request).await),
                Err(error) => (MALFORMED, error.to_string().into_bytes()),
            },
            other => (MALFORMED, format!("unknown frame kind {other}").into_bytes()),
        }
    }
}
