"""The SGLang tier: weightstream's ``sglang.srt.plugins`` entry point, found and run by SGLang's
own ``load_plugins()``, swaps SGLang's two safetensors weight iterators for ours only when asked
for, and the swapped iterators yield what SGLang's own yield for the same files: names in the same
order, shapes, dtypes, bytes, on the CPU. Last, SGLang's own ``DefaultModelLoader`` builds a real
``LlamaForCausalLM`` on the CPU through the hooks, equal bit for bit to its own load.

Run in ``.venv-serving`` (SGLang 0.5.23, lean install). SGLang is imported at the top: a missing
SGLang fails this file, it does not skip."""

import importlib.metadata
import inspect
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

import sglang.srt.model_loader.loader as sglang_loader
import sglang.srt.plugins as sglang_plugins
from sglang.srt.model_loader import weight_utils
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry

import weightstream
import weightstream.sglang as ws_sglang

TARGETS = tuple(ws_sglang.HOOKS)
# SGLang's own iterators, taken before any test applies a hook. In a dict on purpose:
# HookRegistry.apply_hooks rebinds every module attribute that holds the original function
# (this module's globals too), but not the values of a dict.
ORIGINAL = {name: getattr(weight_utils, name) for name in TARGETS}
# The method our AROUND hook wraps (it hands the TP group to the iterators it calls); in the
# dict too, for the same reason.
ORIGINAL_METHOD = {"_get_weights_iterator": sglang_loader.DefaultModelLoader.__dict__["_get_weights_iterator"]}
ENV_VARS = ("WEIGHTSTREAM_SGLANG", "WEIGHTSTREAM_SGLANG_OPTIONS", "SGLANG_PLUGINS")


def test_sglang_is_pristine_at_import():
    """Importing SGLang and weightstream.sglang applies nothing (load_plugins has not run)."""
    for name, fn in ORIGINAL.items():
        assert fn.__module__ == weight_utils.__name__ and not hasattr(fn, "__wrapped__"), name
        assert getattr(sglang_loader, name) is fn, name
    assert not hasattr(ORIGINAL_METHOD["_get_weights_iterator"], "__wrapped__")


# --- hooks on and off ----------------------------------------------------------------------


