//! Watches the roles directory: file events (debounced) and a periodic rescan
//! both lead to [`RoleManager::sync`], which compares what is on disk with
//! what is loaded. The rescan is the safety net for events inotify drops.

use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::roles::manager::RoleManager;

/// Quiet time before file events are acted on: long enough to merge the
/// create/write/rename burst of one install, short enough to feel instant.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Runs until `shutdown`: an initial sync, then one per burst of file events
/// and one every `rescan`.
pub async fn watch_roles_dir(manager: Arc<RoleManager>, rescan: Duration, shutdown: CancellationToken) {
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        if let Err(errors) = &result {
            tracing::debug!(?errors, "file watcher errors; the periodic rescan covers them");
        }
        // A full channel already holds a wake-up; one sync sees everything.
        let _ = wake.try_send(());
    });
    let _debouncer = match debouncer {
        Ok(mut debouncer) => match debouncer.watch(manager.roles_dir(), RecursiveMode::NonRecursive) {
            Ok(()) => Some(debouncer),
            Err(error) => {
                tracing::warn!(dir = %manager.roles_dir().display(), %error, "cannot watch the roles directory; relying on rescans");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot start the file watcher; relying on rescans");
            None
        }
    };
    let mut ticker = tokio::time::interval(rescan);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        manager.sync().await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = woken.recv() => {}
            _ = ticker.tick() => {}
        }
    }
}
