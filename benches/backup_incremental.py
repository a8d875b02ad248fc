#!/usr/bin/env python3
"""Incremental backup of 1 % dirty clusters: ours vs QEMU's blockdev-backup
sync=bitmap.

Per format (raw, qcow2) and round, with fresh files in --dir (default
/dev/shm): a --size (default 16 GiB) source that is empty (raw: a sparse
file; qcow2: qemu-img create) and an empty target of the same size and
format. Then, on each side:

  1. block-dirty-bitmap-add src b0 (granularity --granularity, 64 KiB)
  2. guest writes: one --io-size (64 KiB) write at each of --dirty-percent
     (1 %) of the clusters, distinct clusters drawn with random.sample(seed),
     in random order, each filled with its own byte (the same list for both
     sides, handed to ours in a file)
       ours  target/release/examples/backup_bench incremental (release
             build): the writes go through a BlockBackend on src
       qemu  qemu-storage-daemon over QMP; the writes go through an NBD
             export of src (nbd-server-start + block-export-add
             writable=true) with mirror_under_writes.py's minimal NBD client
  3. blockdev-backup job-id=b device=src target=tgt sync=bitmap bitmap=b0
     bitmap-mode=on-success (defaults otherwise), timed from the call (ours)
     / the command sent (QEMU) to BLOCK_JOB_COMPLETED, then an fdatasync()
     of the target file by this script (neither backup flushes its target;
     the fdatasync costs nothing on tmpfs, and is shown apart)

  CPU      ours: getrusage of the example process over the job (µs);
           QEMU: the daemon's utime+stime from /proc/PID/stat over the job,
           in 10 ms ticks: coarse for jobs of ~0.1 s, hence the medians
  write s  the guest writes of step 2 (info only: NBD through Python vs an
           in-process call)
  checks   b0 held exactly the dirty bytes before the job and is empty
           after it (on-success); the target's allocated bytes (st_blocks)
           stay near the dirty bytes (a watchdog kills the process if the
           target grows past 4x the dirty bytes + 64 MiB, so a backup that
           copies everything never fills a 16 GiB file); after the first
           counted round, qemu-img compare of source and target (the
           source holds only the guest writes, so they must be identical)

One warm-up round, then --rounds counted rounds; ours and QEMU alternate
which goes first.

Targets (issue #15): ours' time <= QEMU's, ours' CPU <= QEMU's.

Usage:
  python3 benches/backup_incremental.py [--size 16G] [--dir /dev/shm]
      [--formats raw,qcow2] [--dirty-percent 1] [--rounds 3] [--seed 1]
      [--impls ours,qemu] [--no-build] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (BenchError, GiB, MiB, QemuDaemon, allocated, fdatasync_path, fs_type,
                      kill_daemons, log, size_parser)
from mirror_under_writes import Nbd

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "target" / "release" / "examples" / "backup_bench"
IMPLS = ("ours", "qemu")


class Watchdog:
    """Kill `pid` if `path` grows past `limit` allocated bytes."""

    def __init__(self, pid: int, path: Path, limit: int):
        self.pid, self.path, self.limit = pid, path, limit
        self.fired: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                n = allocated(self.path)
            except OSError:
                continue
            if n > self.limit:
                self.fired = n
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.fired is not None:
            raise BenchError(f"{self.path} grew to {self.fired // MiB} MiB allocated "
                             f"(limit {self.limit // MiB} MiB): process killed")


def make_writes(size: int, io_size: int, percent: float, seed: int) -> list[tuple[int, int]]:
    """Distinct io_size-aligned offsets, `percent` % of them, in random
    order, each with its own fill byte (never zero)."""
    rng = random.Random(seed)
    n = size // io_size
    picks = rng.sample(range(n), max(1, round(n * percent / 100)))
    return [(i * io_size, rng.randrange(1, 256)) for i in picks]


def create_image(path: Path, fmt: str, size: int) -> None:
    path.unlink(missing_ok=True)
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)


def node(name: str, fmt: str, path: Path) -> dict:
    return {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": str(path)}}


def run_ours(a, fmt: str, src: Path, dst: Path, offsets: Path, limit: int) -> dict:
    argv = [str(EXAMPLE), "incremental", "--src", str(src), "--dst", str(dst), "--format", fmt,
            "--offsets", str(offsets), "--io-size", str(a.io_size),
            "--granularity", str(a.granularity), "--timeout-secs", str(a.timeout)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    wd = Watchdog(p.pid, dst, limit)
    try:
        out, err = p.communicate(timeout=a.timeout + 60)
    finally:
        wd.close()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    r = json.loads(lines[-1]) if lines else {}
    if p.returncode != 0 or "error" in r:
        raise BenchError(f"backup_bench incremental failed ({p.returncode}): {r.get('error')} "
                         f"{err.strip()}")
    return r


def bitmap_count(d: QemuDaemon, node_name: str, name: str) -> int:
    for n in d.cmd("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == node_name:
            for b in n.get("dirty-bitmaps", []):
                if b.get("name") == name:
                    return b["count"]
    raise BenchError(f"qemu: no bitmap {name} on {node_name}")


def run_qemu(a, fmt: str, src: Path, dst: Path, writes, work: Path, limit: int) -> dict:
    d = QemuDaemon("qemu-storage-daemon", work, "qsd", a.timeout)
    wd = Watchdog(d.pid, dst, limit)
    try:
        d.cmd("blockdev-add", node("src", fmt, src))
        d.cmd("blockdev-add", node("tgt", fmt, dst))
        d.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0",
                                         "granularity": a.granularity})
        sock = work / "nbd.sock"
        d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        d.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "name": "src",
                                   "writable": True})
        nbd = Nbd(str(sock), "src")
        t0 = time.perf_counter()
        for off, b in writes:
            nbd.write(off, bytes((b,)) * a.io_size)
        write_s = time.perf_counter() - t0
        nbd.close()
        before = bitmap_count(d, "src", "b0")
        r = d.run_job("blockdev-backup", {"device": "src", "target": "tgt", "sync": "bitmap",
                                          "bitmap": "b0", "bitmap-mode": "on-success"},
                      "b", "incremental backup")
        after = bitmap_count(d, "src", "b0")
        d.cmd("block-export-del", {"id": "e"})
        d.cmd("nbd-server-stop")
        return {"impl": "qemu", "writes": len(writes), "write-seconds": write_s,
                "dirty-before": before, "seconds": r["seconds"], "cpu-seconds": r["cpu_seconds"],
                "offset": r["data"].get("offset"), "len": r["data"].get("len"),
                "bitmap-count-after": after}
    finally:
        d.close()
        wd.close()


def compare(fmt: str, src: Path, dst: Path) -> str:
    p = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", fmt, str(src), str(dst)],
                       capture_output=True, text=True)
    return "ok" if p.returncode == 0 else f"DIFFER ({p.returncode}) {p.stdout.strip()}{p.stderr.strip()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", type=size_parser(MiB), default=16 * GiB, help="virtual size (16G)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    ap.add_argument("--formats", default="raw,qcow2", help="raw, qcow2 (default both)")
    ap.add_argument("--dirty-percent", type=float, default=1.0, help="dirty clusters, % (1)")
    ap.add_argument("--io-size", type=int, default=65536, help="bytes per guest write (64 KiB)")
    ap.add_argument("--granularity", type=int, default=65536, help="bitmap granularity (64 KiB)")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--impls", default="ours,qemu", help="ours, qemu (default both)")
    ap.add_argument("--timeout", type=float, default=300, help="s to wait for a job")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args()
    formats = [f for f in a.formats.split(",") if f]
    impls = [i for i in a.impls.split(",") if i]
    if any(f not in ("raw", "qcow2") for f in formats) or not formats:
        ap.error("--formats: raw, qcow2")
    if any(i not in IMPLS for i in impls) or not impls:
        ap.error("--impls: ours, qemu")
    if a.size % a.io_size or a.io_size % a.granularity:
        ap.error("--size must be a multiple of --io-size, --io-size of --granularity")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(kill_daemons)
    if "ours" in impls and not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "backup_bench"],
                       cwd=REPO, check=True)

    work = Path(tempfile.mkdtemp(prefix="backup-incremental.", dir=a.dir))
    atexit.register(shutil.rmtree, work, True)
    writes = make_writes(a.size, a.io_size, a.dirty_percent, a.seed)
    dirty = len(writes) * a.io_size
    limit = 4 * dirty + 64 * MiB
    offsets = work / "writes.txt"
    offsets.write_text("".join(f"{o} {b}\n" for o, b in writes))
    log(f"{len(writes)} writes of {a.io_size} B = {dirty / MiB:.0f} MiB dirty of "
        f"{a.size / GiB:g} GiB in {work} ({fs_type(work)})")
    loadavg = os.getloadavg()

    results = []
    for fmt in formats:
        src, dst = work / f"src.{fmt}", work / f"dst.{fmt}"
        for rnd in range(a.rounds + 1):
            order = impls if rnd % 2 == 0 else list(reversed(impls))
            for impl in order:
                create_image(src, fmt, a.size)
                create_image(dst, fmt, a.size)
                if impl == "ours":
                    r = run_ours(a, fmt, src, dst, offsets, limit)
                else:
                    r = run_qemu(a, fmt, src, dst, writes, work, limit)
                r["fdatasync-seconds"] = fdatasync_path(dst)
                r.update(format=fmt, round=rnd, allocated=allocated(dst),
                         src_allocated=allocated(src))
                problems = []
                if r["dirty-before"] != dirty:
                    problems.append(f"b0 held {r['dirty-before']} B before the job, expected {dirty}")
                if r["bitmap-count-after"] != 0:
                    problems.append(f"b0 holds {r['bitmap-count-after']} B after the job")
                if r["offset"] != r["len"] or r["len"] != dirty:
                    problems.append(f"COMPLETED offset/len {r['offset']}/{r['len']}, expected {dirty}")
                if rnd == 1:
                    c = compare(fmt, src, dst)
                    if c != "ok":
                        problems.append(f"qemu-img compare: {c}")
                r["check"] = "ok" if not problems else "; ".join(problems)
                log(f"  [{fmt} {'warm-up' if rnd == 0 else f'r{rnd}'}] {impl:<4} "
                    f"{r['seconds'] * 1000:7.1f} ms + fdatasync {r['fdatasync-seconds'] * 1000:.1f} ms, "
                    f"cpu {r['cpu-seconds'] * 1000:.0f} ms, writes {r['write-seconds']:.2f} s, "
                    f"target {r['allocated'] / MiB:.0f} MiB, {r['check']}")
                results.append(r)
        for p in (src, dst):
            p.unlink(missing_ok=True)

    print(f"\n# Incremental backup (sync=bitmap, bitmap-mode=on-success): {a.size / GiB:g} GiB, "
          f"{len(writes)} dirty {a.io_size // 1024} KiB clusters ({a.dirty_percent:g} %, "
          f"{dirty / MiB:.0f} MiB), {a.dir} ({fs_type(work)}), {a.rounds} counted rounds "
          f"(+1 warm-up), medians (min–max)\n")
    print("| format | ours ms | QEMU ms | QEMU time / ours | ours MiB/s | QEMU MiB/s "
          "| CPU ms ours / QEMU | to COMPLETED ms ours / QEMU | guest writes s ours / QEMU "
          "| target allocated MiB ours / QEMU | check ours / QEMU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    summary = {}
    targets = []
    for fmt in formats:
        m = {}
        for impl in impls:
            rs = [r for r in results if r["format"] == fmt and r["impl"] == impl and r["round"] > 0]
            tot = [r["seconds"] + r["fdatasync-seconds"] for r in rs]
            m[impl] = {
                "ms": statistics.median(tot) * 1000, "min": min(tot) * 1000, "max": max(tot) * 1000,
                "job_ms": statistics.median(r["seconds"] for r in rs) * 1000,
                "cpu_ms": statistics.median(r["cpu-seconds"] for r in rs) * 1000,
                "write_s": statistics.median(r["write-seconds"] for r in rs),
                "alloc": statistics.median(r["allocated"] for r in rs),
                "check": next((r["check"] for r in rs if r["check"] != "ok"), "ok"),
            }
        summary[fmt] = m
        o, q = m.get("ours"), m.get("qemu")

        def g(x, k, f="{:.1f}"):
            return "—" if x is None else f.format(x[k])
        sp = f"{q['ms'] / o['ms']:.2f}" if o and q else "—"
        orate, qrate = (f"{dirty / MiB / x['ms'] * 1000:.0f}" if x else "—" for x in (o, q))
        print(f"| {fmt} | {g(o, 'ms')} ({g(o, 'min')}–{g(o, 'max')}) "
              f"| {g(q, 'ms')} ({g(q, 'min')}–{g(q, 'max')}) | {sp} "
              f"| {orate} | {qrate} "
              f"| {g(o, 'cpu_ms', '{:.0f}')} / {g(q, 'cpu_ms', '{:.0f}')} "
              f"| {g(o, 'job_ms')} / {g(q, 'job_ms')} "
              f"| {g(o, 'write_s', '{:.2f}')} / {g(q, 'write_s', '{:.2f}')} "
              f"| {'—' if not o else o['alloc'] // MiB} / {'—' if not q else q['alloc'] // MiB} "
              f"| {g(o, 'check', '{}')} / {g(q, 'check', '{}')} |")
        if o and q:
            targets.append((f"{fmt}: time ours <= QEMU", o["ms"] <= q["ms"]))
            targets.append((f"{fmt}: CPU ours <= QEMU", o["cpu_ms"] <= q["cpu_ms"]))
    print()
    for name, ok in targets:
        print(f"- {name}: {'PASS' if ok else 'FAIL'}")
    print(f"- CPU: QEMU's in 10 ms ticks. Load average: start {tuple(round(x, 2) for x in loadavg)}, "
          f"end {tuple(round(x, 2) for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "summary": summary}, indent=1) + "\n")
    return 0 if all(r["check"] == "ok" for r in results) else 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