def _undo_hooks():
    """Put SGLang's own iterators back wherever apply_hooks put ours (weight_utils and every
    module holding a ``from weight_utils import`` copy), forget the registered hooks and let
    ``load_plugins()`` run again: each test starts from SGLang as installed."""
    for name, original in ORIGINAL.items():
        current = getattr(weight_utils, name)
        if current is original:
            continue
        for mod in list(sys.modules.values()):
            namespace = getattr(mod, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                if value is current:
                    setattr(mod, attr, original)
    sglang_loader.DefaultModelLoader._get_weights_iterator = ORIGINAL_METHOD["_get_weights_iterator"]
    HookRegistry.reset()
    sglang_plugins._plugins_loaded = False


@pytest.fixture
def fresh_sglang(monkeypatch):
    """SGLang without our hooks and without the variables that turn them on; undone after."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    _undo_hooks()
    yield
    _undo_hooks()


def around_hooked():
    """Whether ``DefaultModelLoader._get_weights_iterator`` is wrapped by our AROUND hook."""
    fn = sglang_loader.DefaultModelLoader.__dict__["_get_weights_iterator"]
    if fn is ORIGINAL_METHOD["_get_weights_iterator"]:
        return False
    assert fn.__wrapped__ is ORIGINAL_METHOD["_get_weights_iterator"]
    return True


def hooked(name):
    """Whether ``weight_utils.<name>`` (and the loader module's copy) is our REPLACE hook."""
    fn = getattr(weight_utils, name)
    if fn is ORIGINAL[name]:
        assert getattr(sglang_loader, name) is fn
        return False
    assert fn.__wrapped__ is ORIGINAL[name]
    # The loader module imported the name before the hooks were applied: apply_hooks must have
    # rebound its copy too, or DefaultModelLoader would never call us.
    assert getattr(sglang_loader, name) is fn, f"sglang.srt.model_loader.loader.{name} is stale"
    return True


def runs_ours(fn, files):
    """Whether calling ``fn`` runs weightstream's iterator (its generator's code is ours)."""
    it = fn(files, 1) if "max_workers" in inspect.signature(fn).parameters else fn(files)
    try:
        return Path(it.gi_code.co_filename) == Path(ws_sglang.__file__)
    finally:
        it.close()


def test_entry_point_is_declared():
    eps = [ep for ep in importlib.metadata.entry_points(group=sglang_plugins.GENERAL_PLUGINS_GROUP) if ep.name == "weightstream"]
    assert len(eps) == 1, "pip install -e ./python declares sglang.srt.plugins: weightstream"
    assert eps[0].value == "weightstream.sglang:register"
    assert eps[0].load() is ws_sglang.register


@pytest.mark.parametrize(
    "env",
    [
        {"WEIGHTSTREAM_SGLANG": "1"},
        {"WEIGHTSTREAM_SGLANG": "true"},
        {"SGLANG_PLUGINS": "weightstream"},
        {"SGLANG_PLUGINS": " some_other_plugin , weightstream "},
        {"WEIGHTSTREAM_SGLANG": "on", "SGLANG_PLUGINS": "weightstream"},
    ],
    ids=lambda env: ",".join(f"{k}={v.strip()}" for k, v in env.items()),
)
def test_load_plugins_hooks_when_asked(fresh_sglang, monkeypatch, mixed_files, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    load_plugins()
    for name in TARGETS:
        assert hooked(name), name
        assert runs_ours(getattr(sglang_loader, name), mixed_files), name
    assert around_hooked()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WEIGHTSTREAM_SGLANG": "0"},
        {"WEIGHTSTREAM_SGLANG": "off", "SGLANG_PLUGINS": "weightstream"},
        {"WEIGHTSTREAM_SGLANG": ""},
    ],
    ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()) or "nothing-set",
)
def test_load_plugins_leaves_sglang_alone_unless_asked(fresh_sglang, monkeypatch, mixed_files, env):
    """Installed but not asked for: SGLang's load_plugins() runs our register() (through the
    entry point) and nothing changes."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    real_enabled = ws_sglang.enabled
    monkeypatch.setattr(ws_sglang, "enabled", lambda *a: calls.append(1) or real_enabled(*a))
    load_plugins()
    assert calls, "load_plugins() did not run weightstream.sglang:register"
    assert not HookRegistry._hooks.get(f"{ws_sglang.WEIGHT_UTILS}.{TARGETS[0]}")
    for name in TARGETS:
        assert not hooked(name), name
        assert not runs_ours(getattr(sglang_loader, name), mixed_files), name
    assert not around_hooked()


def test_whitelist_without_us_skips_the_plugin(fresh_sglang, monkeypatch):
    """SGLANG_PLUGINS naming only others: SGLang does not even load our entry point, even with
    WEIGHTSTREAM_SGLANG=1 (SGLang's whitelist wins)."""
    monkeypatch.setenv("SGLANG_PLUGINS", "some_other_plugin")
    monkeypatch.setenv("WEIGHTSTREAM_SGLANG", "1")
    calls = []
    monkeypatch.setattr(ws_sglang, "enabled", lambda *a: calls.append(1) or True)
    load_plugins()
    assert not calls
    assert not any(hooked(name) for name in TARGETS)


def test_a_bad_switch_is_a_clear_error_and_sglang_keeps_its_own(fresh_sglang, monkeypatch):
    monkeypatch.setenv("WEIGHTSTREAM_SGLANG", "maybe")
    with pytest.raises(weightstream.UsageError, match="WEIGHTSTREAM_SGLANG='maybe'.*expected one of 1, true"):
        ws_sglang.register()
    load_plugins()  # SGLang logs the failing plugin and goes on with its own iterators
    assert not any(hooked(name) for name in TARGETS)


def test_enabled_parses_like_sglang():
    assert ws_sglang.enabled({"SGLANG_PLUGINS": "a,weightstream"})
    assert not ws_sglang.enabled({"SGLANG_PLUGINS": "a,weightstreams"})
    assert not ws_sglang.enabled({"SGLANG_PLUGINS": ""})
    assert ws_sglang.enabled({"WEIGHTSTREAM_SGLANG": " YES "})
    assert not ws_sglang.enabled({"WEIGHTSTREAM_SGLANG": "no", "SGLANG_PLUGINS": "weightstream"})


def test_signatures_are_sglangs():
    """Ours take exactly SGLang 0.5.23's parameters (names, kinds, defaults); a changed SGLang
    signature is refused by register() instead of failing inside a load."""
    for name in TARGETS:
        theirs = inspect.signature(ORIGINAL[name]).parameters
        ours = inspect.signature(ws_sglang.HOOKS[name]).parameters
        assert [(p.name, p.kind, p.default) for p in theirs.values()] == [
            (p.name, p.kind, p.default) for p in ours.values()
        ], name

    def newer(hf_weights_files, disable_mmap=False, prefetch=False, prefetch_num_threads=4,
              drop_cache_after_load=False, decryption_key=None):
        pass

    with pytest.raises(weightstream.UsageError, match="decryption_key.*SGLang keeps its own"):
        ws_sglang._check_signature(TARGETS[0], newer, ws_sglang.HOOKS[TARGETS[0]])


# --- the same pairs as SGLang's own ----------------------------------------------------------


def _write(path, tensors):
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory):
    """Three shards written by safetensors with every dtype torch and safetensors share, a 0-d
    and an empty tensor, and names whose sorted order is not the file's order (safetensors
    stores by dtype first), so the reordering runs."""
    d = tmp_path_factory.mktemp("sglang-mixed")
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def ints(*shape, dtype, lo=-100, hi=100):
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)

    one = {
        "model.layers.0.weight": rnd(24, 16, dtype=torch.bfloat16),
        "model.layers.0.bias": rnd(24),
        "model.layers.0.scale": rnd(3, dtype=torch.float16),
        "model.layers.1.weight": rnd(24, 16, dtype=torch.bfloat16),
        "model.layers.10.weight": rnd(24, 16, dtype=torch.bfloat16),
        "model.layers.2.weight": rnd(24, 16),
        "model.ids": torch.arange(37, dtype=torch.int64),
        "a.scalar": torch.tensor(3.25),
        "z.empty": torch.empty(0, 4),
    }
    two = {
        "q.int8": ints(5, 7, dtype=torch.int8),
        "q.uint8": ints(5, 7, dtype=torch.uint8, lo=0, hi=255),
        "q.int16": ints(9, dtype=torch.int16),
        "q.int32": ints(2, 3, 4, dtype=torch.int32, lo=-(2**31), hi=2**31 - 1),
        "q.bool": ints(11, dtype=torch.bool, lo=0, hi=2),
        "q.f64": rnd(6, dtype=torch.float64),
        "q.fp8_e4m3": rnd(8, 8).clamp(-400, 400).to(torch.float8_e4m3fn),
        "q.fp8_e5m2": rnd(8, 8).to(torch.float8_e5m2),
        "q.weight_scale": rnd(8),
    }
    # Big enough that a 64 KiB window needs several batches.
    three = {f"big.{i}": rnd(64, 100) for i in range(4)} | {"big.norm": rnd(100, dtype=torch.bfloat16)}
    return [_write(d / f"model-0000{i}-of-00003.safetensors", t) for i, t in enumerate((one, two, three), 1)]


