//! The general filter mechanism of the block layer, driver by driver: a
//! filter put above a node takes over every parent of that node — guest
//! backends and the edges of parent nodes of every driver that has
//! children (`raw`'s and `blkdebug`'s child, `qcow2`'s `file` and
//! `backing`) — requests keep working through it, and taking it out moves
//! the parents back. A name QEMU would refuse leaves the graph as it was.

mod common;

use std::sync::Arc;

use blockjob::Context;
use blockjob::block::Node;
use blockjob::block::backend::BackendOptions;
use blockjob::block::copy_on_read::{CopyOnRead, CorShared};
use common::chain::{chain, s, tool};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The node `parent`'s child with `role` points at now.
fn child(ctx: &Context, parent: &str, role: &str) -> String {
    let p = ctx.graph().find_node(parent).unwrap();
    p.children()
        .into_iter()
        .find(|c| c.role == role)
        .unwrap_or_else(|| panic!("{parent} has no {role}"))
        .node
        .name()
        .to_string()
}

/// Put a `copy-on-read` filter named `name` above `below`.
fn insert(ctx: &Context, below: &str, name: &str) -> blockjob::Result<Arc<Node>> {
    let below = ctx.graph().find_node(below).unwrap();
    let cor = CorShared::new(below.clone(), None);
    ctx.graph().insert_filter(
        &below,
        Some(name),
        false,
        Box::new(CopyOnRead::new(cor, true)),
    )
}

fn read(node: &Node, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    node.pread(0, &mut b).unwrap();
    b
}

#[test]
fn a_filter_takes_every_parent_and_gives_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![0x5a; MIB as usize]).unwrap();
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"file","node-name":"f","filename":img}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"r","file":"f"}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"blkdebug","node-name":"d","image":"f"}))
        .unwrap();
    let blk = ctx.blk_new("f", BackendOptions::default()).unwrap();
    let before = ctx.graph().nodes().len();

    let filter = insert(&ctx, "f", "cor").unwrap();
    assert_eq!(child(&ctx, "r", "file"), "cor");
    assert_eq!(child(&ctx, "d", "image"), "cor");
    assert_eq!(blk.node().name(), "cor");
    assert_eq!(child(&ctx, "cor", "file"), "f");
    assert_eq!(ctx.graph().nodes().len(), before + 1);
    // Requests go through the filter: reads from both parents, a guest
    // write through the backend reaches the file.
    let r = ctx.graph().find_node("r").unwrap();
    assert_eq!(read(&r, 512), vec![0x5a; 512]);
    blk.pwrite(0, &[0x66; 512]).unwrap();
    assert_eq!(
        read(&ctx.graph().find_node("d").unwrap(), 512),
        vec![0x66; 512]
    );
    assert_eq!(&std::fs::read(&img).unwrap()[..512], &[0x66; 512]);

    ctx.graph().remove_filter(&filter);
    assert_eq!(child(&ctx, "r", "file"), "f");
    assert_eq!(child(&ctx, "d", "image"), "f");
    assert_eq!(blk.node().name(), "f");
    assert!(ctx.graph().find_node("cor").is_none());
    assert_eq!(ctx.graph().nodes().len(), before);
}

#[test]
fn qcow2_moves_its_file_and_its_backing_edge() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mid, top) = chain(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"mid",
        "file":{"driver":"file","node-name":"midf","filename":mid}}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top","backing":"mid",
        "file":{"driver":"file","node-name":"topf","filename":top}}))
        .unwrap();
    let top_node = ctx.graph().find_node("top").unwrap();
    let guest = read(&top_node, 4 * MIB as usize);

    // Above top's file: imago reads and writes the image through the filter.
    let f1 = insert(&ctx, "topf", "f1").unwrap();
    assert_eq!(child(&ctx, "top", "file"), "f1");
    // Above top's backing node: reads that fall through go via the filter.
    let f2 = insert(&ctx, "mid", "f2").unwrap();
    assert_eq!(child(&ctx, "top", "backing"), "f2");
    assert!(
        read(&top_node, 4 * MIB as usize) == guest,
        "guest view changed"
    );
    // A write through the moved file edge lands in the image.
    top_node.pwrite(2 * MIB, &[0x77; 4096]).unwrap();
    top_node.flush().unwrap();

    ctx.graph().remove_filter(&f2);
    ctx.graph().remove_filter(&f1);
    assert_eq!(child(&ctx, "top", "file"), "topf");
    assert_eq!(child(&ctx, "top", "backing"), "mid");
    // Everything that keeps the images open (and locked) goes first: the
    // removed filters still hold their children.
    drop((f1, f2));
    drop(top_node);
    drop(ctx);
    // QEMU reads the write, and the image is clean.
    tool("qemu-img", &["check", "-q", s(&top)]);
    let out = dir.path().join("flat");
    tool("qemu-img", &["convert", "-O", "raw", s(&top), s(&out)]);
    let flat = std::fs::read(&out).unwrap();
    assert_eq!(
        &flat[2 * MIB as usize..2 * MIB as usize + 4096],
        &[0x77; 4096]
    );
    assert!(flat[..2 * MIB as usize] == guest[..2 * MIB as usize]);
}

#[test]
fn a_refused_name_leaves_the_graph_as_it_was() {
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"null-co","node-name":"n"}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"r","file":"n"}))
        .unwrap();
    for (name, text) in [
        ("r", "Duplicate nodes with node-name='r'"),
        ("bad name", "Invalid node-name: 'bad name'"),
        ("", "Invalid node-name: ''"),
    ] {
        assert_eq!(insert(&ctx, "n", name).unwrap_err().message(), text);
        assert_eq!(child(&ctx, "r", "file"), "n");
        assert_eq!(ctx.graph().nodes().len(), 2);
    }
}
