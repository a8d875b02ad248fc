//! A monitor's listening UNIX socket: bound at a path with mode 0600, and
//! removed again by whoever bound it.
//!
//! Invariants:
//! - [`bind`] replaces a stale *socket* file at the path (QEMU unlinks
//!   before binding; a socket file nobody listens on is what a crashed
//!   server leaves behind), but never any other kind of file: a regular
//!   file there makes the bind fail with QEMU's text, `Failed to bind
//!   socket to PATH: Address already in use`.
//! - [`SocketFile::remove`] unlinks the path only while it still names the
//!   socket that was bound (same device and inode), so a server never
//!   removes a socket that another one put at the same path since. Call it
//!   while the listener is still open: a bound socket holds its inode, so
//!   the number cannot have been reused for a newer socket yet
//!   ([`super::QmpServer`] does so when given the file).
//! - The mode is narrowed to 0600 right after the bind; until then the
//!   process umask applies, as for every QEMU socket. A process with no
//!   other threads can close that window by binding under
//!   `umask(0o177)` (the daemon does).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Room in `sockaddr_un.sun_path`, terminating NUL included.
const SUN_PATH_MAX: usize = 108;

/// The socket file a [`bind`] created.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The path it was bound at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlink the socket file if the path still names it; what is there
    /// otherwise (nothing, or another file) is left alone.
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.file_type().is_socket()
            && m.dev() == self.dev
            && m.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// strerror's text of an I/O error.
pub(crate) fn os_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// Bind a listening UNIX socket at `path` with mode 0600 (see the module
/// doc for what may be at `path` already). Errors carry QEMU's texts and
/// the errno.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    let bind_err = |e: &io::Error| {
        let err = Error::generic(format!(
            "Failed to bind socket to {}: {}",
            path.display(),
            os_text(e)
        ));
        match e.raw_os_error() {
            Some(n) => err.with_errno(n),
            None => err,
        }
    };
    if path.as_os_str().len() >= SUN_PATH_MAX {
        return Err(
            Error::generic(format!("UNIX socket path '{}' is too long", path.display()))
                .with_errno(libc::ENAMETOOLONG),
        );
    }
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_socket()
    {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|e| bind_err(&e))?;
    let file = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::symlink_metadata(path))
        .map(|m| SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        });
    match file {
        Ok(f) => Ok((listener, f)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(bind_err(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_0600_replaces_a_socket_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sock");
        let (l1, f1) = bind(&p).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Another server takes the path (as QEMU's would); the first
        // one, still listening, then removes nothing.
        let (l2, f2) = bind(&p).unwrap();
        f1.remove();
        assert!(p.exists(), "removed a socket it did not bind");
        drop(l1);
        f2.remove();
        assert!(!p.exists());
        drop(l2);
        // A stale socket file (nobody listening) is replaced too.
        let (l3, f3) = bind(&p).unwrap();
        drop(l3);
        let (_l4, f4) = bind(&p).unwrap();
        f4.remove();
        assert!(!p.exists());
        drop(f3);
    }

    #[test]
    fn other_files_and_bad_paths_get_qemus_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("file");
        std::fs::write(&p, b"keep").unwrap();
        let e = bind(&p).unwrap_err();
        assert_eq!(
            e.message(),
            format!(
                "Failed to bind socket to {}: Address already in use",
                p.display()
            )
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
        let e = bind(&dir.path().join("no/such/dir")).unwrap_err();
        assert!(
            e.message().ends_with(": No such file or directory"),
            "{}",
            e.message()
        );
        let long = dir.path().join("x".repeat(SUN_PATH_MAX));
        assert!(bind(&long).unwrap_err().message().ends_with("is too long"));
    }
}