def _tiny_llama(path, *, dtype, seed, max_shard_size=None, tie=False):
    """A random tiny LlamaForCausalLM written by transformers' save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start at ones: randomise them so each tells it was loaded
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **kw)
    return Path(path)


@pytest.fixture(scope="module")
def llama_f32_sharded(tmp_path_factory):
    d = _tiny_llama(tmp_path_factory.mktemp("sglang-llama-f32"), dtype=torch.float32, seed=1, max_shard_size="100KB")
    assert len(list(d.glob("*.safetensors"))) >= 3
    return d


@pytest.fixture(scope="module")
def llama_bf16_tied(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("sglang-llama-bf16"), dtype=torch.bfloat16, seed=2, tie=True)


@pytest.fixture(scope="module")
def llama_f16_sharded(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("sglang-llama-f16"), dtype=torch.float16, seed=3, max_shard_size="200KB")


def weight_files(d):
    """The files in the order SGLang's loader hands them over (sorted; SGLANG_SORT_WEIGHT_FILES=0)."""
    return sorted(str(p) for p in Path(d).glob("*.safetensors"))


@pytest.fixture(params=["mixed", "llama_f32_sharded", "llama_bf16_tied", "llama_f16_sharded"])
def files(request):
    if request.param == "mixed":
        return request.getfixturevalue("mixed_files")
    return weight_files(request.getfixturevalue(request.param))


def raw_bytes(t):
    return t.reshape(-1).view(torch.uint8)


