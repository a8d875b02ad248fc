#!/usr/bin/env python3
"""Mirror throughput: ours vs QEMU's blockdev-mirror vs plain copies.

One run, same files, same target preparation for every tool:

  dirs      /dev/shm (tmpfs) and a directory on the root filesystem
  sources   full     all data (random bytes), fully allocated
            holes50  alternating 2 MiB random data / 2 MiB hole
  targets   inplace  fully allocated with other random data, overwritten
                     in place (low noise: use it for tracking)
            sparse   deleted and re-created with truncate before each round
  tools     ours              blockjob mirror SRC DST --stats -q
                              (time and CPU from its JSON: job start to
                              BLOCK_JOB_COMPLETED, target fdatasync'd at READY)
            ours (wall)       the same runs, whole-process wall time and
                              wait4 CPU (reference only, not in the ratios)
            qemu              qemu-storage-daemon blockdev-mirror over QMP
                              (target node with discard=unmap, as ours opens
                              a path target and qemu-img convert its target),
                              timed from blockdev-mirror to BLOCK_JOB_COMPLETED
                              (block-job-complete sent at BLOCK_JOB_READY);
                              CPU = daemon utime+stime from /proc/PID/stat
            qemu-io_uring     the same with "aio": "io_uring" on the file nodes
            dd                dd bs=1M conv=notrunc,fsync
            pread/pwrite      1 MiB os.preadv/os.pwrite loop + fsync (helper
                              mode of this script; timed inside the helper,
                              from after open() to after fsync())
            copy_file_range   os.copy_file_range loop + fsync (helper mode)
            hole-aware copy   SEEK_DATA/SEEK_HOLE walk of the source: data
                              ranges by copy_file_range, hole ranges punched
                              in the target (fallocate PUNCH_HOLE), + fsync
                              (helper mode). The work a mirror must do on a
                              source with holes, done by one thread with the
                              kernel's fastest primitive: on holes50 it shows
                              how far ahead of QEMU any tool can get here.
            qemu-img convert  qemu-img convert -t writeback -W -f raw -O raw -n
                              (it fdatasync()s the target when it closes it, so
                              the copy is on disk when it exits; its time is the
                              whole process, start-up included: see the
                              "fixed overhead" line printed at the start)

Flushes: ours and QEMU fdatasync() the target before READY; dd conv=fsync
and the helpers fsync(); qemu-img convert -t writeback fdatasync()s the
target when it closes it (checked with strace on QEMU 10.0). So every time
includes getting the data to stable storage.

Machine CPU: busy seconds of all CPUs (/proc/stat user+nice+system+irq+
softirq) over each tool's whole run: process start to exit (ours, dd,
qemu-img, the helpers with Python's start-up), blockdev-add to blockdev-del
(qemu). A process's own CPU time misses the writeback and I/O completion
work the kernel does elsewhere while it sleeps in fsync; this counts it
wherever it runs. It also counts anything else the machine does: the idle
rate measured at the start is printed.

CPU: ours from its JSON (getrusage of its process over the job); QEMU from
/proc/PID/stat in clock ticks (10 ms: coarse below ~1 GiB); dd and
qemu-img from wait4(); the helpers from getrusage inside them (Python
start-up excluded; the per-1-MiB-call Python overhead is a few us against
~100 us of copying). copy_file_range is asked for 16 MiB per call; on
tmpfs and ext4 it is an in-kernel copy (one copy, no user buffer), on XFS
or btrfs it would reflink and mean nothing.

Per (dir, source, target mode): one untimed warm-up round, then --rounds
counted rounds; the tool order rotates by one every round so drift hits all
tools alike. Before every run (untimed): the target is prepared, the source
is read once (warm page cache). After each tool's first counted round
(untimed): the target is compared with the source (cmp -s) and its allocated
bytes (st_blocks * 512) are recorded (every run records them).

Usage:
  python3 benches/compare_mirror.py [--size 1G] [--rounds 5]
      [--dirs /dev/shm,/var/tmp/blockjob-bench] [--json results.json]
      [--only ours,qemu,qemu-io_uring,dd,pread-pwrite,copy_file_range,qemu-img]
      [--sources full,holes50] [--blockjob PATH] [--timeout 120] [--keep-files]

Helper modes (used by the script itself):
  compare_mirror.py --copy-loop SRC DST        preadv/pwrite 1 MiB + fsync
  compare_mirror.py --copy-file-range SRC DST  copy_file_range + fsync
  compare_mirror.py --copy-data SRC DST        hole-aware copy_file_range + fsync
Each prints one JSON line {"bytes", "seconds", "cpu-seconds"}.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (BenchError, GiB, MiB, QemuDaemon, QMPCommandError, allocated, machine_busy,
                      fs_type, kill_daemons, log, size_parser)

CHUNK = MiB  # dd / pread-pwrite block size
CFR_CHUNK = 16 * MiB  # copy_file_range request size (kernel-side copy)
HOLE_STRIDE = 2 * MiB  # holes50: 2 MiB data, 2 MiB hole, ...

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIRS = "/dev/shm,/var/tmp/blockjob-bench"

# Tool keys (order = first round's order) and their display names.
TOOLS = [
    ("ours", "ours"),
    ("qemu", "qemu"),
    ("qemu-io_uring", "qemu-io_uring"),
    ("dd", "dd"),
    ("pread-pwrite", "pread/pwrite"),
    ("copy_file_range", "copy_file_range"),
    ("copy-data", "hole-aware copy"),
    ("qemu-img", "qemu-img convert"),
]
TOOL_NAMES = dict(TOOLS)
ALIASES = {
    "pread/pwrite": "pread-pwrite",
    "pread": "pread-pwrite",
    "cfr": "copy_file_range",
    "copy-file-range": "copy_file_range",
    "hole-aware": "copy-data",
    "qemu-img-convert": "qemu-img",
    "convert": "qemu-img",
    "qemu-iouring": "qemu-io_uring",
    "io_uring": "qemu-io_uring",
}
PLAIN = ("dd", "pread-pwrite", "copy_file_range", "copy-data")
OURS_WALL = "ours-wall"
TOOL_NAMES[OURS_WALL] = "ours (wall)"


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def helper_copy_loop(src: str, dst: str) -> None:
    """pread/pwrite 1 MiB loop into one reused buffer, then fsync."""
    fs = os.open(src, os.O_RDONLY)
    fd = os.open(dst, os.O_WRONLY)
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    c0, t0 = cpu_self(), time.perf_counter()
    off = 0
    while True:
        n = os.preadv(fs, [buf], off)
        if n == 0:
            break
        done = 0
        while done < n:
            done += os.pwrite(fd, mv[done:n], off + done)
        off += n
    os.fsync(fd)
    t1, c1 = time.perf_counter(), cpu_self()
    os.close(fd)
    os.close(fs)
    print(json.dumps({"bytes": off, "seconds": t1 - t0, "cpu-seconds": c1 - c0}))


def cfr_copy_range(fs: int, fd: int, off: int, end: int) -> int:
    """copy_file_range [off, end) in CFR_CHUNK requests; returns where it stopped."""
    while off < end:
        n = os.copy_file_range(fs, fd, min(CFR_CHUNK, end - off), off, off)
        if n == 0:
            break
        off += n
    return off


def cfr_copy(fs: int, fd: int, size: int) -> int:
    return cfr_copy_range(fs, fd, 0, size)


def helper_copy_file_range(src: str, dst: str) -> None:
    fs = os.open(src, os.O_RDONLY)
    fd = os.open(dst, os.O_WRONLY)
    size = os.fstat(fs).st_size
    c0, t0 = cpu_self(), time.perf_counter()
    n = cfr_copy(fs, fd, size)
    os.fsync(fd)
    t1, c1 = time.perf_counter(), cpu_self()
    os.close(fd)
    os.close(fs)
    print(json.dumps({"bytes": n, "seconds": t1 - t0, "cpu-seconds": c1 - c0}))


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, off: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(PUNCH_HOLE, {off}, {length}): {os.strerror(e)}")


def helper_copy_data(src: str, dst: str) -> None:
    """Hole-aware copy: data ranges by copy_file_range, holes punched."""
    fs = os.open(src, os.O_RDONLY)
    fd = os.open(dst, os.O_WRONLY)
    size = os.fstat(fs).st_size
    c0, t0 = cpu_self(), time.perf_counter()
    off = 0
    while off < size:
        try:
            data = os.lseek(fs, off, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            data = size
        if data > off:
            punch_hole(fd, off, data - off)
        if data >= size:
            break
        end = os.lseek(fs, data, os.SEEK_HOLE)
        if cfr_copy_range(fs, fd, data, end) != end:
            raise OSError(f"short copy_file_range in [{data}, {end})")
        off = end
    os.fsync(fd)
    t1, c1 = time.perf_counter(), cpu_self()
    os.close(fd)
    os.close(fs)
    print(json.dumps({"bytes": size, "seconds": t1 - t0, "cpu-seconds": c1 - c0}))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_through(path: Path) -> None:
    """Read a file once (warm the page cache)."""
    buf = bytearray(4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while n := os.preadv(fd, [buf], off):
            off += n
    finally:
        os.close(fd)


def write_random(path: Path, size: int, holes: bool) -> None:
    """Create `path` (size bytes) with random data; holes: 2 MiB data /
    2 MiB hole alternating. fsync'd."""
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        off = 0
        while off < size:
            if holes and (off // HOLE_STRIDE) % 2 == 1:
                off += HOLE_STRIDE
                continue
            end = min(size, off + (HOLE_STRIDE if holes else 64 * MiB))
            while off < end:
                n = min(8 * MiB, end - off)
                os.pwrite(fd, os.urandom(n), off)
                off += n
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Proc:
    """Result of a subprocess run: wall seconds, wait4 CPU, output."""

    def __init__(self, rc, wall, cpu, out, err):
        self.rc, self.wall, self.cpu, self.out, self.err = rc, wall, cpu, out, err


def run_timed(argv: list[str], timeout: float) -> Proc:
    """Run argv; wall time from spawn to reap, CPU from os.wait4's rusage."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        timer = threading.Timer(timeout, lambda: _kill_quiet(p.pid))
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if p.returncode == -signal.SIGKILL and wall >= timeout:
        raise BenchError(f"{argv[0]}: timed out after {timeout:.0f} s: {' '.join(argv)}")
    return Proc(p.returncode, wall, ru.ru_utime + ru.ru_stime, out, err)


def _kill_quiet(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- QMP


# ---------------------------------------------------------------- bench


@dataclass
class Sample:
    dir: str
    fs: str
    source: str
    mode: str
    tool: str
    round: int  # 0 = warm-up
    counted: bool
    seconds: float
    cpu_seconds: float | None
    wall_seconds: float | None = None
    wall_cpu_seconds: float | None = None
    ready_seconds: float | None = None
    machine_cpu_seconds: float | None = None
    allocated: int | None = None
    check: str | None = None  # "ok" / "MISMATCH" / None (not checked)
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, a):
        self.a = a
        self.size = a.size
        self.timeout = a.timeout
        self.samples: list[Sample] = []
        self.skipped: dict[str, str] = {}  # tool -> reason
        self.sockdir = Path(tempfile.mkdtemp(prefix="compare_mirror."))
        self.qsd = shutil.which("qemu-storage-daemon")
        self.qimg = shutil.which("qemu-img")
        self.dd = shutil.which("dd")
        self.cmp = shutil.which("cmp")
        self.notes: list[str] = []

    # -- files --------------------------------------------------------

    def prepare_dir(self, d: Path) -> dict:
        created = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        need = int(self.size * 3.6)
        free = shutil.disk_usage(d).free
        files = {"full": d / "cm-src-full.img", "holes50": d / "cm-src-holes50.img",
                 "garbage": d / "cm-garbage.img", "target": d / "cm-target.img"}
        have = sum(allocated(p) for p in files.values() if p.exists())
        if free + have < need:
            raise BenchError(f"{d}: {free / GiB:.1f} GiB free, need {need / GiB:.1f} GiB")
        for key, holes in (("full", False), ("holes50", True), ("garbage", False)):
            p = files[key]
            ok = p.exists() and p.stat().st_size == self.size
            if ok and not holes:
                ok = allocated(p) >= self.size
            if not ok:
                log(f"  creating {p} ({self.size // MiB} MiB{', 50% holes' if holes else ''})")
                write_random(p, self.size, holes)
        fsync_dir(d)
        return {"files": files, "created": created}

    def prep_target(self, files: dict, mode: str) -> None:
        tgt: Path = files["target"]
        if mode == "sparse" or not tgt.exists() or tgt.stat().st_size != self.size:
            try:
                tgt.unlink()
            except FileNotFoundError:
                pass
        if mode == "sparse":
            fd = os.open(tgt, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.ftruncate(fd, self.size)
            os.close(fd)
        else:
            # Overwrite in place with other random data: fully allocated,
            # differs from the source (so the check after the copy means
            # something), page cache clean after the fsync.
            # read/write, not copy_file_range: that could reflink (XFS,
            # btrfs) and leave shared extents to copy-on-write.
            fs = os.open(files["garbage"], os.O_RDONLY)
            fd = os.open(tgt, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                buf = bytearray(4 * MiB)
                mv = memoryview(buf)
                off = 0
                while n := os.preadv(fs, [buf], off):
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, mv[done:n], off + done)
                    off += n
                if off != self.size:
                    raise BenchError(f"short copy preparing {tgt}")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.close(fs)
            if allocated(tgt) < self.size:
                raise BenchError(f"{tgt}: in-place target not fully allocated "
                                 f"({allocated(tgt)} of {self.size} bytes)")
        fsync_dir(tgt.parent)

    # -- tools --------------------------------------------------------

    def run_ours(self, src: Path, dst: Path) -> list[tuple[str, dict]]:
        p = run_timed([self.a.blockjob, "mirror", str(src), str(dst), "--stats", "-q"], self.a.subtimeout)
        if p.rc != 0:
            raise BenchError(f"blockjob mirror failed (exit {p.rc}): {p.err.strip()}")
        lines = [ln for ln in p.out.splitlines() if ln.strip().startswith("{")]
        if not lines:
            raise BenchError(f"blockjob mirror printed no --stats JSON: {p.out!r} {p.err!r}")
        st = json.loads(lines[-1])
        if st.get("job-errors") or not st.get("pivoted") or st.get("bytes") != self.size:
            raise BenchError(f"blockjob mirror: unexpected stats {st}")
        return [
            ("ours", dict(seconds=st["seconds"], cpu_seconds=st["cpu-seconds"],
                          wall_seconds=p.wall, wall_cpu_seconds=p.cpu,
                          ready_seconds=st.get("ready-seconds"), extra={"stats": st})),
            (OURS_WALL, dict(seconds=p.wall, cpu_seconds=p.cpu, wall_seconds=p.wall,
                             wall_cpu_seconds=p.cpu)),
        ]

    def run_qemu(self, d: QemuDaemon, aio: str | None, src: Path, dst: Path) -> dict:
        def node(name, path, **extra):
            f = {"driver": "file", "filename": str(path)}
            if aio:
                f["aio"] = aio
            return {"driver": "raw", "node-name": name, "file": f, **extra}

        d.events.clear()
        d.cmd("blockdev-add", node("src", src))
        try:
            # discard=unmap as ours opens a path target (its --unmap
            # default) and qemu-img convert opens its target: zeroes may
            # become holes in all three, the same work.
            d.cmd("blockdev-add", node("tgt", dst, discard="unmap"))
        except Exception:
            d.cmd("blockdev-del", {"node-name": "src"})
            raise
        r = d.run_job("blockdev-mirror", {"device": "src", "target": "tgt", "sync": "full"},
                      "m", "mirror")
        data = r.pop("data")
        if data.get("offset") != self.size or data.get("len") != self.size:
            raise BenchError(f"qemu mirror: unexpected BLOCK_JOB_COMPLETED {data}")
        if r["ready_seconds"] is None:
            raise BenchError("qemu mirror: COMPLETED without READY")
        d.cmd("blockdev-del", {"node-name": "tgt"})
        d.cmd("blockdev-del", {"node-name": "src"})
        return r

    def run_dd(self, src: Path, dst: Path) -> dict:
        p = run_timed([self.dd, f"if={src}", f"of={dst}", "bs=1M", "conv=notrunc,fsync",
                       "status=none"], self.a.subtimeout)
        if p.rc != 0:
            raise BenchError(f"dd failed (exit {p.rc}): {p.err.strip()}")
        return dict(seconds=p.wall, cpu_seconds=p.cpu, wall_seconds=p.wall, wall_cpu_seconds=p.cpu)

    def run_helper(self, mode: str, src: Path, dst: Path) -> dict:
        p = run_timed([sys.executable, str(Path(__file__).resolve()), mode, str(src), str(dst)],
                      self.a.subtimeout)
        if p.rc != 0:
            raise BenchError(f"{mode} helper failed (exit {p.rc}): {p.err.strip()}")
        st = json.loads(p.out.strip().splitlines()[-1])
        if st["bytes"] != self.size:
            raise BenchError(f"{mode} helper copied {st['bytes']} bytes, expected {self.size}")
        return dict(seconds=st["seconds"], cpu_seconds=st["cpu-seconds"], wall_seconds=p.wall,
                    wall_cpu_seconds=p.cpu)

    def run_qemu_img(self, src: Path, dst: Path) -> dict:
        p = run_timed([self.qimg, "convert", "-t", "writeback", "-W", "-f", "raw", "-O", "raw",
                       "-n", str(src), str(dst)], self.a.subtimeout)
        if p.rc != 0:
            raise BenchError(f"qemu-img convert failed (exit {p.rc}): {p.err.strip()}")
        return dict(seconds=p.wall, cpu_seconds=p.cpu, wall_seconds=p.wall, wall_cpu_seconds=p.cpu)

    # -- one group ------------------------------------------------------

    def check_tools(self, tools: list[str]) -> None:
        missing = []
        if "ours" in tools:
            if not Path(self.a.blockjob).exists():
                missing.append(f"blockjob binary {self.a.blockjob}")
        if any(t.startswith("qemu") and t != "qemu-img" for t in tools) and not self.qsd:
            missing.append("qemu-storage-daemon")
        if "qemu-img" in tools and not self.qimg:
            missing.append("qemu-img")
        if "dd" in tools and not self.dd:
            missing.append("dd")
        if not self.cmp:
            missing.append("cmp (diffutils)")
        if missing:
            raise BenchError("missing: " + ", ".join(missing))

    def calibrate(self, d: Path, tools: list[str]) -> dict:
        """Fixed per-process cost of the tools timed as a whole process."""
        out = {}
        a, b = d / "cm-cal-src.img", d / "cm-cal-dst.img"
        for p in (a, b):
            with open(p, "wb") as f:
                f.write(os.urandom(MiB))
        try:
            cands = []
            if "qemu-img" in tools:
                cands.append(("qemu-img convert", [self.qimg, "convert", "-t", "writeback", "-W",
                                                   "-f", "raw", "-O", "raw", "-n", str(a), str(b)]))
            if "dd" in tools:
                cands.append(("dd", [self.dd, f"if={a}", f"of={b}", "bs=1M", "conv=notrunc,fsync",
                                     "status=none"]))
            if "ours" in tools:
                cands.append(("ours (wall)", [self.a.blockjob, "mirror", str(a), str(b), "--stats", "-q"]))
            for name, argv in cands:
                ws = []
                for _ in range(5):
                    p = run_timed(argv, self.a.subtimeout)
                    if p.rc != 0:
                        break
                    ws.append(p.wall)
                if ws:
                    out[name] = statistics.median(ws)
        finally:
            for p in (a, b):
                p.unlink(missing_ok=True)
        return out

    def run_group(self, dname: str, fstype: str, files: dict, source: str, mode: str,
                  tools: list[str]) -> None:
        src: Path = files[source]
        dst: Path = files["target"]
        daemons: dict[str, QemuDaemon] = {}
        active = list(tools)
        try:
            for t in active:
                if t in ("qemu", "qemu-io_uring") and t not in self.skipped:
                    tag = f"{t}-{len(self.samples)}"
                    daemons[t] = QemuDaemon(self.qsd, self.sockdir, tag, self.timeout)
            checked: set[str] = set()
            for rnd in range(0, self.a.rounds + 1):
                k = rnd % len(active)
                order = active[k:] + active[:k]
                for t in order:
                    if t in self.skipped:
                        continue
                    self.prep_target(files, mode)
                    read_through(src)
                    try:
                        m0 = machine_busy()
                        res = self.run_tool(t, daemons, src, dst)
                        machine = machine_busy() - m0
                    except QMPCommandError as e:
                        if t == "qemu-io_uring" and e.cmd == "blockdev-add":
                            self.skipped[t] = f"blockdev-add with aio=io_uring refused: {e}"
                            log(f"  skipping {t}: {self.skipped[t]}")
                            continue
                        raise
                    alloc = allocated(dst)
                    check = None
                    if rnd == 1 and t not in checked:
                        checked.add(t)
                        r = subprocess.run([self.cmp, "-s", str(src), str(dst)])
                        check = "ok" if r.returncode == 0 else "MISMATCH"
                        if check != "ok":
                            log(f"  !!! {t}: target differs from source ({dname} {source} {mode})")
                    for name, kw in res:
                        s = Sample(dir=dname, fs=fstype, source=source, mode=mode, tool=name,
                                   round=rnd, counted=rnd > 0, allocated=alloc,
                                   check=check, machine_cpu_seconds=machine, **kw)
                        self.samples.append(s)
                    main = res[0][1]
                    log(f"  [{dname} {source} {mode} {'warm-up' if rnd == 0 else f'r{rnd}'}] "
                        f"{TOOL_NAMES[t]:<16} {self.size / MiB / main['seconds']:8.0f} MiB/s "
                        f"cpu {main['cpu_seconds']:.3f} s machine {machine:.2f} s "
                        f"alloc {alloc // MiB} MiB"
                        + (f" check {check}" if check else ""))
        finally:
            for dmn in daemons.values():
                dmn.close()

    def run_tool(self, t: str, daemons, src: Path, dst: Path) -> list[tuple[str, dict]]:
        if t == "ours":
            return self.run_ours(src, dst)
        if t == "qemu":
            return [(t, self.run_qemu(daemons[t], None, src, dst))]
        if t == "qemu-io_uring":
            return [(t, self.run_qemu(daemons[t], "io_uring", src, dst))]
        if t == "dd":
            return [(t, self.run_dd(src, dst))]
        if t == "pread-pwrite":
            return [(t, self.run_helper("--copy-loop", src, dst))]
        if t == "copy_file_range":
            return [(t, self.run_helper("--copy-file-range", src, dst))]
        if t == "copy-data":
            return [(t, self.run_helper("--copy-data", src, dst))]
        if t == "qemu-img":
            return [(t, self.run_qemu_img(src, dst))]
        raise BenchError(f"unknown tool {t}")

    # -- report -------------------------------------------------------

    def summarize(self, dname, source, mode, tools) -> dict:
        rows = {}
        for t in tools + [OURS_WALL]:
            ss = [s for s in self.samples if s.dir == dname and s.source == source
                  and s.mode == mode and s.tool == t and s.counted]
            if not ss:
                continue
            rates = [self.size / MiB / s.seconds for s in ss]
            cpus = [s.cpu_seconds * GiB / self.size for s in ss if s.cpu_seconds is not None]
            machine = [s.machine_cpu_seconds * GiB / self.size for s in ss
                       if s.machine_cpu_seconds is not None]
            checks = [s.check for s in ss if s.check]
            rows[t] = {
                "median_mib_s": statistics.median(rates),
                "min_mib_s": min(rates), "max_mib_s": max(rates),
                "median_cpu_s_per_gib": statistics.median(cpus) if cpus else None,
                "median_machine_cpu_s_per_gib": statistics.median(machine) if machine else None,
                "allocated": statistics.median([s.allocated for s in ss]),
                "check": "MISMATCH" if "MISMATCH" in checks else ("ok" if checks else None),
                "n": len(ss),
            }
        return rows

    def report(self, dirs, tools) -> dict:
        out = {}
        targets = []
        lines = []
        p = lines.append
        p("")
        p(f"# Mirror vs QEMU vs plain copies: {self.size // MiB} MiB, {self.a.rounds} counted rounds "
          f"(+1 warm-up), medians")
        p("")
        p("MiB/s = size / time; time: ours = its --stats `seconds` (job start to COMPLETED); "
          "qemu = blockdev-mirror to BLOCK_JOB_COMPLETED; pread/pwrite, copy_file_range = "
          "open to fsync inside the helper; dd, qemu-img convert, ours (wall) = whole process. "
          "`ours/tool` = ours' median MiB/s divided by the tool's.")
        for dname, fstype, files in dirs:
            for source in ("full", "holes50"):
                src_alloc = allocated(files[source])
                for mode in ("inplace", "sparse"):
                    rows = self.summarize(dname, source, mode, tools)
                    if not rows:
                        continue
                    key = f"{dname}|{source}|{mode}"
                    out[key] = rows
                    p("")
                    p(f"## {dname} ({fstype}) · source {source} "
                      f"(allocated {src_alloc / MiB:.0f} MiB) · target {mode}")
                    p("")
                    hdr = ["tool", "median MiB/s", "min–max MiB/s", "median CPU s/GiB",
                           "machine CPU s/GiB"]
                    if mode == "sparse":
                        hdr.append("target allocated")
                    hdr += ["ours/tool", "check"]
                    p("| " + " | ".join(hdr) + " |")
                    p("|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|")
                    ours = rows.get("ours")
                    for t in [x for x in tools if x in rows] + ([OURS_WALL] if OURS_WALL in rows else []):
                        r = rows[t]
                        cells = [TOOL_NAMES[t], f"{r['median_mib_s']:.0f}",
                                 f"{r['min_mib_s']:.0f}–{r['max_mib_s']:.0f}",
                                 "—" if r["median_cpu_s_per_gib"] is None else f"{r['median_cpu_s_per_gib']:.3f}",
                                 "—" if r["median_machine_cpu_s_per_gib"] is None
                                 else f"{r['median_machine_cpu_s_per_gib']:.3f}"]
                        if mode == "sparse":
                            cells.append(f"{r['allocated'] / MiB:.0f} MiB "
                                         f"({100 * r['allocated'] / self.size:.0f} %)")
                        cells.append(f"{ours['median_mib_s'] / r['median_mib_s']:.2f}" if ours else "—")
                        cells.append(r["check"] or "—")
                        p("| " + " | ".join(cells) + " |")
                    for t, why in self.skipped.items():
                        if t in tools:
                            p(f"| {TOOL_NAMES[t]} | skipped: {why} |")
                    if not ours:
                        continue
                    om = ours["median_mib_s"]
                    p("")

                    def ratio(t):
                        return om / rows[t]["median_mib_s"] if t in rows else None

                    def tgt(name, val, ok, goal):
                        targets.append((f"{dname} {source} {mode}: {name}", val, ok, goal))
                        return f" (target {goal}: {'PASS' if ok else 'FAIL'})"

                    if "qemu" in rows:
                        s = f"- ours/qemu = {ratio('qemu'):.2f}"
                        if source == "holes50":
                            s += tgt("ours/qemu", f"{ratio('qemu'):.2f}", ratio("qemu") >= 3, ">= 3")
                        p(s)
                    plain = [t for t in PLAIN if t in rows]
                    if plain:
                        best = max(plain, key=lambda t: rows[t]["median_mib_s"])
                        s = f"- ours/best plain copy ({TOOL_NAMES[best]}) = {ratio(best):.2f}"
                        if source == "full":
                            s += tgt("ours/best plain", f"{ratio(best):.2f}", ratio(best) >= 0.9, ">= 0.90")
                        p(s)
                    rw = [t for t in ("dd", "pread-pwrite") if t in rows]
                    if rw and "copy_file_range" in plain:
                        best_rw = max(rw, key=lambda t: rows[t]["median_mib_s"])
                        p(f"- ours/best read+write copy ({TOOL_NAMES[best_rw]}) = {ratio(best_rw):.2f} "
                          "(info: copy_file_range copies inside the kernel, one copy instead of two)")
                    if "qemu-img" in rows:
                        s = f"- ours/qemu-img convert = {ratio('qemu-img'):.2f}"
                        if source == "holes50":
                            s += tgt("ours/qemu-img", f"{ratio('qemu-img'):.2f}",
                                     ratio("qemu-img") >= 0.9, ">= 0.90")
                        p(s)
                    if "copy-data" in rows:
                        p(f"- ours/hole-aware copy = {ratio('copy-data'):.2f}")
                        if "qemu" in rows:
                            hq = rows["copy-data"]["median_mib_s"] / rows["qemu"]["median_mib_s"]
                            p(f"- hole-aware copy/qemu = {hq:.2f} (info: how far ahead of QEMU "
                              "one thread doing only the needed work with copy_file_range gets)")
                    if "qemu-io_uring" in rows:
                        p(f"- ours/qemu-io_uring = {ratio('qemu-io_uring'):.2f}")
                    if "qemu" in rows and ours["median_cpu_s_per_gib"] is not None:
                        oc, qc = ours["median_cpu_s_per_gib"], rows["qemu"]["median_cpu_s_per_gib"]
                        p(f"- CPU s/GiB: ours {oc:.3f} vs qemu {qc:.3f}"
                          + tgt("CPU ours <= qemu", f"{oc:.3f} vs {qc:.3f}", oc <= qc, "ours <= qemu"))
                        om_, qm_ = ours["median_machine_cpu_s_per_gib"], rows["qemu"]["median_machine_cpu_s_per_gib"]
                        if om_ is not None and qm_ is not None:
                            p(f"- machine CPU s/GiB: ours {om_:.3f} vs qemu {qm_:.3f}"
                              + tgt("machine CPU ours <= qemu", f"{om_:.3f} vs {qm_:.3f}", om_ <= qm_,
                                    "ours <= qemu"))
                    if source == "holes50" and mode == "sparse":
                        oa = ours["allocated"]
                        ok = oa <= src_alloc + MiB
                        p(f"- holes stay holes: ours' target {oa / MiB:.0f} MiB allocated, source "
                          f"{src_alloc / MiB:.0f} MiB" + tgt("holes stay holes", f"{oa / MiB:.0f} MiB",
                                                           ok, f"<= {src_alloc / MiB:.0f} MiB"))
                    bad = [TOOL_NAMES[t] for t, r in rows.items() if r["check"] == "MISMATCH"]
                    if bad:
                        p(f"- **CHECK FAILED** (target != source): {', '.join(bad)}")
        if targets:
            p("")
            p("## Targets")
            p("")
            p("| group: check | value | target | result |")
            p("|---|---:|---|---|")
            for name, val, ok, goal in targets:
                p(f"| {name} | {val} | {goal} | {'PASS' if ok else 'FAIL'} |")
        if self.skipped:
            p("")
            for t, why in self.skipped.items():
                p(f"Skipped {TOOL_NAMES[t]}: {why}")
        for n in self.notes:
            p(n)
        print("\n".join(lines), flush=True)
        return {"summary": out, "targets": [
            {"check": n, "value": v, "target": g, "pass": ok} for n, v, ok, g in targets]}


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
        "loadavg-start": os.getloadavg(),
        "qemu-img": cmd(["qemu-img", "--version"]).splitlines()[0:1],
        "qemu-storage-daemon": cmd(["qemu-storage-daemon", "--version"]).splitlines()[0:1],
        "blockjob": a.blockjob,
        "git": cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def main() -> int:
    helpers = {"--copy-loop": helper_copy_loop, "--copy-file-range": helper_copy_file_range,
               "--copy-data": helper_copy_data}
    if len(sys.argv) == 4 and sys.argv[1] in helpers:
        helpers[sys.argv[1]](sys.argv[2], sys.argv[3])
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_parser(MiB), default=GiB, help="image size (default 1G)")
    ap.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    ap.add_argument("--dirs", default=DEFAULT_DIRS, help=f"comma-separated (default {DEFAULT_DIRS})")
    ap.add_argument("--json", help="write raw samples and summaries here")
    ap.add_argument("--only", help="comma-separated tools: " + ",".join(t for t, _ in TOOLS))
    ap.add_argument("--sources", default="full,holes50",
                    help="comma-separated sources: full, holes50 (default both)")
    ap.add_argument("--blockjob", help="path of the blockjob binary (default target/release/blockjob)")
    ap.add_argument("--timeout", type=float, default=120, help="QMP wait timeout, s (default 120)")
    ap.add_argument("--subtimeout", type=float, default=600,
                    help="timeout of one tool process, s (default 600)")
    ap.add_argument("--keep-files", action="store_true", help="keep the images afterwards")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    a.sources = [x.strip() for x in a.sources.split(",") if x.strip()]
    if not a.sources or any(x not in ("full", "holes50") for x in a.sources):
        ap.error("--sources: a comma-separated list of full, holes50")

    tools = [t for t, _ in TOOLS]
    if a.only:
        want = [ALIASES.get(x.strip(), x.strip()) for x in a.only.split(",") if x.strip()]
        bad = [x for x in want if x not in TOOL_NAMES or x == OURS_WALL]
        if bad:
            ap.error(f"unknown tool(s) {bad}; known: {', '.join(t for t, _ in TOOLS)}")
        tools = [t for t in tools if t in want]

    if a.blockjob is None:
        a.blockjob = str(REPO / "target" / "release" / "blockjob")
        if "ours" in tools and not Path(a.blockjob).exists():
            log(f"{a.blockjob} missing: running cargo build --release")
            r = subprocess.run(["cargo", "build", "--release"], cwd=REPO)
            if r.returncode != 0:
                log("cargo build --release failed")
                return 1

    b = Bench(a)
    atexit.register(kill_daemons)
    atexit.register(shutil.rmtree, b.sockdir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    made_files: list[Path] = []
    made_dirs: list[Path] = []
    env = env_info(a)
    try:
        b.check_tools(tools)
        log(f"load average at start: {env['loadavg-start']}  (machine noise indicator)")
        m0, t0 = machine_busy(), time.perf_counter()
        time.sleep(2)
        idle = (machine_busy() - m0) / (time.perf_counter() - t0)
        b.notes.append(f"Machine CPU busy while idle (2 s before the runs): {idle:.3f} CPU s/s.")
        log(b.notes[-1])
        dirs = []
        calib = {}
        for ds in [x for x in a.dirs.split(",") if x.strip()]:
            d = Path(ds.strip())
            info = b.prepare_dir(d)
            if info["created"]:
                made_dirs.append(d)
            made_files += list(info["files"].values())
            fstype = fs_type(d)
            dirs.append((str(d), fstype, info["files"]))
            calib[str(d)] = b.calibrate(d, tools)
            if calib[str(d)]:
                log(f"{d} ({fstype}): fixed per-process overhead (1 MiB copy, median of 5): "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in calib[str(d)].items()))
        for dname, fstype, files in dirs:
            for source in a.sources:
                for mode in ("inplace", "sparse"):
                    b.run_group(dname, fstype, files, source, mode, tools)
        env["loadavg-end"] = os.getloadavg()
        for dname, c in calib.items():
            if c:
                b.notes.append(f"Fixed per-process overhead in {dname} (1 MiB copy, included in "
                               "whole-process times): "
                               + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in c.items()))
        b.notes.append(f"Load average: start {env['loadavg-start']}, end {env['loadavg-end']}.")
        summary = b.report(dirs, tools)
        if a.json:
            doc = {"config": {"size": a.size, "rounds": a.rounds, "dirs": [d for d, _, _ in dirs],
                              "tools": tools, "cfr-chunk": CFR_CHUNK, "copy-chunk": CHUNK},
                   "env": env, "calibration": calib, "skipped": b.skipped,
                   "samples": [s.__dict__ for s in b.samples], **summary}
            Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
            log(f"raw samples written to {a.json}")
        bad = [s for s in b.samples if s.check == "MISMATCH"]
        return 2 if bad else 0
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        kill_daemons()
        if not a.keep_files:
            for f in made_files:
                for p in (f, f.with_suffix(".part")):
                    try:
                        p.unlink()
                    except OSError:
                        pass
            for d in made_dirs:
                try:
                    d.rmdir()
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
