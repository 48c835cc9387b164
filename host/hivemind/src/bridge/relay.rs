//! Copying a bridged session's bytes both ways.
//!
//! Each direction starts with a 16 KiB buffer. When a read fills it, the
//! direction carries bulk data, and with splice on it switches to a pipe:
//! splice(2) moves the bytes socket → pipe → socket inside the kernel and
//! never through user space, which is what lets a proxy keep up with a
//! loopback link (HAProxy's `splice-auto` does the same). Small exchanges
//! stay on the buffer, where a read and a write cost less than two
//! splices, and hold no pipe. Either way each direction ends at its end of stream
//! by half-closing the other side, so a client that shuts down its
//! sending side still gets the rest of the answer; the session is over
//! when both directions are, or at the first error.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::io::{Read, Write};

use tokio::io::unix::AsyncFd;

/// A direction's buffer while bytes are in flight, HAProxy's default
/// `tune.bufsize`; a read that fills it is a sign of bulk data.
const CHUNK: usize = 16 << 10;
/// A bulk session's pipe: the kernel's largest default (pipe-max-size).
/// Pages are taken only for bytes in flight, and a larger pipe means fewer
/// wake-ups per megabyte; if the kernel refuses, the pipe keeps 64 KiB.
const PIPE_SIZE: usize = 1 << 20;

/// A connected socket registered with the reactor, whose readiness the
/// relay clears itself (see [`one_way`]).
pub type Socket = AsyncFd<std::net::TcpStream>;

/// Registers a connected, non-blocking stream with this thread's reactor.
/// Small request/response exchanges must not wait for Nagle, so the stream
/// has TCP_NODELAY already: a bridge's clients inherit it from their
/// listening socket ([`super::proxy::bind_listeners`]), and [`connect`]
/// sets it before connecting.
pub fn register(stream: std::net::TcpStream) -> io::Result<Socket> {
    // SAFETY: the std stream owns its descriptor and always reports that
    // one; the AsyncFd owns the stream until it is dropped.
    unsafe { AsyncFd::register(stream) }.map_err(|error| error.into_parts().1)
}

/// What a client sent before its backend connection was opened, read at
/// accept without waiting, as HAProxy reads a new client: it goes out with
/// the backend's handshake rather than after a readiness event for each
/// side.
pub struct Early {
    buffer: Buffer,
    len: usize,
}

impl Early {
    /// Reads what `client` has sent so far; `None` when nothing came yet
    /// (or its end of stream, which the relay reads again).
    pub fn read(client: &std::net::TcpStream) -> io::Result<Option<Early>> {
        // Dropped unless returned, which gives the buffer back.
        let mut early = Early {
            buffer: Buffer::new(),
            len: 0,
        };
        match early.buffer.fill(client) {
            Ok(len) if len > 0 => {
                early.len = len;
                Ok(Some(early))
            }
            Ok(_) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub fn byte_count(&self) -> usize {
        self.len
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        self.buffer.release();
    }
}

/// Opens a connection to `address` (`HOST:PORT`; a name is resolved),
/// registered with this thread's reactor once, as [`register`] would, and
/// sends it the client's `early` bytes (counted by the caller).
pub async fn connect(address: &str, early: Option<Early>) -> io::Result<Socket> {
    let target = match address.parse::<std::net::SocketAddr>() {
        Ok(target) => target,
        Err(_) => tokio::net::lookup_host(address)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{address} resolves to no address")))?,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if early.is_some() {
        // The handshake's last ACK then waits for the first bytes and goes
        // out with them (HAProxy's `smart-connect`): one packet fewer, and
        // the backend's accept finds the request already there. Failing to
        // set it only costs that packet.
        let _ = socket.set_tcp_quickack(false);
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    let stream = register(socket.into())?;
    let Some(mut early) = early else {
        // Writable means the handshake ended. A refused or failed one also
        // reports the write side closed, and only then is SO_ERROR asked
        // why: a connection that came up costs no extra system call.
        let ready = stream.ready(tokio::io::Interest::WRITABLE).await?;
        if ready.ready().is_write_closed() {
            return Err(stream.get_ref().take_error()?.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionRefused, "the connection closed while opening")
            }));
        }
        drop(ready);
        return Ok(stream);
    };
    // The bytes are written at once: a handshake that already ended (as
    // on loopback, where it ends inside connect) costs no wait for
    // readiness. One still opening refuses the write, and the write is
    // tried again once the socket is writable; a failed handshake fails it.
    let mut pending = early.len;
    match early.buffer.drain(stream.get_ref(), pending) {
        Ok(written) => pending -= written,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
        Err(error) => return Err(error),
    }
    while pending > 0 {
        pending -= stream
            .async_io(tokio::io::Interest::WRITABLE, |socket| {
                early.buffer.drain(socket, pending)
            })
            .await?;
    }
    drop(early);
    // Back to prompt ACKs, or a backend writing small pieces with Nagle on
    // could wait for a delayed one.
    let _ = socket2::SockRef::from(stream.get_ref()).set_tcp_quickack(true);
    Ok(stream)
}

