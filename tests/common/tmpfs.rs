//! A real filesystem that fills up: a small tmpfs (needs root).

use std::path::PathBuf;
use std::process::Command;

/// A tmpfs of `mib` MiB on a fresh directory, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    pub fn new(mib: u64) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir,
            _parent: parent,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|st| st.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
