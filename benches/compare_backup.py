#!/usr/bin/env python3
"""Full backup throughput: ours vs QEMU's blockdev-backup vs plain copies.

One run, same files, same target preparation for every tool (the files,
their preparation and the plain copies are compare_mirror.py's, imported
from it):

  dirs      /dev/shm (tmpfs) and a directory on the root filesystem
  sources   full     all data (random bytes), fully allocated
            holes50  alternating 2 MiB random data / 2 MiB hole
  targets   sparse   deleted and re-created with truncate before each round
            inplace  fully allocated with other random data, overwritten
                     in place
  tools     ours             `blockjob daemon` (target/release, built from
                             cli/ with cargo build --release -p
                             blockjob-cli) over QMP, exactly as QEMU below:
                             the daemon adds no measurable noise (its QMP
                             round trip is well under a millisecond against
                             a job of 0.2-2 s)
            qemu             qemu-storage-daemon over QMP
            copy_file_range  os.copy_file_range loop + fsync
                             (compare_mirror.py --copy-file-range)
            hole-aware copy  SEEK_DATA/SEEK_HOLE walk: data ranges by
                             copy_file_range, holes punched in the target,
                             + fsync (compare_mirror.py --copy-data)

Ours and QEMU get the same QMP, one daemon per (dir, source, target) group:
blockdev-add of `src` ({"driver": "raw", "file": {"driver": "file"}}) and
`tgt` (the same with "discard": "unmap"), then `blockdev-backup` (job-id b,
device src, target tgt, sync full, everything else default), then after
BLOCK_JOB_COMPLETED (checked: no error, offset = len = size) and the job's
disappearance from query-jobs, blockdev-del of both (untimed).

Flushes: neither backup flushes the target (checked with strace -c on QEMU
10.0.2 and on ours: no fsync/fdatasync between blockdev-backup and
BLOCK_JOB_COMPLETED; QEMU flushes at blockdev-del). The plain copies fsync.
To compare the same work, the time of ours and QEMU is
  blockdev-backup sent -> BLOCK_JOB_COMPLETED received, plus an
  fdatasync() of the target file done by this script right after
  (the page cache is shared, so this writes back what the job left dirty);
the time to BLOCK_JOB_COMPLETED alone is shown too ("to COMPLETED"). On
tmpfs the fdatasync costs nothing.

CPU per GiB: "CPU" is the daemon's utime+stime (/proc/PID/stat, 10 ms
ticks) from blockdev-backup to BLOCK_JOB_COMPLETED (the fdatasync's CPU is
the script's, not counted there); for the helpers getrusage inside them
(open to fsync). "machine CPU" is the busy time of all CPUs (/proc/stat)
over each tool's whole run (blockdev-add to blockdev-del including the
fdatasync; the helpers' whole process): it also counts the kernel's
writeback and the QMP client.

Per (dir, source, target): one untimed warm-up round, then --rounds
counted rounds; the tool order rotates by one every round. Before every
run (untimed): the target is prepared, the source is read once (warm page
cache). After each tool's first counted round (untimed): the target is
compared with the source (cmp -s). Allocated bytes of the target
(st_blocks * 512) are recorded after every run.

Targets (issue #15): ours >= QEMU's throughput, ours >= 0.90 x the best
plain copy doing the same work (the faster of copy_file_range and the
hole-aware copy), ours' CPU per GiB <= QEMU's.

Usage:
  python3 benches/compare_backup.py [--size 1G] [--rounds 3]
      [--dirs /dev/shm,/var/tmp/blockjob-bench] [--sources full,holes50]
      [--targets sparse,inplace] [--only ours,qemu,copy_file_range,copy-data]
      [--json results.json] [--blockjob PATH] [--no-build] [--timeout 120]
      [--keep-files]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import compare_mirror as cm
from benchlib import (BenchError, GiB, MiB, QemuDaemon, allocated, fdatasync_path, fs_type,
                      kill_daemons, log, machine_busy, size_parser)

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["ours", "qemu", "copy_file_range", "copy-data"]
NAMES = {"ours": "ours", "qemu": "QEMU", "copy_file_range": "copy_file_range",
         "copy-data": "hole-aware copy"}
PLAIN = ("copy_file_range", "copy-data")


class BackupBench(cm.Bench):
    """compare_mirror's bench (files, targets, rounds, helpers), with
    blockdev-backup for ours and QEMU."""

    def __init__(self, a):
        super().__init__(a)
        self.ours: QemuDaemon | None = None

    def run_group(self, dname, fstype, files, source, mode, tools) -> None:
        try:
            super().run_group(dname, fstype, files, source, mode, tools)
        finally:
            if self.ours is not None:
                self.ours.close()
                self.ours = None

    def run_tool(self, t: str, daemons, src: Path, dst: Path):
        if t == "ours":
            if self.ours is None:
                self.ours = QemuDaemon([self.a.blockjob, "daemon"], self.sockdir,
                                       f"ours-{len(self.samples)}", self.timeout)
            return [(t, self.backup(self.ours, src, dst))]
        if t == "qemu":
            return [(t, self.backup(daemons[t], src, dst))]
        return super().run_tool(t, daemons, src, dst)

    def backup(self, d: QemuDaemon, src: Path, dst: Path) -> dict:
        d.events.clear()
        d.cmd("blockdev-add", {"driver": "raw", "node-name": "src",
                               "file": {"driver": "file", "filename": str(src)}})
        try:
            d.cmd("blockdev-add", {"driver": "raw", "node-name": "tgt", "discard": "unmap",
                                   "file": {"driver": "file", "filename": str(dst)}})
            try:
                r = d.run_job("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full"},
                              "b", "backup")
                sync_s = fdatasync_path(dst)
            finally:
                d.cmd("blockdev-del", {"node-name": "tgt"})
        finally:
            d.cmd("blockdev-del", {"node-name": "src"})
        data = r["data"]
        if data.get("offset") != self.size or data.get("len") != self.size:
            raise BenchError(f"{d.prog} backup: unexpected BLOCK_JOB_COMPLETED {data}")
        return dict(seconds=r["seconds"] + sync_s, cpu_seconds=r["cpu_seconds"],
                    extra={"job-seconds": r["seconds"], "fdatasync-seconds": sync_s})

    # -- report -------------------------------------------------------

    def job_only(self, dname, source, mode, t) -> float | None:
        ss = [s for s in self.samples if s.dir == dname and s.source == source and s.mode == mode
              and s.tool == t and s.counted and "job-seconds" in s.extra]
        return statistics.median(self.size / MiB / s.extra["job-seconds"] for s in ss) if ss else None

    def report_backup(self, dirs, sources, modes, tools) -> dict:
        lines = []
        p = lines.append
        targets = []
        p("")
        p(f"# blockdev-backup sync=full vs QEMU vs plain copies: {self.size // MiB} MiB raw, "
          f"{self.a.rounds} counted rounds (+1 warm-up), medians")
        p("")
        p("MiB/s = size / time; ours and QEMU: blockdev-backup -> BLOCK_JOB_COMPLETED + fdatasync "
          "of the target; plain copies: open -> fsync. \"to COMPLETED\": without the fdatasync. "
          "Best plain copy: the faster of copy_file_range and the hole-aware copy.")
        p("")
        p("| fs | source | target | ours MiB/s | QEMU MiB/s | best plain copy MiB/s | "
          "ours/QEMU | ours/best plain | CPU s/GiB ours / QEMU | machine CPU s/GiB ours / QEMU | "
          "to COMPLETED ours / QEMU MiB/s | allocated ours / QEMU / source | check ours / QEMU |")
        p("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        out = {}
        for dname, fstype, files in dirs:
            for source in sources:
                src_alloc = allocated(files[source])
                for mode in modes:
                    rows = self.summarize(dname, source, mode, tools)
                    if not rows:
                        continue
                    out[f"{dname}|{source}|{mode}"] = rows
                    o, q = rows.get("ours"), rows.get("qemu")
                    plain = [t for t in PLAIN if t in rows]
                    best = max(plain, key=lambda t: rows[t]["median_mib_s"]) if plain else None

                    def f0(r, k="median_mib_s"):
                        return "—" if r is None or r.get(k) is None else f"{r[k]:.0f}"

                    def f2(r, k):
                        return "—" if r is None or r.get(k) is None else f"{r[k]:.2f}"

                    def ratio(a, b):
                        return a["median_mib_s"] / b["median_mib_s"] if a and b else None

                    rq = ratio(o, q)
                    rb = ratio(o, rows.get(best)) if best else None
                    oj, qj = (self.job_only(dname, source, mode, t) for t in ("ours", "qemu"))
                    group = f"{fstype} {source} {mode}"
                    if rq is not None:
                        targets.append((f"{group}: ours/QEMU", f"{rq:.3f}", rq >= 1.0, ">= 1.00"))
                    if rb is not None:
                        targets.append((f"{group}: ours/best plain", f"{rb:.3f}", rb >= 0.9, ">= 0.90"))
                    if o and q and o["median_cpu_s_per_gib"] is not None:
                        oc, qc = o["median_cpu_s_per_gib"], q["median_cpu_s_per_gib"]
                        targets.append((f"{group}: CPU s/GiB ours <= QEMU", f"{oc:.2f} / {qc:.2f}",
                                        oc <= qc, "ours <= QEMU"))

                    def chk(r):
                        return "—" if r is None or r["check"] is None else r["check"]
                    p(f"| {fstype} | {source} | {mode} | {f0(o)} ({f0(o, 'min_mib_s')}–{f0(o, 'max_mib_s')}) "
                      f"| {f0(q)} ({f0(q, 'min_mib_s')}–{f0(q, 'max_mib_s')}) "
                      f"| {f0(rows.get(best)) if best else '—'}"
                      f"{f' ({NAMES[best]})' if best else ''} "
                      f"| {'—' if rq is None else f'{rq:.2f}'} | {'—' if rb is None else f'{rb:.2f}'} "
                      f"| {f2(o, 'median_cpu_s_per_gib')} / {f2(q, 'median_cpu_s_per_gib')} "
                      f"| {f2(o, 'median_machine_cpu_s_per_gib')} / {f2(q, 'median_machine_cpu_s_per_gib')} "
                      f"| {'—' if oj is None else f'{oj:.0f}'} / {'—' if qj is None else f'{qj:.0f}'} "
                      f"| {'—' if o is None else o['allocated'] // MiB} / "
                      f"{'—' if q is None else q['allocated'] // MiB} / {src_alloc // MiB} MiB "
                      f"| {chk(o)} / {chk(q)} |")
        p("")
        p("Cells: median (min–max). All tools per group:")
        for key, rows in out.items():
            p(f"- {key}: " + ", ".join(
                f"{NAMES[t]} {r['median_mib_s']:.0f} MiB/s {r['median_cpu_s_per_gib']:.2f} CPU s/GiB"
                for t, r in rows.items() if t in NAMES and r["median_cpu_s_per_gib"] is not None))
        if targets:
            fails = [t for t in targets if not t[2]]
            p("")
            p(f"Targets: {len(targets) - len(fails)}/{len(targets)} pass"
              + (":" if fails else "."))
            for name, val, _, goal in fails:
                p(f"- FAIL {name}: {val} (target {goal})")
        for n in self.notes:
            p(n)
        print("\n".join(lines), flush=True)
        return {"summary": out, "targets": [
            {"check": n, "value": v, "target": g, "pass": ok} for n, v, ok, g in targets]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", type=size_parser(MiB), default=GiB, help="image size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (default 3)")
    ap.add_argument("--dirs", default=cm.DEFAULT_DIRS, help=f"comma-separated (default {cm.DEFAULT_DIRS})")
    ap.add_argument("--sources", default="full,holes50", help="full, holes50 (default both)")
    ap.add_argument("--targets", default="sparse,inplace", help="sparse, inplace (default both)")
    ap.add_argument("--only", help="comma-separated tools: " + ",".join(TOOLS))
    ap.add_argument("--json", help="write raw samples and summaries here")
    ap.add_argument("--blockjob", help="the blockjob binary (default target/release/blockjob)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--timeout", type=float, default=120, help="QMP wait timeout, s (default 120)")
    ap.add_argument("--subtimeout", type=float, default=600, help="timeout of one helper, s")
    ap.add_argument("--keep-files", action="store_true", help="keep the images afterwards")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")

    def pick(text, allowed, what):
        v = [x.strip() for x in text.split(",") if x.strip()]
        if not v or any(x not in allowed for x in v):
            ap.error(f"{what}: a comma-separated list of {', '.join(allowed)}")
        return [x for x in allowed if x in v]
    sources = pick(a.sources, ("full", "holes50"), "--sources")
    modes = pick(a.targets, ("sparse", "inplace"), "--targets")
    tools = pick(a.only, TOOLS, "--only") if a.only else list(TOOLS)

    if a.blockjob is None:
        a.blockjob = str(REPO / "target" / "release" / "blockjob")
        if "ours" in tools and not a.no_build:
            r = subprocess.run(["cargo", "build", "--release", "-p", "blockjob-cli"], cwd=REPO)
            if r.returncode != 0:
                log("cargo build --release -p blockjob-cli failed")
                return 1

    b = BackupBench(a)
    atexit.register(kill_daemons)
    atexit.register(shutil.rmtree, b.sockdir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    made_files: list[Path] = []
    made_dirs: list[Path] = []
    env = cm.env_info(a)
    t_start = time.perf_counter()
    try:
        b.check_tools(tools)
        log(f"load average at start: {env['loadavg-start']}")
        m0, t0 = machine_busy(), time.perf_counter()
        time.sleep(2)
        idle = (machine_busy() - m0) / (time.perf_counter() - t0)
        b.notes.append(f"Machine CPU busy while idle (2 s before the runs): {idle:.3f} CPU s/s.")
        dirs = []
        for ds in [x for x in a.dirs.split(",") if x.strip()]:
            d = Path(ds.strip())
            info = b.prepare_dir(d)
            if info["created"]:
                made_dirs.append(d)
            made_files += list(info["files"].values())
            dirs.append((str(d), fs_type(d), info["files"]))
        for dname, fstype, files in dirs:
            for source in sources:
                for mode in modes:
                    b.run_group(dname, fstype, files, source, mode, tools)
        env["loadavg-end"] = os.getloadavg()
        b.notes.append(f"Load average: start {tuple(round(x, 2) for x in env['loadavg-start'])}, "
                       f"end {tuple(round(x, 2) for x in env['loadavg-end'])}; {env['cpus']} CPUs; "
                       f"{env['qemu-storage-daemon'][0] if env['qemu-storage-daemon'] else ''}; "
                       f"git {env['git']}; total {time.perf_counter() - t_start:.0f} s.")
        summary = b.report_backup(dirs, sources, modes, tools)
        if a.json:
            doc = {"config": {"size": a.size, "rounds": a.rounds, "dirs": [d for d, _, _ in dirs],
                              "tools": tools, "sources": sources, "targets": modes},
                   "env": env, "samples": [s.__dict__ for s in b.samples], **summary}
            Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
            log(f"raw samples written to {a.json}")
        return 2 if any(s.check == "MISMATCH" for s in b.samples) else 0
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        kill_daemons()
        if not a.keep_files:
            for f in made_files:
                for p in (f, f.with_suffix(".part")):
                    p.unlink(missing_ok=True)
            for d in made_dirs:
                try:
                    d.rmdir()
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
