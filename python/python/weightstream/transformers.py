"""Load Hugging Face ``transformers`` models through weightstream.

Two ways in, one mechanism:

* :func:`from_pretrained` -- one line: ``weightstream.transformers.from_pretrained(name, device="cuda")``.
* :func:`patch` -- a context manager under which transformers' own ``from_pretrained`` (and
  everything else in transformers that opens a ``.safetensors`` file) reads through weightstream.

Why transformers' own loading runs unchanged: transformers 5 renames and merges checkpoint keys
while it loads (weight conversions, fused MoE experts, legacy ``gamma``/``beta`` names, the
``base_model_prefix``), casts per parameter (``dtype``, ``_keep_in_fp32_modules``), ties
weights, fills non-persistent buffers and loads the ``generation_config``. Re-implementing any of
that would drift from it with every release. So :func:`from_pretrained` is transformers'
``from_pretrained`` run under :func:`patch`, and the patch replaces only where bytes come from:

1. the module-level ``safe_open`` name in every transformers module that imported it
   (``modeling_utils``, ``modeling_layers``, ``integrations.accelerate``, ``quantizers...``)
   becomes a weightstream handle: opening reads the header only, ``get_slice(k)`` is lazy;
2. ``core_model_loading._materialize_copy(tensor, device, dtype)`` -- where transformers turns a
   lazy slice into the tensor it will set on the model -- loads one of our slices straight onto
   ``device`` (a GPU: no host copy of the model) and then applies transformers' own
   ``.to(device=device, dtype=dtype)``, so casts are torch's, bit for bit.

Each tensor is one load (``Loader.load_into``) into a tensor that torch allocates on its final
device: the tensor that comes out *is* the parameter, an ordinary torch tensor (on a GPU from
torch's caching allocator, which transformers warms up with the model's size: memory from
anywhere else would double the model's footprint). Nothing is copied again or held beside it,
tensors the model does not use are never read, a cast frees the uncast tensor at once, and
transformers' order of requests (sorted by name, four threads) costs nothing. On the CPU the
model lives in memory that weightstream filled (transformers alone hands out views of an
``mmap`` of the file, which page in on first use: compare load plus a forward pass,
``scripts/bench_transformers.py``).

Not served (transformers' own path runs): ``.bin``, GGUF and distributed (DCP) checkpoints,
``disable_mmap=True`` (transformers then reads the file's bytes itself), ``framework``s other
than torch and devices other than the CPU and CUDA.

Example::

    >>> import weightstream.transformers as wst
    >>> model = wst.from_pretrained("Qwen/Qwen2.5-0.5B", device="cuda", dtype="bf16")   # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM
    >>> with wst.patch():                                                            # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B", device_map="cuda")
"""

import importlib
import sys
import threading

from . import _options as O
from ._errors import MissingTensorError, UsageError
from ._frameworks import _torch, to_torch
from ._loader import Loader
from ._open import _metadata as _open_metadata

__all__ = ["from_pretrained", "patch", "patched_sites"]

# Modules of transformers that bind `safe_open` at import (5.17 to 5.25); imported when a patch
# starts so that their names are patched even if nothing imported them yet. Any other loaded
# transformers module that bound safetensors' `safe_open` is found by a scan as well.
_KNOWN_SITES = (
    "transformers.modeling_utils",
    "transformers.modeling_layers",
    "transformers.integrations.accelerate",
    "transformers.quantizers.quantizer_torchao",
)

# Our short dtype spellings (as the rest of weightstream takes them) -> torch dtype names.
_DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f16": "float16", "fp16": "float16", "float16": "float16", "half": "float16",
    "f32": "float32", "fp32": "float32", "float32": "float32", "float": "float32",
}

def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("weightstream.transformers needs transformers: pip install 'weightstream[transformers]'") from None
    return transformers


# safetensors dtype names -> torch dtype names, for the dtypes weightstream fills in place
# (DLPack has them); the rest load through the loader's own export.
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def _torch_dtype(stored):
    name = _TORCH_DTYPES.get(stored)
    return None if name is None else getattr(_torch(), name, None)


