#!/usr/bin/env python3
"""O_DIRECT mirror throughput: ours with each `aio` mode against
qemu-storage-daemon with each, and dd as the device's ceiling, in one run.

  source   --size (default 1 GiB) of random bytes, fully allocated
  target   a file of the same size, fully written once before the first
           round and then overwritten in place (no allocation in the
           timed runs; never a huge sparse file: QEMU would fill it)
  dir      --dir (default: a directory on the root filesystem, next to
           this repository; /dev/shm would not be a device)
  tools    ours-MODE   `blockjob daemon`, QMP: blockdev-add of source and
                       target (raw over file, cache.direct=on, aio=MODE),
                       blockdev-mirror sync=full, block-job-complete at
                       READY
           qemu-MODE   qemu-storage-daemon, the very same QMP
           dd          dd if=SRC of=DST bs=4M iflag=direct oflag=direct
                       conv=notrunc,fdatasync (the device ceiling: one
                       stream of large aligned direct requests)
  modes    threads, native, io_uring
  --base   another build of blockjob, run as the tools base-MODE (e.g.
           the commit before a change, to compare both in one run)
  --loop   the same on two loop devices over those files (`losetup
           --direct-io=on`, root), nodes `host_device`, dd on the devices

time: blockdev-mirror sent to BLOCK_JOB_COMPLETED (daemons), process start
to exit (dd); CPU: the daemon's utime+stime over the same span
(/proc/PID/stat, 10 ms ticks), dd's from wait4. One warm-up round, then
--rounds (default 3) counted rounds, tool order rotating; medians printed
with MiB/s, CPU s/GiB, and ratios to QEMU's best mode and to dd, then
each of ours paired by round with QEMU's fastest mode of that round. After
the first counted run of each tool the target is compared with the
source.

Targets (issue #18): ours >= QEMU's best mode, >= 0.90 x dd, CPU per GiB
<= QEMU's.

Usage:
  python3 benches/compare_direct.py [--size 1G] [--rounds 3] [--dir DIR]
      [--loop] [--only TOOLS] [--blockjob PATH] [--base PATH] [--no-build]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BenchError, GiB, MiB, QemuDaemon, fs_type, log, prepare_run,
                      remove_work, run_main, size_parser, write_random)

REPO = Path(__file__).resolve().parent.parent
MODES = ("threads", "native", "io_uring")
TOOLS = tuple(f"{side}-{m}" for side in ("ours", "qemu") for m in MODES) + ("dd",)
BASE_TOOLS = tuple(f"base-{m}" for m in MODES)


def node(name: str, path: Path, aio: str) -> dict:
    proto = "host_device" if str(path).startswith("/dev/") else "file"
    return {"driver": "raw", "node-name": name,
            "file": {"driver": proto, "filename": str(path), "aio": aio,
                     "cache": {"direct": True, "no-flush": False}}}


class Bench:
    def __init__(self, a):
        self.a = a
        self.sockdir = Path(tempfile.mkdtemp(prefix="bj-direct-"))

    def mirror(self, tool: str, src: Path, dst: Path) -> dict:
        side, mode = tool.split("-", 1)
        argv = {"qemu": "qemu-storage-daemon", "ours": [self.a.blockjob, "daemon"],
                "base": [str(self.a.base), "daemon"]}[side]
        d = QemuDaemon(argv, self.sockdir, tool, timeout=600)
        try:
            d.cmd("blockdev-add", node("src", src, mode))
            d.cmd("blockdev-add", node("dst", dst, mode))
            r = d.run_job("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full"},
                          "m", tool)
            d.cmd("blockdev-del", {"node-name": "dst"})
            d.cmd("blockdev-del", {"node-name": "src"})
        finally:
            d.close()
        return {"seconds": r["seconds"], "cpu": r["cpu_seconds"]}

    def dd(self, src: Path, dst: Path) -> dict:
        t0 = time.perf_counter()
        p = subprocess.Popen(["dd", f"if={src}", f"of={dst}", "bs=4M", "iflag=direct",
                              "oflag=direct", "conv=notrunc,fdatasync", "status=none"])
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.perf_counter()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise BenchError(f"dd exited with {p.returncode}")
        return {"seconds": t1 - t0, "cpu": ru.ru_utime + ru.ru_stime}

    def run(self, tool: str, src: Path, dst: Path) -> dict:
        return self.dd(src, dst) if tool == "dd" else self.mirror(tool, src, dst)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=size_parser(4096), default=GiB)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=REPO / "target" / "bench-direct")
    ap.add_argument("--only", default=",".join(TOOLS))
    ap.add_argument("--blockjob", default=str(REPO / "target" / "release" / "blockjob"))
    ap.add_argument("--base", type=Path,
                    help="another build of blockjob, run as the tools base-MODE")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--loop", action="store_true",
                    help="mirror between loop devices over the files (host_device nodes)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    tools = [t for t in a.only.split(",") if t]
    if a.base:
        if not os.access(a.base, os.X_OK):
            ap.error(f"--base {a.base}: not an executable")
        tools += [t for t in BASE_TOOLS if t not in tools]
    known = TOOLS + (BASE_TOOLS if a.base else ())
    for t in tools:
        if t not in known:
            ap.error(f"unknown tool {t!r} (known: {', '.join(known)})")
    work = prepare_run(REPO, a.no_build, a.dir, "direct-")
    src, dst = work / "src.raw", work / "dst.raw"
    loops: list[str] = []
    try:
        log(f"{a.size // MiB} MiB in {work} ({fs_type(work)}); writing source and target")
        write_random((src, dst), a.size)
        if a.loop:
            for p in (src, dst):
                loops.append(subprocess.run(
                    ["losetup", "-f", "--show", "--direct-io=on", str(p)],
                    check=True, capture_output=True, text=True).stdout.strip())
            src, dst = Path(loops[0]), Path(loops[1])
            log(f"loop devices {loops[0]} (source), {loops[1]} (target)")
        b = Bench(a)
        res: dict[str, list[dict]] = {t: [] for t in tools}
        for rnd in range(a.rounds + 1):
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
            for t in order:
                r = b.run(t, src, dst)
                tag = "warm-up" if rnd == 0 else f"round {rnd}"
                log(f"{tag}: {t}: {r['seconds']:.2f} s, CPU {r['cpu']:.2f} s")
                if rnd == 1 and not res[t]:
                    if not same(src, dst):
                        raise BenchError(f"{t}: target differs from source")
                    # Another tool's run must not be taken for this one's.
                    subprocess.run(["dd", "if=/dev/zero", f"of={dst}", "bs=4M", "count=1",
                                    "conv=notrunc,fdatasync", "status=none"], check=True)
                if rnd > 0:
                    res[t].append(r)
        gib = a.size / GiB
        med = {t: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "cpu": statistics.median(r["cpu"] for r in rs)} for t, rs in res.items()}
        qemu = [t for t in med if t.startswith("qemu-")]
        best_q = min(qemu, key=lambda t: med[t]["seconds"]) if qemu else None
        where = f"loop devices on {fs_type(work)}" if a.loop else fs_type(work)
        print(f"\nO_DIRECT mirror of {a.size // MiB} MiB on {where}, medians of {a.rounds}")
        print(f"{'tool':16} {'MiB/s':>8} {'CPU s/GiB':>10} {'x best QEMU':>12} {'x dd':>8}")
        for t, m in med.items():
            mibs = a.size / MiB / m["seconds"]
            vs_q = (med[best_q]["seconds"] / m["seconds"]) if best_q else float("nan")
            vs_dd = (med["dd"]["seconds"] / m["seconds"]) if "dd" in med else float("nan")
            print(f"{t:16} {mibs:8.0f} {m['cpu'] / gib:10.2f} {vs_q:12.2f} {vs_dd:8.2f}")
        if best_q:
            print(f"best QEMU mode: {best_q}")
        # Paired by round (the device's rate moves between minutes, less
        # within a round): QEMU's fastest mode of each round against each
        # of ours in the same round.
        if qemu and a.rounds > 1:
            print(f"\npaired by round: QEMU's fastest mode of the round / ours "
                  f"(> 1: ours faster)")
            for t in (t for t in med if not t.startswith("qemu-") and t != "dd"):
                ratios = [min(res[q][i]["seconds"] for q in qemu) / res[t][i]["seconds"]
                          for i in range(a.rounds)]
                wins = sum(r >= 1 for r in ratios)
                print(f"{t:16} median {statistics.median(ratios):5.2f}, ours first or "
                      f"even in {wins} of {a.rounds} rounds "
                      f"({' '.join(f'{r:.2f}' for r in ratios)})")
        if a.json:
            a.json.write_text(json.dumps({"size": a.size, "runs": res, "medians": med}, indent=1))
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], check=False)
        remove_work(work, (work / "src.raw", work / "dst.raw"))
    return 0


if __name__ == "__main__":
    run_main(main, "compare_direct")
