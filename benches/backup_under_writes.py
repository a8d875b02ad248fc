#!/usr/bin/env python3
"""Guest write latency through copy-before-write during a full backup:
ours vs QEMU.

For each rate x run, with a fresh, fully allocated random source (a copy of
one template) and a sparse raw target of the same size, in --dir:

  ours  target/release/examples/backup_bench under-writes (release build):
        the guest is a BlockBackend on the source node, written from a
        thread of that process
  qemu  qemu-storage-daemon over QMP; the guest is an NBD export of the
        source node (nbd-server-start + block-export-add writable=true),
        written by the minimal NBD client of mirror_under_writes.py. When
        blockdev-backup starts, QEMU inserts its copy-before-write filter
        above "src" and moves the export's BlockBackend onto it, so the NBD
        writes go through the filter (checked on every run with
        x-debug-query-block-graph: "via filter" in the table)

Both sides run mirror_under_writes.py's paced writer (imported; the Rust
side is examples/common): write i of --io-size bytes is issued at start +
i * io_size / rate (immediately when late), at the offset and with the fill
byte of draw i of a splitmix64 sequence (seed --seed; checked to be the
same sequence on both sides). Phases:

  baseline  --baseline s of writes, no job
  job       blockdev-backup (sync=full, defaults otherwise) sent ..
            BLOCK_JOB_COMPLETED: every write goes through copy-before-write,
            which first copies the old data of each cluster the write
            touches that the job has not copied yet
  after     --after s of writes after BLOCK_JOB_COMPLETED (filter gone)

  latency   wall time of each guest write, p50/p99 per phase (µs). QEMU's
            includes the NBD round trip over a unix socket through a Python
            client (tens of µs more than ours' in-process call even without
            a job), so the two sides' absolute latencies are not comparable:
            compare each side's job phase with its own baseline. The table
            gives both the ratio (job/baseline) and the difference
            (job - baseline, µs: the time copy-before-write and the job add
            to a write; the comparison the target uses, since a ratio
            favours the side with the larger fixed cost). Percentiles are
            nearest-rank: with under 100 writes in the job phase (a guest
            the job throttles) p99 is the maximum; "writes during job"
            shows how many there were.
  achieved  MiB/s the writer got during the job (a writer that falls
            behind catches up at once, so less than the rate means the job
            throttled the guest)
  job s     blockdev-backup to BLOCK_JOB_COMPLETED under the writes (QEMU:
            COMPLETED as received by this script)
  check     after each run (untimed): the target must hold the source as
            it was when the job started: the template plus the baseline
            writes (the writes from the last one issued before
            blockdev-backup was sent to the last one issued before it
            returned may land on either side of the job's start: each block
            they touch may hold any of their states)

Target (issue #15): ours' guest p99 under copy-before-write no worse than
QEMU's, i.e. ours' (job p99 - baseline p99) <= QEMU's.

Usage:
  python3 benches/backup_under_writes.py [--size 1G] [--dir /dev/shm]
      [--rates 50] [--io-size 65536] [--repeat 3] [--baseline 3] [--after 1]
      [--speed BYTES/S] [--max-workers N] [--impls ours,qemu] [--timeout 120] [--no-build]
      [--json out.json]
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
import tempfile
import time
from pathlib import Path

from benchlib import MiB, QemuDaemon, kill_daemons, log, size_parser
from mirror_under_writes import (PHASES as MUW_PHASES, Nbd, PacedWriter, WriteSeq,
                                 check_sequence_matches, export_via_filter, make_template,
                                 phase_stats)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "target" / "release" / "examples" / "backup_bench"
PHASES = ("baseline", "job", "after")
assert len(PHASES) == len(MUW_PHASES)


def run_ours(a, rate: float, src: Path, dst: Path) -> dict:
    argv = [str(EXAMPLE), "under-writes", "--src", str(src), "--dst", str(dst),
            "--rate-mib", str(rate), "--io-size", str(a.io_size), "--seed", str(a.seed),
            "--baseline-secs", str(a.baseline), "--after-secs", str(a.after),
            "--timeout-secs", str(a.timeout), "--speed", str(a.speed),
            "--max-workers", str(a.max_workers)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout + 60,
                       stdin=subprocess.DEVNULL)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    r = json.loads(lines[-1]) if lines else {}
    if p.returncode != 0 or "error" in r:
        raise RuntimeError(f"backup_bench failed ({p.returncode}): {r.get('error')} {p.stderr.strip()}")
    r["via_filter"] = True  # a BlockBackend on a node always writes through its filters
    return r


def run_qemu(a, rate: float, src: Path, dst: Path, work: Path, size: int) -> dict:
    d = QemuDaemon("qemu-storage-daemon", work, "qsd", a.timeout)
    nbd = writer = None
    nbd_path = work / "nbd.sock"
    try:
        for name, path in (("src", src), ("tgt", dst)):
            d.cmd("blockdev-add", {"driver": "raw", "node-name": name,
                                   "file": {"driver": "file", "filename": str(path)}})
        # QEMU 10: nbd-server-start takes a SocketAddressLegacy.
        d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_path)}}})
        d.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "name": "src",
                                   "writable": True})
        nbd = Nbd(str(nbd_path), "src")
        if nbd.size != size:
            raise RuntimeError(f"export size {nbd.size} != {size}")
        writer = PacedWriter(nbd.write, size, a.io_size, rate, a.seed)
        t_start = time.perf_counter()
        writer.start()
        time.sleep(a.baseline)

        writer.phase = 1
        c0 = d.cpu_ticks()
        t_job = time.perf_counter()
        args = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}
        if a.speed:
            args["speed"] = a.speed
        if a.max_workers:
            args["x-perf"] = {"max-workers": a.max_workers}
        d.cmd("blockdev-backup", args)
        issued_at_start = writer.issued  # the filter is in: later writes go through it
        via = export_via_filter(d.cmd("x-debug-query-block-graph"), "src")
        e = d.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), "BLOCK_JOB_COMPLETED", "b")
        t_done = e["_t"]
        c1 = d.cpu_ticks()
        if e["event"] != "BLOCK_JOB_COMPLETED" or "error" in e["data"]:
            raise RuntimeError(f"backup failed: {e}")
        writer.phase = 2
        time.sleep(a.after)
        t_stop = time.perf_counter()
        writer.phase = 3
        writer.join()
        if writer.error:
            raise writer.error
        secs = (t_job - t_start, t_done - t_job, t_stop - t_done)
        return {
            "impl": "qemu", "rate_mib": rate, "io_size": a.io_size, "size": size,
            "job_seconds": t_done - t_job,
            "cpu_seconds": (c1 - c0) / os.sysconf("SC_CLK_TCK"),
            "offset": e["data"].get("offset"), "len": e["data"].get("len"),
            "via_filter": via, "issued_at_start": issued_at_start,
            "lat_us": {ph: phase_stats(writer.samples[i], secs[i], a.io_size)
                       for i, ph in enumerate(PHASES)},
        }
    finally:
        if writer is not None and writer.is_alive():
            writer.phase = 3
            writer.join(timeout=10)
        if nbd is not None:
            try:
                nbd.close()
            except OSError:
                pass
        d.close()


def check_point_in_time(template: Path, target: Path, size: int, io_size: int, seed: int,
                        k_lo: int, k_hi: int) -> bool:
    """Does `target` hold the template plus the first k writes, for a k in
    [k_lo, k_hi] (checked block by block)? Write k_lo - 1 and earlier ones
    ended before the job was started, writes k_hi and later ones started
    after blockdev-backup had returned (the filter in place)."""
    seq = WriteSeq(seed, size, io_size)
    draws = [seq.next() for _ in range(k_hi)]
    state: dict[int, int] = {}
    for off, b in draws[:k_lo]:
        state[off] = b
    # Acceptable fill bytes (None: the template) of the ambiguous blocks.
    ok: dict[int, set] = {}
    for off, b in draws[k_lo:k_hi]:
        ok.setdefault(off, {state.get(off)}).add(b)
    chunk = 4 * MiB
    with open(template, "rb") as ft, open(target, "rb") as fd:
        for base in range(0, size, chunk):
            t, g = ft.read(chunk), fd.read(chunk)
            if t == g and not any(base <= o < base + chunk for o in ok) \
                    and not any(base <= o < base + chunk for o in state):
                continue
            for off in range(base, base + len(t), io_size):
                got = g[off - base:off - base + io_size]
                want = ok.get(off, {state.get(off)})
                fits = any((got == t[off - base:off - base + io_size]) if b is None
                           else got == bytes((b,)) * io_size for b in want)
                if not fits:
                    seq2 = WriteSeq(seed, size, io_size)
                    hits = [(i - k_lo, b) for i in range(k_hi + 2000)
                            for o, b in (seq2.next(),) if o == off]
                    what = (f"fill {got[0]}" if got == got[:1] * io_size else
                            "template data" if got == t[off - base:off - base + io_size] else "mixed")
                    log(f"target differs at {off}: expected fill {want} (None: template), got {what}; "
                        f"writes there (index - {k_lo}, fill; ambiguous up to {k_hi - k_lo}): {hits}")
                    return False
    return True


def fmt(ph: dict | None) -> str:
    if not ph or ph.get("p50") is None:
        return "-"
    return f"{ph['p50']:.0f} / {ph['p99']:.0f}"


def derived(r: dict) -> dict:
    b, j = r["lat_us"]["baseline"], r["lat_us"]["job"]
    if b.get("p50") is None or j.get("p50") is None:
        return {}
    return {"ratio_p50": j["p50"] / b["p50"], "ratio_p99": j["p99"] / b["p99"],
            "added_p50": j["p50"] - b["p50"], "added_p99": j["p99"] - b["p99"]}


def row(r: dict) -> str:
    if r.get("failed"):
        return f"| {r['rate_mib']:g} | {r['impl']} | FAILED: {r['failed']} |" + " |" * 10
    dv = derived(r)
    j = r["lat_us"]["job"]
    ach = "-" if j.get("mib_s") is None else f"{j['mib_s']:g}"
    rat = "-" if not dv else f"{dv['ratio_p50']:.2f} / {dv['ratio_p99']:.2f}"
    add = "-" if not dv else f"{dv['added_p50']:+.0f} / {dv['added_p99']:+.0f}"
    jmax = "-" if j.get("max") is None else f"{j['max']:.0f}"
    jn = "-" if j.get("n") is None else f"{j['n']:.0f}"
    return (f"| {r['rate_mib']:g} | {r['impl']} | {r['job_seconds']:.2f} "
            f"| {fmt(r['lat_us']['baseline'])} | {fmt(j)} | {jmax} | {jn} | {rat} | {add} | {ach} "
            f"| {fmt(r['lat_us']['after'])} | {str(r.get('via_filter')).lower()} "
            f"| {'ok' if r.get('check') else 'MISMATCH'} |")


def median_row(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        return rows[0]

    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None
    return {
        "impl": ok[0]["impl"], "rate_mib": ok[0]["rate_mib"],
        "job_seconds": med(r["job_seconds"] for r in ok),
        "via_filter": all(r.get("via_filter") for r in ok),
        "check": all(r.get("check") for r in ok) and len(ok) == len(rows),
        "lat_us": {ph: {k: med(r["lat_us"][ph][k] for r in ok)
                        for k in ("p50", "p99", "max", "n", "mib_s")}
                   for ph in PHASES},
    }


HEADER = ("| rate MiB/s | impl | job s | lat baseline p50 / p99 | lat during job p50 / p99 "
          "| max during job | writes during job | job/baseline p50 / p99 "
          "| job − baseline p50 / p99 µs | achieved MiB/s during job "
          "| lat after p50 / p99 | via filter | check |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", type=size_parser(MiB), default=1 << 30, help="image size (default 1G)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    ap.add_argument("--rates", default="50", help="guest write rates, MiB/s, comma separated")
    ap.add_argument("--io-size", type=int, default=65536, help="bytes per guest write")
    ap.add_argument("--impls", default="ours,qemu", help="which sides to run, comma separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs per rate x impl (default 3)")
    ap.add_argument("--baseline", type=float, default=3, help="s of writes before the job")
    ap.add_argument("--after", type=float, default=1, help="s of writes after COMPLETED")
    ap.add_argument("--speed", type=int, default=0, help="backup speed limit, bytes/s (0: none)")
    ap.add_argument("--max-workers", type=int, default=0,
                    help="x-perf max-workers of both backups (0: the default, 64)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120, help="s to wait for the job")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args()
    size = a.size
    rates = [float(x) for x in a.rates.split(",") if x]
    impls = [i for i in a.impls.split(",") if i]
    if size % a.io_size:
        ap.error("--size must be a multiple of --io-size")
    if any(i not in ("ours", "qemu") for i in impls):
        ap.error("--impls: ours, qemu")
    for tool in ("qemu-storage-daemon",):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(kill_daemons)

    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "backup_bench"],
                       cwd=REPO, check=True)
    check_sequence_matches(size, a.io_size, a.seed, [str(EXAMPLE), "under-writes"])

    work = Path(tempfile.mkdtemp(prefix="backup-under-writes.", dir=a.dir))
    atexit.register(shutil.rmtree, work, True)
    template, src, dst = work / "template.raw", work / "src.raw", work / "dst.raw"
    log(f"creating a {size} byte random source in {work}")
    make_template(str(template), size, a.seed)
    loadavg = os.getloadavg()

    results = []
    for rate in rates:
        for run, impl in [(i, x) for i in range(a.repeat) for x in impls]:
            for p in (src, dst):
                p.unlink(missing_ok=True)
            shutil.copyfile(template, src)
            with open(dst, "wb") as f:
                f.truncate(size)
            log(f"{impl}: full backup under {rate:g} MiB/s of writes (run {run + 1}) ...")
            try:
                r = run_ours(a, rate, src, dst) if impl == "ours" else \
                    run_qemu(a, rate, src, dst, work, size)
                if r.get("offset") != size:
                    raise RuntimeError(f"COMPLETED offset {r.get('offset')} != {size}")
                n0 = r["lat_us"]["baseline"]["n"]
                r["check"] = check_point_in_time(template, dst, size, a.io_size, a.seed,
                                                 max(n0 - 1, 0), max(r["issued_at_start"], n0))
            except Exception as e:  # record and go on with the other runs
                log(f"{impl} {rate:g}: {e}")
                r = {"impl": impl, "rate_mib": rate, "failed": str(e)}
            r["run"] = run
            log(json.dumps(r))
            results.append(r)

    print(f"\nGuest writes through copy-before-write during blockdev-backup sync=full: "
          f"{size / MiB:g} MiB raw in {a.dir}, {a.io_size} B random writes, seed {a.seed}"
          f"{f', speed {a.speed} B/s' if a.speed else ''}"
          f"{f', x-perf max-workers {a.max_workers}' if a.max_workers else ''}; latency in µs; "
          f"ours = in-process BlockBackend, QEMU = NBD export + Python client "
          f"(compare each side with its own baseline).\n")
    print(HEADER)
    for r in results:
        print(row(r))
    groups: dict = {}
    for r in results:
        groups.setdefault((r["rate_mib"], r["impl"]), []).append(r)
    meds = {k: median_row(v) for k, v in groups.items()}
    if a.repeat > 1:
        print(f"\nMedians over {a.repeat} runs (per column):\n")
        print(HEADER)
        for m in meds.values():
            print(row(m))
    print()
    for rate in rates:
        o, q = meds.get((rate, "ours")), meds.get((rate, "qemu"))
        if o and q and not o.get("failed") and not q.get("failed"):
            do, dq = derived(o), derived(q)
            if do and dq:
                ok = do["added_p99"] <= dq["added_p99"]
                print(f"- {rate:g} MiB/s: p99 added by the job: ours {do['added_p99']:+.0f} µs, "
                      f"QEMU {dq['added_p99']:+.0f} µs (target ours <= QEMU: "
                      f"{'PASS' if ok else 'FAIL'}); job/baseline p99: ours {do['ratio_p99']:.2f}, "
                      f"QEMU {dq['ratio_p99']:.2f}; job s: ours {o['job_seconds']:.2f}, "
                      f"QEMU {q['job_seconds']:.2f}")
    print(f"- load average: start {tuple(round(x, 2) for x in loadavg)}, "
          f"end {tuple(round(x, 2) for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    bad = [r for r in results if r.get("failed") or not r.get("check")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
