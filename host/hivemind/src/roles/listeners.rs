//! Host-owned listeners: UDP sockets and TCP listeners whose messages go to
//! the role's `on-packet`. A socket belongs to the role's slot, not to a
//! version, so reloading a role never unbinds its port: messages that arrive
//! during a reload are handled by whichever version is current.
//!
//! A UDP listener is served by a thread of its own, calling the role
//! directly: no task per datagram, no hop between runtime threads, and when
//! the role is busy the kernel's socket buffer queues (and past it drops)
//! datagrams, as for any UDP server. The buffer is sized for a burst
//! ([`UDP_RECEIVE_BUFFER`]): a thread that loses its CPU for a moment (a
//! busy machine, a reload's compile beside it) finds the datagrams that
//! came meanwhile still queued. It takes queued datagrams in batches
//! (`recvmmsg`), answers each, and sends the batch's replies in one call
//! (`sendmmsg`). A reply the role marked reusable (`keep-reply`) answers
//! repeats of its datagram without a call (`kept.rs`). It wakes every
//! [`UDP_POLL`] to notice that it should stop.
//!
//! TCP carries messages framed as in DNS over TCP (RFC 1035 4.2.2): a
//! two-byte big-endian length, then the message. A connection's messages
//! are answered in order; an idle connection is closed after
//! [`TCP_IDLE_TIMEOUT`] (RFC 7766 asks servers to close idle ones).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hivemind_core::slots::{Slot, Slots};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::roles::kept::KeptReplies;
use crate::roles::manager::{RoleManager, RoleSlot};
use hivemind_runtime::PacketReply;
use hivemind_runtime::manifest::{ListenerProtocol, ListenerSpec};

/// Largest datagram read; anything bigger is truncated by the kernel anyway.
const MAX_DATAGRAM: usize = 65_535;
/// A UDP listener's receive buffer: at 20,000 small datagrams a second
/// (a kernel counts about 1 KiB for each) about 200 ms of them, where
/// Linux's default of 208 KiB holds about 10 ms. Set past
/// `net.core.rmem_max` when the host may (CAP_NET_ADMIN), else up to it.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;
/// How long a UDP thread blocks in one receive before it checks whether it
/// should stop.
const UDP_POLL: Duration = Duration::from_millis(100);
/// A TCP connection with no complete message for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections served at once per listener: a sixteenth of the
/// descriptor limit, at least 16, at most 256. At the bound the connection
/// idle the longest is closed to let the next client in (RFC 7766
/// §6.2.3); while all are busy, more wait in the backlog.
fn tcp_connection_slots() -> Slots {
    Slots::new(hivemind_core::limits::connection_cap(16, 16, 256))
}

/// A bound socket, shared between the versions of a role that want it.
#[derive(Clone)]
pub(crate) enum Socket {
    Udp(Arc<std::net::UdpSocket>),
    /// The listener and its bound on connections served at once, shared by
    /// every version so a reload does not raise it.
    Tcp(Arc<TcpListener>, Slots),
}

impl Socket {
    fn protocol(&self) -> ListenerProtocol {
        match self {
            Socket::Udp(_) => ListenerProtocol::Udp,
            Socket::Tcp(..) => ListenerProtocol::Tcp,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Socket::Udp(socket) => socket.local_addr(),
            Socket::Tcp(listener, _) => listener.local_addr(),
        }
    }

    async fn bind(spec: &ListenerSpec) -> Result<Socket, BindFailure> {
        let bound = match spec.protocol {
            ListenerProtocol::Udp => std::net::UdpSocket::bind(spec.address).and_then(|socket| {
                socket.set_read_timeout(Some(UDP_POLL))?;
                size_receive_buffer(&socket, &spec.name);
                Ok(Socket::Udp(Arc::new(socket)))
            }),
            ListenerProtocol::Tcp => TcpListener::bind(spec.address)
                .await
                .map(|listener| Socket::Tcp(Arc::new(listener), tcp_connection_slots())),
        };
        bound.map_err(|error| BindFailure {
            message: format!(
                "listener {:?}: cannot bind {} {}: {error}; the host tries again while the version waits",
                spec.name,
                spec.protocol.as_str(),
                spec.address
            ),
            spec: spec.clone(),
        })
    }
}

/// A listener a version needs could not be bound (the port is taken, most
/// often): the version is rejected, and the manager tries again once
/// [`can_bind`] says the address is free.
#[derive(Debug)]
pub(crate) struct BindFailure {
    pub(crate) spec: ListenerSpec,
    pub(crate) message: String,
}

