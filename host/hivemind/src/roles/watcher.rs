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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::roles::manager::RoleManager;

/// Runs until `shutdown`: an initial sync, then one per burst of file events
/// and one every `rescan`.
pub async fn watch_roles_dir(manager: Arc<RoleManager>, rescan: Duration, shutdown: CancellationToken) {
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let mut watching = Watching::start(manager.roles_dir(), &wake);
    let mut ticker = tokio::time::interval(rescan);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if watching.lost.load(Ordering::Relaxed) || watching.directory != directory_identity(manager.roles_dir()) {
            watching = Watching::start(manager.roles_dir(), &wake);
        }
        manager.sync().await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = woken.recv() => {}
            _ = ticker.tick() => {}
        }
    }
}

/// Which file events wake the watcher.
type EventFilter = Box<dyn Fn(&notify::Event) -> bool + Send>;

/// Device and inode of a directory: a directory deleted and made again
/// under the same name is another one, with no watch on it.
type DirectoryIdentity = Option<(u64, u64)>;

fn directory_identity(dir: &Path) -> DirectoryIdentity {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .ok()
        .map(|metadata| (metadata.dev(), metadata.ino()))
}

/// The file watch in place, and which directory it watches. While the roles
/// directory is missing, its parent is watched for the directory's return
/// (and only that: the parent is usually the data directory, written on
/// every commit), so a roles directory deleted and made again is watched
/// from the moment it is back, not from the next rescan.
struct Watching {
    directory: DirectoryIdentity,
    /// Set when the watched roles directory itself was deleted or moved:
    /// a directory made again at once may reuse the inode number.
    lost: Arc<AtomicBool>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Watching {
    fn start(roles_dir: &Path, wake: &mpsc::Sender<()>) -> Watching {
        let directory = directory_identity(roles_dir);
        let lost = Arc::new(AtomicBool::new(false));
        let (watched, wanted): (PathBuf, EventFilter) = if directory.is_some() {
            let (watched_dir, lost) = (roles_dir.to_path_buf(), lost.clone());
            let wanted = move |event: &notify::Event| {
                // Listing the directory reports opens of it too: only its
                // removal or a rename counts as losing it.
                let gone = matches!(
                    event.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                );
                if gone && event.paths.contains(&watched_dir) {
                    lost.store(true, Ordering::Relaxed);
                    return true;
                }
                can_change_roles(event)
            };
            (roles_dir.to_path_buf(), Box::new(wanted))
        } else {
            let roles_dir = roles_dir.to_path_buf();
            let parent = roles_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
            (parent, Box::new(move |event| event.paths.contains(&roles_dir)))
        };
        let waker = wake.clone();
        let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
            // A full channel already holds a wake-up; one sync sees everything.
            Ok(event) if wanted(&event) => {
                let _ = waker.try_send(());
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "file watcher error; the periodic rescan covers it"),
        });
        let watcher = match watcher {
            Ok(mut watcher) => match watcher.watch(&watched, RecursiveMode::NonRecursive) {
                Ok(()) => Some(watcher),
                Err(error) => {
                    tracing::warn!(dir = %watched.display(), %error, "cannot watch the roles directory; relying on rescans");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot start the file watcher; relying on rescans");
                None
            }
        };
        if directory.is_none() {
            tracing::warn!(dir = %roles_dir.display(), "the roles directory is missing; its roles keep running, and it is watched for again");
        }
        // Events from the moment the directory was created until the watch
        // was in place are covered by the sync that follows.
        let _ = wake.try_send(());
        Watching {
            directory,
            lost,
            _watcher: watcher,
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
