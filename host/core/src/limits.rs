//! What this node may hold at once, and telling its own shortage from a
//! fault of someone else.
//!
//! A connect that fails with EMFILE says nothing about the peer: this
//! process is out of descriptors. Reporting it as "the backend is down"
//! turns one node's trouble into a cluster-wide decision (the bridge
//! severing every session), so every check asks [`local_shortage`] first
//! and reports "cannot check from this node" instead.

use std::error::Error;
use std::io;

/// The `errno` values that describe this node, not the other end: out of
/// descriptors (per process or system-wide), of memory or socket buffers,
/// of disk or quota, or of local ports to connect from.
const LOCAL_SHORTAGES: [i32; 7] = [
    libc::EMFILE,
    libc::ENFILE,
    libc::ENOMEM,
    libc::ENOBUFS,
    libc::ENOSPC,
    libc::EDQUOT,
    libc::EADDRNOTAVAIL,
];

/// Whether `error` is this node running short of something.
pub fn is_local_shortage(error: &io::Error) -> bool {
    error.raw_os_error().is_some_and(|code| LOCAL_SHORTAGES.contains(&code))
}

/// The first error in `error`'s chain of sources that is this node
/// running short, if any: HTTP clients wrap the `io::Error` of a failed
/// connect in their own types.
pub fn local_shortage<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a io::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(io_error) = error.downcast_ref::<io::Error>()
            && is_local_shortage(io_error)
        {
            return Some(io_error);
        }
        next = error.source();
    }
    None
}

/// Bytes an unprivileged writer may still put on the file system that
/// holds `path`.
pub fn free_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: statvfs reads the NUL-terminated name and writes one statvfs
    // into the zeroed struct we own.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(name.as_ptr(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// Descriptors this process may hold (the soft `RLIMIT_NOFILE`).
pub fn descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Raises the soft descriptor limit to the hard one, and to 65536 where
/// the hard limit is lower and the process may raise it (root); returns
/// the soft limit now in force. A bridge holds six descriptors per session
/// (two sockets, two pipes): the usual soft limit of 1024 would cap it
/// near 170 sessions, and every listener's bound is a share of this limit.
pub fn raise_descriptor_limit() -> u64 {
    const WANTED: libc::rlim_t = 65536;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`; a
    // refusal leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return descriptor_limit();
        }
        if limit.rlim_max < WANTED {
            let raised = libc::rlimit {
                rlim_cur: WANTED,
                rlim_max: WANTED,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return WANTED;
            }
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    descriptor_limit()
}

/// Connections one listener serves at once: `1/share` of the descriptor
/// limit, at least `floor`, at most `ceiling`. The shares of all listeners
/// add up to well under the limit, so the node keeps descriptors for its
/// own files, its peers and its checks whatever clients do.
pub fn connection_cap(share: u64, floor: usize, ceiling: usize) -> usize {
    let fitting = usize::try_from(descriptor_limit() / share.max(1)).unwrap_or(usize::MAX);
    fitting.clamp(floor, ceiling.max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The free space of a real directory is measured; a missing one is an
    /// error, not zero bytes free.
    #[test]
    fn free_space_is_measured_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        let missing = free_bytes(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }

    /// Out of descriptors or ports is this node's shortage; a refused
    /// connection or an unreachable network is news about the other end.
    #[test]
    fn shortages_are_told_from_peer_faults() {
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOSPC,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_shortage(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::ENETUNREACH, libc::ECONNRESET] {
            assert!(!is_local_shortage(&io::Error::from_raw_os_error(code)), "{code}");
        }
        assert!(!is_local_shortage(&io::Error::other("no errno")));
    }

    /// A shortage wrapped in another error type is still found.
    #[test]
    fn a_wrapped_shortage_is_found() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(formatter, "connecting: {}", self.0)
            }
        }
        impl Error for Wrapper {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = Wrapper(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(local_shortage(&wrapped).is_some());
        let refused = Wrapper(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(local_shortage(&refused).is_none());
    }

    /// A cap is a share of the limit, kept between its floor and ceiling.
    #[test]
    fn caps_follow_the_descriptor_limit() {
        let limit = descriptor_limit() as usize;
        assert_eq!(connection_cap(1, 1, usize::MAX), limit);
        assert_eq!(connection_cap(1, 1, 7), 7);
        assert_eq!(connection_cap(u64::MAX, 5, 100), 5);
    }
}
