"""What the benchmark scripts share: logging, sizes, file facts, and a
qemu-storage-daemon with a QMP client (timestamps every message, keeps
events aside; `kill_daemons` at exit stops any left running)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def size_parser(multiple: int):
    """An argparse type for sizes like 1G, 512M: positive multiples of
    `multiple` bytes."""

    def parse(s: str) -> int:
        t = s.strip().upper().removesuffix("IB").removesuffix("B")
        mult = 1
        for suf, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
            if t.endswith(suf):
                t, mult = t[:-1], m
                break
        try:
            v = int(float(t) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {s!r}") from None
        if v <= 0 or v % multiple:
            raise argparse.ArgumentTypeError(
                f"size {s!r} must be a positive multiple of {multiple // MiB} MiB")
        return v

    return parse


def machine_busy() -> float:
    """Busy seconds of all CPUs so far (/proc/stat: user, nice, system,
    irq, softirq): unlike a process's own CPU time, it also counts kernel
    writeback threads and I/O completion interrupts, which land on
    whatever happens to run (an idle CPU while a process sleeps in fsync,
    the copying thread while it copies)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fdatasync_path(path: Path) -> float:
    """fdatasync() a file by its path (the page cache is shared, so this
    writes back what another process left dirty); seconds taken."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def fs_type(path: Path) -> str:
    best, typ = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                p = line.split()
                mnt = p[1].replace("\\040", " ")
                rp = str(path.resolve())
                if (rp == mnt or rp.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, typ = mnt, p[2]
    except OSError:
        pass
    return typ


class QMPError(BenchError):
    pass


class QMPCommandError(QMPError):
    def __init__(self, cmd, err):
        self.cmd, self.err = cmd, err
        super().__init__(f"QMP {cmd}: {err.get('class')}: {err.get('desc')}")


LIVE_DAEMONS: list[subprocess.Popen] = []


class QemuDaemon:
    """qemu-storage-daemon with a QMP monitor on a unix socket. `binary`
    may also be an argv prefix, e.g. ["target/release/blockjob", "daemon"]
    (our drop-in takes the same options)."""

    def __init__(self, binary: str | list[str], sockdir: Path, name: str, timeout: float):
        self.timeout = timeout
        self.sock_path = sockdir / f"{name}.qmp"
        self.log_path = sockdir / f"{name}.log"
        self.logf = open(self.log_path, "wb")
        argv = [binary] if isinstance(binary, str) else list(binary)
        self.prog = " ".join([Path(argv[0]).name] + argv[1:])
        self.proc = subprocess.Popen(
            [*argv,
             "--chardev", f"socket,path={self.sock_path},server=on,wait=off,id=qmp0",
             "--monitor", "chardev=qmp0"],
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=subprocess.STDOUT)
        LIVE_DAEMONS.append(self.proc)
        self.pid = self.proc.pid
        self.buf = b""
        self.events: collections.deque = collections.deque()
        self.n = 0
        self.sock = self._connect()
        greeting = self._read(time.monotonic() + timeout, "the QMP greeting")
        if "QMP" not in greeting:
            raise QMPError(f"unexpected QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _daemon_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise QMPError(f"{self.prog} exited with {self.proc.returncode}: "
                               f"{self._daemon_log()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.sock_path))
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"no QMP socket at {self.sock_path} after 10 s") from None
                time.sleep(0.01)

    def _read(self, deadline: float, what: str) -> dict:
        """One QMP message (events are returned too; caller sorts)."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                if not line.strip():
                    continue
                msg = json.loads(line)
                msg["_t"] = time.perf_counter()
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"timed out after {self.timeout:g} s waiting for {what} "
                               f"({self.prog} pid {self.pid})")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise QMPError(f"QMP connection closed while waiting for {what}: "
                               f"{self._daemon_log()}")
            self.buf += data

    def send(self, execute: str, arguments: dict | None = None) -> str:
        self.n += 1
        cid = f"c{self.n}"
        msg = {"execute": execute, "id": cid}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return cid

    def wait_return(self, cid: str, execute: str):
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline, f"the return of {execute}")
            if "event" in msg:
                self.events.append(msg)
            elif msg.get("id") == cid:
                if "error" in msg:
                    raise QMPCommandError(execute, msg["error"])
                return msg.get("return")

    def cmd(self, execute: str, arguments: dict | None = None):
        return self.wait_return(self.send(execute, arguments), execute)

    def wait_event(self, names: tuple[str, ...], what: str, device: str | None = None) -> dict:
        def hit(e):
            return e["event"] in names and (device is None or e.get("data", {}).get("device") == device
                                            or e.get("data", {}).get("id") == device)
        for e in list(self.events):
            if hit(e):
                self.events.remove(e)
                return e
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline, what)
            if "event" not in msg:
                continue
            if hit(msg):
                return msg
            self.events.append(msg)

    def run_job(self, execute: str, arguments: dict, job_id: str, what: str) -> dict:
        """Start a block job with `execute`, complete it at BLOCK_JOB_READY
        (if it gets there), wait for BLOCK_JOB_COMPLETED without an error,
        then for the job to be dismissed. Returns `seconds` and
        `cpu_seconds` from the command to COMPLETED, `ready_seconds` (None
        without READY) and COMPLETED's `data`."""
        tck = os.sysconf("SC_CLK_TCK")
        c0 = self.cpu_ticks()
        t0 = time.perf_counter()
        self.cmd(execute, {"job-id": job_id, **arguments})
        names = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
        ready = None
        while True:
            e = self.wait_event(names, "BLOCK_JOB_READY/COMPLETED", job_id)
            ev, data = e["event"], e.get("data", {})
            if ev == "BLOCK_JOB_READY" and ready is None:
                ready = e["_t"] - t0
                self.cmd("block-job-complete", {"device": job_id})
            elif ev == "BLOCK_JOB_COMPLETED":
                t1 = e["_t"]
                break
            elif ev in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED"):
                raise BenchError(f"qemu {what}: {ev} {data}")
        c1 = self.cpu_ticks()
        if "error" in data:
            raise BenchError(f"qemu {what}: BLOCK_JOB_COMPLETED with error: {data['error']}")
        deadline = time.monotonic() + self.timeout
        while self.cmd("query-jobs"):
            if time.monotonic() > deadline:
                raise BenchError("qemu: job still listed by query-jobs after COMPLETED")
            time.sleep(0.005)
        return dict(seconds=t1 - t0, cpu_seconds=(c1 - c0) / tck, ready_seconds=ready, data=data)

    def cpu_ticks(self) -> int:
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime (fields 14, 15)

    def close(self) -> None:
        try:
            self.cmd("quit")
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            self.sock.close()
        except Exception:
            pass
        self.logf.close()
        if self.proc in LIVE_DAEMONS:
            LIVE_DAEMONS.remove(self.proc)
        for p in (self.sock_path,):
            try:
                p.unlink()
            except OSError:
                pass


def kill_daemons() -> None:
    for p in list(LIVE_DAEMONS):
        if p.poll() is None:
            p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        LIVE_DAEMONS.remove(p)


def remove_work(work: Path, files) -> None:
    """Delete a run's files and then its directory, whatever is left."""
    for p in files:
        try:
            p.unlink()
        except OSError:
            pass
    try:
        work.rmdir()
    except OSError:
        pass


def run_main(main, name: str) -> None:
    """Exit with main()'s status; a BenchError is one line on stderr and
    status 1."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)


def prepare_run(repo: Path, no_build: bool, parent: Path, prefix: str) -> Path:
    """Build our release binary (unless `no_build`), make sure no daemon
    outlives the script, and make this run's directory under `parent`."""
    import atexit
    import tempfile
    if not no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "blockjob-cli"], cwd=repo,
                       check=True)
    atexit.register(kill_daemons)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def write_random(paths, size: int) -> None:
    """Fill each file with `size` random bytes (a multiple of 4 MiB),
    written through to the device."""
    for p in paths:
        subprocess.run(["dd", "if=/dev/urandom", f"of={p}", "bs=4M", f"count={size // (4 * MiB)}",
                        "conv=fdatasync", "status=none"], check=True)
