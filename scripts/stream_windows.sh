#!/usr/bin/env bash
# What does streaming cost against a whole load, and what does the window buy in memory? The
# same file loaded whole (`load`) and streamed with several windows (`load --stream W`, each
# tensor dropped as it arrives), in alternating rounds (order rotated each round), each timed run
# right after an untimed run of the same command; medians of the command's own seconds and of
# its peak RSS.
#
#   scripts/stream_windows.sh FILE [ROUNDS] [DEVICE_ARGS...]
#   e.g. scripts/stream_windows.sh /work/bench/bf16_2g.safetensors 7 --device cpu
set -euo pipefail
file=$1 rounds=${2:-7}
shift 2 || true
dev=("$@")
((${#dev[@]})) || dev=(--device cpu)
bin=${WEIGHTSTREAM_BIN:-$(dirname "$0")/../target/release/weightstream}
modes=("whole" "64M" "256M" "1G")
out=$(mktemp)
run() {
  local extra=()
  [[ $1 == whole ]] || extra=(--stream "$1")
  "$bin" load "$file" "${dev[@]}" "${extra[@]}" --json --quiet |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["seconds"], j["peak_host_rss_bytes"])'
}
for ((r = 0; r < rounds; r++)); do
  n=${#modes[@]}
  for ((k = 0; k < n; k++)); do
    m=${modes[$(((k + r) % n))]}
    run "$m" >/dev/null
    echo "$m|$(run "$m")" | tee -a "$out"
  done
done
python3 - "$out" "${dev[*]}" <<'PY'
import statistics, sys, collections
t, rss = collections.defaultdict(list), collections.defaultdict(list)
for line in open(sys.argv[1]):
    mode, rest = line.strip().split("|")
    s, m = rest.split()
    t[mode].append(float(s)); rss[mode].append(int(m))
base = statistics.median(t["whole"])
print(f"{sys.argv[2]}: mode, median s, vs whole, median peak RSS MiB")
for mode in t:
    m = statistics.median(t[mode])
    print(f"{mode:<6} {m:>8.4f} {m / base:>6.3f}x {statistics.median(rss[mode]) / 2**20:>8.0f}")
PY
rm -f "$out"
