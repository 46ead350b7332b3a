"""The ranks of test_distributed.py, and the parent's side of running them.

``run_group(world, jobs, workdir)`` starts ``world`` processes from ``torch.multiprocessing``'s
spawn context; each joins a gloo group on the loopback (``tcp://127.0.0.1:<free port>``), runs
the ``jobs`` in order and writes what it saw after each job to ``workdir/rank<r>.pkl``: per job
the ``(name, dtype, shape, sha256)`` of every tensor in the order received, the iterator's byte
counters, and the error it raised (its class names, ``.rank``, message and the time). A rank
named by a job's ``fault`` breaks that job on purpose (raises in its loop, SIGKILLs or SIGSTOPs
itself) after ``after`` tensors and writes the time first. The parent waits with a hard deadline,
kills what is left and reports every child that had not exited by itself."""

import hashlib
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from pathlib import Path


class ConsumerFailed(RuntimeError):
    """What a faulting rank's loop raises."""


# Iterators an "abandon" fault left alive to the end of the process (a global of the program).
_ABANDONED = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(name, t):
    """``(name, dtype, shape, sha256 of the bytes)`` of a torch tensor."""
    import torch

    c = t.detach().cpu().contiguous()
    raw = c.reshape(-1).view(torch.uint8).numpy()
    return (name, str(c.dtype).replace("torch.", ""), tuple(c.shape), hashlib.sha256(raw).hexdigest())


def _counters(it):
    if it is None:
        return None
    return {k: getattr(it, k, None) for k in ("bytes_read", "bytes_sent", "bytes_received")}


def _error(e):
    return {
        "type": type(e).__name__,
        "mro": [c.__name__ for c in type(e).__mro__],
        "rank": getattr(e, "rank", None),
        "message": str(e),
        "time": time.time(),
        "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:],
    }


def _fault(fault, workdir, rank):
    """Break this rank's load as ``fault["how"]`` says, the time written first."""
    how = fault["how"]
    (Path(workdir) / "fault_time").write_text(repr(time.time()))
    if how == "raise":
        raise ConsumerFailed(f"rank {rank}'s consumer fails on purpose")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(3600)  # not reached: the parent SIGKILLs a stopped rank
    raise AssertionError(f"unknown fault {how!r}")


def _consume(make, out, fault_after, fault, workdir, rank, keep, use_with):
    """Iterate what ``make()`` returns, recording every item. The faulting rank's loop raises
    out of this frame with the iterator referenced by nothing else (the consumer of a real
    framework's loading loop), so the exception in the loop is all that tells weightstream."""
    it = make()
    if keep:
        out["_it"] = it
    if use_with:
        with it:
            for i, (name, t) in enumerate(it):
                if i == fault_after:
                    _fault(fault, workdir, rank)
                out["stream"].append(digest(name, t))
    else:
        for i, (name, t) in enumerate(it):
            if i == fault_after and fault["how"] == "abandon":
                # Stops reading, neither closes nor drops it: the process exits with the load
                # alive, and only weightstream's exit handler can tell the others.
                (Path(workdir) / "fault_time").write_text(repr(time.time()))
                _ABANDONED.append(it)
                break
            if i == fault_after:
                _fault(fault, workdir, rank)
            out["stream"].append(digest(name, t))
    out["counters"] = _counters(it)


