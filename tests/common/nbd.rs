//! NBD servers for the client tests: `qemu-nbd` and `nbdkit` on a UNIX
//! socket or a TCP port, killed on drop; and blockdev-add options that
//! reach them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Where a test server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

impl Listen {
    /// blockdev-add's `server` member.
    pub fn server(&self) -> Value {
        match self {
            Listen::Unix(p) => json!({"type": "unix", "path": p}),
            Listen::Tcp(port) => {
                json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string()})
            }
        }
    }

    /// qemu-img's URL of an export.
    pub fn url(&self, export: &str) -> String {
        match self {
            Listen::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }

    fn ready(&self) -> bool {
        match self {
            Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// nbdkit reports every injected error and every readiness probe on
/// stderr: the tests check the effects instead.
fn stderr_of(prog: &str) -> Stdio {
    if prog == "nbdkit" {
        Stdio::null()
    } else {
        Stdio::inherit()
    }
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server process.
pub struct Server {
    child: Child,
    pub listen: Listen,
    /// What started it, to start it again.
    cmd: (String, Vec<String>),
}

/// Installs nbdkit and libnbd-bin when missing (CI does the same in
/// `.ci/run`): the tests need them, they are not optional.
pub fn require_nbdkit() {
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have("nbdkit") && have("nbdinfo") {
        return;
    }
    let sudo = if nix_is_root() { "" } else { "sudo " };
    let st = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq nbdkit libnbd-bin"
            ),
        ])
        .status()
        .expect("run apt-get");
    assert!(st.success(), "installing nbdkit and libnbd-bin failed");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Server {
    fn spawn(prog: &str, args: Vec<String>, listen: Listen) -> Server {
        let child = Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_of(prog))
            .spawn()
            .unwrap_or_else(|e| panic!("start {prog}: {e}"));
        let mut s = Server {
            child,
            listen,
            cmd: (prog.to_string(), args),
        };
        s.wait_ready();
        s
    }

    /// Polls until the socket accepts (the servers have no readiness
    /// signal that works for both); 10 s at most.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.listen.ready() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited: {st}", self.cmd.0);
            }
            assert!(Instant::now() < deadline, "{} did not listen", self.cmd.0);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `qemu-nbd` serving `image` as `export` (persistent, many clients).
    pub fn qemu_nbd(image: &Path, format: &str, export: &str, listen: Listen) -> Server {
        super::require_tool("qemu-nbd");
        let mut args: Vec<String> = vec![
            "-t".into(),
            "-e".into(),
            "8".into(),
            "-x".into(),
            export.into(),
            "-f".into(),
            format.into(),
            "--cache=writeback".into(),
        ];
        match &listen {
            Listen::Unix(p) => args.extend(["-k".into(), p.display().to_string()]),
            Listen::Tcp(port) => args.extend([
                "-b".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]),
        }
        args.push(image.display().to_string());
        Server::spawn("qemu-nbd", args, listen)
    }

    /// `nbdkit` with `args` (plugin, filters, parameters) after the
    /// listening options.
    pub fn nbdkit(args: &[&str], listen: Listen) -> Server {
        require_nbdkit();
        let mut a: Vec<String> = vec!["-f".into(), "--exit-with-parent".into()];
        match &listen {
            Listen::Unix(p) => a.extend(["-U".into(), p.display().to_string()]),
            Listen::Tcp(port) => a.extend([
                "-i".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]),
        }
        a.extend(args.iter().map(|s| s.to_string()));
        Server::spawn("nbdkit", a, listen)
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Starts it again with the same command line.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Command::new(&self.cmd.0)
            .args(&self.cmd.1)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_of(&self.cmd.0))
            .spawn()
            .unwrap();
        self.wait_ready();
    }

    /// Stops it cleanly (SIGTERM) so an image it wrote is complete.
    pub fn stop(mut self) {
        let _ = nix_kill_term(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

fn nix_kill_term(pid: u32) -> std::io::Result<()> {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|_| ())
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// blockdev-add options of an nbd node.
pub fn nbd_node(name: &str, listen: &Listen, export: &str, extra: Value) -> Value {
    let mut v = json!({"driver": "nbd", "node-name": name, "server": listen.server(),
        "export": export});
    if let Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
    v
}

/// Runs a command that must succeed; its stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
