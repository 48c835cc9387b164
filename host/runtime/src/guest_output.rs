//! Where a role's stdout and stderr go: each line to the host log under the
//! role's name, and the last few kilobytes of the current call kept so a trap
//! can be explained with the role's own words (a Rust panic message, say).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Bytes of output kept for explaining a trap.
const TAIL_BYTES: usize = 4096;

#[derive(Clone)]
pub(crate) struct GuestOutput {
    role: Arc<str>,
    stream: &'static str,
    inner: Arc<Mutex<OutputBuffer>>,
}

#[derive(Default)]
struct OutputBuffer {
    /// Output of the current call, capped at [`TAIL_BYTES`].
    tail: VecDeque<u8>,
    /// A line not yet terminated by a newline.
    partial: Vec<u8>,
}

impl GuestOutput {
    pub(crate) fn new(role: Arc<str>, stream: &'static str) -> Self {
        GuestOutput {
            role,
            stream,
            inner: Arc::default(),
        }
    }

    /// Forgets the previous call's output.
    pub(crate) fn clear_tail(&self) {
        self.inner.lock().unwrap().tail.clear();
    }

    /// The current call's output, lossily decoded, trimmed.
    pub(crate) fn tail(&self) -> String {
        let buffer = self.inner.lock().unwrap();
        let bytes: Vec<u8> = buffer.tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.inner.lock().unwrap();
        buffer.tail.extend(bytes);
        let excess = buffer.tail.len().saturating_sub(TAIL_BYTES);
        buffer.tail.drain(..excess);
        buffer.partial.extend_from_slice(bytes);
        while let Some(end) = buffer.partial.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = buffer.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            tracing::info!(role = %self.role, stream = self.stream, "{}", line.trim_end());
        }
        if buffer.partial.len() > TAIL_BYTES {
            let line = String::from_utf8_lossy(&buffer.partial).into_owned();
            buffer.partial.clear();
            tracing::info!(role = %self.role, stream = self.stream, "{line}");
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
