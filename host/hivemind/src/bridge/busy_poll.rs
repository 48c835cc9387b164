//! Busy polling on the data-plane threads.
//!
//! A thread that goes to sleep waiting for the next packet pays a wake-up
//! when it comes: tens of µs on a virtual machine, where an idle vCPU halts
//! and the hypervisor must resume it. A request/response exchange through
//! the bridge crosses it twice, so each one paid two wake-ups. For a short
//! window after its last I/O a thread keeps checking for events without
//! sleeping (a non-blocking poll), yielding the CPU between checks to any
//! other thread ready to run, then sleeps as before. The next packet of a
//! busy session then finds the thread awake.
//!
//! The cost is CPU time that would have been idle: up to one core per
//! thread while traffic comes more often than the window, nothing once it
//! stops. HAProxy's `busy-polling` does the same without a window (it never
//! sleeps); `[data_plane] busy_poll_us = 0` turns it off here.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The default window: a little more than a loopback round trip through a
/// backend that answers at once, so one session's next message is awaited
/// awake, while a thread whose traffic stopped sleeps within 50 µs.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

/// When a thread keeps polling: it counts I/O as it happens and, each time
/// it would sleep, asks whether the last I/O is still within the window.
#[derive(Debug)]
pub struct Spinner {
    window: Duration,
    /// The I/O count when it last changed, and when that was seen.
    seen: u64,
    since: Option<Instant>,
}

impl Spinner {
    pub fn new(window: Duration) -> Spinner {
        Spinner {
            window,
            seen: 0,
            since: None,
        }
    }

    /// Whether to poll again rather than sleep, given the thread's I/O
    /// count now.
    pub fn keep_polling(&mut self, activity: u64, now: Instant) -> bool {
        if self.window.is_zero() {
            return false;
        }
        if activity != self.seen {
            self.seen = activity;
            self.since = Some(now);
        }
        self.since.is_some_and(|since| now.duration_since(since) < self.window)
    }
}

thread_local! {
    /// I/O on this thread: reads that returned bytes, and accepted clients.
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
    static SPINNER: RefCell<Spinner> = RefCell::new(Spinner::new(Duration::ZERO));
    /// Wakes the thread's top-level future: a runtime with a woken future
    /// polls for events without blocking instead of sleeping.
    static WAKER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Counts one I/O on this thread; what a session calls when bytes come in.
pub fn record_activity() {
    ACTIVITY.with(|activity| activity.set(activity.get().wrapping_add(1)));
}

/// Sets this thread's window; called once by the thread before it runs.
pub fn set_window(window: Duration) {
    SPINNER.set(Spinner::new(window));
}

/// The data-plane runtime's `on_thread_park` hook: what runs each time the
/// thread has nothing left to do and would sleep.
pub fn before_park() {
    // Let whatever else is ready to run on this CPU (a client or backend,
    // often) run first: what it sends then finds this thread awake, at no
    // cost of a wake-up to either side. With nothing else to run, the yield
    // returns at once.
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe { libc::sched_yield() };
    let activity = ACTIVITY.with(Cell::get);
    if SPINNER.with_borrow_mut(|spinner| spinner.keep_polling(activity, Instant::now())) {
        WAKER.with_borrow(|waker| {
            if let Some(waker) = waker {
                waker.wake_by_ref();
            }
        });
    }
}

/// Wraps the data-plane thread's top-level future and keeps its waker for
/// [`before_park`].
pub struct Wakeable<F>(pub F);

impl<F: Future + Unpin> Future for Wakeable<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        WAKER.with_borrow_mut(|waker| {
            if waker.as_ref().is_none_or(|waker| !waker.will_wake(context.waker())) {
                *waker = Some(context.waker().clone());
            }
        });
        Pin::new(&mut self.0).poll(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New I/O starts a window in which the thread keeps polling; once it
    /// passes with no more I/O, the thread sleeps.
    #[test]
    fn polls_within_the_window_after_io_then_sleeps() {
        let start = Instant::now();
        let mut spinner = Spinner::new(Duration::from_micros(50));
        assert!(!spinner.keep_polling(0, start), "no I/O yet: sleep");
        assert!(spinner.keep_polling(1, start));
        assert!(spinner.keep_polling(1, start + Duration::from_micros(49)));
        assert!(!spinner.keep_polling(1, start + Duration::from_micros(50)));
        assert!(
            spinner.keep_polling(3, start + Duration::from_micros(80)),
            "more I/O opens a new window"
        );
        assert!(spinner.keep_polling(3, start + Duration::from_micros(129)));
        assert!(!spinner.keep_polling(3, start + Duration::from_micros(130)));
    }

    /// A zero window never polls: the thread sleeps whenever it is idle.
    #[test]
    fn a_zero_window_never_polls() {
        let start = Instant::now();
        let mut spinner = Spinner::new(Duration::ZERO);
        assert!(!spinner.keep_polling(1, start));
        assert!(!spinner.keep_polling(2, start));
    }
}
