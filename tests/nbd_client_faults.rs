//! The `nbd` driver when things go wrong: a server that breaks the
//! protocol (written here: truncated replies, unknown cookies, oversized
//! lengths, chunks outside their request, a reply stalled in its middle,
//! garbage), errors the server reports (nbdkit's `error` filter: ENOSPC
//! and EIO driving the mirror's target error policy, compared with
//! qemu-storage-daemon as the client of the same server), slow servers
//! (nbdkit's `delay` filter), and a server killed and restarted under a
//! running mirror, with and without `reconnect-delay` (compared with QEMU).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blockjob::nbd::proto::{self, Buf, Request, chunk, cmd, info, opt, rep, tflag};
use common::nbd::{Listen, Server, nbd_node, run};
use common::oracle::{Ours, Side};
use common::qmp::{Daemon, summarize};
use serde_json::json;

const MIB: u64 = 1 << 20;

// ---- a misbehaving server ----------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Evil {
    /// Half a data chunk, then the connection closes.
    Truncated,
    /// A reply for a cookie nobody used.
    WrongCookie,
    /// A data chunk claiming 4 GiB.
    Oversized,
    /// A data chunk for bytes the request did not ask for.
    OutOfRange,
    /// Ten bytes of a reply header, then silence (connection kept open).
    Stall,
    /// Bytes that are no reply magic.
    Garbage,
}

const EVIL_SIZE: u64 = 1 << 20;

/// Negotiates as a minimal fixed-newstyle server (structured replies, no
/// meta contexts), then answers the first read as `evil` says. Serves one
/// connection.
fn evil_server(listener: UnixListener, evil: Evil) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let _ = serve_evil(&mut s, evil);
        if evil == Evil::Stall {
            // Keep the connection open and silent until the client leaves.
            let mut b = [0u8; 4096];
            while matches!(s.read(&mut b), Ok(n) if n > 0) {}
        }
    })
}

fn serve_evil(s: &mut UnixStream, evil: Evil) -> std::io::Result<()> {
    let mut b = Buf::default();
    b.u64(proto::NBD_MAGIC)
        .u64(proto::IHAVEOPT)
        .u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&b.0)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    loop {
        let (o, _) = proto::read_option(s)?;
        match o {
            opt::STRUCTURED_REPLY => proto::write_option_reply(s, o, rep::ACK, &[])?,
            opt::GO => {
                let mut i = Buf::default();
                i.u16(info::EXPORT)
                    .u64(EVIL_SIZE)
                    .u16(tflag::HAS_FLAGS | tflag::SEND_FLUSH);
                proto::write_option_reply(s, o, rep::INFO, &i.0)?;
                proto::write_option_reply(s, o, rep::ACK, &[])?;
                break;
            }
            _ => proto::write_option_reply(s, o, rep::ERR_UNSUP, &[])?,
        }
    }
    loop {
        let r = Request::read(s, false)?;
        if r.kind == cmd::WRITE {
            std::io::copy(&mut (&mut *s).take(r.length), &mut std::io::sink())?;
        }
        let hdr =
            |flags, kind, cookie, len| proto::chunk_header(false, flags, kind, cookie, 0, len);
        match (r.kind, evil) {
            (cmd::DISC, _) => return Ok(()),
            (cmd::READ, Evil::Truncated) => {
                s.write_all(&hdr(
                    proto::REPLY_FLAG_DONE,
                    chunk::OFFSET_DATA,
                    r.cookie,
                    8 + r.length,
                ))?;
                s.write_all(&r.offset.to_be_bytes())?;
                s.write_all(&vec![0xaa; r.length as usize / 2])?;
                return Ok(());
            }
            (cmd::READ, Evil::WrongCookie) => {
                s.write_all(&hdr(
                    proto::REPLY_FLAG_DONE,
                    chunk::NONE,
                    r.cookie + 1000,
                    0,
                ))?;
            }
            (cmd::READ, Evil::Oversized) => {
                s.write_all(&hdr(
                    proto::REPLY_FLAG_DONE,
                    chunk::OFFSET_DATA,
                    r.cookie,
                    0xffff_fff0,
                ))?;
            }
            (cmd::READ, Evil::OutOfRange) => {
                s.write_all(&hdr(
                    proto::REPLY_FLAG_DONE,
                    chunk::OFFSET_DATA,
                    r.cookie,
                    8 + r.length,
                ))?;
                s.write_all(&(r.offset + 512).to_be_bytes())?;
                s.write_all(&vec![0xaa; r.length as usize])?;
            }
            (cmd::READ, Evil::Stall) => {
                s.write_all(
                    &hdr(
                        proto::REPLY_FLAG_DONE,
                        chunk::OFFSET_DATA,
                        r.cookie,
                        8 + r.length,
                    )[..10],
                )?;
                return Ok(());
            }
            (cmd::READ, Evil::Garbage) => s.write_all(&[0x5a; 64])?,
            _ => s.write_all(&proto::simple_reply(0, r.cookie))?,
        }
    }
}

