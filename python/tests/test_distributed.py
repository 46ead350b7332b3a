"""``weightstream.distributed`` with real processes: 2, 3 and 4 ranks spawned by
``torch.multiprocessing`` in a gloo group on the loopback (dist_support.py runs them), each
rank's stream against a single-process load of the same checkpoint, and the bytes each rank
read, sent and received against figures computed here from the headers (json), not from
weightstream. Also a loopback S3 server (moto behind a counting proxy) read by 4 ranks in 2
simulated nodes, and the faults: a rank that raises in its loop, one SIGKILLed, one SIGSTOPped,
and ranks that disagree on the options. Every group runs under a hard deadline: a hang fails the
test and its processes are killed."""

import collections
import fnmatch
import http.client
import json
import os
import re
import struct
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

torch = pytest.importorskip("torch", reason="SKIPPED: torch not installed (the distributed loader runs on torch.distributed)")
import torch.distributed as dist  # noqa: E402

import weightstream as ws  # noqa: E402

from dist_support import digest, free_port, run_group  # noqa: E402
from test_remote import _missing, _wait_for  # noqa: E402  (the remote tests' server helpers)

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("SKIPPED: this torch has no torch.distributed with gloo", allow_module_level=True)

WINDOW = "4MiB"
SPLIT = {"*.q_proj.weight": 0, "*.o_proj.weight": 1}
# Hard deadlines (seconds) for a group of spawned ranks to finish, on a 2-core machine.
GROUP_DEADLINE = 150
FAULT_DEADLINE = 90


# ---------------------------------------------------------------------------------------------
# Checkpoints, written by the reference safetensors; figures from their headers


def _single_tensors():
    """~25.7 MiB of tensors of varied sizes and dtypes: bf16, f16, f32, f64, i64, u8, bool, a
    scalar, an empty one and odd sizes. The split dims divide by 2, 3 and 4."""
    g = torch.Generator().manual_seed(24)
    t = {"model.embed.weight": torch.randn(1536, 1024, generator=g).to(torch.bfloat16)}  # 3 MiB, the largest
    for i in range(4):
        t[f"layers.{i}.q_proj.weight"] = torch.randn(768, 1536, generator=g).to(torch.bfloat16)
        t[f"layers.{i}.o_proj.weight"] = torch.randn(1536, 384, generator=g).to(torch.float16)
        t[f"layers.{i}.mlp.weight"] = torch.randn(600, 1000, generator=g)
        t[f"layers.{i}.norm.weight"] = torch.randn(1000 + i, generator=g)
    t["rope.inv_freq"] = torch.randn(4096, generator=g, dtype=torch.float64)
    t["position_ids"] = torch.arange(2048).reshape(1, 2048)
    t["odd.bytes"] = torch.randint(0, 256, (12345,), dtype=torch.uint8, generator=g)
    t["odd.mask"] = torch.rand(7, 13, generator=g) > 0.5
    t["scalar"] = torch.tensor(3.5)
    t["empty"] = torch.zeros(0, 8)
    return t


def _sharded_tensors():
    """Three shards' worth (~10 MiB): (file stem, {name: tensor}) in shard order."""
    g = torch.Generator().manual_seed(25)
    shards = [{"model.embed.weight": torch.randn(1024, 768, generator=g).to(torch.bfloat16)}, {}, {}]
    for i in range(3):
        s = shards[1] if i < 2 else shards[2]
        s[f"layers.{i}.q_proj.weight"] = torch.randn(384, 768, generator=g).to(torch.bfloat16)
        s[f"layers.{i}.o_proj.weight"] = torch.randn(768, 384, generator=g).to(torch.float16)
        s[f"layers.{i}.mlp.weight"] = torch.randn(500, 700, generator=g)
        s[f"layers.{i}.norm.weight"] = torch.randn(700, generator=g)
    shards[0]["layers.0.q_proj.weight"] = shards[1].pop("layers.0.q_proj.weight")
    shards[2]["lm_head.weight"] = torch.randn(1001, 769, generator=g)  # odd: 3,079,076 bytes
    return shards


