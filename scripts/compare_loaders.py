#!/usr/bin/env python3
"""Side-by-side GPU load benchmark on one file, in one run (run it on a GPU machine).

Measures, on the same file: torch's pinned host-to-device bandwidth (the physical limit),
safetensors.torch.load_file(device="cuda:0"), fastsafetensors / Run:ai Model Streamer /
InstantTensor where their packages import, and weightstream (`bench --json`). Each Python loader
runs in its own process, so its peak host RSS is its own; the RSS column is that peak minus the
same process's RSS after importing torch and creating the CUDA context (for weightstream: its
`load --json` peak minus the peak of a process that only creates a CUDA context, 123 MiB on the
H100 machine). Prints a table of medians and writes JSON with --json-out.

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


def loaders(path):
    import torch

    def sync_drop(x):
        torch.cuda.synchronize()
        del x

    def st():
        from safetensors.torch import load_file
        sync_drop(load_file(path, device="cuda:0"))

    def fst():
        from fastsafetensors import fastsafe_open
        with fastsafe_open(filenames=[path], nogds=True, device="cuda:0") as f:
            ts = {k: f.get_tensor(k).clone() for k in f.keys()}
        sync_drop(ts)

    def runai():
        from runai_model_streamer import SafetensorsStreamer
        ts = {}
        with SafetensorsStreamer() as s:
            s.stream_file(path)
            for name, t in s.get_tensors():
                ts[name] = t.to("cuda:0", non_blocking=True)
        sync_drop(ts)

    def it():
        from instanttensor import safe_open
        with safe_open(path, framework="pt", device=0) as f:
            ts = dict(f.tensors())
        sync_drop(ts)

    return {"safetensors load_file cuda": st, "fastsafetensors (nogds)": fst,
            "runai-model-streamer": runai, "instanttensor": it}


def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def rss_now():
    return status_bytes("VmRSS:")


def run_one(a):
    """Child process: one loader, its times and its own RSS figures."""
    import torch
    torch.zeros(1, device="cuda:0")  # CUDA context
    base = rss_now()
    fn = loaders(a.file)[a.one]
    secs = timed(fn, a.runs, a.cold, a.file)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would report
    # the parent's high-water mark (the 4 GiB pinned tensor of the limit measurement).
    peak = status_bytes("VmHWM:")
    print(json.dumps({"secs": secs, "base_rss": base, "peak_rss": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--weightstream")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--extra", nargs="*", default=[], help="extra args for weightstream bench")
    ap.add_argument("--ws-strategy", action="append", default=None,
                    help="weightstream bench strategies (repeatable; default: pipeline, mmap-copy)")
    a = ap.parse_args()
    if a.one:
        return run_one(a)
    import torch
    size = os.path.getsize(a.file)
    rows = []  # (name, median seconds, bytes, extra host RSS or None)

    # Physical limit: pinned host -> device copy of the same number of bytes.
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    secs = []
    for _ in range(a.runs + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        torch.cuda.synchronize()
        secs.append(s.elapsed_time(e) / 1e3)
    rows.append(("torch pinned H2D (limit)", statistics.median(secs[1:]), size, None))
    del src, dst
    torch.cuda.empty_cache()

    for name in loaders(a.file):
        cmd = [sys.executable, __file__, a.file, "--one", name, "--runs", str(a.runs)] + (["--cold"] if a.cold else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: not run: {r.stderr.strip().splitlines()[-1:] or r.returncode}", file=sys.stderr)
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append((name, statistics.median(d["secs"]), size, d["peak_rss"] - d["base_rss"]))

    if a.weightstream:
        W = a.weightstream
        strategies = [x for s in (a.ws_strategy or ["pipeline", "mmap-copy"]) for x in ("--strategy", s)]
        cmd = [W, "bench", a.file, "--device", "cuda", "--runs", str(a.runs), "--json"] + strategies \
            + (["--cold"] if a.cold else []) + a.extra
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"weightstream failed: {r.stderr}", file=sys.stderr)
        else:
            # Peak RSS of one load, minus that of a process that only creates the CUDA context.
            def peak(path):
                out = subprocess.run([W, "load", path, "--device", "cuda", "--json", "--quiet"] + a.extra,
                                     capture_output=True, text=True, check=True).stdout
                return json.loads(out)["peak_host_rss_bytes"]
            tiny = os.path.join(os.path.dirname(os.path.abspath(a.file)), ".ws_tiny.safetensors")
            hdr = b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
            with open(tiny, "wb") as f:
                f.write(len(hdr).to_bytes(8, "little") + hdr + b"\0")
            extra_rss = peak(a.file) - peak(tiny)
            os.unlink(tiny)
            for res in json.loads(r.stdout)["results"]:
                rows.append(("weightstream " + res["strategy"], res["median_s"], res["bytes"],
                             extra_rss if res["strategy"] == "pipeline" else None))

    limit = rows[0][1]
    st = next((r[1] for r in rows if r[0].startswith("safetensors")), None)
    print(f"{a.file}: {size / 2**20:.1f} MiB, {'cold' if a.cold else 'warm'} cache, "
          f"{torch.cuda.get_device_name(0)}, medians of {a.runs}")
    print(f"{'loader':<32} {'median s':>9} {'GB/s':>8} {'of limit':>9} {'vs safetensors':>15} {'host RSS +MiB':>14}")
    out = []
    for name, med, nbytes, rss in rows:
        gbps = nbytes / med / 1e9
        frac = limit / med
        vs = (st / med) if st else float("nan")
        rss_s = f"{rss / 2**20:.0f}" if rss is not None else "-"
        print(f"{name:<32} {med:>9.4f} {gbps:>8.2f} {frac * 100:>8.1f}% {vs:>14.2f}x {rss_s:>14}")
        out.append({"loader": name, "median_s": med, "gbps": gbps, "fraction_of_pinned_h2d": frac,
                    "speedup_vs_safetensors": vs, "extra_host_rss_bytes": rss})
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"file": a.file, "bytes": size, "cold": a.cold, "device": torch.cuda.get_device_name(0),
                       "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