/// Runs `f` on a thread: its result, or a panic if it takes longer than
/// `limit` (the hang this test exists to rule out).
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no result within {limit:?}: a hang"))
}

#[test]
fn hostile_replies_are_errors_never_hangs() {
    let d = tempfile::tempdir().unwrap();
    let ours = std::sync::Arc::new(Ours::new());
    for (i, evil) in [
        Evil::Truncated,
        Evil::WrongCookie,
        Evil::Oversized,
        Evil::OutOfRange,
        Evil::Garbage,
        Evil::Stall,
    ]
    .into_iter()
    .enumerate()
    {
        let sock = d.path().join(format!("evil{i}.sock"));
        let server = evil_server(UnixListener::bind(&sock).unwrap(), evil);
        let name = format!("e{i}");
        ours.ctx
            .blockdev_add(&nbd_node(&name, &Listen::Unix(sock), "", json!({})))
            .unwrap();
        let node = ours.ctx.lookup(&name).unwrap();
        // A write the server acknowledges: the connection works.
        node.pwrite(0, &[1; 4096]).unwrap();
        let n2 = node.clone();
        let started = Instant::now();
        let r = bounded(Duration::from_secs(30), move || {
            let mut b = vec![0; 65536];
            n2.pread(0, &mut b).map(|_| b)
        });
        let e = r.expect_err(&format!("{evil:?}: the read must fail"));
        assert_eq!(e.errno(), Some(libc::EIO), "{evil:?}: {e:?}");
        if evil == Evil::Stall {
            assert!(
                started.elapsed() >= Duration::from_secs(9),
                "stall detected early"
            );
        }
        // The node stays failed (protocol errors) or has no server to go
        // back to (the truncating one served once): at once, EIO.
        let n3 = node.clone();
        let t = Instant::now();
        let again = bounded(Duration::from_secs(5), move || n3.pread(0, &mut [0; 512]));
        assert_eq!(again.unwrap_err().errno(), Some(libc::EIO), "{evil:?}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{evil:?}: not at once"
        );
        drop(node);
        // Closing joins the reader and closes the socket: the server
        // thread sees the end of its connection.
        let ctx = ours.clone();
        bounded(Duration::from_secs(10), move || {
            ctx.ctx.blockdev_del(&name).unwrap();
        });
        bounded(Duration::from_secs(10), move || server.join().unwrap());
    }
}

// ---- server errors drive the job's error policy -----------------------------