def header(path):
    """{name: (dtype, shape, stored bytes)} of a .safetensors file, read with json."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    h.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in h.items()}


FLOAT_SIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def figures(files):
    """Data bytes, file bytes, the largest tensor's bytes, and the bytes of the tensors SPLIT
    splits (S) and does not (U), over ``files``."""
    tensors = {}
    for f in files:
        tensors.update(header(f))
    split = {k for k in tensors if any(fnmatch.fnmatchcase(k, g) for g in SPLIT)}
    return SimpleNamespace(
        data=sum(b for _, _, b in tensors.values()),
        file_bytes=sum(os.path.getsize(f) for f in files),
        largest=max(b for _, _, b in tensors.values()),
        split=sum(tensors[k][2] for k in split),
        unsplit=sum(b for k, (_, _, b) in tensors.items() if k not in split),
        count=len(tensors),
        count_unsplit=len(tensors) - len(split),
        # Loaded bytes with dtype="f32": F16/BF16/F64 tensors change size, the others keep it.
        f32=sum(b * 4 // FLOAT_SIZE[d] if d in FLOAT_SIZE else b for d, _, b in tensors.values()),
    )


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("dist")
    single = root / "single" / "model.safetensors"
    single.parent.mkdir()
    save_file(_single_tensors(), str(single))
    sdir = root / "sharded"
    sdir.mkdir()
    shards = _sharded_tensors()
    weight_map, total, files = {}, 0, []
    for k, tensors in enumerate(shards, 1):
        name = f"model-{k:05}-of-{len(shards):05}.safetensors"
        save_file(tensors, str(sdir / name))
        files.append(sdir / name)
        for n, t in tensors.items():
            weight_map[n] = name
            total += t.numel() * t.element_size()
    index = sdir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    ns = SimpleNamespace(root=root, file=str(single), index=str(index), shard_files=files, f=figures([single]), fs=figures(files))
    ns.fs.file_bytes += os.path.getsize(index)  # the index is a file of the checkpoint too
    assert ns.f.data > 6 * 4 * 2**20, "the single file must span several 4 MiB windows"
    return ns


_refs = {}


def ref(path, **kw):
    """A single-process load's stream: ``Loader().iterate`` digests, checked equal to
    ``load_file``'s (and, for a plain load, to safetensors' own)."""
    key = (path, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _refs:
        it = [digest(n, t) for n, t in ws.Loader().iterate(path, window="16MiB", **kw)]
        lf = [digest(n, t) for n, t in ws.load_file(path, **kw).items()]
        assert it == lf, f"single-process iterate and load_file disagree on {path} {kw}"
        if not kw and path.endswith(".safetensors"):
            from safetensors.torch import load_file

            st = sorted(digest(n, t) for n, t in load_file(path).items())
            assert sorted(it) == st, "weightstream's single-process load differs from safetensors'"
        _refs[key] = it
    return _refs[key]


# ---------------------------------------------------------------------------------------------
# Running groups


def _describe(results, codes, seconds):
    lines = [f"group ran {seconds:.1f} s; exit codes {codes}"]
    for r, res in sorted(results.items()):
        if res is None:
            lines.append(f"rank {r}: wrote nothing")
            continue
        if res["setup_error"]:
            lines.append(f"rank {r}: setup failed: {res['setup_error']['traceback']}")
        for jid, out in res["jobs"].items():
            e = out["error"]
            what = "ok" if e is None else f"{e['type']}(rank={e['rank']}): {e['message']}\n{e['traceback']}"
            lines.append(f"rank {r} job {jid}: {len(out['stream'])} tensors, {out['counters']}, {what}")
    return "\n".join(lines)


class Run(SimpleNamespace):
    def job(self, rank, jid):
        res = self.results[rank]
        assert res is not None and jid in res["jobs"], f"rank {rank} has no result for {jid}\n{self.text}"
        return res["jobs"][jid]

    def ok(self, jid):
        """Every rank's output of job ``jid``, each checked to have raised nothing."""
        outs = [self.job(r, jid) for r in range(self.world)]
        for r, out in enumerate(outs):
            assert out["error"] is None, f"rank {r} job {jid} raised\n{self.text}"
        return outs


