//! A client pointed at its own process's server: QEMU's monitor hangs
//! there (its blockdev-add connects while holding the main loop the
//! server needs); ours must not. One context serves a node over NBD and
//! mirrors another node into that export through an `nbd` node, then
//! reads it back through the client; every step is bounded by a
//! watchdog, so a hang fails the test instead of stalling the suite.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::oracle::{Ours, Side};
use serde_json::{Value, json};

fn within<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs} s (a hang)"))
}

#[test]
fn a_client_of_its_own_server_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let src = d.join("src.raw");
    let dst = d.join("dst.raw");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096 * 7 + 1) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = d.join("nbd.sock");

    let out = within("the loop", 60, move || {
        let mut o = Ours::new();
        let mut ok = |cmd: &str, args: Value| {
            o.cmd(cmd, args.clone())
                .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
        };
        ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "src", "filename": src}),
        );
        ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "dst", "filename": dst}),
        );
        ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "dst", "name": "dst", "writable": true}),
        );
        ok(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "remote", "export": "dst",
                   "server": {"type": "unix", "path": sock}}),
        );
        ok(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "remote", "sync": "full"}),
        );
        let mut events = Vec::new();
        loop {
            let e = o.event_within(Duration::from_secs(20)).expect("an event");
            let name = e["event"].as_str().unwrap().to_string();
            if name == "BLOCK_JOB_READY" {
                o.cmd("block-job-complete", json!({"device": "m"})).unwrap();
            }
            events.push(name.clone());
            if name == "BLOCK_JOB_COMPLETED" {
                assert!(e["data"].get("error").is_none(), "{e}");
                break;
            }
        }
        // Read back through the client: a backend on the nbd node.
        let blk = o
            .ctx
            .blk_new("remote", Default::default())
            .expect("a backend on the nbd node");
        let mut back = vec![0u8; 8 << 20];
        blk.pread(0, &mut back).expect("read through our client");
        drop(blk);
        o.cmd("blockdev-del", json!({"node-name": "remote"}))
            .unwrap();
        // The server sees the client's goodbye asynchronously (so does
        // QEMU's): a safe delete may have to wait for it.
        let mut tries = 0;
        while let Err(e) = o.cmd("block-export-del", json!({"id": "e"})) {
            assert!(e.ends_with("still in use") && tries < 100, "{e}");
            tries += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        o.cmd("nbd-server-stop", json!({})).unwrap();
        (events, back)
    });
    assert!(
        out.0.contains(&"BLOCK_JOB_READY".to_string()),
        "{:?}",
        out.0
    );
    assert!(out.1 == data, "read back through the loop");
    assert!(std::fs::read(dir.path().join("dst.raw")).unwrap() == data);
}
