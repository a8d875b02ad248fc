"""Fuzz-style robustness of `blockjob daemon` (ours only; bounded and
seeded: QMP_FUZZ_SEED, QMP_FUZZ_SECONDS): while a mirror runs, several
connections send malformed and random QMP (bad JSON, huge numbers, 10000-deep
nesting, wrong types for every argument of every command in
query-commands, unknown commands, invalid UTF-8, random mutations of valid
requests), and other clients close mid-command. Checked: every curated bad
request gets an error reply, every reply is a well-formed QMP message, a
request after the garbage is still answered (with its id), the daemon never
dies, the job is never lost (query-jobs lists it, its events are only
created/running/ready) and it completes normally at the end with the
target equal to the source."""

import asyncio
import json
import os
import random
import socket
import struct
import time

from conftest import Daemon, blockdev_args, connect, raw_image, raw_node
from test_wrong_types import probes

SEED = int(os.environ.get("QMP_FUZZ_SEED", "6"))
SECONDS = float(os.environ.get("QMP_FUZZ_SECONDS", "12"))
WORKERS = 4


def curated(schema, commands):
    """(label, bytes, may_return): inputs that must get an error reply
    (may_return: a valid odd request, any well-formed reply will do)."""
    out = []
    for b in [b"{", b"}", b'{"execute"}', b'{"execute":}', b'{"execute" "x"}', b"[1,]",
              b'{"a":1,}', b"nul", b"tru", b"'single'", b'{"execute":"query-jobs",}',
              b"\x00", b'{"execute":"query-jobs"}}', b"01", b"1e", b"-", b'"\\q"',
              b'"\\u12"', b'"\\ud800"', b"[]", b"5", b'"str"', b"null", b"{}",
              b'{"execute": 5}', b'{"arguments": {}}', b'{"execute":"query-jobs","arguments":[]}',
              b'{"execute":"query-jobs","exec-oob":"query-jobs"}',
              b'{"exec-oob":"query-jobs"}', b'{"execute":"query-jobs","extra":1}',
              ]:
        out.append((f"bad JSON/QMP {b[:30]!r}", b + b"\n", False))
    # (`control`: QEMU refuses it, we accept it: test_malformed.py.)
    out.append(("control member", b'{"execute":"query-jobs","control":{}}\n', True))
    for n in ["1e400", "-1e400", str(2 ** 64), str(2 ** 200), str(-(2 ** 200)), "1e-400",
              "123456789012345678901234567890.0", "9" * 5000]:
        out.append((f"huge number {n[:20]}", b'{"execute":"block-job-set-speed","arguments":'
                    b'{"device":"nosuch","speed":' + n.encode() + b"}}\n", False))
        out.append((f"huge number id {n[:20]}",
                    b'{"execute":"query-jobs","id":' + n.encode() + b"}\n", True))
    deep_a = b"[" * 10000 + b"]" * 10000
    deep_o = b'{"a":' * 10000 + b"1" + b"}" * 10000
    out += [("deep array", deep_a + b"\n", False),
            ("deep object", deep_o + b"\n", False),
            ("deep arguments", b'{"execute":"query-jobs","arguments":{"x":' + deep_a + b"}}\n",
             False),
            ("deep id", b'{"execute":"query-jobs","id":' + deep_o + b"}\n", False),
            ("deep unclosed", b"[" * 10000 + b"\n", False)]
    for b in [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
              b"\x80", b"\xfe\xff"]:
        out += [(f"invalid UTF-8 {b!r} in execute", b'{"execute":"query-' + b + b'"}\n', False),
                (f"invalid UTF-8 {b!r} in id", b'{"execute":"query-jobs","id":"' + b + b'"}\n',
                 False),
                (f"invalid UTF-8 {b!r} in an argument",
                 b'{"execute":"block-job-pause","arguments":{"device":"' + b + b'"}}\n', False),
                (f"invalid UTF-8 {b!r} alone", b + b"\n", False)]
    rnd = random.Random(SEED)
    for i in range(20):
        name = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz-_")
                       for _ in range(rnd.randint(1, 40)))
        out.append((f"unknown command {name}", json.dumps({"execute": "x-" + name}).encode()
                    + b"\n", False))
    for name, label, args in probes(commands, schema):
        out.append((f"{name} {label}", json.dumps({"execute": name, "arguments": args}).encode()
                    + b"\n", name.startswith("query-")))
    return out