def assert_same_pairs(ours, theirs, *, same_order=True):
    names_ours = [n for n, _ in ours]
    names_theirs = [n for n, _ in theirs]
    if same_order:
        assert names_ours == names_theirs
    else:
        assert sorted(names_ours) == sorted(names_theirs) and len(set(names_ours)) == len(names_ours)
    theirs = dict(theirs)
    for name, a in ours:
        b = theirs[name]
        assert a.device.type == "cpu" and b.device.type == "cpu", name
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.is_contiguous(), name
        assert torch.equal(raw_bytes(a), raw_bytes(b)), name


CALLS = [
    ("safetensors_weights_iterator", {}),
    ("safetensors_weights_iterator", {"disable_mmap": True}),
    ("safetensors_weights_iterator", {"prefetch": True, "prefetch_num_threads": 2}),
    ("safetensors_weights_iterator", {"drop_cache_after_load": True}),
    ("buffered_multi_thread_safetensors_weights_iterator", {"max_workers": 1}),
    ("buffered_multi_thread_safetensors_weights_iterator", {"max_workers": 8}),
    ("buffered_multi_thread_safetensors_weights_iterator",
     {"max_workers": 3, "disable_mmap": True, "prefetch": True, "drop_cache_after_load": True}),
]


@pytest.mark.parametrize("name,kwargs", CALLS, ids=lambda c: c if isinstance(c, str) else ",".join(c) or "defaults")
def test_same_pairs_as_sglangs_own(fresh_sglang, files, name, kwargs):
    ours = list(ws_sglang.HOOKS[name](files, **kwargs))
    theirs = list(ORIGINAL[name](files, **kwargs))
    assert len(theirs) > 5
    assert_same_pairs(ours, theirs)


def test_a_file_without_tensors(fresh_sglang, tmp_path, mixed_files):
    empty = _write(tmp_path / "empty.safetensors", {})
    files = [empty, mixed_files[1], empty]
    for name in TARGETS:
        kw = {"max_workers": 2} if name.startswith("buffered") else {}
        assert_same_pairs(list(ws_sglang.HOOKS[name](files, **kw)), list(ORIGINAL[name](files, **kw)))


def test_same_pairs_through_the_hooks(fresh_sglang, monkeypatch, mixed_files, llama_f32_sharded):
    """What DefaultModelLoader calls after load_plugins(): the loader module's names."""
    monkeypatch.setenv("WEIGHTSTREAM_SGLANG", "1")
    load_plugins()
    for files in (mixed_files, weight_files(llama_f32_sharded)):
        assert_same_pairs(
            list(sglang_loader.safetensors_weights_iterator(files)),
            list(ORIGINAL["safetensors_weights_iterator"](files)),
        )
        assert_same_pairs(
            list(sglang_loader.buffered_multi_thread_safetensors_weights_iterator(files, max_workers=8)),
            list(ORIGINAL["buffered_multi_thread_safetensors_weights_iterator"](files, max_workers=8)),
        )


@pytest.mark.parametrize(
    "options",
    [
        {"window": "64KiB"},
        {"window": 131072, "staging": "64KiB", "staging_count": 2, "threads": 1, "io": "pread"},
        {"order": "name", "io": "auto"},
    ],
    ids=["small-window", "small-ring", "explicit-defaults"],
)
def test_options_keep_the_pairs(fresh_sglang, monkeypatch, mixed_files, options):
    monkeypatch.setenv(ws_sglang.ENV_OPTIONS, json.dumps(options))
    for name in TARGETS:
        kw = {"max_workers": 2} if "max_workers" in inspect.signature(ORIGINAL[name]).parameters else {}
        assert_same_pairs(list(ws_sglang.HOOKS[name](mixed_files, **kw)), list(ORIGINAL[name](mixed_files, **kw)))


def test_file_order_option(fresh_sglang, monkeypatch, mixed_files):
    """``"order": "file"``: the same pairs, each file's in the order stored."""
    monkeypatch.setenv(ws_sglang.ENV_OPTIONS, '{"order": "file", "window": "64KiB"}')
    ours = list(ws_sglang.safetensors_weights_iterator(mixed_files))
    assert_same_pairs(ours, list(ORIGINAL["safetensors_weights_iterator"](mixed_files)), same_order=False)
    stored = []
    for path in mixed_files:
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        stored += sorted(header, key=lambda k: header[k]["data_offsets"])
    assert [n for n, _ in ours] == stored
    assert stored != [n for n, _ in ORIGINAL["safetensors_weights_iterator"](mixed_files)]  # the test tells


