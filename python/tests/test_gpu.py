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
