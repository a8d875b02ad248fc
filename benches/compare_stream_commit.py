#!/usr/bin/env python3
"""Stream and commit of a qcow2 chain: ours vs QEMU's, one run, same files.

The chains (made once per directory with qemu-img, kept pristine; every
run works on fresh copies of them, made with cp --sparse=always and
fsync'd, untimed):

  base.qcow2   --size, fully allocated with random data
  mid.qcow2    -b base.qcow2; 50 % allocated: 2 MiB of random data, 2 MiB
               not allocated, alternating
  top.qcow2    -b mid.qcow2; small: 1 MiB of random data every 48 MiB
  top50.qcow2  -b base.qcow2; the same content as mid.qcow2 (the top of
               the two-layer chain)

  chain A = base <- top (top50.qcow2, 50 %)
  chain B = base <- mid (50 %) <- top (small)

Operations (job id job0, defaults otherwise):

  stream               chain A, block-stream device=top: flatten, the top
                       gets base's data under its unallocated half
  stream-base          chain B, block-stream device=top base-node=base: the
                       top gets mid's data, the chain becomes base <- top
  commit-intermediate  chain B, block-commit device=top top-node=mid
                       base-node=base: mid's data goes into base, the chain
                       becomes base <- top
  commit-active        chain A, block-commit device=top base-node=base:
                       READY, then job-complete; the guest is on base

Tools:

  ours  target/release/examples/chain_jobs OP top.qcow2 --base base.qcow2
        [--mid mid.qcow2] ...: the same explicitly named nodes (base, mid,
        top) as QEMU's; its JSON gives `seconds` (job creation to
        BLOCK_JOB_COMPLETED) and `cpu-seconds` (getrusage of its process
        over the same interval). Process start, opening and closing the
        images are not counted.
  qemu  qemu-storage-daemon over QMP: blockdev-add base [mid] top with
        explicit node names and backing references, then block-stream /
        block-commit (block-job-complete sent at BLOCK_JOB_READY), timed
        from sending the command to BLOCK_JOB_COMPLETED; CPU = the daemon's
        utime+stime from /proc/PID/stat over the same interval (10 ms
        ticks). blockdev-del afterwards (untimed).

MiB/s is the virtual size divided by the time (each job walks the whole
virtual disk; about half of it is copied). CPU is given in seconds per GiB
of virtual size.

Flushes differ: our stream and commit fdatasync() the images they wrote
before BLOCK_JOB_COMPLETED; QEMU 10's do not (checked with strace: its
fdatasync comes at blockdev-del). On tmpfs that costs nothing; on a disk
it is part of ours' time only. The last column ("QEMU incl. blockdev-del")
adds QEMU's blockdev-del of the chain (where it flushes) to its time, for
reference; the ratio uses the times up to BLOCK_JOB_COMPLETED.

Per (dir, op): one untimed warm-up round, then --rounds counted rounds; the
tool order alternates every round. After each tool's first counted round
(untimed): `qemu-img compare` of the resulting guest view (and, for the
intermediate commit, of base against mid's old view) against the pristine
chain, `qemu-img check` of every image the job wrote, and the length of the
resulting backing chain.

Usage:
  python3 benches/compare_stream_commit.py [--size 1G] [--rounds 3]
      [--dir /dev/shm,/var/tmp/blockjob-bench-chain] [--json out.json]
      [--only stream,stream-base,commit-intermediate,commit-active,ours,qemu]
      [--chain-jobs PATH] [--timeout 600] [--keep-files]

A --dir entry whose last component does not start with "blockjob-bench"
gets a subdirectory "blockjob-bench-chain" (so --dir /dev/shm works).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (BenchError, GiB, MiB, QemuDaemon, QMPCommandError, allocated,
                      fs_type, kill_daemons, log, size_parser)

STRIPE = 2 * MiB  # mid / top50: 2 MiB data, 2 MiB not allocated, ...
TOP_EVERY = 48 * MiB  # top (chain B): 1 MiB of data every 48 MiB
TOP_LEN = MiB
LAYOUT_VERSION = 1

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = "/var/tmp/blockjob-bench-chain"

TOOLS = ["ours", "qemu"]
TOOL_NAMES = {"ours": "ours", "qemu": "QEMU"}


@dataclass(frozen=True)
class Op:
    name: str
    chain: str  # "A" or "B"
    qmp: str  # block-stream / block-commit
    args: dict  # QMP arguments besides job-id and device
    ours: list  # chain_jobs arguments besides the files
    view: str  # pristine image whose guest view the result must show
    result: str  # work image holding the guest view after the job
    written: tuple  # work images the job wrote (qemu-img check)
    chain_len: int  # layers of the resulting chain from `result`
    extra_compare: tuple = ()  # (work image, pristine image) pairs


OPS = [
    Op("stream", "A", "block-stream", {}, ["stream"],
       view="top50.qcow2", result="top.qcow2", written=("top.qcow2",), chain_len=1),
    Op("stream-base", "B", "block-stream", {"base-node": "base"},
       ["stream", "--base-node", "base"],
       view="top.qcow2", result="top.qcow2", written=("top.qcow2",), chain_len=2),
    Op("commit-intermediate", "B", "block-commit", {"top-node": "mid", "base-node": "base"},
       ["commit-intermediate", "--top-node", "mid", "--base-node", "base"],
       view="top.qcow2", result="top.qcow2", written=("base.qcow2", "top.qcow2"), chain_len=2,
       extra_compare=(("base.qcow2", "mid.qcow2"),)),
    Op("commit-active", "A", "block-commit", {"base-node": "base"},
       ["commit-active", "--base-node", "base"],
       view="top50.qcow2", result="base.qcow2", written=("base.qcow2",), chain_len=1),
]
OP_BY_NAME = {o.name: o for o in OPS}

# Work files of each chain: work name -> pristine name.
CHAIN_FILES = {
    "A": {"base.qcow2": "base.qcow2", "top.qcow2": "top50.qcow2"},
    "B": {"base.qcow2": "base.qcow2", "mid.qcow2": "mid.qcow2", "top.qcow2": "top.qcow2"},
}


def run(argv: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_random_raw(path: Path, size: int, extents) -> None:
    """A sparse raw file of `size` bytes with random data in `extents`
    ((offset, length) pairs) and holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, n in extents:
            end = off + n
            while off < end:
                k = min(8 * MiB, end - off)
                os.pwrite(fd, os.urandom(k), off)
                off += k
    finally:
        os.close(fd)


