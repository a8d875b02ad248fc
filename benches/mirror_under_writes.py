#!/usr/bin/env python3
"""Mirror under concurrent guest writes: our mirror vs QEMU's.

For each rate x copy mode, with a fresh, fully allocated random source and a
sparse target of the same size:

  ours  target/release/examples/mirror_under_writes (guest = a BlockBackend
        on the source node, written from a thread)
  qemu  qemu-storage-daemon; the guest is an NBD export of the source node,
        written by the minimal NBD client below. When the mirror starts, QEMU
        inserts its mirror_top filter above "src" and moves the export's
        BlockBackend onto it, so the NBD writes go through the filter (checked
        on every run with x-debug-query-block-graph, see `export_via_filter`
        in the JSON; write-blocking runs also report actively-synced).

Both sides run the same paced writer: write i of `--io-size` bytes is issued
at start + i * io_size / rate (immediately when late), at the offset and with
the fill byte of draw i of a splitmix64 sequence (seed 1; the script checks
the Rust side generates the same sequence). Phases: `baseline` (no job,
--baseline s), `job` (blockdev-mirror sent .. BLOCK_JOB_READY), `after_ready`
(--after s). Then the writer stops, the job is completed, and the target is
compared with the source (qemu-img compare, untimed).

  READY delay    blockdev-mirror sent -> BLOCK_JOB_READY (QEMU: the event's
                 timestamp)
  copied twice   BLOCK_JOB_READY offset - image length. With sync=full on a
                 fully allocated source the first pass copies exactly the
                 image length, so in background mode the excess is re-copied
                 data. In write-blocking mode both add every guest write
                 that goes to the target to offset and len (QEMU's rule), so
                 there it also counts guest data. Hence also:
  src read - size
                 bytes the job read from the source between blockdev-mirror
                 and READY (rchar of the process in /proc/PID/io: our guest
                 only writes, QEMU receives NBD/QMP data with recvmsg, which
                 rchar does not count) minus the image length: data read
                 more than once, the same measure for both modes and both
                 implementations. `rchar_baseline` in the JSON is the noise
                 during the baseline (should be ~0).
  latency        wall time of each guest write, p50/p99 per phase. QEMU's
                 includes the NBD round trip through a Python client, so
                 compare each side's job-phase latency with its own baseline.
                 A writer that falls behind catches up at once, so the
                 "achieved MiB/s during job" column shows how much the job
                 throttled the guest.

If the job is not READY within --timeout under writes, that is reported
("no READY in N s"); the writer then stops and the job is let converge so
that the result can still be verified.

Usage:
  benches/mirror_under_writes.py [--size 1G] [--dir /dev/shm] \
      [--rates 20,100,400] [--io-size 65536] \
      [--modes background,write-blocking] [--timeout 60] [--json out.json]
      [--repeat N (adds a table of medians)] [--speed BYTES/S (job speed
      limit: makes background mode fail to converge, write-blocking not)]
      [--buf-size B] [--granularity B] [--trace-slow-us US] [--impls ours,qemu]
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "mirror_under_writes")
MIB = 1 << 20
MASK64 = (1 << 64) - 1
PHASES = ("baseline", "job", "after_ready")

_children: list[subprocess.Popen] = []


def _kill_children() -> None:
    for p in _children:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_children)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the write sequence (same as examples/mirror_under_writes.rs) -----------


class WriteSeq:
    """splitmix64; draw r gives offset (r % (size // io_size)) * io_size and
    fill byte (r >> 56) | 1."""

    def __init__(self, seed: int, size: int, io_size: int) -> None:
        self.state = seed & MASK64
        self.blocks = size // io_size
        self.io_size = io_size

    def next(self) -> tuple[int, int]:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        r = z ^ (z >> 31)
        return (r % self.blocks) * self.io_size, (r >> 56) | 1


def check_sequence_matches(size: int, io_size: int, seed: int,
                           example: list[str] | None = None) -> None:
    """Check that the Rust example (argv prefix `example`, default
    mirror_under_writes) draws the same write sequence as WriteSeq."""
    n = 1000
    out = subprocess.run(
        [*(example or [EXAMPLE]), "--print-offsets", str(n), "--size", str(size),
         "--io-size", str(io_size), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    seq = WriteSeq(seed, size, io_size)
    for i in range(n):
        off, b = seq.next()
        if out[i] != f"{off} {b}":
            sys.exit(f"write sequences differ at draw {i}: rust {out[i]!r}, python {off} {b}")


# ---- statistics ---------------------------------------------------------------


def pct_us(sorted_ns: list[int], p: float):
    """Nearest-rank percentile in µs (as in the Rust example)."""
    if not sorted_ns:
        return None
    rank = min(max(math.ceil(p / 100 * len(sorted_ns)), 1), len(sorted_ns))
    return round(sorted_ns[rank - 1] / 1000, 1)


def phase_stats(samples: list[int], secs: float, io_size: int) -> dict:
    s = sorted(samples)
    return {
        "p50": pct_us(s, 50), "p99": pct_us(s, 99), "max": pct_us(s, 100),
        "n": len(s), "secs": round(secs, 3),
        "mib_s": round(len(s) * io_size / MIB / secs, 1) if secs > 0 else None,
    }


# ---- QMP ------------------------------------------------------------------------


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, path: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.events: list[dict] = []
        self._read(10)  # greeting
        self.cmd("qmp_capabilities")

    def _read(self, timeout: float | None) -> dict | None:
        """One message, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise QmpError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, args: dict | None = None, timeout: float = 60):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read(timeout)
            if r is None:
                raise QmpError(f"no reply to {name}")
            if "event" in r:
                self.events.append(r)
            elif "return" in r:
                return r["return"]
            elif "error" in r:
                raise QmpError(f"{name}: {r['error']['desc']}")

    def event(self, names: set[str], timeout: float) -> dict | None:
        """The next event named in `names` (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                e = self.events.pop(0)
                if e["event"] in names:
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r = self._read(left)
            if r is None:
                return None
            if "event" in r:
                self.events.append(r)

    def close(self) -> None:
        self.sock.close()


# ---- a minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies) ----------

NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_INFO_EXPORT = 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9


class Nbd:
    def __init__(self, path: str, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        if self._recv(8) != b"NBDMAGIC" or self._recv(8) != b"IHAVEOPT":
            raise RuntimeError("not a newstyle NBD server")
        (hflags,) = struct.unpack(">H", self._recv(2))
        if not hflags & 1:
            raise RuntimeError("server is not fixed newstyle")
        # NBD_FLAG_C_FIXED_NEWSTYLE, and NBD_FLAG_C_NO_ZEROES if offered.
        self.sock.sendall(struct.pack(">I", 1 | (hflags & 2)))
        n = name.encode()
        data = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_GO, len(data)) + data)
        self.size = None
        while True:
            magic, _opt, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(rlen)
            if magic != NBD_OPT_REPLY_MAGIC:
                raise RuntimeError("bad option reply magic")
            if rtype & (1 << 31):
                raise RuntimeError(f"NBD_OPT_GO failed: {rtype:#x} {payload!r}")
            if rtype == NBD_REP_INFO:
                (itype,) = struct.unpack(">H", payload[:2])
                if itype == NBD_INFO_EXPORT:
                    self.size, self.tflags = struct.unpack(">QH", payload[2:12])
            elif rtype == NBD_REP_ACK:
                break
        if self.size is None or self.tflags & NBD_FLAG_READ_ONLY:
            raise RuntimeError("export has no size or is read-only")
        self.cookie = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise RuntimeError("NBD connection closed")
            got += k
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        self.cookie += 1
        hdr = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE,
                          self.cookie, offset, len(data))
        self.sock.sendall(hdr + data)
        magic, err, cookie = struct.unpack(">IIQ", self._recv(16))
        if magic != NBD_SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise RuntimeError("bad NBD reply")
        if err:
            raise OSError(err, f"NBD write at {offset} failed")

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                          NBD_CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()


class PacedWriter(threading.Thread):
    """The Python twin of the Rust example's writer."""

    def __init__(self, write, size: int, io_size: int, rate_mib: float, seed: int,
                 trace_slow_us: int | None = None) -> None:
        super().__init__(name="guest-writer", daemon=True)
        self.write = write
        self.seq = WriteSeq(seed, size, io_size)
        self.io_size = io_size
        self.interval = io_size / (rate_mib * MIB)
        self.phase = 0  # 0..2 = PHASES, 3 = stop
        self.issued = 0  # writes started (write i is draw i of the sequence)
        self.samples: list[list[int]] = [[], [], []]
        self.error: BaseException | None = None
        self.trace_slow_ns = None if trace_slow_us is None else trace_slow_us * 1000
        self.t_begin = 0.0

    def run(self) -> None:
        try:
            start = self.t_begin = time.perf_counter()
            i = 0
            perf_ns = time.perf_counter_ns
            while self.phase < 3:
                nxt = start + i * self.interval
                now = time.perf_counter()
                if nxt > now:
                    time.sleep(nxt - now)
                ph = self.phase  # at issue time (the stop may have come while sleeping)
                if ph >= 3:
                    break
                off, b = self.seq.next()
                data = bytes((b,)) * self.io_size
                self.issued += 1
                t0 = perf_ns()
                self.write(off, data)
                lat = perf_ns() - t0
                self.samples[ph].append(lat)
                if self.trace_slow_ns is not None and lat > self.trace_slow_ns:
                    log(f"slow write: t={t0 / 1e9 - start:.6f}s phase={PHASES[ph]} "
                        f"offset={off} lat={lat // 1000}us")
                i += 1
        except BaseException as e:  # reported by the main thread
            self.error = e


def rchar(pid: int) -> int | None:
    """Bytes the process read with read-like system calls (/proc/PID/io).
    QEMU receives NBD and QMP data with recvmsg, which is not counted, so
    during the job this is the job's source reads (plus 8-byte eventfd
    reads)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def export_via_filter(graph: dict, node: str) -> bool | None:
    """Is the writing BlockBackend (the NBD export's) above a filter over
    `node` (True), right on it (False), or nowhere (None)? `graph`: the
    return of x-debug-query-block-graph."""
    via_filter = None
    nodes = {n["id"]: n for n in graph["nodes"]}
    src_id = next(n["id"] for n in graph["nodes"] if n["name"] == node)
    for e in graph["edges"]:
        if nodes[e["parent"]]["type"] == "block-backend" and "write" in e["perm"]:
            child = nodes[e["child"]]
            if e["child"] == src_id:
                via_filter = False
            elif any(x["parent"] == child["id"] and x["child"] == src_id
                     for x in graph["edges"]):
                via_filter = True
    return via_filter


def diff(b, a):
    return None if a is None or b is None else b - a


def run_qemu(a, rate: float, mode: str, src: str, dst: str, work: str, size: int) -> dict:
    qmp_path = os.path.join(work, "qmp.sock")
    nbd_path = os.path.join(work, "nbd.sock")
    errlog = open(os.path.join(work, "qsd.log"), "w+b")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--chardev", f"socket,path={qmp_path},server=on,wait=off,id=qmp0",
         "--monitor", "chardev=qmp0"],
        stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
    )
    _children.append(proc)
    qmp = nbd = writer = None
    try:
        qmp = Qmp(qmp_path)
        for name, path in (("src", src), ("dst", dst)):
            qmp.cmd("blockdev-add", {"driver": "raw", "node-name": name,
                                     "file": {"driver": "file", "filename": path}})
        # QEMU 10: nbd-server-start takes a SocketAddressLegacy.
        qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_path}}})
        qmp.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                     "name": "src", "writable": True})
        nbd = Nbd(nbd_path, "src")
        if nbd.size != size:
            raise RuntimeError(f"export size {nbd.size} != {size}")

        writer = PacedWriter(nbd.write, size, a.io_size, rate, a.seed, a.trace_slow_us)
        rchar_start = rchar(proc.pid)
        t_start = time.perf_counter()
        writer.start()
        time.sleep(a.baseline)

        writer.phase = 1
        rchar_job = rchar(proc.pid)
        t_job = time.perf_counter()
        t_job_wall = time.time()
        args = {"job-id": "m", "device": "src", "target": "dst", "sync": "full",
                "copy-mode": mode}
        if a.granularity:
            args["granularity"] = a.granularity
        if a.buf_size:
            args["buf-size"] = a.buf_size
        if a.speed:
            args["speed"] = a.speed
        qmp.cmd("blockdev-mirror", args)
        if a.trace_slow_us is not None:
            log(f"job started: t={t_job - writer.t_begin:.6f}s")
        via_filter = export_via_filter(qmp.cmd("x-debug-query-block-graph"), "src")

        ev = qmp.event({"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"},
                       a.timeout - (time.perf_counter() - t_job))
        t_ready = time.perf_counter()
        rchar_ready = rchar(proc.pid)
        if a.trace_slow_us is not None:
            log(f"READY: t={t_ready - writer.t_begin:.6f}s")
        if ev is not None and ev["event"] != "BLOCK_JOB_READY":
            raise RuntimeError(f"job ended before READY: {ev}")
        info = qmp.cmd("query-block-jobs")[0]
        if ev is not None:
            writer.phase = 2
            time.sleep(a.after)
        t_stop = time.perf_counter()
        writer.phase = 3
        writer.join()
        if writer.error:
            raise writer.error

        ready_after_stop = None
        if ev is None:
            ev2 = qmp.event({"BLOCK_JOB_READY"}, 300)
            if ev2 is None:
                raise RuntimeError("no READY even after the writer stopped")
            ready_after_stop = round(time.perf_counter() - t_stop, 3)
        nbd.close()
        nbd = None
        qmp.cmd("block-job-complete", {"device": "m"})
        done = qmp.event({"BLOCK_JOB_COMPLETED"}, 120)
        if done is None or "error" in done["data"]:
            raise RuntimeError(f"completion failed: {done}")
        qmp.cmd("quit")
        proc.wait(timeout=30)

        secs = (t_job - t_start, t_ready - t_job, t_stop - t_ready)
        res = {
            "impl": "qemu", "copy_mode": mode, "rate_mib": rate, "io_size": a.io_size,
            # From QEMU's own event timestamp (same clock as time.time()): not
            # delayed by this script's threads or the graph query.
            "ready_delay_s": round(ev["timestamp"]["seconds"]
                                   + ev["timestamp"]["microseconds"] / 1e6
                                   - t_job_wall, 3) if ev else None,
            "len": ev["data"]["len"] if ev else info["len"],
            "offset_at_ready": ev["data"]["offset"] if ev else None,
            "copied_twice": ev["data"]["offset"] - size if ev else None,
            "offset_at_timeout": None if ev else info["offset"],
            "ready_after_stop_s": ready_after_stop,
            "actively_synced": info.get("actively-synced"),
            "export_via_filter": via_filter,
            "src_read_job": diff(rchar_ready, rchar_job),
            "rchar_baseline": diff(rchar_job, rchar_start),
            "lat_us": {ph: phase_stats(writer.samples[i], secs[i], a.io_size)
                       for i, ph in enumerate(PHASES)},
        }
        return res
    except BaseException:
        errlog.seek(0)
        log("qemu-storage-daemon output:\n" + errlog.read().decode(errors="replace"))
        raise
    finally:
        if writer is not None and writer.is_alive():
            writer.phase = 3
            writer.join(timeout=10)
        if nbd is not None:
            try:
                nbd.sock.close()
            except OSError:
                pass
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errlog.close()


def run_ours(a, rate: float, mode: str, src: str, dst: str) -> dict:
    cmd = [EXAMPLE, "--src", src, "--dst", dst, "--rate-mib", str(rate),
           "--io-size", str(a.io_size), "--copy-mode", mode, "--seed", str(a.seed),
           "--baseline-secs", str(a.baseline), "--after-secs", str(a.after),
           "--timeout-secs", str(a.timeout),
           "--granularity", str(a.granularity), "--buf-size", str(a.buf_size),
           "--speed", str(a.speed)]
    if a.trace_slow_us is not None:
        cmd += ["--trace-slow-us", str(a.trace_slow_us)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _children.append(p)
    out, err = p.communicate()
    if a.trace_slow_us is not None:
        log(err.rstrip())
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err}")
    return json.loads(out.strip().splitlines()[-1])


def compare(src: str, dst: str) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", src, dst])
    return r.returncode == 0


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def make_template(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(rng.randbytes(n))
            left -= n


def fmt_lat(ph: dict) -> str:
    if not ph or not ph["n"]:
        return "-"
    if ph["p50"] is None:
        return "-"
    return f"{ph['p50']:.0f} / {ph['p99']:.0f}"


def fmt_row(r: dict, timeout: float) -> str:
    if r.get("failed"):
        return f"| {r['rate_mib']:g} | {r['copy_mode']} | {r['impl']} | FAILED: {r['failed']} | | | | | | | |"
    if r["ready_delay_s"] is None:
        ready = f"no READY within {timeout:g} s"
        if r.get("ready_after_stop_s") is not None:
            ready += f" (READY {r['ready_after_stop_s']:.1f} s after writes stopped)"
        twice = "-"
    else:
        ready = f"{r['ready_delay_s']:.2f}"
        twice = f"{r['copied_twice'] / MIB:.1f}"
    reread = "-" if r.get("src_read_job") is None else f"{(r['src_read_job'] - r['size']) / MIB:.1f}"
    job = r["lat_us"]["job"]
    achieved = f"{job['mib_s']:g}" if job.get("mib_s") is not None else "-"
    return (f"| {r['rate_mib']:g} | {r['copy_mode']} | {r['impl']} | {ready} | {twice} | {reread} "
            f"| {fmt_lat(r['lat_us']['baseline'])} | {fmt_lat(job)} | {achieved} "
            f"| {fmt_lat(r['lat_us']['after_ready'])} | {str(r.get('identical')).lower()} |")


def median_row(rows: list[dict]) -> dict:
    """Per-field medians of the runs of one rate x mode x impl."""
    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        return rows[0]
    readies = [r["ready_delay_s"] for r in ok]
    m = {
        "impl": ok[0]["impl"], "copy_mode": ok[0]["copy_mode"], "rate_mib": ok[0]["rate_mib"],
        "size": ok[0]["size"],
        # No READY in any run shows as such; otherwise the median of those that were.
        "ready_delay_s": None if all(x is None for x in readies) else med(readies),
        "ready_after_stop_s": med([r.get("ready_after_stop_s") for r in ok]),
        "copied_twice": med([r["copied_twice"] for r in ok]),
        "src_read_job": med([r.get("src_read_job") for r in ok]),
        "identical": all(r.get("identical") for r in ok) and len(ok) == len(rows),
        "lat_us": {ph: {k: med([r["lat_us"][ph][k] for r in ok])
                        for k in ("p50", "p99", "n", "mib_s")} for ph in PHASES},
    }
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    ap.add_argument("--rates", default="50", help="guest write rates, MiB/s, comma separated")
    ap.add_argument("--io-size", type=int, default=65536, help="bytes per guest write")
    ap.add_argument("--modes", default="background,write-blocking", help="copy modes, comma separated")
    ap.add_argument("--impls", default="ours,qemu", help="which sides to run, comma separated")
    ap.add_argument("--timeout", type=float, default=60, help="s to wait for READY under writes")
    ap.add_argument("--baseline", type=float, default=3, help="s of writes before the job")
    ap.add_argument("--after", type=float, default=1, help="s of writes after READY")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--granularity", type=int, default=0, help="mirror granularity (0 = default)")
    ap.add_argument("--buf-size", type=int, default=0, help="mirror buf-size (0 = default)")
    ap.add_argument("--speed", type=int, default=0,
                    help="mirror speed limit, bytes/s (0 = unlimited)")
    ap.add_argument("--trace-slow-us", type=int,
                    help="log every guest write slower than this (µs) to stderr")
    ap.add_argument("--repeat", type=int, default=1, help="runs per rate x mode x impl")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args()
    size = parse_size(a.size)
    rates = [float(x) for x in a.rates.split(",") if x]
    modes = [m for m in a.modes.split(",") if m]
    impls = [i for i in a.impls.split(",") if i]
    if size % a.io_size or size < a.io_size:
        sys.exit("--size must be a multiple of --io-size")
    for tool in ("qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "mirror_under_writes"],
                       cwd=ROOT, check=True)
    check_sequence_matches(size, a.io_size, a.seed)

    work = tempfile.mkdtemp(prefix="mirror-under-writes.", dir=a.dir)
    atexit.register(shutil.rmtree, work, True)
    template = os.path.join(work, "template.raw")
    src, dst = os.path.join(work, "src.raw"), os.path.join(work, "dst.raw")
    log(f"creating a {size} byte random source in {work}")
    make_template(template, size, a.seed)

    results = []
    for rate in rates:
        for mode in modes:
            for run, impl in [(i, x) for i in range(a.repeat) for x in impls]:
                for p in (src, dst):
                    if os.path.exists(p):
                        os.unlink(p)
                shutil.copyfile(template, src)
                with open(dst, "wb") as f:
                    f.truncate(size)
                log(f"{impl}: {mode} at {rate:g} MiB/s ...")
                try:
                    if impl == "ours":
                        r = run_ours(a, rate, mode, src, dst)
                    else:
                        r = run_qemu(a, rate, mode, src, dst, work, size)
                    r["identical"] = compare(src, dst) and r.get("identical", True)
                except Exception as e:  # record and go on with the other runs
                    log(f"{impl} {mode} {rate:g}: {e}")
                    r = {"impl": impl, "copy_mode": mode, "rate_mib": rate, "failed": str(e)}
                r["size"] = size
                r["run"] = run
                log(json.dumps(r))
                results.append(r)

    extra = "".join(f", {k} {v}" for k, v in (("granularity", a.granularity),
                    ("buf-size", a.buf_size), ("speed", a.speed)) if v)
    print(f"\nMirror under guest writes: {size / MIB:g} MiB raw image in {a.dir}, "
          f"{a.io_size} B random writes, seed {a.seed}{extra}; latency p50 / p99 in µs.\n")
    print("| rate MiB/s | mode | impl | READY delay s | copied twice MiB "
          "| src read - size MiB | lat baseline | lat during job | achieved MiB/s during job "
          "| lat after READY | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(fmt_row(r, a.timeout))
    if a.repeat > 1:
        print(f"\nMedians over {a.repeat} runs:\n")
        print("| rate MiB/s | mode | impl | READY delay s | copied twice MiB "
              "| src read - size MiB | lat baseline | lat during job | achieved MiB/s during job "
              "| lat after READY | identical |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        groups: dict = {}
        for r in results:
            groups.setdefault((r["rate_mib"], r["copy_mode"], r["impl"]), []).append(r)
        for rows in groups.values():
            print(fmt_row(median_row(rows), a.timeout))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    if any(r.get("failed") or not r.get("identical") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
