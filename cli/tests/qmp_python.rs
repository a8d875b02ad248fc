//! The Python QMP suite in `cli/tests/qmp/` (pytest with the `qemu.qmp`
//! package, in a virtual environment `cli/tests/qmp/run.sh` creates under
//! `target/qmp-venv`): the same scenarios against `qemu-storage-daemon`
//! and `blockjob daemon` with traces compared, fuzzing and load against
//! ours. Run here so that `cargo test` covers it; on its own:
//! `bash cli/tests/qmp/run.sh [pytest args]`.

use std::process::Command;

#[test]
fn python_qmp_suite() {
    let root = env!("CARGO_MANIFEST_DIR");
    for tool in ["python3", "qemu-storage-daemon", "qemu-img", "qemu-io"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{tool} is required (apt-get install -y qemu-utils python3; .ci/run does it)"
        );
    }
    let out = Command::new("bash")
        .arg(format!("{root}/tests/qmp/run.sh"))
        .env("BLOCKJOB_BIN", env!("CARGO_BIN_EXE_blockjob"))
        .current_dir(root)
        .output()
        .expect("bash tests/qmp/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/qmp/run.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The summary, for --nocapture.
    println!("{}", stdout.lines().last().unwrap_or_default());
}
