//! Watches the roles directory: file events and a periodic rescan both lead
//! to [`RoleManager::sync`], which compares what is on disk with what is
//! loaded. The rescan is the safety net for events inotify drops.
//!
//! Events are not debounced by time: a rename into place is one event and is
//! acted on at once, which keeps a reload within milliseconds. Bursts still
//! coalesce, because a wake-up that arrives while a sync runs is folded into
//! the next one. Events about dotfiles and `*.tmp` (a writer's temporary
//! file) are ignored, and so are reads: a sync lists the directory, and
//! waking on that open would make the watcher chase its own tail.

use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::roles::manager::RoleManager;

/// Runs until `shutdown`: an initial sync, then one per burst of file events
/// and one every `rescan`.
pub async fn watch_roles_dir(manager: Arc<RoleManager>, rescan: Duration, shutdown: CancellationToken) {
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
        Ok(event) if can_change_roles(&event) => {
            // A full channel already holds a wake-up; one sync sees everything.
            let _ = wake.try_send(());
        }
        Ok(_) => {}
        Err(error) => tracing::debug!(%error, "file watcher error; the periodic rescan covers it"),
    });
    let _watcher = match watcher {
        Ok(mut watcher) => match watcher.watch(manager.roles_dir(), RecursiveMode::NonRecursive) {
            Ok(()) => Some(watcher),
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

/// Whether `event` may change what is on disk: a write, create, rename or
/// remove of a role file, not a mere open or read.
fn can_change_roles(event: &notify::Event) -> bool {
    let changes = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    changes && event.paths.iter().any(|path| is_role_file(path))
}

/// Whether an event about `path` can matter: not a dotfile, not a `*.tmp`.
fn is_role_file(path: &std::path::Path) -> bool {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return false;
    };
    !name.starts_with('.') && !name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(path.into())
    }

    #[test]
    fn listing_the_directory_does_not_wake_the_watcher() {
        assert!(!can_change_roles(&event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            "/data/roles"
        )));
        assert!(!can_change_roles(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            "/data/roles"
        )));
    }

    #[test]
    fn writes_renames_and_removals_of_role_files_wake_it() {
        assert!(can_change_roles(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "/data/roles/dns.wasm"
        )));
        assert!(can_change_roles(&event(
            EventKind::Create(CreateKind::File),
            "/data/roles/dns.wasm"
        )));
        assert!(can_change_roles(&event(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            "/data/roles/dns.wasm"
        )));
        assert!(can_change_roles(&event(
            EventKind::Remove(notify::event::RemoveKind::File),
            "/data/roles/dns.wasm"
        )));
        assert!(!can_change_roles(&event(
            EventKind::Create(CreateKind::File),
            "/data/roles/dns.wasm.tmp"
        )));
    }
}
