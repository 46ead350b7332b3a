#!/usr/bin/env bash
# Check that the CUDA conversion kernels compile, without a GPU: kernels/convert.cu to PTX for
# compute_80 with nvcc, that PTX through ptxas for sm_80 and sm_90, and the NVRTC form of the
# source (header inlined, as build.rs makes it) to PTX too. Installs nothing.
#
# usage: scripts/check_kernels.sh [PATH/TO/nvcc]
#   without an argument, uses the pip wheel in the repository's .venv
#   (.venv/bin/pip install nvidia-cuda-nvcc==13.5.37 nvidia-cuda-cccl).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
nvcc="${1:-}"
if [ -z "$nvcc" ]; then
    for c in "$root"/.venv/lib/python*/site-packages/nvidia/cu13/bin/nvcc; do
        [ -x "$c" ] && nvcc="$c"
    done
fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
    echo "check_kernels: no nvcc (give its path, or pip install nvidia-cuda-nvcc nvidia-cuda-cccl into .venv)" >&2
    exit 2
fi
bindir="$(cd "$(dirname "$nvcc")" && pwd)"
ptxas="$bindir/ptxas"
[ -x "$ptxas" ] || ptxas="$(command -v ptxas || true)"
[ -n "$ptxas" ] || { echo "check_kernels: no ptxas next to $nvcc" >&2; exit 2; }
inc=(-I "$root/kernels")
[ -d "$bindir/../include/cccl" ] && inc+=(-I "$bindir/../include/cccl")

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$nvcc" --version | tail -n 1

echo "nvcc -ptx -arch=compute_80 kernels/convert.cu"
"$nvcc" -ptx -arch=compute_80 -O3 "${inc[@]}" -o "$tmp/convert.ptx" "$root/kernels/convert.cu"

# The source NVRTC gets at run time: the header inlined in place of its #include.
awk -v hdr="$root/kernels/convert_math.cuh" '
    /^[ \t]*#include "convert_math.cuh"/ { while ((getline l < hdr) > 0) print l; next }
    { print }' "$root/kernels/convert.cu" > "$tmp/convert_nvrtc.cu"
echo "nvcc -ptx -arch=compute_80 (self-contained NVRTC source, no include path)"
"$nvcc" -ptx -arch=compute_80 -O3 -o "$tmp/convert_nvrtc.ptx" "$tmp/convert_nvrtc.cu"

want=$(grep -c '^ *X(' "$root/kernels/convert_math.cuh")
have=$(grep -c '^\.visible \.entry ws_convert_' "$tmp/convert.ptx")
if [ "$want" != "$have" ]; then
    echo "check_kernels: $have kernels in the PTX, $want pairs in convert_math.cuh" >&2
    exit 1
fi

for sm in sm_80 sm_90; do
    echo "ptxas -arch=$sm ($have kernels)"
    "$ptxas" -arch="$sm" -O3 "$tmp/convert.ptx" -o "$tmp/convert_$sm.cubin"
done
# What DeviceConverter loads when the driver refuses this nvcc's PTX ISA version.
sed -E 's/^\.version [0-9]+\.[0-9]+/.version 7.0/' "$tmp/convert.ptx" > "$tmp/convert_v70.ptx"
echo "ptxas -arch=sm_80 (PTX ISA lowered to 7.0)"
"$ptxas" -arch=sm_80 "$tmp/convert_v70.ptx" -o "$tmp/convert_v70.cubin"
echo "check_kernels: ok"
