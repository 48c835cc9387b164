//! A bridge's data path: accept a client, connect it to the committed
//! active backend, copy both ways, and sever the session when the route
//! moves away from its backend or routing goes off.
//!
//! The route is a `watch` the bridge's follower updates from the log; a
//! session reads it at accept and then waits for changes beside its copy,
//! so every session of a backend is severed as soon as the committed
//! change is applied on this node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use std::os::fd::{AsRawFd, FromRawFd};

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::busy_poll;
use super::config::BridgeConfig;
use super::relay::{self, relay};

/// Where new sessions go, as this node's bridge sees it now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Route {
    /// Routing on, and this node may route (not cut off with `when_isolated = "stop"`).
    pub enabled: bool,
    /// Why routing is off, or why there is no backend, in words.
    pub reason: String,
    /// The committed active backend: name and address.
    pub backend: Option<(String, String)>,
    /// Drained backends: their sessions finish on their own.
    pub draining: BTreeSet<String>,
}

impl Route {
    /// Whether new clients are taken: routing on and a backend to route to.
    pub fn serving(&self) -> bool {
        self.enabled && self.backend.is_some()
    }

    /// Whether a session to `backend` may go on under this route.
    fn keeps(&self, backend: &str) -> bool {
        self.enabled
            && (self.backend.as_ref().is_some_and(|(name, _)| name == backend) || self.draining.contains(backend))
    }
}

/// One backend's session and byte counts on this node.
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub current: AtomicU64,
    pub total: AtomicU64,
    pub severed: AtomicU64,
    pub connect_failures: AtomicU64,
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendCountersView {
    pub current: u64,
    pub total: u64,
    pub severed: u64,
    pub connect_failures: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
}

impl BackendCounters {
    pub fn view(&self) -> BackendCountersView {
        BackendCountersView {
            current: self.current.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            severed: self.severed.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            bytes_to_backend: self.to_backend.load(Ordering::Relaxed),
            bytes_to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// A bridge's counters on this node.
#[derive(Debug, Default)]
pub struct BridgeCounters {
    /// Clients closed at once: routing off or no backend.
    pub refused: AtomicU64,
    /// Times this node's route moved to another backend (or to none).
    pub backend_changes: AtomicU64,
    pub backends: BTreeMap<String, BackendCounters>,
    /// Clients accepted whose session has not ended (connecting included).
    pub open: AtomicU64,
    /// Sessions served at once; at this many the bridge stops accepting.
    pub max_sessions: u64,
    /// Times a thread stopped accepting because `max_sessions` were open.
    pub full: AtomicU64,
    /// Woken when a session ends while the bridge is full.
    ended: tokio::sync::Notify,
}

/// One accepted client's place among `max_sessions`, given back on drop.
struct OpenSession(Arc<BridgeCounters>);

impl OpenSession {
    /// A place if fewer than `max_sessions` are taken: reserved before the
    /// accept, so threads accepting at once cannot overshoot the bound.
    fn reserve(counters: &Arc<BridgeCounters>) -> Option<OpenSession> {
        counters
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < counters.max_sessions).then_some(open + 1)
            })
            .ok()
            .map(|_| OpenSession(counters.clone()))
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let counters = &self.0;
        // Only a full bridge has a thread waiting: the common case costs
        // one atomic operation.
        if counters.open.fetch_sub(1, Ordering::Relaxed) >= counters.max_sessions {
            counters.ended.notify_waiters();
        }
    }
}

impl BridgeCounters {
    /// Waits while `max_sessions` sessions are open (or until `shutdown`).
    async fn room(&self, shutdown: &CancellationToken) {
        if self.open.load(Ordering::Relaxed) < self.max_sessions {
            return;
        }
        self.full.fetch_add(1, Ordering::Relaxed);
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.open.load(Ordering::Relaxed) < self.max_sessions {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ended => {}
            }
        }
    }
}

impl BridgeCounters {
    pub fn new(config: &BridgeConfig) -> BridgeCounters {
        BridgeCounters {
            refused: AtomicU64::new(0),
            backend_changes: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max_sessions: config.max_sessions.unwrap_or_else(super::config::default_max_sessions) as u64,
            full: AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
            backends: config
                .backends
                .iter()
                .map(|backend| (backend.name.clone(), BackendCounters::default()))
                .collect(),
        }
    }
}

/// The threads sessions run on: one single-threaded runtime per core,
/// each with its own reactor and its own listening socket per bridge. A
/// session's sockets stay on the thread that accepted it, so its wake-ups
/// never cross to another (a work-stealing pool wakes idle workers for
/// every ready socket, which costs more than the copy itself for small
/// messages). HAProxy's `nbthread` with `shards` works the same way.
pub struct DataPlane {
    threads: Vec<tokio::runtime::Handle>,
}