def _run_job(job, rank, world, groups, workdir):
    import torch.distributed as dist

    import weightstream as ws
    import weightstream.distributed as wsd

    kw = dict(job.get("kwargs", {}))
    if "shard_world" in job:
        kw["shard"] = (rank % job["shard_world"], job["shard_world"])
    kw.update(job.get("per_rank", {}).get(rank, {}))
    group = groups[job.get("group", "world")]
    fault = job.get("fault")
    faulting = fault is not None and fault["rank"] == rank
    fault_after = fault["after"] if faulting else -1
    api = job["api"]
    path = job["path"]
    out = {"stream": [], "counters": None, "error": None, "started": time.time()}
    try:
        if api == "wsd.iterate":
            # group=None: WORLD (the default), else the group object.
            make = lambda: wsd.iterate(path, group, **kw)  # noqa: E731
        elif api == "Loader.iterate":
            opts = kw.pop("storage_options", None)
            g = dist.group.WORLD if group is None else group
            make = lambda: ws.Loader(storage_options=opts).iterate(path, group=g, **kw)  # noqa: E731
        elif api in ("ws.load_file", "wsd.load_file"):
            g = dist.group.WORLD if group is None else group
            if api == "ws.load_file":
                d = ws.load_file(path, "cpu", group=g, **kw)
            else:
                d = wsd.load_file(path, group=g, **kw)
            out["stream"] = [digest(n, t) for n, t in d.items()]
            return out
        else:
            raise AssertionError(f"unknown api {api!r}")
        keep = not (faulting and fault["how"] == "raise")
        _consume(make, out, fault_after, fault, workdir, rank, keep, job.get("with", False))
    except BaseException as e:  # noqa: BLE001 (recorded for the parent, which judges it)
        out["error"] = _error(e)
        out["counters"] = _counters(out.get("_it"))
    finally:
        out.pop("_it", None)
        out["finished"] = time.time()
        sg = sys.modules.get("weightstream._side_groups")
        if sg is not None:
            # The side groups this rank keeps for later loads, and those it retired.
            out["side_groups"] = (len(sg.registry), len(sg.retired))
    return out


def _write(workdir, rank, result):
    tmp = Path(workdir) / f".rank{rank}.pkl"
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, Path(workdir) / f"rank{rank}.pkl")


def rank_main(rank, world, init_method, jobs, workdir):
    """One rank: join the gloo group, run the jobs, write the results after each."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result = {"rank": rank, "jobs": {}, "setup_error": None}
    try:
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        groups = {"world": None}
        if any(j.get("group") == "node" for j in jobs):
            import weightstream.distributed as wsd

            groups["node"] = wsd.node_group(node=rank // 2)
    except BaseException as e:  # noqa: BLE001
        result["setup_error"] = _error(e)
        _write(workdir, rank, result)
        return
    for job in jobs:
        out = _run_job(job, rank, world, groups, workdir)
        result["jobs"][job["id"]] = out
        _write(workdir, rank, result)
        fault = job.get("fault")
        if fault is not None and fault["rank"] == rank and fault["how"] == "abandon":
            break  # exits at once, its load alive
        if fault is not None and fault["rank"] == rank and fault["how"] == "raise":
            # The failed rank lives on (a program handling its error) until the others have
            # answered, so that they see a failure, not a lost peer.
            _wait_for_others(workdir, rank, world, job["id"], 45)
        if out["error"] is not None:
            break  # the group is broken: the others raise within their timeout
    (Path(workdir) / f"done{rank}").write_text("")
    if all(job.get("destroy", True) for job in jobs):
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (a broken group may refuse; the exit is what is checked)
            pass


def _wait_for_others(workdir, rank, world, job_id, seconds):
    deadline = time.monotonic() + seconds
    others = [r for r in range(world) if r != rank]
    while time.monotonic() < deadline:
        if all((Path(workdir) / f"done{r}").exists() for r in others):
            return
        time.sleep(0.1)


def run_group(world, jobs, workdir, deadline=120, stuck=()):
    """Run ``jobs`` on ``world`` spawned ranks; returns ``(results, exitcodes, seconds, fault_time)``.

    ``results[r]`` is rank r's last written result (None if it wrote none). Waits at most
    ``deadline`` seconds for the ranks not in ``stuck`` to exit by themselves, then SIGKILLs
    every rank still alive (a stuck one is expected to be; any other is a hang, reported in
    ``exitcodes`` as ``"hung"``). Every child is reaped before this returns."""
    import torch.multiprocessing as mp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=rank_main, args=(r, world, init, jobs, str(workdir)), daemon=True) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    end = t0 + deadline
    hung = set()
    try:
        for r, p in enumerate(procs):
            if r in stuck:
                continue
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                hung.add(r)
    finally:
        for r, p in enumerate(procs):
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(10)
    seconds = time.monotonic() - t0
    exitcodes = {r: ("hung" if r in hung else ("alive" if p.is_alive() else p.exitcode)) for r, p in enumerate(procs)}
    results = {}
    for r in range(world):
        f = workdir / f"rank{r}.pkl"
        results[r] = pickle.loads(f.read_bytes()) if f.exists() else None
    ft = workdir / "fault_time"
    fault_time = float(ft.read_text()) if ft.exists() else None
    return results, exitcodes, seconds, fault_time
