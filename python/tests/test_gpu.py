"""On a GPU with torch: load_file to cuda:0 against safetensors.torch, load_into a module's
state_dict(), iterate with a device window. Skipped (one line) without torch or a GPU."""

import pytest
import weightstream as ws

torch = pytest.importorskip("torch", reason="no torch: GPU tests skipped")
if not torch.cuda.is_available() or not ws.cuda_available():
    pytest.skip("no CUDA device: GPU tests skipped", allow_module_level=True)

import safetensors.torch  # noqa: E402


@pytest.fixture()
def ckpt(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    state = {k: v.to(torch.bfloat16) if v.ndim == 2 else v for k, v in model.state_dict().items()}
    p = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, p)
    return p, state


def test_load_file_cuda_matches_safetensors(ckpt):
    p, _ = ckpt
    ours = ws.load_file(p, device="cuda:0")
    theirs = safetensors.torch.load_file(p, device="cuda:0")
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].device.type == "cuda" and ours[k].dtype == theirs[k].dtype
        assert torch.equal(ours[k], theirs[k])
    with ws.safe_open(p, framework="pt", device="cuda:0") as f:
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), theirs[k])
        w = next(k for k in f.keys() if k.endswith("weight") and theirs[k].ndim == 2)
        assert torch.equal(f.get_slice(w)[1:3], theirs[w][1:3])


def test_load_into_a_state_dict(ckpt):
    p, state = ckpt
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)).cuda()
    model = model.to(torch.bfloat16)
    sd = {k: v for k, v in model.state_dict().items()}
    for v in sd.values():
        v.zero_()
    ws.Loader(device="cuda:0").load_into(p, sd, dtype="bf16")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].to(torch.bfloat16).cuda())


def test_iterate_with_a_device_window(ckpt):
    p, state = ckpt
    seen = {n: t for n, t in ws.Loader(device="cuda:0").iterate(p, window="1MiB")}
    for k, v in state.items():
        assert seen[k].device.type == "cuda" and torch.equal(seen[k].cpu(), v)


_TWO_RANKS = """
import socket, sys, torch, torch.multiprocessing as mp

def rank_main(rank, port, path, q):
    import torch.distributed as dist, weightstream as ws
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ref = ws.load_file(path, device="cuda:0")
    with ws.Loader(device="cuda:0").iterate(path, group=dist.group.WORLD, window="64KiB") as it:
        got = list(it)
    same = [k for k, _ in got] == list(ref) and all(
        v.device.type == "cuda" and v.dtype == ref[k].dtype and torch.equal(v, ref[k]) for k, v in got)
    q.put((rank, same, it.bytes_read, it.bytes_sent, it.bytes_received))
    dist.destroy_process_group()

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    ps = [ctx.Process(target=rank_main, args=(r, port, sys.argv[1], q)) for r in range(2)]
    [p.start() for p in ps]
    print(sorted(q.get(timeout=240) for _ in ps)); [p.join(60) for p in ps]
"""


def test_two_ranks_over_gloo_share_reads_into_cuda_tensors(tmp_path):
    # The device path of weightstream.distributed: each rank reads half into CUDA memory, gloo
    # moves CUDA tensors (through the host) between the two ranks, both on the one GPU.
    import json
    import struct
    import subprocess
    import sys

    g = torch.Generator().manual_seed(1)
    state = {f"l{i}.w": torch.randn(96 + i, 64, generator=g).to(torch.bfloat16) for i in range(8)}
    state["norm"] = torch.randn(64, generator=g)
    p = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, p)
    raw = p.read_bytes()
    data = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    out = subprocess.run([sys.executable, str(script), str(p)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1].replace("(", "[").replace(")", "]").replace("True", "true").replace("False", "false"))
    assert [r[1] for r in rows] == [True, True], rows
    assert sum(r[2] for r in rows) == data
    assert sum(r[3] for r in rows) == sum(r[4] for r in rows) > 0