def test_stopping_early_and_holding_tensors(fresh_sglang, monkeypatch, mixed_files):
    """A consumer may stop after a few tensors (close releases everything) and may keep every
    tensor it took past the end of the load (each owns its memory)."""
    monkeypatch.setenv(ws_sglang.ENV_OPTIONS, '{"window": "64KiB"}')
    it = ws_sglang.buffered_multi_thread_safetensors_weights_iterator(mixed_files, 4)
    first = [next(it) for _ in range(3)]
    it.close()
    theirs = list(ORIGINAL["safetensors_weights_iterator"](mixed_files))
    assert_same_pairs(first, theirs[:3])
    kept = list(ws_sglang.safetensors_weights_iterator(mixed_files))
    import gc

    gc.collect()
    assert_same_pairs(kept, theirs)


@pytest.mark.parametrize(
    "options,match",
    [
        ('{"windw": 1}', r"unknown key 'windw'; valid keys: window, staging, staging_count, read_size, threads, io, direct, order, share_reads, timeout"),
        ("{window: 1}", "WEIGHTSTREAM_SGLANG_OPTIONS: not JSON"),
        ('["window"]', "expected a JSON object"),
        ('{"order": "random"}', r"\['order'\]: expected 'name' or 'file'"),
        ('{"window": "lots"}', r"\['window'\]: expected a size"),
        ('{"direct": "yes"}', r"\['direct'\]: expected true or false"),
        ('{"share_reads": 0}', r"\['share_reads'\]: expected true or false"),
        ('{"io": "mmap"}', r"\['io'\]: expected 'auto', 'pread' or 'uring'"),
        ('{"threads": 0}', r"\['threads'\]: expected a positive int"),
    ],
)
def test_bad_options_are_clear_errors(fresh_sglang, monkeypatch, mixed_files, options, match):
    monkeypatch.setenv(ws_sglang.ENV_OPTIONS, options)
    for name in TARGETS:
        kw = {"max_workers": 2} if name.startswith("buffered") else {}
        with pytest.raises(weightstream.UsageError, match=match):
            ws_sglang.HOOKS[name](mixed_files, **kw)  # raised when called, before any read


@pytest.mark.parametrize("max_workers", [0, -1, 1.5, None, True])
def test_max_workers_must_be_a_positive_int(mixed_files, max_workers):
    with pytest.raises(weightstream.UsageError, match="max_workers: expected a positive int"):
        ws_sglang.buffered_multi_thread_safetensors_weights_iterator(mixed_files, max_workers)


def test_a_window_below_the_largest_tensor_is_an_error(fresh_sglang, monkeypatch, mixed_files):
    monkeypatch.setenv(ws_sglang.ENV_OPTIONS, '{"window": "1KiB"}')
    with pytest.raises(weightstream.WeightstreamError, match="window"):
        list(ws_sglang.safetensors_weights_iterator(mixed_files))


def test_bad_files_are_typed_errors_naming_the_file(fresh_sglang, tmp_path, mixed_files):
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):  # SGLang's own
        list(ORIGINAL["safetensors_weights_iterator"]([missing]))
    with pytest.raises(weightstream.ReadError, match="missing.safetensors"):
        list(ws_sglang.safetensors_weights_iterator([missing]))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(mixed_files[0]).read_bytes()[:-10])
    with pytest.raises(Exception):  # SGLang's own refuses it too
        list(ORIGINAL["safetensors_weights_iterator"]([str(truncated)]))
    with pytest.raises(weightstream.FormatError, match="truncated.safetensors"):
        list(ws_sglang.buffered_multi_thread_safetensors_weights_iterator([mixed_files[1], str(truncated)], 2))


