//! Feeding a role: committed events through `on-event`, in seq order, and
//! `on-tick` on the role's interval.
//!
//! The role's cursor (the last seq it accepted) lives in the store and moves
//! only after `on-event` returned ok, so a crash or a reload never skips or
//! reorders an event; at worst the last one is delivered again. An event the
//! role refuses is retried with backoff and blocks the ones after it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::log::EventLog;
use crate::roles::manager::RoleSlot;
use crate::store::Store;

/// Events read from the log at a time.
const BATCH: usize = 256;
/// Wait before retrying a refused event; doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub async fn deliver_events(slot: Arc<RoleSlot>, log: Arc<dyn EventLog>, store: Store, shutdown: CancellationToken) {
    let mut changes = slot.watch_changes();
    let mut newest = log.watch_last();
    let name = slot.name.clone();
    let mut cursor = {
        let name = name.clone();
        match store.blocking(move |store| store.cursor(&name)).await {
            Ok(cursor) => cursor,
            Err(error) => {
                tracing::error!(role = %slot.name, %error, "cannot read the delivery cursor; events are not delivered");
                return;
            }
        }
    };
    loop {
        if slot.serving().is_none() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => continue,
            }
        }
        // Read the newest applied index before the events: if the read
        // finds nothing, nothing up to `observed` is left to deliver, and
        // `changed` fires for anything applied since.
        newest.borrow_and_update();
        let batch = match log.since(cursor, "", BATCH).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(role = %name, %error, "cannot read the event log; retrying");
                tokio::time::sleep(RETRY_BASE).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = newest.changed() => {}
                _ = changes.changed() => {}
            }
            continue;
        }
        for event in batch {
            let mut retry = RETRY_BASE;
            loop {
                let Some(role) = slot.serving() else {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = changes.changed() => continue,
                    }
                };
                if !role.subscribes_to(&event.kind) {
                    break;
                }
                let outcome = role.on_event(&event.to_role_event()).await;
                let problem = match outcome {
                    Ok(Ok(())) => break,
                    Ok(Err(refusal)) => format!("refused: {refusal}"),
                    Err(error) => error.to_string(),
                };
                tracing::warn!(
                    role = %name,
                    seq = event.seq,
                    kind = %event.kind,
                    retry_ms = retry.as_millis() as u64,
                    "event not accepted, will retry: {problem}"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                    _ = changes.changed() => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
            cursor = event.seq;
            let name = name.clone();
            if let Err(error) = store.blocking(move |store| store.set_cursor(&name, cursor)).await {
                tracing::warn!(role = %slot.name, %error, "cannot save the delivery cursor");
            }
        }
    }
}

pub async fn run_ticks(slot: Arc<RoleSlot>, shutdown: CancellationToken) {
    let mut changes = slot.watch_changes();
    loop {
        let interval = slot
            .serving()
            .map(|role| role.description().tick_interval_ms)
            .unwrap_or(0);
        if interval == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => continue,
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changes.changed() => continue,
            _ = tokio::time::sleep(Duration::from_millis(interval as u64)) => {}
        }
        if let Some(role) = slot.serving()
            && let Err(error) = role.on_tick().await
        {
            tracing::warn!(role = %slot.name, %error, "on-tick failed");
        }
    }
}
