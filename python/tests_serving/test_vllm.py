"""The vLLM tier: ``load_format="weightstream"`` through vLLM's real loader machinery on the CPU
(vLLM's model classes and loaders run on a CPU-only torch; generation does not), against
``load_format="safetensors"`` (vLLM's own default reading) on the same real checkpoints.

Recipe (DESIGN.md, "Frameworks"): ``VLLM_TARGET_DEVICE=cpu``, no visible CUDA device, one gloo
process group for the whole module (vLLM's distributed state can be initialised once per
process), a ``VllmConfig`` per load. vLLM is imported at the top: without it this file fails."""

import os

# Before vLLM is imported: its platform is chosen once, at import.
os.environ["VLLM_TARGET_DEVICE"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.pop("VLLM_PLUGINS", None)  # every plugin: ours must be found by its entry point

import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import vllm  # noqa: F401  (a missing vLLM fails the tier here)
import vllm.model_executor.model_loader as vllm_loaders
import vllm.plugins
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file
from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import (
    destroy_distributed_environment,
    destroy_model_parallel,
    init_distributed_environment,
    initialize_model_parallel,
)
from vllm.model_executor.model_loader import get_model_loader

import weightstream as ws

from conftest import config_only_copy, free_port, save_llama, upload


@pytest.fixture(scope="module")
def plugin():
    """Our loader found the way ``vllm serve`` finds it: the ``vllm.general_plugins`` entry
    point, called by ``vllm.plugins.load_general_plugins()``. Nothing registers it by hand."""
    vllm_loaders._LOAD_FORMAT_TO_MODEL_LOADER.pop("weightstream", None)
    vllm.plugins.plugins_loaded = False  # load the plugins again in this process
    vllm.plugins.load_general_plugins()
    return vllm_loaders._LOAD_FORMAT_TO_MODEL_LOADER.get("weightstream")


@pytest.fixture(scope="module")
def dist(plugin):
    """vLLM's single-rank distributed state (gloo on a free loopback port), once per module."""
    vc = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(vc):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{free_port()}", backend="gloo"
        )
        initialize_model_parallel(1, 1)
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


