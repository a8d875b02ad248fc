#!/usr/bin/env bash
# The Python QMP tests: the same scenarios against qemu-storage-daemon and
# `blockjob daemon` (traces compared), fuzzing, load. Run from anywhere:
#
#   bash cli/tests/qmp/run.sh [pytest args]      e.g. -k mirror -x
#   bash cli/tests/qmp/run.sh --setup-only       only create the environment
#
# Creates (or reuses) a virtual environment (QMP_VENV, default
# target/qmp-venv) with the pinned requirements.txt, then runs pytest on
# cli/tests/qmp with our binary in BLOCKJOB_BIN (default target/debug/blockjob;
# `cargo build` first, or run it through `cargo test --test qmp_python`).
# Needs qemu-storage-daemon, qemu-img and qemu-io (qemu-utils).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The workspace root (its target/ holds the binary and the venv).
root="$(cd "$here/../../.." && pwd)"
venv="${QMP_VENV:-$root/target/qmp-venv}"
py="${PYTHON:-python3}"
export BLOCKJOB_BIN="${BLOCKJOB_BIN:-$root/target/debug/blockjob}"

mkdir -p "$(dirname "$venv")"
# One creator at a time (several cargo test runs may share target/).
exec 9>"$venv.lock"
flock 9
if [ ! -x "$venv/bin/python" ]; then
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        # Debian/Ubuntu ship venv's ensurepip separately.
        if [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        else
            echo "run.sh: python3 -m venv does not work here: install python3-venv" >&2
            exit 1
        fi
    fi
    rm -rf "$venv"
    "$py" -m venv "$venv"
fi
stamp="$venv/.requirements.txt"
if ! cmp -s "$here/requirements.txt" "$stamp"; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
fi
exec 9>&-
# `--setup-only`: just the environment (CI prepares it before cargo test).
if [ "${1:-}" = "--setup-only" ]; then
    exit 0
fi

cd "$here"
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -rxXfE "$@"
