"""Shared machinery for the QMP tests: start `qemu-storage-daemon` or
`blockjob daemon` with the same command line, talk to it with the
`qemu.qmp` package, record normalized traces and compare them.

A *side* is one daemon (QEMU's or ours) with one QMP client.  A scenario is
an ``async def scenario(side)`` that drives the side and appends what it
saw to ``side.trace``: events (name and data, timestamps dropped, object
keys sorted), command results (``ok``/``error <class>: <desc>``) and query
snapshots.  ``run_both`` plays a scenario on both daemons (each in its own
fresh temporary directory, both at once) and returns the two traces.
"""

import asyncio
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

REPO = Path(__file__).resolve().parents[2]
BLOCKJOB_BIN = os.environ.get("BLOCKJOB_BIN") or str(REPO / "target/debug/blockjob")
QSD = shutil.which("qemu-storage-daemon")
SIZE = 4 << 20
KINDS = ("qemu", "ours")


def require_tools(*tools):
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        # .ci/run installs qemu-utils; a bare machine without it fails
        # loudly rather than skipping the comparison silently.
        pytest.fail(f"missing tools: {missing} (apt-get install qemu-utils)")


def canonical(v):
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


class Daemon:
    """One daemon process with a QMP monitor on a UNIX socket in `workdir`.

    `kind` is "qemu" (qemu-storage-daemon) or "ours" (`blockjob daemon`);
    `args` is the rest of qemu-storage-daemon's command line
    (``--blockdev ...``), identical for both.
    """

    def __init__(self, kind, workdir, args=()):
        self.kind = kind
        self.dir = Path(workdir)
        self.sock = self.dir / "qmp.sock"
        self.pidfile = self.dir / "daemon.pid"
        self.stderr_path = self.dir / "daemon.stderr"
        cmdline = list(args) + [
            "--chardev", f"socket,id=mon0,path={self.sock},server=on,wait=off",
            "--monitor", "chardev=mon0",
            "--pidfile", str(self.pidfile),
        ]
        if kind == "qemu":
            require_tools("qemu-storage-daemon")
            exe = [QSD]
        else:
            assert os.access(BLOCKJOB_BIN, os.X_OK), f"BLOCKJOB_BIN={BLOCKJOB_BIN} not executable"
            exe = [BLOCKJOB_BIN, "daemon"]
        self.cmdline = exe + cmdline
        self.proc = subprocess.Popen(
            self.cmdline,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.stderr_path, "wb"),
        )
        deadline = time.monotonic() + 15
        # The pid file is written once the monitor socket listens (both).
        while not (self.sock.exists() and self.pidfile.exists()):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{kind} daemon exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{kind} daemon did not come up: {self.stderr()}")
            time.sleep(0.005)

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait(self, timeout=10):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.kind} daemon did not exit")


async def connect(sock, name="test"):
    qmp = QMPClient(name)
    await qmp.connect(str(sock))
    return qmp


