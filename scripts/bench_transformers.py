#!/usr/bin/env python3
"""transformers' own `from_pretrained` against `weightstream.transformers.from_pretrained`, on a
random Llama-shaped checkpoint, warm page cache, alternating rounds, medians.

Each measurement runs in a fresh process (imports excluded from the timings), so neither loader
inherits the other's page mappings or the allocator's freed memory. Two figures per loader:

* load: `from_pretrained` returns (and, for scale, "ceiling": the same bytes loaded into torch
  tensors with one `Loader.load_into` per file, no model built);
* load + forward: then one forward pass of a short input, plus a sum over the input-embedding
  table (a lookup reads only the rows of its ids): every weight is read once. On the CPU
  transformers' parameters are views of an mmap of the file that page in on first use, so its
  load alone defers work that the forward pass pays; weightstream's are filled at load.

CPU (the default; ~1 GB f32 model):

    .venv/bin/python scripts/bench_transformers.py --rounds 5

GPU (owed; an 8B-class shape, ~16 GB bf16, random weights written first; skips without a GPU):

    python scripts/bench_transformers.py --device cuda --shape 8b --rounds 3

`--dir` keeps the checkpoint (written once, reused when its config matches).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # ~1.0 GB in f32 (246 M parameters): Llama-shaped, 16 layers of hidden 1024. The CPU default:
    # CPUs run f32 (bf16 matmuls on a CPU without AMX take seconds and drown the load).
    "1gb": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4),
    # ~1.0 GB in bf16 (490 M parameters): 14 layers of hidden 1536.
    "1gb-bf16": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=12, num_key_value_heads=4),
    # Llama-3-8B: 8.0 B parameters, 16 GB in bf16.
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    # For a quick try of the script itself.
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def write_checkpoint(d, shape, dtype_name, shard_bytes, gen_device):
    """Random weights for LlamaForCausalLM of `shape`, written shard by shard (a shard in memory
    at a time) with an index, as save_pretrained lays a checkpoint out."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    d = Path(d)
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, dtype=dtype_name)
    stamp = {"shape": shape, "dtype": dtype_name, "shard_bytes": shard_bytes}
    if (d / "bench.json").exists() and json.loads((d / "bench.json").read_text()) == stamp:
        return d
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("*.safetensors"):
        f.unlink()
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    cfg.save_pretrained(d)
    GenerationConfig.from_model_config(cfg).save_pretrained(d)
    names = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    gen = torch.Generator(device=gen_device).manual_seed(0)
    groups, cur, size = [], [], 0
    for name, shp in names:
        n = torch.Size(shp).numel() * dtype.itemsize
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shp in group:
            t = torch.randn(shp, generator=gen, device=gen_device, dtype=torch.float32).mul_(0.02).to(dtype)
            shard[name] = t.cpu()
            weight_map[name] = fname
            total += shard[name].nbytes
        save_file(shard, d / fname, metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (d / "bench.json").write_text(json.dumps(stamp))
    return d


CHILD = r"""
import gc, json, resource, sys, time
import torch
import transformers
import weightstream.transformers as wst
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama  # model code imported before the clock starts

which, d, device, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
cuda = device.startswith("cuda")
if cuda:
    torch.zeros(1, device=device)  # the CUDA context, outside the timings

def sync():
    if cuda:
        torch.cuda.synchronize()

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

base = anon()
c0 = cpu()
t0 = time.perf_counter()
if which == "transformers":
    kwargs = {"device_map": device} if cuda else {}
    model = AutoModelForCausalLM.from_pretrained(d, **kwargs)
elif which == "weightstream":
    model = wst.from_pretrained(d, device=device)
else:  # "ceiling": the same bytes into torch tensors, one load_into per file, no model
    import glob, weightstream as ws
    loader = ws.Loader(device=device)
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        dests = {n: torch.empty(shape, dtype=getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[st]), device=device)
                 for n, _, st, shape, _ in loader.describe(f)}
        loader.load_into(f, dests)
        out.update(dests)
sync()
t1 = time.perf_counter()
if which == "ceiling":
    print(json.dumps({"load": t1 - t0, "load_forward": float("nan"), "cpu_load": cpu() - c0, "cpu_load_forward": float("nan"),
                      "rss_load": anon() - base, "check": 0.0}))
    sys.exit(0)
c1 = cpu()
rss_load = anon() - base
ids = torch.arange(1, 17, device=model.device).unsqueeze(0)
with torch.no_grad():
    logits = model(input_ids=ids).logits
    check = float(logits.float().sum()) + float(model.get_input_embeddings().weight.float().sum())
sync()
t2 = time.perf_counter()
c2 = cpu()
print(json.dumps({"load": t1 - t0, "load_forward": t2 - t0, "cpu_load": c1 - c0, "cpu_load_forward": c2 - c0,
                  "rss_load": rss_load, "check": check}))
"""


def run_one(which, d, device, threads):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(d), device, str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(d):
    """Read every file once so both loaders start from a warm page cache."""
    for f in sorted(Path(d).iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: 1gb on the CPU, 8b on a GPU")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", help="where the checkpoint is written (kept); default a temporary folder")
    ap.add_argument("--shard", default=2 << 30, type=int, help="bytes per shard (default 2 GiB)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the forward pass")
    args = ap.parse_args()

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here: skipped")
        return 0
    shape = args.shape or ("8b" if cuda else "1gb")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")

    tmp = None
    if args.dir:
        d = Path(args.dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-transformers-")
        d = Path(tmp.name)
    t = time.perf_counter()
    write_checkpoint(d, shape, args.dtype, args.shard, args.device if cuda else "cpu")
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    files = len(list(d.glob("*.safetensors")))
    print(f"checkpoint: {d} ({shape}, {args.dtype}, {size / 1e9:.2f} GB in {files} files; ready in {time.perf_counter() - t:.1f} s)")
    print(f"device {args.device}, {args.rounds} rounds after one warm-up round, alternating order, fresh process per load")

    import transformers

    import weightstream

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, weightstream {weightstream.__version__}, {os.cpu_count()} CPUs")
    warm(d)
    results = {"transformers": [], "weightstream": [], "ceiling": []}
    order = ["transformers", "weightstream", "ceiling"]
    for r in range(args.rounds + 1):
        for which in order if r % 2 == 0 else order[::-1]:
            res = run_one(which, d, args.device, args.threads)
            if r > 0:
                results[which].append(res)
            gc.collect()
    checks = {w: {round(x["check"], 3) for x in rs} for w, rs in results.items() if w != "ceiling"}
    if checks["transformers"] != checks["weightstream"]:
        print(f"WARNING: the forward passes differ: {checks}")

    def med(which, key):
        return statistics.median(x[key] for x in results[which])

    def low(which, key):
        return min(x[key] for x in results[which])

    print()
    print("medians (fastest round in brackets); cpu = user + sys seconds of the loading process")
    head = f"{'':14} {'load (s)':>16} {'load+forward (s)':>18} {'cpu load':>9} {'cpu load+fwd':>13} {'RssAnon after load':>19}"
    print(head)
    for which in order:
        if which == "ceiling":
            print(f"{which:14} {med(which, 'load'):7.3f} [{low(which, 'load'):6.3f}] {'-':>18} {med(which, 'cpu_load'):9.2f} {'-':>13}"
                  f" {med(which, 'rss_load') / 1e9:16.2f} GB")
            continue
        print(f"{which:14} {med(which, 'load'):7.3f} [{low(which, 'load'):6.3f}] {med(which, 'load_forward'):8.3f} [{low(which, 'load_forward'):6.3f}]"
              f" {med(which, 'cpu_load'):9.2f} {med(which, 'cpu_load_forward'):13.2f} {med(which, 'rss_load') / 1e9:16.2f} GB")
    ratio = {k: med("weightstream", k) / med("transformers", k) for k in ("load", "load_forward", "cpu_load", "cpu_load_forward")}
    print(f"{'ratio ws/tf':14} {ratio['load']:6.2f}x {'':8} {ratio['load_forward']:7.2f}x {'':8} {ratio['cpu_load']:8.2f}x {ratio['cpu_load_forward']:12.2f}x")
    print(f"GB/s (weightstream load): {size / 1e9 / med('weightstream', 'load'):.2f}; "
          f"(transformers load): {size / 1e9 / med('transformers', 'load'):.2f}")
    for which in order:
        print(f"  {which} rounds load:    " + " ".join(f"{x['load']:.3f}" for x in results[which]))
        if which != "ceiling":
            print(f"  {which} rounds load+fwd: " + " ".join(f"{x['load_forward']:.3f}" for x in results[which]))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
