//! The node-to-node transport: TCP with mutual TLS under a cluster CA, and
//! length-prefixed, versioned frames with a maximum size.
//!
//! It owns the cluster's certificates ([`ClusterCa`], [`NodeIdentity`]), the
//! frame format and a request/response server and client. It does not know
//! what the frames mean: Raft RPCs, joins and role calls are its users.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes: the
//! protocol version, the message kind, then the body. A length above
//! [`MAX_FRAME_BYTES`] ends the connection before anything is allocated, and
//! so does a peer whose certificate was not issued by the cluster CA or that
//! does not finish its TLS handshake in time. Every dropped connection is
//! logged and counted; none can take the host down. Connections served at
//! once are bounded by a quarter of the descriptor limit; at the bound, a
//! connection still in its handshake or of a non-member is closed to let
//! the next one in, a member's never is.
//!
//! A client may also connect without a certificate: that is how a node that
//! is not a member yet asks to join. Handlers see whether the peer is a
//! [`Peer::member`] and refuse everything but a join otherwise. Such a
//! client cannot verify the server either (it has no CA yet); both sides
//! prove they know the join secret by a MAC over the TLS session's
//! [`Peer::channel_binding`], which differs on each leg of a relayed
//! connection, so a man in the middle learns nothing it can use.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use hivemind_core::files::{Access, write_file};
use hivemind_core::slots::{Slot, Slots};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// Largest frame accepted: a Raft append of many entries or a snapshot
/// chunk fits; a hostile length prefix cannot make the host allocate more.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// The frame format's version; a peer speaking another one is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// A peer has this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The name every node certificate carries and every client verifies: the
/// cluster CA, not DNS, is what makes a peer a member.
const NODE_SERVER_NAME: &str = "node.hivemind";

/// The cluster's certificate authority, created when a cluster is formed.
pub struct ClusterCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