# --- SGLang's own DefaultModelLoader through the hooks, on the CPU -------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sglang_cpu_runtime(llama_f32_sharded):
    """What an SGLang scheduler process sets up before it loads a model, on the CPU: published
    server args with this process as rank 0, a gloo world of one and its model-parallel groups.
    Yields a function ``load(model_dir, **extra_config)`` that runs SGLang's get_model_loader
    and ``load_model`` for a local directory and returns the model."""
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    def publish_for(model_dir):
        args = ServerArgs(model_path=str(model_dir), device="cpu", load_format="safetensors")
        publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0))

    publish_for(llama_f32_sharded)
    started_world = not torch.distributed.is_initialized()
    parallel_state.init_distributed_environment(
        world_size=1, rank=0, local_rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{_free_port()}", backend="gloo",
    )
    parallel_state.initialize_model_parallel()

    def load(model_dir, **extra_config):
        publish_for(model_dir)
        model_config = ModelConfig(str(model_dir), dtype="auto")
        load_config = LoadConfig(load_format="safetensors", model_loader_extra_config=extra_config)
        loader = sglang_loader.get_model_loader(load_config, model_config)
        assert type(loader) is sglang_loader.DefaultModelLoader
        return loader.load_model(model_config=model_config, device_config=DeviceConfig("cpu"))

    try:
        yield load
    finally:
        # Not parallel_state.destroy_model_parallel(): it imports SGLang's launcher
        # (sglang.srt.distributed.bootstrap -> uvicorn), which the lean install leaves out. The
        # groups are dropped with the world and the published context.
        if started_world:
            parallel_state.destroy_distributed_environment()
        reset_context()


@pytest.mark.parametrize("multithread", [True, False], ids=["buffered-multi-thread", "single-thread"])
@pytest.mark.parametrize("model", ["llama_f32_sharded", "llama_bf16_tied"])
def test_default_model_loader_through_the_hooks(fresh_sglang, monkeypatch, request, sglang_cpu_runtime, model, multithread):
    """SGLang's own DefaultModelLoader (``--load-format safetensors``) builds its
    LlamaForCausalLM (stacked qkv and gate-up parameters, tied embeddings) on the CPU: through
    our hooks, every parameter equals its own load bit for bit, and every file went through
    weightstream."""
    model_dir = request.getfixturevalue(model)
    extra = {"enable_multithread_load": multithread}
    theirs = dict(sglang_cpu_runtime(model_dir, **extra).state_dict())

    monkeypatch.setenv("WEIGHTSTREAM_SGLANG", "1")
    load_plugins()
    assert all(hooked(name) for name in TARGETS) and around_hooked()
    read = []
    real_iterate = weightstream.Loader.iterate
    monkeypatch.setattr(weightstream.Loader, "iterate", lambda self, path, **kw: read.append(path) or real_iterate(self, path, **kw))
    ours = dict(sglang_cpu_runtime(model_dir, **extra).state_dict())

    assert sorted(read) == weight_files(model_dir)
    assert "model.layers.0.self_attn.qkv_proj.weight" in ours and "model.layers.0.mlp.gate_up_proj.weight" in ours
    assert ours.keys() == theirs.keys()
    for name, a in ours.items():
        b = theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape and a.device.type == "cpu", name
        assert torch.equal(raw_bytes(a.contiguous()), raw_bytes(b.contiguous())), name
    # And the load is the checkpoint's: the stacked q/k/v rows are the file's q_proj rows.
    with weightstream.safe_open(weight_files(model_dir)[0], framework="pt") as f:
        if "model.layers.0.self_attn.q_proj.weight" in f.keys():
            q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
            assert torch.equal(ours["model.layers.0.self_attn.qkv_proj.weight"][: q.shape[0]], q)


# --- TP = 2: the ranks of SGLang's tensor-parallel group share the reads --------------------

