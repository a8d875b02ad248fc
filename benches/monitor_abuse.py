#!/usr/bin/env python3
"""Bad QMP clients against qemu-storage-daemon and `blockjob daemon`, side
by side in one run: each scenario starts a fresh daemon of each kind with
the same command line, abuses its monitor, and meanwhile a second client
sends `query-version` every 100 ms and times the answers.

    cargo build --release -p blockjob-cli
    python3 benches/monitor_abuse.py [--big 64M] [--conns 500] [--only NAME]

Scenarios:
  big       one request of --big bytes (a string id; 64M = the largest
            QEMU takes: its tokens plus one must stay within 64 MiB):
            seconds until its reply
  deep      [ x 100000 then ] x 100000 (nesting past 1024): replies, seconds
  garbage   1 MiB of random bytes (invalid UTF-8 and all): replies, seconds
  conns     --conns clients connected and negotiated, held open
  stall     100 clients each send half a command and stall
  noread    a client negotiates and never reads while a mirror reports an
            error per read (blkdebug, on-source-error=ignore) for 10 s;
            the prober reads its events with its replies

Printed per scenario and daemon: the abuse's own result, peak RSS of the
daemon (VmHWM, MiB), and the second client's query-version latency
(median and max, ms; "-" when it got no answer within 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = os.environ.get("BLOCKJOB_BIN") or str(REPO / "target/release/blockjob")
QSD = shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"
MiB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Daemon:
    def __init__(self, kind, workdir, extra=()):
        self.kind = kind
        self.sock = str(Path(workdir) / "qmp.sock")
        # QEMU serves one client per monitor: the prober gets its own.
        self.probe_sock = str(Path(workdir) / "probe.sock")
        exe = [QSD] if kind == "qemu" else [OURS, "daemon"]
        mons = []
        for i, path in (("m", self.sock), ("p", self.probe_sock)):
            mons += ["--chardev", f"socket,id={i},path={path},server=on,wait=off",
                     "--monitor", f"chardev={i}"]
        self.proc = subprocess.Popen(
            exe + list(extra) + mons,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not (os.path.exists(self.sock) and os.path.exists(self.probe_sock)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.01)

    def hwm_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def connect(d, negotiate=True, timeout=60, path=None):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path or d.sock)
    f = s.makefile("rb")
    if negotiate:
        f.readline()
        s.sendall(b'{"execute":"qmp_capabilities"}\n')
        f.readline()
    return s, f


class Prober(threading.Thread):
    """A second client: query-version every 100 ms, latency of each."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.s, self.f = connect(d, timeout=10, path=d.probe_sock)
        self.lat = []
        self.lost = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                self.s.sendall(b'{"execute":"query-version","id":"p"}\n')
                while True:
                    m = json.loads(self.f.readline())
                    if m.get("id") == "p":
                        break
                self.lat.append((time.perf_counter() - t) * 1000)
            except (OSError, ValueError):
                self.lost += 1
                return
            self.stop.wait(0.1)

    def result(self):
        self.stop.set()
        self.join(15)
        if not self.lat:
            return "-", "-"
        worst = "-" if self.lost else f"{max(self.lat):.1f}"
        if os.environ.get("PROBE_TRACE"):
            log(" ".join(f"{x:.0f}" for x in self.lat))
        return f"{statistics.median(self.lat):.1f}", worst


def read_until(f, ident):
    n = 0
    while True:
        line = f.readline()
        if not line:
            return n, "EOF"
        if b'"id": "%s"' % ident.encode() in line:
            return n, "ok"
        n += 1


def replies_to(d, payload):
    """Send payload + a sentinel while reading the replies (a thread
    sends); (replies before the sentinel, seconds)."""
    s, f = connect(d, timeout=600)
    t = time.perf_counter()
    sender = threading.Thread(target=lambda: s.sendall(payload + b'\xff{"execute":"query-version","id":"end"}\n'))
    sender.start()
    n, how = read_until(f, "end")
    dt = time.perf_counter() - t
    sender.join()
    s.close()
    return f"{n} replies{'' if how == 'ok' else ' ' + how}", f"{dt:.2f} s"


def sc_big(d, args):
    size = args.big
    head, tail = b'{"execute":"query-version","id":"', b'"}'
    # QEMU takes a value while its tokens' bytes plus one stay within the
    # limit; the punctuation tokens count, whitespace does not.
    n = size - len(b'{"execute":"query-version","id":""}') - 1
    payload = head + b"a" * n + tail + b"\n"
    s, f = connect(d, timeout=900)
    t = time.perf_counter()
    sender = threading.Thread(target=lambda: s.sendall(payload))
    sender.start()
    line = f.readline()
    dt = time.perf_counter() - t
    sender.join()
    ok = b'"return"' in line
    s.close()
    return ("reply" if ok else "error " + line[:60].decode(errors="replace")), f"{dt:.2f} s"


