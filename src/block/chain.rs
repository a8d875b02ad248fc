//! Backing chains: walking them and asking which layers hold a range
//! (QEMU's `bdrv_is_allocated_above`, `bdrv_chain_contains`). Filters in
//! a chain (a commit's `commit_top` between two layers) are walked past,
//! as QEMU's `bdrv_backing_chain_next` does: they hold no data of their
//! own.

use std::sync::Arc;

use super::Node;
use crate::error::{Error, Result};

/// `node`, or the first node below it that is not a filter.
pub fn skip_filters(node: Arc<Node>) -> Arc<Node> {
    let mut n = node;
    while let Some(c) = n.driver().filtered_child() {
        n = c;
    }
    n
}

/// The layer below `node`: its backing node, past any filters.
pub fn next_layer(node: &Node) -> Option<Arc<Node>> {
    node.backing().map(skip_filters)
}

/// `top`, its backing node, that one's backing node, … to the bottom.
pub fn layers(top: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut v = vec![top.clone()];
    while let Some(b) = v.last().and_then(|n| next_layer(n)) {
        v.push(b);
    }
    v
}

/// `node` is `top` or below it.
pub fn contains(top: &Arc<Node>, node: &Arc<Node>) -> bool {
    layers(top).iter().any(|n| Arc::ptr_eq(n, node))
}

/// Whether some layer from `top` down to (not including) `base` holds the
/// range at `offset` — data or explicit zeroes, anything that hides what is
/// below — and for how many bytes (at most `len`) that answer holds. With
/// `base` = `None`, every layer counts.
pub fn is_allocated_above(
    top: &Arc<Node>,
    base: Option<&Arc<Node>>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut n = len;
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        if base.is_some_and(|b| Arc::ptr_eq(b, &l)) {
            break;
        }
        if offset >= l.len()? {
            // A shorter layer reads as zeroes past its end (QEMU treats
            // that as allocated: nothing below shows through).
            return Ok((true, n));
        }
        let st = l.block_status(offset, n)?;
        if st.allocated {
            return Ok((true, st.len));
        }
        n = n.min(st.len);
        layer = next_layer(&l);
    }
    Ok((false, n))
}

/// Block status of the range at `offset` through the chain below `top`
/// (QEMU's `bdrv_block_status_above` with no base, as a reader of `top`
/// sees it): the first layer that holds the range decides; where none
/// does, the bottom layer's answer (a hole of the bottom image reads as
/// its zeroes). A layer shorter than `offset` reads as zeroes there.
pub fn status_above(top: &Node, offset: u64, len: u64) -> Result<super::BlockStatus> {
    let mut st = top.block_status(offset, len)?;
    let mut n = st.len;
    let mut below = next_layer(top);
    while !st.allocated {
        let Some(l) = below else { break };
        if offset >= l.len()? {
            return Ok(super::BlockStatus {
                data: false,
                zero: true,
                allocated: true,
                len: n,
            });
        }
        st = l.block_status(offset, n)?;
        n = n.min(st.len);
        below = next_layer(&l);
    }
    st.len = n;
    Ok(st)
}

/// The depth of the first layer from `top` down that holds the range at
/// `offset` (1: `top` itself; 0: no layer), and for how many bytes (at
/// most `len`) that holds — QEMU's `qemu:allocation-depth`.
pub fn allocation_depth(top: &Node, offset: u64, len: u64) -> Result<(u32, u64)> {
    let st = top.block_status(offset, len)?;
    if st.allocated {
        return Ok((1, st.len));
    }
    let mut n = st.len;
    let mut depth = 1;
    let mut below = next_layer(top);
    while let Some(l) = below {
        depth += 1;
        if offset >= l.len()? {
            // Past a shorter layer's end: it decides (zeroes).
            return Ok((depth, n));
        }
        let st = l.block_status(offset, n)?;
        if st.allocated {
            return Ok((depth, st.len.min(n)));
        }
        n = n.min(st.len);
        below = next_layer(&l);
    }
    Ok((0, n))
}

/// The layer of `layers` whose image file is `name` (QEMU's
/// `bdrv_find_backing_image`, for `base`/`top` given as file names).
pub fn by_filename(layers: &[Arc<Node>], name: &str) -> Result<Arc<Node>> {
    layers
        .iter()
        .find(|n| n.filename() == name)
        .cloned()
        .ok_or_else(|| Error::generic(format!("Can't find '{name}' in the backing chain")))
}
