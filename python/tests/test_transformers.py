"""torch tier: `weightstream.transformers` against transformers' own `from_pretrained`, on real
tiny models built here with random weights and saved with `save_pretrained`. Every parameter
and buffer must be bitwise equal (names, dtypes, shapes, devices too), the logits of a fixed
input bitwise equal, tied weights tied in both, and `generation_config` the same."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torch  # noqa: E402  (a missing framework fails the torch tier, never a skip)
import transformers  # noqa: E402

import weightstream as ws  # noqa: E402
import weightstream.transformers as wst  # noqa: E402
from conftest import make_hf_cache  # noqa: E402
from safetensors.torch import load_file as st_load_file  # noqa: E402
from safetensors.torch import save_file as st_save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

MiB = 1 << 20
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 3, 7]])


def randomize(model, seed):
    """Random values in every parameter and persistent buffer (default inits leave biases at 0
    and norms at 1: equal whatever was loaded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05)
    return model


def tiny(kind):
    """(model, auto class, forward kwargs) for a tiny random model of `kind`."""
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    elif kind == "bert":
        model = BertForMaskedLM(BertConfig(**common, max_position_embeddings=64))
    elif kind == "mixtral":
        model = MixtralForCausalLM(
            MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
        )
    elif kind == "t5":
        model = T5ForConditionalGeneration(
            T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
        )
    else:
        raise AssertionError(kind)
    return randomize(model, seed=hash(kind) % 1000)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(kind, dtype=torch.float32, **save_kwargs)`: the directory of a tiny model saved
    with save_pretrained (cached per arguments)."""
    cache = {}

    def make(kind, dtype=torch.float32, **save_kwargs):
        key = (kind, dtype, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{kind}-{str(dtype).split('.')[-1]}")
            model = tiny(kind).to(dtype)
            if model.can_generate():
                model.generation_config.max_new_tokens = 7  # something to find in the loaded one
            model.save_pretrained(d, **save_kwargs)
            cache[key] = d
        return cache[key]

    return make


def as_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(ours, theirs, what):
    assert list(ours) == list(theirs), f"{what}: names differ"
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), f"{what} {name}"
        assert a.requires_grad == b.requires_grad, f"{what} {name}: requires_grad"
        assert torch.equal(as_bytes(a), as_bytes(b)), f"{what} {name}: bytes differ"


def tied_pairs(model):
    """Which parameter names share memory (tied weights), as a set of frozensets."""
    by_ptr = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault((p.data_ptr(), p.device), set()).add(name)
    return {frozenset(v) for v in by_ptr.values() if len(v) > 1}


def outputs(model):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = model(input_ids=IDS.to(model.device), decoder_input_ids=IDS[:, :4].to(model.device))
        else:
            out = model(input_ids=IDS.to(model.device))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_model(ours, theirs):
    assert type(ours) is type(theirs)
    assert_same_tensors(
        dict(ours.named_parameters(remove_duplicate=False)), dict(theirs.named_parameters(remove_duplicate=False)), "parameter"
    )
    assert_same_tensors(dict(ours.named_buffers(remove_duplicate=False)), dict(theirs.named_buffers(remove_duplicate=False)), "buffer")
    assert tied_pairs(ours) == tied_pairs(theirs)
    assert ours.training == theirs.training == False  # noqa: E712  (eval() as transformers leaves it)
    assert ours.config.to_dict() == theirs.config.to_dict()
    if theirs.can_generate():
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    a, b = outputs(ours), outputs(theirs)
    assert a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b)), "outputs differ"


def load_ours(path, **kwargs):
    """weightstream's load; the RNG seeded as for `load_theirs`, so that weights missing from a
    checkpoint (BERT's pooler under AutoModel) initialise alike."""
    torch.manual_seed(1234)
    return wst.from_pretrained(path, **kwargs)


def load_theirs(auto, path, **kwargs):
    torch.manual_seed(1234)
    return auto.from_pretrained(path, **kwargs)


class Reads:
    """Counts the tensors weightstream's patched handles load (proves the bytes came through
    us, not through safetensors)."""

    def __init__(self, monkeypatch):
        self.names = []
        original = wst._Handle._load

        def spy(handle, name, device):
            self.names.append(name)
            return original(handle, name, device)

        monkeypatch.setattr(wst._Handle, "_load", spy)


MODELS = [("llama", AutoModelForCausalLM), ("qwen2", AutoModelForCausalLM), ("gpt2", AutoModelForCausalLM), ("bert", AutoModel)]


@pytest.mark.parametrize("kind,auto", MODELS, ids=[k for k, _ in MODELS])
def test_from_pretrained_matches_transformers(saved, kind, auto, monkeypatch):
    d = saved(kind)
    reads = Reads(monkeypatch)
    ours = load_ours(d, model_class=auto)
    theirs = load_theirs(auto, d)
    assert_same_model(ours, theirs)
    keys = set(st_load_file(d / "model.safetensors"))
    # Every checkpoint tensor the model uses came through weightstream, once (BERT's AutoModel
    # drops the MLM head, which is then never read).
    assert len(reads.names) == len(set(reads.names)) and set(reads.names) <= keys
    assert len(reads.names) >= len(keys) - (6 if kind == "bert" else 0)


def test_tied_weights_are_tied(saved):
    ours = load_ours(saved("qwen2"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours = load_ours(saved("llama"))
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()


def test_bert_prefix_and_legacy_gamma_beta(saved, tmp_path):
    """A checkpoint of BertForMaskedLM (keys under `bert.`) with LayerNorm weights renamed to
    the legacy `gamma`/`beta`: transformers renames both, and so do we (it is its code)."""
    src = saved("bert")
    d = tmp_path / "legacy"
    d.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    tensors = st_load_file(src / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    assert any(k.endswith("gamma") for k in legacy)
    st_save_file(legacy, d / "model.safetensors", metadata={"format": "pt"})
    for auto in (AutoModel, transformers.AutoModelForMaskedLM):
        assert_same_model(load_ours(d, model_class=auto), load_theirs(auto, d))


def test_moe_experts_fused_as_transformers_does(saved):
    """Mixtral: save_pretrained writes one tensor per expert; loading fuses them (transformers'
    weight converters) -- the same fused parameters through us."""
    d = saved("mixtral")
    keys = st_load_file(d / "model.safetensors").keys()
    assert any(".experts.0." in k for k in keys), "expected per-expert keys in the file"
    assert_same_model(load_ours(d), load_theirs(AutoModelForCausalLM, d))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sharded_checkpoint_with_index(saved, kind, monkeypatch):
    d = saved(kind, max_shard_size="100KB")
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").exists()
    reads = Reads(monkeypatch)
    assert_same_model(load_ours(d), load_theirs(AutoModelForCausalLM, d))
    assert len(reads.names) > 0


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_half_precision_files(saved, kind, file_dtype):
    d = saved(kind, file_dtype)
    ours, theirs = load_ours(d), load_theirs(AutoModelForCausalLM, d)
    assert_same_model(ours, theirs)
    assert ours.model.embed_tokens.weight.dtype == file_dtype if kind == "llama" else True


@pytest.mark.parametrize(
    "file_dtype,dtype,hf_dtype",
    [
        (torch.float32, "bf16", torch.bfloat16),
        (torch.float32, "f16", torch.float16),
        (torch.bfloat16, "f32", torch.float32),
        (torch.bfloat16, torch.float16, torch.float16),
        (torch.float16, "auto", "auto"),
    ],
)
def test_dtype_conversions(saved, file_dtype, dtype, hf_dtype):
    d = saved("llama", file_dtype)
    ours = load_ours(d, dtype=dtype)
    theirs = load_theirs(AutoModelForCausalLM, d, dtype=hf_dtype)
    assert_same_model(ours, theirs)


def test_keep_in_fp32_modules(saved):
    """T5 keeps `wo` in f32 when loaded in fp16 (`_keep_in_fp32_modules`)."""
    d = saved("t5")
    ours = load_ours(d, dtype="f16", model_class=AutoModelForSeq2SeqLM)
    theirs = load_theirs(AutoModelForSeq2SeqLM, d, dtype=torch.float16)
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert ours.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    assert_same_model(ours, theirs)


def test_model_class_by_class_and_by_name(saved):
    d = saved("llama")
    theirs = load_theirs(LlamaForCausalLM, d)
    assert_same_model(load_ours(d, model_class=LlamaForCausalLM), theirs)
    assert_same_model(load_ours(d, model_class="LlamaForCausalLM"), theirs)
    base = load_ours(d, model_class="AutoModel")
    assert type(base).__name__ == "LlamaModel"


def test_hf_repo_id_from_a_cache_folder(saved, tmp_path, monkeypatch):
    """A repo id resolved by transformers / huggingface_hub from an HF cache folder (the Hub is
    unreachable: offline mode)."""
    d = saved("llama", max_shard_size="100KB")
    cache = tmp_path / "hub"
    make_hf_cache(cache, sorted(p for p in d.iterdir() if p.is_file()), repo="models--org--tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = load_ours("org/tiny-llama", cache_dir=cache)
    theirs = load_theirs(AutoModelForCausalLM, "org/tiny-llama", cache_dir=cache)
    assert_same_model(ours, theirs)
    assert ours.generation_config.max_new_tokens == 7


def test_patch_gives_the_same_model(saved, monkeypatch):
    d = saved("qwen2", max_shard_size="100KB")
    reads = Reads(monkeypatch)
    with wst.patch():
        patched = load_theirs(AutoModelForCausalLM, d)
    n = len(reads.names)
    assert n > 0, "nothing was read through weightstream"
    plain = load_theirs(AutoModelForCausalLM, d)
    assert len(reads.names) == n, "the patch outlived its block"
    assert_same_model(patched, plain)


def _names():
    import transformers.core_model_loading as cml

    sites = [sys.modules[m] for m in wst.patched_sites()]
    return {(m.__name__, "safe_open"): m.safe_open for m in sites} | {("cml", "_materialize_copy"): cml._materialize_copy}


def _names_unpatched():
    import transformers.core_model_loading as cml

    return {k: wst._unpatched(v) for k, v in _names().items()} | {("cml", "_materialize_copy"): wst._unpatched(cml._materialize_copy)}


def test_patch_covers_every_import_site():
    """Every module of the installed transformers that binds `safe_open` from safetensors (found
    by reading its sources) is patched."""
    import safetensors

    root = Path(transformers.__file__).parent
    expected = set()
    for f in root.rglob("*.py"):
        text = f.read_text(encoding="utf-8", errors="replace")
        if "from safetensors import safe_open" in text or "from safetensors import" in text and " safe_open" in text.split("from safetensors import", 1)[1].split("\n", 1)[0]:
            mod = ".".join(f.relative_to(root.parent).with_suffix("").parts)
            expected.add(mod)
    assert "transformers.modeling_utils" in expected
    importable = set()
    for mod in expected:
        try:
            __import__(mod)
            importable.add(mod)
        except Exception:  # a model needing packages absent here: not loadable, not patched
            pass
    assert importable <= set(wst.patched_sites())
    with wst.patch():
        for mod in importable:
            assert getattr(sys.modules[mod].safe_open, "_weightstream_patch", False), mod
    for mod in importable:
        assert sys.modules[mod].safe_open is safetensors.safe_open, mod


def test_patch_restored_after_exit_and_after_an_exception(saved):
    before = _names()
    with wst.patch():
        inside = _names()
        assert all(getattr(fn, "_weightstream_patch", False) for fn in inside.values())
    assert _names() == before
    with pytest.raises(ZeroDivisionError):
        with wst.patch():
            1 / 0
    assert _names() == before
    # An exception from transformers itself (no checkpoint in the folder) restores too.
    with pytest.raises(OSError):
        with wst.patch():
            load_theirs(AutoModelForCausalLM, saved("llama").parent / "nothing-here")
    assert _names() == before
    with pytest.raises(OSError):
        load_ours(saved("llama").parent / "nothing-here")
    assert _names() == before


def test_patches_nest_and_exit_in_any_order(saved):
    import transformers.modeling_utils as mu

    f = str(saved("llama") / "model.safetensors")
    before = _names()
    outer, inner = wst.patch(), wst.patch(staging_count=2)
    with outer:
        mid = _names()
        assert mid != before
        assert mu.safe_open(f, "pt")._patcher is outer._patcher
        with inner:
            assert _names() == mid
            assert mu.safe_open(f, "pt")._patcher is inner._patcher  # the innermost serves
        assert _names() == mid and mu.safe_open(f, "pt")._patcher is outer._patcher
        with pytest.raises(ws.UsageError, match="already active"):
            outer.__enter__()
    assert _names() == before
    # Exits out of order (as blocks in two threads may): restored when the last one exits.
    a, b = wst.patch(), wst.patch()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert all(getattr(fn, "_weightstream_patch", False) for fn in _names().values())
    assert mu.safe_open(f, "pt")._patcher is b._patcher
    b.__exit__(None, None, None)
    assert _names() == before


def test_patches_in_two_threads(saved):
    """Two threads, each in its own patch, read through it at once and exit in the opposite
    order of entry. (Not two `from_pretrained` at once: transformers' own is not thread-safe,
    two concurrent calls leave its `no_tie_weights` patch on.)"""
    import threading

    import transformers.modeling_utils as mu

    before = _names()
    f = str(saved("llama") / "model.safetensors")
    expected = st_load_file(f)
    entered, second_exited, errors, seen = threading.Barrier(2), threading.Event(), [], {}

    def worker(i):
        try:
            with wst.patch() as p:
                entered.wait()
                for _ in range(3):
                    sd = mu.load_state_dict(f)
                    assert all(torch.equal(sd[k], v) for k, v in expected.items())
                    seen[i] = mu.safe_open(f, "pt")._patcher is p._patcher
                if i == 0:  # entered first or not, thread 0 exits last
                    second_exited.wait(30)
            if i == 1:
                second_exited.set()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen == {0: True, 1: True}, "each thread is served by the patch it entered"
    assert _names() == before


def test_synchronous_loading_is_patched_too(saved, monkeypatch):
    """HF_DEACTIVATE_ASYNC_LOAD=1: transformers materialises tensors in its own thread."""
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    d = saved("gpt2")
    reads = Reads(monkeypatch)
    ours = load_ours(d)
    assert len(reads.names) > 0
    assert_same_model(ours, load_theirs(AutoModelForCausalLM, d))


def test_patched_handle_speaks_safetensors(saved):
    """The handle transformers gets: keys, metadata, get_slice (shape, dtype, [...], row
    blocks), get_tensor; a missing tensor is a typed error naming the file and the tensor."""
    import safetensors
    import transformers.modeling_utils as mu

    f = saved("llama", torch.bfloat16) / "model.safetensors"
    with wst.patch():
        ours = mu.safe_open(str(f), framework="pt", device="cpu", backend="mmap")
    with safetensors.safe_open(str(f), framework="pt", device="cpu") as theirs, ours:
        assert ours.keys() == theirs.keys()
        assert ours.metadata() == theirs.metadata()
        for k in theirs.keys():
            a, b = ours.get_slice(k), theirs.get_slice(k)
            assert a.get_shape() == b.get_shape() and a.get_dtype() == b.get_dtype()
            assert torch.equal(as_bytes(a[...]), as_bytes(b[...]))
            assert torch.equal(as_bytes(ours.get_tensor(k)), as_bytes(theirs.get_tensor(k)))
            if len(b.get_shape()) == 2:
                assert torch.equal(a[1:3], b[1:3]) and torch.equal(a[:, 2:5], b[:, 2:5])
        with pytest.raises(ws.MissingTensorError, match=r"model\.safetensors.*no tensor named `nope`"):
            ours.get_tensor("nope")
    # transformers' dtype probe (map_location="meta") goes through the handle too.
    with wst.patch():
        meta = mu.load_state_dict(str(f), map_location="meta")
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in meta.values())


def test_patched_handle_every_dtype(tmp_path):
    """Floats, ints, bool, fp8, 0-d and empty tensors: the handle's tensors equal safetensors'
    (dtype, shape and bytes)."""
    import safetensors
    import transformers.modeling_utils as mu

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    tensors = {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "i64": (base * 100).long(), "i32": (base * 100).int(), "i16": (base * 100).short(), "i8": (base * 10).to(torch.int8),
        "u8": (base * 10).abs().to(torch.uint8), "bool": base > 0,
        "f8_e4m3": base.to(torch.float8_e4m3fn), "f8_e5m2": base.to(torch.float8_e5m2),
        "u16": (base * 10).abs().to(torch.uint16), "u32": (base * 10).abs().to(torch.uint32),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "c64": base.to(torch.complex64),
    }
    f = tmp_path / "dtypes.safetensors"
    st_save_file(tensors, f)
    with wst.patch():
        ours = mu.safe_open(f, framework="pt", device="cpu", backend="mmap")
    with safetensors.safe_open(f, framework="pt") as theirs:
        for k in theirs.keys():
            a, b = ours.get_slice(k)[...], theirs.get_slice(k)[...]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), k
            assert torch.equal(as_bytes(a), as_bytes(b)), k


def test_bad_arguments_are_clear_errors(saved):
    d = saved("llama")
    with pytest.raises(ws.UsageError, match="device.*device_map"):
        load_ours(d, device="cpu", device_map="cpu")
    with pytest.raises(ws.UsageError, match="no model class 'NoSuchModel'"):
        load_ours(d, model_class="NoSuchModel")
    with pytest.raises(ws.UsageError, match="model_class"):
        load_ours(d, model_class=42)
    with pytest.raises(ws.UsageError, match="io"):
        wst.patch(io="floppy")
    with pytest.raises(ws.UsageError, match="device"):
        load_ours(d, device="tpu")


PEAK_SCRIPT = """
import gc, sys
import torch, transformers
import weightstream.transformers as wst
import transformers.models.llama.modeling_llama  # the model's code, imported before the baseline

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "None" else None)
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from here on
base = status("VmRSS")
model = wst.from_pretrained(path, dtype=dtype)
peak = status("VmHWM")
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(base, peak, params)
"""


@pytest.mark.parametrize("file_dtype,dtype", [(torch.float32, None), (torch.bfloat16, "f32")], ids=["f32", "bf16-to-f32"])
def test_peak_memory_on_the_cpu(tmp_path, file_dtype, dtype):
    """In a fresh process, resident memory (all of it: VmHWM) peaks at most at model + 64 MiB
    over the baseline after the imports, for a model of tens of MB: it is built on the meta
    device, and each tensor is loaded once, into the allocation that becomes the parameter
    (bf16 -> f32: the bf16 tensor lives only until transformers casts it)."""
    d = tmp_path / "model"
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(file_dtype).save_pretrained(d)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(d), str(dtype)], check=True, capture_output=True, text=True)
    base, peak, params = map(int, out.stdout.split()[-3:])
    file_bytes = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    over = peak - base
    print(f"file {file_bytes / MiB:.1f} MiB, model {params / MiB:.1f} MiB, peak RSS over baseline {over / MiB:.1f} MiB")
    assert params >= 60 * MiB and params >= file_bytes - MiB
    assert over <= params + 64 * MiB, f"peak {over / MiB:.1f} MiB over the baseline for a {params / MiB:.1f} MiB model"


# -- GPU: skipped in one line without one -----------------------------------------------------

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and ws.cuda_available()), reason="no CUDA device: GPU transformers tests skipped")


@gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_matches_transformers(saved, kind):
    d = saved(kind, torch.bfloat16, max_shard_size="100KB")
    ours = load_ours(d, device="cuda")
    theirs = load_theirs(AutoModelForCausalLM, d, device_map="cuda")
    assert all(p.device.type == "cuda" for p in ours.parameters())
    assert_same_model(ours, theirs)
    with wst.patch():
        patched = load_theirs(AutoModelForCausalLM, d, device_map="cuda", dtype=torch.float32)
    assert_same_model(patched, load_theirs(AutoModelForCausalLM, d, device_map="cuda", dtype=torch.float32))


@gpu
def test_cuda_load_makes_no_host_copy(tmp_path):
    """A ~760 MB model to the GPU: host anonymous memory grows by at most the staging rings of
    transformers' four loading threads (2 x 16 MiB each here) + 64 MiB, a fraction of the
    model: each tensor goes file -> staging ring -> its place on the GPU."""
    d = tmp_path / "model"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    model_bytes = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    bound = 4 * 2 * 16 * MiB + 64 * MiB
    assert model_bytes > 3 * bound
    script = textwrap.dedent(
        f"""
        import gc, threading, time, torch
        import weightstream.transformers as wst
        import transformers.models.llama.modeling_llama
        torch.zeros(1, device="cuda")  # the CUDA context, before the baseline
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        gc.collect()
        base, peak, stop = anon(), [0], threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.0005)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        model = wst.from_pretrained({str(d)!r}, device="cuda", staging_count=2)
        torch.cuda.synchronize()
        stop.set()
        t.join()
        assert all(p.device.type == "cuda" for p in model.parameters())
        print(base, max(peak[0], anon()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    base, peak = map(int, out[-2:])
    grew = peak - base
    print(f"model {model_bytes / MiB:.0f} MiB to cuda: host RssAnon +{grew / MiB:.0f} MiB")
    assert grew <= bound, f"host memory grew {grew / MiB:.0f} MiB for a {model_bytes / MiB:.0f} MiB model"
