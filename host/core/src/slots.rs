//! A bound on the connections one listener serves at once that gives way
//! to new clients by closing idle connections first.
//!
//! A plain semaphore lets whoever opens connections first hold every slot:
//! 300 idle connections that never send a request shut everyone else out
//! (and spend the node's descriptors). Here each connection says when it is
//! busy (a request or message in hand); at the cap, the next client waits
//! while the connection idle the longest is asked to close, as RFC 7766
//! §6.2.3 asks of DNS servers and as HTTP servers do with keep-alive
//! connections. A busy connection is never asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The connections of one listener (or of every version of a role's
/// listener, which share one bound).
#[derive(Clone)]
pub struct Slots {
    inner: Arc<Inner>,
}

struct Inner {
    cap: usize,
    open: Mutex<Open>,
    /// Woken when a connection closes.
    freed: Notify,
    /// Connections asked to close to make room, since start.
    shed: AtomicU64,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    connections: HashMap<u64, Connection>,
}

struct Connection {
    /// Requests or messages in hand.
    busy: usize,
    /// When `busy` last dropped to zero (or the connection opened).
    idle_since: Instant,
    /// Cancelled to ask the connection to close.
    close: CancellationToken,
}

impl Slots {
    /// At most `cap` connections at once (at least one).
    pub fn new(cap: usize) -> Slots {
        Slots {
            inner: Arc::new(Inner {
                cap: cap.max(1),
                open: Mutex::new(Open::default()),
                freed: Notify::new(),
                shed: AtomicU64::new(0),
            }),
        }
    }

    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.lock().connections.len()
    }

    /// Connections asked to close to make room, since start.
    pub fn shed(&self) -> u64 {
        self.inner.shed.load(Ordering::Relaxed)
    }

    /// A slot for the next connection: at once below the cap; at the cap,
    /// after the connection idle the longest closed (or, while every
    /// connection is busy, after any one closed).
    pub async fn acquire(&self) -> Slot {
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a close between the check
            // and the wait is not missed.
            freed.as_mut().enable();
            if let Some(slot) = self.try_acquire() {
                return slot;
            }
            freed.await;
        }
    }

    /// A slot now, or `None` at the cap (having asked the connection idle
    /// the longest to close, if one is idle).
    pub fn try_acquire(&self) -> Option<Slot> {
        let mut open = self.inner.lock();
        if open.connections.len() < self.inner.cap {
            let id = open.next_id;
            open.next_id += 1;
            let close = CancellationToken::new();
            open.connections.insert(
                id,
                Connection {
                    busy: 0,
                    idle_since: Instant::now(),
                    close: close.clone(),
                },
            );
            return Some(Slot {
                id,
                inner: self.inner.clone(),
                close,
            });
        }
        Self::ask_idlest_to_close(&mut open, &self.inner.shed);
        None
    }

    /// Asks the connection idle the longest (and not yet asked) to close.
    /// Called at the cap, and by a listener that ran out of descriptors.
    pub fn shed_idlest(&self) -> bool {
        Self::ask_idlest_to_close(&mut self.inner.lock(), &self.inner.shed)
    }

    fn ask_idlest_to_close(open: &mut Open, shed: &AtomicU64) -> bool {
        let idlest = open
            .connections
            .values()
            .filter(|connection| connection.busy == 0 && !connection.close.is_cancelled())
            .min_by_key(|connection| connection.idle_since);
        match idlest {
            Some(connection) => {
                connection.close.cancel();
                shed.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Open> {
        // A panic while holding this lock leaves only counters behind.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One connection's place; dropping it frees the place.
pub struct Slot {
    id: u64,
    inner: Arc<Inner>,
    close: CancellationToken,
}

impl Slot {
    /// Marks the connection busy until the guard is dropped: a busy
    /// connection is never asked to close to make room.
    pub fn busy(&self) -> Busy {
        if let Some(connection) = self.inner.lock().connections.get_mut(&self.id) {
            connection.busy += 1;
        }
        Busy {
            id: self.id,
            inner: self.inner.clone(),
        }
    }

    /// Completes when the connection is asked to close to make room.
    pub async fn asked_to_close(&self) {
        self.close.cancelled().await
    }

    pub fn is_asked_to_close(&self) -> bool {
        self.close.is_cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.lock().connections.remove(&self.id);
        self.inner.freed.notify_waiters();
    }
}

/// See [`Slot::busy`].
pub struct Busy {
    id: u64,
    inner: Arc<Inner>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(connection) = self.inner.lock().connections.get_mut(&self.id) {
            connection.busy -= 1;
            if connection.busy == 0 {
                connection.idle_since = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// At the cap, the connection idle the longest is asked to close, a
    /// busy one never; its close lets the waiting client in.
    #[tokio::test]
    async fn the_idlest_gives_way_and_busy_ones_stay() {
        let slots = Slots::new(3);
        let oldest = slots.acquire().await;
        let busy_one = slots.acquire().await;
        let _working = busy_one.busy();
        let newer = slots.acquire().await;
        assert_eq!(slots.open(), 3);

        assert!(slots.try_acquire().is_none());
        assert!(oldest.is_asked_to_close(), "the idle one opened first");
        assert!(!busy_one.is_asked_to_close());
        assert!(!newer.is_asked_to_close());
        assert_eq!(slots.shed(), 1);

        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no room until a connection closes");
        drop(oldest);
        let admitted = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(slots.open(), 3);
        drop(admitted);
    }

    /// While every connection is busy nobody is asked; the next client
    /// waits for one to finish and close.
    #[tokio::test]
    async fn busy_connections_are_waited_for() {
        let slots = Slots::new(1);
        let only = slots.acquire().await;
        let working = only.busy();
        assert!(slots.try_acquire().is_none());
        assert!(!only.is_asked_to_close());
        assert_eq!(slots.shed(), 0);
        drop(working);
        assert!(slots.try_acquire().is_none());
        assert!(only.is_asked_to_close(), "idle once its work is done");
        drop(only);
        assert!(slots.try_acquire().is_some());
    }

    /// A connection that went idle again counts from its last work, not
    /// from when it opened.
    #[tokio::test]
    async fn idle_time_counts_from_the_last_work() {
        let slots = Slots::new(2);
        let first = slots.acquire().await;
        let second = slots.acquire().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(first.busy());
        assert!(slots.try_acquire().is_none());
        assert!(second.is_asked_to_close());
        assert!(!first.is_asked_to_close());
    }
}