/// Whether `spec`'s address can be bound now; the socket is closed again.
pub(crate) async fn can_bind(spec: &ListenerSpec) -> bool {
    Socket::bind(spec).await.is_ok()
}

/// Gives `socket` a receive buffer of [`UDP_RECEIVE_BUFFER`], or as much
/// of it as the system allows (and says so once the buffer is smaller).
fn size_receive_buffer(socket: &std::net::UdpSocket, listener: &str) {
    use std::os::fd::AsRawFd;
    let size = UDP_RECEIVE_BUFFER as libc::c_int;
    // SAFETY: setsockopt reads an int of the given length from `size`.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    let socket = socket2::SockRef::from(socket);
    if !forced {
        let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    }
    // Linux reports twice the size asked for (the rest is its bookkeeping).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_RECEIVE_BUFFER {
        tracing::info!(
            listener,
            granted_kib = granted >> 10,
            wanted_kib = UDP_RECEIVE_BUFFER >> 10,
            "a udp listener's receive buffer is smaller than wanted: raise net.core.rmem_max (sysctl) so bursts \
             are queued, not dropped"
        );
    }
}

pub struct Listener {
    pub name: String,
    /// The address asked for in the manifest.
    pub address: SocketAddr,
    /// The address bound (differs when the manifest asked for port 0).
    pub local_addr: SocketAddr,
    socket: Socket,
    task: Option<JoinHandle<()>>,
    /// Tells a UDP listener's thread to stop.
    stop: Arc<AtomicBool>,
}