/// A mirror from a local raw file into an nbdkit memory export whose
/// writes fail with `errno` while `flag` exists: the events, with runs of
/// equal events merged (how many requests were in flight when the server
/// started failing differs between runs), and whether the target ended
/// equal to the source.
fn mirror_into_failing_server(
    side: &mut dyn Side,
    dir: &Path,
    errno: &str,
    policy: &str,
) -> Vec<String> {
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..8 * MIB as usize)
        .map(|i| (i / 4096 % 255) as u8 + 1)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let flag = dir.join("fail-now");
    std::fs::write(&flag, b"").unwrap();
    let listen = Listen::Unix(dir.join("k.sock"));
    let _server = Server::nbdkit(
        &[
            "--filter=error",
            "memory",
            "size=8M",
            &format!("error-pwrite={errno}"),
            "error-pwrite-rate=100%",
            &format!("error-pwrite-file={}", flag.display()),
        ],
        listen.clone(),
    );
    side.cmd(
        "blockdev-add",
        json!({"driver":"raw","node-name":"src","file":{"driver":"file","filename":src}}),
    )
    .unwrap();
    side.cmd("blockdev-add", nbd_node("tgt", &listen, "", json!({})))
        .unwrap();
    side.cmd(
        "blockdev-mirror",
        json!({"job-id":"job0","device":"src","target":"tgt","sync":"full",
            "on-target-error": policy}),
    )
    .unwrap();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let ev = side
            .event_within(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no event; saw {seen:?}"));
        let s = summarize(&ev);
        match s.as_str() {
            "JSC:paused" => {
                // The administrator frees space, then resumes the job.
                let _ = std::fs::remove_file(&flag);
                side.cmd("block-job-resume", json!({"device":"job0"}))
                    .unwrap();
            }
            "READY" => {
                side.cmd("block-job-complete", json!({"device":"job0"}))
                    .unwrap();
            }
            _ => {}
        }
        let end = s == "JSC:null";
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        if end {
            break;
        }
    }
    if seen.contains(&"COMPLETED".to_string()) {
        // The export holds the source now: read it back through nbdinfo's
        // sibling, nbdcopy.
        let out = dir.join("back.raw");
        run("nbdcopy", &[&listen.url(""), out.to_str().unwrap()]);
        seen.push(format!(
            "identical: {}",
            std::fs::read(&out).unwrap() == data
        ));
    }
    seen
}

#[test]
fn server_errors_drive_the_target_error_policy_as_in_qemu() {
    let mut diffs = Vec::new();
    for (errno, policy) in [
        ("ENOSPC", "enospc"),
        ("EIO", "enospc"),
        ("EIO", "stop"),
        ("ENOSPC", "report"),
    ] {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let mut qemu = Daemon::start();
        let q = mirror_into_failing_server(&mut qemu, d1.path(), errno, policy);
        drop(qemu);
        let mut ours = Ours::new();
        let o = mirror_into_failing_server(&mut ours, d2.path(), errno, policy);
        if errno == "ENOSPC" && policy == "enospc" {
            assert!(o.contains(&"ERR(write,stop)".to_string()), "{o:?}");
            assert!(o.contains(&"identical: true".to_string()), "{o:?}");
        }
        if q != o {
            diffs.push(format!("{errno} {policy}:\n  qemu: {q:?}\n  ours: {o:?}"));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn slow_server_is_waited_for() {
    let d = tempfile::tempdir().unwrap();
    let listen = Listen::Unix(d.path().join("slow.sock"));
    let _server = Server::nbdkit(
        &[
            "--filter=delay",
            "memory",
            "size=4M",
            "rdelay=200ms",
            "wdelay=100ms",
        ],
        listen.clone(),
    );
    let ours = Ours::new();
    ours.ctx
        .blockdev_add(&nbd_node("s", &listen, "", json!({})))
        .unwrap();
    let n = ours.ctx.lookup("s").unwrap();
    // 16 requests at once: they overlap on the one connection, so the
    // whole takes far less than 16 × 300 ms.
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..16u64 {
            let n = n.clone();
            s.spawn(move || {
                n.pwrite(i * 65536, &[i as u8 + 1; 65536]).unwrap();
                let mut b = vec![0; 65536];
                n.pread(i * 65536, &mut b).unwrap();
                assert!(b.iter().all(|x| *x == i as u8 + 1));
            });
        }
    });
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "{:?}: serialised?",
        t.elapsed()
    );
}

// ---- the server goes away under a mirror ------------------------------------

