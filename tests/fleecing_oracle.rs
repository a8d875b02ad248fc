//! Image fleecing against a live `qemu-storage-daemon`: a
//! `copy-before-write` node added with blockdev-add over the source (the
//! guest writes through it), a temporary target, and a `snapshot-access`
//! node over the filter that reads the source as it was when the filter
//! went in. Compared on both sides (`tests/common/guest.rs`): what the
//! view and the guest read after guest writes (whole, partial, zeroes),
//! the filter's three bitmaps, blockdev-add's refusals of bad options,
//! `bitmap` (only what it marks is in the view), `on-cbw-error` with a
//! failing target (`break-guest-write` fails the guest's write,
//! `break-snapshot` lets it through and the view refuses reads), and a
//! backup job copying the view to a final target (push-mode fleecing).
//!
//! Not compared: QEMU refuses a filter over a node another parent writes
//! to (its permission system, `Permission conflict on node 'src'`); ours
//! has no permissions and allows it. The scenarios put the guest above
//! the filter, as a fleecing setup does.

mod common;

use std::path::Path;

use common::guest::{Guest, bitmaps, compare, img, same_files};
use common::nodes::result;
use serde_json::{Value, json};

fn file(dir: &Path, name: &str, f: &str) -> Value {
    json!({"driver": "file", "node-name": name, "filename": dir.join(f)})
}

/// src (64 MiB of 7) and tmp (sparse, or failing writes once at 1 MiB
/// through blkdebug when `failing`).
fn setup(side: &mut dyn Guest, dir: &Path, failing: bool) {
    img(dir, "src.img", Some(7));
    img(dir, "tmp.img", None);
    img(dir, "out.img", None);
    side.cmd("blockdev-add", file(dir, "src", "src.img"))
        .unwrap();
    let tmp = if failing {
        json!({"driver": "raw", "node-name": "tmp", "file": {"driver": "blkdebug",
            "image": {"driver": "file", "filename": dir.join("tmp.img")},
            "inject-error": [{"event": "write_aio", "errno": 5, "sector": 2048}]}})
    } else {
        file(dir, "tmp", "tmp.img")
    };
    side.cmd("blockdev-add", tmp).unwrap();
    side.cmd("blockdev-add", file(dir, "out", "out.img"))
        .unwrap();
}

