//! A monitor's listening UNIX socket: bound at a path as QEMU binds it,
//! and removed again by whoever bound it.
//!
//! Invariants:
//! - [`bind`] first unlinks whatever is at the path, as QEMU does (a
//!   socket file nobody listens on is what a crashed server leaves behind;
//!   QEMU replaces any other file just the same); only what cannot be
//!   unlinked (a directory) fails, with QEMU's text `Failed to unlink
//!   socket PATH: Is a directory`.
//! - The socket's mode is what the process umask leaves of 0777, as for
//!   every QEMU socket (umask 002 lets a management group connect; the
//!   owner narrows it with the umask, or the directory's permissions).
//! - [`SocketFile::remove`] unlinks the path only while it still names the
//!   socket that was bound (same device and inode), so a server never
//!   removes a socket that another one put at the same path since. Call it
//!   while the listener is still open: a bound socket holds its inode, so
//!   the number cannot have been reused for a newer socket yet
//!   ([`super::QmpServer`] does so when given the file).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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

/// Bind a listening UNIX socket at `path` (see the module doc for what
/// may be at `path` already, and the mode). Errors carry QEMU's texts
/// and the errno.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    let with_errno = |err: Error, e: &io::Error| match e.raw_os_error() {
        Some(n) => err.with_errno(n),
        None => err,
    };
    if path.as_os_str().len() >= SUN_PATH_MAX {
        return Err(
            Error::generic(format!("UNIX socket path '{}' is too long", path.display()))
                .with_errno(libc::ENAMETOOLONG),
        );
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            let msg = format!(
                "Failed to unlink socket {}: {}",
                path.display(),
                os_text(&e)
            );
            return Err(with_errno(Error::generic(msg), &e));
        }
        _ => {}
    }
    let bind_err = |e: &io::Error| {
        let msg = format!(
            "Failed to bind socket to {}: {}",
            path.display(),
            os_text(e)
        );
        with_errno(Error::generic(msg), e)
    };
    let listener = UnixListener::bind(path).map_err(|e| bind_err(&e))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok((
            listener,
            SocketFile {
                path: path.to_path_buf(),
                dev: m.dev(),
                ino: m.ino(),
            },
        )),
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
    fn replaces_a_socket_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sock");
        let (l1, f1) = bind(&p).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
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
    fn other_files_are_replaced_directories_and_bad_paths_get_qemus_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("file");
        std::fs::write(&p, b"stale").unwrap();
        let (_l, f) = bind(&p).unwrap();
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_socket()
        );
        f.remove();
        let d = dir.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        let e = bind(&d).unwrap_err();
        assert_eq!(
            e.message(),
            format!("Failed to unlink socket {}: Is a directory", d.display())
        );
        assert!(d.is_dir());
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
