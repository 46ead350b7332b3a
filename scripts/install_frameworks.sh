#!/usr/bin/env bash
# Installs the frameworks the Python tests load through (idempotent: what is there is kept).
#
# Two venvs, because vLLM and SGLang pin an older torch and transformers than the newest:
#   .venv          the package's own tests and the torch tier: torch and transformers, newest
#                  versions tested (python/tests).
#   .venv-serving  the vLLM and SGLang tiers (python/tests_serving): torch 2.14, transformers
#                  5.19.0 (vLLM 0.34 accepts >= 5.16.1, < 5.23; SGLang 0.5.23 pins 5.19.0), then
#                  `--no-deps` vLLM 0.34.0 and SGLang 0.5.23 with the light dependencies their
#                  model loaders import (their GPU kernels are left out: loading runs on the CPU).
#
# PyPI's torch wheel carries CUDA libraries (~3 GB each) and runs on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP="--disable-pip-version-check -q"
TORCH_NEWEST="torch==2.15.0"
TRANSFORMERS_NEWEST="transformers==5.25.0"

echo "== .venv: torch tier ($TORCH_NEWEST, $TRANSFORMERS_NEWEST)"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import torch, transformers' 2>/dev/null; then
  .venv/bin/pip install $PIP safetensors numpy ml_dtypes maturin pytest "$TORCH_NEWEST" "$TRANSFORMERS_NEWEST"
fi
.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

echo "== .venv-serving: vLLM 0.34.0 and SGLang 0.5.23 on torch 2.14.0, transformers 5.19.0"
[ -x .venv-serving/bin/python ] || python3 -m venv .venv-serving
S=.venv-serving/bin/pip
if ! .venv-serving/bin/python -c 'import torch, transformers, vllm, sglang, moto, openai, partial_json_parser' 2>/dev/null; then
  $S install $PIP torch==2.14.0 torchvision==0.29.0 transformers==5.19.0 safetensors numpy ml_dtypes pytest maturin "moto[server]"
  # vLLM's model loaders and model classes import these; its compiled CPU extension does not
  # load on PyPI's torch, and loading does not need it.
  $S install $PIP --no-deps vllm==0.34.0
  $S install $PIP psutil pyzmq urllib3 aiohttp requests pillow pybase64 cachetools cbor2 msgspec \
    cloudpickle uvloop py-cpuinfo prometheus_client "llguidance<1.8" xgrammar==0.2.8 einops \
    compressed-tensors==0.17.0
  $S install $PIP --no-deps sglang==0.5.23
  # SGLang's initialize_model_parallel imports its OpenAI protocol: openai (SGLang pins 2.8.0,
  # vLLM wants >= 2.25; SGLang's imports work with the newer one) and partial_json_parser.
  $S install $PIP orjson pybase64 requests pillow starlette msgspec pyzmq IPython aiohttp dill \
    apache-tvm-ffi==0.1.11 sentencepiece gguf "openai>=2.25" partial_json_parser
fi
.venv-serving/bin/python -c 'import torch, transformers, vllm, sglang; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__, "sglang", sglang.__version__)'