def _target(device):
    """``"cpu"`` or ``"cuda:N"`` for a device transformers hands over (str, int,
    ``torch.device``), or None for any other kind (mps, xpu, meta...): those keep
    transformers' own path."""
    torch = _torch()
    if device is None:
        return None
    try:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError, ValueError):
        return None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return None


_cuda_state = []


def _cuda_ok():
    """Whether weightstream can load to CUDA here (once per process, with a warning if torch
    can and it cannot: such tensors then load to the host and torch copies them over)."""
    if not _cuda_state:
        from ._weightstream import cuda_available

        ok = bool(cuda_available())
        if not ok:
            import warnings

            warnings.warn(
                "weightstream cannot use CUDA here (built without it, or no driver it can load): "
                "tensors for the GPU load to the host first",
                RuntimeWarning,
                stacklevel=3,
            )
        _cuda_state.append(ok)
    return _cuda_state[0]


class _Slice:
    """``handle.get_slice(name)`` as safetensors has it: ``get_shape()``, ``get_dtype()`` and
    ``[...]``. The whole tensor loads on ``[...]`` (or an index of only ``:`` and ``...``); a
    narrower index reads only what it covers through :class:`weightstream.safe_open` (tensor
    parallel sharding asks for blocks of rows or columns)."""

    __slots__ = ("_handle", "_name", "_dtype", "_shape")

    def __init__(self, handle, name, dtype, shape):
        self._handle, self._name, self._dtype, self._shape = handle, name, dtype, list(shape)

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._dtype

    def __len__(self):
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __repr__(self):
        return f"<weightstream slice {self._name!r} {self._dtype} {self._shape} of {self._handle._path}>"

    def _whole(self, key):
        key = key if isinstance(key, tuple) else (key,)
        full = slice(None)
        ellipses = sum(k is Ellipsis for k in key)
        rest = [k for k in key if k is not Ellipsis]
        return ellipses <= 1 and len(rest) <= len(self._shape) and all(isinstance(k, slice) and k == full for k in rest)

    def _load(self, device=None):
        """The whole tensor, loaded straight onto ``device`` (default: the handle's)."""
        return self._handle._load(self._name, device or self._handle._device)

    def __getitem__(self, key):
        if self._whole(key):
            return self._load()
        return self._handle._partial().get_slice(self._name)[key]


class _Handle:
    """What the patched ``safe_open(filename, framework, device, backend)`` returns: the header
    read at once, each tensor loaded through weightstream when asked for."""

    def __init__(self, patcher, path, device):
        self._patcher = patcher
        self._path = path
        self._device = device
        loader = patcher._loader(device)
        self._infos = {name: (stored, shape) for name, _, stored, shape, _ in loader.describe(path)}
        self._open = True
        self._lazy_partial = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._open = False
        self._lazy_partial = None
        return False

    def _check(self):
        if not self._open:
            raise UsageError(f"{self._path}: the safe_open handle is closed")

    def keys(self):
        """Tensor names, sorted (as safetensors returns them)."""
        self._check()
        return sorted(self._infos)

    def offset_keys(self):
        """Tensor names in file order."""
        self._check()
        return list(self._infos)

    def metadata(self):
        """The ``__metadata__`` dict (``{}`` for an empty one), or None without one, as
        ``safetensors.safe_open`` returns it."""
        self._check()
        return _open_metadata(self._path, None)

    def _info(self, name, check=True):
        if check:
            self._check()
        info = self._infos.get(name)
        if info is None:
            raise MissingTensorError(f"{self._path}: no tensor named `{name}`")
        return info

    def get_slice(self, name):
        stored, shape = self._info(name)
        return _Slice(self, name, stored, shape)

    def get_tensor(self, name):
        self._info(name)
        return self._load(name, self._device)

    def _load(self, name, device):
        # A handle closed by transformers may still have slices in its state dict; loading from
        # them stays allowed (the file is read anew), as with safetensors' handles.
        torch = _torch()
        loader = self._patcher._loader(device)
        stored, shape = self._info(name, check=False)
        tdt = _torch_dtype(stored)
        if tdt is None:  # a dtype torch cannot hold as is: the loader's own export decides
            return to_torch(loader._raw.load(self._path, O.opts(exact=[name]))[0])
        # Allocated by torch (its caching allocator on a GPU, which transformers warms up with
        # the model's size), filled in place: the parameter is an ordinary torch tensor.
        out = torch.empty(shape, dtype=tdt, device=device)
        loader.load_into(self._path, {name: out})
        return out

    def _partial(self):
        """A :class:`weightstream.safe_open` of the same file, for reads of part of a tensor."""
        if self._lazy_partial is None:
            from ._open import safe_open as ws_safe_open

            self._lazy_partial = ws_safe_open(self._path, framework="pt", device=self._device)
        return self._lazy_partial


