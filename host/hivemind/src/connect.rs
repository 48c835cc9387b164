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
        let _slot = scopeguard(&link.in_flight);
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
fn scopeguard(counter: &AtomicUsize) -> impl Drop + '_ {
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
