//! The connect layer: a role on this node calls a role's `on-request` on
//! another node over the node-to-node transport.
//!
//! One multiplexed client connection per remote node carries every
//! caller's calls. Each link counts the callers using it; a link nobody
//! uses is closed after [`ConnectLimits::idle_close`]. When the registry
//! stops holding a node healthy, or gossip holds it down, its link is torn
//! down at once, so calls in flight fail with `unavailable` instead of
//! waiting for their timeout; a close that fails never stops the rest of
//! the teardown. Every call has a timeout, and each link bounds the calls
//! in flight on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hivemind_runtime::{HostError, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::membership::Liveness;
use crate::registry::Registry;
use crate::roles::manager::RoleManager;
use crate::transport::{MUX_BUSY, MuxConnection, MuxError};

/// Frame kind of a role call.
pub const ROLE_CALL: u8 = 30;
/// Reply kinds: the role's response, or a host error.
pub const ROLE_REPLY: u8 = 31;
pub const ROLE_ERROR: u8 = 32;

/// Limits of the connect layer; defaults suit a LAN.
#[derive(Debug, Clone)]
pub struct ConnectLimits {
    /// How long one call may take, connection set-up included.
    pub call_timeout: Duration,
    /// Calls one node may have in flight to one peer; more are refused
    /// with `overloaded` rather than queued without bound.
    pub max_in_flight: usize,
    /// A link no caller has used for this long is closed.
    pub idle_close: Duration,
}

impl Default for ConnectLimits {
    fn default() -> Self {
        ConnectLimits {
            // Role handlers are bounded by their CPU budget; a few seconds
            // covers a slow one plus a TLS handshake.
            call_timeout: Duration::from_secs(5),
            max_in_flight: 128,
            idle_close: Duration::from_secs(60),
        }
    }
}

/// A request on the wire (the runtime's types carry no serde).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireCall {
    pub role: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A host error on the wire: kind and text.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
}

impl WireError {
    fn from_host(error: &HostError) -> WireError {
        let (kind, message) = match error {
            HostError::Denied(message) => ("denied", message),
            HostError::Invalid(message) => ("invalid", message),
            HostError::Unavailable(message) => ("unavailable", message),
            HostError::Overloaded(message) => ("overloaded", message),
            HostError::Failed(message) => ("failed", message),
        };
        WireError {
            kind: kind.into(),
            message: message.clone(),
        }
    }

    fn into_host(self, node: &str) -> HostError {
        let message = format!("node {node}: {}", self.message);
        match self.kind.as_str() {
            "denied" => HostError::Denied(message),
            "invalid" => HostError::Invalid(message),
            "unavailable" => HostError::Unavailable(message),
            "overloaded" => HostError::Overloaded(message),
            _ => HostError::Failed(message),
        }
    }
}

/// One remote node's link: its connection (opened once, shared) and who
/// uses it.
struct Link {
    node: String,
    connection: OnceCell<Arc<MuxConnection>>,
    users: AtomicUsize,
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
}

/// Holds a link in use; dropping it releases the link.
struct LinkUse(Arc<Link>);

impl Drop for LinkUse {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap() = Instant::now();
        self.0.users.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connections opened and closed so far, for tests and metrics.
#[derive(Debug, Default)]
pub struct ConnectCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub calls: AtomicU64,
    pub failed: AtomicU64,
}

pub struct Connect {
    registry: Arc<Registry>,
    tls: TlsConnector,
    limits: ConnectLimits,
    links: Mutex<HashMap<String, Arc<Link>>>,
    pub counters: ConnectCounters,
}

impl Connect {
    pub fn new(registry: Arc<Registry>, tls: TlsConnector, limits: ConnectLimits) -> Arc<Connect> {
        Arc::new(Connect {
            registry,
            tls,
            limits,
            links: Mutex::new(HashMap::new()),
            counters: ConnectCounters::default(),
        })
    }

    /// Open links right now.
    pub fn open_links(&self) -> usize {
        self.links
            .lock()
            .unwrap()
            .values()
            .filter(|link| link.connection.get().is_some_and(|connection| !connection.is_closed()))
            .count()
    }