fn ca_params(cluster_id: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("Hivemind cluster CA {cluster_id}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl ClusterCa {
    /// A new CA for the cluster `cluster_id`.
    pub fn generate(cluster_id: &str) -> anyhow::Result<ClusterCa> {
        let params = ca_params(cluster_id)?;
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(ClusterCa { params, key, cert_pem })
    }

    /// Loads a CA written by [`ClusterCa::save`].
    pub fn load(dir: &Path, cluster_id: &str) -> anyhow::Result<ClusterCa> {
        let cert_pem = std::fs::read_to_string(dir.join("ca.pem"))
            .with_context(|| format!("read {}", dir.join("ca.pem").display()))?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("read {}", dir.join("ca.key").display()))?;
        Self::from_pem(&cert_pem, &key_pem, cluster_id).with_context(|| format!("the cluster CA in {}", dir.display()))
    }

    /// A CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str, cluster_id: &str) -> anyhow::Result<ClusterCa> {
        let key = KeyPair::from_pem(key_pem).context("ca.key: not a private key")?;
        parse_certs(cert_pem, "ca.pem")?;
        Ok(ClusterCa {
            params: ca_params(cluster_id)?,
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA's private key in PEM (handed to admitted members, so that
    /// any of them can admit others once it leads).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Writes `ca.pem` and `ca.key` (owner-only) into `dir`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_file(&dir.join("ca.pem"), self.cert_pem.as_bytes(), Access::Shared)?;
        write_file(
            &dir.join("ca.key"),
            self.key.serialize_pem().as_bytes(),
            Access::Private,
        )?;
        Ok(())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for node `node_id`, signed by this CA.
    pub fn issue(&self, node_id: &str) -> anyhow::Result<NodeIdentity> {
        let mut params = CertificateParams::new(vec![NODE_SERVER_NAME.to_string()])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, node_id);
        params.distinguished_name = name;
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A node's certificate, key and the CA that signed it.
#[derive(Clone)]
pub struct NodeIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

fn parse_certs(pem: &str, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what}: not PEM certificates"))?;
    anyhow::ensure!(!certs.is_empty(), "{what}: no certificate");
    Ok(certs)
}

impl NodeIdentity {
    fn key(&self) -> anyhow::Result<PrivateKeyDer<'static>> {
        use rustls_pki_types::pem::PemObject;
        Ok(PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from_pem_slice(self.key_pem.as_bytes()).context("node key: not a PKCS#8 PEM key")?,
        ))
    }

    fn roots(&self) -> anyhow::Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for cert in parse_certs(&self.ca_pem, "cluster CA")? {
            roots.add(cert)?;
        }
        Ok(Arc::new(roots))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Server side: present our certificate; a client certificate, if
    /// presented, must come from the same CA (one without is a joiner).
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .allow_unauthenticated()
            .build()?;
        let config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(parse_certs(&self.cert_pem, "node certificate")?, self.key()?)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Client side: trust only the cluster CA, present our certificate.
    pub fn connector(&self) -> anyhow::Result<TlsConnector> {
        let config = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(parse_certs(&self.cert_pem, "node certificate")?, self.key()?)?;
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// A client for a node that has no cluster CA yet: it accepts any server
/// certificate, so whoever answers must prove it knows the join secret over
/// the session's channel binding before anything it says is trusted.
pub fn joiner_connector() -> anyhow::Result<TlsConnector> {
    let provider = NodeIdentity::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCertificate(provider)))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct AnyServerCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Label of the keying material both ends export as the channel binding.
const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-hivemind-channel-binding";

/// 32 bytes only the two ends of this TLS session know.
fn channel_binding<T>(connection: &rustls::ConnectionCommon<T>) -> [u8; 32] {
    let mut binding = [0u8; 32];
    // Fails only before the handshake finished, which never reaches here.
    let _ = connection.export_keying_material(&mut binding, CHANNEL_BINDING_LABEL, None);
    binding
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

/// Builds a frame body: version, kind, payload.
fn encode(kind: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(2 + payload.len());
    frame.extend_from_slice(&[PROTOCOL_VERSION, kind]);
    frame.extend_from_slice(payload);
    frame.freeze()
}

/// Splits a frame body into kind and payload, refusing other versions.
fn decode(frame: &[u8]) -> anyhow::Result<(u8, &[u8])> {
    match frame {
        [PROTOCOL_VERSION, kind, payload @ ..] => Ok((*kind, payload)),
        [version, ..] => anyhow::bail!("protocol version {version} is not {PROTOCOL_VERSION}"),
        [] => anyhow::bail!("empty frame"),
    }
}

/// Who sent a request frame.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    /// The peer presented a certificate of the cluster CA.
    pub member: bool,
    /// Keying material of this TLS session, the same at both ends.
    pub channel_binding: [u8; 32],
}

/// What a server does with one request frame.
#[async_trait::async_trait]
pub trait FrameHandler: Send + Sync + 'static {
    /// Answers `payload` of message `kind` from `peer` with a reply of some kind.
    async fn handle(&self, peer: &Peer, kind: u8, payload: Bytes) -> (u8, Vec<u8>);
}

/// A switch that cuts a node off the network, for fault-injection tests:
/// while on, its server drops every connection and request, and its
/// clients fail before sending. Off (and never touched) in normal running.
#[derive(Clone, Default)]
pub struct Isolation(Arc<std::sync::atomic::AtomicBool>);

impl Isolation {
    pub fn set(&self, isolated: bool) {
        self.0.store(isolated, Ordering::SeqCst);
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Connections the server refused or dropped, by reason.
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub accepted: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub bad_frames: AtomicU64,
}

/// Serves frames on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: Arc<dyn FrameHandler>,
    counters: Arc<TransportCounters>,
    isolation: Isolation,
    shutdown: CancellationToken,
) {
    let connections = Slots::new(hivemind_core::limits::connection_cap(4, 64, 16384));
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => return,
            place = connections.acquire() => place,
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if hivemind_core::limits::is_local_shortage(&error) {
                        connections.shed_idlest();
                    }
                    tracing::warn!(%error, "transport accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if isolation.is_on() {
            continue;
        }
        let (acceptor, handler, counters, isolation, shutdown) = (
            acceptor.clone(),
            handler.clone(),
            counters.clone(),
            isolation.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve_connection(stream, peer, acceptor, handler, counters, isolation, place) => {}
            }
        });
    }
}

