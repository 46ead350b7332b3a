#!/usr/bin/env bash
# One GPU session: CUDA tests, demo, same-run baselines, tuning sweep, conversion, sanitizer.
# Run on the GPU machine from the project root with the binaries built by
# ../shared/gpu/build-for-device.sh in .gpu/bin and the loader wheels in .whl (optional). For the
# `python` part also carry our own abi3 wheel and pytest's, built/fetched on the build machine:
#   (cd python && maturin build --release -o ../.whl)
#   pip download --no-deps --only-binary=:all: -d .whl pytest iniconfig pluggy packaging
#   usage: scripts/gpu_bench.sh OUTDIR [part...]
#   parts: tests python demo compare sweep convert sanitize zero-copy (the experimental --zero-copy)
#          frameworks (issue 22: transformers from_pretrained and vLLM's load_weights loop on cuda)
#          distributed (issue 24: two ranks over gloo sharing reads into CUDA tensors)
set -uo pipefail
out=${1:?outdir}; shift
parts=${*:-tests python frameworks distributed demo compare sweep convert sanitize zero-copy}
B=.gpu/bin
W=$B/weightstream
export WEIGHTSTREAM_PYTHON=python3 PYTHONUNBUFFERED=1
# Tests find the generator script through the build machine's path.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
    && echo "installed loader wheels" || echo "could not install loader wheels"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
nvidia-smi -L | tee "$out/device.txt"
data=/tmp/wsbench; mkdir -p $data
mk() { # name dtype GiB
  [ -f $data/$1 ] || python3 - "$data/$1" "$2" "$3" <<'PY'
import sys, torch
from safetensors.torch import save_file
path, dt, gib = sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3])
h, inter, total, t, i = 4096, 11008, int(gib * 2**30), {}, 0
el = torch.empty(0, dtype=dt).element_size()
while sum(v.numel() * el for v in t.values()) < total:
    p = f"model.layers.{i}"
    t[f"{p}.input_layernorm.weight"] = torch.randn(h).to(dt)
    for m in "qkvo": t[f"{p}.self_attn.{m}_proj.weight"] = torch.randn(h, h).to(dt)
    for m in ("gate", "up"): t[f"{p}.mlp.{m}_proj.weight"] = torch.randn(inter, h).to(dt)
    t[f"{p}.mlp.down_proj.weight"] = torch.randn(h, inter).to(dt)
    i += 1
save_file(t, path)
PY
}
for p in $parts; do case $p in
python)
  # The Python package on torch + CUDA (python/tests/test_gpu.py); it skips in one line without.
  timeout 300 python3 -m pytest -q -rfEs python/tests/test_gpu.py 2>&1 | tail -20 | tee "$out/python.log" ;;
tests)
  for t in cuda_load cuda_stream cuda_convert load_host convert_load pipeline_stages stream; do echo "== $t"; timeout 300 $B/$t-test --nocapture 2>&1 | grep -E "^test |result|SKIPPED|peak RSS|panicked|error" ; done | tee "$out/tests.log" ;;
demo)
  timeout 120 $W demo 2>&1 | tee "$out/demo.log" ;;
compare)
  mk bf16_4g.safetensors bfloat16 4
  { timeout 240 python3 scripts/compare_loaders.py $data/bf16_4g.safetensors --weightstream $W --runs 5 --json-out "$out/compare_warm.json"
    timeout 240 python3 scripts/compare_loaders.py $data/bf16_4g.safetensors --weightstream $W --runs 3 --cold --json-out "$out/compare_cold.json"
  } 2>&1 | tee "$out/compare.log" ;;