impl DataPlane {
    /// Starts `count` threads, each polling for `busy_poll` after its last
    /// I/O before it sleeps (see [`busy_poll`]); they stop at `shutdown`,
    /// and the returned task ends once they all have.
    pub fn start(
        count: usize,
        busy_poll: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(DataPlane, tokio::task::JoinHandle<()>)> {
        let mut stopped = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(busy_poll::before_park)
                .build()?;
            threads.push(runtime.handle().clone());
            let shutdown = shutdown.clone();
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            stopped.push(finished);
            std::thread::Builder::new()
                .name(format!("bridge-{index}"))
                .spawn(move || {
                    busy_poll::set_window(busy_poll);
                    runtime.block_on(busy_poll::Wakeable(std::pin::pin!(shutdown.cancelled())));
                    // Dropping the runtime ends the sessions still on it.
                    drop(runtime);
                    let _ = done.send(());
                })?;
        }
        // Awaited, not joined: a host that fails to start drops this task
        // without waiting for threads nobody will stop.
        let stopped = tokio::spawn(async move {
            for finished in stopped {
                let _ = finished.await;
            }
        });
        Ok((DataPlane { threads }, stopped))
    }

    /// Accepts clients of a bridge on every thread, each from its own
    /// listening socket (see [`bind_listeners`]), and serves each client
    /// on the thread that accepted it. Stops at `shutdown`.
    pub fn serve(
        &self,
        listeners: Vec<std::net::TcpListener>,
        config: Arc<BridgeConfig>,
        route: watch::Receiver<Route>,
        counters: Arc<BridgeCounters>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        for (thread, listener) in self.threads.iter().zip(listeners) {
            listener.set_nonblocking(true)?;
            let (config, route, counters, shutdown) =
                (config.clone(), route.clone(), counters.clone(), shutdown.clone());
            thread.spawn(async move {
                // SAFETY: the std listener owns its descriptor and always
                // reports that one; the AsyncFd owns it from here.
                match unsafe { AsyncFd::register(listener) } {
                    Ok(listener) => accept_loop(listener, config, route, counters, shutdown).await,
                    Err(error) => tracing::error!(bridge = %config.name, error = %error.into_parts().1, "cannot watch the bridge's listener"),
                }
            });
        }
        Ok(())
    }
}

/// Binds `count` listening sockets to `address` with SO_REUSEPORT, one per
/// data-plane thread: the kernel spreads new clients across them, so a
/// client wakes one thread, where one shared socket woke every thread and
/// all but one found nothing to accept.
///
/// SO_REUSEPORT would also let another process of the same user bind the
/// same port and take a share of the clients without an error. So the
/// address is first bound once without it: a port anyone holds fails
/// there, as a plain bind would.
pub fn bind_listeners(address: std::net::SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket_for = |address: std::net::SocketAddr, shared: bool| -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM.cloexec(),
            Some(socket2::Protocol::TCP),
        )?;
        // As std's bind does: a port whose last connections wait in
        // TIME_WAIT can be listened on again at once.
        socket.set_reuse_address(true)?;
        if shared {
            socket.set_reuse_port(true)?;
            // Accepted clients inherit it (Linux copies the listening
            // socket's options): one system call fewer per client.
            socket.set_tcp_nodelay(true)?;
        }
        socket.bind(&address.into())?;
        Ok(socket)
    };
    let mut address = address;
    if address.port() != 0 {
        drop(socket_for(address, false)?);
    }
    let mut listeners = Vec::new();
    for _ in 0..count.max(1) {
        let socket = socket_for(address, true)?;
        // HAProxy's and the kernel's default backlog.
        socket.listen(1024)?;
        // Port 0: the first socket's port for the rest of the group.
        address = socket.local_addr()?.as_socket().unwrap_or(address);
        listeners.push(socket.into());
    }
    Ok(listeners)
}

/// One pending client, non-blocking from the start.
fn accept(listener: &std::net::TcpListener) -> std::io::Result<std::net::TcpStream> {
    // SAFETY: accept4 on a listening descriptor we own; a non-negative
    // result is a new descriptor owned by the returned stream alone.
    unsafe {
        let descriptor = libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        );
        if descriptor < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::net::TcpStream::from_raw_fd(descriptor))
    }
}