SEEDS = [
    {"execute": "query-jobs"}, {"execute": "query-block-jobs"},
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    {"execute": "query-version", "id": 7}, {"execute": "query-commands", "id": {"a": [1]}},
    {"execute": "block-job-set-speed", "arguments": {"device": "nosuch", "speed": 1}},
    {"execute": "block-job-cancel", "arguments": {"device": "nosuch", "force": True}},
    {"execute": "job-dismiss", "arguments": {"id": "nosuch"}},
    {"execute": "blockdev-mirror", "arguments": {"job-id": "fz", "device": "nosuch",
                                                 "target": "nosuch2", "sync": "full",
                                                 "granularity": 65536, "speed": 0}},
    {"execute": "block-stream", "arguments": {"job-id": "fz", "device": "nosuch"}},
    {"execute": "block-commit", "arguments": {"job-id": "fz", "device": "nosuch"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "fznode",
                                              "size": 1048576}},
    {"execute": "blockdev-del", "arguments": {"node-name": "nosuch"}},
    {"execute": "block-dirty-bitmap-add", "arguments": {"node": "nosuch", "name": "b"}},
    {"execute": "block-dirty-bitmap-merge",
     "arguments": {"node": "nosuch", "target": "b",
                   "bitmaps": ["a", {"node": "n", "name": "c"}]}},
]


def mutate(rnd, data):
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(8)
        pos = rnd.randrange(len(b) + 1)
        if op == 0 and b:  # flip
            b[min(pos, len(b) - 1)] = rnd.randrange(256)
        elif op == 1:  # insert a random or special byte
            b[pos:pos] = bytes([rnd.choice([rnd.randrange(256), 0x22, 0x7b, 0x7d, 0x5b, 0x5d,
                                            0x5c, 0x2c, 0x3a, 0x80, 0xff, 0x00])])
        elif op == 2 and b:  # delete a slice
            del b[pos:pos + rnd.randint(1, 8)]
        elif op == 3:  # truncate
            del b[pos:]
        elif op == 4:  # duplicate a slice
            s = b[pos:pos + rnd.randint(1, 30)]
            b[pos:pos] = s
        elif op == 5:  # a huge number
            b[pos:pos] = rnd.choice([b"1e999", b"18446744073709551616", b"-0", b"1.5", b"9" * 400])
        elif op == 6:  # nesting
            d = rnd.choice([10, 1000, 10000])
            b[pos:pos] = rnd.choice([b"[" * d + b"]" * d, b"[" * d, b"{" * d])
        else:  # splice another request in
            other = json.dumps(rnd.choice(SEEDS)).encode()
            b[pos:pos] = other[: rnd.randrange(len(other) + 1)]
    # No newline inside (one input per line); never a `quit`.
    return bytes(b).replace(b"\n", b" ").replace(b"quit", b"qu1t")


def check_message(m, where):
    assert isinstance(m, dict), (where, m)
    if "event" in m:
        assert set(m) == {"event", "data", "timestamp"} or set(m) == {"event", "timestamp"}, m
        ts = m["timestamp"]
        assert isinstance(ts["seconds"], int) and isinstance(ts["microseconds"], int), m
        return "event"
    if "error" in m:
        assert set(m) <= {"error", "id"}, (where, m)
        assert isinstance(m["error"]["class"], str) and isinstance(m["error"]["desc"], str), m
        assert m["error"]["desc"], m
        return "error"
    assert set(m) <= {"return", "id"} and "return" in m, (where, m)
    return "return"


class RawClient:
    def __init__(self, reader, writer):
        self.r, self.w = reader, writer
        self.n = 0
        self.events = []

    @classmethod
    async def open(cls, sock):
        r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 24)
        c = cls(r, w)
        greeting = json.loads(await c.r.readline())
        assert "QMP" in greeting
        w.write(b'{"execute":"qmp_capabilities"}\n')
        assert json.loads(await c.r.readline()) == {"return": {}}
        return c

    async def read(self, timeout):
        line = await asyncio.wait_for(self.r.readline(), timeout)
        assert line, "connection closed by the daemon"
        assert line.endswith(b"\r\n"), line[-20:]
        return json.loads(line)

    async def send_and_sync(self, data, label):
        """Send `data`, then a sentinel; the replies before the sentinel's.
        If the parser is still inside an unfinished value (unbalanced
        brackets: QEMU waits there too), reset it with a 0xff byte (an
        error in any state, for QEMU as for us) and sync again."""
        self.n += 1
        sid = f"sync-{self.n}"
        self.w.write(data + b'\n{"execute":"query-version","id":"' + sid.encode() + b'"}\n')
        await self.w.drain()
        got = []
        timeout = 1.0
        reset = False
        while True:
            try:
                m = await self.read(timeout)
            except asyncio.TimeoutError:
                assert not reset, f"{label}: no reply to the sentinel after a reset"
                reset = True
                self.w.write(b'\xff\n{"execute":"query-version","id":"' + sid.encode() + b'"}\n')
                continue
            kind = check_message(m, label)
            if kind == "event":
                self.events.append(m)
                continue
            if m.get("id") == sid:
                assert kind == "return" and m["return"]["qemu"]["major"] == 10, m
                return got, reset
            got.append(m)


