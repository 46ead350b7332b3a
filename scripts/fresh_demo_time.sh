#!/usr/bin/env bash
# Fresh clone to the demo's first line (issue 23): clone SRC (a path or URL; default: this
# repository) at REV (default HEAD) into a temp dir, then time the README's demo command with an
# empty target dir, from the start of cargo to the first line the demo prints.
# The command: `cargo demo` where the clone has that alias (.cargo/config.toml), else
# `cargo run --release -- demo` (the README's command before issue 23); or CARGO_ARGS.
# Crates already in ~/.cargo/registry are not downloaded again: the time is the build's and the
# demo's, not the network's.
#
#   scripts/fresh_demo_time.sh [SRC [REV]] [-- CARGO_ARGS...]
#   e.g. scripts/fresh_demo_time.sh . HEAD -- run --release --timings -- demo
#
# Prints `first_line_s=<seconds>` with the line; cargo's output and the target dir (its
# cargo-timings report, with --timings) stay in the printed temp dir: remove it when done.
set -euo pipefail
src=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
rev=${2:-HEAD}
shift $(($# > 2 ? 2 : $#))
[ "${1:-}" = "--" ] && shift
work=$(mktemp -d /tmp/ws-fresh-demo.XXXXXX)
git clone -q "$src" "$work/src"
git -C "$work/src" checkout -q "$rev"
cd "$work/src"
if [ $# -eq 0 ]; then
  if grep -qs '^demo *=' .cargo/config.toml; then set -- demo; else set -- run --release -- demo; fi
fi
echo "clone: $work/src at $(git rev-parse --short HEAD); cargo $*; nproc $(nproc); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
CARGO_TARGET_DIR="$work/target" cargo "$@" 2>"$work/cargo.log" | {
  IFS= read -r line || line="(no output; see $work/cargo.log)"
  end=$(date +%s.%N)
  echo "first_line_s=$(echo "$end - $start" | bc) ($line)"
  cat >/dev/null
}
echo "loadavg at the end $(cut -d' ' -f1-3 /proc/loadavg); cargo's output: $work/cargo.log"
