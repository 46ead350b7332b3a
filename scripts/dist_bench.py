#!/usr/bin/env python3
"""Distributed loading on one machine: N ranks (gloo over the loopback, spawned processes)
load one checkpoint (a) as a group (`Loader.iterate(path, group=...)`: each byte read once,
shared through the group) and (b) each rank reading everything on its own (`Loader.iterate`),
in alternating rounds; per rank: bytes read, sent and received, seconds, and the host memory the
load added (peak RSS during the load minus RSS before it, sampled every 2 ms). Prints a Markdown
table of medians.

    .venv/bin/python scripts/dist_bench.py CHECKPOINT [--ranks 1 2 4] [--rounds 3] [--window 256MiB]

The page cache is warm (a first untimed load): on the loopback, gloo moves 1.1-1.9 GiB/s, about a
page-cache read, so the bytes are the figure that counts here, not the time.
"""

import argparse
import os
import socket
import statistics
import threading
import time


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The peak RSS while it runs, sampled."""

    def __init__(self):
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def stop(self):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        return self.peak - self.base


def _worker(rank, n, port, path, rounds, window, q):
    import torch.distributed as dist

    import weightstream as ws

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    loader = ws.Loader()
    # Warm the page cache, the staging ring and the side group.
    for _ in loader.iterate(path, window=window):
        pass
    with loader.iterate(path, group=dist.group.WORLD, window=window) as it:
        for _ in it:
            pass
    out = []
    for r in range(rounds):
        for mode in (("group", "alone") if r % 2 == 0 else ("alone", "group")):
            dist.barrier()
            peak = _Peak()
            t0 = time.perf_counter()
            if mode == "group":
                it = loader.iterate(path, group=dist.group.WORLD, window=window)
                nbytes = 0
                with it:
                    for _, t in it:
                        nbytes += t.nbytes
                        del t
                figures = (it.bytes_read, it.bytes_sent, it.bytes_received)
            else:
                nbytes = 0
                for _, t in loader.iterate(path, window=window):
                    nbytes += t.nbytes
                    del t
                figures = (nbytes, 0, 0)
            secs = time.perf_counter() - t0
            grown = peak.stop()
            out.append((mode, *figures, secs, grown))
    q.put((rank, out))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", default="256MiB")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    print(f"| ranks | way | bytes read / rank (MiB) | sent / rank (MiB) | received / rank (MiB) | seconds (slowest rank) | host memory added / rank (MiB, max) |")
    print("|---|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for n in args.ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, n, port, args.checkpoint, args.rounds, args.window, q)) for r in range(n)]
        for p in procs:
            p.start()
        results = dict(q.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join(60)
        for mode in ("alone", "group"):
            rows = [[x for x in results[r] if x[0] == mode] for r in range(n)]
            mib = 2**20

            def per_rank(i):
                return "/".join(f"{statistics.median(x[i] for x in rows[r]) / mib:.0f}" for r in range(n))

            secs = statistics.median(max(rows[r][k][4] for r in range(n)) for k in range(len(rows[0])))
            mem = max(max(x[5] for x in rows[r]) for r in range(n)) / mib
            way = "group (read once, shared)" if mode == "group" else "every rank reads all"
            print(f"| {n} | {way} | {per_rank(1)} | {per_rank(2)} | {per_rank(3)} | {secs:.2f} | {mem:.0f} |")


if __name__ == "__main__":
    main()
