#!/usr/bin/env bash
# Two builds of weightstream, the same load commands, in alternating rounds: each timed run comes
# right after an untimed run of the same command (so both pay the same first-touch faults, see
# DESIGN.md's VM trap), the order of the builds flips every round, and medians are quoted.
#
#   scripts/compare_builds.sh BEFORE_BIN AFTER_BIN FILE [ROUNDS]
#   e.g. scripts/compare_builds.sh /tmp/ws-before target/release/weightstream /tmp/bf16_2g.safetensors 7
# The time is the load's own `seconds` (JSON), without process start and exit.
set -euo pipefail
before=$1 after=$2 file=$3 rounds=${4:-7}
cmds=("--device cpu" "--device null" "--device cpu --dtype f16" "--device cpu --direct")
out=$(mktemp)
secs() { "$1" load "$file" $2 --json --quiet | python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])'; }
for ((r = 1; r <= rounds; r++)); do
  for c in "${cmds[@]}"; do
    if ((r % 2)); then order=("before:$before" "after:$after"); else order=("after:$after" "before:$before"); fi
    for pair in "${order[@]}"; do
      name=${pair%%:*} bin=${pair#*:}
      secs "$bin" "$c" >/dev/null
      t=$(secs "$bin" "$c")
      echo "$r|$c|$name|$t" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r, c, name, t = line.strip().split("|")
    rows[(c, name)].append(float(t))
print(f"{'command':<28} {'before s':>9} {'after s':>9} {'after/before':>12}")
for c in dict.fromkeys(k[0] for k in rows):
    b, a = statistics.median(rows[(c, "before")]), statistics.median(rows[(c, "after")])
    print(f"{c:<28} {b:>9.4f} {a:>9.4f} {a / b:>11.3f}x")
PY
rm -f "$out"
