#!/usr/bin/env python3
"""The drop-ins against safetensors on one file, warm page cache: ``weightstream.numpy.load_file``
vs ``safetensors.numpy.load_file`` and ``weightstream.torch.load_file`` vs
``safetensors.torch.load_file``.

Rounds alternate the order of the four loaders; each time is the median over the rounds, and
the ratio is ours / theirs (below 1: weightstream is faster). Two times per loader:

- ``load``: the call alone. ``safetensors.torch.load_file`` on the CPU returns views of a file
  mapping, reading nothing yet; weightstream and ``safetensors.numpy`` read every byte;
- ``load+touch``: the call, then one byte of every 4 KiB page of every tensor read, so that a
  mapping's page faults are paid where its reads happen.

A fifth row, ``weightstream (Rust)``, is the Rust load alone (no numpy/torch objects): the drop-in
layer's own cost is the difference.

Usage::

    .venv/bin/python scripts/bench_dropin.py --size-gib 1.5 --rounds 5 [--path /tmp/x.safetensors]

The file (bf16 and f32 tensors of LLM-like shapes, random bytes) is written once and reused.
"""

import argparse
import gc
import json
import os
import statistics
import struct
import time

import numpy as np


def write_file(path, size_bytes, seed=0):
    """A safetensors file of about ``size_bytes``: per "layer", four bf16 matrices and two f32
    norms (names as a Llama checkpoint has them), random bytes, written without holding it all."""
    hidden, inter = 2048, 5632
    layer = [
        ("self_attn.q_proj.weight", "BF16", [hidden, hidden]),
        ("self_attn.o_proj.weight", "BF16", [hidden, hidden]),
        ("mlp.up_proj.weight", "BF16", [inter, hidden]),
        ("mlp.down_proj.weight", "BF16", [hidden, inter]),
        ("input_layernorm.weight", "F32", [hidden]),
        ("post_attention_layernorm.weight", "F32", [hidden]),
    ]
    width = {"BF16": 2, "F32": 4}
    per_layer = sum(width[d] * int(np.prod(s)) for _, d, s in layer)
    tensors, offset = [], 0
    for i in range(max(1, size_bytes // per_layer)):
        for name, dtype, shape in layer:
            n = width[dtype] * int(np.prod(shape))
            tensors.append((f"model.layers.{i}.{name}", dtype, shape, offset, n))
            offset += n
    header = {name: {"dtype": d, "shape": s, "data_offsets": [o, o + n]} for name, d, s, o, n in tensors}
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, dtype, _, _, n in tensors:
            data = rng.integers(0, 256, n, dtype=np.uint8)
            if dtype == "BF16":  # finite values: no exponent of all ones
                data[1::2] &= 0x7E
            f.write(data.tobytes())
    return offset


def touch(tensors):
    """Read one byte of every 4 KiB page of every tensor."""
    total = 0
    for t in tensors.values():
        if hasattr(t, "numpy"):  # torch
            import torch

            total += int(t.reshape(-1).view(torch.uint8)[::4096].sum())
        else:
            total += int(t.reshape(-1).view(np.uint8)[::4096].sum())
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--path", default="/tmp/weightstream_bench_dropin.safetensors")
    args = ap.parse_args()

    import safetensors.numpy as st_np
    import safetensors.torch as st_pt
    import torch  # noqa: F401

    import weightstream.numpy as ws_np
    import weightstream.torch as ws_pt

    want = int(args.size_gib * (1 << 30))
    if not os.path.exists(args.path) or abs(os.path.getsize(args.path) - want) > want // 10:
        print(f"writing {args.path} ({args.size_gib} GiB)...", flush=True)
        write_file(args.path, want)
    size = os.path.getsize(args.path)
    with open(args.path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass

    import weightstream as ws
    from weightstream import _options

    raw_loader = ws.Loader()

    def rust_only():  # the Rust load alone, no framework: what the drop-in layer adds on top
        return {t.name: t for t in raw_loader._raw.load(args.path, _options.opts())}

    loaders = {
        "weightstream (Rust)": rust_only,
        "weightstream.numpy": lambda: ws_np.load_file(args.path),
        "safetensors.numpy": lambda: st_np.load_file(args.path),
        "weightstream.torch": lambda: ws_pt.load_file(args.path),
        "safetensors.torch": lambda: st_pt.load_file(args.path),
    }
    names = list(loaders)
    times = {n: {"load": [], "load+touch": []} for n in names}
    checks = {}
    for r in range(args.rounds + 1):  # round 0 warms each loader up and is not counted
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            gc.collect()
            t0 = time.perf_counter()
            out = loaders[n]()
            t1 = time.perf_counter()
            checks[n] = touch(out) if n != "weightstream (Rust)" else None
            t2 = time.perf_counter()
            del out
            gc.collect()
            if r:
                times[n]["load"].append(t1 - t0)
                times[n]["load+touch"].append(t2 - t0)
    assert checks["weightstream.numpy"] == checks["safetensors.numpy"] == checks["weightstream.torch"] == checks["safetensors.torch"]

    print(f"\nfile: {args.path}, {size / (1 << 30):.2f} GiB, warm cache, {args.rounds} rounds, medians (s)")
    print(f"{'loader':<22}{'load':>10}{'(min-max)':>16}{'GB/s':>8}{'load+touch':>13}")
    med = {n: {k: statistics.median(v) for k, v in times[n].items()} for n in names}
    for n in names:
        touched = f"{med[n]['load+touch']:>13.3f}" if checks[n] is not None else f"{'-':>13}"
        spread = f"({min(times[n]['load']):.3f}-{max(times[n]['load']):.3f})"
        print(f"{n:<22}{med[n]['load']:>10.3f}{spread:>16}{size / med[n]['load'] / 1e9:>8.2f}{touched}")
    for fw in ("numpy", "torch"):
        o, t = med[f"weightstream.{fw}"], med[f"safetensors.{fw}"]
        print(
            f"ratio weightstream.{fw} / safetensors.{fw}: load {o['load'] / t['load']:.2f}x, "
            f"load+touch {o['load+touch'] / t['load+touch']:.2f}x"
        )


if __name__ == "__main__":
    main()