/// Serves one connection in `place`: a connection still in its handshake,
/// or of a non-member (one join request), may be closed to let another in
/// when the listener is full; a member's is not.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<dyn FrameHandler>,
    counters: Arc<TransportCounters>,
    isolation: Isolation,
    place: Slot,
) {
    let _ = stream.set_nodelay(true);
    let handshake = tokio::select! {
        _ = place.asked_to_close() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => handshake,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %error, "transport: TLS handshake refused; connection dropped");
            return;
        }
        Err(_) => {
            counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "transport: no TLS handshake within {} s; connection dropped", HANDSHAKE_TIMEOUT.as_secs());
            return;
        }
    };
    counters.accepted.fetch_add(1, Ordering::Relaxed);
    let session = tls.get_ref().1;
    let peer = Peer {
        address: peer,
        member: session.peer_certificates().is_some_and(|certs| !certs.is_empty()),
        channel_binding: channel_binding(session),
    };
    let _member = peer.member.then(|| place.busy());
    let mut framed = Framed::new(tls, codec());
    while let Some(frame) = framed.next().await {
        if isolation.is_on() {
            return;
        }
        let reply = match frame.map_err(anyhow::Error::from).and_then(|frame| {
            let (kind, payload) = decode(&frame)?;
            Ok((kind, Bytes::copy_from_slice(payload)))
        }) {
            Ok((MUX_OPEN, _)) if peer.member => {
                if framed.send(encode(MUX_OPEN, &[])).await.is_err() {
                    return;
                }
                serve_multiplexed(framed, peer, handler, counters, isolation).await;
                return;
            }
            Ok((kind, payload)) => handler.handle(&peer, kind, payload).await,
            // A peer hanging up without TLS close_notify is an ordinary close.
            Err(error)
                if error
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|error| error.kind() == std::io::ErrorKind::UnexpectedEof) =>
            {
                tracing::debug!(peer = %peer.address, "transport: peer hung up");
                return;
            }
            Err(error) => {
                counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %peer.address, %error, "transport: bad frame; connection dropped");
                return;
            }
        };
        if let Err(error) = framed.send(encode(reply.0, &reply.1)).await {
            tracing::debug!(peer = %peer.address, %error, "transport: reply not sent");
            return;
        }
        // A non-member gets one answer (to its join) and the door.
        if !peer.member {
            let _ = SinkExt::<Bytes>::close(&mut framed).await;
            return;
        }
    }
}

/// One TLS connection to a peer, carrying one request at a time.
pub struct Connection<S> {
    framed: Framed<S, LengthDelimitedCodec>,
}

/// Opens a connection to `address` and verifies it is a cluster member.
pub async fn connect(
    address: &str,
    connector: &TlsConnector,
    timeout: Duration,
) -> anyhow::Result<Connection<tokio_rustls::client::TlsStream<TcpStream>>> {
    let connect = async {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connect to {address}"))?;
        let _ = stream.set_nodelay(true);
        let name = ServerName::try_from(NODE_SERVER_NAME)?;
        let tls = connector
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS with {address}"))?;
        anyhow::Ok(Connection {
            framed: Framed::new(tls, codec()),
        })
    };
    tokio::time::timeout(timeout, connect)
        .await
        .with_context(|| format!("connect to {address}: timed out"))?
}

pub type TlsConnection = Connection<tokio_rustls::client::TlsStream<TcpStream>>;

