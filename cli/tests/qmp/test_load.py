"""Load: 50 QMP clients (qemu.qmp) connected to `blockjob daemon` at once,
each issuing query-block-jobs / query-jobs / query-named-block-nodes in a
loop while a speed-limited mirror runs (about 4 s). Every answer must be
well-formed and consistent (the job listed, its offset never going back
for any client, len and type right), the job must reach READY and complete
normally afterwards, and every client must get BLOCK_JOB_COMPLETED."""

import asyncio
import time

from conftest import SIZE, Daemon, blockdev_args, connect, raw_image, raw_node

CLIENTS = 50


async def querier(qmp, stop, stats):
    last_offset = 0
    last_progress = 0
    n = 0
    sized = False
    while not stop.is_set():
        bj = await qmp.execute("query-block-jobs")
        assert len(bj) == 1, bj
        j = bj[0]
        assert j["device"] == "job0" and j["type"] == "mirror", j
        # The job sizes its work on its own thread once it runs (QEMU's
        # mirror_run, after blockdev-mirror returned): until then len and
        # offset are 0; once sized, it stays.
        sized = sized or j["len"] == SIZE
        assert j["len"] == SIZE or (not sized and j["len"] == 0 == j["offset"]), j
        assert j["io-status"] == "ok" and j["paused"] is False, j
        assert j["status"] in ("running", "ready"), j
        assert last_offset <= j["offset"] <= SIZE, (last_offset, j)
        assert j["ready"] == (j["status"] == "ready"), j
        last_offset = j["offset"]
        jobs = await qmp.execute("query-jobs")
        assert [x["id"] for x in jobs] == ["job0"], jobs
        p = jobs[0]["current-progress"]
        assert last_progress <= p <= jobs[0]["total-progress"], (last_progress, jobs)
        last_progress = p
        nodes = await qmp.execute("query-named-block-nodes")
        names = {x["node-name"] for x in nodes}
        assert {"src", "tgt"} <= names, names
        n += 3
    stats["answers"] += n
    stats["min_per_client"] = min(stats.get("min_per_client", n), n)


async def wait_event(qmp, name, timeout=30):
    seen = []
    while True:
        ev = await asyncio.wait_for(qmp.events.get(), timeout)
        seen.append(ev)
        if ev["event"] == name:
            return ev, seen


def test_fifty_clients_query_while_mirror_runs(tmp_path):
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.raw"
    raw_image(src)
    raw_image(tgt, fill=0)
    d = Daemon("ours", tmp_path, blockdev_args(raw_node("src", src), raw_node("tgt", tgt)))

    async def main():
        clients = await asyncio.gather(*(connect(d.sock, f"c{i}") for i in range(CLIENTS)))
        ctl = clients[0]
        stop = asyncio.Event()
        stats = {"answers": 0}
        t0 = time.monotonic()
        await ctl.execute("blockdev-mirror", {"job-id": "job0", "device": "src", "target": "tgt",
                                              "sync": "full", "speed": 1 << 20})
        tasks = [asyncio.create_task(querier(c, stop, stats)) for c in clients]
        # Every client sees READY (events go to every monitor).
        for c in clients:
            ev, _ = await wait_event(c, "BLOCK_JOB_READY")
            assert ev["data"]["offset"] == ev["data"]["len"] == SIZE, ev
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.3)  # some queries in the READY state too
        stop.set()
        await asyncio.gather(*tasks)
        assert d.alive(), d.stderr()
        await ctl.execute("block-job-complete", {"device": "job0"})
        for c in clients:
            ev, seen = await wait_event(c, "BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"], ev
            assert ev["data"]["offset"] == SIZE, ev
            # Only the normal lifecycle on every client.
            names = [e["event"] for e in seen]
            assert set(names) <= {"JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"}, names
        for c in clients:
            ev, _ = await wait_event(c, "JOB_STATUS_CHANGE")  # concluded
            ev, _ = await wait_event(c, "JOB_STATUS_CHANGE")
            assert ev["data"]["status"] == "null", ev
        assert await clients[-1].execute("query-jobs") == []
        for c in clients[1:]:
            await c.disconnect()
        try:
            await ctl.execute("quit")
            await ctl.disconnect()
        except EOFError:
            pass  # the daemon may close first
        return stats, elapsed

    try:
        stats, elapsed = asyncio.run(main())
        print(f"load: {stats}, mirror to READY in {elapsed:.1f} s")
        # The mirror lasted a few seconds under the load (speed 1 MiB/s).
        assert elapsed > 2, elapsed
        assert stats["min_per_client"] >= 3, stats
        assert d.wait() == 0, d.stderr()
        assert tgt.read_bytes() == src.read_bytes()
    finally:
        d.kill()
