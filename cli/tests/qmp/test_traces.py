"""The same scenarios against qemu-storage-daemon and `blockjob daemon`
(same command line, same QMP commands through `qemu.qmp`), compared by
their normalized traces: events in order with their data (timestamps
dropped), query-block-jobs/query-jobs snapshots at chosen points, and the
class and text of every refused command.

Normalizations (QEMU's own results vary there from run to run):
- `busy` is dropped from snapshots of a running or ready job (QEMU's
  mirror wakes up periodically even when idle);
- mirror: the `offset` of events other than READY/COMPLETED and of
  snapshots taken while paused on an error: the parallel copy reaches a
  run-dependent point before an injected error strikes (the same
  normalization as tests/mirror_oracle.rs);
- active commit: likewise for its pauses and for a failed COMPLETED
  (FACTS S4: QEMU itself gives 524288 or 1048576 between runs);
- a persistent error with `ignore` repeats BLOCK_JOB_ERROR until the
  forced cancel lands; the count of repeats is not compared.

Known, accepted difference, not compared: QEMU writes a `json:{...}`
backing name into the overlay when the base was blkdebug-wrapped (the
chain on disk is not compared here; tests/chain_oracle.rs compares it).
"""

import json
import socket
import subprocess

import pytest

from conftest import (KINDS, Daemon, assert_same, blockdev_args, qcow2_chain, raw_image,
                      raw_node, run_both, summarize)

# ---- mirror -----------------------------------------------------------------


def snap_drop(*extra):
    # `actively-synced` on a commit job: a known difference, pinned by
    # test_known_difference_actively_synced_on_commit.
    return ("actively-synced@commit",) + extra


def mirror_args(**extra):
    m = {"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"}
    for k, v in extra.items():
        k = k.replace("_", "-")
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    return m


async def drive(side, job_args, on_ready="complete", resumes=0, racy=True,
                max_errors=None):
    """Follow the job's events to JSC:null, acting as an operator:
    complete/cancel at READY; on an error pause take a snapshot, try
    block-job-pause and a soft cancel (both refused while paused), then
    resume, up to `resumes` times, then force-cancel; finalize at PENDING,
    dismiss at concluded (with auto-finalize/auto-dismiss off).
    `max_errors`: force-cancel after that many BLOCK_JOB_ERROR events
    (persistent `ignore`), recording only the first one."""
    pauses = 0
    errors = 0
    jid = job_args.get("job-id", "job0")
    manual_dismiss = job_args.get("auto-dismiss") is False
    cancelled_at = None
    while True:
        ev = await side.event()
        if ev is None:
            side.note("timeout waiting for an event")
            return
        name = summarize(ev)
        drop = ()
        if racy and name not in ("READY", "COMPLETED"):
            drop = ("offset",)
        if racy == "all" and name == "COMPLETED" and "error" in ev["data"]:
            drop = ("offset",)
        if name.startswith("ERR"):
            errors += 1
            # Active commit (racy="all"): each in-flight request that fails
            # reports its own BLOCK_JOB_ERROR, and how many were in flight
            # varies between QEMU runs (1 or 2 seen): repeats are collapsed.
            line = f"{ev['event']} {side.norm(ev['data'])}"
            if racy == "all" and side.trace and side.trace[-1] == line:
                continue
            if max_errors is not None:
                if errors == 1:
                    side.record_event(ev, drop)
                if errors == max_errors and cancelled_at is None:
                    cancelled_at = errors
                    await side.cmd("block-job-cancel", {"device": jid, "force": True},
                                   label="force cancel")
                continue
        side.record_event(ev, drop)
        if name == "READY":
            await side.snapshot("ready", drop=snap_drop("busy"))
            if on_ready == "complete":
                await side.cmd("block-job-complete", {"device": jid})
            elif on_ready == "cancel":
                await side.cmd("block-job-cancel", {"device": jid})
            elif on_ready == "force":
                await side.cmd("block-job-cancel", {"device": jid, "force": True})
            elif on_ready == "job-verbs":
                # The generic job-* verbs instead of block-job-*.
                await side.cmd("job-complete", {"id": jid})
        elif name == "JSC:paused":
            pauses += 1
            racy_fields = ("offset", "current-progress") if racy else ()
            await side.snapshot(f"paused #{pauses}", drop=snap_drop(*racy_fields))
            if pauses <= resumes:
                await side.cmd("block-job-pause", {"device": jid})
                await side.cmd("block-job-cancel", {"device": jid})
                await side.cmd("block-job-complete", {"device": jid})
                await side.cmd("block-job-resume", {"device": jid})
            else:
                await side.cmd("block-job-cancel", {"device": jid, "force": True},
                               label="force cancel")
        elif name == "PENDING":
            # `paused` at PENDING: a known difference for mirror-based jobs,
            # pinned by test_known_difference_paused_while_pending.
            await side.snapshot("pending", drop=snap_drop("paused"))
            await side.cmd("job-dismiss", {"id": jid})
            await side.cmd("job-finalize", {"id": jid})
        elif name == "JSC:concluded" and manual_dismiss:
            racy_fields = ("offset", "current-progress") if racy == "all" else ()
            await side.snapshot("concluded", drop=snap_drop(*racy_fields))
            await side.cmd("block-job-finalize", {"id": jid})
            await side.cmd("job-dismiss", {"id": jid})
        elif name == "JSC:null":
            bj = await side.ok("query-block-jobs")
            side.note(f"after: {len(bj)} jobs")
            return


