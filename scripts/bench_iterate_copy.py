"""A framework's weight-loading loop, as vLLM's `load_weights` runs it: `(name, tensor)` pairs
copied into parameters that already live on the device (`param.copy_(t)`).

Two feeders, same run, alternating rounds, medians:
  safetensors  vLLM's default iterator: `safe_open(file, framework="pt")` on the CPU (mmap), each
               tensor then copied host -> device by `param.copy_` (pageable memory).
  weightstream `Loader(device).iterate(file, window)`: tensors land on the device through the
               pinned ring; `param.copy_` is then a device-to-device copy.

    python scripts/bench_iterate_copy.py FILE [--device cuda:0] [--rounds 5] [--window 1GiB]
    python scripts/bench_iterate_copy.py --make FILE --gib 16    # an 8B-class bf16 Llama shape

Prints one JSON line per round and a summary with the ratio weightstream / safetensors. On a
machine without CUDA, `--device cpu` runs the same loop (the copies are then host to host).
"""

import argparse
import json
import statistics
import sys
import time


def make(path, gib):
    """bf16 tensors of Llama-8B shapes (hidden 4096, intermediate 14336) up to `gib`. Their values
    do not matter to a loader: each layer's tensors are filled with one random byte pattern,
    which writes a 15 GiB file in a minute instead of ten."""
    import torch
    from safetensors.torch import save_file

    h, inter, total, t, i = 4096, 14336, int(gib * 2**30), {}, 0
    pattern = torch.randint(0, 256, (inter * h * 2,), dtype=torch.uint8).view(torch.bfloat16)

    def fill(*shape):
        n = 1
        for d in shape:
            n *= d
        return pattern[:n].clone().view(*shape)

    t["model.embed_tokens.weight"] = torch.randint(0, 256, (128256 * h * 2,), dtype=torch.uint8).view(torch.bfloat16).view(128256, h)
    while sum(v.numel() * 2 for v in t.values()) < total:
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = fill(h)
        for m, rows in (("q", h), ("k", 1024), ("v", 1024), ("o", h)):
            t[f"{p}.self_attn.{m}_proj.weight"] = fill(rows, h)
        for m in ("gate", "up"):
            t[f"{p}.mlp.{m}_proj.weight"] = fill(inter, h)
        t[f"{p}.mlp.down_proj.weight"] = fill(h, inter)
        i += 1
    save_file(t, path)


def params_for(path, device):
    """Empty parameters of every tensor's shape and dtype on `device` (a model's, before loading)."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[s.get_dtype()]
            out[k] = torch.empty(s.get_shape(), dtype=dt, device=device)
    return out


def feed_safetensors(path, params):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            params[k].copy_(f.get_tensor(k))


def feed_weightstream(loader, path, params, window):
    for k, t in loader.iterate(path, window=window):
        params[k].copy_(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", default="1GiB")
    ap.add_argument("--make", action="store_true", help="write FILE (random weights) and exit")
    ap.add_argument("--gib", type=float, default=16)
    a = ap.parse_args()
    if a.make:
        make(a.file, a.gib)
        return
    import torch

    import weightstream as ws

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (use --device cpu for the host loop)")
        return
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    params = params_for(a.file, a.device)
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    loader = ws.Loader(device=a.device)
    runs = {"safetensors": [], "weightstream": []}
    feeders = {
        "safetensors": lambda: feed_safetensors(a.file, params),
        "weightstream": lambda: feed_weightstream(loader, a.file, params, a.window),
    }
    for name, feed in feeders.items():  # untimed warm-up of each (page cache, CUDA context, ring)
        feed()
        sync()
    for r in range(a.rounds):
        order = list(feeders) if r % 2 == 0 else list(reversed(feeders))
        for name in order:
            t0 = time.perf_counter()
            feeders[name]()
            sync()
            dt = time.perf_counter() - t0
            runs[name].append(dt)
            print(json.dumps({"round": r, "feeder": name, "seconds": round(dt, 4), "gbps": round(nbytes / dt / 1e9, 2)}))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "device": a.device, "bytes": nbytes, "rounds": a.rounds,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "median_gbps": {k: round(nbytes / v / 1e9, 2) for k, v in med.items()},
        "ratio_weightstream_over_safetensors": round(med["weightstream"] / med["safetensors"], 3),
    }))


if __name__ == "__main__":
    sys.exit(main())