class _Patcher:
    """The state of one :func:`patch`: its loader options and one :class:`Loader` per device
    (whose staging ring is reused from tensor to tensor)."""

    def __init__(self, loader_options):
        self._options = loader_options
        self._loaders = {}
        self._lock = threading.Lock()

    def _loader(self, device):
        with self._lock:
            loader = self._loaders.get(device)
            if loader is None:
                loader = self._loaders[device] = Loader(device=device, **self._options)
            return loader


# -- the replacements, installed while at least one patch is active ------------------------------
#
# One set of replacement functions serves every active patch: `safe_open` asks which patch the
# calling thread entered (the innermost), else the latest entered anywhere (a thread started
# inside the block); `_materialize_copy` needs none, a slice knows its handle's patch. So
# patches nest, and blocks in different threads may exit in any order.

_state = threading.RLock()
_installed = []  # (module, attribute, original, replacement) while any patch is active
_active = []  # the active patches' _Patcher, in order of entry
_local = threading.local()


def _current():
    with _state:
        for patcher in reversed(getattr(_local, "stack", ())):
            if patcher in _active:  # (a patch this thread entered may have exited elsewhere)
                return patcher
        return _active[-1] if _active else None


def _make_safe_open(original):
    def safe_open(filename, framework, device="cpu", *, backend=None):
        """weightstream's handle in place of ``safetensors.safe_open`` (inside
        ``weightstream.transformers.patch()``): torch tensors on the CPU or a CUDA device.
        Other frameworks and devices go to safetensors' own ``safe_open``."""
        patcher = _current()
        target = _target(device)
        fw = framework.lower() if isinstance(framework, str) else framework
        if patcher is None or fw not in ("pt", "torch", "pytorch") or target is None:
            kwargs = {} if backend is None else {"backend": backend}
            return original(filename, framework=framework, device=device, **kwargs)
        return _Handle(patcher, O.path(filename), target)

    safe_open._weightstream_patch = True
    safe_open.__wrapped__ = original
    return safe_open


def _make_materialize(original):
    def _materialize_copy(tensor, device=None, dtype=None):
        # transformers' own body: `tensor[...]` then `.to(device=device, dtype=dtype)`; a slice
        # of ours loads straight onto `device` instead of through the host.
        if isinstance(tensor, _Slice):
            target = _target(device)
            if target is not None and target.startswith("cuda") and not _cuda_ok():
                target = None  # torch sees a GPU this build of weightstream cannot use
            out = tensor._load(target)
            if dtype is not None or device is not None:
                out = out.to(device=device, dtype=dtype)
            return out
        return original(tensor, device, dtype)

    _materialize_copy._weightstream_patch = True
    _materialize_copy.__wrapped__ = original
    return _materialize_copy


def _unpatched(fn):
    while getattr(fn, "_weightstream_patch", False):
        fn = fn.__wrapped__
    return fn


def _import_known_sites():
    _transformers()
    for name in _KNOWN_SITES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional module this version lacks or cannot import
            pass