_TP2_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys, traceback
    import torch, torch.multiprocessing as mp

    def rank_main(rank, port, dirs, q):
        try:
            q.put(json.dumps(load_all(rank, port, dirs)))
        except BaseException:
            q.put(json.dumps({"rank": rank, "error": traceback.format_exc()}))
            raise

    def load_all(rank, port, dirs):
        import functools
        from sglang.srt.configs.device_config import DeviceConfig
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import parallel_state
        from sglang.srt.model_loader import loader as sglang_loader, weight_utils
        from sglang.srt.plugins import load_plugins
        from sglang.srt.runtime_context import SpawnRanks, publish
        from sglang.srt.server_args import ServerArgs

        one_file, sharded, one_file_copy = dirs
        args = ServerArgs(model_path=one_file, device="cpu", load_format="safetensors", tp_size=2)
        publish(args, role="scheduler", ranks=SpawnRanks(world_rank=rank))
        parallel_state.init_distributed_environment(world_size=2, rank=rank, local_rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
        # SGLang's GroupCoordinator makes a PyNcclCommunicator at TP > 1, which needs CUDA.
        parallel_state.init_model_parallel_group = functools.partial(
            parallel_state.init_model_parallel_group, use_pynccl=False)
        parallel_state.initialize_model_parallel()

        def load(model_dir, **extra):
            mc = ModelConfig(model_dir, dtype="auto")
            lc = LoadConfig(load_format="safetensors", model_loader_extra_config=extra)
            model = sglang_loader.get_model_loader(lc, mc).load_model(model_config=mc, device_config=DeviceConfig("cpu"))
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

        def differ(got, want):
            return sorted(k for k in set(got) | set(want) if k not in got or k not in want
                          or got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
                          or not torch.equal(got[k].contiguous().reshape(-1).view(torch.uint8),
                                             want[k].contiguous().reshape(-1).view(torch.uint8)))

        # SGLang's own loader first (the plugin not loaded yet), then through the hooks.
        want = {d: load(d) for d in (one_file, sharded)}
        os.environ["WEIGHTSTREAM_SGLANG"] = "1"
        load_plugins()
        import weightstream.sglang as ws_sglang

        def ours(name, model_dir, options=None, sort_files=None, **extra):
            os.environ["WEIGHTSTREAM_SGLANG_OPTIONS"] = json.dumps(options or {})
            if sort_files is not None:
                os.environ["SGLANG_SORT_WEIGHT_FILES"] = str(sort_files)
            try:
                got = load(model_dir, **extra)
            finally:
                os.environ.pop("SGLANG_SORT_WEIGHT_FILES", None)
            base = one_file if model_dir == one_file_copy else model_dir
            return name, {"dir": base, "differ": differ(got, want[base]),
                          "qkv": list(got["model.layers.0.self_attn.qkv_proj.weight"].shape),
                          "stats": dict(ws_sglang.last_stats)}

        res = dict([
            ours("shared", one_file),
            ours("shared-sharded", sharded),
            ours("shared-sharded-single-thread", sharded, enable_multithread_load=False),
            # SGLang staggers the files by TP rank: the group reads them in rank 0's order.
            ours("shared-staggered", sharded, sort_files=1),
            ours("not-shared", one_file, options={"share_reads": False}),
            # The ranks were given different files (the same tensors): each reads its own.
            ours("different-files", one_file if rank == 0 else one_file_copy),
        ])
        # Rank 1 on another host (its host name as socket reports it): each reads for itself.
        real_hostname = socket.gethostname
        if rank == 1:
            socket.gethostname = lambda: real_hostname() + "-other"
        try:
            res.update([ours("two-hosts", one_file)])
        finally:
            socket.gethostname = real_hostname
        if rank == 0:
            # Calls that only this rank makes: the hooked module-level iterator called directly
            # (as the bitsandbytes loader does), and a source that is not the model's own (as
            # a LoRA adapter's): no collective, or this would wait for rank 1 forever.
            files = sorted(os.path.join(one_file, f) for f in os.listdir(one_file) if f.endswith(".safetensors"))
            n = len(list(weight_utils.buffered_multi_thread_safetensors_weights_iterator(files, 2)))
            res["direct"] = {"tensors": n, "stats": dict(ws_sglang.last_stats)}
            loader = sglang_loader.get_model_loader(LoadConfig(load_format="safetensors"), ModelConfig(one_file, dtype="auto"))
            n = len(list(loader._get_weights_iterator(sglang_loader.DefaultModelLoader.Source(one_file, None))))
            res["other-source"] = {"tensors": n, "stats": dict(ws_sglang.last_stats)}
        # The files SGLang hands this rank when it staggers them (the order differs by rank).
        os.environ["SGLANG_SORT_WEIGHT_FILES"] = "1"
        try:
            loader = sglang_loader.get_model_loader(LoadConfig(load_format="safetensors"), ModelConfig(sharded, dtype="auto"))
            res["staggered-files"] = loader._prepare_weights(sharded, None, False)[1]
        finally:
            os.environ.pop("SGLANG_SORT_WEIGHT_FILES", None)
        res["rank"] = rank
        return res

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(r, port, sys.argv[1:], q)) for r in range(2)]
        for p in procs: p.start()
        results = []
        try:
            while len(results) < len(procs):
                results.append(json.loads(q.get(timeout=300)))
                if "error" in results[-1]:  # a rank failed: its traceback, without waiting on the other
                    sys.exit(results[-1]["error"])
        finally:
            for p in procs:
                p.join(60 if len(results) == len(procs) else 5)
                if p.is_alive():  # a rank stuck after the other failed: nothing left behind
                    p.kill(); p.join()
        print(json.dumps({"results": sorted(results, key=lambda r: r["rank"]), "exitcodes": [p.exitcode for p in procs]}))
    """
)


def checkpoint_data(model_dir):
    """``(data bytes, largest tensor's bytes, tensors)`` of a directory's safetensors files,
    from their headers."""
    total = largest = count = 0
    for f in weight_files(model_dir):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        sizes = [end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]]]
        total += sum(sizes)
        largest = max([largest] + sizes)
        count += len(sizes)
    return total, largest, count


def test_tensor_parallel_2_shares_reads_and_equals_sglangs_own(llama_f32_sharded, llama_bf16_tied, tmp_path):
    """SGLang at TP = 2 on the CPU over gloo, two spawned processes: its DefaultModelLoader,
    through our hooks, hands the iterators its TP group (the AROUND hook of
    ``_get_weights_iterator``), so the ranks read each byte once and share it through the
    group's gloo ``cpu_group``. On both ranks every parameter equals SGLang's own load (without
    the plugin) bit for bit, qkv split per rank, and the ranks' bytes read sum to the
    checkpoint's data bytes once. Each rank reads for itself with ``"share_reads": false``,
    across hosts, when the ranks were given different files, and in calls that do not come from
    the loader's own model load."""
    copy = tmp_path / "copy"
    shutil.copytree(llama_bf16_tied, copy)
    script = tmp_path / "tp2.py"
    script.write_text(_TP2_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    dirs = [str(llama_bf16_tied), str(llama_f32_sharded), str(copy)]
    out = subprocess.run([sys.executable, str(script), *dirs], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["exitcodes"] == [0, 0], out.stderr[-4000:]
    ranks = report["results"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # qkv: (4 + 2 + 2) heads x 16 rows / 2 ranks = 64 rows of the 64 columns.
    for r, res in enumerate(ranks):
        for key, load in res.items():
            if isinstance(load, dict) and "differ" in load:
                assert load["differ"] == [] and load["qkv"] == [64, 64], (r, key, load)
    for key in ["shared", "shared-sharded", "shared-sharded-single-thread", "shared-staggered"]:
        total, largest, count = checkpoint_data(ranks[0][key]["dir"])
        shared = [res[key]["stats"] for res in ranks]
        assert [s["group_size"] for s in shared] == [2, 2], (key, shared)
        # Each byte read once by the group, and every byte one rank read sent to the other
        # (the window buffer's chunks: with the alignment gaps between tensors, at most 256
        # bytes each), and received by it.
        assert sum(s["bytes_read"] for s in shared) == total, (key, shared, total)
        assert all(s["bytes_read"] > 0 for s in shared), (key, shared)
        assert all(0 <= s["bytes_sent"] - s["bytes_read"] < 256 * count for s in shared), (key, shared)
        assert [s["bytes_received"] for s in shared] == [shared[1]["bytes_sent"], shared[0]["bytes_sent"]], (key, shared)
        assert all(s["bytes_loaded"] == total for s in shared), (key, shared)  # every rank got every tensor
        if key == "shared":
            # One file: balanced by bytes, within one tensor of half.
            assert all(abs(s["bytes_read"] - total / 2) <= largest for s in shared), (shared, total, largest)
        else:
            assert all(s["files"] == len(weight_files(llama_f32_sharded)) > 1 for s in shared), (key, shared)
    staggered = [res["staggered-files"] for res in ranks]
    assert staggered[0] != staggered[1] and sorted(staggered[0]) == sorted(staggered[1]), staggered
    total, _, _ = checkpoint_data(llama_bf16_tied)
    for key in ["not-shared", "different-files", "two-hosts"]:
        for res in ranks:
            s = res[key]["stats"]
            assert s["group_size"] == 1 and s["bytes_read"] == total, (key, res["rank"], s)
            assert s["bytes_sent"] == s["bytes_received"] == 0, (key, res["rank"], s)
    for key in ["direct", "other-source"]:
        s = ranks[0][key]["stats"]
        assert ranks[0][key]["tensors"] > 5 and s["group_size"] == 1 and s["bytes_read"] == total, (key, s)