def run(world, jobs, tmp, deadline=GROUP_DEADLINE, stuck=()):
    results, codes, seconds, fault_time = run_group(world, jobs, tmp, deadline=deadline, stuck=stuck)
    text = _describe(results, codes, seconds)
    print(f"\n[{world} ranks, {[j['id'] for j in jobs]}] {text}")
    return Run(world=world, results=results, codes=codes, seconds=seconds, fault_time=fault_time, text=text)


def _happy_jobs(world, ck):
    jobs = [
        {"id": "file", "api": "wsd.iterate", "path": ck.file, "kwargs": {"window": WINDOW}},
        {"id": "sharded", "api": "Loader.iterate", "path": ck.index, "kwargs": {"window": WINDOW}, "with": True},
        # f32 doubles the bf16/f16 tensors: the largest loads as 6 MiB.
        {"id": "f32", "api": "wsd.iterate", "path": ck.file, "kwargs": {"window": "8MiB", "dtype": "f32"}},
        {"id": "split", "api": "Loader.iterate", "path": ck.file, "kwargs": {"window": WINDOW, "split": SPLIT}, "shard_world": world},
        {"id": "load_file", "api": "ws.load_file", "path": ck.index},
        {"id": "wsd_load_file", "api": "wsd.load_file", "path": ck.file, "kwargs": {"dtype": "bf16"}},
    ]
    if world == 4:
        jobs.append({"id": "split2", "api": "wsd.iterate", "path": ck.file, "kwargs": {"window": WINDOW, "split": SPLIT}, "shard_world": 2})
    # Last (the group may be unusable after): one rank disagrees on an option.
    if world == 3:
        jobs.append({"id": "mismatch", "api": "wsd.iterate", "path": ck.file, "kwargs": {"window": WINDOW, "timeout": 5}, "per_rank": {2: {"dtype": "f32"}}})
    if world == 4:
        jobs.append(
            {"id": "mismatch", "api": "Loader.iterate", "path": ck.file, "kwargs": {"window": WINDOW, "timeout": 5, "split": SPLIT}, "shard_world": 4, "per_rank": {1: {"split": {"*.q_proj.weight": 0}}}}
        )
    return jobs


_happy_runs = {}


@pytest.fixture(scope="module")
def happy(ck, tmp_path_factory):
    """``happy(world)``: the happy-path jobs run once per world size on ``world`` ranks."""

    def get(world):
        if world not in _happy_runs:
            _happy_runs[world] = run(world, _happy_jobs(world, ck), tmp_path_factory.mktemp(f"w{world}"))
        return _happy_runs[world]

    return get


def _counters(outs):
    c = [o["counters"] for o in outs]
    for r, x in enumerate(c):
        assert x is not None and all(isinstance(x[k], int) for k in x), f"rank {r}: counters {x}"
    return [x["bytes_read"] for x in c], [x["bytes_sent"] for x in c], [x["bytes_received"] for x in c]


# A window's broadcast buffer holds its tensors at 256-byte aligned offsets, and a broadcast
# moves the gaps between them too (the spec counts the bytes a broadcast moves): a rank may receive
# up to 255 bytes more than its data per broadcast tensor, never less, never a whole tensor more.
ALIGN = 256


