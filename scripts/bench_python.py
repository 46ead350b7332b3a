#!/usr/bin/env python3
"""Python load to host memory: `weightstream.load_file(p, framework="np")` against
`safetensors.numpy.load_file(p)`, same run, alternating rounds, medians.

Usage: scripts/bench_python.py [FILE] [--rounds N]   (default /work/bench/bf16_2g.safetensors, 5)

Each loader runs in its own child process per round, so that its peak RSS (`ru_maxrss`) is its
own. In the child, one untimed load (then freed) comes right before the timed one: on these VMs
memory freed a while ago costs ~1.5 s/GB of first-touch faults, memory freed just before much
less (DESIGN.md, Traps), and both loaders are treated alike. The file is read once first so the
page cache is warm. Every array is checked to be resident: one byte per 4 KiB page is summed
after the load (untimed) so that a lazy mmap cannot look free.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import gc, json, resource, sys, time
import numpy as np
import ml_dtypes  # noqa: F401  (bf16 for safetensors.numpy)
which, path = sys.argv[1], sys.argv[2]
if which == "weightstream":
    import weightstream as ws
    load = lambda: ws.load_file(path, framework="np")
else:
    import safetensors.numpy as sn
    load = lambda: sn.load_file(path)
d = load()
del d
gc.collect()
t0 = time.perf_counter()
d = load()
took = time.perf_counter() - t0
total = sum(int(a.view(np.uint8).reshape(-1)[::4096].sum()) for a in d.values() if a.nbytes)
nbytes = sum(a.nbytes for a in d.values())
print(json.dumps({"s": took, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes": nbytes, "tensors": len(d), "check": total}))
"""

LOADERS = ["weightstream", "safetensors"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default="/work/bench/bf16_2g.safetensors")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = os.path.getsize(args.file)
    with open(args.file, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    runs = {k: [] for k in LOADERS}
    checks = set()
    for r in range(args.rounds):
        order = LOADERS if r % 2 == 0 else LOADERS[::-1]
        for which in order:
            out = subprocess.run([sys.executable, "-c", CHILD, which, args.file], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout)
            runs[which].append(res)
            checks.add(res["check"])
            print(f"round {r + 1} {which:>12}: {res['s']:.3f} s, peak RSS {res['peak'] / 2**20:.0f} MiB", file=sys.stderr)
    if len(checks) != 1:
        sys.exit(f"the loaders disagree on the bytes: {checks}")
    med = {k: (statistics.median(x["s"] for x in v), statistics.median(x["peak"] for x in v)) for k, v in runs.items()}
    gib = size / 2**30
    print(f"file: {args.file} ({gib:.2f} GiB, {runs['weightstream'][0]['tensors']} tensors), {args.rounds} alternating rounds, medians")
    print()
    print("| loader | time (s) | GB/s | peak RSS (MiB) | peak RSS / file |")
    print("|---|---|---|---|---|")
    for k in LOADERS:
        s, peak = med[k]
        print(f"| {k} | {s:.3f} | {size / s / 1e9:.2f} | {peak / 2**20:.0f} | {peak / size:.2f}x |")
    ratio = med["weightstream"][0] / med["safetensors"][0]
    print()
    print(f"weightstream / safetensors time: {ratio:.2f}x (goal <= 0.5x); "
          f"peak RSS {med['weightstream'][1] / size:.2f}x the file (goal <= 1.1x)")


if __name__ == "__main__":
    main()