impl TlsConnection {
    /// Keying material of this TLS session, the same the server sees.
    pub fn channel_binding(&self) -> [u8; 32] {
        channel_binding(self.framed.get_ref().get_ref().1)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// True when the peer has closed the connection (checked without
    /// waiting). Only valid between requests, when no reply is due.
    pub fn is_closed(&mut self) -> bool {
        use futures::FutureExt;
        matches!(
            self.framed.next().now_or_never(),
            Some(None | Some(Err(_)) | Some(Ok(_)))
        )
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&mut self, kind: u8, payload: &[u8]) -> anyhow::Result<(u8, Bytes)> {
        self.framed.send(encode(kind, payload)).await?;
        let frame = self.framed.next().await.context("the peer closed the connection")??;
        let (kind, payload) = decode(&frame)?;
        Ok((kind, Bytes::copy_from_slice(payload)))
    }
}

// --- multiplexed connections ---------------------------------------------

/// The first request on a connection that turns it into a multiplexed one:
/// from then on every frame carries a call id, calls run concurrently and
/// replies come back in any order. Role calls use it: one connection per
/// peer carries every caller's calls.
pub const MUX_OPEN: u8 = 0x70;
/// Calls a multiplexed connection runs at once on the server; more are
/// answered at once with [`MUX_BUSY`].
pub const MUX_MAX_IN_FLIGHT: usize = 256;
/// The reply kind for a call refused because too many are running.
pub const MUX_BUSY: u8 = 0x71;

fn mux_encode(call: u64, kind: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(8 + 2 + payload.len());
    frame.extend_from_slice(&call.to_be_bytes());
    frame.extend_from_slice(&encode(kind, payload));
    frame.freeze()
}

fn mux_decode(frame: &[u8]) -> anyhow::Result<(u64, u8, &[u8])> {
    anyhow::ensure!(
        frame.len() >= 8,
        "multiplexed frame of {} bytes has no call id",
        frame.len()
    );
    let call = u64::from_be_bytes(frame[..8].try_into().expect("8 bytes"));
    let (kind, payload) = decode(&frame[8..])?;
    Ok((call, kind, payload))
}

/// Serves a connection after [`MUX_OPEN`]: each call runs in its own task;
/// replies go out through one writer as they finish.
async fn serve_multiplexed<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    framed: Framed<S, LengthDelimitedCodec>,
    peer: Peer,
    handler: Arc<dyn FrameHandler>,
    counters: Arc<TransportCounters>,
    isolation: Isolation,
) {
    let (mut sink, mut stream) = framed.split();
    let (replies, mut outbox) = tokio::sync::mpsc::channel::<Bytes>(MUX_MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            if sink.send(frame).await.is_err() {
                return;
            }
        }
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(MUX_MAX_IN_FLIGHT));
    while let Some(frame) = stream.next().await {
        if isolation.is_on() {
            break;
        }
        let (call, kind, payload) = match frame.map_err(anyhow::Error::from).and_then(|frame| {
            let (call, kind, payload) = mux_decode(&frame)?;
            Ok((call, kind, Bytes::copy_from_slice(payload)))
        }) {
            Ok(decoded) => decoded,
            Err(error) => {
                counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %peer.address, %error, "transport: multiplexed connection ended");
                break;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let busy = mux_encode(call, MUX_BUSY, b"too many calls in flight on this connection");
            if replies.send(busy).await.is_err() {
                break;
            }
            continue;
        };
        let (handler, peer, replies) = (handler.clone(), peer.clone(), replies.clone());
        tokio::spawn(async move {
            let (kind, body) = handler.handle(&peer, kind, payload).await;
            let _ = replies.send(mux_encode(call, kind, &body)).await;
            drop(permit);
        });
    }
    drop(replies);
    writer.abort();
}

/// Why a call on a multiplexed connection failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The connection is gone (closed by either side, torn down, broken);
    /// the call may or may not have run.
    #[error("the connection closed: {0}")]
    Closed(String),
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
}

type Pending = Arc<std::sync::Mutex<Option<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<(u8, Bytes)>>>>>;

/// A client connection carrying many concurrent calls. Cheap to share
/// (`Arc`); [`MuxConnection::close`] or a broken connection fails every
/// call waiting on it at once.
pub struct MuxConnection {
    outbox: tokio::sync::mpsc::Sender<Bytes>,
    /// Calls waiting for a reply; `None` once the connection is closed.
    pending: Pending,
    next_call: AtomicU64,
    closed: CancellationToken,
    reason: Arc<std::sync::Mutex<String>>,
}