def _check_moved(read, sent, recv, needed, broadcast_tensors, what):
    """Each rank got each byte it needs once: read + received == needed, plus at most the
    alignment gaps of the broadcast tensors; what is received was sent."""
    slack = ALIGN * broadcast_tensors
    for r in range(len(read)):
        extra = read[r] + recv[r] - needed[r]
        assert 0 <= extra < slack, f"{what}: rank {r} read {read[r]} + received {recv[r]} = needed {needed[r]} + {extra} (gaps < {slack})"
    assert sum(sent) == sum(recv), f"{what}: sent {sent}, received {recv}"


def _check_full(outs, want, data, largest, count, n, what):
    """A whole-checkpoint load on n ranks: streams, balance, each byte read once and broadcast."""
    for r, o in enumerate(outs):
        assert o["stream"] == want, f"{what}: rank {r}'s stream differs from the single-process load"
    read, sent, recv = _counters(outs)
    assert sum(read) == data, (what, read, data)
    for r in range(n):
        assert abs(read[r] - data / n) <= largest, f"{what}: rank {r} read {read[r]}, total/N = {data / n:.0f}, largest tensor {largest}"
    _check_moved(read, sent, recv, [data] * n, count, what)


# ---------------------------------------------------------------------------------------------
# Tests: whole loads, sharded checkpoints, conversion, shard= runs


@pytest.mark.parametrize("world", [2, 3, 4])
def test_stream_equals_single_process_and_each_byte_is_read_once(happy, ck, world):
    r = happy(world)
    _check_full(r.ok("file"), ref(ck.file), ck.f.data, ck.f.largest, ck.f.count, world, "file")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_checkpoint(happy, ck, world):
    r = happy(world)
    _check_full(r.ok("sharded"), ref(ck.index), ck.fs.data, ck.fs.largest, ck.fs.count, world, "sharded")
    # ws.load_file(path, group=...) collects the same stream.
    for rank, o in enumerate(r.ok("load_file")):
        assert o["stream"] == ref(ck.index), f"rank {rank}: ws.load_file(group=) differs"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_dtype_conversion(happy, ck, world):
    r = happy(world)
    outs = r.ok("f32")
    want = ref(ck.file, dtype="f32")
    assert any(d[1] == "float32" for d in want) and not any(d[1] in ("bfloat16", "float16", "float64") for d in want)
    for rank, o in enumerate(outs):
        assert o["stream"] == want, f"rank {rank}: dtype='f32' stream differs from the single-process load"
    read, sent, recv = _counters(outs)
    assert sum(read) == ck.f.data, (read, ck.f.data)  # stored bytes, each once
    for rank in range(world):
        assert abs(read[rank] - ck.f.data / world) <= ck.f.largest, (rank, read)
    # What moves is the converted bytes: each rank receives what it did not read, once.
    assert sum(sent) == sum(recv), (sent, recv)
    assert 0 <= sum(recv) - (world - 1) * ck.f.f32 < (world - 1) * ALIGN * ck.f.count, (recv, ck.f.f32)
    for rank, o in enumerate(r.ok("wsd_load_file")):
        assert o["stream"] == ref(ck.file, dtype="bf16"), f"rank {rank}: wsd.load_file(dtype='bf16') differs"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_moves_only_the_needed_bytes(happy, ck, world):
    """shard=(rank, N) on N ranks: a split tensor's block is needed by one rank only, so that rank
    reads it and it moves nowhere; unsplit tensors are read once and broadcast."""
    r = happy(world)
    outs = r.ok("split")
    for rank, o in enumerate(outs):
        want = [digest(n, t) for n, t in ws.load_file(ck.file, shard=(rank, world), split=SPLIT).items()]
        assert o["stream"] == want, f"rank {rank}: its block differs from a single-process shard=({rank}, {world}) load"
    read, sent, recv = _counters(outs)
    U, S = ck.f.unsplit, ck.f.split
    block = S // world
    assert sum(read) == U + S, (read, U, S)
    for rank in range(world):
        assert read[rank] >= block, f"rank {rank} read {read[rank]} < its own blocks {block}"
    # Received: the unsplit bytes less what it read itself (its read = its blocks + that), plus
    # gaps; no block moves (the smallest is 288 KiB, far above the gaps).
    _check_moved(read, sent, recv, [U + block] * world, ck.f.count_unsplit, "split")
    assert 0 <= sum(recv) - (world - 1) * U < (world - 1) * ALIGN * ck.f.count_unsplit, (recv, U)


