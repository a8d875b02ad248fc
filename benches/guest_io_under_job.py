#!/usr/bin/env python3
"""Guest I/O under a running mirror, on one O_DIRECT device: the guest's
4 KiB random reads and writes (IOPS, p99 latency) with no job, with a
mirror at full speed and with a mirror limited to half the device, ours
against qemu-storage-daemon, in one run.

  device   --dir (default: a directory on the root filesystem, next to
           this repository): source and target files of --size (default
           4 GiB; the mirror must outlast the guest's --seconds), random
           data, fully written once and then overwritten in place
  nodes    raw over file, cache.direct=on, aio=--aio (default native;
           ours serves native through io_uring), the very same QMP to
           `blockjob daemon` and to qemu-storage-daemon
  guest    the source node exported over NBD (writable, a unix socket)
           and driven by fio's nbd engine (libnbd): rw=randrw, 50 % reads,
           bs=4k, --iodepth (default 16), --seconds (default 5) after
           --ramp seconds (default 1); IOPS of both directions together,
           p99 completion latency of each
  scenes   idle        no job
           full        blockdev-mirror sync=full, speed unset
           half        the same with speed = half the device's copy rate,
                       measured once before the rounds as dd's rate
                       (bs=4M, iflag=direct, oflag=direct) from source to
                       target
  job      bytes the job copied while fio ran (query-block-jobs offset
           before and after), per second; the job is cancelled after
           each run. A mirror that reached READY inside the window is
           flagged: its throughput then says less.

  cpu      the daemon's CPU time (user + system, /proc/PID/stat) over
           fio's run, per guest I/O (IOPS x the run's length): what one
           request costs the server, job included

Rounds (--rounds, default 3) alternate the tools, the order rotating;
medians printed with the ratios ours / QEMU. --scenes picks scenes;
--base PATH adds a third tool, "base": another build of ours (e.g. the
previous commit), to measure a change side by side.

Targets (issue #18): guest IOPS at least QEMU's, p99 no worse, at the same
job throughput (the half scene holds it equal by construction).

Usage:
  python3 benches/guest_io_under_job.py [--size 4G] [--seconds 5]
      [--rounds 3] [--aio native] [--dir DIR] [--only ours,qemu]
      [--scenes idle,full,half] [--base PATH]
      [--blockjob PATH] [--no-build] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BenchError, GiB, MiB, QemuDaemon, fs_type, log, prepare_run,
                      remove_work, run_main, size_parser, write_random)

REPO = Path(__file__).resolve().parent.parent
SCENES = ("idle", "full", "half")


def node(name: str, path: Path, aio: str) -> dict:
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": str(path), "aio": aio,
                     "cache": {"direct": True, "no-flush": False}}}


def fio(sock: Path, a) -> dict:
    uri = f"nbd+unix:///guest?socket={sock}"
    argv = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw",
            "--rwmixread=50", "--bs=4k", f"--iodepth={a.iodepth}", "--time_based",
            f"--runtime={a.seconds}", f"--ramp_time={a.ramp}", "--output-format=json",
            "--percentile_list=50:99"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=a.seconds + a.ramp + 60)
    if p.returncode != 0:
        raise BenchError(f"fio exited with {p.returncode}: {p.stderr.strip()[-2000:]}")
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]

    def p99(d: str) -> float:
        pct = j[d]["clat_ns"].get("percentile", {})
        return pct.get("99.000000", float("nan")) / 1000.0

    if j["error"]:
        raise BenchError(f"fio: error {j['error']}")
    return {"iops": j["read"]["iops"] + j["write"]["iops"],
            "p99_read_us": p99("read"), "p99_write_us": p99("write")}


class Bench:
    def __init__(self, a, src: Path, dst: Path):
        self.a, self.src, self.dst = a, src, dst
        self.sockdir = Path(tempfile.mkdtemp(prefix="bj-guestio-"))

    def run(self, tool: str, scene: str, speed: int) -> dict:
        argv = {"qemu": "qemu-storage-daemon", "ours": [self.a.blockjob, "daemon"],
                "base": [self.a.base, "daemon"]}[tool]
        d = QemuDaemon(argv, self.sockdir, f"{tool}-{scene}", timeout=120)
        sock = self.sockdir / f"{tool}-{scene}.nbd"
        try:
            d.cmd("blockdev-add", node("src", self.src, self.a.aio))
            d.cmd("blockdev-add", node("dst", self.dst, self.a.aio))
            d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
            d.cmd("block-export-add", {"type": "nbd", "id": "guest", "node-name": "src",
                                       "name": "guest", "writable": True})
            job = scene != "idle"
            if job:
                args = {"job-id": "m", "device": "src", "target": "dst", "sync": "full"}
                if scene == "half":
                    args["speed"] = speed
                d.cmd("blockdev-mirror", args)
            t0 = time.perf_counter()
            cpu0 = cpu_seconds(d.pid)
            off0 = self.offset(d) if job else 0
            r = fio(sock, self.a)
            t1 = time.perf_counter()
            r["cpu_us_per_io"] = (cpu_seconds(d.pid) - cpu0) * 1e6 / (r["iops"] * (t1 - t0))
            if job:
                off1 = self.offset(d)
                r["job_mib_s"] = (off1 - off0) / MiB / (t1 - t0)
                r["ready"] = any(e["event"] == "BLOCK_JOB_READY" for e in d.events)
                d.cmd("block-job-cancel", {"device": "m", "force": True})
                d.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), "the job's end", "m")
                deadline = time.monotonic() + 30
                while d.cmd("query-jobs"):
                    if time.monotonic() > deadline:
                        raise BenchError(f"{tool}: job still listed after it ended")
                    time.sleep(0.01)
            else:
                r["job_mib_s"], r["ready"] = 0.0, False
            d.cmd("block-export-del", {"id": "guest"})
            d.wait_event(("BLOCK_EXPORT_DELETED",), "BLOCK_EXPORT_DELETED", "guest")
            d.cmd("nbd-server-stop")
            d.cmd("blockdev-del", {"node-name": "dst"})
            d.cmd("blockdev-del", {"node-name": "src"})
        finally:
            d.close()
        return r

    @staticmethod
    def offset(d: QemuDaemon) -> int:
        jobs = d.cmd("query-block-jobs")
        return jobs[0]["offset"] if jobs else 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dd_rate(src: Path, dst: Path, size: int) -> float:
    """Bytes per second of one direct copy of up to 1 GiB (the device's
    copy rate)."""
    n = min(size, GiB) // (4 * MiB)
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", f"count={n}", "iflag=direct",
                    "oflag=direct", "conv=notrunc,fdatasync", "status=none"], check=True)
    return n * 4 * MiB / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=size_parser(4 * MiB), default=4 * GiB)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--ramp", type=int, default=1)
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--aio", default="native", choices=("threads", "native", "io_uring"))
    ap.add_argument("--dir", type=Path, default=REPO / "target" / "bench-guestio")
    ap.add_argument("--only", default="ours,qemu")
    ap.add_argument("--scenes", default=",".join(SCENES))
    ap.add_argument("--base", help="another build of blockjob, run as the tool 'base'")
    ap.add_argument("--blockjob", default=str(REPO / "target" / "release" / "blockjob"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    tools = [t for t in a.only.split(",") if t]
    if a.base:
        tools.append("base")
    for t in tools:
        if t not in ("ours", "qemu", "base"):
            ap.error(f"unknown tool {t!r} (known: ours, qemu)")
    scenes = [s for s in a.scenes.split(",") if s]
    for s in scenes:
        if s not in SCENES:
            ap.error(f"unknown scene {s!r} (known: {', '.join(SCENES)})")
    for prog in ("fio", "qemu-storage-daemon", "dd"):
        if shutil.which(prog) is None:
            raise BenchError(f"{prog} not found (apt-get install -y fio qemu-utils)")
    work = prepare_run(REPO, a.no_build, a.dir, "guestio-")
    src, dst = work / "src.raw", work / "dst.raw"
    try:
        log(f"{a.size // MiB} MiB in {work} ({fs_type(work)}); writing source and target")
        write_random((src, dst), a.size)
        rate = statistics.median(dd_rate(src, dst, a.size) for _ in range(3))
        speed = int(rate / 2)
        log(f"device copy rate (dd, median of 3): {rate / MiB:.0f} MiB/s; "
            f"half: speed={speed}")
        b = Bench(a, src, dst)
        runs = [(t, s) for s in scenes for t in tools]
        res: dict[tuple[str, str], list[dict]] = {k: [] for k in runs}
        for rnd in range(a.rounds):
            k = rnd % len(runs)
            for t, s in runs[k:] + runs[:k]:
                r = b.run(t, s, speed)
                res[(t, s)].append(r)
                flag = " (READY inside the window)" if r["ready"] else ""
                log(f"round {rnd + 1}: {t} {s}: {r['iops']:.0f} IOPS, p99 read "
                    f"{r['p99_read_us']:.0f} us, write {r['p99_write_us']:.0f} us, job "
                    f"{r['job_mib_s']:.0f} MiB/s, CPU {r['cpu_us_per_io']:.1f} us/IO{flag}")
        med = {k: {m: statistics.median(r[m] for r in rs)
                   for m in ("iops", "p99_read_us", "p99_write_us", "job_mib_s",
                             "cpu_us_per_io")}
               for k, rs in res.items()}
        print(f"\nGuest 4 KiB random I/O (50 % reads, iodepth {a.iodepth}, {a.seconds} s) on "
              f"{fs_type(work)} under a mirror of {a.size // MiB} MiB, cache.direct=on, "
              f"aio={a.aio}; medians of {a.rounds}; half = speed {speed / MiB:.0f} MiB/s")
        print(f"{'scene':6} {'tool':5} {'IOPS':>8} {'p99 read us':>12} {'p99 write us':>13} "
              f"{'job MiB/s':>10} {'CPU us/IO':>10} {'IOPS ours/QEMU':>15} "
              f"{'p99 r,w ours/QEMU':>18}")
        for s in scenes:
            for t in tools:
                m = med[(t, s)]
                line = (f"{s:6} {t:5} {m['iops']:8.0f} {m['p99_read_us']:12.0f} "
                        f"{m['p99_write_us']:13.0f} {m['job_mib_s']:10.0f} "
                        f"{m['cpu_us_per_io']:10.1f}")
                if t == "ours" and ("qemu", s) in med:
                    q = med[("qemu", s)]
                    line += (f" {m['iops'] / q['iops']:15.2f} "
                             f"{m['p99_read_us'] / q['p99_read_us']:8.2f},"
                             f"{m['p99_write_us'] / q['p99_write_us']:.2f}")
                print(line)
        if a.json:
            a.json.write_text(json.dumps({"size": a.size, "speed": speed, "aio": a.aio,
                                          "runs": {f"{t}-{s}": rs for (t, s), rs in res.items()},
                                          "medians": {f"{t}-{s}": m for (t, s), m in med.items()}},
                                         indent=1))
    finally:
        remove_work(work, (src, dst))
    return 0


if __name__ == "__main__":
    run_main(main, "guest_io_under_job")