class Side:
    """A daemon, one QMP client, and the trace of a scenario."""

    def __init__(self, kind, workdir, params=None):
        self.kind = kind
        self.dir = Path(workdir)
        self.params = params or {}
        self.trace = []
        self.daemon = None
        self.qmp = None

    def path(self, name):
        return self.dir / name

    async def start(self, args=()):
        # Popen and the socket wait are blocking: keep the other side going.
        self.daemon = await asyncio.to_thread(Daemon, self.kind, self.dir, args)
        self.qmp = await connect(self.daemon.sock, self.kind)

    async def stop(self):
        """`quit`; the daemon must exit 0 (QEMU's as well as ours)."""
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), 10)
            except Exception:  # noqa: BLE001 - EOF races with the reply
                pass
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            except Exception:  # noqa: BLE001
                pass
            self.qmp = None
        if self.daemon is not None:
            rc = await asyncio.to_thread(self.daemon.wait)
            assert rc == 0, f"{self.kind} exited {rc}: {self.daemon.stderr()}"

    def norm(self, v):
        """JSON text with sorted keys and the temporary directory as $TMP."""
        return canonical(v).replace(str(self.dir), "$TMP")

    def note(self, line):
        self.trace.append(line)

    async def cmd(self, name, args=None, record=True, label=None):
        """Run a command: ("ok", return) or ("error", "Class: desc")."""
        try:
            r = await asyncio.wait_for(self.qmp.execute(name, args), 30)
            if name in ("query-block-jobs", "query-jobs"):
                # Our x- members (rates, ETA): QEMU has none, and QEMU
                # clients ignore them.
                r = [{k: v for k, v in j.items() if not k.startswith("x-")} for j in r]
            res = ("ok", r)
        except ExecuteError as e:
            res = ("error", f"{e.error_class}: {e.error.error.desc}")
        if record:
            shown = res[1] if res[0] == "error" else "ok"
            self.note(f"{label or name}: {shown}".replace(str(self.dir), "$TMP"))
        return res

    async def ok(self, name, args=None):
        r = await self.cmd(name, args, record=False)
        assert r[0] == "ok", f"{self.kind}: {name} {args}: {r[1]}"
        return r[1]

    async def event(self, timeout=15):
        try:
            return await asyncio.wait_for(self.qmp.events.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def record_event(self, ev, drop=()):
        data = dict(ev.get("data", {}))
        for k in drop:
            data.pop(k, None)
        self.note(f"{ev['event']} {self.norm(data)}")

    async def quiet_events(self, within=0.3):
        """Events that arrive right after a command (e.g. created/null of a
        job refused after creation)."""
        out = []
        while True:
            ev = await self.event(within)
            if ev is None:
                return out
            out.append(ev)

    async def snapshot(self, label, drop=()):
        """query-block-jobs and query-jobs, minus fields in `drop` (QEMU's
        own values there vary from run to run)."""
        bj = await self.ok("query-block-jobs")
        jobs = await self.ok("query-jobs")
        for lst in (bj, jobs):
            for j in lst:
                for k in drop:
                    # "field@type": drop the field only for that job type.
                    field, _, typ = k.partition("@")
                    if not typ or j.get("type") == typ:
                        j.pop(field, None)
        self.note(f"{label}: query-block-jobs {self.norm(bj)}")
        self.note(f"{label}: query-jobs {self.norm(jobs)}")
        return bj, jobs


def summarize(ev):
    d = ev.get("data", {})
    name = ev["event"]
    if name == "JOB_STATUS_CHANGE":
        return f"JSC:{d.get('status')}"
    if name == "BLOCK_JOB_ERROR":
        return f"ERR({d.get('operation')},{d.get('action')})"
    return {
        "BLOCK_JOB_READY": "READY",
        "BLOCK_JOB_PENDING": "PENDING",
        "BLOCK_JOB_CANCELLED": "CANCELLED",
        "BLOCK_JOB_COMPLETED": "COMPLETED",
    }.get(name, name)


async def _play(kind, scenario, params):
    with tempfile.TemporaryDirectory(prefix=f"qmp-{kind}-") as d:
        side = Side(kind, d, params)
        try:
            await scenario(side)
            await side.stop()
        except BaseException:
            if side.daemon is not None:
                side.daemon.kill()
                print(f"{kind} daemon stderr:\n{side.daemon.stderr()}", file=sys.stderr)
            raise
        finally:
            if side.daemon is not None and side.daemon.alive():
                side.daemon.kill()
        return side.trace


def run_both(scenario, params=None):
    """Play `scenario` on qemu-storage-daemon and on ours at once (each in a
    fresh directory); return (qemu trace, our trace)."""

    async def both():
        return await asyncio.gather(
            *(_play(k, scenario, params) for k in KINDS))

    return tuple(asyncio.run(both()))


def assert_same(label, q, o):
    if q != o:
        diff = "\n".join(difflib.unified_diff(q, o, "qemu", "ours", lineterm="", n=50))
        raise AssertionError(f"{label}: traces differ\n{diff}")


# ---- images ---------------------------------------------------------------

def run(cwd, *cmd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def raw_image(path, fill=None, size=SIZE):
    """A raw image: `fill` byte everywhere, or a pattern varying by 4 KiB
    block (so misplaced data shows), or sparse zeroes when fill == 0."""
    with open(path, "wb") as f:
        if fill == 0:
            f.truncate(size)
        elif fill is None:
            blk = bytes(range(256)) * 16
            f.write(b"".join(bytes([(i * 7) & 0xFF]) + blk[1:] for i in range(size // 4096)))
        else:
            f.write(bytes([fill]) * size)


def qcow2_chain(d):
    """base.qcow2 (4 MiB of 0x01) <- mid.qcow2 (0x02 at 1 MiB, 1 MiB) <-
    top.qcow2 (0x03 at 3 MiB, 512 KiB), relative backing names (as in
    tests/chain_oracle.rs)."""
    require_tools("qemu-img", "qemu-io")
    run(d, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    run(d, "qemu-io", "-c", "write -P 1 0 4M", "base.qcow2")
    for img, back, pat in (("mid.qcow2", "base.qcow2", "write -P 2 1M 1M"),
                           ("top.qcow2", "mid.qcow2", "write -P 3 3M 512k")):
        run(d, "qemu-img", "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img)
        run(d, "qemu-io", "-c", pat, img)


def raw_node(name, path, inject=None):
    """blockdev options of a raw node over a file, with blkdebug between
    them when `inject` = (event, errno, once)."""
    if inject:
        ev, errno, once = inject
        return {"driver": "raw", "node-name": name,
                "file": {"driver": "blkdebug",
                         "image": {"driver": "file", "filename": str(path)},
                         "inject-error": [{"event": ev, "errno": errno, "once": once}]}}
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}}


def blockdev_args(*nodes):
    out = []
    for n in nodes:
        out += ["--blockdev", json.dumps(n)]
    return out
