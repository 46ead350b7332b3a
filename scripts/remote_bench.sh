#!/usr/bin/env bash
# Loading a checkpoint from a loopback object server (issue 15): weightstream's remote loads to
# cpu and null against the server's own ceiling (curl, 8 parallel 8 MiB ranged GETs), the plain
# download-then-load baseline (aws s3 cp / curl, then `weightstream load LOCAL --device cpu`) and
# Run:ai Model Streamer, over nginx (HTTP, sendfile) and an S3 server on loopback. Alternating
# rounds, medians, peak RSS; prints a markdown table for BENCHMARKS.md on stdout (progress on
# stderr). Servers and scratch copies live only for the run.
#
#   scripts/remote_bench.sh [OPTIONS] PATH      PATH: a .safetensors file or a folder
#   e.g. scripts/remote_bench.sh --rounds 5 --sweep /work/bench/bf16_2g.safetensors
#
# Options (all passed to scripts/remote_bench.py; --help there lists them):
#   --rounds N               rounds (default 5)
#   --servers LIST           nginx,s3rver (default), moto (PyPI moto[server]: slow, see BENCHMARKS)
#   --sweep / --sweep-only   also / only weightstream against nginx over --remote-concurrency
#                            4,8,16 × --remote-request-size 4M,8M,16M (--sweep-device, default cpu)
#   --s3-data DIR            keep s3rver's objects in DIR between runs (upload once)
#   --no-runai               skip Run:ai Model Streamer
#   --devices LIST           the remote loads' targets (default cpu,null; on a GPU host
#                            cuda,null with --baseline-device cuda)
#   --ws-arg ARG             extra argument for each remote weightstream load (repeatable)
# Environment: WEIGHTSTREAM_BIN (default: $CARGO_TARGET_DIR or target/, release/weightstream;
# built with `cargo build --release` if missing).
#
# Installs what it needs where missing: nginx, curl and GNU time from Debian's packages;
# .venv (python3 -m venv) with boto3, awscli, moto[server], runai-model-streamer and
# runai-model-streamer-s3 from PyPI (Run:ai pulls in torch); s3rver from npm into .venv/node.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

need_apt=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v curl >/dev/null || need_apt+=(curl)
[ -x /usr/bin/time ] || need_apt+=(time)
if ((${#need_apt[@]})); then
    echo "remote_bench: apt-get install ${need_apt[*]}" >&2
    apt-get update -qq >&2 && apt-get install -y -qq "${need_apt[@]}" >&2
fi
export PATH="$PATH:/usr/sbin"

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import boto3, awscli, moto' 2>/dev/null; then
    echo "remote_bench: pip install boto3 awscli moto[server]" >&2
    .venv/bin/pip install -q boto3 awscli 'moto[server]' >&2
fi
skip_runai=0
for a in "$@"; do [ "$a" = --no-runai ] && skip_runai=1; done
if ((!skip_runai)) && ! .venv/bin/python -c 'import runai_model_streamer, runai_model_streamer_s3' 2>/dev/null; then
    echo "remote_bench: pip install runai-model-streamer runai-model-streamer-s3 (with torch: large)" >&2
    .venv/bin/pip install -q runai-model-streamer runai-model-streamer-s3 >&2 \
        || echo "remote_bench: Run:ai Model Streamer did not install; its row is skipped" >&2
fi
if [ ! -x .venv/node/node_modules/.bin/s3rver ]; then
    echo "remote_bench: npm install s3rver (into .venv/node)" >&2
    npm install -q --prefix .venv/node --no-audit --no-fund s3rver@3.7.1 >&2
fi

bin=${WEIGHTSTREAM_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/weightstream}
if [ ! -x "$bin" ]; then
    echo "remote_bench: cargo build --release" >&2
    cargo build --release >&2
fi

exec .venv/bin/python scripts/remote_bench.py --weightstream "$bin" "$@"