impl Listener {
    pub fn protocol(&self) -> ListenerProtocol {
        self.socket.protocol()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What [`prepare`] bound or kept: name, address asked for, socket.
pub(crate) type Prepared = Vec<(String, SocketAddr, Socket)>;

/// The sockets a version with `specs` needs: existing ones are reused, new
/// ones are bound now. Nothing is closed or started until [`commit`].
pub(crate) async fn prepare(slot: &RoleSlot, specs: &[ListenerSpec]) -> Result<Prepared, BindFailure> {
    let existing: Vec<(SocketAddr, Socket)> = RoleManager::slot_listeners(slot)
        .iter()
        .map(|listener| (listener.address, listener.socket.clone()))
        .collect();
    let mut prepared = Vec::new();
    for spec in specs {
        let reused = existing
            .iter()
            .find(|(address, socket)| *address == spec.address && socket.protocol() == spec.protocol);
        let socket = match reused {
            Some((_, socket)) => socket.clone(),
            None => Socket::bind(spec).await?,
        };
        prepared.push((spec.name.clone(), spec.address, socket));
    }
    Ok(prepared)
}

/// Makes `prepared` the slot's listeners: sockets no longer wanted close,
/// each kept socket gets a task that dispatches to the slot.
pub(crate) fn commit(slot: &Arc<RoleSlot>, prepared: Prepared) {
    let mut listeners = RoleManager::slot_listeners(slot);
    let mut next = Vec::with_capacity(prepared.len());
    for (name, address, socket) in prepared {
        let local_addr = socket.local_addr().unwrap_or(address);
        let stop = Arc::new(AtomicBool::new(false));
        let task = match &socket {
            Socket::Udp(udp) => {
                let (slot, name, udp, stop) = (slot.clone(), name.clone().into(), udp.clone(), stop.clone());
                let runtime = tokio::runtime::Handle::current();
                // Counted by the slot's tracker, so shutting the role down
                // waits until the thread has left its last call.
                let tracked = slot.tracker.token();
                let spawned = std::thread::Builder::new()
                    .name(format!("udp-{}", slot.name))
                    .spawn(move || {
                        serve_datagrams(&slot, name, &udp, &stop, &runtime);
                        drop(tracked);
                    });
                if let Err(error) = spawned {
                    tracing::error!(%error, %address, "cannot start the thread of a udp listener");
                }
                None
            }
            Socket::Tcp(tcp, connections) => {
                Some(
                    slot.tracker
                        .spawn(accept(slot.clone(), name.clone(), tcp.clone(), connections.clone())),
                )
            }
        };
        next.push(Listener {
            name,
            address,
            local_addr,
            socket,
            task,
            stop,
        });
    }
    // Dropping the old entries aborts their tasks; sockets shared with the
    // new entries stay open through their other `Arc`.
    *listeners = next;
}

/// Reads datagrams and hands each to the serving version of the role,
/// one at a time, until `stop` is set or the host shuts down. A datagram
/// the role let the host answer before (`keep-reply`) is answered from
/// [`KeptReplies`] without a call.
fn serve_datagrams(
    slot: &RoleSlot,
    name: Arc<str>,
    socket: &std::net::UdpSocket,
    stop: &AtomicBool,
    runtime: &tokio::runtime::Handle,
) {
    // Inside the runtime's context, host calls that need its timers or
    // sockets work; a plain executor per call is cheaper than the runtime's
    // `block_on`, which sets up a scheduler context each time.
    let _context = runtime.enter();
    let mut datagrams = Datagrams::new();
    let mut replies = Replies::default();
    let mut kept = KeptReplies::default();
    let mut peer_text = String::with_capacity(48);
    let mut batches: u32 = 0;
    loop {
        // The shutdown token takes a lock to read; under load every 64th
        // batch is soon enough, and an idle socket's timeout looks at once.
        batches = batches.wrapping_add(1);
        if stop.load(Ordering::Relaxed) || (batches.is_multiple_of(64) && slot.shutdown.is_cancelled()) {
            break;
        }
        let received = match datagrams.receive(socket) {
            Ok(received) => received,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                kept.tally_now_and_then();
                if slot.shutdown.is_cancelled() {
                    break;
                }
                continue;
            }
            Err(error) => {
                // Unexpected: keep serving, without spinning if it persists.
                tracing::debug!(role = %slot.name, listener = %name, %error, "udp receive error");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Paused, disabled or failed: no answers, kept ones included.
        let Some(role) = slot.serving() else { continue };
        replies.clear();
        for index in 0..received {
            let generation = kept.follow(&role);
            let data = datagrams.datagram(index);
            if kept.answer(data, &mut replies.bytes) {
                replies.written(index);
                continue;
            }
            let Some(peer) = datagrams.sender(index) else {
                continue;
            };
            write_peer(&mut peer_text, peer);
            match futures::executor::block_on(role.on_packet(&name, &peer_text, data)) {
                Ok(PacketReply {
                    reply: Some(reply),
                    keep,
                }) => {
                    if let Some(keep) = keep {
                        kept.keep(&role, generation, data, &reply, keep);
                    }
                    replies.bytes.extend_from_slice(&reply);
                    replies.written(index);
                }
                Ok(PacketReply { reply: None, .. }) => {}
                Err(error) => tracing::debug!(role = role.name(), %peer, %error, "datagram dropped"),
            }
        }
        replies.send(socket, &datagrams);
        kept.tally_now_and_then();
    }
}

/// Datagrams taken from the socket, and replies sent, per system call.
const BATCH: usize = 32;

/// Buffers and addresses for `recvmmsg(2)`: under load one system call
/// takes up to [`BATCH`] datagrams, where `recv_from` costs a call each.
/// The headers are built once and point into the buffers, iovecs and
/// addresses, which are boxed and never move.
struct Datagrams {
    buffers: Vec<Vec<u8>>,
    /// Receive headers, one per buffer.
    headers: Box<[libc::mmsghdr; BATCH]>,
    /// Held for the headers, which point into them.
    _iovecs: Box<[libc::iovec; BATCH]>,
    peers: Box<[libc::sockaddr_storage; BATCH]>,
}

/// A batch's replies for one `sendmmsg(2)`: their bytes end to end, where
/// each ends with the index of the datagram it answers, and the headers
/// and iovecs of the call (kept, so a batch allocates nothing).
#[derive(Default)]
struct Replies {
    bytes: Vec<u8>,
    ends: Vec<(usize, usize)>,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
}

impl Datagrams {
    fn new() -> Datagrams {
        let mut buffers: Vec<Vec<u8>> = (0..BATCH)
            // Zeroed allocations: a page is touched only when a datagram
            // reaches it, so small datagrams cost little memory.
            .map(|_| vec![0u8; MAX_DATAGRAM])
            .collect();
        let mut iovecs: Box<[libc::iovec; BATCH]> = Box::new(std::array::from_fn(|index| libc::iovec {
            iov_base: buffers[index].as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        }));
        // SAFETY: sockaddr_storage is plain bytes; all zeroes is valid.
        let mut peers: Box<[libc::sockaddr_storage; BATCH]> = Box::new(unsafe { std::mem::zeroed() });
        let headers = Box::new(std::array::from_fn(|index| {
            message_header(&mut peers[index], PEER_STORAGE, &mut iovecs[index])
        }));
        Datagrams {
            buffers,
            headers,
            _iovecs: iovecs,
            peers,
        }
    }

    /// Waits (up to the socket's read timeout) for a datagram and takes
    /// those already queued behind it, up to [`BATCH`]; returns how many.
    fn receive(&mut self, socket: &std::net::UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        for header in self.headers.iter_mut() {
            // The kernel writes each sender's true length here.
            header.msg_hdr.msg_namelen = PEER_STORAGE;
        }
        // SAFETY: each header points at a buffer, an iovec and an address
        // owned by `self` (boxed, so they stay put), with their true sizes.
        let count = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if count < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(count as usize)
    }

    /// The `index`th datagram received.
    fn datagram(&self, index: usize) -> &[u8] {
        &self.buffers[index][..self.headers[index].msg_len as usize]
    }

    /// The sender of the `index`th datagram; `None` if not an IP address.
    fn sender(&self, index: usize) -> Option<SocketAddr> {
        let mut storage = socket2::SockAddrStorage::zeroed();
        // SAFETY: the storage is a sockaddr_storage, and the kernel wrote
        // `msg_namelen` bytes of a socket address into ours.
        let peer = unsafe {
            *storage.view_as::<libc::sockaddr_storage>() = self.peers[index];
            socket2::SockAddr::new(storage, self.headers[index].msg_hdr.msg_namelen)
        };
        peer.as_socket()
    }
}

impl Replies {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Marks the bytes appended to `bytes` since the last reply as the
    /// reply to the `index`th datagram.
    fn written(&mut self, index: usize) {
        self.ends.push((index, self.bytes.len()));
    }

    /// Sends each reply to the sender of its datagram in `datagrams`. A
    /// reply the kernel refuses is dropped, as a lone `send_to` would drop
    /// it, and the rest still go.
    fn send(&mut self, socket: &std::net::UdpSocket, datagrams: &Datagrams) {
        use std::os::fd::AsRawFd;
        self.iovecs.clear();
        self.headers.clear();
        let mut start = 0;
        for (_, end) in &self.ends {
            self.iovecs.push(libc::iovec {
                // sendmmsg only reads through it; the C type is mutable.
                iov_base: self.bytes[start..].as_ptr().cast_mut().cast(),
                iov_len: end - start,
            });
            start = *end;
        }
        for ((index, _), iovec) in self.ends.iter().zip(self.iovecs.iter_mut()) {
            // sendmmsg only reads the address; the C type is mutable.
            let peer = (&datagrams.peers[*index] as *const libc::sockaddr_storage).cast_mut();
            let peer_length = datagrams.headers[*index].msg_hdr.msg_namelen;
            self.headers.push(message_header(peer, peer_length, iovec));
        }
        let mut sent = 0;
        while sent < self.headers.len() {
            // SAFETY: each header points at reply bytes, an iovec and an
            // address that outlive the call, with their true sizes.
            let count = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.headers[sent..].as_mut_ptr(),
                    (self.headers.len() - sent) as libc::c_uint,
                    0,
                )
            };
            if count > 0 {
                sent += count as usize;
            } else {
                let error = std::io::Error::last_os_error();
                let peer = datagrams.sender(self.ends[sent].0);
                tracing::debug!(?peer, %error, "udp reply not sent");
                sent += 1;
            }
        }
    }
}

/// Room for any sender's address.
const PEER_STORAGE: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// A one-buffer message to or from `peer` (`peer_length` bytes of it).
fn message_header(
    peer: *mut libc::sockaddr_storage,
    peer_length: libc::socklen_t,
    iovec: &mut libc::iovec,
) -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain data; the fields that matter are set below.
    let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
    header.msg_hdr.msg_name = peer.cast();
    header.msg_hdr.msg_namelen = peer_length;
    header.msg_hdr.msg_iov = iovec;
    header.msg_hdr.msg_iovlen = 1;
    header
}

