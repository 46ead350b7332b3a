#!/usr/bin/env bash
# The distributed fault tests, N times, beside busy loops on every core (a loaded CI machine):
# counts the ranks that died by a signal at exit (SIGABRT: "terminate called without an active
# exception"). Before the side groups were destroyed at exit, 5 of 120 fault runs aborted so.
#   scripts/stress_dist_faults.sh [N=30] [LOGDIR=/tmp/ws-stress]
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-30}
LOGS=${2:-/tmp/ws-stress}
mkdir -p "$LOGS"
busy=()
for _ in $(seq "$(nproc)"); do
  sh -c 'while :; do :; done' &
  busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
export PYTHONFAULTHANDLER=1
failed=0
for i in $(seq "$N"); do
  .venv/bin/python -m pytest -q -s -p no:cacheprovider python/tests/test_distributed.py -k fault \
    > "$LOGS/run$i.log" 2>&1 || { failed=$((failed + 1)); echo "run $i failed: $LOGS/run$i.log"; }
done
aborts=$(grep -l "terminate called" "$LOGS"/run*.log 2>/dev/null | wc -l)
echo "$N runs: $failed failed, $aborts with an abort at exit (logs in $LOGS)"
[ "$failed" -eq 0 ] && [ "$aborts" -eq 0 ]