/// Makes the coming close send RST instead of FIN: a severed peer must not
/// take a cut session for a complete answer. A zero linger makes close()
/// reset without blocking.
pub fn reset_on_close(socket: &Socket) {
    let _ = socket2::SockRef::from(socket.get_ref()).set_linger(Some(std::time::Duration::ZERO));
}

/// Copies both ways until both directions ended; counts bytes as they go.
/// The second end of stream is passed on when the caller closes both
/// sockets, which it does next (see [`end_of_stream`]). A session that ends
/// in an error (a reset, most often) is reset on both sides when they
/// close: a backend's reset must not reach the client as a clean end of
/// stream, which would make a truncated answer look complete.
pub async fn relay(
    client: &Socket,
    backend: &Socket,
    splice: bool,
    to_backend: &AtomicU64,
    to_client: &AtomicU64,
) -> io::Result<()> {
    let one_ended = AtomicBool::new(false);
    let copied = tokio::try_join!(
        one_way(client, backend, splice, to_backend, &one_ended),
        one_way(backend, client, splice, to_client, &one_ended),
    );
    if copied.is_err() {
        reset_on_close(client);
        reset_on_close(backend);
    }
    copied.map(|_| ())
}

/// A small exchange's bytes between the read and the write. They are taken
/// from this thread's spares for a read and given back once written: an
/// idle session holds no buffer.
struct Buffer {
    bytes: Option<Box<[u8]>>,
    start: usize,
}

/// A bulk direction's pipe, for splice(2).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    /// Buffers with nothing in flight, kept for the next read on this
    /// thread: no allocation and no zeroing per message.
    static SPARE_BUFFERS: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spares kept per thread (4 MiB); more are freed.
