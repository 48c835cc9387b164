//! Loopback ports for servers a bench or test starts, from below the
//! kernel's ephemeral range (32768 and up by default), which outgoing
//! connections and client UDP sockets draw from: a port `bind(0)` picked is
//! ephemeral itself, and any connection made between reading it and a
//! server binding it could take it. The tests include this file by path.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port in `range` free for both TCP and UDP now. `next` is the
/// caller's cursor: each call gives another port, and processes start at
/// different places, so programs running side by side do not pick the same.
pub fn free_port_in(range: Range<u16>, next: &AtomicU32) -> u16 {
    let span = u32::from(range.end - range.start);
    let _ = next.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = range.start + (next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port in {range:?}")
}