fn cbw(extra: Value) -> Value {
    let mut v = json!({"driver": "copy-before-write", "node-name": "cbw",
        "file": "src", "target": "tmp"});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn the_view_is_the_source_at_the_start_as_in_qemu() {
    let play = |side: &mut dyn Guest, dir: &Path| {
        let mut out = Vec::new();
        setup(side, dir, false);
        side.cmd("blockdev-add", cbw(json!({}))).unwrap();
        side.cmd(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        )
        .unwrap();
        side.attach_to(dir, "cbw");
        for w in [
            "write -P 9 1M 64k",
            "write -P 9 3M 4k",
            "write -z 5M 1M",
            "write -P 8 63M 1M",
        ] {
            out.push(format!("{w}: {}", side.io(w)));
        }
        out.push(bitmaps(side, "cbw"));
        for r in ["read -P 7 0 64M", "read -P 7 3M 512", "read -P 7 5M 1M"] {
            out.push(format!("acc {r}: {}", side.read_node("acc", r)));
        }
        for r in ["read -P 9 1M 64k", "read -P 0 5M 1M", "read -P 7 3M 512"] {
            out.push(format!("guest {r}: {}", side.io(r)));
        }
        // Push-mode fleecing: a backup job copies the view.
        let r = side.cmd(
            "blockdev-backup",
            json!({"job-id": "j", "device": "acc", "target": "out", "sync": "full"}),
        );
        out.push(format!("backup of the view: {}", result(r)));
        while let Some(ev) = side.event_within(std::time::Duration::from_secs(30)) {
            if ev["event"] == "JOB_STATUS_CHANGE" && ev["data"]["status"] == "null" {
                break;
            }
        }
        out.push(format!("after: {}", side.io("write -P 6 10M 64k")));
        out.push(format!(
            "acc: {}",
            side.read_node("acc", "read -P 7 10M 64k")
        ));
        out.push(bitmaps(side, "cbw"));
        out
    };
    let (d1, d2) = compare("fleecing", &play);
    same_files(d1.path(), d2.path(), "out.img");
    same_files(d1.path(), d2.path(), "tmp.img");
    let outimg = std::fs::read(d2.path().join("out.img")).unwrap();
    assert!(
        outimg.iter().all(|b| *b == 7),
        "the pushed backup is not the old source"
    );
}

#[test]
fn bad_options_match_qemu() {
    let play = |side: &mut dyn Guest, dir: &Path| {
        let mut out = Vec::new();
        setup(side, dir, false);
        let cases = [
            json!({"driver": "copy-before-write", "node-name": "x", "file": "src"}),
            json!({"driver": "copy-before-write", "node-name": "x", "target": "tmp"}),
            cbw(json!({"bitmap": {"node": "src", "name": "nosuch"}})),
            cbw(json!({"bitmap": {"node": "nosuch", "name": "b"}})),
            cbw(json!({"on-cbw-error": "bogus"})),
            cbw(json!({"min-cluster-size": 1000})),
            cbw(json!({"cbw-timeout": -1})),
            cbw(json!({"cbw-timeout": "x"})),
            cbw(json!({"target": "nosuch"})),
            json!({"driver": "snapshot-access", "node-name": "x"}),
            json!({"driver": "snapshot-access", "node-name": "x", "file": "nosuch"}),
        ];
        for c in cases {
            out.push(format!(
                "{c}: {}",
                result(side.cmd("blockdev-add", c.clone()))
            ));
        }
        // Accepted, and then: a view over a node that is no filter.
        let r = side.cmd(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "x", "file": "src"}),
        );
        out.push(format!("snapshot-access over src: {}", result(r)));
        out.push(format!("read: {}", side.read_node("x", "read 0 64k")));
        out
    };
    compare("bad options", &play);
}

#[test]
fn a_bitmap_limits_the_view_as_in_qemu() {
    let play = |side: &mut dyn Guest, dir: &Path| {
        let mut out = Vec::new();
        setup(side, dir, false);
        side.attach(dir);
        side.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        )
        .unwrap();
        side.write("write -P 7 2M 128k");
        // QEMU's filter takes the source's write permission: the guest
        // goes first (ours does not check permissions).
        side.detach();
        side.cmd(
            "blockdev-add",
            cbw(json!({"bitmap": {"node": "src", "name": "b0"}})),
        )
        .unwrap();
        side.cmd(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        )
        .unwrap();
        out.push(bitmaps(side, "cbw"));
        for r in ["read -P 7 2M 128k", "read -P 7 2M 192k", "read -P 7 0 64k"] {
            out.push(format!("acc {r}: {}", side.read_node("acc", r)));
        }
        out
    };
    compare("bitmap", &play);
}

#[test]
fn copy_errors_follow_on_cbw_error_as_in_qemu() {
    for mode in ["break-guest-write", "break-snapshot"] {
        let play = |side: &mut dyn Guest, dir: &Path| {
            let mut out = Vec::new();
            setup(side, dir, true);
            side.cmd("blockdev-add", cbw(json!({"on-cbw-error": mode})))
                .unwrap();
            side.cmd(
                "blockdev-add",
                json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
            )
            .unwrap();
            side.attach_to(dir, "cbw");
            out.push(format!("fine: {}", side.io("write -P 9 0 64k")));
            out.push(format!("failing copy: {}", side.io("write -P 9 1M 64k")));
            out.push(format!("guest reads: {}", side.io("read -P 9 1M 64k")));
            out.push(format!(
                "acc: {}",
                side.read_node("acc", "read -P 7 4M 64k")
            ));
            out.push(bitmaps(side, "cbw"));
            out
        };
        compare(mode, &play);
    }
}