def mirror_scenario(src_inject=None, tgt_inject=None, on_ready="complete", resumes=0,
                    via_qmp=False, max_errors=None, **extra):
    async def scenario(side):
        src, tgt = side.path("src.raw"), side.path("tgt.raw")
        raw_image(src)
        raw_image(tgt, fill=0)
        nodes = [raw_node("src", src, src_inject), raw_node("tgt", tgt, tgt_inject)]
        if via_qmp:
            await side.start()
            for n in nodes:
                await side.cmd("blockdev-add", n)
        else:
            await side.start(blockdev_args(*nodes))
        args = mirror_args(**extra)
        r = await side.cmd("blockdev-mirror", args)
        if r[0] == "ok":
            await drive(side, args, on_ready, resumes, max_errors=max_errors)
        else:
            for ev in await side.quiet_events():
                side.record_event(ev)
        await side.stop()
        side.daemon = None
        side.note(f"target == source: {src.read_bytes() == tgt.read_bytes()}")
    return scenario


LIFECYCLE = {
    "complete": dict(),
    "complete via job-complete, blockdev-add over QMP": dict(on_ready="job-verbs", via_qmp=True),
    "soft cancel after ready": dict(on_ready="cancel"),
    "force cancel after ready": dict(on_ready="force"),
    "auto-finalize=false auto-dismiss=false": dict(auto_finalize=False, auto_dismiss=False),
    "auto-finalize=false": dict(auto_finalize=False),
    "auto-dismiss=false, soft cancel": dict(auto_dismiss=False, on_ready="cancel"),
    "write-blocking, small granularity and buffer": dict(copy_mode="write-blocking",
                                                         granularity=65536, buf_size=131072),
}


@pytest.mark.parametrize("label", list(LIFECYCLE))
def test_mirror_lifecycle(label):
    q, o = run_both(mirror_scenario(**LIFECYCLE[label]))
    assert_same(label, q, o)


def error_cases():
    for side in ("source", "target"):
        for policy in ("report", "ignore", "stop", "enospc", "auto"):
            for errno in (5, 28):
                for once in (True, False):
                    # Persistent read error + ignore: QEMU's mirror retries
                    # in a tight loop and emits 70000+ BLOCK_JOB_ERROR events
                    # (1 to 16 s measured) before the forced cancel gets
                    # through (ours: a few dozen); too slow and variable for
                    # this suite. The target side covers persistent + ignore.
                    if side == "source" and policy == "ignore" and not once:
                        continue
                    yield side, policy, errno, once


@pytest.mark.parametrize("side_,policy,errno,once", list(error_cases()),
                         ids=lambda v: str(v))
def test_mirror_errors(side_, policy, errno, once):
    ev = ("read_aio", errno, once) if side_ == "source" else ("write_aio", errno, once)
    key = "on_source_error" if side_ == "source" else "on_target_error"
    kw = {key: policy}
    if side_ == "source":
        kw["src_inject"] = ev
    else:
        kw["tgt_inject"] = ev
    max_errors = None
    if not once and policy == "ignore":
        # Retries forever (in QEMU too): force-cancel at the first error.
        max_errors = 1
    # Persistent + stop: resume twice (it pauses again each time), then
    # force-cancel. Once + stop: resume once, then it completes.
    q, o = run_both(mirror_scenario(resumes=2, max_errors=max_errors, **kw))
    assert_same(f"{side_} {policy} errno {errno} once {once}", q, o)


