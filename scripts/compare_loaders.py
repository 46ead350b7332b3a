#!/usr/bin/env python3
"""Side-by-side GPU load benchmark on one file, in one run (run it on a GPU machine).

Measures, on the same file: torch's pinned host-to-device bandwidth (the physical limit),
safetensors.torch.load_file(device="cuda:0"), fastsafetensors / Run:ai Model Streamer /
InstantTensor where their packages import, and weightstream (`bench --json`). Prints a table of
medians and writes JSON with --json-out.

usage: compare_loaders.py FILE --weightstream PATH/TO/weightstream [--runs 5] [--cold]
"""
import argparse, json, os, statistics, subprocess, sys, time


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, runs, cold, path):
    out = []
    if not cold:
        fn()  # warm-up
    for _ in range(runs):
        if cold:
            evict(path)
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--weightstream", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--extra", nargs="*", default=[], help="extra args for weightstream bench")
    a = ap.parse_args()
    import torch
    size = os.path.getsize(a.file)
    rows = []

    # Physical limit: pinned host -> device copy of the same number of bytes.
    n = size
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    secs = []
    for _ in range(a.runs + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        torch.cuda.synchronize()
        secs.append(s.elapsed_time(e) / 1e3)
    rows.append(("torch pinned H2D (limit)", secs[1:], n))
    del src, dst
    torch.cuda.empty_cache()

    def sync_drop(x):
        torch.cuda.synchronize()
        del x

    try:
        from safetensors.torch import load_file
        rows.append(("safetensors load_file cuda", timed(lambda: sync_drop(load_file(a.file, device="cuda:0")), a.runs, a.cold, a.file), size))
    except Exception as e:  # noqa: BLE001
        print(f"safetensors: not run: {e}", file=sys.stderr)

    try:
        from fastsafetensors import fastsafe_open

        def fst():
            with fastsafe_open(filenames=[a.file], nogds=True, device="cuda:0") as f:
                ts = {k: f.get_tensor(k).clone() for k in f.keys()}
            sync_drop(ts)
        rows.append(("fastsafetensors (nogds)", timed(fst, a.runs, a.cold, a.file), size))
    except Exception as e:  # noqa: BLE001
        print(f"fastsafetensors: not run: {e}", file=sys.stderr)

    try:
        from runai_model_streamer import SafetensorsStreamer

        def runai():
            ts = {}
            with SafetensorsStreamer() as s:
                s.stream_file(a.file)
                for name, t in s.get_tensors():
                    ts[name] = t.to("cuda:0", non_blocking=True)
            sync_drop(ts)
        rows.append(("runai-model-streamer", timed(runai, a.runs, a.cold, a.file), size))
    except Exception as e:  # noqa: BLE001
        print(f"runai-model-streamer: not run: {e}", file=sys.stderr)

    try:
        from instanttensor import safe_open as it_open

        def it():
            with it_open(a.file, framework="pt", device=0) as f:
                ts = dict(f.tensors())
            sync_drop(ts)
        rows.append(("instanttensor", timed(it, a.runs, a.cold, a.file), size))
    except Exception as e:  # noqa: BLE001
        print(f"instanttensor: not run: {e}", file=sys.stderr)

    # weightstream, same file, same run.
    cmd = [a.weightstream, "bench", a.file, "--device", "cuda", "--runs", str(a.runs), "--json",
           "--strategy", "pipeline", "--strategy", "mmap-copy"] + (["--cold"] if a.cold else []) + a.extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"weightstream failed: {r.stderr}", file=sys.stderr)
    else:
        doc = json.loads(r.stdout)
        for res in doc["results"]:
            label = "weightstream " + res["strategy"]
            rows.append((label, [res["median_s"]], res["bytes"], res["min_s"], res["max_s"]))

    limit = statistics.median(rows[0][1])
    st = next((statistics.median(r[1]) for r in rows if r[0].startswith("safetensors")), None)
    print(f"{a.file}: {size / 2**20:.1f} MiB, {'cold' if a.cold else 'warm'} cache, {torch.cuda.get_device_name(0)}, medians of {a.runs}")
    print(f"{'loader':<32} {'median s':>9} {'GB/s':>8} {'of limit':>9} {'vs safetensors':>15}")
    out = []
    for row in rows:
        name, secs, nbytes = row[0], row[1], row[2]
        med = statistics.median(secs)
        gbps = nbytes / med / 1e9
        frac = limit / med * (nbytes / size) if name != rows[0][0] else 1.0
        vs = (st / med) if st else float("nan")
        print(f"{name:<32} {med:>9.4f} {gbps:>8.2f} {frac * 100:>8.1f}% {vs:>14.2f}x")
        out.append({"loader": name, "median_s": med, "gbps": gbps, "fraction_of_pinned_h2d": frac, "speedup_vs_safetensors": vs})
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"file": a.file, "bytes": size, "cold": a.cold, "device": torch.cuda.get_device_name(0), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