impl MuxConnection {
    /// Connects to `address`, checks it is a cluster member and switches
    /// the connection to multiplexed calls.
    pub async fn open(address: &str, connector: &TlsConnector, timeout: Duration) -> anyhow::Result<MuxConnection> {
        let mut connection = connect(address, connector, timeout).await?;
        let (kind, _) = tokio::time::timeout(timeout, connection.request(MUX_OPEN, &[]))
            .await
            .with_context(|| format!("{address} did not accept multiplexed calls within {timeout:?}"))??;
        anyhow::ensure!(
            kind == MUX_OPEN,
            "{address} refused multiplexed calls (reply kind {kind})"
        );
        let (mut sink, mut stream) = connection.framed.split();
        let (outbox, mut queued) = tokio::sync::mpsc::channel::<Bytes>(MUX_MAX_IN_FLIGHT);
        let pending: Pending = Arc::new(std::sync::Mutex::new(Some(std::collections::HashMap::new())));
        let closed = CancellationToken::new();
        let reason = Arc::new(std::sync::Mutex::new(String::new()));
        let fail_all = {
            let (pending, closed, reason) = (pending.clone(), closed.clone(), reason.clone());
            move |why: String| {
                let mut slot = reason.lock().unwrap();
                if slot.is_empty() {
                    *slot = why;
                }
                drop(slot);
                // Dropping the senders wakes every waiting call.
                pending.lock().unwrap().take();
                closed.cancel();
            }
        };
        {
            let (closed, fail_all) = (closed.clone(), fail_all.clone());
            tokio::spawn(async move {
                let why = loop {
                    tokio::select! {
                        _ = closed.cancelled() => break "closed by this node".to_string(),
                        frame = queued.recv() => match frame {
                            None => break "closed by this node".to_string(),
                            Some(frame) => if let Err(error) = sink.send(frame).await {
                                break format!("send failed: {error}");
                            },
                        },
                    }
                };
                // A failing close must not stop the rest of the teardown.
                let _ = tokio::time::timeout(Duration::from_millis(200), SinkExt::<Bytes>::close(&mut sink)).await;
                fail_all(why);
            });
        }
        {
            let (pending, closed) = (pending.clone(), closed.clone());
            tokio::spawn(async move {
                let why = loop {
                    let frame = tokio::select! {
                        _ = closed.cancelled() => break "closed by this node".to_string(),
                        frame = stream.next() => frame,
                    };
                    let frame = match frame {
                        None => break "the peer closed the connection".to_string(),
                        Some(Err(error)) => break format!("receive failed: {error}"),
                        Some(Ok(frame)) => frame,
                    };
                    let Ok((call, kind, payload)) = mux_decode(&frame) else {
                        break "the peer sent a malformed frame".to_string();
                    };
                    let waiter = pending
                        .lock()
                        .unwrap()
                        .as_mut()
                        .and_then(|waiting| waiting.remove(&call));
                    if let Some(waiter) = waiter {
                        let _ = waiter.send((kind, Bytes::copy_from_slice(payload)));
                    }
                };
                fail_all(why);
            });
        }
        Ok(MuxConnection {
            outbox,
            pending,
            next_call: AtomicU64::new(1),
            closed,
            reason,
        })
    }