def load(model_dir, load_format, extra=None, dtype="float32"):
    """``load_model`` as a vLLM worker runs it: returns the loaded model."""
    mc = ModelConfig(
        model=str(model_dir), tokenizer=str(model_dir), skip_tokenizer_init=True, dtype=dtype, enforce_eager=True
    )
    lc = LoadConfig(load_format=load_format, model_loader_extra_config=dict(extra or {}))
    vc = VllmConfig(model_config=mc, load_config=lc, device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(vc):
        loader = get_model_loader(lc)
        loader.download_model(mc)
        return loader.load_model(vllm_config=vc, model_config=mc)


def state(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(got, want):
    """Every parameter and buffer of two vLLM models: same names, dtypes, shapes and bytes."""
    g, w = state(got), state(want)
    assert sorted(g) == sorted(w)
    for name, wt in w.items():
        gt = g[name]
        assert gt.dtype == wt.dtype and gt.shape == wt.shape, name
        assert torch.equal(_bytes(gt), _bytes(wt)), f"{name} differs"


def assert_from_checkpoint(model, model_dir):
    """The loads really read the file: parameters vLLM keeps unmerged equal the checkpoint's
    tensors, and the stacked ``qkv_proj`` is q, k and v one above the other."""
    ckpt = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        ckpt.update(st_load_file(f))
    params = dict(model.named_parameters())
    dt = params["model.embed_tokens.weight"].dtype
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"]:
        assert torch.equal(params[name], ckpt[name].to(dt)), name
    qkv = torch.cat([ckpt[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]).to(dt)
    assert torch.equal(params["model.layers.0.self_attn.qkv_proj.weight"], qkv)


def test_plugin_found_through_its_entry_point(plugin):
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert names.get("weightstream") == "weightstream.vllm:register"
    from weightstream.vllm import WeightstreamModelLoader

    assert plugin is WeightstreamModelLoader
    assert type(get_model_loader(LoadConfig(load_format="weightstream"))) is WeightstreamModelLoader


def test_register_twice_changes_nothing(plugin):
    import weightstream.vllm as wv

    before = dict(vllm_loaders._LOAD_FORMAT_TO_MODEL_LOADER)
    wv.register()
    wv.register()
    assert vllm_loaders._LOAD_FORMAT_TO_MODEL_LOADER == before


def test_local_directory_equals_safetensors(dist, llama_dir):
    want = load(llama_dir, "safetensors")
    got = load(llama_dir, "weightstream")
    assert_from_checkpoint(want, llama_dir)
    assert_bitwise_equal(got, want)


def test_sharded_checkpoint_equals_safetensors(dist, llama_sharded_dir, tmp_path):
    # A stray file next to the shards that the index does not list (as Mistral repos ship a
    # consolidated file beside the shards): vLLM's index filter leaves it out, and so must we.
    # Its name sorts after the shards', so that its values would win if it were read.
    d = tmp_path / "m"
    shutil.copytree(llama_sharded_dir, d)
    stray = {k: torch.randn_like(v) for k, v in st_load_file(sorted(d.glob("model-*.safetensors"))[0]).items()}
    st_save_file(stray, d / "zz-consolidated.safetensors")
    want = load(d, "safetensors")
    got = load(d, "weightstream", {"window": "160KiB", "staging": "64KiB", "staging_count": 2, "read_size": "16KiB"})
    assert_from_checkpoint(want, llama_sharded_dir)
    assert_bitwise_equal(got, want)


def test_bf16_checkpoint_equals_safetensors(dist, llama_bf16_dir):
    # bf16 in the file, float32 in the model: vLLM's parameter loaders cast, for both formats.
    want = load(llama_bf16_dir, "safetensors")
    got = load(llama_bf16_dir, "weightstream")
    assert_bitwise_equal(got, want)
    # Converting while loading (bf16 -> f32 is exact) gives the same model.
    assert_bitwise_equal(load(llama_bf16_dir, "weightstream", {"dtype": "f32", "io": "pread", "threads": 2}), want)
    # And a bf16 model from the bf16 file.
    assert_bitwise_equal(load(llama_bf16_dir, "weightstream", dtype="bfloat16"), load(llama_bf16_dir, "safetensors", dtype="bfloat16"))


def test_s3_weights_equal_local_safetensors(dist, llama_sharded_dir, s3_server, tmp_path):
    client, storage_options = s3_server
    upload(client, "ws-vllm", "llama", llama_sharded_dir)
    model_dir = config_only_copy(llama_sharded_dir, tmp_path / "config-only")  # MODEL: config, no weights
    want = load(llama_sharded_dir, "safetensors")
    extra = {"weights": "s3://ws-vllm/llama/", "storage_options": storage_options, "remote_concurrency": 2, "remote_request_size": "64KiB"}
    got = load(model_dir, "weightstream", extra)
    assert_bitwise_equal(got, want)


def test_weights_key_with_a_local_path(dist, llama_sharded_dir, tmp_path):
    # MODEL without weights, the weights elsewhere on disk (a directory, or its index).
    model_dir = config_only_copy(llama_sharded_dir, tmp_path / "config-only")
    want = load(llama_sharded_dir, "safetensors")
    assert_bitwise_equal(load(model_dir, "weightstream", {"weights": str(llama_sharded_dir)}), want)
    index = llama_sharded_dir / "model.safetensors.index.json"
    assert_bitwise_equal(load(model_dir, "weightstream", {"weights": str(index)}), want)
    with pytest.raises(ws.UsageError, match="no such file or directory"):
        load(model_dir, "weightstream", {"weights": str(tmp_path / "nowhere")})


def test_missing_tensor_fails_as_vllm_checks_it(dist, llama_dir, tmp_path):
    # vLLM's check that every weight was loaded runs after our load too, with its own message.
    d = tmp_path / "m"
    d.mkdir()
    for p in llama_dir.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, d / p.name)
    tensors = st_load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    st_save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="Following weights were not initialized from checkpoint") as e:
        load(d, "weightstream")
    assert "model.layers.1.post_attention_layernorm.weight" in str(e.value)


def test_progress_bar_and_log(dist, llama_dir, capfd, caplog):
    caplog.set_level(logging.INFO, logger="vllm.weightstream")
    load(llama_dir, "weightstream", {"progress": True})
    err = capfd.readouterr().err
    assert "Loading safetensors checkpoint (weightstream): 100% Completed" in err
    size = (llama_dir / "model.safetensors").stat().st_size
    [line] = [r.getMessage() for r in caplog.records if r.name == "vllm.weightstream"]
    assert line.startswith(f"weightstream: {size / 2**30:.2f} GiB from {llama_dir / 'model.safetensors'} to cpu in ")
    assert line.endswith(" GiB/s)")
    load(llama_dir, "weightstream", {"progress": False})
    assert "Loading safetensors checkpoint (weightstream)" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"windw": "1GiB"}, "windw"),
        ({"window": "lots"}, "window"),
        ({"window": 0}, "window"),
        ({"staging": -1}, "staging"),
        ({"staging_count": 0}, "staging_count"),
        ({"read_size": "2 blocks"}, "read_size"),
        ({"threads": "4"}, "threads"),
        ({"io": "mmap"}, "io"),
        ({"direct": "yes"}, "direct"),
        ({"dtype": "int8"}, "dtype"),
        ({"progress": 1}, "progress"),
        ({"weights": ""}, "weights"),
        ({"storage_options": "aws_region=x"}, "storage_options"),
        ({"remote_concurrency": 0}, "remote_concurrency"),
        ({"remote_request_size": "8 parsecs"}, "remote_request_size"),
        ({"share_reads": "yes"}, "share_reads"),
    ],
)
def test_bad_extra_config_is_a_clear_error(plugin, extra, key):
    with pytest.raises(ws.UsageError) as e:
        get_model_loader(LoadConfig(load_format="weightstream", model_loader_extra_config=extra))
    msg = str(e.value)
    assert repr(key) in msg
    if key == "windw":
        # An unknown key names the valid ones.
        assert "valid keys" in msg and "'window'" not in msg and "window" in msg and "staging_count" in msg


