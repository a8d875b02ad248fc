//! Building and running the C test programs of `c-tests/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::staticlib;

pub fn c_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c-tests")
}

pub fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-tests");
    std::fs::create_dir_all(&d).expect("create the C build directory");
    d
}

/// Compile `c-tests/<name>.c` once; returns the executable.
pub fn build(name: &str) -> PathBuf {
    static LOCK: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    let lib = staticlib();
    let exe = out_dir().join(name);
    let _g = LOCK.get_or_init(Default::default).lock().unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-g",
            "-O1",
        ])
        .arg("-D_POSIX_C_SOURCE=200809L")
        .arg("-I")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg("-I")
        .arg(c_dir())
        .arg(c_dir().join(format!("{name}.c")))
        .arg(&lib)
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling {name}.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Number of `RUN(` lines in a C file: the cases it declares.
pub fn declared_cases(name: &str) -> usize {
    let src = std::fs::read_to_string(c_dir().join(format!("{name}.c"))).unwrap();
    src.lines()
        .filter(|l| l.trim_start().starts_with("RUN("))
        .count()
}

fn execute(name: &str, envs: &[(&str, &Path)]) -> String {
    let exe = build(name);
    let tmp = tempfile::tempdir().unwrap();
    let valgrind = std::env::var_os("BJ_VALGRIND").is_some();
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        c.args([
            "--leak-check=full",
            "--error-exitcode=1",
            "--errors-for-leak-kinds=definite,possible",
            "--quiet",
        ])
        .arg(format!(
            "--suppressions={}",
            c_dir().join("valgrind.supp").display()
        ))
        .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd
        .envs(envs.iter().copied())
        .env("BJ_TMPDIR", tmp.path())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// Build and run a program without cases; its stdout.
pub fn run_plain(name: &str) -> String {
    execute(name, &[])
}

/// Build and run a test program; every declared case must report `ok`.
pub fn run(name: &str) -> String {
    run_with_env(name, &[])
}

/// As [`run`], with these environment variables (paths the test made).
pub fn run_with_env(name: &str, envs: &[(&str, &Path)]) -> String {
    let stdout = execute(name, envs);
    let ok = stdout.lines().filter(|l| l.starts_with("ok - ")).count();
    let want = declared_cases(name);
    assert!(want > 0, "{name}.c declares no cases");
    assert_eq!(
        ok, want,
        "{name}: {ok} cases passed, {want} declared\n{stdout}"
    );
    stdout
}