sweep)
  mk bf16_4g.safetensors bfloat16 4
  echo "== read ceiling: null target (no GPU copy), pread 16 threads; dd bs=8M"
  timeout 60 $W bench $data/bf16_4g.safetensors --device null --strategy pipeline --runs 5 --threads 16 --staging 128M --staging-buffers 8 | tail -1
  dd if=$data/bf16_4g.safetensors of=/dev/null bs=8M 2>&1 | tail -1
  for cfg in "--staging 64M --staging-buffers 4" "--staging 128M --staging-buffers 8" "--staging 256M --staging-buffers 16" "--staging 128M --staging-buffers 8 --read-size 8M" "--staging 128M --staging-buffers 8 --read-size 2M" "--staging 256M --staging-buffers 8 --threads 24" "--staging 128M --staging-buffers 8 --io uring"; do
    echo "== $cfg"; timeout 60 $W bench $data/bf16_4g.safetensors --device cuda --strategy pipeline --runs 5 $cfg | tail -1
  done 2>&1 | tee "$out/sweep.log"
  echo "== cold: dd iflag=direct vs pipeline --direct / buffered (same run)"
  python3 -c "import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)" $data/bf16_4g.safetensors
  dd if=$data/bf16_4g.safetensors of=/dev/null bs=8M iflag=direct 2>&1 | tail -1
  timeout 120 $W bench $data/bf16_4g.safetensors --device cuda --cold --runs 3 --strategy pipeline-direct --strategy pipeline --threads 16 --staging 128M --staging-buffers 8 | tail -3
  timeout 60 $W load $data/bf16_4g.safetensors --device cuda --staging 128M --staging-buffers 8 --threads 16 --trace "$out/trace.json" --quiet | tee -a "$out/sweep.log" ;;
convert)
  mk f32_2g.safetensors float32 2
  for d in keep bf16 f16; do echo "== --dtype $d"; timeout 60 $W bench $data/f32_2g.safetensors --device cuda --strategy pipeline --runs 5 --dtype $d --staging 128M --staging-buffers 8 --threads 16 | tail -1; done 2>&1 | tee "$out/convert.log"
  timeout 120 $B/convert-bench-test --bench 2>&1 | grep -E "time:|thrpt:|^[a-z]" | tee -a "$out/convert.log" ;;
zero-copy)
  mk bf16_4g.safetensors bfloat16 4
  { echo "== pipeline vs pipeline-zero-copy (--zero-copy) vs torch pinned H2D, same run"
    timeout 300 python3 scripts/compare_loaders.py $data/bf16_4g.safetensors --weightstream $W --runs 5 \
      --ws-strategy pipeline --ws-strategy pipeline-zero-copy --ws-strategy mmap-copy --json-out "$out/zero_copy.json"
    echo "== peak host RSS, --zero-copy"
    timeout 60 $W load $data/bf16_4g.safetensors --device cuda --zero-copy --json --quiet | python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_host_rss_bytes"])'
    echo "== trace of a --zero-copy load (register spans)"
    timeout 60 $W load $data/bf16_4g.safetensors --device cuda --zero-copy --trace "$out/trace_zero_copy.json" --quiet
    python3 -c "import json,sys; ev=json.load(open(sys.argv[1]))['traceEvents']; r=[e for e in ev if e.get('name')=='register']; print(len(r), 'registrations,', round(sum(e['dur'] for e in r)/1e3,1), 'ms in all')" "$out/trace_zero_copy.json"
  } 2>&1 | tee "$out/zero_copy.log" ;;
distributed)
  # Issue 24: two ranks over gloo with CUDA tensors (weightstream.distributed's device path).
  timeout 300 python3 -m pytest -q -rfEs python/tests/test_gpu.py -k two_ranks 2>&1 | tail -20 | tee "$out/distributed.log" ;;
frameworks)
  # weightstream.transformers.from_pretrained(device="cuda") against transformers'
  # from_pretrained(device_map="cuda") for an 8B-class shape (random weights), and the loop of
  # vLLM's load_weights (Loader.iterate to cuda feeding param.copy_) against safetensors' safe_open.
  { timeout 300 python3 -m pytest -q -rfEs python/tests/test_transformers.py -k cuda
    timeout 300 python3 scripts/bench_transformers.py --device cuda --rounds 3
    [ -f $data/llama8b_bf16.safetensors ] || python3 scripts/bench_iterate_copy.py --make $data/llama8b_bf16.safetensors --gib 15
    timeout 240 python3 scripts/bench_iterate_copy.py $data/llama8b_bf16.safetensors --device cuda:0 --rounds 3
  } 2>&1 | tee "$out/frameworks.log" ;;
sanitize)
  timeout 240 compute-sanitizer --tool memcheck $B/cuda_load-test --test-threads 1 every_tensor 2>&1 | tail -8 | tee "$out/sanitizer.log" ;;
esac; done