const SPARE_LIMIT: usize = 256;

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds` on success;
        // each is owned by exactly one OwnedFd below.
        let (read, write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure keeps the default size.
        unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int);
        }
        Ok(Pipe { read, write })
    }
}

impl Buffer {
    fn new() -> Buffer {
        Buffer { bytes: None, start: 0 }
    }

    /// Gives an empty buffer back to the thread's spares.
    fn release(&mut self) {
        if let Some(bytes) = self.bytes.take() {
            SPARE_BUFFERS.with_borrow_mut(|spare| {
                if spare.len() < SPARE_LIMIT {
                    spare.push(bytes);
                }
            });
        }
    }

    /// Reads what `from` has (up to a chunk) into the empty buffer; 0 at
    /// end of stream.
    fn fill(&mut self, mut from: &std::net::TcpStream) -> io::Result<usize> {
        self.start = 0;
        let bytes = self.bytes.get_or_insert_with(|| {
            SPARE_BUFFERS
                .with_borrow_mut(Vec::pop)
                .unwrap_or_else(|| vec![0; CHUNK].into_boxed_slice())
        });
        from.read(bytes)
    }

    /// Writes up to `pending` waiting bytes to `to`.
    fn drain(&mut self, mut to: &std::net::TcpStream, pending: usize) -> io::Result<usize> {
        let bytes = self.bytes.as_ref().expect("a filled buffer");
        let written = to.write(&bytes[self.start..self.start + pending])?;
        self.start += written;
        Ok(written)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (they
    // are borrowed from live sockets and pipes); null offsets mean "the
    // current position", as sockets and pipes require.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

/// Passes a direction's end of stream on to `to` by half-closing it, while
/// the other direction still runs. Once both have ended the session closes
/// both sockets, and the close sends the FIN: both were read to their end,
/// so neither close resets.
fn end_of_stream(to: &Socket, one_ended: &AtomicBool) {
    if !one_ended.swap(true, Ordering::Relaxed) {
        // The peer may already be gone; the other direction sees that.
        let _ = to.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

/// One direction. Readiness is cleared on `WouldBlock`, and also after a
/// read into the buffer that did not fill it: that read emptied the
/// socket, so asking again would only return `WouldBlock`, one wasted
/// system call per message (HAProxy skips it the same way). A read that
/// fills the buffer marks bulk data: with splice on, the direction moves to
/// a pipe ([`pump`]) for the rest of the session.
async fn one_way(
    from: &Socket,
    to: &Socket,
    splice: bool,
    counter: &AtomicU64,
    one_ended: &AtomicBool,
) -> io::Result<()> {
    let mut carrier = Buffer::new();
    loop {
        let filled = loop {
            let mut ready = from.readable().await?;
            match carrier.fill(ready.get_inner()) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    carrier.release();
                    ready.clear_ready();
                }
                Err(error) => return Err(error),
                Ok(filled) => {
                    super::busy_poll::record_activity();
                    if filled > 0 && filled < CHUNK {
                        ready.clear_ready();
                    }
                    break filled;
                }
            }
        };
        if filled == 0 {
            carrier.release();
            end_of_stream(to, one_ended);
            return Ok(());
        }
        let mut pending = filled;
        while pending > 0 {
            let mut ready = to.writable().await?;
            match carrier.drain(ready.get_inner(), pending) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(error) => return Err(error),
                Ok(written) => {
                    pending -= written;
                    counter.fetch_add(written as u64, Ordering::Relaxed);
                }
            }
        }
        carrier.release();
        if splice && filled == CHUNK {
            match Pipe::new() {
                Ok(pipe) => return pump(from, to, &pipe, counter, one_ended).await,
                // Out of descriptors: the buffer still works.
                Err(error) => tracing::debug!(%error, "no pipe for a bulk session; copying through a buffer"),
            }
        }
    }
}

/// Moves a bulk direction through a pipe with splice(2), reading and
/// writing as each side allows: bytes keep coming in while earlier ones
/// wait for room on the way out, so neither connection waits for the other
/// (a read-then-write cycle left each idle in turn). A side is tried only
/// while its readiness is set, and readiness is cleared only on
/// `WouldBlock`: a splice may stop short while data remains (the pipe
/// counts slots, not bytes).
async fn pump(from: &Socket, to: &Socket, pipe: &Pipe, counter: &AtomicU64, one_ended: &AtomicBool) -> io::Result<()> {
    use futures::FutureExt;
    let mut in_pipe = 0usize;
    let mut ended = false;
    // A read refused while the pipe held bytes may have met a full pipe
    // rather than an empty socket: reading waits for a write to make room,
    // and the socket's readiness is kept.
    let mut pipe_full = false;
    loop {
        let mut moved = false;
        if !ended
            && !pipe_full
            && in_pipe < PIPE_SIZE
            && let Some(ready) = from.readable().now_or_never()
        {
            let mut ready = ready?;
            match splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE - in_pipe) {
                Ok(0) => ended = true,
                Ok(spliced) => {
                    super::busy_poll::record_activity();
                    in_pipe += spliced;
                    moved = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && in_pipe > 0 => pipe_full = true,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(error) => return Err(error),
            }
        }
        if in_pipe > 0
            && let Some(ready) = to.writable().now_or_never()
        {
            let mut ready = ready?;
            match splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe) {
                Ok(spliced) => {
                    in_pipe -= spliced;
                    counter.fetch_add(spliced as u64, Ordering::Relaxed);
                    pipe_full = false;
                    moved = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(error) => return Err(error),
            }
        }
        if ended && in_pipe == 0 {
            end_of_stream(to, one_ended);
            return Ok(());
        }
        if moved {
            continue;
        }
        // Nothing moved: wait for a side that can make progress.
        let reading = !ended && !pipe_full && in_pipe < PIPE_SIZE;
        tokio::select! {
            ready = from.readable(), if reading => drop(ready?),
            ready = to.writable(), if in_pipe > 0 => drop(ready?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn relayed(stream: TcpStream) -> Socket {
        stream.set_nodelay(true).unwrap();
        register(stream.into_std().unwrap()).unwrap()
    }

    /// A client's bytes that came before its session opened are the first
    /// the backend reads, and the backend connection is left acking
    /// promptly again once they went out.
    #[tokio::test]
    async fn early_bytes_reach_the_backend_first() {
        let (mut client, client_side) = pair().await;
        let client_side = client_side.into_std().unwrap();
        assert!(Early::read(&client_side).unwrap().is_none(), "nothing was sent yet");
        client.write_all(b"early").await.unwrap();
        let early = loop {
            if let Some(early) = Early::read(&client_side).unwrap() {
                break early;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        assert_eq!(early.byte_count(), 5);
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = backend.local_addr().unwrap().to_string();
        let upstream = connect(&address, Some(early)).await.unwrap();
        assert!(
            socket2::SockRef::from(upstream.get_ref()).tcp_quickack().unwrap(),
            "prompt ACKs are back on"
        );
        let (mut accepted, _) = backend.accept().await.unwrap();
        let mut received = [0u8; 5];
        accepted.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"early");
    }

    /// Early bytes for a backend that refuses fail the connect, as a
    /// connect without them would.
    #[tokio::test]
    async fn early_bytes_to_a_refused_backend_fail_the_connect() {
        let (mut client, client_side) = pair().await;
        let client_side = client_side.into_std().unwrap();
        client.write_all(b"early").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let early = Early::read(&client_side).unwrap();
        assert!(early.is_some());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap().to_string();
        drop(closed);
        let error = connect(&address, early).await.expect_err("a refused connect");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// Bytes arrive intact both ways, with splice and without, and a
    /// client's half-close still lets the whole answer through.
    #[tokio::test]
    async fn copies_both_ways_through_a_half_close() {
        for splice in [true, false] {
            let (mut client, client_side) = pair().await;
            let (backend_side, mut backend) = pair().await;
            let (to_backend, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
            let request: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
            let answer: Vec<u8> = request.iter().rev().copied().collect();
            let (client_side, backend_side) = (relayed(client_side), relayed(backend_side));
            // The session closes both sockets once the relay is done,
            // which passes the last end of stream on.
            let relayed = async {
                let outcome = relay(&client_side, &backend_side, splice, &to_backend, &to_client).await;
                drop((client_side, backend_side));
                outcome
            };
            let backend_work = async {
                let mut received = Vec::new();
                backend.read_to_end(&mut received).await.unwrap();
                backend.write_all(&answer).await.unwrap();
                backend.shutdown().await.unwrap();
                received
            };
            let client_work = async {
                client.write_all(&request).await.unwrap();
                client.shutdown().await.unwrap();
                let mut received = Vec::new();
                client.read_to_end(&mut received).await.unwrap();
                received
            };
            let (relayed, received_by_backend, received_by_client) = tokio::join!(relayed, backend_work, client_work);
            relayed.unwrap();
            assert_eq!(received_by_backend, request, "splice = {splice}");
            assert_eq!(received_by_client, answer, "splice = {splice}");
            assert_eq!(to_backend.load(Ordering::Relaxed), request.len() as u64);
            assert_eq!(to_client.load(Ordering::Relaxed), answer.len() as u64);
        }
    }

    /// A backend that resets after part of an answer resets the client too:
    /// the client reads the part and then an error, never a clean end.
    #[tokio::test]
    async fn a_backend_reset_reaches_the_client_as_a_reset() {
        for splice in [true, false] {
            let (mut client, client_side) = pair().await;
            let (backend_side, backend) = pair().await;
            let (to_backend, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
            let (client_side, backend_side) = (relayed(client_side), relayed(backend_side));
            let relayed = async {
                let outcome = relay(&client_side, &backend_side, splice, &to_backend, &to_client).await;
                drop((client_side, backend_side));
                outcome
            };
            let backend_work = async {
                let mut backend = backend;
                backend.write_all(b"partial").await.unwrap();
                backend.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                socket2::SockRef::from(&backend)
                    .set_linger(Some(std::time::Duration::ZERO))
                    .unwrap();
                drop(backend);
            };
            let client_work = async {
                let mut received = vec![0u8; 7];
                client.read_exact(&mut received).await.unwrap();
                let mut rest = Vec::new();
                (received, client.read_to_end(&mut rest).await)
            };
            let (relayed, (), (received, rest)) = tokio::join!(relayed, backend_work, client_work);
            assert!(relayed.is_err(), "splice = {splice}: the relay saw the reset");
            assert_eq!(received, b"partial", "splice = {splice}");
            let error = rest.expect_err("the client is reset, not sent a FIN");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "splice = {splice}");
        }
    }
}