@pytest.mark.xfail(strict=True, reason="known difference: a mirror waiting in PENDING "
                   "(auto-finalize=false) reports paused=true in QEMU (its mirror stays in a "
                   "drained section, pause_count > 0, until finalize) and paused=false here")
def test_known_difference_paused_while_pending():
    async def scenario(side):
        src, tgt = side.path("src.raw"), side.path("tgt.raw")
        raw_image(src)
        raw_image(tgt, fill=0)
        await side.start(blockdev_args(raw_node("src", src), raw_node("tgt", tgt)))
        await side.ok("blockdev-mirror", mirror_args(auto_finalize=False))
        while True:
            ev = await side.event()
            assert ev is not None
            if ev["event"] == "BLOCK_JOB_READY":
                await side.ok("block-job-complete", {"device": "job0"})
            if ev["event"] == "BLOCK_JOB_PENDING":
                break
        bj = await side.ok("query-block-jobs")
        side.note(f"pending: paused={bj[0]['paused']}")
        await side.ok("job-finalize", {"id": "job0"})
    q, o = run_both(scenario)
    assert q == ["pending: paused=True"]
    assert_same("paused while pending", q, o)


# ---- stream and commit ------------------------------------------------------


def layer(name, side, backing=None, inject=None):
    """A qcow2 layer of the chain; `inject` = (layer, event, errno, once)."""
    path = side.path(f"{name}.qcow2")
    f = {"driver": "file", "filename": str(path)}
    if inject and inject[0] == name:
        _, ev, errno, once = inject
        f = {"driver": "blkdebug", "image": f,
             "inject-error": [{"event": ev, "errno": errno, "once": once}]}
    n = {"driver": "qcow2", "node-name": name, "file": f}
    if backing:
        n["backing"] = backing
    return n


def chain_scenario(cmd, args, inject=None, on_ready="complete", resumes=1, racy=False,
                   max_errors=None):
    async def scenario(side):
        qcow2_chain(side.dir)
        await side.start(blockdev_args(
            layer("base", side, None, inject), layer("mid", side, "base", inject),
            layer("top", side, "mid", inject)))
        a = {"job-id": "job0", "device": "top", **args}
        r = await side.cmd(cmd, a)
        if r[0] == "ok":
            await drive(side, a, on_ready, resumes, racy, max_errors=max_errors)
        nodes = await side.ok("query-named-block-nodes")
        side.note("nodes: " + " ".join(sorted(
            f"{n['node-name']}>{n.get('backing_file_depth')}" for n in nodes
            if not n["node-name"].startswith("#"))))
        await side.stop()
        side.daemon = None
        # The guest view of top against a pristine chain.
        pristine = side.dir / "pristine"
        pristine.mkdir()
        qcow2_chain(pristine)
        r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                            str(pristine / "top.qcow2"), str(side.path("top.qcow2"))],
                           capture_output=True, text=True)
        side.note(f"top's guest view unchanged: {r.returncode == 0}")
        for img in ("base", "mid", "top"):
            r = subprocess.run(["qemu-img", "check", "-U", str(side.path(f"{img}.qcow2"))],
                               capture_output=True, text=True)
            if r.returncode != 0:
                side.note(f"check {img}: {r.stdout}")
    return scenario


CHAIN = {
    "stream flatten": ("block-stream", {}),
    "stream base-node=base": ("block-stream", {"base-node": "base"}),
    "stream manual finalize and dismiss": (
        "block-stream", {"base-node": "base", "auto-finalize": False, "auto-dismiss": False}),
    "intermediate commit mid->base": ("block-commit", {"top-node": "mid", "base-node": "base"}),
    "active commit top->base, complete": ("block-commit", {"base-node": "base"}),
    "active commit top->mid, soft cancel at READY": (
        "block-commit", {"base-node": "mid"}, dict(on_ready="cancel")),
    "active commit, auto-finalize/dismiss off, job-complete": (
        "block-commit", {"auto-finalize": False, "auto-dismiss": False},
        dict(on_ready="job-verbs")),
}


@pytest.mark.parametrize("label", list(CHAIN))
def test_stream_commit(label):
    cmd, args, *kw = CHAIN[label]
    q, o = run_both(chain_scenario(cmd, args, **(kw[0] if kw else {})))
    assert_same(label, q, o)