    /// Calls `role` on `node` (a node id) and returns its response.
    pub async fn call(&self, node: &str, role: &str, request: Request) -> Result<Response, HostError> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.limits.call_timeout, self.call_inner(node, role, request))
            .await
            .unwrap_or_else(|_| {
                Err(HostError::Unavailable(format!(
                    "node {node} did not answer within {:?}",
                    self.limits.call_timeout
                )))
            });
        if result.is_err() {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn call_inner(&self, node: &str, role: &str, request: Request) -> Result<Response, HostError> {
        let Some(entry) = self.registry.node(node) else {
            return Err(HostError::Unavailable(format!(
                "node {node} is not a member of this cluster"
            )));
        };
        if !entry.healthy || entry.gossip == Some(Liveness::Down) {
            return Err(HostError::Unavailable(format!(
                "node {node} ({}) is down: {}",
                entry.name,
                if entry.healthy {
                    "gossip cannot reach it"
                } else {
                    "the cluster decided it failed or left"
                }
            )));
        }
        let link = self.link(node);
        let _use = LinkUse(link.clone());
        let in_flight = link.in_flight.fetch_add(1, Ordering::SeqCst);
        let _slot = release_on_drop(&link.in_flight);
        if in_flight >= self.limits.max_in_flight {
            return Err(HostError::Overloaded(format!(
                "{} calls to node {node} are already in flight; try again",
                self.limits.max_in_flight
            )));
        }
        let connection = link
            .connection
            .get_or_try_init(|| async {
                let connection = MuxConnection::open(&entry.transport, &self.tls, self.limits.call_timeout)
                    .await
                    .map_err(|error| HostError::Unavailable(format!("node {node}: {error:#}")))?;
                self.counters.opened.fetch_add(1, Ordering::Relaxed);
                Ok::<_, HostError>(Arc::new(connection))
            })
            .await?
            .clone();
        let wire = WireCall {
            role: role.to_string(),
            method: request.method,
            path: request.path,
            query: request.query,
            headers: request.headers,
            body: request.body,
        };
        let payload = postcard::to_allocvec(&wire).map_err(|error| HostError::Invalid(error.to_string()))?;
        let (kind, reply) = connection
            .call(ROLE_CALL, &payload, self.limits.call_timeout)
            .await
            .map_err(|error| {
                if let MuxError::Closed(_) = error {
                    self.drop_link(node, &link);
                }
                HostError::Unavailable(format!("node {node}: {error}"))
            })?;
        match kind {
            ROLE_REPLY => {
                let response: WireResponse =
                    postcard::from_bytes(&reply).map_err(|error| HostError::Failed(format!("node {node}: {error}")))?;
                Ok(Response {
                    status: response.status,
                    headers: response.headers,
                    body: response.body,
                })
            }
            ROLE_ERROR => Err(postcard::from_bytes::<WireError>(&reply)
                .map(|error| error.into_host(node))
                .unwrap_or_else(|error| HostError::Failed(format!("node {node}: {error}")))),
            MUX_BUSY => Err(HostError::Overloaded(format!(
                "node {node}: {}",
                String::from_utf8_lossy(&reply)
            ))),
            other => Err(HostError::Failed(format!(
                "node {node} answered a role call with frame kind {other}: {}",
                String::from_utf8_lossy(&reply)
            ))),
        }
    }

    /// The link to `node`, made if there is none or the old one closed.
    fn link(&self, node: &str) -> Arc<Link> {
        let mut links = self.links.lock().unwrap();
        let stale = links
            .get(node)
            .is_some_and(|link| link.connection.get().is_some_and(|connection| connection.is_closed()));
        if stale {
            links.remove(node);
        }
        let link = links
            .entry(node.to_string())
            .or_insert_with(|| {
                Arc::new(Link {
                    node: node.to_string(),
                    connection: OnceCell::new(),
                    users: AtomicUsize::new(0),
                    in_flight: AtomicUsize::new(0),
                    last_used: Mutex::new(Instant::now()),
                })
            })
            .clone();
        link.users.fetch_add(1, Ordering::SeqCst);
        link
    }

    fn drop_link(&self, node: &str, link: &Arc<Link>) {
        let mut links = self.links.lock().unwrap();
        if links.get(node).is_some_and(|current| Arc::ptr_eq(current, link)) {
            links.remove(node);
        }
    }

    /// Closes links to nodes no longer healthy and links idle too long.
    /// Each close is independent: one failing does not stop the others.
    pub fn sweep(&self) {
        let doomed: Vec<(Arc<Link>, &'static str)> = {
            let mut links = self.links.lock().unwrap();
            let mut doomed = Vec::new();
            links.retain(|node, link| {
                let down = self
                    .registry
                    .node(node)
                    .is_none_or(|entry| !entry.healthy || entry.gossip == Some(Liveness::Down));
                let idle = link.users.load(Ordering::SeqCst) == 0
                    && link.last_used.lock().unwrap().elapsed() >= self.limits.idle_close;
                let closed = link.connection.get().is_some_and(|connection| connection.is_closed());
                let reason = if down {
                    "the node is down"
                } else if idle {
                    "idle"
                } else if closed {
                    "closed"
                } else {
                    return true;
                };
                doomed.push((link.clone(), reason));
                false
            });
            doomed
        };
        for (link, reason) in doomed {
            if let Some(connection) = link.connection.get() {
                connection.close();
                self.counters.closed.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(node = %link.node, reason, "connect: link closed");
        }
    }

    /// Sweeps on every registry change and every second until `shutdown`,
    /// then closes every link.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut seen = self.registry.last_changed();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = self.registry.wait_for_change(seen, Duration::from_secs(1)) => seen = changed,
            }
            self.sweep();
        }
        let links: Vec<Arc<Link>> = self.links.lock().unwrap().drain().map(|(_, link)| link).collect();
        for link in links {
            if let Some(connection) = link.connection.get() {
                connection.close();
            }
        }
    }
}