def _sites(safetensors_safe_open):
    """``(module, "safe_open")`` for every loaded transformers module whose ``safe_open`` is
    safetensors' (or a patch of ours over it)."""
    out = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "transformers" or name.startswith("transformers.")):
            continue
        fn = mod.__dict__.get("safe_open") if hasattr(mod, "__dict__") else None
        if fn is not None and _unpatched(fn) is safetensors_safe_open:
            out.append((mod, "safe_open"))
    return out


def _install():
    """Replace the names not replaced yet (called at each entry: a module imported since the
    last one is patched too)."""
    import safetensors

    _import_known_sites()
    done = {(id(mod), attr) for mod, attr, _, _ in _installed}
    for mod, attr in _sites(safetensors.safe_open):
        current = getattr(mod, attr)
        if (id(mod), attr) not in done and not getattr(current, "_weightstream_patch", False):
            new = _make_safe_open(current)
            setattr(mod, attr, new)
            _installed.append((mod, attr, current, new))
    cml = importlib.import_module("transformers.core_model_loading")
    current = getattr(cml, "_materialize_copy", None)
    if current is not None and (id(cml), "_materialize_copy") not in done:
        new = _make_materialize(current)
        setattr(cml, "_materialize_copy", new)
        _installed.append((cml, "_materialize_copy", current, new))


def _uninstall():
    for mod, attr, original, new in reversed(_installed):
        if getattr(mod, attr, None) is new:  # not if someone replaced ours meanwhile
            setattr(mod, attr, original)
    _installed.clear()


def patched_sites():
    """The transformers modules whose ``safe_open`` a :func:`patch` replaces, by name (those
    loaded now that bound ``safetensors.safe_open``, after importing the known ones).

    Example::

        >>> import weightstream.transformers as wst
        >>> "transformers.modeling_utils" in wst.patched_sites()    # doctest: +SKIP
        True
    """
    import safetensors

    _import_known_sites()
    return sorted(mod.__name__ for mod, _ in _sites(safetensors.safe_open))


class patch:
    """Make transformers read ``.safetensors`` files through weightstream, for the duration of
    a ``with`` block: ``from_pretrained``, ``load_state_dict`` and everything else in
    transformers that opens a checkpoint with ``safe_open``. Every rule of transformers'
    loading applies unchanged (key renames, fused experts, dtypes, tied weights, device maps);
    only where the bytes come from changes, and each tensor goes straight to its device.

    Args:
        staging, staging_count, threads, io, direct: as :class:`weightstream.Loader` takes them.

    The names are restored when the last active patch exits, also on an exception. Patches
    nest (the innermost one entered by a thread serves it; a thread that entered none, the
    latest one entered) and blocks in different threads may exit in any order. While one is
    active, all of transformers in the process reads through weightstream.

    Example::

        >>> from transformers import AutoModelForCausalLM
        >>> import weightstream.transformers as wst
        >>> with wst.patch():                                                       # doctest: +SKIP
        ...     model = AutoModelForCausalLM.from_pretrained("org/model", device_map="cuda:0")
    """

    def __init__(self, *, staging=None, staging_count=None, threads=None, io=None, direct=False):
        options = {"staging": staging, "staging_count": staging_count, "threads": threads, "io": io, "direct": direct}
        Loader(device="cpu", **options)  # bad options fail here, not at the first tensor
        self._patcher = _Patcher(options)
        self._entered = False

    def __enter__(self):
        with _state:
            if self._entered:
                raise UsageError("this weightstream.transformers.patch() is already active: make a new one to nest")
            try:
                _install()
            except BaseException:
                if not _active:  # nothing of ours stays replaced when no patch could start
                    _uninstall()
                raise
            self._entered = True
            _active.append(self._patcher)
        if not hasattr(_local, "stack"):
            _local.stack = []
        # Patches this thread entered that exited on another thread: their patcher (and its
        # loaders' staging rings) goes with them, not with this thread.
        _local.stack[:] = [p for p in _local.stack if p in _active]
        _local.stack.append(self._patcher)
        return self

    def __exit__(self, *exc):
        stack = getattr(_local, "stack", [])
        if self._patcher in stack:
            stack.remove(self._patcher)
        with _state:
            if not self._entered:
                return False
            self._entered = False
            _active.remove(self._patcher)
            if not _active:
                _uninstall()
        return False