def top_layer_bytes(img: Path) -> int:
    """Bytes allocated in the top layer of `img` (qemu-img map)."""
    m = json.loads(run(["qemu-img", "map", "--output=json", "-U", str(img)]).stdout)
    return sum(e["length"] for e in m if e.get("depth") == 0 and e.get("data"))


def chain_len(img: Path) -> int:
    info = json.loads(run(["qemu-img", "info", "--backing-chain", "--output=json", "-U",
                           str(img)]).stdout)
    return len(info) if isinstance(info, list) else 1


# ---------------------------------------------------------------- QMP


# ---------------------------------------------------------------- bench


@dataclass
class Sample:
    dir: str
    fs: str
    op: str
    tool: str
    round: int  # 0 = warm-up
    counted: bool
    seconds: float
    cpu_seconds: float
    ready_seconds: float | None = None
    offset: int | None = None
    len: int | None = None
    check: str | None = None  # "ok" / "FAIL: ..." / None (not checked)
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, a):
        self.a = a
        self.size = a.size
        self.samples: list[Sample] = []
        self.sockdir = Path(tempfile.mkdtemp(prefix="compare_stream_commit."))
        self.qsd = shutil.which("qemu-storage-daemon")
        self.layer_bytes: dict[str, dict[str, int]] = {}

    # -- files --------------------------------------------------------

    def prepare_dir(self, root: Path) -> dict:
        """Pristine chains in root/pristine (re-used when they match the
        size and layout), an empty root/work."""
        pr, wk = root / "pristine", root / "work"
        pr.mkdir(parents=True, exist_ok=True)
        if wk.exists():
            shutil.rmtree(wk)
        wk.mkdir()
        need = int(self.size * 4.2)
        stamp = pr / "layout.json"
        want = {"size": self.size, "version": LAYOUT_VERSION}
        names = ("base.qcow2", "mid.qcow2", "top.qcow2", "top50.qcow2")
        have = stamp.exists() and all((pr / n).exists() for n in names) and \
            json.loads(stamp.read_text()) == want
        used = sum(allocated(p) for p in pr.iterdir()) if have else 0
        free = shutil.disk_usage(root).free
        if free + used < need:
            raise BenchError(f"{root}: {free / GiB:.1f} GiB free, need {need / GiB:.1f} GiB")
        if not have:
            for p in pr.iterdir():
                p.unlink()
            self.make_chains(pr)
            stamp.write_text(json.dumps(want))
        fsync_path(pr)
        lb = {n: top_layer_bytes(pr / n) for n in names}
        log(f"  {pr}: allocated in the top layer: "
            + ", ".join(f"{n} {v / MiB:.0f} MiB" for n, v in lb.items()))
        self.layer_bytes[str(root)] = lb
        return {"pristine": pr, "work": wk}

    def make_chains(self, pr: Path) -> None:
        size = self.size
        raw = pr / "tmp.raw"
        t0 = time.perf_counter()
        log(f"  creating the chains in {pr} ({size // MiB} MiB)")
        try:
            write_random_raw(raw, size, [(o, min(64 * MiB, size - o)) for o in range(0, size, 64 * MiB)])
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(pr / "base.qcow2")])
            write_random_raw(raw, size, [(o, STRIPE) for o in range(0, size, 2 * STRIPE)])
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(pr / "mid.qcow2")])
            write_random_raw(raw, size, [(o, TOP_LEN) for o in range(MiB, size - TOP_LEN + 1, TOP_EVERY)])
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(pr / "top.qcow2")])
        finally:
            raw.unlink(missing_ok=True)
        # Relative backing names: a copy of the files in another directory
        # is the same chain there.
        run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(pr / "mid.qcow2")])
        run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             str(pr / "top.qcow2")])
        shutil.copyfile(pr / "mid.qcow2", pr / "top50.qcow2")
        for n in ("base.qcow2", "mid.qcow2", "top.qcow2", "top50.qcow2"):
            fsync_path(pr / n)
            run(["qemu-img", "check", "-q", str(pr / n)])
        log(f"  chains created in {time.perf_counter() - t0:.1f} s")

    def fresh_copy(self, files: dict, op: Op) -> dict[str, Path]:
        """Work copies of the op's chain (cp --sparse=always, fsync'd)."""
        wk: Path = files["work"]
        for p in wk.iterdir():
            p.unlink()
        out = {}
        for wname, pname in CHAIN_FILES[op.chain].items():
            dst = wk / wname
            run(["cp", "--sparse=always", str(files["pristine"] / pname), str(dst)])
            fsync_path(dst)
            out[wname] = dst
        fsync_path(wk)
        return out

    # -- tools --------------------------------------------------------

    def run_ours(self, op: Op, w: dict[str, Path]) -> dict:
        argv = [self.a.chain_jobs, op.ours[0], str(w["top.qcow2"]), "--base", str(w["base.qcow2"])]
        if "mid.qcow2" in w:
            argv += ["--mid", str(w["mid.qcow2"])]
        argv += op.ours[1:] + ["--timeout-secs", str(self.a.timeout)]
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=self.a.timeout + 60,
                           stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
        if not lines:
            raise BenchError(f"chain_jobs printed no JSON (exit {p.returncode}): {p.stderr.strip()}")
        st = json.loads(lines[-1])
        if p.returncode != 0 or st.get("error"):
            raise BenchError(f"chain_jobs {op.name} failed (exit {p.returncode}): {st.get('error')} "
                             f"{p.stderr.strip()}")
        return dict(seconds=st["seconds"], cpu_seconds=st["cpu-seconds"],
                    ready_seconds=st.get("ready-seconds"), offset=st.get("offset"),
                    len=st.get("len"), extra={"wall-seconds": wall})

    def run_qemu(self, d: QemuDaemon, op: Op, w: dict[str, Path]) -> dict:
        def node(name, backing=None):
            n = {"driver": "qcow2", "node-name": name,
                 "file": {"driver": "file", "filename": str(w[f"{name}.qcow2"])}}
            if backing:
                n["backing"] = backing
            return n

        d.events.clear()
        added = []
        try:
            d.cmd("blockdev-add", node("base"))
            added.append("base")
            if "mid.qcow2" in w:
                d.cmd("blockdev-add", node("mid", "base"))
                added.append("mid")
            d.cmd("blockdev-add", node("top", added[-1]))
            added.append("top")
            r = d.run_job(op.qmp, {"device": "top", **op.args}, "job0", op.name)
            data = r.pop("data")
            # Closing the nodes is where QEMU flushes what the job wrote
            # (its stream and commit jobs do not flush; ours fdatasync()
            # before BLOCK_JOB_COMPLETED): timed apart, for reference.
            td = time.perf_counter()
            self.qemu_del(d, added)
            added.clear()
            del_s = time.perf_counter() - td
            return dict(**r, offset=data.get("offset"), len=data.get("len"),
                        extra={"del-seconds": del_s})
        finally:
            if added:
                self.qemu_del(d, added)

    @staticmethod
    def qemu_del(d: QemuDaemon, nodes: list[str]) -> None:
        """blockdev-del the nodes, parents first; after the job the graph
        changed, so retry in passes until nothing is left or no progress."""
        left = list(reversed(nodes))
        while left:
            progress = False
            for n in list(left):
                try:
                    d.cmd("blockdev-del", {"node-name": n})
                    left.remove(n)
                    progress = True
                except QMPCommandError as e:
                    if e.err.get("class") == "DeviceNotFound" or "not found" in str(e).lower():
                        left.remove(n)
                        progress = True
            if not progress:
                raise BenchError(f"qemu: could not blockdev-del {left}")

    # -- verification -------------------------------------------------

    def verify(self, files: dict, op: Op, w: dict[str, Path]) -> str:
        pr: Path = files["pristine"]
        wk: Path = files["work"]
        problems = []
        pairs = [(op.result, op.view)] + list(op.extra_compare)
        for work_name, pristine_name in pairs:
            p = run(["qemu-img", "compare", "-U", str(wk / work_name), str(pr / pristine_name)],
                    check=False)
            if p.returncode != 0:
                problems.append(f"compare {work_name} vs pristine {pristine_name}: "
                                f"{(p.stdout + p.stderr).strip().splitlines()[-1:]}")
        for n in op.written:
            p = run(["qemu-img", "check", "-q", str(wk / n)], check=False)
            if p.returncode != 0:
                problems.append(f"check {n}: exit {p.returncode} {p.stdout.strip()} {p.stderr.strip()}")
        cl = chain_len(wk / op.result)
        if cl != op.chain_len:
            problems.append(f"chain of {op.result} has {cl} layers, expected {op.chain_len}")
        return "ok" if not problems else "FAIL: " + "; ".join(problems)

    # -- one group ------------------------------------------------------

    def run_group(self, dname: str, fstype: str, files: dict, op: Op, tools: list[str]) -> None:
        daemon = None
        try:
            if "qemu" in tools:
                daemon = QemuDaemon(self.qsd, self.sockdir, f"qsd-{len(self.samples)}", self.a.timeout)
            checked: set[str] = set()
            for rnd in range(0, self.a.rounds + 1):
                order = tools if rnd % 2 == 0 else list(reversed(tools))
                for t in order:
                    w = self.fresh_copy(files, op)
                    if t == "ours":
                        res = self.run_ours(op, w)
                    else:
                        res = self.run_qemu(daemon, op, w)
                    check = None
                    if rnd == 1 and t not in checked:
                        checked.add(t)
                        check = self.verify(files, op, w)
                        if check != "ok":
                            log(f"  !!! {t} {op.name}: {check}")
                    s = Sample(dir=dname, fs=fstype, op=op.name, tool=t, round=rnd,
                               counted=rnd > 0, check=check, **res)
                    self.samples.append(s)
                    log(f"  [{dname} {op.name} {'warm-up' if rnd == 0 else f'r{rnd}'}] "
                        f"{TOOL_NAMES[t]:<5} {self.size / MiB / s.seconds:7.0f} MiB/s "
                        f"{s.seconds:7.3f} s cpu {s.cpu_seconds:.3f} s "
                        f"offset/len {s.offset}/{s.len}"
                        + (f" ready {s.ready_seconds:.3f} s" if s.ready_seconds is not None else "")
                        + (f" check {check}" if check else ""))
        finally:
            if daemon:
                daemon.close()
            for p in files["work"].iterdir():
                p.unlink()

    # -- report -------------------------------------------------------

    def summarize(self, dname: str, op: str, tools: list[str]) -> dict:
        rows = {}
        for t in tools:
            ss = [s for s in self.samples if s.dir == dname and s.op == op and s.tool == t
                  and s.counted]
            if not ss:
                continue
            rates = [self.size / MiB / s.seconds for s in ss]
            cpus = [s.cpu_seconds * GiB / self.size for s in ss]
            checks = [s.check for s in ss if s.check]
            bad = [c for c in checks if c != "ok"]
            rows[t] = {
                "median_mib_s": statistics.median(rates),
                "min_mib_s": min(rates), "max_mib_s": max(rates),
                "median_seconds": statistics.median(s.seconds for s in ss),
                "median_cpu_s_per_gib": statistics.median(cpus),
                "median_mib_s_incl_close": statistics.median(
                    self.size / MiB / (s.seconds + s.extra.get("del-seconds", 0.0)) for s in ss),
                "check": bad[0] if bad else ("ok" if checks else None),
                "n": len(ss),
            }
        return rows

    def report(self, dirs, ops: list[Op], tools: list[str], env: dict) -> dict:
        out = {}
        lines = []
        p = lines.append
        p("")
        p(f"# Stream and commit, ours vs QEMU: {self.size // MiB} MiB chain, "
          f"{self.a.rounds} counted rounds (+1 warm-up), medians")
        p("")
        p("MiB/s = virtual size / (job command to BLOCK_JOB_COMPLETED); CPU s/GiB of virtual size; "
          "ratio = ours median MiB/s / QEMU median MiB/s (target: >= 1.00).")
        p("")
        p("| dir (fs) | op | ours MiB/s | QEMU MiB/s | ours/QEMU | ours CPU s/GiB | "
          "QEMU CPU s/GiB | check ours / QEMU | QEMU MiB/s incl. blockdev-del |")
        p("|---|---|---:|---:|---:|---:|---:|---|---:|")
        targets = []
        for dname, fstype, _ in dirs:
            for op in ops:
                rows = self.summarize(dname, op.name, tools)
                if not rows:
                    continue
                out[f"{dname}|{op.name}"] = rows
                o, q = rows.get("ours"), rows.get("qemu")

                def mibs(r):
                    return "—" if r is None else (f"{r['median_mib_s']:.0f} "
                                                  f"({r['min_mib_s']:.0f}–{r['max_mib_s']:.0f})")

                def cpu(r):
                    return "—" if r is None else f"{r['median_cpu_s_per_gib']:.3f}"

                def incl(r):
                    return "—" if r is None else f"{r['median_mib_s_incl_close']:.0f}"

                def chk(r):
                    return "—" if r is None or r["check"] is None else r["check"]
                ratio = o["median_mib_s"] / q["median_mib_s"] if o and q else None
                if ratio is not None:
                    targets.append({"dir": dname, "op": op.name, "ratio": ratio, "pass": ratio >= 1.0})
                p(f"| {dname} ({fstype}) | {op.name} | {mibs(o)} | {mibs(q)} | "
                  f"{'—' if ratio is None else f'{ratio:.2f}'} | {cpu(o)} | {cpu(q)} | "
                  f"{chk(o)} / {chk(q)} | "
                  f"{incl(q)} |")
        p("")
        p("MiB/s cells: median (min–max). Layers allocated in the pristine top layers: "
          + "; ".join(f"{d}: " + ", ".join(f"{n} {v / MiB:.0f} MiB" for n, v in lb.items())
                      for d, lb in self.layer_bytes.items()))
        failed = [f"{t['dir']} {t['op']} ({t['ratio']:.2f})" for t in targets if not t["pass"]]
        if targets:
            p(f"Target ours/QEMU >= 1.00: {len(targets) - len(failed)}/{len(targets)} pass"
              + (f"; below: {', '.join(failed)}" if failed else ""))
        p(f"Load average: start {env['loadavg-start']}, end {env.get('loadavg-end')}; "
          f"{env['cpus']} CPUs.")
        print("\n".join(lines), flush=True)
        return {"summary": out, "targets": targets}