/// Mirrors 32 MiB from a local file into a qemu-nbd export at 8 MiB/s,
/// kills the server once the job is under way and starts it again: the
/// events (runs merged) and whether the export ended equal to the source.
fn mirror_across_server_restart(side: &mut dyn Side, dir: &Path, delay: u32) -> Vec<String> {
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..32 * MIB as usize)
        .map(|i| (i / 65536 % 251) as u8 + 1)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let tgt = dir.join("tgt.raw");
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let listen = Listen::Unix(dir.join("t.sock"));
    let mut server = Server::qemu_nbd(&tgt, "raw", "disk", listen.clone());
    side.cmd(
        "blockdev-add",
        json!({"driver":"raw","node-name":"src","file":{"driver":"file","filename":src}}),
    )
    .unwrap();
    side.cmd(
        "blockdev-add",
        nbd_node("tgt", &listen, "disk", json!({"reconnect-delay": delay})),
    )
    .unwrap();
    side.cmd(
        "blockdev-mirror",
        json!({"job-id":"job0","device":"src","target":"tgt","sync":"full",
            "speed": 8 * MIB, "buf-size": MIB, "on-target-error": "stop"}),
    )
    .unwrap();
    // Under way: some progress, far from done.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = side.cmd("query-block-jobs", json!({})).unwrap();
        let off = q[0]["offset"].as_u64().unwrap_or(0);
        if off >= 2 * MIB {
            assert!(off < 16 * MIB, "the copy went too fast to interrupt: {off}");
            break;
        }
        assert!(Instant::now() < deadline, "the mirror made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let mut seen: Vec<String> = Vec::new();
    let mut pending = Vec::new();
    if delay == 0 {
        // Down until a write failed (the policy stops the job).
        loop {
            let ev = side
                .event_within(Duration::from_secs(30))
                .unwrap_or_else(|| panic!("no error while the server is down: {pending:?}"));
            let s = summarize(&ev);
            pending.push(ev);
            if s.starts_with("ERR") {
                break;
            }
        }
    } else {
        // An outage of a second, well within the delay: requests wait.
        std::thread::sleep(Duration::from_secs(1));
    }
    server.restart();
    let mut resumes = 0;
    let mut pending = pending.into_iter();
    loop {
        let ev = match pending.next() {
            Some(ev) => ev,
            None => side
                .event_within(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("no event; saw {seen:?}")),
        };
        let s = summarize(&ev);
        match s.as_str() {
            "JSC:paused" => {
                resumes += 1;
                assert!(resumes < 50, "the job keeps stopping: {seen:?}");
                side.cmd("block-job-resume", json!({"device":"job0"}))
                    .unwrap();
            }
            "READY" => {
                side.cmd("block-job-complete", json!({"device":"job0"}))
                    .unwrap();
            }
            _ => {}
        }
        let end = s == "JSC:null";
        // Stop-and-resume cycles repeat until the client reconnected; how
        // many depends on timing: keep one of each.
        if !seen.contains(&s)
            || !s.starts_with("ERR")
                && !s.starts_with("JSC:paused")
                && !s.starts_with("JSC:running")
        {
            seen.push(s);
        }
        if end {
            break;
        }
    }
    side.cmd("blockdev-del", json!({"node-name":"tgt"}))
        .unwrap();
    server.stop();
    seen.push(format!(
        "identical: {}",
        std::fs::read(&tgt).unwrap() == data
    ));
    seen
}

