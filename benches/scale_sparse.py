#!/usr/bin/env python3
"""Mirror time and target allocation grow with data, not with size.

A sparse raw source of SIZE bytes holding DATA bytes of random data (in
64 MiB extents spread evenly over the image) is mirrored (sync=full) to
a fresh sparse target on a real filesystem (default: a directory on the
root filesystem), by `blockjob daemon` and by qemu-storage-daemon, over
the same QMP:

  blockdev-add src  {"driver": "raw", "file": {"driver": "file", ...}}
  blockdev-add tgt  the same, with --discard (default: QEMU's default,
                    "ignore"; "unmap" lets zero writes punch holes)
  blockdev-mirror   job-id m, device src, target tgt, sync full
  READY -> block-job-complete -> COMPLETED (timed), then blockdev-del

For every size: seconds from blockdev-mirror to BLOCK_JOB_COMPLETED, the
daemon's CPU seconds, and the target's allocated bytes (st_blocks * 512)
after the job. Then the target is compared with the source over the data
extents and a sample of the holes (reading a whole 1 TiB sparse file
would take minutes).

QEMU 10's mirror writes zeroes over every hole of a sparse source into a
target that is not known to be zero-initialised, so its target ends fully
allocated: it runs only for sizes up to --qemu-max (default 16G) and
only when the filesystem has room for the whole target plus 2 GiB;
larger sizes print "skipped (would allocate SIZE)".

Usage:
  python3 benches/scale_sparse.py [--sizes 16G,256G,1T] [--data 1G]
      [--dir /var/tmp/blockjob-scale] [--qemu-max 16G] [--rounds 1]
      [--blockjob PATH] [--no-build] [--timeout 600]
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (BenchError, QemuDaemon, allocated, kill_daemons, log,  # noqa: E402
                      size_parser)

EXTENT = 64 << 20
GIB = 1 << 30


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def make_source(path: Path, size: int, data: int, seed: int) -> list[tuple[int, int]]:
    """Sparse file with `data` bytes of random data in EXTENT pieces spread
    evenly; returns the extents."""
    n = max(1, data // EXTENT)
    stride = size // n
    rng = random.Random(seed)
    extents = []
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(n):
            off = i * stride // EXTENT * EXTENT
            f.seek(off)
            f.write(rng.randbytes(EXTENT))
            extents.append((off, EXTENT))
        f.flush()
        os.fsync(f.fileno())
    return extents


def check_target(src: Path, tgt: Path, size: int, extents: list[tuple[int, int]]) -> None:
    """The data extents and 64 sampled hole ranges read the same."""
    rng = random.Random(size)
    samples = list(extents)
    for _ in range(64):
        off = rng.randrange(0, size - (1 << 20)) // 4096 * 4096
        samples.append((off, 1 << 20))
    with open(src, "rb") as a, open(tgt, "rb") as b:
        if os.fstat(b.fileno()).st_size != size:
            raise BenchError(f"target size {os.fstat(b.fileno()).st_size} != {size}")
        for off, n in samples:
            if os.pread(a.fileno(), n, off) != os.pread(b.fileno(), n, off):
                raise BenchError(f"target differs at {off}")


def run_one(prog, sockdir: Path, name: str, src: Path, tgt: Path, timeout: float,
            discard: str) -> dict:
    tgt.unlink(missing_ok=True)
    with open(tgt, "wb") as f:
        f.truncate(src.stat().st_size)
    d = QemuDaemon(prog, sockdir, name, timeout)
    try:
        d.cmd("blockdev-add", {"driver": "raw", "node-name": "src",
                               "file": {"driver": "file", "filename": str(src)}})
        d.cmd("blockdev-add", {"driver": "raw", "node-name": "tgt", "discard": discard,
                               "file": {"driver": "file", "filename": str(tgt)}})
        r = d.run_job("blockdev-mirror", {"device": "src", "target": "tgt", "sync": "full"},
                      "m", name)
        d.cmd("blockdev-del", {"node-name": "tgt"})
        d.cmd("blockdev-del", {"node-name": "src"})
    finally:
        d.close()
    return dict(seconds=r["seconds"], cpu=r["cpu_seconds"], alloc=allocated(tgt))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16G,256G,1T")
    ap.add_argument("--data", type=size_parser(EXTENT), default=GIB)
    ap.add_argument("--dir", default="/var/tmp/blockjob-scale")
    ap.add_argument("--qemu-max", type=size_parser(1), default=16 * GIB)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--blockjob", default="target/release/blockjob")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--discard", default="ignore", choices=["ignore", "unmap"],
                    help="the target node's discard option (QEMU's default: ignore)")
    a = ap.parse_args()
    parse = size_parser(GIB)
    sizes = [parse(s) for s in a.sizes.split(",")]
    root = Path(__file__).resolve().parent.parent
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "blockjob-cli"],
                       cwd=root, check=True)
    ours = [str(root / a.blockjob if not os.path.isabs(a.blockjob) else a.blockjob), "daemon"]
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="scale-qmp-"))
    atexit.register(kill_daemons)
    atexit.register(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    rows = []
    for size in sizes:
        src, tgt = work / "src.raw", work / "tgt.raw"
        log(f"source: {human(size)} with {human(a.data)} of data")
        extents = make_source(src, size, a.data, seed=size)
        res = {"ours": [], "qemu": []}
        free = shutil.disk_usage(work).free
        qemu_ok = size <= a.qemu_max and free > size + 2 * GIB
        for rnd in range(a.rounds):
            for tool in ("ours", "qemu"):
                if tool == "qemu" and not qemu_ok:
                    continue
                prog = ours if tool == "ours" else "qemu-storage-daemon"
                r = run_one(prog, sockdir, f"{tool}{rnd}", src, tgt, a.timeout, a.discard)
                if rnd == 0:
                    check_target(src, tgt, size, extents)
                log(f"  {tool}: {r['seconds']:.2f} s, cpu {r['cpu']:.2f} s, "
                    f"target allocated {human(r['alloc'])}")
                res[tool].append(r)
                tgt.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
        rows.append((size, res, qemu_ok))
    print()
    print(f"mirror of a sparse raw image holding {human(a.data)} of data to a fresh "
          f"sparse target on {a.dir}, target discard={a.discard} (medians of {a.rounds})")
    print()
    print("| size | ours s | ours CPU s | ours target allocated | QEMU s | QEMU CPU s "
          "| QEMU target allocated |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    med = statistics.median
    for size, res, qemu_ok in rows:
        o = res["ours"]
        line = (f"| {human(size)} | {med(r['seconds'] for r in o):.2f} | "
                f"{med(r['cpu'] for r in o):.2f} | {human(med(r['alloc'] for r in o))} |")
        q = res["qemu"]
        if q:
            line += (f" {med(r['seconds'] for r in q):.2f} | {med(r['cpu'] for r in q):.2f} | "
                     f"{human(med(r['alloc'] for r in q))} |")
        else:
            why = f"would allocate {human(size)}" if qemu_ok is False else ""
            line += f" skipped ({why}) | | |"
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