async def fuzz_worker(sock, inputs, deadline, stats):
    c = await RawClient.open(sock)
    for label, data, may_return in inputs:
        if time.monotonic() > deadline:
            break
        got, reset = await c.send_and_sync(data.rstrip(b"\n"), label)
        stats["inputs"] += 1
        stats["replies"] += len(got)
        stats["resets"] += reset
        if may_return is None:
            continue  # a random mutation: any well-formed replies
        errors = [m for m in got if "error" in m]
        if not may_return:
            # (An input may hold a valid request before its garbage.)
            assert errors, f"{label}: no error reply ({got})"
        else:
            assert got, f"{label}: no reply"
    c.w.close()
    return c.events


async def closer(sock, rnd, deadline, stats):
    """Clients that go away at awkward moments."""
    big = b'{"execute":"query-jobs","arguments":{"x":"' + b"a" * (1 << 20) + b'"}}\n'
    while time.monotonic() < deadline:
        how = rnd.randrange(7)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.setblocking(True)
        s.settimeout(5)
        try:
            if how == 0:
                pass  # before reading the greeting
            else:
                s.recv(1)  # part of the greeting
                if how >= 2:
                    s.sendall(b'{"execute":"qmp_capabilities"}\n')
                if how == 3:
                    s.sendall(b'{"execute": "query-named-block-')
                elif how == 4:
                    s.sendall(b'{"execute":"query-named-block-nodes"}\n' * 200)
                elif how == 5:
                    s.sendall(big[: rnd.randrange(len(big))])
                elif how == 6:
                    s.sendall(b'{"execute":"blockdev-add","arguments":{"driver":"null-co",'
                              b'"node-name":"cl%d"}}\n{"execute":"query-jobs"}\n'
                              % stats["closes"])
                    # Reset instead of an orderly close.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()
        stats["closes"] += 1
        await asyncio.sleep(0.005)


def test_fuzz_daemon_survives_and_keeps_job(tmp_path):
    rnd = random.Random(SEED)
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.raw"
    raw_image(src)
    raw_image(tgt, fill=0)
    schema_dir = tmp_path / "schema"
    schema_dir.mkdir()
    d = Daemon("ours", tmp_path, blockdev_args(raw_node("src", src), raw_node("tgt", tgt)))

    async def main():
        # QEMU's schema gives every argument of every command we list.
        q = Daemon("qemu", schema_dir)
        try:
            qc = await connect(q.sock, "schema")
            schema = {e["name"]: e for e in await qc.execute("query-qmp-schema")}
            await qc.disconnect()
        finally:
            q.kill()
        watcher = await connect(d.sock, "watcher")
        commands = [c["name"] for c in await watcher.execute("query-commands")]
        await watcher.execute("blockdev-mirror", {"job-id": "job0", "device": "src",
                                                  "target": "tgt", "sync": "full",
                                                  "speed": 1 << 20})
        inputs = curated(schema, commands)
        rnd.shuffle(inputs)
        mutations = [(f"mutation {i}", mutate(rnd, json.dumps(rnd.choice(SEEDS)).encode()), None)
                     for i in range(3000)]
        stats = {"inputs": 0, "replies": 0, "resets": 0, "closes": 0}
        deadline = time.monotonic() + SECONDS
        shares = [inputs[i::WORKERS] + mutations[i::WORKERS] for i in range(WORKERS)]
        results = await asyncio.gather(
            *(fuzz_worker(d.sock, share, deadline, stats) for share in shares),
            closer(d.sock, rnd, deadline, stats))
        assert d.alive(), d.stderr()
        # All curated inputs were sent (the time budget is for mutations).
        assert stats["inputs"] >= len(inputs), stats
        # The job: still there, only its normal states, then it completes.
        jobs = await watcher.execute("query-jobs")
        assert [j["id"] for j in jobs] == ["job0"], jobs
        seen = []
        while not watcher.events.empty():
            seen.append(await watcher.events.get())
        for ev_list in results[:-1]:
            for ev in ev_list:
                assert ev["event"] in ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY"), ev
        statuses = [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"]
        assert statuses in (["created", "running"], ["created", "running", "ready"]), statuses
        async def until(name):
            while (ev := await asyncio.wait_for(watcher.events.get(), 15))["event"] != name:
                pass
            return ev

        if "ready" not in statuses:
            await until("BLOCK_JOB_READY")
        await watcher.execute("block-job-complete", {"device": "job0"})
        ev = await until("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"], ev
        assert ev["data"]["offset"] == ev["data"]["len"] == 4 << 20, ev
        try:
            await watcher.execute("quit")
            await watcher.disconnect()
        except EOFError:
            pass  # the daemon may close first (QEMU does too), as in test_load
        return stats

    try:
        stats = asyncio.run(main())
        print(f"fuzz (seed {SEED}): {stats}")
        assert d.wait() == 0, d.stderr()
        assert not d.sock.exists()
        assert tgt.read_bytes() == src.read_bytes()
    finally:
        d.kill()
