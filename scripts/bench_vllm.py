#!/usr/bin/env python3
"""vLLM on the CPU: ``load_model`` with ``load_format="safetensors"`` (vLLM's own default reading)
against ``load_format="weightstream"``, same process, warm page cache, rounds alternating the
order; medians over the rounds.

Two times per format:

- ``load_model``: vLLM's whole ``BaseModelLoader.load_model`` (building the model, which costs the
  same for every loader, then ``load_weights``, then post-processing);
- ``load_weights``: the loader's ``load_weights`` alone (read the files, hand ``(name, tensor)`` to
  ``model.load_weights``, which copies each into its parameter, then vLLM's loaded-weights check).

Each also with its CPU time (all threads): reading into our own memory is work that only
overlaps with the model's copies where a core is free. The ratio is weightstream / safetensors (below 1: weightstream is faster); the bar of issue 22 is
``load_weights`` <= 0.8.

``--profile`` also splits the weightstream time: ``Loader.iterate`` alone (tensors dropped),
``safe_open`` + ``get_tensor`` alone (what vLLM's iterator does), and ``model.load_weights`` fed
from tensors already in memory (the copies alone).

Usage (from the repository root)::

    .venv-serving/bin/python scripts/bench_vllm.py --rounds 5 [--dir /tmp/ws-bench-llama] [--dtype float32]
        [--extra '{"window": "256MiB"}'] [--profile]

The checkpoint (a random Llama of about 1 GiB in one ``model.safetensors``, names and shapes from
transformers' ``LlamaForCausalLM``, written with ``safetensors``) is written once and reused.
"""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import argparse
import gc
import json
import resource
import socket
import statistics
import time
from pathlib import Path

import torch


def write_checkpoint(d, dtype):
    """A random Llama of ~1 GiB (f32: 267M parameters; bf16: the same shapes, half the bytes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(d)
    if (d / "model.safetensors").exists() and (d / "config.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
        tie_word_embeddings=False, torch_dtype=dtype,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g).to(getattr(torch, dtype)) for k, s in shapes.items()}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(d)
    return d


def _cpu_seconds():
    """User + system CPU time of this process, all its threads (on a busy machine the work
    done is steadier than the wall time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/ws-bench-vllm-llama")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--extra", default="{}", help="model_loader_extra_config for weightstream (JSON)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    d = write_checkpoint(args.dir, args.dtype)
    size = (d / "model.safetensors").stat().st_size
    with open(d / "model.safetensors", "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass

    import vllm.plugins
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import get_model_loader

    vllm.plugins.load_general_plugins()  # our entry point registers "weightstream"
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{free_port()}", backend="gloo"
        )
        initialize_model_parallel(1, 1)

    extra = json.loads(args.extra)

    def configs(fmt):
        mc = ModelConfig(model=str(d), tokenizer=str(d), skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True)
        lc = LoadConfig(
            load_format=fmt, model_loader_extra_config=dict(extra) if fmt == "weightstream" else {},
            use_tqdm_on_load=False,
        )
        return mc, lc, VllmConfig(model_config=mc, load_config=lc, device_config=DeviceConfig(device="cpu"))

    def one(fmt):
        mc, lc, vc = configs(fmt)
        with set_current_vllm_config(vc):
            loader = get_model_loader(lc)
            inner = loader.load_weights
            phase = {}

            def timed(model, model_config):
                cpu = _cpu_seconds()
                t = time.perf_counter()
                inner(model, model_config)
                phase["load_weights"] = time.perf_counter() - t
                phase["cpu"] = _cpu_seconds() - cpu

            loader.load_weights = timed  # load_model calls self.load_weights
            t = time.perf_counter()
            model = loader.load_model(vllm_config=vc, model_config=mc)
            total = time.perf_counter() - t
        del model
        gc.collect()
        return total, phase["load_weights"], phase["cpu"]

    fmts = ["safetensors", "weightstream"]
    for f in fmts:  # warm-up, not counted
        one(f)
    times = {f: {"load_model": [], "load_weights": [], "cpu": []} for f in fmts}
    for r in range(args.rounds):
        for f in (fmts if r % 2 == 0 else fmts[::-1]):
            total, lw, cpu = one(f)
            times[f]["load_model"].append(total)
            times[f]["load_weights"].append(lw)
            times[f]["cpu"].append(cpu)
            print(f"round {r} {f:12s} load_model {total:.3f} s  load_weights {lw:.3f} s (cpu {cpu:.2f} s)", flush=True)

    med = {f: {k: statistics.median(v) for k, v in t.items()} for f, t in times.items()}
    print(f"\n{size / 2**30:.2f} GiB {args.dtype} Llama, {args.rounds} rounds, medians (extra={extra}):")
    for f in fmts:
        m = med[f]
        print(f"  {f:12s} load_model {m['load_model']:.3f} s   load_weights {m['load_weights']:.3f} s "
              f"({size / 2**30 / m['load_weights']:.2f} GiB/s; CPU time of all threads {m['cpu']:.2f} s)")
    for k in ("load_model", "load_weights"):
        # Also the median of each round's own ratio: the two loads of a round ran side by side,
        # so a busy machine's drift cancels in it.
        paired = statistics.median(w / s for w, s in zip(times["weightstream"][k], times["safetensors"][k]))
        print(f"  ratio weightstream/safetensors {k}: {med['weightstream'][k] / med['safetensors'][k]:.2f} "
              f"(median of the rounds' ratios {paired:.2f})")

    if args.profile:
        profile(d, args, extra, configs)


def profile(d, args, extra, configs):
    """Where the load_weights time goes: reading alone, and the model's copies alone."""
    import weightstream as ws
    from safetensors import safe_open
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from weightstream.vllm import parse_extra_config

    f = d / "model.safetensors"
    opts = parse_extra_config(extra)
    loader = ws.Loader("cpu", **opts.loader)
    window = opts.window or (1 << 30)

    def iterate():
        for _, t in loader.iterate(f, window=window, dtype=opts.dtype):
            del t

    def st_iter():
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                h.get_tensor(k)

    def med(fn, n=max(3, args.rounds)):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    print("\nprofile (medians):")
    print(f"  weightstream Loader.iterate alone (tensors dropped): {med(iterate):.3f} s")
    print(f"  safetensors safe_open + get_tensor alone:           {med(st_iter):.3f} s")
    mc, lc, vc = configs("safetensors")
    with set_current_vllm_config(vc):
        model = get_model_loader(lc).load_model(vllm_config=vc, model_config=mc)
        held = list(loader.load(f, dtype=opts.dtype).items())  # in memory: the copies alone
        print(f"  model.load_weights from tensors in memory:          {med(lambda: model.load_weights(iter(held))):.3f} s")


if __name__ == "__main__":
    main()
