#!/usr/bin/env bash
# The one test command: the Rust tests (`cargo test`), then the Python package built and installed
# into .venv and its tests (pytest). GPU tests skip with one line without a GPU.
#
# WEIGHTSTREAM_PY_PROFILE=dev builds the extension with the dev profile (faster to build, slower
# to load; the default is release, which reuses the release build of `cargo build --release`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== rust tests"
cargo test

echo "== python package (.venv)"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check safetensors numpy ml_dtypes maturin pytest
# --no-build-isolation uses the venv's maturin, which its build hook finds on PATH.
export PATH="$PWD/.venv/bin:$PATH"
if [ "${WEIGHTSTREAM_PY_PROFILE:-release}" = dev ]; then export MATURIN_PEP517_ARGS="--profile dev"; fi
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python

echo "== python tests"
.venv/bin/python -m pytest -q -rfEs python/tests
