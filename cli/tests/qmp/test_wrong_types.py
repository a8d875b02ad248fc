"""Wrong types for every argument of every command our daemon lists in
`query-commands`, plus missing and unknown arguments, sent to
qemu-storage-daemon and to `blockjob daemon` (no nodes, so nothing can
run): the replies' class and text must be the same. The argument lists and
types come live from QEMU's `query-qmp-schema` (our daemon has no schema
command). Every probe is refused by the argument visitor or by a failed
lookup; none can create anything."""

import asyncio
import functools
import json
import os
import tempfile

import pytest

from conftest import Daemon, assert_same, canonical, connect, run_both

# object-add: its probes with a valid first qom-type would create objects
# of types we do not have (QEMU accepts them); tests/object_oracle.rs
# compares object-add's refusals instead.
SKIP = {"quit", "qmp_capabilities", "object-add"}


def wrong_values(t, schema):
    """Values of the wrong type for a member of type `t`."""
    e = schema[t]
    meta = e["meta-type"]
    if meta == "builtin":
        jt = e["json-type"]
        if jt == "string":
            return [5, None, [], {"a": 1}, True]
        if jt == "int":
            return ["1", 1.5, 2 ** 64, -(2 ** 63) - 1, True, None]
        if jt == "number":
            return ["x", None]
        if jt == "boolean":
            return ["true", 1, None]
        if jt == "value":
            return []
        return [[]]
    if meta == "enum":
        return [5, "no-such-value", None]
    if meta in ("object", "array"):
        return ["x", 5]
    if meta == "alternate":
        return [[[]]]
    return []


def dummy(t, schema):
    """A value of the right type (names that do not exist)."""
    e = schema[t]
    meta = e["meta-type"]
    if meta == "builtin":
        return {"string": "nosuch", "int": 1, "number": 1, "boolean": True,
                "null": None}.get(e["json-type"], {})
    if meta == "enum":
        return e["values"][0]
    if meta == "array":
        return []
    if meta == "alternate":
        return dummy(e["members"][0]["type"], schema)
    return {}


def probes(commands, schema):
    for name in sorted(commands):
        if name in SKIP or name not in schema:
            continue
        arg_type = schema[name].get("arg-type")
        members = schema[arg_type].get("members", []) if arg_type else []
        required = {m["name"]: dummy(m["type"], schema) for m in members if "default" not in m}
        yield name, "no arguments", {}
        yield name, "unknown argument", dict(required, **{"no-such-arg": 1})
        # (blockdev-add is a flat union: its base members only.)
        for m in members:
            for v in wrong_values(m["type"], schema):
                args = dict(required)
                args[m["name"]] = v
                yield name, f"{m['name']}={json.dumps(v)}", args


@functools.lru_cache(maxsize=None)
def replies():
    """{(command, probe): {"qemu": reply, "ours": reply}} and whether each
    daemon is still alive at the end."""
    async def run():
        tmp = tempfile.TemporaryDirectory(prefix="qmp-wrong-types-")
        dirs = {k: f"{tmp.name}/{k}" for k in ("qemu", "ours")}
        for d in dirs.values():
            os.mkdir(d)
        daemons = {k: Daemon(k, d) for k, d in dirs.items()}
        clients = {k: await connect(daemons[k].sock, k) for k in daemons}
        try:
            schema = {e["name"]: e for e in await clients["qemu"].execute("query-qmp-schema")}
            ours = [c["name"] for c in await clients["ours"].execute("query-commands")]
            out = {}
            for name, label, args in probes(ours, schema):
                for k, c in clients.items():
                    try:
                        r = {"return": await asyncio.wait_for(c.execute(name, args), 10)}
                    except Exception as e:  # ExecuteError: its reply
                        r = getattr(e, "received", None) or {"exception": repr(e)}
                    r = {k2: v for k2, v in r.items() if k2 != "id"}
                    out.setdefault((name, label), {})[k] = canonical(r)
            alive = {k: d.alive() for k, d in daemons.items()}
            return out, alive
        finally:
            for c in clients.values():
                await c.disconnect()
            for d in daemons.values():
                d.kill()
            tmp.cleanup()
    return asyncio.run(run())


def unsigned_type_error(key, v):
    """QEMU's visitor says "Parameter 'x' expects uint64" for a wrong-typed
    unsigned member (granularity: uint32); ours says "Invalid parameter
    type for 'x', expected: integer"."""
    return "expects uint64" in v["qemu"] and "Invalid parameter type" in v["ours"]


def blockdev_add_active(key, v):
    """QEMU 10's blockdev-add has a base member `active` (bool, visited
    before the driver's members); ours does not know it ("Parameter
    'active' is unexpected")."""
    return key[0] == "blockdev-add" and key[1].startswith("active=")


def blockdev_del_unknown_argument(key, v):
    """Ours looks the node up (and would delete it) before refusing the
    unknown argument: see test_known_difference_blockdev_del_extra_argument."""
    return key == ("blockdev-del", "unknown argument")


KNOWN = ()


def differing(out):
    """Probes whose replies differ; for commands that succeed (query-*),
    only that both succeeded (their values are compared elsewhere)."""
    for k, v in out.items():
        if v["qemu"].startswith('{"return"') and v["ours"].startswith('{"return"'):
            continue
        if v["qemu"] != v["ours"]:
            yield k, v


def test_wrong_types_match_qemu():
    out, alive = replies()
    assert alive == {"qemu": True, "ours": True}
    assert len(out) > 150, len(out)
    diffs = [f"{k}:\n  qemu {v['qemu']}\n  ours {v['ours']}" for k, v in differing(out)
             if not any(known(k, v) for known in KNOWN)]
    assert not diffs, f"{len(diffs)} of {len(out)} differ:\n" + "\n".join(diffs)


def test_blockdev_del_with_an_extra_argument_deletes_nothing():
    async def scenario(side):
        await side.start(["--blockdev", "driver=null-co,node-name=n0",
                          "--blockdev", "driver=null-co,node-name=n1"])
        await side.cmd("blockdev-del", {"node-name": "n0", "zzz": 1})
        nodes = await side.ok("query-named-block-nodes")
        side.note(f"nodes: {sorted(n['node-name'] for n in nodes)}")
    q, o = run_both(scenario)
    assert q[-1] == "nodes: ['n0', 'n1']"
    assert_same("blockdev-del with an extra argument", q, o)