def chain_error_cases():
    for policy in ("report", "ignore", "stop", "enospc"):
        for errno in (5, 28):
            yield (f"stream, mid read errno {errno}, {policy}", "block-stream",
                   {"on-error": policy}, ("mid", "read_aio", errno, True), {})
    yield ("stream, mid read persistent EIO, stop: resume twice, force cancel", "block-stream",
           {"on-error": "stop"}, ("mid", "read_aio", 5, False), dict(resumes=2))
    for policy, errno in (("report", 5), ("ignore", 28), ("stop", 5), ("enospc", 28)):
        yield (f"intermediate commit, mid read errno {errno}, {policy}", "block-commit",
               {"top-node": "mid", "base-node": "base", "on-error": policy},
               ("mid", "read_aio", errno, True), {})
    for policy, errno in (("report", 28), ("stop", 5), ("enospc", 5)):
        yield (f"intermediate commit, base write errno {errno}, {policy}", "block-commit",
               {"top-node": "mid", "base-node": "base", "on-error": policy},
               ("base", "write_aio", errno, True), {})
    yield ("intermediate commit, mid read persistent ENOSPC, enospc (stop)", "block-commit",
           {"top-node": "mid", "on-error": "enospc"}, ("mid", "read_aio", 28, False),
           dict(resumes=2))
    # Active commit copies in parallel: where an error struck varies between
    # QEMU runs (FACTS S4), so offsets of failures and pauses are dropped.
    for policy, errno in (("report", 5), ("stop", 5), ("ignore", 5), ("enospc", 28)):
        yield (f"active commit, top read errno {errno}, {policy}", "block-commit",
               {"on-error": policy}, ("top", "read_aio", errno, True), dict(racy="all"))
    yield ("active commit, base write persistent EIO, stop", "block-commit",
           {"on-error": "stop"}, ("base", "write_aio", 5, False), dict(racy="all", resumes=2))


CHAIN_ERRORS = {c[0]: c[1:] for c in chain_error_cases()}


@pytest.mark.parametrize("label", list(CHAIN_ERRORS))
def test_stream_commit_errors(label):
    cmd, args, inject, kw = CHAIN_ERRORS[label]
    q, o = run_both(chain_scenario(cmd, args, inject=inject, **kw))
    assert_same(label, q, o)


def test_no_actively_synced_on_commit():
    async def scenario(side):
        qcow2_chain(side.dir)
        await side.start(blockdev_args(layer("base", side), layer("mid", side, "base"),
                                       layer("top", side, "mid")))
        await side.ok("block-commit", {"job-id": "job0", "device": "top"})
        while (ev := await side.event()) and ev["event"] != "BLOCK_JOB_READY":
            pass
        bj = await side.ok("query-block-jobs")
        side.note(f"ready: {sorted(bj[0])}")
        await side.ok("block-job-complete", {"device": "job0"})
        while (ev := await side.event()) and ev["event"] != "BLOCK_JOB_COMPLETED":
            pass
    q, o = run_both(scenario)
    assert "actively-synced" not in q[0]
    assert_same("active commit fields", q, o)


# ---- bad input ---------------------------------------------------------------

J1 = {"job-id": "j1", "device": "spare", "target": "spare2", "sync": "full"}


def with_(base, **kw):
    d = dict(base)
    for k, v in kw.items():
        k = k.replace("_", "-")
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