def env_info(a) -> dict:
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg-start": tuple(round(x, 2) for x in os.getloadavg()),
        "qemu-img": cmd(["qemu-img", "--version"]).splitlines()[0:1],
        "qemu-storage-daemon": cmd(["qemu-storage-daemon", "--version"]).splitlines()[0:1],
        "chain_jobs": a.chain_jobs,
        "git": cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def bench_root(d: str) -> Path:
    p = Path(d.strip())
    return p if p.name.startswith("blockjob-bench") else p / "blockjob-bench-chain"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_parser(4 * MiB), default=GiB, help="virtual size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (default 3)")
    ap.add_argument("--dir", default=DEFAULT_DIR,
                    help=f"comma-separated directories (default {DEFAULT_DIR}; e.g. /dev/shm,{DEFAULT_DIR})")
    ap.add_argument("--json", help="write raw samples and summaries here")
    ap.add_argument("--only", help="comma-separated ops and/or tools: "
                    + ",".join([o.name for o in OPS] + TOOLS))
    ap.add_argument("--chain-jobs", help="path of the example binary "
                    "(default target/release/examples/chain_jobs, built if missing)")
    ap.add_argument("--timeout", type=float, default=600, help="per-job timeout, s (default 600)")
    ap.add_argument("--keep-files", action="store_true",
                    help="keep the pristine chains (re-used by the next run)")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")

    ops, tools = list(OPS), list(TOOLS)
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in want if x not in OP_BY_NAME and x not in TOOLS]
        if bad:
            ap.error(f"unknown op/tool(s) {bad}; known: {', '.join([o.name for o in OPS] + TOOLS)}")
        if any(x in OP_BY_NAME for x in want):
            ops = [o for o in ops if o.name in want]
        if any(x in TOOLS for x in want):
            tools = [t for t in tools if t in want]

    for tool in ("qemu-img", "cp") + (("qemu-storage-daemon",) if "qemu" in tools else ()):
        if not shutil.which(tool):
            log(f"error: {tool} not found")
            return 1
    if a.chain_jobs is None:
        a.chain_jobs = str(REPO / "target" / "release" / "examples" / "chain_jobs")
        if "ours" in tools and not Path(a.chain_jobs).exists():
            log(f"{a.chain_jobs} missing: cargo build --release --example chain_jobs")
            r = subprocess.run(["cargo", "build", "--release", "--example", "chain_jobs"], cwd=REPO)
            if r.returncode != 0:
                log("cargo build failed")
                return 1

    b = Bench(a)
    atexit.register(kill_daemons)
    atexit.register(shutil.rmtree, b.sockdir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = env_info(a)
    roots: list[tuple[Path, bool]] = []
    t_start = time.perf_counter()
    try:
        log(f"load average at start: {env['loadavg-start']} ({env['cpus']} CPUs)")
        dirs = []
        for ds in [x for x in a.dir.split(",") if x.strip()]:
            root = bench_root(ds)
            roots.append((root, not root.exists()))
            files = b.prepare_dir(root)
            dirs.append((str(root), fs_type(root), files))
        for dname, fstype, files in dirs:
            for op in ops:
                b.run_group(dname, fstype, files, op, tools)
        env["loadavg-end"] = tuple(round(x, 2) for x in os.getloadavg())
        env["total-seconds"] = round(time.perf_counter() - t_start, 1)
        summary = b.report(dirs, ops, tools, env)
        if a.json:
            doc = {"config": {"size": a.size, "rounds": a.rounds, "dirs": [d for d, _, _ in dirs],
                              "ops": [o.name for o in ops], "tools": tools,
                              "stripe": STRIPE, "top-every": TOP_EVERY, "top-len": TOP_LEN},
                   "env": env, "layer-bytes": b.layer_bytes,
                   "samples": [s.__dict__ for s in b.samples], **summary}
            Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
            log(f"raw samples written to {a.json}")
        log(f"total {env['total-seconds']} s")
        bad = [s for s in b.samples if s.check and s.check != "ok"]
        return 2 if bad else 0
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        kill_daemons()
        for root, created in roots:
            shutil.rmtree(root / "work", ignore_errors=True)
            if not a.keep_files:
                shutil.rmtree(root / "pristine", ignore_errors=True)
                if created:
                    try:
                        root.rmdir()
                    except OSError:
                        pass


if __name__ == "__main__":
    sys.exit(main())