def _model_class(model_class):
    if model_class is None:
        return _transformers().AutoModelForCausalLM
    if isinstance(model_class, str):
        cls = getattr(_transformers(), model_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise UsageError(f"model_class: transformers has no model class {model_class!r}")
        return cls
    if not hasattr(model_class, "from_pretrained"):
        raise UsageError(f"model_class: expected an AutoModel* or model class, got {model_class!r}")
    return model_class


def _dtype(dtype):
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPE_NAMES:
        return getattr(_torch(), _DTYPE_NAMES[dtype.strip().lower()])
    return dtype  # a torch dtype, "auto", a dict per sub-config: transformers checks it


def from_pretrained(
    name_or_path,
    device=None,
    dtype=None,
    model_class=None,
    *,
    staging=None,
    staging_count=None,
    threads=None,
    io=None,
    direct=False,
    **hf_kwargs,
):
    """Load a transformers model with its weights streamed by weightstream: the model
    ``model_class.from_pretrained(name_or_path, ...)`` returns, with each tensor read from its
    file straight onto ``device``.

    It *is* transformers' ``from_pretrained`` (run under :func:`patch`): the model is built on
    the meta device, checkpoint keys are renamed and merged, dtypes cast, weights tied, buffers
    filled, ``generation_config`` loaded and ``eval()`` set exactly as transformers does; the
    parameters and buffers are bitwise those transformers loads.

    Args:
        name_or_path: a local directory or a Hugging Face repo id (resolved, downloaded and
            cached by transformers and ``huggingface_hub``: ``cache_dir``, ``revision``,
            ``local_files_only``, ``token`` go in ``hf_kwargs``).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"auto"`` (a GPU when there is
            one), an int N or a ``torch.device``; passed to transformers as ``device_map``
            (except for the CPU, transformers' default). For a multi-device ``device_map``
            pass it in ``hf_kwargs`` instead (not both).
        dtype: ``"bf16"``, ``"f16"``, ``"f32"``, a torch dtype, ``"auto"``, or None for
            transformers' default; transformers applies it (``_keep_in_fp32_modules``
            included).
        model_class: an ``AutoModel*`` class, a model class, or its name in transformers
            (default ``AutoModelForCausalLM``).
        staging, staging_count, threads, io, direct: as :class:`weightstream.Loader` takes them.
        **hf_kwargs: anything else transformers' ``from_pretrained`` takes (``revision``,
            ``attn_implementation``, ``config``, ...).

    As transformers' own, it is not for two threads at once: two concurrent calls of
    transformers' ``from_pretrained`` (5.19 to 5.25) leave its ``no_tie_weights`` patch on, and
    later models come out with untied, meta ``lm_head`` weights.

    Example::

        >>> import weightstream.transformers as wst
        >>> model = wst.from_pretrained("./my-llama", device="cuda:0", dtype="bf16")       # doctest: +SKIP
        >>> from transformers import AutoModel
        >>> encoder = wst.from_pretrained("org/bert", model_class=AutoModel)               # doctest: +SKIP
    """
    cls = _model_class(model_class)
    if device is not None and "device_map" in hf_kwargs:
        raise UsageError("from_pretrained: give `device` or `device_map`, not both")
    if device is not None:
        dev = O.device(device)
        if dev == "auto":
            dev = "cuda" if _torch().cuda.is_available() else "cpu"
        if dev != "cpu":
            hf_kwargs["device_map"] = dev
    if dtype is not None:
        hf_kwargs["dtype"] = _dtype(dtype)
    with patch(staging=staging, staging_count=staging_count, threads=threads, io=io, direct=direct):
        return cls.from_pretrained(name_or_path, **hf_kwargs)