BAD = [
    # unknown nodes / jobs
    ("blockdev-mirror", with_(J1, device="nosuch")),
    ("blockdev-mirror", with_(J1, target="nosuch")),
    ("block-stream", {"job-id": "s1", "device": "nosuch"}),
    ("block-commit", {"job-id": "c1", "device": "nosuch"}),
    ("block-stream", {"job-id": "s1", "device": "top", "base-node": "nosuch"}),
    ("block-job-cancel", {"device": "nosuch"}),
    ("block-job-set-speed", {"device": "nosuch", "speed": 1}),
    ("block-job-finalize", {"id": "nosuch"}),
    ("job-cancel", {"id": "nosuch"}),
    ("job-dismiss", {"id": "nosuch"}),
    ("blockdev-del", {"node-name": "nosuch"}),
    # duplicate job id, busy nodes, nodes in use
    ("blockdev-mirror", with_(J1, job_id="j0")),
    ("blockdev-mirror", with_(J1, device="src")),
    ("blockdev-mirror", with_(J1, target="tgt")),
    ("blockdev-mirror", with_(J1, device="spare", target="spare")),
    ("blockdev-del", {"node-name": "src"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "spare"}),
    # negative / bad numbers
    ("blockdev-mirror", with_(J1, speed=-1)),
    ("blockdev-mirror", with_(J1, buf_size=-1)),
    ("blockdev-mirror", with_(J1, granularity=1000)),
    ("blockdev-mirror", with_(J1, granularity=256)),
    ("blockdev-mirror", with_(J1, granularity=1 << 27)),
    ("block-job-set-speed", {"device": "j0", "speed": -1}),
    ("block-stream", {"job-id": "s1", "device": "top", "speed": -1}),
    ("block-commit", {"job-id": "c1", "device": "top", "speed": -1}),
    ("block-dirty-bitmap-add", {"node": "spare", "name": "b0", "granularity": 1000}),
    # bad ids and chain positions
    ("blockdev-mirror", with_(J1, job_id="1bad")),
    ("blockdev-mirror", with_(J1, job_id=None)),
    ("block-commit", {"device": "top"}),
    ("block-commit", {"job-id": "c1", "device": "top", "top-node": "mid", "base-node": "mid"}),
    ("block-commit", {"job-id": "c1", "device": "base"}),
    ("block-stream", {"job-id": "s1", "device": "top", "base-node": "spare"}),
    ("block-stream", {"job-id": "s1", "device": "top", "base": "b.qcow2", "base-node": "base"}),
    # missing arguments
    ("blockdev-mirror", {}),
    ("blockdev-mirror", with_(J1, sync=None)),
    ("blockdev-mirror", with_(J1, target=None)),
    ("block-stream", {}),
    ("block-job-set-speed", {"device": "j0"}),
    ("job-finalize", {}),
    # wrong types and values
    ("blockdev-mirror", with_(J1, speed="fast")),
    # (granularity="x": a known difference, see test_wrong_types.py)
    ("blockdev-mirror", with_(J1, sync=5)),
    ("blockdev-mirror", with_(J1, sync="bogus")),
    ("blockdev-mirror", with_(J1, device=5)),
    ("blockdev-mirror", with_(J1, auto_finalize="yes")),
    ("blockdev-mirror", with_(J1, on_source_error="bogus")),
    ("blockdev-mirror", with_(J1, buf_size=1.5)),
    ("blockdev-mirror", with_(J1, job_id=["j1"])),
    ("blockdev-mirror", with_(J1, bogus_arg=1)),
    ("block-job-cancel", {"device": "j0", "force": "yes"}),
    ("block-commit", {"job-id": "c1", "device": "top", "on-error": "auto"}),
    ("query-jobs", {"x": 1}),
    ("no-such-command", {}),
    ("qmp_capabilities", {}),
    # wrong-state verbs on the running mirror j0
    ("block-job-complete", {"device": "j0"}),
    ("job-complete", {"id": "j0"}),
    ("block-job-resume", {"device": "j0"}),
    ("job-finalize", {"id": "j0"}),
    ("job-dismiss", {"id": "j0"}),
    ("block-job-pause", {"device": "j0"}),
    ("block-job-pause", {"device": "j0"}),
    ("job-pause", {"id": "j0"}),
    ("block-job-cancel", {"device": "j0"}),
    ("block-job-complete", {"device": "j0"}),
    ("block-job-resume", {"device": "j0"}),
    ("block-job-resume", {"device": "j0"}),
]


def without_drain_pairs(events):
    """QEMU drains the graph around many commands (job creation, refused
    job ids, ...), and every drain shows as JOB_STATUS_CHANGE paused then
    running (standby then ready for a ready job) of each job, a
    run-dependent number of times (4-5 pairs per command, FACTS); we do
    not drain that way (a known difference, pinned by
    test_known_difference_drain_pairs). Per job, adjacent paused -> running
    and standby -> ready pairs are removed (on both sides alike)."""
    out = []
    last = {}  # job id -> index in out of its last JSC
    for ev in events:
        d = ev.get("data", {})
        if ev["event"] == "JOB_STATUS_CHANGE":
            j = d["id"]
            k = last.get(j)
            if k is not None and (out[k]["data"]["status"], d["status"]) in (
                    ("paused", "running"), ("standby", "ready")):
                out[k] = None
                last[j] = None
                continue
            last[j] = len(out)
        out.append(ev)
    return [e for e in out if e is not None]


