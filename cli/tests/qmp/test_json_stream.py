"""The monitor's JSON input against qemu-storage-daemon's, byte for byte:
the same corpus of malformed input gets the same error replies from
both, in number, order and text (QEMU's lexer recovers from garbage at
structural characters, control bytes and 0xFE/0xFF; its streamer limits
nesting to 1024 and a value to 2 Mi tokens; its parser words each
error). Each payload is followed by 0xFF (which resets both parsers with
one more error) and a sentinel request, all sent before any reply is read:
the daemon must keep reading while its replies pile up (a megabyte of
random bytes earns about 9 MB of replies).

The 64 MiB token limit is not compared here (QEMU reads its monitor
slowly: minutes for 64 MiB); src/qmp/json_stream.rs pins it with QEMU's
text, and benches/monitor_abuse.py times a 64 MiB request on both."""

import json
import random
import socket

import pytest

from conftest import KINDS, Daemon, assert_same

SENTINEL = b'\xff{"execute": "query-version", "id": "sentinel"}\n'

R = random.Random(17)
CORPUS = {
    "64 KiB of random bytes": R.randbytes(1 << 16),
    "1 MiB of random bytes": R.randbytes(1 << 20),
    "JSON-ish garbage": bytes(R.choice(b'{}[]:,"\'\\ abcxyz019-.eE+\n\t\x01\xc3\xa9\xff')
                              for _ in range(1 << 16)),
    "invalid UTF-8": b'{"execute": "query-\xff\xfe"}\n{"execute": "query-jobs", "id": "\xc3\x28"}\n'
                     b'"\xed\xa0\x80" "\xc0\xaf" "\xf4\x90\x80\x80" "\xef\xbf\xbf" "\xf0\x9f\x98\x80"\n'
                     b'\xc3\xa9 \x80\x80 x\xc3 "\xc0\x80"',
    "escapes": b'"\\uzz" "\\ud800\\u0041" "\\udbff\\udfff" "\\u0000" "\\uFDD0" "\\q" "\\u12" '
               b'\'\\\'\' "\\/"',
    "numbers": b'01 -0 -01 1. 1.5e 1e+ 2e5 -x 18446744073709551616 -9223372036854775809 0.1e-3',
    "keywords": b"tru true falsey nul null abc ABC",
    "stray closers and separators": b'] } : , [} [}] {] ]] {"a":1,} [1,] {,} {"a"} {"a":}',
    "unterminated strings": b'"abc\n\'def\n"ghi\x01 {"execute": "query-jobs", "id": "x\n',
    "nesting past 1024": b"[" * 5000 + b"]" * 5000 + b"\n" + b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "duplicate keys and separators": b'{"a":1,"a":2} {"b":[1 2]} {"c" 1}',
    "too many tokens": b"[" + b"0," * (1 << 20) + b"0]",
    "control bytes": bytes(range(0, 32)) + b'"a\tb"',
    "QMP object checks": b'{"id":1} {"a":{"a":1}} {"execute":1} {"execute":"query-jobs","x":1} '
                         b'{"execute":"query-jobs","arguments":[]} [] 5 "s"',
}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    ds = {kind: Daemon(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}
    yield ds
    for d in ds.values():
        alive = d.alive()
        d.kill()
        assert alive, f"{d.kind} died: {d.stderr()}"


def replies(d, payload):
    """Everything before the sentinel's reply (the whole payload is sent
    first); each reply as its error text or, for a return, its JSON."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.sock))
    s.settimeout(60)
    f = s.makefile("rb")
    assert b"QMP" in f.readline()
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    s.sendall(payload + SENTINEL)
    got = []
    while True:
        line = f.readline()
        assert line, f"{d.kind}: EOF after {len(got)} replies"
        m = json.loads(line)
        if m.get("id") == "sentinel":
            break
        got.append(m["error"]["desc"] if set(m) == {"error"} else json.dumps(m))
    s.close()
    return got


@pytest.mark.parametrize("label", list(CORPUS))
def test_same_error_replies_as_qemu(label, daemons):
    out = {kind: replies(d, CORPUS[label]) for kind, d in daemons.items()}
    # The final 0xFF is an error on both: the input was parsed to its end.
    assert out["qemu"][-1] == "JSON parse error, stray '\ufffd'", out["qemu"][-3:]
    assert_same(label, out["qemu"], out["ours"])