/// `peer` as `IP:PORT` into `text`. IPv4 is written by hand: going
/// through `Display` cost about 2% of a DNS query.
fn write_peer(text: &mut String, peer: SocketAddr) {
    fn push_number(text: &mut String, mut number: u16) {
        let mut digits = [0u8; 5];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (number % 10) as u8;
            number /= 10;
            if number == 0 {
                break;
            }
        }
        text.extend(digits[start..].iter().map(|&digit| digit as char));
    }
    text.clear();
    match peer {
        SocketAddr::V4(v4) => {
            for (index, octet) in v4.ip().octets().into_iter().enumerate() {
                if index > 0 {
                    text.push('.');
                }
                push_number(text, octet as u16);
            }
            text.push(':');
            push_number(text, v4.port());
        }
        SocketAddr::V6(_) => {
            use std::fmt::Write as _;
            let _ = write!(text, "{peer}");
        }
    }
}

async fn accept(slot: Arc<RoleSlot>, name: String, listener: Arc<TcpListener>, connections: Slots) {
    let name: Arc<str> = name.into();
    loop {
        let place = tokio::select! {
            _ = slot.shutdown.cancelled() => return,
            place = connections.acquire() => place,
        };
        let accepted = tokio::select! {
            _ = slot.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let slot_for_task = slot.clone();
                let name = name.clone();
                slot.tracker.spawn(async move {
                    serve_connection(&slot_for_task, &name, stream, peer, &place).await;
                });
            }
            Err(error) => {
                // Out of descriptors and the like: make room by closing an
                // idle connection, and pause instead of spinning.
                if hivemind_core::limits::is_local_shortage(&error) {
                    connections.shed_idlest();
                }
                tracing::warn!(role = %slot.name, listener = %name, %error, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers length-prefixed messages on one connection until the peer closes
/// it, it idles past [`TCP_IDLE_TIMEOUT`], the role stops, or the listener
/// needs its place for a new client while it waits for a message.
async fn serve_connection(slot: &Arc<RoleSlot>, name: &str, mut stream: TcpStream, peer: SocketAddr, place: &Slot) {
    let _ = stream.set_nodelay(true);
    let peer_text = format!("tcp://{peer}");
    let mut message = Vec::new();
    loop {
        let read = async {
            let length = stream.read_u16().await? as usize;
            message.resize(length, 0);
            stream.read_exact(&mut message).await?;
            std::io::Result::Ok(())
        };
        let read = tokio::select! {
            _ = slot.shutdown.cancelled() => return,
            _ = place.asked_to_close() => return,
            read = tokio::time::timeout(TCP_IDLE_TIMEOUT, read) => read,
        };
        if !matches!(read, Ok(Ok(()))) {
            return;
        }
        let _busy = place.busy();
        let Some(role) = slot.serving() else { return };
        // Kept replies serve datagrams only: each TCP message is the role's.
        let reply = match role.on_packet(name, &peer_text, &message).await {
            Ok(PacketReply { reply: Some(reply), .. }) => reply,
            // No answer for this message: like a dropped datagram, the
            // connection closes so the client does not wait forever.
            Ok(PacketReply { reply: None, .. }) => return,
            Err(error) => {
                tracing::debug!(role = role.name(), %peer, %error, "tcp message dropped");
                return;
            }
        };
        let Ok(length) = u16::try_from(reply.len()) else {
            tracing::debug!(role = role.name(), %peer, bytes = reply.len(), "tcp reply too long to frame");
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written peer text is what `Display` writes.
    #[test]
    fn peer_text_matches_display() {
        let mut text = String::new();
        for peer in [
            "127.0.0.1:53",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:8600",
            "[::1]:5353",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            write_peer(&mut text, peer);
            assert_eq!(text, peer.to_string());
        }
    }

    /// A burst of 2,000 DNS-sized datagrams that arrives while the serving
    /// thread is off the CPU stays queued whole (Linux's default buffer
    /// holds about 200 of them).
    #[tokio::test]
    async fn a_udp_listener_queues_a_burst_while_no_one_reads() {
        let spec = ListenerSpec {
            name: "udp".into(),
            protocol: ListenerProtocol::Udp,
            address: "127.0.0.1:0".parse().unwrap(),
        };
        let Socket::Udp(listener) = Socket::bind(&spec).await.unwrap() else {
            panic!("a udp socket");
        };
        let address = listener.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        const BURST: usize = 2000;
        for index in 0..BURST {
            sender.send_to(&[index as u8; 60], address).unwrap();
        }
        listener.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buffer = [0u8; 512];
        let mut queued = 0;
        while listener.recv_from(&mut buffer).is_ok() {
            queued += 1;
        }
        assert_eq!(queued, BURST, "datagrams dropped by a full receive buffer");
    }
}
