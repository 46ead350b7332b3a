#!/usr/bin/env bash
# Does a small, cache-sized staging ring lose anything on the host targets? The same load with
# rings of several sizes, in alternating rounds (order rotated each round), each timed run right
# after an untimed run of the same command; medians of the load's own seconds.
#
#   scripts/ring_sizes.sh FILE [ROUNDS] [DEVICE_ARGS...]
#   e.g. scripts/ring_sizes.sh /tmp/bf16_2g.safetensors 7 --device null
set -euo pipefail
file=$1 rounds=${2:-7}
shift 2 || true
dev=("$@")
((${#dev[@]})) || dev=(--device null)
bin=${WEIGHTSTREAM_BIN:-$(dirname "$0")/../target/release/weightstream}
rings=("128M 8" "32M 8" "16M 8" "4M 8" "2M 4")
out=$(mktemp)
secs() { "$bin" load "$file" "${dev[@]}" --staging "$1" --staging-buffers "$2" --json --quiet |
  python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["seconds"], j["peak_host_rss_bytes"])'; }
for ((r = 0; r < rounds; r++)); do
  n=${#rings[@]}
  for ((k = 0; k < n; k++)); do
    ring=${rings[$(((k + r) % n))]}
    secs $ring >/dev/null
    echo "$ring|$(secs $ring)" | tee -a "$out"
  done
done
python3 - "$out" "${dev[*]}" <<'PY'
import statistics, sys, collections
t, rss = collections.defaultdict(list), collections.defaultdict(list)
for line in open(sys.argv[1]):
    ring, rest = line.strip().split("|")
    s, m = rest.split()
    t[ring].append(float(s)); rss[ring].append(int(m))
base = statistics.median(t["128M 8"])
print(f"{sys.argv[2]}: ring (total, buffers), median s, vs 128M, median peak RSS MiB")
for ring in t:
    m = statistics.median(t[ring])
    print(f"{ring:<8} {m:>8.4f} {m / base:>6.3f}x {statistics.median(rss[ring]) / 2**20:>8.0f}")
PY
rm -f "$out"