#[test]
fn server_restart_under_a_mirror_as_in_qemu() {
    let mut diffs = Vec::new();
    for delay in [10, 0] {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let mut qemu = Daemon::start();
        let q = mirror_across_server_restart(&mut qemu, d1.path(), delay);
        drop(qemu);
        let mut ours = Ours::new();
        let o = mirror_across_server_restart(&mut ours, d2.path(), delay);
        assert!(
            o.contains(&"identical: true".to_string()),
            "delay {delay}: {o:?}"
        );
        if delay > 0 {
            assert!(
                !o.iter().any(|s| s.starts_with("ERR")),
                "delay {delay}: {o:?}"
            );
        } else {
            assert!(
                o.contains(&"ERR(write,stop)".to_string()),
                "delay {delay}: {o:?}"
            );
        }
        if q != o {
            diffs.push(format!(
                "reconnect-delay {delay}:\n  qemu: {q:?}\n  ours: {o:?}"
            ));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

// ---- reconnect-delay and open-timeout ------------------------------------------

#[test]
fn reconnect_delay_waits_then_fails_at_once_until_the_server_returns() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("r.raw");
    std::fs::write(&img, vec![0x42u8; MIB as usize]).unwrap();
    let listen = Listen::Unix(d.path().join("r.sock"));
    let mut server = Server::qemu_nbd(&img, "raw", "disk", listen.clone());
    let ours = Ours::new();
    ours.ctx
        .blockdev_add(&nbd_node(
            "r",
            &listen,
            "disk",
            json!({"reconnect-delay": 2}),
        ))
        .unwrap();
    let n = ours.ctx.lookup("r").unwrap();
    let mut b = vec![0; 4096];
    n.pread(0, &mut b).unwrap();
    server.kill();
    // Within the delay the request waits for a server, then fails.
    let t = Instant::now();
    assert_eq!(n.pread(0, &mut b).unwrap_err().errno(), Some(libc::EIO));
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "waited {waited:?}"
    );
    // After the delay: at once.
    let t = Instant::now();
    assert_eq!(n.pread(0, &mut b).unwrap_err().errno(), Some(libc::EIO));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The server returns: the node reconnects by itself.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.pread(0, &mut b).is_err() {
        assert!(Instant::now() < deadline, "no reconnection");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.iter().all(|x| *x == 0x42));
}

#[test]
fn open_timeout_retries_the_first_connection() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("o.raw");
    std::fs::write(&img, vec![7u8; MIB as usize]).unwrap();
    let listen = Listen::Unix(d.path().join("o.sock"));
    // Without open-timeout: QEMU's error at once.
    let ours = std::sync::Arc::new(Ours::new());
    let e = ours
        .ctx
        .blockdev_add(&nbd_node("o", &listen, "disk", json!({})))
        .unwrap_err();
    assert!(e.message().starts_with("Failed to connect to '"), "{e:?}");
    // With it, the server may come later.
    let (tx, rx) = mpsc::channel();
    let o2 = ours.clone();
    let l2 = listen.clone();
    std::thread::spawn(move || {
        let r = o2
            .ctx
            .blockdev_add(&nbd_node("o", &l2, "disk", json!({"open-timeout": 20})));
        let _ = tx.send(r.map(|_| ()));
    });
    // Still trying (not failed) while there is no server.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    let _server = Server::qemu_nbd(&img, "raw", "disk", listen);
    rx.recv_timeout(Duration::from_secs(20))
        .expect("blockdev-add returned")
        .unwrap();
    let mut b = vec![0; 512];
    ours.ctx.lookup("o").unwrap().pread(0, &mut b).unwrap();
    assert_eq!(b, vec![7; 512]);
}

/// A server that wants 4 KiB-aligned requests of at most 64 KiB (nbdkit's
/// blocksize-policy refuses anything else with EINVAL): unaligned reads
/// and writes of any size still work.
#[test]
fn server_block_size_constraints_are_honoured() {
    let d = tempfile::tempdir().unwrap();
    let listen = Listen::Unix(d.path().join("bs.sock"));
    let _server = Server::nbdkit(
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=4M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
        listen.clone(),
    );
    let ours = Ours::new();
    ours.ctx
        .blockdev_add(&nbd_node("b", &listen, "", json!({})))
        .unwrap();
    let n = ours.ctx.lookup("b").unwrap();
    let mut model = vec![0u8; 4 * MIB as usize];
    for (i, (off, len)) in [
        (1u64, 10usize),
        (4095, 2),
        (70000, 200_000),
        (0, 65536 * 3),
        (MIB - 7, 9),
    ]
    .into_iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        n.pwrite(off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    n.pwrite_zeroes(5000, 100_000, false).unwrap();
    model[5000..105_000].fill(0);
    let mut all = vec![0; 4 * MIB as usize];
    n.pread(0, &mut all).unwrap();
    assert!(all == model, "contents differ");
    let mut odd = vec![0; 12345];
    n.pread(333, &mut odd).unwrap();
    assert!(odd[..] == model[333..333 + 12345]);
    let st = n.block_status(4097, 3 * MIB).unwrap();
    assert!(st.len >= 1 && st.data, "{st:?}");
}
