#!/usr/bin/env python3
"""NBD throughput: our client and our server against QEMU's, in one run.

Two parts, each over a UNIX socket and over TCP on 127.0.0.1, for a
--size (default 1 GiB) raw source with all data ("full") and with 2 MiB of
data / 2 MiB of hole alternating ("holes50"), files in --dir (default
/dev/shm, so the disk does not decide):

push (our client): the source copied into a qemu-nbd export of a raw
  target file (`qemu-nbd -f raw -t --shared=8 --cache=writeback`, the
  target truncated to a fresh sparse file before every run):
    qemu-img   `qemu-img convert -n -f raw -O raw SRC nbd+unix:///?socket=S`
               (or nbd://127.0.0.1:PORT/)
    qemu-mirror qemu-storage-daemon: blockdev-add of the source (raw over
               file) and of an `nbd` node on the export, blockdev-mirror
               sync=full, block-job-complete at READY
    ours       `blockjob daemon`: the very same QMP
  time: start to exit (qemu-img) / blockdev-mirror sent to
  BLOCK_JOB_COMPLETED (daemons); CPU: the process's (wait4 rusage /
  /proc/PID/stat), the server's not counted.

serve (our server): `qemu-img convert -f raw -O raw EXPORT-URL DST` reads
  the source through an export into a fresh sparse local file:
    qemu-nbd   `qemu-nbd -r -f raw -t --shared=8 -x src SRC`
    qemu-qsd   `qemu-storage-daemon --blockdev file --nbd-server --export`
    ours       `blockjob daemon` with the same options
  time: qemu-img's start to exit; CPU: the server's (/proc/PID/stat over
  the convert).

After each tool's first counted run the target is compared with the
source (`qemu-img compare`), and the target's allocated bytes are
recorded (holes should stay holes). One warm-up round, then --rounds
counted rounds; the tool order rotates every round.

Targets (issue #16): push: ours >= 0.90 x qemu-img convert, ours >=
QEMU's mirror; serve: ours >= qemu-nbd.

Usage:
  python3 benches/compare_nbd.py [--size 1G] [--rounds 3] [--dir /dev/shm]
      [--sources full,holes50] [--transports unix,tcp] [--parts push,serve]
      [--only TOOLS] [--blockjob PATH] [--no-build] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import compare_mirror as cm
from benchlib import (BenchError, GiB, MiB, QemuDaemon, allocated, fs_type, kill_daemons, log,
                      size_parser)

REPO = Path(__file__).resolve().parent.parent
PUSH = ("qemu-img", "qemu-mirror", "ours")
SERVE = ("qemu-nbd", "qemu-qsd", "ours")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_connectable(transport: str, where, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode}")
        try:
            if transport == "unix":
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(where))
            else:
                s = socket.create_connection(("127.0.0.1", where))
            s.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"server not listening on {where} after {timeout} s")
            time.sleep(0.02)


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


class Endpoint:
    """Where an export listens: the URL qemu-img takes, the QMP `server`
    of an nbd node, and the options of a server."""

    def __init__(self, transport: str, sockdir: Path, name: str):
        self.transport = transport
        if transport == "unix":
            self.path = sockdir / f"{name}.nbd"
            self.port = None
        else:
            self.path = None
            self.port = free_port()

    def url(self, export: str = "") -> str:
        if self.transport == "unix":
            return f"nbd+unix:///{export}?socket={self.path}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def qmp_server(self) -> dict:
        if self.transport == "unix":
            return {"type": "unix", "path": str(self.path)}
        return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}

    def qemu_nbd_args(self) -> list[str]:
        if self.transport == "unix":
            return ["-k", str(self.path)]
        return ["-b", "127.0.0.1", "-p", str(self.port)]

    def qsd_args(self) -> str:
        if self.transport == "unix":
            return f"addr.type=unix,addr.path={self.path}"
        return f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"

    def where(self):
        return self.path if self.transport == "unix" else self.port


class Bench:
    def __init__(self, a):
        self.a = a
        self.size = a.size
        self.sockdir = Path(tempfile.mkdtemp(prefix="bj-nbd-"))
        self.samples: list[dict] = []
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def fresh(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(self.size)

    def compare(self, a: Path, b: Path) -> str:
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                           capture_output=True, text=True)
        return "ok" if r.returncode == 0 else "MISMATCH"

    # -- push ---------------------------------------------------------

    def push_once(self, tool: str, transport: str, src: Path, dst: Path) -> dict:
        self.fresh(dst)
        ep = Endpoint(transport, self.sockdir, "push")
        server = self.spawn(["qemu-nbd", "-f", "raw", "-t", "--shared=8", "--cache=writeback",
                             *ep.qemu_nbd_args(), str(dst)])
        try:
            wait_connectable(transport, ep.where(), server)
            if tool == "qemu-img":
                p = cm.run_timed(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                                  ep.url()], self.a.subtimeout)
                if p.rc != 0:
                    raise BenchError(f"qemu-img convert: {p.err.strip()}")
                return dict(seconds=p.wall, cpu=p.cpu)
            argv = "qemu-storage-daemon" if tool == "qemu-mirror" else [self.a.blockjob, "daemon"]
            d = QemuDaemon(argv, self.sockdir, f"{tool}-{len(self.samples)}", self.a.timeout)
            try:
                d.cmd("blockdev-add", {"driver": "raw", "node-name": "src",
                                       "file": {"driver": "file", "filename": str(src)}})
                d.cmd("blockdev-add", {"driver": "nbd", "node-name": "tgt",
                                       "server": ep.qmp_server(), "export": ""})
                r = d.run_job("blockdev-mirror", {"device": "src", "target": "tgt",
                                                  "sync": "full"}, "m", "mirror")
                d.cmd("blockdev-del", {"node-name": "tgt"})
                d.cmd("blockdev-del", {"node-name": "src"})
            finally:
                d.close()
            return dict(seconds=r["seconds"], cpu=r["cpu_seconds"])
        finally:
            self.stop(server)

    # -- serve --------------------------------------------------------

    def serve_once(self, tool: str, transport: str, src: Path, dst: Path) -> dict:
        dst.unlink(missing_ok=True)
        ep = Endpoint(transport, self.sockdir, "serve")
        if tool == "qemu-nbd":
            server = self.spawn(["qemu-nbd", "-r", "-f", "raw", "-t", "--shared=8", "-x", "src",
                                 *ep.qemu_nbd_args(), str(src)])
        else:
            prog = ["qemu-storage-daemon"] if tool == "qemu-qsd" else [self.a.blockjob, "daemon"]
            server = self.spawn([*prog, "--blockdev",
                                 f"driver=file,node-name=f,filename={src},read-only=on",
                                 "--nbd-server", ep.qsd_args(),
                                 "--export", "type=nbd,id=e,node-name=f,name=src"])
        try:
            wait_connectable(transport, ep.where(), server)
            c0 = cpu_of(server.pid)
            p = cm.run_timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", ep.url("src"),
                              str(dst)], self.a.subtimeout)
            c1 = cpu_of(server.pid)
            if p.rc != 0:
                raise BenchError(f"{tool}: qemu-img convert: {p.err.strip()}")
            return dict(seconds=p.wall, cpu=c1 - c0, client_cpu=p.cpu)
        finally:
            self.stop(server)

    # -- rounds -------------------------------------------------------

    def run(self, part: str, transport: str, source: str, src: Path, dst: Path) -> None:
        tools = tuple(t for t in (PUSH if part == "push" else SERVE)
                      if not self.a.only or t in self.a.only)
        once = self.push_once if part == "push" else self.serve_once
        checked: set[str] = set()
        for rnd in range(self.a.rounds + 1):
            order = list(tools[rnd % len(tools):] + tools[:rnd % len(tools)])
            for t in order:
                r = once(t, transport, src, dst)
                s = dict(part=part, transport=transport, source=source, tool=t, round=rnd,
                         counted=rnd > 0, seconds=r["seconds"], cpu=r["cpu"],
                         allocated=allocated(dst), check=None)
                if rnd > 0 and t not in checked:
                    s["check"] = self.compare(src, dst)
                    checked.add(t)
                self.samples.append(s)
                log(f"  [{part} {transport} {source} r{rnd}] {t:12} "
                    f"{self.size / MiB / r['seconds']:7.0f} MiB/s cpu {r['cpu']:.2f} s "
                    f"alloc {s['allocated'] // MiB} MiB {s['check'] or ''}")

    def report(self) -> dict:
        out, lines, targets = {}, [], []
        p = lines.append
        for part, tools, base in (("push", PUSH, "qemu-img"), ("serve", SERVE, "qemu-nbd")):
            rows = [s for s in self.samples if s["part"] == part and s["counted"]]
            if not rows:
                continue
            p("")
            p(f"## {part}: {self.size // MiB} MiB raw, {self.a.rounds} counted rounds, medians "
              f"(MiB/s; CPU s/GiB of the {'copying process' if part == 'push' else 'server'})")
            p("")
            p("| transport | source | " + " | ".join(tools) + " | ours / " + base
              + (" | ours / qemu-mirror" if part == "push" else " | ours / qemu-qsd")
              + " | CPU s/GiB " + " / ".join(tools) + " | allocated MiB " + " / ".join(tools)
              + " | check |")
            p("|---|---|" + "---:|" * (len(tools) + 4) + "---|")
            groups = sorted({(s["transport"], s["source"]) for s in rows})
            for tr, src in groups:
                med, cpu, alloc, chk = {}, {}, {}, {}
                for t in tools:
                    ss = [s for s in rows if (s["transport"], s["source"], s["tool"]) == (tr, src, t)]
                    if not ss:
                        continue
                    med[t] = statistics.median(self.size / MiB / s["seconds"] for s in ss)
                    cpu[t] = statistics.median(s["cpu"] * GiB / self.size for s in ss)
                    alloc[t] = max(s["allocated"] for s in ss) // MiB
                    chk[t] = next((s["check"] for s in ss if s["check"]), "—")
                other = "qemu-mirror" if part == "push" else "qemu-qsd"
                r1 = med["ours"] / med[base] if "ours" in med and base in med else None
                r2 = med["ours"] / med[other] if "ours" in med and other in med else None
                goal = 0.9 if part == "push" else 1.0
                if r1 is not None:
                    targets.append((f"{part} {tr} {src}: ours/{base}", r1, r1 >= goal, goal))
                if r2 is not None and part == "push":
                    targets.append((f"{part} {tr} {src}: ours/{other}", r2, r2 >= 1.0, 1.0))
                f = lambda d, t, fmt: fmt.format(d[t]) if t in d else "—"  # noqa: E731
                p(f"| {tr} | {src} | " + " | ".join(f(med, t, "{:.0f}") for t in tools)
                  + f" | {'—' if r1 is None else f'{r1:.2f}'} | {'—' if r2 is None else f'{r2:.2f}'}"
                  + " | " + " / ".join(f(cpu, t, "{:.2f}") for t in tools)
                  + " | " + " / ".join(f(alloc, t, "{}") for t in tools)
                  + " | " + " / ".join(chk.get(t, "—") for t in tools) + " |")
                out[f"{part}|{tr}|{src}"] = dict(median_mib_s=med, cpu_s_per_gib=cpu,
                                                 allocated_mib=alloc, check=chk)
        if targets:
            fails = [t for t in targets if not t[2]]
            p("")
            p(f"Targets: {len(targets) - len(fails)}/{len(targets)} pass" + (":" if fails else "."))
            for name, v, _, goal in fails:
                p(f"- FAIL {name}: {v:.3f} (target >= {goal:.2f})")
        print("\n".join(lines), flush=True)
        return {"summary": out, "targets": [dict(check=n, value=v, pass_=ok, target=g)
                                            for n, v, ok, g in targets]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", type=size_parser(MiB), default=GiB, help="image size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="where the files go (default /dev/shm)")
    ap.add_argument("--sources", default="full,holes50")
    ap.add_argument("--transports", default="unix,tcp")
    ap.add_argument("--parts", default="push,serve")
    ap.add_argument("--blockjob", help="the blockjob binary (default target/release/blockjob)")
    ap.add_argument("--only", help="comma-separated tools (default all): "
                    + ",".join(sorted(set(PUSH + SERVE))))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--timeout", type=float, default=120, help="QMP wait timeout, s")
    ap.add_argument("--subtimeout", type=float, default=600, help="timeout of one qemu-img, s")
    ap.add_argument("--json", help="write samples and summary here")
    a = ap.parse_args()

    def pick(text, allowed, what):
        v = [x.strip() for x in text.split(",") if x.strip()]
        if not v or any(x not in allowed for x in v):
            ap.error(f"{what}: a comma-separated list of {', '.join(allowed)}")
        return [x for x in allowed if x in v]
    sources = pick(a.sources, ("full", "holes50"), "--sources")
    transports = pick(a.transports, ("unix", "tcp"), "--transports")
    parts = pick(a.parts, ("push", "serve"), "--parts")
    a.only = pick(a.only, sorted(set(PUSH + SERVE)), "--only") if a.only else None
    if a.blockjob is None:
        a.blockjob = str(REPO / "target" / "release" / "blockjob")
        if not a.no_build:
            r = subprocess.run(["cargo", "build", "--release", "-p", "blockjob-cli"], cwd=REPO)
            if r.returncode != 0:
                log("cargo build --release -p blockjob-cli failed")
                return 1
    for tool in ("qemu-img", "qemu-nbd", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            log(f"{tool} is missing: apt-get install -y qemu-utils qemu-system-common")
            return 1

    b = Bench(a)
    atexit.register(kill_daemons)
    atexit.register(shutil.rmtree, b.sockdir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    d = Path(a.dir) / f"bj-nbd-bench-{os.getpid()}"
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    try:
        files = {}
        for s in sources:
            files[s] = d / f"{s}.raw"
            cm.write_random(files[s], a.size, s == "holes50")
        dst = d / "dst.raw"
        for part in parts:
            for tr in transports:
                for s in sources:
                    b.run(part, tr, s, files[s], dst)
        summary = b.report()
        print(f"\nfs {fs_type(d)}; load average start {tuple(round(x, 2) for x in load0)}, end "
              f"{tuple(round(x, 2) for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
              f"total {time.perf_counter() - t0:.0f} s", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"samples": b.samples, **summary}, indent=1) + "\n")
        return 2 if any(s["check"] == "MISMATCH" for s in b.samples) else 0
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        for p in list(b.procs):
            b.stop(p)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
