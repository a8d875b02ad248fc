//! The same blockdev-add / blockdev-del texts, given to a live
//! `qemu-storage-daemon` and to us, must be accepted or refused alike, with
//! QEMU's error class and text.

mod common;

use blockjob::Context;
use common::qmp::Daemon;
use serde_json::{Value, json};

/// One step: add or delete; `Ok` or the error's (class, desc).
#[derive(Debug, PartialEq)]
enum Step {
    Ok,
    Err(String, String),
}

fn ours(ctx: &Context, cmd: &str, args: &Value) -> Step {
    let r = match cmd {
        "blockdev-add" => ctx.blockdev_add(args).map(|_| ()),
        "blockdev-del" => ctx.blockdev_del(args["node-name"].as_str().unwrap()),
        _ => unreachable!(),
    };
    match r {
        Ok(()) => Step::Ok,
        Err(e) => Step::Err(e.class().to_string(), e.message().to_string()),
    }
}

fn theirs(d: &mut Daemon, cmd: &str, args: &Value) -> Step {
    match d.qmp.execute(cmd, args.clone()) {
        Ok(_) => Step::Ok,
        Err(e) => Step::Err(e.class, e.desc),
    }
}

#[test]
fn blockdev_add_and_del_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let img = img.to_str().unwrap().to_string();
    let missing = dir.path().join("missing.raw").to_str().unwrap().to_string();
    let dbg = |inject: Value| {
        json!({"driver":"raw","node-name":"d","file":{"driver":"blkdebug",
            "image":{"driver":"file","filename":img},"inject-error":inject}})
    };
    let steps: Vec<(&str, Value)> = vec![
        // Accepted.
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"f1","filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"r1","file":"f1"}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"r2","file":{"driver":"file","filename":img}}),
        ),
        ("blockdev-add", json!({"driver":"null-co","node-name":"n1"})),
        (
            "blockdev-add",
            json!({"driver":"null-co","node-name":"n2","size":1000,"read-zeroes":true}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"b1","file":{"driver":"blkdebug","node-name":"b1dbg",
            "image":{"driver":"file","filename":img},
            "inject-error":[{"event":"read_aio","errno":5,"sector":2048,"once":true,"iotype":"read"}],
            "set-state":[{"event":"write_aio","new_state":2}]}}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"a-b.c_d","filename":img,"read-only":true,
            "discard":"unmap","cache":{"direct":false,"no-flush":true},"detect-zeroes":"on","aio":"threads",
            "locking":"off"}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"a".repeat(31),"filename":img}),
        ),
        // Refused by the QAPI visitor.
        ("blockdev-add", json!({"driver":"nope","node-name":"x"})),
        ("blockdev-add", json!({"node-name":"x","filename":img})),
        ("blockdev-add", json!({"driver":"file","node-name":"x"})),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":img,"bogus":1}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":5}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":5,"filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":img,"read-only":"yes"}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":img,"cache":5}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":img,"cache":{"direct":"no"}}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":img,"cache":{"bog":1}}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":img,"discard":"sometimes"}),
        ),
        ("blockdev-add", json!({"driver":"raw","node-name":"x"})),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"x","file":5}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"x","file":{"driver":"file"}}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"x","file":{"driver":"file","filename":img,"bog":1}}),
        ),
        ("blockdev-add", dbg(json!([{"event":"nope","errno":5}]))),
        (
            "blockdev-add",
            dbg(json!([{"event":"read_aio","errno":"5"}])),
        ),
        ("blockdev-add", dbg(json!([{"errno":5}]))),
        (
            "blockdev-add",
            dbg(json!([{"event":"read_aio","iotype":"nope"}])),
        ),
        ("blockdev-add", dbg(json!([{"event":"read_aio","bogus":1}]))),
        ("blockdev-add", dbg(json!({"event":"read_aio"}))),
        (
            "blockdev-add",
            json!({"driver":"null-co","node-name":"x","size":"1M"}),
        ),
        (
            "blockdev-add",
            json!({"driver":"null-co","node-name":"x","size":1u64 << 63}),
        ),
        // Refused when opening.
        ("blockdev-add", json!({"driver":"null-co"})),
        (
            "blockdev-add",
            json!({"driver":"raw","file":{"driver":"file","filename":img}}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":""}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":missing}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"x","filename":"/tmp"}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"f1","filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"x","file":{"driver":"file","node-name":"f1","filename":img}}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"1abc","filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"a b","filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"","filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"a".repeat(32),"filename":img}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"x","file":"nosuch"}),
        ),
        (
            "blockdev-add",
            json!({"driver":"null-co","node-name":"x","latency-ns":-1}),
        ),
        (
            "blockdev-add",
            json!({"driver":"raw","node-name":"x","file":{"driver":"blkdebug","align":1000,
            "image":{"driver":"file","filename":img}}}),
        ),
        // blockdev-del.
        ("blockdev-del", json!({"node-name":"nosuch"})),
        ("blockdev-del", json!({"node-name":"f1"})),
        ("blockdev-del", json!({"node-name":"b1dbg"})),
        ("blockdev-del", json!({"node-name":"r1"})),
        ("blockdev-del", json!({"node-name":"f1"})),
        ("blockdev-del", json!({"node-name":"f1"})),
        ("blockdev-del", json!({"node-name":"b1"})),
        ("blockdev-del", json!({"node-name":"b1dbg"})),
        ("blockdev-del", json!({"node-name":"n2"})),
    ];
    let ctx = Context::new();
    let mut d = Daemon::start();
    let mut diffs = Vec::new();
    for (cmd, args) in &steps {
        let q = theirs(&mut d, cmd, args);
        let o = ours(&ctx, cmd, args);
        if std::env::var_os("BJ_SHOW").is_some() {
            eprintln!("{cmd} -> {q:?}");
        }
        if q != o {
            diffs.push(format!("{cmd} {args}\n  qemu: {q:?}\n  ours: {o:?}"));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // Node names listed by both, auto-named children included, newest first.
    let mut qemu_names: Vec<String> = d
        .qmp
        .execute("query-named-block-nodes", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    let mut our_names: Vec<String> = ctx
        .graph()
        .nodes()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    let auto = |v: &mut Vec<String>| {
        for n in v.iter_mut() {
            if n.starts_with("#block") {
                *n = "#auto".into();
            }
        }
        v.sort();
    };
    auto(&mut qemu_names);
    auto(&mut our_names);
    assert_eq!(qemu_names, our_names);
}
