#!/usr/bin/env python3
"""How hard a job under `ignore` hammers a disk that stays broken: ours
against qemu-storage-daemon, side by side in one run.

Each round starts a daemon, adds a source file and a raw target over
`blkdebug` that fails every write with EIO, starts the job (mirror,
backup, or an intermediate commit into a base whose writes fail) with
`on-target-error`/`on-error` `ignore`, and for `--seconds` counts the
`BLOCK_JOB_ERROR` events that reach a QMP client and the daemon's CPU
time; then cancels the job (force) and times the cancel to
`JOB_STATUS_CHANGE` concluded. Medians over `--rounds`.

QEMU retries at once, forever (how many events reach the client is bound
by the client's reading and the machine; the CPU is not); ours spaces
the retries (1 ms doubling to 1 s, `src/engine/backoff.rs`).

    python3 benches/ignore_retry_rate.py [--rounds 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import atexit
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import QemuDaemon, kill_daemons

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def prepare(d: Path) -> None:
    with open(d / "src.raw", "wb") as f:
        f.write(os.urandom(8 * MiB))
    with open(d / "dst.raw", "wb") as f:
        f.truncate(8 * MiB)
    # The commit's chain: base (raw) <- mid (qcow2, 8 MiB of data) <- top.
    with open(d / "base.raw", "wb") as f:
        f.truncate(8 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "base.raw"), "-F", "raw",
             str(d / "mid.qcow2"))
    subprocess.run(["qemu-io", "-c", "write -P 7 0 8M", str(d / "mid.qcow2")], check=True,
                   stdout=subprocess.DEVNULL)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "mid.qcow2"), "-F", "qcow2",
             str(d / "top.qcow2"))


def failing(filename: Path) -> dict:
    return {"driver": "blkdebug", "image": {"driver": "file", "filename": str(filename)},
            "inject-error": [{"event": "write_aio", "errno": 5}]}


def one(argv: list[str], d: Path, job: str, seconds: float) -> tuple[int, float, float]:
    """(events in `seconds`, daemon CPU s over them, cancel-to-concluded s)."""
    q = QemuDaemon(argv, d, "daemon", 30)
    try:
        if job == "commit":
            q.cmd("blockdev-add", {"driver": "raw", "node-name": "base", "file": failing(d / "base.raw")})
            q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base",
                                   "file": {"driver": "file", "filename": str(d / "mid.qcow2")}})
            q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                                   "file": {"driver": "file", "filename": str(d / "top.qcow2")}})
            start = ("block-commit", {"job-id": "j", "device": "top", "top-node": "mid",
                                      "base-node": "base", "on-error": "ignore"})
        else:
            q.cmd("blockdev-add", {"driver": "file", "node-name": "src", "filename": str(d / "src.raw")})
            q.cmd("blockdev-add", {"driver": "raw", "node-name": "dst", "file": failing(d / "dst.raw")})
            start = ("blockdev-mirror" if job == "mirror" else "blockdev-backup",
                     {"job-id": "j", "device": "src", "target": "dst", "sync": "full",
                      "on-target-error": "ignore"})
        q.cmd(*start)
        # Count on a thread that only reads, so QMP replies do not mix in.
        count = [0]
        cancelled_at: list[float] = []
        concluded_at: list[float] = []

        def reader():
            deadline = time.monotonic() + 3600
            while not concluded_at:
                try:
                    m = q._read(deadline, "events")
                except Exception:
                    return
                if m.get("event") == "BLOCK_JOB_ERROR":
                    count[0] += 1
                elif (m.get("event") == "JOB_STATUS_CHANGE"
                      and m["data"]["status"] == "concluded"):
                    concluded_at.append(time.perf_counter())

        tck = os.sysconf("SC_CLK_TCK")
        c0 = q.cpu_ticks()
        t = threading.Thread(target=reader)
        t.start()
        time.sleep(seconds)
        c1 = q.cpu_ticks()
        n = count[0]
        cancelled_at.append(time.perf_counter())
        q.send("job-cancel", {"id": "j"})
        t.join(30)
        took = (concluded_at[0] - cancelled_at[0]) if concluded_at else float("nan")
        return n, (c1 - c0) / tck, took
    finally:
        q.proc.kill()
        q.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--blockjob", default=str(REPO / "target" / "release" / "blockjob"))
    a = ap.parse_args()
    atexit.register(kill_daemons)
    sides = {"qemu": ["qemu-storage-daemon"], "ours": [a.blockjob, "daemon"]}
    print(f"{'job':8} {'side':5} {'events/' + format(a.seconds, 'g') + 's':>12} "
          f"{'CPU s':>7} {'cancel s':>9}")
    for job in ("mirror", "backup", "commit"):
        res = {}
        for side, argv in sides.items():
            rows = []
            for _ in range(a.rounds):
                with tempfile.TemporaryDirectory() as td:
                    d = Path(td)
                    prepare(d)
                    rows.append(one(argv, d, job, a.seconds))
            med = tuple(statistics.median(r[i] for r in rows) for i in range(3))
            res[side] = med
            print(f"{job:8} {side:5} {med[0]:12.0f} {med[1]:7.2f} {med[2]:9.3f}", flush=True)
        q, o = res["qemu"], res["ours"]
        print(f"{job:8} ratio qemu/ours: events {q[0] / max(o[0], 1):.0f}x, "
              f"CPU {q[1] / max(o[1], 0.005):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