def test_bad_input():
    """A dozen kinds of bad input while a mirror (j0, speed-limited) runs:
    the replies' class and text, the events (as one stream: ours may send
    a command's events after its reply, see
    test_known_difference_events_after_reply), and the jobs after."""
    async def scenario(side):
        qcow2_chain(side.dir)
        raws = {}
        for n in ("src", "tgt", "spare", "spare2"):
            raws[n] = side.path(f"{n}.raw")
            raw_image(raws[n], fill=0 if n in ("tgt", "spare2") else None)
        await side.start(blockdev_args(
            *(raw_node(n, p) for n, p in raws.items()),
            layer("base", side), layer("mid", side, "base"), layer("top", side, "mid")))
        await side.cmd("blockdev-mirror", {"job-id": "j0", "device": "src", "target": "tgt",
                                           "sync": "full", "speed": 65536})
        await side.quiet_events(0.2)  # created, running: compared elsewhere
        for name, args in BAD:
            await side.cmd(name, args, label=f"{name} {side.norm(args)}")
        events = await side.quiet_events(0.3)
        await side.snapshot("after", drop=snap_drop("offset", "current-progress", "busy"))
        # One after the other: cancelled together, which of the two ends
        # first is a race on either side.
        for j in ("j0", "c1"):
            await side.cmd("block-job-cancel", {"device": j, "force": True})
            while ev := await side.event():
                events.append(ev)
                if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "null":
                    break
        for ev in without_drain_pairs(events):
            side.record_event(ev, ("offset",))
    q, o = run_both(scenario)
    assert_same("bad input", q, o)


async def null_nodes_and_slow_mirror(side):
    await side.start(["--blockdev", "driver=null-co,node-name=a,size=4194304",
                      "--blockdev", "driver=null-co,node-name=b,size=4194304",
                      "--blockdev", "driver=null-co,node-name=c,size=4194304",
                      "--blockdev", "driver=null-co,node-name=d,size=4194304"])
    await side.ok("blockdev-mirror", {"job-id": "j0", "device": "a", "target": "b",
                                      "sync": "full", "speed": 1})
    await side.quiet_events(0.2)


def test_events_a_command_causes_come_before_its_reply(tmp_path):
    """On the wire (a raw socket: qemu.qmp's reader does not keep the order
    of replies and events), 10 refused blockdev-mirror (speed -1)."""
    seqs = {}
    for kind in KINDS:
        d = tmp_path / kind
        d.mkdir()
        daemon = Daemon(kind, d, ["--blockdev", "driver=null-co,node-name=c,size=4194304",
                                  "--blockdev", "driver=null-co,node-name=d,size=4194304"])
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(daemon.sock))
            s.settimeout(10)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b'{"execute": "qmp_capabilities"}\n')
            f.readline()
            seq = []
            for _ in range(10):
                s.sendall(json.dumps({"execute": "blockdev-mirror", "arguments": {
                    "job-id": "j1", "device": "c", "target": "d", "sync": "full",
                    "speed": -1}}).encode() + b"\n")
                one = []
                while len(one) < 3:
                    m = json.loads(f.readline())
                    one.append(summarize(m) if "event" in m else "reply")
                seq.append(" ".join(one))
            seqs[kind] = seq
            s.close()
        finally:
            daemon.kill()
    assert seqs["qemu"] == ["JSC:created JSC:null reply"] * 10
    assert_same("events before the reply", seqs["qemu"], seqs["ours"])


@pytest.mark.xfail(strict=True, reason="known difference: QEMU drains the graph around job "
                   "creation and refused job commands, so each running job emits "
                   "JOB_STATUS_CHANGE paused/running pairs (standby/ready when ready), a "
                   "varying number; ours emits none")
def test_known_difference_drain_pairs():
    async def scenario(side):
        await null_nodes_and_slow_mirror(side)
        await side.cmd("blockdev-mirror", {"job-id": "j0", "device": "c", "target": "d",
                                           "sync": "full"})
        evs = await side.quiet_events(0.3)
        side.note(f"j0 paused during the refused command: "
                  f"{any(summarize(e) == 'JSC:paused' for e in evs)}")
    q, o = run_both(scenario)
    assert q[-1].endswith("True")
    assert_same("drain pairs", q, o)
