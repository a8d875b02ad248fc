//! Running the real tools (QEMU's, libnbd's) from a test.

use std::path::Path;
use std::process::Command;

/// Run `cmd` with `args`: whether it succeeded, and its stdout + stderr.
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// [`run`], which must succeed: its output.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (success, out) = run(cmd, args);
    assert!(success, "{cmd} {args:?}: {out}");
    out
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The NBD URL of export `name` on the UNIX socket `sock`.
pub fn nbd_url(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}
