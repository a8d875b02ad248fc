//! Shared helpers of the integration tests.

#![allow(dead_code)]

pub mod chain;
pub mod cmd;
pub mod cprog;
pub mod crash;
pub mod gated;
pub mod guest;
pub mod nbd;
pub mod nodes;
pub mod oracle;
pub mod qmp;
pub mod tls;
pub mod tmpfs;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of `libblockjob.a`, built by a nested `cargo build --lib` (the
/// staticlib of a `cargo test` run is not uplifted, so ask cargo exactly
/// which file it produced).
pub fn staticlib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = std::env::current_exe()
            .map(|p| p.components().any(|c| c.as_os_str() == "release"))
            .unwrap_or(false);
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--lib",
            "--message-format=json-render-diagnostics",
        ]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build --lib failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["reason"] != "compiler-artifact" || v["target"]["name"] != "blockjob" {
                continue;
            }
            if let Some(files) = v["filenames"].as_array() {
                for f in files {
                    if let Some(f) = f.as_str()
                        && f.ends_with(".a")
                    {
                        return PathBuf::from(f);
                    }
                }
            }
        }
        panic!("cargo did not report libblockjob.a")
    })
    .clone()
}

/// Install-or-fail check for a tool the tests need (CI installs them).
pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is required (apt-get install -y qemu-utils valgrind; .ci/run does it)"
    );
}
