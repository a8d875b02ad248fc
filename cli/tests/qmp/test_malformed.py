"""Malformed input on the wire, against qemu-storage-daemon and ours: what
QEMU does with invalid UTF-8 and deep nesting (it answers errors and keeps
the connection; so must we), and known differences in its recovery."""

import json
import socket

import pytest

from conftest import KINDS, Daemon, assert_same

SENTINEL = b'{"execute": "query-version", "id": "sentinel"}\n'


def session(d):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.sock))
    s.settimeout(10)
    f = s.makefile("rb")
    assert b"QMP" in f.readline()
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


def replies_until_sentinel(payload, daemons, timeout=3):
    """Send payload then the sentinel on one connection per daemon: the
    replies before the sentinel's (EOF/timeout noted), per daemon."""
    out = {}
    for kind, d in daemons.items():
        s, f = session(d)
        s.settimeout(timeout)
        s.sendall(payload + SENTINEL)
        got = []
        try:
            while True:
                line = f.readline()
                if not line:
                    got.append("EOF")
                    break
                m = json.loads(line)
                if m.get("id") == "sentinel":
                    break
                got.append(m)
        except socket.timeout:
            got.append("TIMEOUT")
        s.close()
        out[kind] = got
    return out


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    ds = {}
    for kind in KINDS:
        ds[kind] = Daemon(kind, tmp_path_factory.mktemp(kind))
    yield ds
    for d in ds.values():
        alive = d.alive()
        d.kill()
        assert alive, f"{d.kind} died: {d.stderr()}"


GARBAGE = {
    "invalid UTF-8 outside strings": b'{"execute": "query-\xff\xfe"}\n',
    "invalid UTF-8 in a string": b'{"execute": "query-jobs", "id": "\xc3\x28"}\n',
    "UTF-8 encoded surrogate": b'{"execute": "query-jobs", "id": "\xed\xa0\x80"}\n',
    "overlong UTF-8": b'{"execute": "query-jobs", "id": "\xc0\xaf"}\n',
    "lone 0xff": b"\xff\n",
    "array nested 10000 deep": b"[" * 10000 + b"]" * 10000 + b"\n",
    "object nested 10000 deep in arguments":
        b'{"execute": "query-jobs", "arguments": ' + b'{"a": ' * 10000 + b"1"
        + b"}" * 10001 + b"\n",
    "unclosed nesting 10000 deep": b"[" * 10000 + b"\n",
}


@pytest.mark.parametrize("label", list(GARBAGE))
def test_garbage_answered_with_errors_connection_kept(label, daemons):
    """QEMU answers invalid UTF-8 and 10000-deep nesting with errors and
    never closes the connection for them; neither may we. We must also
    answer the request after it, except where QEMU does not: after 10000
    unclosed brackets it reports the depth limit nine times and then
    waits for the rest of the value, swallowing the sentinel; so do we,
    with the same errors."""
    out = replies_until_sentinel(GARBAGE[label], daemons,
                                 timeout=1.5 if "unclosed" in label else 5)
    for kind, got in out.items():
        assert "EOF" not in got, (kind, got[-3:])
        errors = [m for m in got if isinstance(m, dict)]
        assert errors, (kind, got)
        assert all(set(m) == {"error"} and m["error"]["class"] == "GenericError"
                   for m in errors), (kind, got[:3])
    if "unclosed" in label:
        assert out["qemu"][-1] == "TIMEOUT", out["qemu"][-3:]
        assert_same("unclosed nesting", [repr(m) for m in out["qemu"]],
                    [repr(m) for m in out["ours"]])
    else:
        assert "TIMEOUT" not in out["ours"]
        assert "TIMEOUT" not in out["qemu"]


def test_request_after_garbage_on_the_same_line_is_answered(daemons):
    out = replies_until_sentinel(b'{"execute":} {"execute": "query-jobs", "id": "X"}\n',
                                 daemons)
    shape = {k: [m.get("id", "error") if isinstance(m, dict) else m for m in v]
             for k, v in out.items()}
    assert shape["qemu"] == ["error", "X"]
    assert_same("request after garbage", shape["qemu"], shape["ours"])


def test_json_error_texts_and_counts(daemons):
    """QEMU's lexer and parser words, one error per bad token (the wider
    corpus is test_json_stream.py)."""
    cases = [b'{"execute":}\n', b"\x01\n", b'"abc\n', b"[" * 2000 + b"]" * 2000 + b"\n",
             b'{"execute": "query-\xff"}\n']
    q, o = [], []
    for c in cases:
        out = replies_until_sentinel(c, daemons)
        q.append(repr(out["qemu"]))
        o.append(repr(out["ours"]))
    assert_same("JSON error texts", q, o)


def test_control_member_is_refused(daemons):
    out = replies_until_sentinel(b'{"execute": "query-jobs", "control": {}}\n', daemons)
    assert out["qemu"] == [{"error": {"class": "GenericError",
                                      "desc": "QMP input member 'control' is unexpected"}}]
    assert_same("control member", [repr(out["qemu"])], [repr(out["ours"])])


@pytest.mark.xfail(strict=True, reason="known difference: a non-integer numeric id is echoed "
                   "in another notation (1.0 -> QEMU 1, ours 1.0; -0 -> 0 / -0.0; 1e29 -> "
                   "9.9999999999999991e+28 / 1e+29: QEMU prints doubles with %.17g); "
                   "1e400 gives QEMU's invalid `inf` and our largest double")
def test_known_difference_numeric_id_echo(daemons):
    raw = {}
    for kind, d in daemons.items():
        s, f = session(d)
        lines = []
        for idv in (b"1.0", b"-0", b"99999999999999999999999999999"):
            s.sendall(b'{"execute": "query-jobs", "id": ' + idv + b"}\n")
            lines.append(f.readline().decode())
        s.close()
        raw[kind] = lines
    assert_same("numeric ids", raw["qemu"], raw["ours"])