/// Decrements the counter when dropped.
fn release_on_drop(counter: &AtomicUsize) -> impl Drop + '_ {
    struct Release<'a>(&'a AtomicUsize);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Release(counter)
}

/// The server side: runs a call from a peer on this node's role.
pub async fn serve_call(manager: &Weak<RoleManager>, payload: &[u8]) -> (u8, Vec<u8>) {
    let error = |error: HostError| {
        (
            ROLE_ERROR,
            postcard::to_allocvec(&WireError::from_host(&error)).unwrap_or_default(),
        )
    };
    let call: WireCall = match postcard::from_bytes(payload) {
        Ok(call) => call,
        Err(problem) => return error(HostError::Invalid(format!("the role call does not decode: {problem}"))),
    };
    let Some(manager) = manager.upgrade() else {
        return error(HostError::Unavailable("the host is shutting down".into()));
    };
    let request = Request {
        method: call.method,
        path: call.path,
        query: call.query,
        headers: call.headers,
        body: call.body,
    };
    match manager.request(&call.role, request).await {
        Ok(response) => {
            let wire = WireResponse {
                status: response.status,
                headers: response.headers,
                body: response.body,
            };
            (ROLE_REPLY, postcard::to_allocvec(&wire).unwrap_or_default())
        }
        Err(problem) => error(problem.to_host_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    use bytes::Bytes;
    use tokio::net::TcpListener;

    use crate::membership::{GossipId, GossipMember, GossipView};
    use crate::quorum::{MemberRecord, NodeAddress, NodeHealth};
    use crate::registry::RegistryInputs;
    use crate::transport::{ClusterCa, FrameHandler, Isolation, Peer, TransportCounters, serve};

    const PEER: crate::quorum::NodeId = 2;

    /// Answers role `slow` never, any other role with its name.
    struct Roles;

    #[async_trait::async_trait]
    impl FrameHandler for Roles {
        async fn handle(&self, _peer: &Peer, _kind: u8, payload: Bytes) -> (u8, Vec<u8>) {
            let call: WireCall = postcard::from_bytes(&payload).unwrap();
            if call.role == "slow" {
                std::future::pending::<()>().await;
            }
            let response = WireResponse {
                status: 200,
                headers: vec![],
                body: call.role.into_bytes(),
            };
            (ROLE_REPLY, postcard::to_allocvec(&response).unwrap())
        }
    }

    fn inputs(transport: &str, health: NodeHealth) -> RegistryInputs {
        RegistryInputs {
            members: BTreeMap::from([
                (1, MemberRecord::default()),
                (
                    PEER,
                    MemberRecord {
                        health,
                        ..MemberRecord::default()
                    },
                ),
            ]),
            addresses: BTreeMap::from([(
                PEER,
                NodeAddress {
                    name: "peer".into(),
                    transport: transport.into(),
                    api: String::new(),
                },
            )]),
            voters: BTreeSet::from([1, PEER]),
            gossip: Arc::new(GossipView {
                members: vec![GossipMember {
                    id: GossipId {
                        node: PEER,
                        addr: transport.parse().unwrap(),
                        generation: 1,
                    },
                    liveness: Liveness::Alive,
                }],
                ..GossipView::default()
            }),
            local_roles: vec![],
            removed: Default::default(),
        }
    }

    /// A peer serving role calls, and a connect layer on node 1 that
    /// knows it as healthy.
    async fn setup(limits: ConnectLimits) -> (Arc<Connect>, Arc<Registry>, String, CancellationToken) {
        let ca = ClusterCa::generate("test").unwrap();
        let server_identity = ca.issue("peer").unwrap();
        let client_identity = ca.issue("me").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let transport = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            server_identity.acceptor().unwrap(),
            Arc::new(Roles),
            Arc::new(TransportCounters::default()),
            Isolation::default(),
            shutdown.clone(),
        ));
        let registry = Arc::new(Registry::new(
            1,
            NodeAddress {
                name: "me".into(),
                ..NodeAddress::default()
            },
        ));
        registry.update(&inputs(&transport, NodeHealth::Alive));
        let connect = Connect::new(registry.clone(), client_identity.connector().unwrap(), limits);
        (connect, registry, transport, shutdown)
    }

    fn request() -> Request {
        Request {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            body: vec![],
        }
    }

    fn limits() -> ConnectLimits {
        ConnectLimits {
            call_timeout: Duration::from_secs(30),
            max_in_flight: 4,
            idle_close: Duration::from_millis(100),
        }
    }

    /// Concurrent calls to one peer share one connection.
    #[tokio::test]
    async fn concurrent_calls_share_one_connection() {
        let (connect, _registry, _, _shutdown) = setup(limits()).await;
        let peer = crate::quorum::hex_id(PEER);
        let calls = (0..4).map(|_| connect.call(&peer, "echo", request()));
        for response in futures::future::join_all(calls).await {
            assert_eq!(response.unwrap().body, b"echo");
        }
        assert_eq!(connect.counters.opened.load(Ordering::Relaxed), 1);
        assert_eq!(connect.open_links(), 1);
    }

    /// When the registry stops holding the peer healthy, a call waiting on
    /// it fails at once with the connection's closing, long before its
    /// timeout; later calls are refused without dialing.
    #[tokio::test]
    async fn a_peer_declared_down_fails_calls_in_flight_at_once() {
        let (connect, registry, transport, _shutdown) = setup(limits()).await;
        tokio::spawn(connect.clone().maintain(CancellationToken::new()));
        let peer = crate::quorum::hex_id(PEER);
        let waiting = {
            let (connect, peer) = (connect.clone(), peer.clone());
            tokio::spawn(async move { connect.call(&peer, "slow", request()).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        registry.update(&inputs(&transport, NodeHealth::Failed));
        let failed = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the call waited for its timeout")
            .unwrap();
        match failed {
            Err(HostError::Unavailable(message)) => assert!(message.contains("closed"), "{message}"),
            other => panic!("{other:?}"),
        }
        match connect.call(&peer, "echo", request()).await {
            Err(HostError::Unavailable(message)) => assert!(message.contains("down"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(connect.counters.opened.load(Ordering::Relaxed), 1);
    }

    /// Calls past the in-flight bound are refused as overloaded, not queued.
    #[tokio::test]
    async fn calls_past_the_bound_are_refused() {
        let (connect, _registry, _, _shutdown) = setup(limits()).await;
        let peer = crate::quorum::hex_id(PEER);
        let mut slow = Vec::new();
        for _ in 0..4 {
            let (connect, peer) = (connect.clone(), peer.clone());
            slow.push(tokio::spawn(
                async move { connect.call(&peer, "slow", request()).await },
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        match connect.call(&peer, "echo", request()).await {
            Err(HostError::Overloaded(_)) => {}
            other => panic!("{other:?}"),
        }
        for call in slow {
            call.abort();
        }
    }

    /// A link nobody used for `idle_close` is closed; the next call opens
    /// a new one.
    #[tokio::test]
    async fn an_idle_link_is_closed() {
        let (connect, _registry, _, _shutdown) = setup(limits()).await;
        let peer = crate::quorum::hex_id(PEER);
        connect.call(&peer, "echo", request()).await.unwrap();
        connect.sweep();
        assert_eq!(connect.open_links(), 1, "a link in recent use stays");
        tokio::time::sleep(Duration::from_millis(150)).await;
        connect.sweep();
        assert_eq!(connect.open_links(), 0);
        assert_eq!(connect.counters.closed.load(Ordering::Relaxed), 1);
        connect.call(&peer, "echo", request()).await.unwrap();
        assert_eq!(connect.counters.opened.load(Ordering::Relaxed), 2);
    }
}