    /// Sends one call and waits up to `timeout` for its reply.
    pub async fn call(&self, kind: u8, payload: &[u8], timeout: Duration) -> Result<(u8, Bytes), MuxError> {
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(waiting) => waiting.insert(call, reply),
            None => return Err(self.closed_error()),
        };
        let exchange = async {
            self.outbox
                .send(mux_encode(call, kind, payload))
                .await
                .map_err(|_| self.closed_error())?;
            answer.await.map_err(|_| self.closed_error())
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(waiting) = self.pending.lock().unwrap().as_mut() {
                    waiting.remove(&call);
                }
                Err(MuxError::TimedOut(timeout))
            }
        }
    }

    fn closed_error(&self) -> MuxError {
        MuxError::Closed(self.reason.lock().unwrap().clone())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Closes the connection: every call waiting on it fails at once.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

impl Drop for MuxConnection {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    struct Echo;

    #[async_trait::async_trait]
    impl FrameHandler for Echo {
        async fn handle(&self, peer: &Peer, kind: u8, payload: Bytes) -> (u8, Vec<u8>) {
            let mut reply = payload.to_vec();
            reply.push(peer.member as u8);
            reply.extend_from_slice(&peer.channel_binding);
            (kind + 1, reply)
        }
    }

    struct Server {
        address: SocketAddr,
        counters: Arc<TransportCounters>,
        shutdown: CancellationToken,
    }

    async fn start_server(identity: &NodeIdentity) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let counters = Arc::new(TransportCounters::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            identity.acceptor().unwrap(),
            Arc::new(Echo),
            counters.clone(),
            Isolation::default(),
            shutdown.clone(),
        ));
        Server {
            address,
            counters,
            shutdown,
        }
    }

    async fn round_trip_with(server: &Server, connector: &TlsConnector) -> anyhow::Result<(u8, Bytes, [u8; 32])> {
        let mut connection = connect(&server.address.to_string(), connector, Duration::from_secs(5)).await?;
        let (kind, payload) = connection.request(7, b"hello").await?;
        Ok((kind, payload, connection.channel_binding()))
    }

    async fn round_trip(server: &Server, identity: &NodeIdentity) -> anyhow::Result<(u8, Bytes)> {
        let (kind, payload, _) = round_trip_with(server, &identity.connector()?).await?;
        Ok((kind, payload))
    }

    /// Two nodes of one CA exchange frames over mutual TLS; the server knows
    /// the client for a member and both ends see the same channel binding.
    #[tokio::test]
    async fn members_exchange_frames() {
        let ca = ClusterCa::generate("test").unwrap();
        let server = start_server(&ca.issue("a").unwrap()).await;
        let (kind, payload, binding) = round_trip_with(&server, &ca.issue("b").unwrap().connector().unwrap())
            .await
            .unwrap();
        assert_eq!((kind, &payload[..6]), (8, b"hello\x01".as_ref()), "a member");
        assert_eq!(&payload[6..], &binding, "the same channel binding at both ends");
        server.shutdown.cancel();
    }

    /// A client without a certificate (a node asking to join) is served but
    /// not taken for a member, and each session has its own channel binding.
    #[tokio::test]
    async fn a_client_without_certificate_is_not_a_member() {
        let ca = ClusterCa::generate("test").unwrap();
        let server = start_server(&ca.issue("a").unwrap()).await;
        let joiner = joiner_connector().unwrap();
        let (_, first, first_binding) = round_trip_with(&server, &joiner).await.unwrap();
        let (_, _, second_binding) = round_trip_with(&server, &joiner).await.unwrap();
        assert_eq!(first[5], 0, "not a member");
        assert_eq!(&first[6..], &first_binding);
        assert_ne!(first_binding, second_binding);
        server.shutdown.cancel();
    }

    /// A peer with a certificate from another CA is refused at the handshake,
    /// and the server keeps serving members.
    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let ca = ClusterCa::generate("test").unwrap();
        let server = start_server(&ca.issue("a").unwrap()).await;
        let stranger = ClusterCa::generate("other").unwrap().issue("x").unwrap();
        assert!(round_trip(&server, &stranger).await.is_err());
        assert!(round_trip(&server, &ca.issue("b").unwrap()).await.is_ok());
        assert_eq!(server.counters.handshake_failures.load(Ordering::Relaxed), 1);
        server.shutdown.cancel();
    }

    /// Random bytes instead of a TLS handshake are dropped and counted.
    #[tokio::test]
    async fn random_bytes_are_dropped() {
        let ca = ClusterCa::generate("test").unwrap();
        let server = start_server(&ca.issue("a").unwrap()).await;
        let mut raw = TcpStream::connect(server.address).await.unwrap();
        let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        let _ = raw.write_all(&junk).await;
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut raw, &mut buffer),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "the server closes the connection"
        );
        assert!(round_trip(&server, &ca.issue("b").unwrap()).await.is_ok());
        assert_eq!(server.counters.handshake_failures.load(Ordering::Relaxed), 1);
        server.shutdown.cancel();
    }

    /// A member announcing a 4 GB frame is disconnected without the server
    /// allocating it; the server keeps serving.
    #[tokio::test]
    async fn a_huge_length_prefix_is_refused() {
        let ca = ClusterCa::generate("test").unwrap();
        let server = start_server(&ca.issue("a").unwrap()).await;
        let member = ca.issue("b").unwrap();
        let name = ServerName::try_from(NODE_SERVER_NAME).unwrap();
        let stream = TcpStream::connect(server.address).await.unwrap();
        let mut tls = member.connector().unwrap().connect(name, stream).await.unwrap();
        tls.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        tls.write_all(&[PROTOCOL_VERSION, 1, 2, 3]).await.unwrap();
        tls.flush().await.unwrap();
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut tls, &mut buffer),
        )
        .await
        .expect("the server ends the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(server.counters.bad_frames.load(Ordering::Relaxed), 1);
        assert!(round_trip(&server, &member).await.is_ok());
        server.shutdown.cancel();
    }

    /// A frame of another protocol version is refused.
    #[test]
    fn other_versions_are_refused() {
        assert!(decode(&[PROTOCOL_VERSION + 1, 1]).is_err());
        assert!(decode(&[]).is_err());
        assert_eq!(decode(&[PROTOCOL_VERSION, 3, 9]).unwrap(), (3, &[9u8][..]));
    }

    /// A saved CA loads back and issues certificates the original's members trust.
    #[tokio::test]
    async fn a_saved_ca_keeps_issuing_trusted_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("test").unwrap();
        ca.save(dir.path()).unwrap();
        let server = start_server(&ca.issue("a").unwrap()).await;
        let reloaded = ClusterCa::load(dir.path(), "test").unwrap();
        assert!(round_trip(&server, &reloaded.issue("c").unwrap()).await.is_ok());
        server.shutdown.cancel();
    }
}