def sc_deep(d, args):
    return replies_to(d, b"[" * 100000 + b"]" * 100000 + b"\n")


def sc_garbage(d, args):
    return replies_to(d, random.Random(17).randbytes(MiB))


def hold(d, n, send=b""):
    """n clients connected (and, where the daemon greets them within a
    second, negotiated), each having sent `send`; (held, served)."""
    held, served = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1)
        try:
            s.connect(d.sock)
        except OSError:
            s.close()
            break
        f = s.makefile("rb")
        try:
            if f.readline():
                s.sendall(b'{"execute":"qmp_capabilities"}\n')
                f.readline()
                served += 1
        except OSError:
            pass
        try:
            if send:
                s.sendall(send)
        except OSError:
            pass
        held.append((s, f))
    return held, served


def sc_conns(d, args):
    t = time.perf_counter()
    held, served = hold(d, args.conns)
    dt = time.perf_counter() - t
    time.sleep(2)
    return (f"{len(held)} held, {served} served", f"{dt:.2f} s"), held


def sc_stall(d, args):
    held, served = hold(d, 100, b'{"execute": "query-')
    time.sleep(2)
    # A client after them.
    t = time.perf_counter()
    try:
        s, f = connect(d, timeout=5)
        s.sendall(b'{"execute":"query-version","id":"x"}\n')
        n, how = read_until(f, "x")
        late = f"next client {how} in {(time.perf_counter() - t) * 1000:.0f} ms"
        held.append((s, f))
    except OSError:
        late = "next client not served in 5 s"
    return (f"{len(held)} stalled, {served} served; {late}", ""), held


def sc_noread(d, args):
    s, f = connect(d)
    s.sendall(json.dumps({"execute": "blockdev-mirror", "arguments": {
        "job-id": "j", "device": "src", "target": "dst", "sync": "full",
        "on-source-error": "ignore"}}).encode() + b"\n")
    # Never read again; watch the daemon for 10 s.
    time.sleep(10)
    # Did the daemon drop us? (a read that finds EOF after the backlog)
    rss = d.hwm_mib()
    s.settimeout(0.5)
    gone = f"kept (RSS {rss:.0f} MiB at 10 s)"
    total, deadline = 0, time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            b = s.recv(1 << 20)
            if not b:
                gone = f"disconnected after {total // 1024} KiB"
                break
            total += len(b)
    except (socket.timeout, OSError):
        pass
    return (gone, ""), [(s, f)]


def noread_args(tmp):
    """A 64 MiB image full of data (QEMU's mirror skips what reads as
    zeroes, so null-co would never read) behind blkdebug failing every
    read: an error event per retried read, as long as the job runs."""
    img = Path(tmp) / "src.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64M", str(img)],
                   check=True, stdout=subprocess.DEVNULL)
    return [
        "--blockdev", json.dumps({"driver": "raw", "node-name": "src", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": str(img)},
            "inject-error": [{"event": "read_aio", "errno": 5}]}}),
        "--blockdev", json.dumps({"driver": "null-co", "node-name": "dst", "size": 64 * MiB}),
    ]

SCENARIOS = {
    "big": (sc_big, None),
    "deep": (sc_deep, None),
    "garbage": (sc_garbage, None),
    "conns": (sc_conns, None),
    "stall": (sc_stall, None),
    "noread": (sc_noread, noread_args),
}


def size(s):
    t = s.upper().rstrip("B").removesuffix("I")
    m = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t.rstrip("KMG")) * m)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=size, default=64 * MiB)
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--only", action="append", choices=list(SCENARIOS))
    ap.add_argument("--skip-qemu-big", action="store_true",
                    help="QEMU reads its monitor slowly: minutes for 64 MiB")
    args = ap.parse_args()
    rows = []
    for name in args.only or SCENARIOS:
        fn, extra = SCENARIOS[name]
        for kind in ("qemu", "ours"):
            if name == "big" and kind == "qemu" and args.skip_qemu_big:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                d = Daemon(kind, tmp, extra(tmp) if extra else ())
                probe = Prober(d)
                probe.start()
                log(f"{name} / {kind} ...")
                out = fn(d, args)
                held = ()
                if isinstance(out[1], list):
                    out, held = out
                med, worst = probe.result()
                rss = d.hwm_mib()
                threads = len(os.listdir(f"/proc/{d.proc.pid}/task"))
                for s, _ in held:
                    s.close()
                d.stop()
                rows.append((name, kind, out[0], out[1], f"{rss:.0f}", str(threads), med, worst))
                log("  " + " | ".join(rows[-1]))
    head = ("scenario", "daemon", "result", "time", "peak RSS MiB", "threads",
            "probe median ms", "probe max ms")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
