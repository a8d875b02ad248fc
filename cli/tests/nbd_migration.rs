//! A live storage migration between two hosts, on one machine: the
//! destination daemon runs in its own network namespace, joined to the
//! source's by a veth pair, and exports an empty target over TCP; the
//! source daemon mirrors a guest disk into it through an `nbd` node in
//! `write-blocking` mode, over TLS with x509 certificates, while a guest writes at random through an NBD
//! export of the disk (so its writes go through the mirror's filter, as a
//! guest device's do), completes, and the destination image must equal
//! the guest's last view byte for byte.
//!
//! Run with every pairing of ours and qemu-storage-daemon, so each of our
//! sides is proven against QEMU's other side. Needs root (`ip netns`), as
//! the machines here and CI run.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::qmp::Qmp;
use serde_json::{Value, json};

const OURS: &str = env!("CARGO_BIN_EXE_blockjob");
const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to ours by a veth pair: we are `.1`, it is
/// `.2` of a /30. Removed on drop (which removes the pair too).
struct Netns {
    name: String,
    veth: String,
    subnet: u32,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        // Unique per test process and test: parallel tests get their own.
        let id = std::process::id() % 10000;
        // Unique per test process and tag: parallel tests must not share
        // addresses (a source would reach another test's destination).
        let tag_no = tag.bytes().fold(0u32, |h, b| h * 31 + b as u32);
        let subnet = (std::process::id().wrapping_mul(7) + tag_no) % 4096;
        let name = format!("bj{tag}{id}");
        let veth = format!("bjv{tag}{id}");
        let peer = format!("bjp{tag}{id}");
        run(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            veth: veth.clone(),
            subnet,
        };
        run(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ]);
        run(&["ip", "link", "set", &peer, "netns", &name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ip(1)),
            "dev",
            &veth,
        ]);
        run(&["ip", "link", "set", &veth, "up"]);
        let inside = |c: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &name];
            v.extend_from_slice(c);
            run(&v);
        };
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ip(2)),
            "dev",
            &peer,
        ]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Host `n` of the pair's /30.
    fn ip(&self, n: u32) -> String {
        format!("10.{}.{}.{}", 200 + self.subnet / 256, self.subnet % 256, n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A daemon (ours or qemu-storage-daemon), optionally in a namespace,
/// with a QMP monitor; killed on drop, its stderr printed if the test
/// fails.
struct Daemon {
    what: String,
    child: Child,
    qmp: Qmp,
    stderr: PathBuf,
}

impl Daemon {
    fn start(qsd: bool, netns: Option<&Netns>, dir: &Path, name: &str, args: &[String]) -> Daemon {
        let sock = dir.join(format!("{name}.qmp"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = netns {
            argv.extend(["ip", "netns", "exec", &ns.name].map(String::from));
        }
        if qsd {
            common::require_tool("qemu-storage-daemon");
            argv.push("qemu-storage-daemon".into());
        } else {
            argv.extend([OURS.to_string(), "daemon".into()]);
        }
        argv.push("--chardev".into());
        argv.push(format!(
            "socket,id=m,path={},server=on,wait=off",
            sock.display()
        ));
        argv.extend(["--monitor".into(), "chardev=m".into()]);
        argv.extend_from_slice(args);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let qmp = Qmp::connect(&sock);
        Daemon {
            what: format!(
                "{name} ({})",
                if qsd { "qemu-storage-daemon" } else { "ours" }
            ),
            child,
            qmp,
            stderr,
        }
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.qmp.ok(cmd, args)
    }

    /// A safe `block-export-del`: refused while a client is still
    /// connected, and the last client (a process that just exited) leaves
    /// asynchronously on both daemons, so try again for a while.
    fn export_del(&mut self, id: &str) {
        for _ in 0..100 {
            match self.qmp.execute("block-export-del", json!({ "id": id })) {
                Ok(_) => return,
                Err(e) if e.desc.ends_with("still in use") => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{}: block-export-del {id}: {e:?}", self.what),
            }
        }
        panic!("{}: export {id} still in use after 2 s", self.what);
    }

    /// Wait for `name` (failing on a job error or cancel).
    fn until(&mut self, name: &str) -> Value {
        loop {
            let e = self
                .qmp
                .next_event(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("{}: no {name} within 60 s", self.what));
            match e["event"].as_str().unwrap() {
                n if n == name => return e,
                "BLOCK_JOB_ERROR" | "BLOCK_JOB_CANCELLED" => {
                    panic!("{}: {e} while waiting for {name}", self.what)
                }
                _ => {}
            }
        }
    }

    fn quit(mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let st = self.child.wait().unwrap();
        assert!(st.success(), "{} exited with {st}", self.what);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let st = self.child.try_wait();
            eprintln!(
                "{}: status {st:?}, stderr:\n{}",
                self.what,
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deterministic disk: 1 MiB of data, then 1 MiB of hole, repeated.
fn make_disk(path: &Path) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; DISK as usize];
    for chunk in data.chunks_mut(2 * MIB as usize) {
        for b in chunk[..MIB as usize].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, &data).unwrap();
    // The holes are holes.
    run(&["fallocate", "--dig-holes", path.to_str().unwrap()]);
}

/// `count` random guest writes (4 KiB..64 KiB, 4 KiB aligned, each its
/// own pattern byte), as `qemu-io` commands.
fn guest_writes(seed: u64, count: usize) -> Vec<String> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count)
        .map(|i| {
            let len = (next() % 16 + 1) * 4096;
            let off = next() % ((DISK - len) / 4096) * 4096;
            format!("write -P {} {off} {len}", i % 255 + 1)
        })
        .collect()
}

fn migrate(src_qsd: bool, dst_qsd: bool) {
    common::require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    // x509 credentials: the destination verifies the source's client
    // certificate (verify-peer is on by default), the source the
    // destination's server certificate (issued for `localhost`).
    let pki = dir.path().join("pki");
    common::tls::make_pki(&pki, "Migration CA");
    let disk = dir.path().join("disk.raw");
    let dst = dir.path().join("dst.raw");
    make_disk(&disk);
    std::fs::File::create(&dst).unwrap().set_len(DISK).unwrap();

    let ns = Netns::new(&format!("{}{}", src_qsd as u8, dst_qsd as u8));
    let port = "10809";
    let mut d = Daemon::start(
        dst_qsd,
        Some(&ns),
        dir.path(),
        "dst",
        &[
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                pki.display()
            ),
            "--blockdev".into(),
            format!("driver=file,node-name=t,filename={}", dst.display()),
            "--nbd-server".into(),
            format!(
                "addr.type=inet,addr.host={},addr.port={port},tls-creds=tls0",
                ns.ip(2)
            ),
            "--export".into(),
            "type=nbd,id=e,node-name=t,name=disk,writable=on".into(),
        ],
    );

    let mut s = Daemon::start(src_qsd, None, dir.path(), "src", &[]);
    let guest_sock = dir.path().join("guest.nbd");
    s.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src",
               "file": {"driver": "file", "filename": disk}}),
    );
    s.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": guest_sock}}}),
    );
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "g", "node-name": "src", "name": "guest", "writable": true}),
    );
    s.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "client", "dir": pki}),
    );
    s.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "export": "disk",
               "server": {"type": "inet", "host": ns.ip(2), "port": port},
               "tls-creds": "tls0", "tls-hostname": "localhost"}),
    );
    s.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
               "copy-mode": "write-blocking"}),
    );

    // The guest writes while the mirror copies: one connection, one
    // write after another.
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw"]);
    for c in guest_writes(0x5eed ^ (src_qsd as u64) << 8 ^ dst_qsd as u64, 400) {
        io.args(["-c", &c]);
    }
    io.arg(format!("nbd+unix:///guest?socket={}", guest_sock.display()));
    let out = io.stdout(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    s.until("BLOCK_JOB_READY");
    s.ok("block-job-complete", json!({"device": "m"}));
    let done = s.until("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    s.export_del("g");
    s.ok("nbd-server-stop", json!({}));
    s.ok("blockdev-del", json!({"node-name": "tgt"}));
    s.quit();
    d.export_del("e");
    d.quit();

    // The guest's last view is the source file; the destination holds it.
    let (a, b) = (std::fs::read(&disk).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(a.len(), b.len());
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    if let (Some(first), Some(last)) = (diff.first(), diff.last()) {
        let zeroes = diff.iter().filter(|&&i| b[i] == 0).count();
        panic!(
            "destination differs from the guest's view in {} bytes ({first}..={last}; {zeroes} of them zero in the destination)",
            diff.len()
        );
    }
}

#[test]
fn qsd_to_qsd_is_the_reference() {
    migrate(true, true);
}

#[test]
fn qsd_source_into_our_destination() {
    migrate(true, false);
}

#[test]
fn our_source_into_a_qsd_destination() {
    migrate(false, true);
}

#[test]
fn ours_to_ours() {
    migrate(false, false);
}