/// Accepts clients until `shutdown` and serves each on this thread.
/// Clients are accepted as plain descriptors and registered once, with
/// this thread's reactor.
async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    config: Arc<BridgeConfig>,
    route: watch::Receiver<Route>,
    counters: Arc<BridgeCounters>,
    shutdown: CancellationToken,
) {
    loop {
        // Full: clients wait in the listen backlog until a session ends.
        counters.room(&shutdown).await;
        let ready = tokio::select! {
            _ = shutdown.cancelled() => return,
            ready = listener.readable() => ready,
        };
        // Another thread may have filled the bridge while this one waited.
        let Some(place) = OpenSession::reserve(&counters) else {
            continue;
        };
        let accepted = match ready {
            Ok(mut ready) => match accept(ready.get_inner()) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    continue;
                }
                accepted => accepted,
            },
            Err(error) => Err(error),
        };
        let client = match accepted {
            Ok(client) => client,
            Err(error) => {
                // Out of descriptors, mostly: wait for sessions to end
                // rather than spin on a listener that stays readable.
                tracing::warn!(bridge = %config.name, %error, "cannot accept a client");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        busy_poll::record_activity();
        let mut session_route = route.clone();
        let current = session_route.borrow_and_update().clone();
        let Some((backend, address)) = current.backend.filter(|_| current.enabled) else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        };
        tokio::spawn(session(
            client,
            backend,
            address,
            config.clone(),
            session_route,
            counters.clone(),
            place,
        ));
    }
}

async fn session(
    client: std::net::TcpStream,
    backend: String,
    address: String,
    config: Arc<BridgeConfig>,
    mut route: watch::Receiver<Route>,
    counters: Arc<BridgeCounters>,
    _place: OpenSession,
) {
    let Some(backend_counters) = counters.backends.get(&backend) else {
        return;
    };
    // Read before the client is registered: bytes that came with it need
    // no readiness event, and ones that come later raise one.
    let early = match relay::Early::read(&client) {
        Ok(early) => early,
        Err(error) => {
            tracing::debug!(bridge = %config.name, %error, "a client failed before its session opened");
            return;
        }
    };
    let early_bytes = early.as_ref().map_or(0, relay::Early::byte_count) as u64;
    let client = match relay::register(client) {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(bridge = %config.name, %error, "cannot register a client");
            return;
        }
    };
    let connected = tokio::select! {
        connected = tokio::time::timeout(config.connect_timeout, relay::connect(&address, early)) => connected,
        // Severed while connecting: the client is closed, nothing was sent.
        _ = severed(&mut route, &backend) => return,
    };
    let upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            backend_counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(bridge = %config.name, %backend, %error, "cannot connect a session");
            return;
        }
        Err(_) => {
            backend_counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(bridge = %config.name, %backend, "connecting a session timed out");
            return;
        }
    };
    backend_counters.to_backend.fetch_add(early_bytes, Ordering::Relaxed);
    backend_counters.total.fetch_add(1, Ordering::Relaxed);
    backend_counters.current.fetch_add(1, Ordering::Relaxed);
    // Polled on every wake-up of the session: the copy first. Shutdown
    // needs no branch here: it drops the thread's runtime, sessions and all.
    tokio::select! {
        biased;
        outcome = relay(&client, &upstream, config.splice, &backend_counters.to_backend, &backend_counters.to_client) => {
            if let Err(error) = outcome {
                tracing::trace!(bridge = %config.name, %backend, %error, "session ended with an error");
            }
        }
        _ = severed(&mut route, &backend) => {
            backend_counters.severed.fetch_add(1, Ordering::Relaxed);
            relay::reset_on_close(&client);
            relay::reset_on_close(&upstream);
        }
    }
    backend_counters.current.fetch_sub(1, Ordering::Relaxed);
}

/// Returns once the route no longer keeps sessions to `backend` (or the
/// bridge is gone).
async fn severed(route: &mut watch::Receiver<Route>, backend: &str) {
    loop {
        if !route.borrow_and_update().keeps(backend) {
            return;
        }
        if route.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every socket of a group listens on one port, the first one's when
    /// the address asks for any port, and each takes clients, which come
    /// with TCP_NODELAY on.
    #[test]
    fn a_group_shares_one_port() {
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let address = listeners[0].local_addr().unwrap();
        assert_ne!(address.port(), 0);
        for listener in &listeners {
            assert_eq!(listener.local_addr().unwrap(), address);
        }
        // The kernel spreads clients by their addresses: enough of them
        // reach every socket.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect();
        for listener in &listeners {
            listener.set_nonblocking(true).unwrap();
            let (accepted, _) = listener.accept().expect("a client on every socket of the group");
            assert!(accepted.nodelay().unwrap(), "an accepted client has TCP_NODELAY");
        }
        drop(clients);
    }

    /// A port another socket holds is refused, whether that socket shares
    /// its port (another group, as another host process would bind) or not.
    #[test]
    fn a_port_in_use_is_refused() {
        let group = bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let taken = group[0].local_addr().unwrap();
        let error = bind_listeners(taken, 2).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error = bind_listeners(plain.local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    }
}
