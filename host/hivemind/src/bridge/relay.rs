//! Copying a bridged session's bytes both ways.
//!
//! With splice(2) the bytes go socket → pipe → socket inside the kernel
//! and never through user space; that is what lets a proxy keep up with a
//! loopback link (HAProxy does the same). Without it a 64 KiB buffer per
//! direction is used. Either way each direction ends at its end of stream
//! by half-closing the other side, so a client that shuts down its
//! sending side still gets the rest of the answer; the session is over
//! when both directions are, or at the first error.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call or buffer: a pipe's default capacity.
const CHUNK: usize = 64 << 10;

/// Copies both ways until both directions ended; counts bytes as they go.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    splice: bool,
    to_backend: &AtomicU64,
    to_client: &AtomicU64,
) -> io::Result<()> {
    let (upstream, downstream) = if splice {
        (Carrier::pipe()?, Carrier::pipe()?)
    } else {
        (Carrier::buffer(), Carrier::buffer())
    };
    tokio::try_join!(
        one_way(client, backend, upstream, to_backend),
        one_way(backend, client, downstream, to_client),
    )?;
    Ok(())
}

/// Where bytes wait between the read and the write.
enum Carrier {
    Pipe { read: OwnedFd, write: OwnedFd },
    Buffer { bytes: Box<[u8]>, start: usize },
}

impl Carrier {
    fn pipe() -> io::Result<Carrier> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds` on success;
        // each is owned by exactly one OwnedFd below.
        let (read, write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        Ok(Carrier::Pipe { read, write })
    }

    fn buffer() -> Carrier {
        Carrier::Buffer {
            bytes: vec![0; CHUNK].into_boxed_slice(),
            start: 0,
        }
    }

    /// Moves what `from` has (up to a chunk) into the empty carrier; 0 at
    /// end of stream. Only called when the carrier is empty, so a
    /// `WouldBlock` is always the socket's.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        match self {
            Carrier::Pipe { write, .. } => splice(from.as_raw_fd(), write.as_raw_fd(), CHUNK),
            Carrier::Buffer { bytes, start } => {
                *start = 0;
                from.try_read(bytes)
            }
        }
    }

    /// Moves up to `pending` waiting bytes to `to`.
    fn drain(&mut self, to: &TcpStream, pending: usize) -> io::Result<usize> {
        match self {
            Carrier::Pipe { read, .. } => splice(read.as_raw_fd(), to.as_raw_fd(), pending),
            Carrier::Buffer { bytes, start } => {
                let written = to.try_write(&bytes[*start..*start + pending])?;
                *start += written;
                Ok(written)
            }
        }
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

async fn one_way(from: &TcpStream, to: &TcpStream, mut carrier: Carrier, counter: &AtomicU64) -> io::Result<()> {
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || carrier.fill(from)) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other?,
            }
        };
        if filled == 0 {
            shutdown_write(to);
            return Ok(());
        }
        let mut pending = filled;
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || carrier.drain(to, pending)) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
                Ok(written) => {
                    pending -= written;
                    counter.fetch_add(written as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Sends FIN on `stream`: the peer reads end of stream but may still send.
fn shutdown_write(stream: &TcpStream) {
    // SAFETY: the descriptor is the live socket `stream` borrows; shutdown
    // changes the connection's state, not the descriptor's ownership. It
    // fails only when the peer already reset, which the other direction
    // will see.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
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
            let relayed = relay(&client_side, &backend_side, splice, &to_backend, &to_client);
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
}
