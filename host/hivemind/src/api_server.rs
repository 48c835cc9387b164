//! Serves the HTTP API on its listener: HTTP/1.1 through hyper, with a
//! bound on connections that closes idle ones first
//! ([`hivemind_core::slots`]) and a deadline for a request's headers.
//!
//! `axum::serve` has neither: 300 connections that never sent a request
//! held 300 descriptors until the node ran out and took its own failed
//! checks for dead backends. Here a connection that has not sent a whole
//! request head within [`HEADER_READ_TIMEOUT`] is closed (hyper starts
//! that clock again as soon as a response is written, so it also bounds
//! an idle keep-alive connection), and at the cap the next client is let
//! in by closing the connection idle the longest. A request in progress
//! (a long watch included) marks its connection busy until its response
//! body ends, and a busy connection is never closed to make room.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use hivemind_core::limits;
use hivemind_core::slots::{Busy, Slot, Slots};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long a client may take to send a request's head, and how long a
/// keep-alive connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The API's bound on connections: an eighth of the descriptor limit, at
/// least 16, at most 1,024 (a CLI, a dashboard and scripts need a few).
pub fn default_slots() -> Slots {
    Slots::new(limits::connection_cap(8, 16, 1024))
}

/// Serves `app` on `listener` until `shutdown`, then lets requests in
/// progress finish.
pub async fn serve(listener: TcpListener, app: Router, slots: Slots, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.acquire() => slot,
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_connection(stream, app.clone(), slot, shutdown.clone()));
            }
            Err(error) => {
                // Out of descriptors: make room by closing an idle
                // connection, and wait rather than spin on a listener
                // that stays readable.
                if limits::is_local_shortage(&error) {
                    slots.shed_idlest();
                }
                tracing::warn!(%error, "the API cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    connections.close();
    connections.wait().await;
}

async fn serve_connection(stream: tokio::net::TcpStream, app: Router, slot: Slot, shutdown: CancellationToken) {
    let slot = std::sync::Arc::new(slot);
    let service = {
        let slot = slot.clone();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let busy = slot.busy();
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(Body::new)).await?;
                Ok::<_, Infallible>(response.map(|body| Body::new(WhileBusy { body, _busy: busy })))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "API connection ended");
                }
                return;
            }
            _ = slot.asked_to_close(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A response body that keeps its connection marked busy until the last
/// byte is sent (or the body is dropped).
struct WhileBusy {
    body: Body,
    _busy: Busy,
}

impl HttpBody for WhileBusy {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