def test_zero_copy_is_a_typed_error_until_it_lands(plugin):
    with pytest.raises(ws.UsageError, match="zero-copy through the stream") as e:
        get_model_loader(LoadConfig(load_format="weightstream", model_loader_extra_config={"zero_copy": True}))
    assert "zero_copy" in str(e.value)
    # Copying (what happens today) is accepted when asked for by name.
    get_model_loader(LoadConfig(load_format="weightstream", model_loader_extra_config={"zero_copy": False}))


def test_unknown_storage_option_names_it(dist, llama_dir, tmp_path):
    extra = {"weights": "s3://ws-vllm/none/", "storage_options": {"aws_endpointt": "http://127.0.0.1:9"}}
    with pytest.raises(ws.UsageError, match="aws_endpointt"):
        load(config_only_copy(llama_dir, tmp_path / "c"), "weightstream", extra)


def test_weights_files_of_another_format_are_refused(dist, llama_dir, tmp_path):
    # A directory with only .bin weights: vLLM's "safetensors" selection finds nothing.
    d = config_only_copy(llama_dir, tmp_path / "bin")
    torch.save(st_load_file(llama_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="Cannot find any model weights"):
        load(d, "weightstream")


# In a child process: the Hub's offline mode and cache location are read when huggingface_hub
# is imported.
_HF_SCRIPT = textwrap.dedent(
    """
    import os, socket, sys
    import torch, vllm.plugins
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import get_model_loader

    vllm.plugins.load_general_plugins()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    models = {}
    for fmt in ["safetensors", "weightstream"]:
        mc = ModelConfig(model="ws-test/tiny-llama", skip_tokenizer_init=True, dtype="float32", enforce_eager=True)
        lc = LoadConfig(load_format=fmt)
        vc = VllmConfig(model_config=mc, load_config=lc, device_config=DeviceConfig(device="cpu"))
        with set_current_vllm_config(vc):
            if not models:
                init_distributed_environment(world_size=1, rank=0, local_rank=0,
                    distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
                initialize_model_parallel(1, 1)
            loader = get_model_loader(lc)
            loader.download_model(mc)
            models[fmt] = dict(loader.load_model(vllm_config=vc, model_config=mc).named_parameters())
    a, b = models["safetensors"], models["weightstream"]
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k
    print("EQUAL", len(a))
    """
)


def test_hf_repo_id_from_the_hub_cache_equals_safetensors(tmp_path):
    # An HF repo id, resolved by vLLM's own download code (offline, from a Hub cache laid out
    # as huggingface_hub writes it: refs/main -> snapshots/<rev>), sharded with an index.
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ws-test--tiny-llama"
    save_llama(repo / "snapshots" / rev, seed=3, max_shard_size="100KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "VLLM_PLUGINS": "weightstream"}
    out = subprocess.run([sys.executable, "-c", _HF_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EQUAL" in out.stdout


_TP2_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys, traceback
    import torch, torch.multiprocessing as mp

    def rank_main(rank, port, broken, model_dirs, q):
        try:
            q.put(json.dumps(load_all(rank, port, broken, model_dirs)))
        except BaseException:
            q.put(json.dumps({"rank": rank, "error": traceback.format_exc()}))
            raise

    def load_all(rank, port, broken, model_dirs):
        import vllm.plugins
        from vllm.config import (DeviceConfig, LoadConfig, ModelConfig, ParallelConfig, VllmConfig,
                                 set_current_vllm_config)
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.model_executor.model_loader import get_model_loader

        vllm.plugins.load_general_plugins()

        def load(model_dir, fmt, extra):
            mc = ModelConfig(model=model_dir, tokenizer=model_dir, skip_tokenizer_init=True, dtype="float32",
                             enforce_eager=True)
            lc = LoadConfig(load_format=fmt, model_loader_extra_config=extra)
            vc = VllmConfig(model_config=mc, load_config=lc, device_config=DeviceConfig(device="cpu"),
                            parallel_config=ParallelConfig(tensor_parallel_size=2))
            with set_current_vllm_config(vc):
                if not torch.distributed.is_initialized():  # vLLM's distributed state: once per process
                    init_distributed_environment(world_size=2, rank=rank, local_rank=rank,
                        distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
                    initialize_model_parallel(2, 1)
                loader = get_model_loader(lc)
                model = loader.load_model(vllm_config=vc, model_config=mc)
                return {k: v.detach().clone() for k, v in model.named_parameters()}, loader.last_stats if fmt == "weightstream" else None

        def error(model_dir, extra):
            try:
                load(model_dir, "weightstream", extra)
            except Exception as e:
                return [type(e).__name__, getattr(e, "rank", None), str(e)]
            return None

        results = []
        loads = [("weightstream-shared", {}), ("weightstream", {"share_reads": False})]
        for model_dir in model_dirs:
            want, _ = load(model_dir, "safetensors", {})
            res = {"rank": rank, "dir": model_dir}
            for key, extra in loads:
                got, stats = load(model_dir, "weightstream", extra)
                res[key] = {
                    "names_equal": sorted(got) == sorted(want),
                    "differ": [k for k in want if k not in got or got[k].dtype != want[k].dtype
                               or got[k].shape != want[k].shape
                               or not torch.equal(got[k].reshape(-1).view(torch.uint8),
                                                  want[k].reshape(-1).view(torch.uint8))],
                    "qkv": list(got["model.layers.0.self_attn.qkv_proj.weight"].shape),
                    "stats": stats,
                }
            results.append(res)
        # Rank 1 on another host (its host name as socket reports it): the ranks read for
        # themselves, each the whole checkpoint, as nodes must not exchange weights.
        import socket
        real_hostname = socket.gethostname
        if rank == 1:
            socket.gethostname = lambda: real_hostname() + "-other"
        try:
            _, two_hosts = load(model_dirs[0], "weightstream", {})
        finally:
            socket.gethostname = real_hostname
        # Faults: rank 0 cannot read the headers (its `weights` is a broken file): rank 1 hears
        # of it instead of waiting. The ranks name different files (the same tensors): both
        # refuse. Then the ranks ask for different windows: both refuse before any data moves
        # (the last load: the group is not used after that).
        good = model_dirs[0]
        results.append({
            "two_hosts": two_hosts,
            "headers": error(good, {"weights": broken if rank == 0 else good}),
            "files": error(good, {"weights": good if rank == 0 else good + "/model.safetensors"}),
            "mismatch": error(good, {"window": "1MiB" if rank == 0 else "2MiB"}),
        })
        return results

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(r, port, sys.argv[1], sys.argv[2:], q)) for r in range(2)]
        for p in procs: p.start()
        results = []
        try:
            while len(results) < len(procs):
                results.append(json.loads(q.get(timeout=300)))
                if isinstance(results[-1], dict):  # a rank failed: its traceback, without waiting on the other
                    sys.exit(results[-1]["error"])
        finally:
            for p in procs:
                p.join(60 if len(results) == len(procs) else 5)
                if p.is_alive():  # a rank stuck after the other failed: nothing left behind
                    p.kill(); p.join()
        print(json.dumps({"results": sorted(results, key=lambda r: r[0]["rank"]), "exitcodes": [p.exitcode for p in procs]}))
    """
)


def checkpoint_data(model_dir):
    """``(data bytes, largest tensor's bytes)`` of a directory's safetensors files, from their
    headers (the index's files when there is one)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    total = largest = 0
    for f in files:
        with open(model_dir / f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        sizes = [end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]]]
        total += sum(sizes)
        largest = max([largest] + sizes)
    return total, largest


def test_tensor_parallel_2_shares_reads_and_equals_safetensors(llama_dir, llama_sharded_dir, tmp_path):
    # Two ranks over gloo (vLLM's TP group), a one-file and a sharded checkpoint. The TP group
    # shares the reads: each byte read once by one of the ranks and broadcast to the other; with
    # "share_reads": false each rank reads everything. Either way vLLM's parameter loaders keep
    # each rank's slice (here qkv: (4 + 2 + 2) heads x 16 / 2 ranks = 64 rows of the 128), and
    # both ranks' parameters equal vLLM's own safetensors loader's bit for bit.
    script = tmp_path / "tp2.py"
    script.write_text(_TP2_SCRIPT)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")  # a header length past the file
    env = {**os.environ, "VLLM_PLUGINS": "weightstream"}
    dirs = [llama_dir, llama_sharded_dir]
    out = subprocess.run(
        [sys.executable, str(script), str(broken), *map(str, dirs)], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["exitcodes"] == [0, 0], out.stderr[-3000:]
    ranks = report["results"]
    assert [len(results) for results in ranks] == [len(dirs) + 1] * 2
    for d, model_dir in enumerate(dirs):
        total, largest = checkpoint_data(model_dir)
        per_rank = [ranks[r][d] for r in range(2)]
        for r, res in enumerate(per_rank):
            assert res["rank"] == r and res["dir"] == str(model_dir)
            for key in ["weightstream-shared", "weightstream"]:
                assert res[key]["names_equal"] and res[key]["differ"] == [], (model_dir, r, key, res[key])
                assert res[key]["qkv"] == [64, 64]
            alone = res["weightstream"]["stats"]
            assert alone["group_size"] == 1 and alone["bytes_read"] == total
            assert alone["bytes_sent"] == alone["bytes_received"] == 0
        shared = [res["weightstream-shared"]["stats"] for res in per_rank]
        assert [s["group_size"] for s in shared] == [2, 2]
        # Each byte read once by the group, and every byte one rank read sent to the other.
        assert sum(s["bytes_read"] for s in shared) == total, shared
        assert [s["bytes_sent"] for s in shared] == [s["bytes_read"] for s in shared], shared
        assert [s["bytes_received"] for s in shared] == [shared[1]["bytes_read"], shared[0]["bytes_read"]], shared
        assert all(s["bytes_loaded"] == total for s in shared)  # every rank got every tensor
        if d == 0:
            # One file: balanced by bytes, within one tensor of half.
            assert all(abs(s["bytes_read"] - total / 2) <= largest for s in shared), (shared, total, largest)
        else:
            assert all(s["bytes_read"] > 0 for s in shared) and shared[0]["files"] > 1, shared
    # Two hosts: no sharing, each rank reads the whole checkpoint.
    total, _ = checkpoint_data(dirs[0])
    for r in range(2):
        two_hosts = ranks[r][-1]["two_hosts"]
        assert two_hosts["group_size"] == 1 and two_hosts["bytes_read"] == total and two_hosts["bytes_received"] == 0
    # Rank 0 failed to read the headers: it raises its own error, rank 1 a PeerFailedError naming it.
    faults = [ranks[r][-1] for r in range(2)]
    kind, _, msg = faults[0]["headers"]
    assert kind == "FormatError" and str(broken) in msg, faults[0]
    kind, rank, msg = faults[1]["headers"]
    assert (kind, rank) == ("PeerFailedError", 0) and "TP rank 0" in msg and str(broken) in msg, faults[1]
    # Different files, and different windows: both ranks refuse, naming what differs.
    for r in range(2):
        kind, _, msg = faults[r]["files"]
        assert kind == "GroupMismatchError" and "different files" in msg and "model.safetensors" in msg, faults[r]
        kind, _, msg = faults[r]["mismatch"]
        assert kind == "GroupMismatchError" and "window" in msg, faults[r]
