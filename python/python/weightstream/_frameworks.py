"""From the Rust layer's tensors to numpy arrays and torch tensors, through DLPack, without a
copy; and the other way for ``load_into`` destinations. bf16 and fp8 leave as unsigned integers
of their width and are viewed as the ``ml_dtypes`` (numpy) or torch dtype: still no copy.

Dtypes map as safetensors maps them: F8_E8M0 -> ``torch.float8_e8m0fnu``, F4 ->
``torch.float4_e2m1fn_x2`` (last dimension halved), bf16/fp8 in numpy -> ``ml_dtypes`` (where
safetensors.numpy fails on fp8). F4/F6 in numpy and F6 in torch have no dtype: a
:class:`UsageError` names the tensor."""

from ._errors import InternalError, UsageError

# Dtypes numpy's DLPack import lacks: exported as unsigned ints, viewed as ml_dtypes (the names
# safetensors uses).
_ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
# fp8 in torch: exported as uint8 and viewed (bf16 goes as DLPack's bfloat16).
_TORCH_FP8 = {k: v for k, v in _ML_DTYPES.items() if k != "BF16"}
# Dtypes that pack elements below a byte. DLPack has no such dtype: the Rust layer exports them
# (``raw()``) as a 1-D uint8 array of the tensor's bytes, which is viewed here.
_PACKED = ("F4", "F6_E2M3", "F6_E3M2")


def _np():
    try:
        import numpy
    except ImportError:
        raise ImportError("framework='np' needs numpy: pip install numpy ml_dtypes") from None
    return numpy


def _ml_dtypes():
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bf16 and fp8 tensors with framework='np' need ml_dtypes: pip install ml_dtypes") from None
    return ml_dtypes


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("framework='pt' needs torch: pip install torch (or use framework='np')") from None
    return torch


def f4_storage_shape(name, shape):
    """The shape torch gives an F4 tensor of (logical, element-count) ``shape``: the last
    dimension halved, two fp4 values a ``float4_e2m1fn_x2`` byte (safetensors' convention)."""
    shape = list(shape)
    if not shape or shape[-1] % 2:
        raise UsageError(
            f"tensor `{name}` is F4 of shape {shape}: torch's float4_e2m1fn_x2 packs two values a byte "
            "along the last dimension, which must be even (safetensors refuses it too)"
        )
    return shape[:-1] + [shape[-1] // 2]


def torch_packed_dtype(name, dtype, shape):
    """``(torch dtype, storage shape)`` of a packed tensor, or :class:`UsageError`: F4 ->
    ``torch.float4_e2m1fn_x2`` with the last dimension halved (safetensors' mapping); F6 has no
    torch dtype (safetensors fails on it too)."""
    torch = _torch()
    if dtype != "F4":
        raise UsageError(f"tensor `{name}` is {dtype}: torch has no dtype for it (safetensors has none either)")
    tdt = getattr(torch, "float4_e2m1fn_x2", None)
    if tdt is None:
        raise UsageError(f"tensor `{name}` is F4: this torch has no torch.float4_e2m1fn_x2 (torch >= 2.8 has it)")
    return tdt, f4_storage_shape(name, shape)


def _packed_numpy(t):
    raise UsageError(
        f"tensor `{t.name}` is {t.dtype}, which packs elements below a byte: no numpy dtype holds it "
        "(safetensors.numpy fails on it too); load it with framework='pt' (F4 as torch.float4_e2m1fn_x2) "
        "or with Loader.load_into into a uint8 buffer of its size"
    )


def to_numpy(t):
    """A numpy array over ``t``'s memory (CPU only); it keeps the memory alive."""
    np = _np()
    if t.dtype in _PACKED:
        _packed_numpy(t)
    view = _ML_DTYPES.get(t.dtype)
    if view is None:
        return np.from_dlpack(t)
    return np.from_dlpack(t.raw()).view(getattr(_ml_dtypes(), view))


def to_torch(t):
    """A torch tensor over ``t``'s memory (CPU or CUDA); it keeps the memory alive."""
    torch = _torch()
    if t.dtype in _PACKED:
        tdt, shape = torch_packed_dtype(t.name, t.dtype, t.shape)
        data = torch.from_dlpack(t.raw())  # its bytes: a 1-D uint8 of nbytes
        if data.dtype != torch.uint8 or data.numel() != t.nbytes:  # the export's contract
            raise InternalError(f"tensor `{t.name}`: packed export gave {data.dtype} {tuple(data.shape)}")
        return data.reshape(shape).view(tdt)
    view = _TORCH_FP8.get(t.dtype)
    if view is None:
        return torch.from_dlpack(t)
    tdt = getattr(torch, view, None)
    if tdt is None:
        raise UsageError(f"tensor `{t.name}` is {t.dtype}: this torch has no torch.{view}")
    return torch.from_dlpack(t.raw()).view(tdt)


def converter(framework):
    """The conversion for ``framework``, its module imported now (before any load)."""
    if framework == "np":
        _np()
        return to_numpy
    _torch()
    return to_torch


def destination(obj, name):
    """What ``load_into`` hands the Rust layer for ``obj``: an object with ``__dlpack__`` whose
    dtype DLPack knows (numpy arrays of ml_dtypes types and torch fp8 tensors viewed as unsigned
    ints of their width; the Rust layer accepts those for bf16/fp8 tensors)."""
    mod = type(obj).__module__
    if mod == "numpy":
        np = _np()
        if obj.dtype.kind == "V" or obj.dtype.type.__module__.startswith("ml_dtypes"):
            width = {1: np.uint8, 2: np.uint16}.get(obj.dtype.itemsize)
            if width is None:
                raise UsageError(f"tensor `{name}`: destination dtype {obj.dtype} is not a safetensors dtype")
            return obj.view(width)
        return obj
    if mod.startswith("torch"):
        torch = _torch()
        if obj.requires_grad:
            obj = obj.detach()
        if obj.dtype.itemsize == 1 and obj.dtype.is_floating_point:
            return obj.view(torch.uint8)
        return obj
    if hasattr(obj, "__dlpack__"):
        return obj
    raise UsageError(
        f"tensor `{name}`: a load_into destination must be a numpy array, a torch tensor or any object "
        f"with __dlpack__, got {type(obj).__name__}"
    )
