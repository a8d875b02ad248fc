//! TLS for NBD against QEMU's own implementation (GnuTLS), before our
//! NBD server and client exist: (a) our STARTTLS client helper against
//! `qemu-nbd --tls-creds`, reading and writing blocks through the session
//! and failing with QEMU's texts where QEMU refuses; (b) a test-only NBD
//! server (STARTTLS + GO + READ, in this file) on our server helpers, read
//! by `qemu-img info` and `qemu-io` through `tls-creds-x509,endpoint=client`
//! objects, refusing clients without the right certificate.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use blockjob::nbd::proto::{self, ReadBe, cmd, info, opt, rep, tflag};
use blockjob::nbd::tls::{self, PreTls};
use blockjob::nbd::tls_creds::{Endpoint, TlsCreds, TlsCredsOptions};
use blockjob::nbd::transport::{Socket, SocketAddress, Stream};
use common::tls::{make_pki, subset};

const SIZE: usize = 1 << 20;

fn creds(dir: &Path, endpoint: Endpoint, verify_peer: bool, sanity: bool) -> TlsCreds {
    let mut o = TlsCredsOptions::new("tls0");
    o.dir = Some(dir.to_path_buf());
    o.endpoint = endpoint;
    o.verify_peer = verify_peer;
    o.sanity_check = sanity;
    TlsCreds::load(o).unwrap()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run a QEMU tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-nbd` serving `img` with TLS on a UNIX socket; `--fork` returns
/// once the socket listens, so no polling; killed on drop.
struct QemuNbd {
    pid: i32,
    sock: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, name: &str, img: &Path, object: Option<String>) -> QemuNbd {
        common::require_tool("qemu-nbd");
        let sock = dir.join(format!("{name}.sock"));
        let pidfile = dir.join(format!("{name}.pid"));
        let mut c = Command::new("qemu-nbd");
        c.args(["-f", "raw", "-t", "--fork", "-k"])
            .arg(&sock)
            .arg(format!("--pid-file={}", pidfile.display()));
        if let Some(o) = object {
            c.args(["--object", &o, "--tls-creds", "tls0"]);
        }
        let (ok, text) = run(c.arg(img));
        assert!(ok, "qemu-nbd: {text}");
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        QemuNbd { pid, sock }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        // Not our child (it forked): wait until the pid is gone.
        while nix::sys::signal::kill(pid, None).is_ok() {
            std::thread::yield_now();
        }
    }
}

/// The fixed-newstyle greeting, client side: magic, IHAVEOPT, flags; we
/// answer FIXED_NEWSTYLE | NO_ZEROES.
fn client_hello(path: &Path) -> Box<dyn Stream> {
    let mut s = Socket::connect(
        &SocketAddress::Unix {
            path: path.to_path_buf(),
        },
        None,
    )
    .unwrap();
    assert_eq!(s.be64().unwrap(), proto::NBD_MAGIC);
    assert_eq!(s.be64().unwrap(), proto::IHAVEOPT);
    let flags = s.be16().unwrap();
    assert!(flags & proto::FLAG_FIXED_NEWSTYLE != 0);
    s.write_all(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    Box::new(s)
}

/// NBD_OPT_GO for the default export: its size, or the refusal.
fn go(s: &mut Box<dyn Stream>) -> io::Result<Result<u64, (u32, String)>> {
    proto::write_option(s, opt::GO, &proto::go_payload("", &[]))?;
    let mut size = None;
    loop {
        let r = proto::read_option_reply(s, opt::GO)?;
        if r.is_error() {
            return Ok(Err((r.kind, r.message())));
        }
        match r.kind {
            rep::INFO if r.data.len() >= 12 && r.data[..2] == info::EXPORT.to_be_bytes() => {
                size = Some(u64::from_be_bytes(r.data[2..10].try_into().unwrap()));
            }
            rep::INFO => {}
            rep::ACK => return Ok(Ok(size.expect("NBD_INFO_EXPORT before ACK"))),
            k => panic!("unexpected reply {k}"),
        }
    }
}

/// STARTTLS then GO: the export size, or why not.
fn tls_connect(sock: &Path, c: &TlsCreds) -> Result<(Box<dyn Stream>, u64), String> {
    let s = client_hello(sock);
    let mut s = tls::client_starttls(s, c, Some("localhost")).map_err(|e| e.to_string())?;
    match go(&mut s) {
        Ok(Ok(size)) => Ok((s, size)),
        Ok(Err((k, m))) => Err(format!("GO refused {k:#x}: {m}")),
        Err(e) => Err(format!("GO failed: {e}")),
    }
}

fn request(w: &mut dyn Write, kind: u16, cookie: u64, offset: u64, len: u64) {
    let r = proto::Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length: len,
    };
    w.write_all(&r.encode(false)).unwrap();
}

fn simple_reply(r: &mut dyn Read, cookie: u64) {
    match proto::ReplyHeader::read(r, false).unwrap() {
        proto::ReplyHeader::Simple {
            error: 0,
            cookie: c,
        } => assert_eq!(c, cookie),
        other => panic!("reply {other:?}"),
    }
}

#[test]
fn our_client_helpers_against_qemu_nbd() {
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    make_pki(&pki, "Interop CA");
    let other = d.path().join("other");
    make_pki(&other, "Other CA");
    let only_ca = d.path().join("only-ca");
    subset(&pki, &only_ca, &["ca-cert.pem"]);
    let img = d.path().join("a.raw");
    let mut data = vec![0u8; SIZE];
    data[..65536].fill(0xab);
    std::fs::write(&img, &data).unwrap();
    let obj = |extra: &str| {
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}{extra}",
            pki.display()
        )
    };
    let qemu = QemuNbd::start(d.path(), "tls", &img, Some(obj("")));
    let plain = QemuNbd::start(d.path(), "plain", &img, None);

    // STARTTLS, GO, then blocks both ways over the split transport.
    let (s, size) = tls_connect(&qemu.sock, &creds(&pki, Endpoint::Client, true, true))
        .map_err(|e| e.to_string())
        .unwrap();
    assert_eq!(size, SIZE as u64);
    let mut t = s.into_transport().unwrap();
    let payload = vec![0xcd; 65536];
    request(&mut t.writer, cmd::WRITE, 1, 131072, 65536);
    t.writer.write_all(&payload).unwrap();
    simple_reply(&mut t.reader, 1);
    request(&mut t.writer, cmd::READ, 2, 0, 65536);
    simple_reply(&mut t.reader, 2);
    let mut got = vec![0u8; 65536];
    t.reader.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0xab));
    request(&mut t.writer, cmd::FLUSH, 3, 0, 0);
    simple_reply(&mut t.reader, 3);
    request(&mut t.writer, cmd::DISC, 4, 0, 0);
    // The server closes after DISC: the reader sees the end.
    assert_eq!(t.reader.read(&mut [0u8; 1]).unwrap(), 0);
    t.closer.close();
    // What we wrote is in the image, as qemu-io reads it.
    let (ok, text) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-U",
        "-c",
        "read -P 0xcd 128k 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0 64k 64k",
        img.to_str().unwrap(),
    ]));
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "{text}"
    );

    // Our client trusts another CA.
    assert_eq!(
        tls_connect(&qemu.sock, &creds(&other, Endpoint::Client, true, true)).err(),
        Some("The certificate hasn't got a known issuer".into())
    );
    // No client certificate: qemu-nbd's default for a server endpoint is
    // verify-peer=on, so the session ends before GO is answered.
    let e = tls_connect(&qemu.sock, &creds(&only_ca, Endpoint::Client, true, true))
        .err()
        .unwrap();
    assert!(e.starts_with("GO failed"), "{e}");
    // Without TLS, every option but STARTTLS is refused (QEMU's text).
    let mut s = client_hello(&qemu.sock);
    assert_eq!(
        go(&mut s).unwrap(),
        Err((
            rep::ERR_TLS_REQD,
            "Option 0x7 not permitted before TLS".into()
        ))
    );
    // TLS against a server without it: QEMU's client text.
    assert_eq!(
        tls::client_starttls(
            client_hello(&plain.sock),
            &creds(&pki, Endpoint::Client, true, true),
            Some("localhost"),
        )
        .err()
        .map(|e| e.to_string()),
        Some("Denied by server for option 5 (starttls)".into())
    );
    drop(qemu);

    // With verify-peer=off, the same certificate-less client is served.
    let lax = QemuNbd::start(d.path(), "lax", &img, Some(obj(",verify-peer=off")));
    let (_, size) = tls_connect(&lax.sock, &creds(&only_ca, Endpoint::Client, true, true))
        .map_err(|e| e.to_string())
        .unwrap();
    assert_eq!(size, SIZE as u64);
}

/// A test-only NBD server: the greeting, options before TLS by our
/// policy helper, after TLS only GO (everything else unsupported), then
/// READ from a pattern image until DISC. Counts the reads it served and
/// sends each connection's outcome on a channel.
struct TestServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    outcomes: mpsc::Receiver<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
}

fn image() -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    v[..65536].fill(0x5a);
    v
}

fn serve(s: Socket, creds: &TlsCreds, reads: &AtomicUsize) -> io::Result<()> {
    let mut s: Box<dyn Stream> = Box::new(s);
    s.write_all(&proto::NBD_MAGIC.to_be_bytes())?;
    s.write_all(&proto::IHAVEOPT.to_be_bytes())?;
    s.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
    s.be32()?;
    // Before TLS.
    let mut s = loop {
        let (o, data) = proto::read_option(&mut s)?;
        match tls::server_pre_tls_option(s, creds, o, &data)? {
            PreTls::Tls(t) => break t,
            PreTls::Refused(p) => s = p,
            PreTls::Close => return Ok(()),
        }
    };
    // After TLS.
    loop {
        let (o, _) = proto::read_option(&mut s)?;
        match o {
            opt::GO => {
                let mut b = Vec::new();
                b.extend_from_slice(&info::EXPORT.to_be_bytes());
                b.extend_from_slice(&(SIZE as u64).to_be_bytes());
                b.extend_from_slice(&(tflag::HAS_FLAGS | tflag::READ_ONLY).to_be_bytes());
                proto::write_option_reply(&mut s, o, rep::INFO, &b)?;
                proto::write_option_reply(&mut s, o, rep::ACK, &[])?;
                break;
            }
            opt::ABORT => {
                proto::write_option_reply(&mut s, o, rep::ACK, &[])?;
                return Ok(());
            }
            _ => proto::write_option_reply(&mut s, o, rep::ERR_UNSUP, &[])?,
        }
    }
    let img = image();
    let mut t = s.into_transport()?;
    loop {
        let r = proto::Request::read(&mut t.reader, false)?;
        match r.kind {
            cmd::READ if r.offset + r.length <= SIZE as u64 => {
                let (a, b) = (r.offset as usize, (r.offset + r.length) as usize);
                // Counted before the client can see the data, so a count
                // read after the client finished includes it.
                reads.fetch_add(1, Ordering::SeqCst);
                t.writer.write_all(&proto::simple_reply(0, r.cookie))?;
                t.writer.write_all(&img[a..b])?;
            }
            cmd::DISC => break,
            _ => t.writer.write_all(&proto::simple_reply(
                proto::errno_to_nbd(libc::EINVAL),
                r.cookie,
            ))?,
        }
    }
    t.closer.close();
    Ok(())
}

impl TestServer {
    fn start(dir: &Path, creds: TlsCreds) -> TestServer {
        let path = dir.join("ours.sock");
        let l = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let (tx, outcomes) = mpsc::channel();
        let (st, rd) = (stop.clone(), reads.clone());
        let thread = std::thread::spawn(move || {
            // One connection at a time: QEMU's tools connect once each.
            for c in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let r = serve(Socket::Unix(c.unwrap()), &creds, &rd);
                let _ = tx.send(r.map_err(|e| e.to_string()));
            }
        });
        TestServer {
            path,
            stop,
            reads,
            outcomes,
            thread: Some(thread),
        }
    }

    /// The error of the next failed connection (successful ones, whose
    /// clients may exit before the server saw DISC, are skipped).
    fn next_error(&self) -> String {
        loop {
            match self.outcomes.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return e,
                Err(e) => panic!("no failed connection: {e}"),
            }
        }
    }

    /// Stops the server; the failures not yet taken.
    fn finish(mut self) -> Vec<String> {
        self.stop_thread();
        self.outcomes.try_iter().filter_map(|r| r.err()).collect()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which sees the flag and ends.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn client_object(dir: &Path, extra: &str) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}{extra}",
        dir.display()
    )
}

fn image_opts(sock: &Path) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    )
}

#[test]
fn qemu_tools_read_through_our_server_helpers() {
    common::require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    make_pki(&pki, "Server CA");
    let other = d.path().join("other");
    make_pki(&other, "Stranger CA");
    let srv = TestServer::start(d.path(), creds(&pki, Endpoint::Server, true, true));

    let (ok, text) = run(Command::new("qemu-img").args([
        "info",
        "--object",
        &client_object(&pki, ""),
        "--image-opts",
        &image_opts(&srv.path),
    ]));
    assert!(ok, "{text}");
    assert!(
        text.contains("virtual size: 1 MiB (1048576 bytes)"),
        "{text}"
    );
    let (ok, text) = run(Command::new("qemu-io").args([
        "-r",
        "--object",
        &client_object(&pki, ""),
        "--image-opts",
        &image_opts(&srv.path),
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "read -P 0 64k 64k",
    ]));
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "{text}"
    );
    assert!(
        text.contains("read 65536/65536 bytes at offset 65536"),
        "{text}"
    );
    assert!(srv.reads.load(Ordering::SeqCst) >= 2);
    let served = srv.reads.load(Ordering::SeqCst);

    // Without a client certificate: refused by our verify-peer=on server.
    let only_ca = d.path().join("only-ca");
    subset(&pki, &only_ca, &["ca-cert.pem"]);
    let (ok, text) = run(Command::new("qemu-io").args([
        "-r",
        "--object",
        &client_object(&only_ca, ""),
        "--image-opts",
        &image_opts(&srv.path),
        "-c",
        "read 0 64k",
    ]));
    assert!(!ok, "{text}");
    assert_eq!(srv.next_error(), "Verify failed: No certificate was found.");
    // A certificate from a CA we do not know (QEMU's own sanity check
    // would refuse to load it, so it is off for this client). GnuTLS
    // offers a client certificate only if its issuer is among the CAs our
    // server names in its request, so it sends none: the same refusal.
    let stranger = d.path().join("stranger");
    subset(&pki, &stranger, &["ca-cert.pem"]);
    subset(&other, &stranger, &["client-cert.pem", "client-key.pem"]);
    let (ok, text) = run(Command::new("qemu-io").args([
        "-r",
        "--object",
        &client_object(&stranger, ",sanity-check=off"),
        "--image-opts",
        &image_opts(&srv.path),
        "-c",
        "read 0 64k",
    ]));
    assert!(!ok, "{text}");
    assert_eq!(srv.next_error(), "Verify failed: No certificate was found.");
    // QEMU's client checks our server's certificate too (after the
    // handshake, so it needs a certificate our server accepts; trusting
    // another CA fails QEMU's own sanity check, hence off).
    let distrust = d.path().join("distrust");
    subset(&other, &distrust, &["ca-cert.pem"]);
    subset(&pki, &distrust, &["client-cert.pem", "client-key.pem"]);
    let (ok, text) = run(Command::new("qemu-img").args([
        "info",
        "--object",
        &client_object(&distrust, ",sanity-check=off"),
        "--image-opts",
        &image_opts(&srv.path),
    ]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("The certificate hasn't got a known issuer"),
        "{text}"
    );
    // Our side sees the client go away before GO.
    srv.next_error();
    // A QEMU client without TLS gets QEMU's refusal from our policy.
    let (ok, text) = run(Command::new("qemu-img").args([
        "info",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={}",
            srv.path.display()
        ),
    ]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("TLS negotiation required before option 7 (go)")
            && text.contains("server reported: Option 0x7 not permitted before TLS"),
        "{text}"
    );
    // Answered ERR_TLS_REQD until QEMU gave up: not an error of ours.
    // None of the refused clients read anything, and nothing else failed.
    assert_eq!(srv.reads.load(Ordering::SeqCst), served);
    assert_eq!(srv.finish(), Vec::<String>::new());
}

/// The real server: `object-add` of server credentials and
/// `nbd-server-start` with `tls-creds` over QMP, an export read and
/// written by `qemu-io` with client credentials, `qemu-img compare`
/// against the image; a client without TLS and one without a client
/// certificate get nothing.
#[test]
fn our_nbd_server_with_tls_creds_serves_qemu_tools() {
    use common::oracle::{Ours, Side};
    use serde_json::json;
    common::require_tool("qemu-io");
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    make_pki(&pki, "Server CA");
    let img = d.path().join("disk.raw");
    std::fs::write(&img, image()).unwrap();
    let sock = d.path().join("nbd.sock");
    let mut o = Ours::new();
    o.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": pki, "endpoint": "server"}),
    )
    .unwrap();
    o.cmd(
        "blockdev-add",
        json!({"driver": "file", "node-name": "disk", "filename": img}),
    )
    .unwrap();
    o.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "tls0"}),
    )
    .unwrap();
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "name": "", "writable": true}),
    )
    .unwrap();
    let (ok, text) = run(Command::new("qemu-io").args([
        "--object",
        &client_object(&pki, ""),
        "--image-opts",
        &image_opts(&sock),
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "write -P 0x33 128k 64k",
    ]));
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "{text}"
    );
    let mut want = image();
    want[128 << 10..192 << 10].fill(0x33);
    assert!(std::fs::read(&img).unwrap() == want, "the write landed");
    // Without TLS: QEMU's client is told TLS is required.
    let (ok, text) = run(Command::new("qemu-img").args([
        "info",
        "--image-opts",
        &format!("driver=nbd,server.type=unix,server.path={}", sock.display()),
    ]));
    assert!(!ok, "{text}");
    assert!(text.contains("TLS negotiation required"), "{text}");
    // Without a client certificate (verify-peer is on by default).
    let only_ca = d.path().join("only-ca");
    subset(&pki, &only_ca, &["ca-cert.pem"]);
    let (ok, text) = run(Command::new("qemu-io").args([
        "-r",
        "--object",
        &client_object(&only_ca, ""),
        "--image-opts",
        &image_opts(&sock),
        "-c",
        "read 0 64k",
    ]));
    assert!(!ok, "{text}");
    assert!(!text.contains("read 65536/65536"), "{text}");
    o.cmd("nbd-server-stop", json!({})).unwrap();
}
