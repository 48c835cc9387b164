//! The one way this project writes a file: a reader sees the old contents
//! or the new, never a mix, a crash leaves one or the other, and nobody can
//! make the write land somewhere else.
//!
//! Every file Hivemind writes (role uploads, cluster keys and certificates,
//! tokens, the compile cache, a role's output such as nginx configs) goes
//! through [`write_file`]:
//! - the bytes go to a temporary file beside the target, created
//!   exclusively (`O_CREAT | O_EXCL`, which never follows a symbolic link)
//!   under a random name, so two writers of one target never share a
//!   temporary file, and a link planted under a name someone guessed is
//!   never written through;
//! - the temporary file is fsynced, renamed over the target, and the
//!   directory fsynced, so the new name survives a power cut;
//! - a target that exists and is not a regular file (a symbolic link, a
//!   directory, a FIFO) is refused with a message saying so, not replaced.
//!
//! Temporary names start with `.` and end in `.tmp`, which the roles
//! directory's watcher ignores.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Who may read the file written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The owner only (0600): keys, tokens, secrets.
    Private,
    /// Anyone may read it (0644): role files, certificates, rendered configs.
    Shared,
    /// Anyone may read and run it (0755): a script a scaffold writes.
    Executable,
}

impl Access {
    fn mode(self) -> u32 {
        match self {
            Access::Private => 0o600,
            Access::Shared => 0o644,
            Access::Executable => 0o755,
        }
    }
}

/// Replaces `path` with `contents` atomically and durably (see the module
/// doc). The umask applies to `access` as it does to any file created. An
/// error says `cannot write PATH: why`, and keeps the cause's kind
/// (`InvalidInput` for a target that is not a regular file).
pub fn write_file(path: &Path, contents: &[u8], access: Access) -> io::Result<()> {
    replace(path, contents, access)
        .map_err(|error| io::Error::new(error.kind(), format!("cannot write {}: {error}", path.display())))
}

fn replace(path: &Path, contents: &[u8], access: Access) -> io::Result<()> {
    refuse_non_regular(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .permissions(Permissions::from_mode(access.mode()))
        .tempfile_in(dir)?;
    temp.write_all(contents)?;
    temp.as_file().sync_all()?;
    // On failure the temporary file is removed as `temp` drops.
    temp.persist(path).map_err(|error| error.error)?;
    File::open(dir)?.sync_all()
}

/// Ok when `path` is absent or a regular file; otherwise an error saying
/// what is there instead and what to do about it.
pub fn refuse_non_regular(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a symbolic link, and hivemind never writes through one: remove the link, or name the file it points at",
        ));
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a device"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file: move it away"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A write replaces the contents, with the mode asked for, and leaves
    /// no temporary file behind.
    #[test]
    fn replaces_the_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_file(&path, b"one", Access::Private).unwrap();
        write_file(&path, b"two", Access::Private).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A symbolic link where the file should be is refused, and the file it
    /// points at is left as it was.
    #[test]
    fn a_symlink_at_the_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let link = dir.path().join("role.wasm");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let error = write_file(&link, b"evil", Access::Shared).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert!(error.to_string().contains("role.wasm"), "names the file: {error}");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }

    /// A directory where the file should be is refused by name.
    #[test]
    fn a_directory_at_the_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dns.wasm");
        std::fs::create_dir(&path).unwrap();
        let error = write_file(&path, b"x", Access::Shared).unwrap_err();
        assert!(error.to_string().contains("a directory"), "{error}");
    }

    /// Links planted under every temporary name a writer could once guess
    /// (the target's name with `.tmp`, with the process id) are never
    /// written through.
    #[test]
    fn planted_links_under_guessable_names_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let pid = std::process::id();
        for guess in [
            "role.tmp".to_string(),
            ".role.wasm.tmp".to_string(),
            format!(".role.wasm.upload-{pid}.tmp"),
            ".role.wasm.hivemind-tmp".to_string(),
        ] {
            std::os::unix::fs::symlink(&victim, dir.path().join(guess)).unwrap();
        }
        write_file(&dir.path().join("role.wasm"), b"role", Access::Shared).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(std::fs::read(dir.path().join("role.wasm")).unwrap(), b"role");
    }

    /// Writers of one target at once all succeed, and the file ends up as
    /// exactly one of them wrote it, never a mix.
    #[test]
    fn concurrent_writers_never_mix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("role.wasm");
        std::thread::scope(|scope| {
            for writer in 0..8u8 {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..25 {
                        write_file(path, &vec![writer; 64 * 1024], Access::Shared).unwrap();
                    }
                });
            }
        });
        let contents = std::fs::read(&path).unwrap();
        assert_eq!(contents.len(), 64 * 1024);
        assert!(contents.iter().all(|byte| *byte == contents[0]));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
