#!/usr/bin/env bash
# What `--dtype` adds to a plain cpu load of the same file, measured in alternating rounds so
# that a noisy machine hurts both sides alike. Prints each round's medians and the median ratio.
#
#   scripts/cpu_convert_overhead.sh FILE DTYPE [ROUNDS] [RUNS]
#   e.g. scripts/cpu_convert_overhead.sh /tmp/bf16.safetensors f16 7 5
set -euo pipefail
file=$1 dtype=$2 rounds=${3:-7} runs=${4:-5}
bin=${WEIGHTSTREAM_BIN:-$(dirname "$0")/../target/release/weightstream}
median() { python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["median_s"])'; }
keep=() conv=()
for ((r = 1; r <= rounds; r++)); do
  k=$("$bin" bench "$file" --device cpu --strategy pipeline --runs "$runs" --json | median)
  c=$("$bin" bench "$file" --device cpu --strategy pipeline --runs "$runs" --dtype "$dtype" --json | median)
  keep+=("$k") conv+=("$c")
  echo "round $r: keep ${k}s, --dtype $dtype ${c}s"
done
python3 - "${keep[*]}" "${conv[*]}" "$dtype" <<'PY'
import statistics, sys
k = [float(x) for x in sys.argv[1].split()]
c = [float(x) for x in sys.argv[2].split()]
mk, mc = statistics.median(k), statistics.median(c)
print(f"median of round medians: keep {mk:.4f} s, --dtype {sys.argv[3]} {mc:.4f} s: {mc / mk:.3f}x "
      f"({(mc / mk - 1) * 100:+.1f}%)")
PY