def test_shard_blocks_shared_by_two_ranks_move_once(happy, ck):
    """4 ranks with shard=(rank % 2, 2): ranks r and r+2 need the same blocks; each block is read
    once and moves once, to the other rank that needs it."""
    r = happy(4)
    outs = r.ok("split2")
    for rank, o in enumerate(outs):
        want = [digest(n, t) for n, t in ws.load_file(ck.file, shard=(rank % 2, 2), split=SPLIT).items()]
        assert o["stream"] == want, f"rank {rank}: its block differs from a single-process shard=({rank % 2}, 2) load"
    read, sent, recv = _counters(outs)
    U, S = ck.f.unsplit, ck.f.split
    assert sum(read) == U + S, (read, U, S)
    # Each rank needs the unsplit bytes and its blocks; each block moves once (S in all).
    _check_moved(read, sent, recv, [U + S // 2] * 4, ck.f.count_unsplit, "split2")
    assert 0 <= sum(recv) - (3 * U + S) < 3 * ALIGN * ck.f.count_unsplit, (recv, U, S)


@pytest.mark.parametrize("world", [3, 4])
def test_group_mismatch_raises_before_data_moves(happy, ck, world):
    """One rank passes another dtype (3 ranks) or other split rules (4 ranks): every rank raises
    GroupMismatchError, from iterate() or the first next(), before any byte is read or moved."""
    r = happy(world)
    for rank in range(world):
        o = r.job(rank, "mismatch")
        e = o["error"]
        assert e is not None, f"rank {rank} did not raise\n{r.text}"
        assert "GroupMismatchError" in e["mro"] and "DistributedError" in e["mro"], f"rank {rank}: {e['type']}\n{r.text}"
        assert o["stream"] == [], f"rank {rank} got tensors before the error"
        if o["counters"] is not None:
            assert all(v == 0 for v in o["counters"].values()), f"rank {rank}: {o['counters']}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_exit_cleanly(happy, world):
    """Every rank of the happy-path groups (the option mismatch last) exits by itself with 0."""
    r = happy(world)
    assert all(c == 0 for c in r.codes.values()), f"a rank did not exit cleanly\n{r.text}"


# ---------------------------------------------------------------------------------------------
# Loopback S3, 4 ranks in 2 simulated nodes


class CountingProxy:
    """A reverse proxy on the loopback in front of ``upstream``: forwards every request as it is
    (headers included, so signatures hold) and sums the body bytes of successful GET responses
    per URL path."""

    HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "te", "upgrade"}

    def __init__(self, upstream_port):
        self.get_bytes = collections.Counter()
        self.requests = collections.Counter()
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in proxy.HOP:
                            conn.putheader(k, v)
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = resp.getheaders()
                finally:
                    conn.close()
                path = urlsplit(self.path).path
                with lock:
                    proxy.requests[(self.command, resp.status)] += 1
                    if self.command == "GET" and 200 <= resp.status < 300:
                        proxy.get_bytes[path] += len(data)
                self.send_response_only(resp.status)
                for k, v in headers:
                    if k.lower() not in proxy.HOP:
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bytes_under(self, prefix):
        return sum(n for p, n in self.get_bytes.items() if prefix in p)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3_proxy(ck):
    """moto's S3 server with the checkpoints under ``s3://ws-dist/single/`` and
    ``s3://ws-dist/sharded/``, behind a CountingProxy: yields (proxy, storage options)."""
    import subprocess

    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        _missing("SKIPPED: moto_server not installed (pip install 'moto[server]'; scripts/install_test_servers.sh)")
    try:
        import boto3
    except ImportError:
        _missing("SKIPPED: boto3 not installed (it comes with moto[server])")
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ws-moto-", suffix=".log")[1])
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    proxy = None
    try:
        _wait_for(port, proc, log)
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        client.create_bucket(Bucket="ws-dist")
        client.upload_file(ck.file, "ws-dist", "single/model.safetensors")
        for f in [*ck.shard_files, Path(ck.index)]:
            client.upload_file(str(f), "ws-dist", f"sharded/{Path(f).name}")
        proxy = CountingProxy(port)
        yield proxy, {
            "aws_endpoint": f"http://127.0.0.1:{proxy.port}",
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "aws_region": "us-east-1",
            "allow_http": True,
        }
    finally:
        if proxy is not None:
            proxy.close()
        proc.terminate()
        proc.wait(timeout=10)
        log.unlink(missing_ok=True)


def test_s3_each_node_fetches_the_checkpoint_once(s3_proxy, ck, tmp_path):
    """4 ranks, node groups {0, 1} and {2, 3} (wsd.node_group(node=rank // 2)), each iterating an
    s3:// checkpoint: the server sends each file's bytes (headers, index and data) once per node,
    2x in all, and every rank's stream equals the local load."""
    proxy, opts = s3_proxy
    common = {"window": WINDOW, "storage_options": opts}
    jobs = [
        {"id": "s3_file", "api": "wsd.iterate", "group": "node", "path": "s3://ws-dist/single/model.safetensors", "kwargs": common},
        {"id": "s3_sharded", "api": "wsd.iterate", "group": "node", "path": "s3://ws-dist/sharded/model.safetensors.index.json", "kwargs": common},
    ]
    r = run(4, jobs, tmp_path)
    assert all(c == 0 for c in r.codes.values()), f"a rank did not exit cleanly\n{r.text}"
    print(f"proxy: requests {dict(proxy.requests)}, GET bytes {dict(proxy.get_bytes)}")
    for jid, local, f, prefix in [("s3_file", ck.file, ck.f, "/single/"), ("s3_sharded", ck.index, ck.fs, "/sharded/")]:
        outs = r.ok(jid)
        for rank, o in enumerate(outs):
            assert o["stream"] == ref(local), f"rank {rank} {jid}: stream differs from the local load"
        read, sent, recv = _counters(outs)
        for node in (0, 1):
            ranks = [2 * node, 2 * node + 1]
            assert sum(read[x] for x in ranks) == f.data, f"{jid} node {node}: read {[read[x] for x in ranks]}, data {f.data}"
            _check_moved([read[x] for x in ranks], [sent[x] for x in ranks], [recv[x] for x in ranks], [f.data] * 2, f.count, f"{jid} node {node}")
        got = proxy.bytes_under(prefix)
        assert got == 2 * f.file_bytes, f"{jid}: GET bodies {got} bytes, want 2 x {f.file_bytes} (once per node)"


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize(
    "how,use_with,world,victim,expected,destroy",
    [
        ("raise", False, 3, 1, "PeerFailedError", True),
        ("raise", True, 4, 3, "PeerFailedError", True),
        ("kill", False, 4, 2, "DistributedError", True),
        ("kill", False, 3, 1, "DistributedError", False),
        ("stop", False, 3, 1, "PeerLostError", True),
        ("abandon", False, 3, 2, "PeerFailedError", False),
    ],
    ids=["raise-in-loop", "raise-in-with", "sigkill", "sigkill-no-destroy", "sigstop", "exit-with-load-alive"],
)
def test_fault_makes_the_others_raise_in_time(ck, tmp_path, how, use_with, world, victim, expected, destroy):
    """After 3 tensors one rank raises in its loop (a bare ``for`` over ``wsd.iterate(...)``, or
    one inside ``with``), SIGKILLs itself, SIGSTOPs itself, or stops reading and exits with its
    iterator still alive in a global (weightstream's exit handler closes it): every other rank raises
    ``expected`` within 30 s of the fault (``.rank`` the victim: always for a failure, where it is
    known for a lost peer), and exits by itself with 0, whether it calls
    ``dist.destroy_process_group()`` before it exits or not (``destroy``); no process is left
    behind (the parent SIGKILLs the stopped one)."""
    job = {
        "destroy": destroy,
        "id": "fault",
        "api": "wsd.iterate",
        "path": ck.file,
        "kwargs": {"window": WINDOW, "timeout": 5},
        "fault": {"rank": victim, "after": 3, "how": how},
        "with": use_with,
    }
    r = run(world, [job], tmp_path, deadline=FAULT_DEADLINE, stuck={victim} if how == "stop" else ())
    assert r.fault_time is not None, f"the fault never happened\n{r.text}"
    assert not any(c in ("hung", "alive") for c in r.codes.values()), f"a process was left behind\n{r.text}"
    victim_code = {"raise": 0, "kill": -9, "stop": -9, "abandon": 0}[how]
    assert r.codes[victim] == victim_code, f"victim exit code {r.codes[victim]}\n{r.text}"
    if how == "raise":
        assert r.job(victim, "fault")["error"]["type"] == "ConsumerFailed", r.text
    want = ref(ck.file)
    for rank in range(world):
        if rank == victim:
            continue
        # A survivor exits by itself, with 0: a gloo worker thread that let go of a failed
        # transfer during interpreter finalization aborted the process (SIGABRT, 5 runs in 120
        # under load) until weightstream destroyed its side groups at exit.
        assert r.codes[rank] == 0, f"rank {rank} exit code {r.codes[rank]}\n{r.text}"
        o = r.job(rank, "fault")
        e = o["error"]
        assert e is not None, f"rank {rank} did not raise\n{r.text}"
        assert expected in e["mro"] and "DistributedError" in e["mro"], f"rank {rank} raised {e['type']}, want {expected}\n{r.text}"
        if how == "raise" or e["rank"] is not None:
            assert e["rank"] == victim, f"rank {rank}: .rank = {e['rank']}, want {victim}\n{r.text}"
            assert re.search(rf"rank\D{{0,3}}{victim}\b", e["message"], re.I), f"rank {rank}: the message does not name rank {victim}: {e['message']}"
        delay = e["time"] - r.fault_time
        assert delay <= 30, f"rank {rank} raised {delay:.1f} s after the fault"
        if expected == "PeerFailedError":
            # A failure is told at the next status exchange: at once, not after the timeout.
            assert delay < 5, f"rank {rank} raised {e['type']} {delay:.1f} s after the fault (timeout=5): it waited for the timeout"
        if how == "abandon":
            assert "its process exits" in e["message"], f"rank {rank}: {e['message']}"
        # A lost peer leaves the side group out of step: retired, a later load makes a new one.
        kept, retired = o["side_groups"]
        want_groups = (0, 1) if e["type"] == "PeerLostError" else (1, 0)
        assert (kept, retired) == want_groups, f"rank {rank} after {e['type']}: side groups kept {kept}, retired {retired}"
        print(f"rank {rank}: {e['type']} {delay:.2f} s after the fault: {e['message']}")
        assert o["stream"] == want[: len(o["stream"])], f"rank {rank}: the tensors before the error differ"
        assert len(o["stream"]) < len(want), f"rank {rank} got the whole stream"


_MEMORY_RANK = """
import os, sys, threading, time
import torch, torch.distributed as dist, weightstream as ws

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

rank, port, small, big, window = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
loader = ws.Loader()
# The group set up (its side group made, the code paths warm) on a small file first.
with loader.iterate(small, group=dist.group.WORLD, window=window) as it:
    for _ in it:
        pass
dist.barrier()
base = peak = rss()
stop = threading.Event()
def sample():
    global peak
    while not stop.wait(0.001):
        peak = max(peak, rss())
t = threading.Thread(target=sample, daemon=True)
t.start()
n = 0
with loader.iterate(big, group=dist.group.WORLD, window=window) as it:
    for name, x in it:
        n += x.nbytes
        del x
stop.set(); t.join()
peak = max(peak, rss())
print("RESULT", rank, n, it.bytes_read, peak - base, flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_host_memory_stays_within_window_and_staging(tmp_path):
    # The bound: per rank, host memory growth after torch and the group are set up is at
    # most window + staging + 64 MiB (here 16 MiB + the host ring, 8 x 4 MiB, + 64 MiB) for a
    # 96 MiB checkpoint whose tensors the loop drops as they come.
    import subprocess
    import sys

    import numpy as np
    from safetensors.numpy import save_file

    from dist_support import free_port

    rng = np.random.default_rng(5)
    big = tmp_path / "big.safetensors"
    save_file({f"w{i:02d}": rng.standard_normal(1 << 20, dtype=np.float32) for i in range(24)}, str(big))
    small = tmp_path / "small.safetensors"
    save_file({"s": np.arange(1000, dtype=np.float32)}, str(small))
    script = tmp_path / "memory_rank.py"
    script.write_text(_MEMORY_RANK)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(small), str(big), "16MiB"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            outs.append(next(line for line in out.splitlines() if line.startswith("RESULT")).split())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    mib = 1 << 20
    bound = 16 * mib + 8 * 4 * mib + 64 * mib
    assert sum(int(o[3]) for o in outs) == 96 * mib  # each byte read once
    for o in outs:
        assert int(o[2]) == 96 * mib  # every rank got every tensor
        assert int(o[4]) <= bound, f"rank {o[1]}: host memory grew {int(o[4]) / mib:.0f} MiB, bound {bound / mib:.0f}"


_EXIT_RANK = """
import os, sys
import torch.distributed as dist, weightstream as ws
import weightstream.distributed as wsd
from weightstream import _side_groups as sg

def threads():
    return len(os.listdir("/proc/self/task"))

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
base = threads()
n = sum(1 for _ in wsd.iterate(sys.argv[1], window="4MiB"))
loaded = threads()
made = len(sg.registry)
sg.destroy_all()
print(n, base, loaded, made, len(sg.registry), len(sg.retired), threads(), dist.is_initialized())
"""


def test_exit_handler_joins_the_side_group_threads(ck, tmp_path):
    """The exit handler (run here by hand, one rank) leaves no side group and no thread of one:
    a gloo worker thread that outlives the interpreter's finalization aborts the process. The
    caller's default group is the caller's: still there."""
    import subprocess

    script = tmp_path / "exit_rank.py"
    script.write_text(_EXIT_RANK)
    p = subprocess.run([sys.executable, str(script), str(ck.file), str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    n, base, loaded, made, kept, retired, after, initialized = p.stdout.split()
    assert int(n) == len(ref(ck.file)), p.stdout
    assert (int(made), int(kept), int(retired)) == (1, 0, 0), p.stdout
    assert int(loaded) > int(base), f"the side group started no thread? {p.stdout}"
    assert int(after) == int(base), f"threads: {base} before the load, {loaded} with the side group, {after} after the handler"
    assert initialized == "True", p.stdout


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "20", None])
def test_a_timeout_is_finite_seconds_above_zero(bad):
    """``timeout`` (group loads, vLLM's and SGLang's options: one check, ``_options.seconds``):
    a finite number of seconds > 0; anything else is a UsageError naming the option."""
    from weightstream import _options as O

    with pytest.raises(ws.UsageError, match=r"timeout: expected seconds > 0"):
        O.seconds(bad, "timeout", allow_none=False)
    assert O.seconds(2, "timeout") == 2.0 and O.seconds(0.5, "timeout") == 0.5 and O.seconds(None, "timeout") is None
