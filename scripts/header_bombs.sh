#!/usr/bin/env bash
# Header bombs: files whose header stays within the format's 100 MB limit but declares as much as
# it can (tensors, dimensions, metadata keys, name bytes). For each, `weightstream inspect` and
# `weightstream load --device null` are timed with /usr/bin/time: max RSS, seconds, exit status.
# The goal (issue 12): every file handled in < 10 s and < 3 x header + 64 MiB of RSS.
#
#   scripts/header_bombs.sh [BIN]     (BIN: default target/release/weightstream; build it first
#                                      with `cargo build --release`)
#
# The files are written by python3 into a temp dir, removed at the end (about 700 MB at once).
set -euo pipefail

BIN=${1:-${CARGO_TARGET_DIR:-target}/release/weightstream}
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "needs GNU time at /usr/bin/time" >&2; exit 2; }
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT

python3 - "$DIR" <<'PY'
import os, struct, sys

out = sys.argv[1]
LIMIT = 100_000_000

def write(name, pieces, data_len=0):
    """pieces: iterable of byte strings joined by commas inside {}."""
    body = b"{" + b",".join(pieces) + b"}"
    assert len(body) <= LIMIT, (name, len(body))
    with open(os.path.join(out, name + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(body)))
        f.write(body)
        if data_len:
            f.truncate(8 + len(body) + data_len)

def zero_size(i):
    return b'"%x":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}' % i

def one_byte(i):
    return b'"%x":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1)

def fill(entry, limit=LIMIT - 2):
    """As many entries as fit in the header limit."""
    pieces, size, i = [], 0, 0
    while True:
        p = entry(i)
        if size + len(p) + 1 > limit:
            return pieces
        pieces.append(p)
        size += len(p) + 1
        i += 1

# Refused: more tensors than MAX_TENSORS (1,000,000).
p = fill(zero_size); write("refused_zero_size_%d" % len(p), p); del p
p = fill(one_byte); write("refused_one_byte_%d" % len(p), p, data_len=len(p)); del p
# Accepted: the most tensors allowed.
write("ok_zero_size_1000000", [zero_size(i) for i in range(1_000_000)])
write("ok_one_byte_1000000", [one_byte(i) for i in range(1_000_000)], data_len=1_000_000)
# Refused: more than MAX_METADATA_KEYS (65,536) keys.
keys = fill(lambda i: b'"%x":""' % i, LIMIT - 20)
write("refused_metadata_%d_keys" % len(keys), [b'"__metadata__":{' + b",".join(keys) + b"}"]); del keys
# Accepted: the most keys allowed, and one huge value.
write("ok_metadata_65536_keys", [b'"__metadata__":{' + b",".join(b'"%x":""' % i for i in range(65536)) + b"}"])
write("ok_metadata_one_99MB_value", [b'"__metadata__":{"k":"' + b"v" * 99_000_000 + b'"}'])
# Refused: rank above MAX_RANK (16).
n = (LIMIT - 100) // 2
write("refused_rank_%d" % n, [b'"t":{"dtype":"U8","shape":[' + b",".join([b"1"] * n) + b'],"data_offsets":[0,1]}'], data_len=1)
ones = b",".join([b"1"] * 10_000)
p = fill(lambda i: b'"%x":{"dtype":"U8","shape":[%s],"data_offsets":[%d,%d]}' % (i, ones, i, i + 1))
write("refused_rank_10000_x%d" % len(p), p, data_len=len(p)); del p
# Accepted: rank 16 (MAX_RANK), as many tensors as are allowed and fit.
ones = b",".join([b"1"] * 16)
p = fill(lambda i: b'"%x":{"dtype":"U8","shape":[%s],"data_offsets":[%d,%d]}' % (i, ones, i, i + 1))[:1_000_000]
write("ok_rank_16_x%d" % len(p), p, data_len=len(p)); del p
# Accepted: one tensor with a 99 MB name.
write("ok_name_99MB", [b'"' + b"n" * 99_000_000 + b'":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'], data_len=1)
PY

MIB=$((1 << 20))
printf '%-34s %-8s %10s %10s %7s %7s %5s  %s\n' file command header_MB rss_MiB budget s exit "stderr (cut)"
fail=0
for f in "$DIR"/*.safetensors; do
  name=$(basename "$f" .safetensors)
  header=$(python3 -c 'import struct,sys; print(struct.unpack("<Q", open(sys.argv[1],"rb").read(8))[0])' "$f")
  budget=$(( (3 * header + 64 * MIB) / MIB ))
  for cmd in inspect load; do
    args=("$cmd" "$f")
    [ "$cmd" = load ] && args+=(--device null --quiet)
    set +e
    /usr/bin/time -f '%M %e %x' -o "$DIR/time" "$BIN" "${args[@]}" >/dev/null 2>"$DIR/err"
    set -e
    read -r rss_kib secs status < <(tail -n 1 "$DIR/time")
    rss=$((rss_kib / 1024))
    err=$(head -c 300 "$DIR/err" | tr '\n' ' ' | sed "s|$DIR/||g" | cut -c1-90)
    verdict=""
    if [ "$rss" -ge "$budget" ] || awk "BEGIN{exit !($secs >= 10)}" || [ "$status" -gt 1 ]; then
      verdict="  <-- over the goal"
      fail=1
    fi
    printf '%-34s %-8s %10.1f %10d %7d %7.2f %5s  %s%s\n' "$name" "$cmd" "$(awk "BEGIN{print $header/1e6}")" \
      "$rss" "$budget" "$secs" "$status" "$err" "$verdict"
  done
done
exit $fail
