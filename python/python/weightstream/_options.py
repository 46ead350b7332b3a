"""Argument checking: sizes, devices, dtypes, frameworks, filters and shards, each turned into
what the Rust layer takes, or a :class:`UsageError` saying what is allowed."""

import math
import numbers
import os
import re

from ._errors import DeviceError, UsageError

FRAMEWORKS = ("pt", "np")
# The names safetensors accepts for the frameworks weightstream loads to (case-sensitive, as
# safetensors' are), and those it accepts for frameworks weightstream does not load to.
_FRAMEWORK_ALIASES = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np"}
_OTHER_FRAMEWORKS = ("tf", "tensorflow", "jax", "flax", "mlx", "paddle")
# Devices torch (and safetensors) know that weightstream does not load to.
_OTHER_DEVICES = ("mps", "npu", "xpu", "xla", "mlu", "musa", "hpu")
BACKENDS = ("mmap", "pread")

# Target dtypes a load can convert to (F16/BF16/F32/F64 sources), by every common spelling.
_DTYPES = {
    "bf16": "BF16", "bfloat16": "BF16",
    "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
    "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
}

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")


def size(value, what):
    """``1073741824``, ``"1GiB"``, ``"512M"``, ``"64KB"`` (units are binary) -> bytes (> 0)."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a size such as 1073741824, '1GiB' or '512M', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise UsageError(f"{what}: expected a size such as 1073741824, '1GiB' or '512M', got {value!r}")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise UsageError(f"{what}: expected an int or a string such as '1GiB', got {type(value).__name__}")
    if n <= 0:
        raise UsageError(f"{what}: must be more than 0 bytes, got {value!r}")
    return n


def seconds(value, what, allow_none=True):
    """A finite number of seconds > 0, as a float (or None).

        >>> seconds(20, "timeout"), seconds(None, "timeout")
        (20.0, None)
        >>> seconds("20", "timeout")
        Traceback (most recent call last):
        ...
        weightstream._errors.UsageError: timeout: expected seconds > 0, got '20'
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise UsageError(f"{what}: expected seconds > 0, got {value!r}")
    return float(value)


def count(value, what, allow_none=True):
    """A positive int (or None)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{what}: expected a positive int, got {value!r}")
    return value


def device(value):
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``, an int N >= 0 (``cuda:N``, as torch
    reads an int) or a ``torch.device`` (anything whose ``str()`` is one of those). Names are
    case-sensitive, as torch's and safetensors' are. A device torch knows but weightstream does
    not load to (``"mps"``, ``"xpu"``, ...) raises :class:`DeviceError` (a ``RuntimeError``, as
    torch raises for a device it cannot use); anything else :class:`UsageError`."""
    if isinstance(value, bool):
        raise UsageError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"device: expected 'cpu', 'cuda', 'cuda:N', 'auto' or an int >= 0, got {value!r}")
        return f"cuda:{value}"
    text = str(value)
    if text in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", text):
        return text
    if re.fullmatch(r"[a-z]+(:\d+)?", text) and text.split(":")[0] in _OTHER_DEVICES:
        raise DeviceError(f"device {text!r}: weightstream loads to 'cpu' and 'cuda' devices only")
    raise UsageError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}")


def framework(value):
    """``"pt"`` (also ``"torch"``, ``"pytorch"``) or ``"np"`` (also ``"numpy"``), the names
    safetensors accepts; a non-str raises ``TypeError`` as safetensors does."""
    if not isinstance(value, str):
        raise TypeError(f"framework: expected a str such as 'pt' or 'np', got {type(value).__name__}")
    fw = _FRAMEWORK_ALIASES.get(value)
    if fw is not None:
        return fw
    if value in _OTHER_FRAMEWORKS:
        raise UsageError(f"framework {value!r}: weightstream loads to 'pt' (torch) or 'np' (numpy) only")
    raise UsageError(f"framework: expected 'pt' (torch) or 'np' (numpy), got {value!r}")


def backend(value):
    """safetensors' ``backend=``: ``"mmap"`` or ``"pread"`` (a non-str raises ``TypeError``).
    Both read through weightstream's engine into memory the tensors own (see ``safe_open``)."""
    if not isinstance(value, str):
        raise TypeError(f"backend: expected a str, 'mmap' or 'pread', got {type(value).__name__}")
    if value not in BACKENDS:
        raise UsageError(f"backend {value!r} is invalid (expected one of: 'mmap', 'pread')")
    return value


def dtype(value):
    """None, or a target dtype: ``"bf16"``, ``"f16"``, ``"f32"`` (also ``"bfloat16"``,
    ``torch.float16``, ``numpy.float32``, ``ml_dtypes.bfloat16``...)."""
    if value is None:
        return None
    name = getattr(value, "__name__", None) if isinstance(value, type) else None
    text = (name or str(value)).strip().lower()
    for prefix in ("torch.", "numpy.", "np.", "<class '"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.rstrip("'>").split(".")[-1]
    out = _DTYPES.get(text)
    if out is None:
        raise UsageError(f"dtype: expected one of 'bf16', 'f16', 'f32' (or torch/numpy dtypes of those), got {value!r}")
    return out


def only(value):
    """None, a glob or a list of globs -> list of globs."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        globs = list(value)
    except TypeError:
        raise UsageError(f"only: expected a glob or a list of globs, got {value!r}") from None
    if not all(isinstance(g, str) for g in globs):
        raise UsageError(f"only: expected a glob or a list of globs, got {value!r}")
    return globs


def shard(value):
    """None or ``(rank, world)`` with ``0 <= rank < world``."""
    if value is None:
        return None
    try:
        rank, world = value
    except (TypeError, ValueError):
        raise UsageError(f"shard: expected (rank, world), got {value!r}") from None
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (rank, world))
    if not ok or world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard: expected (rank, world) with 0 <= rank < world, got {value!r}")
    return (rank, world)


def split(value, shard_value):
    """None, ``{"GLOB": dim}`` or ``[("GLOB", dim), ...]`` (first match wins) -> list of pairs."""
    if value is None:
        return []
    pairs = list(value.items()) if isinstance(value, dict) else value
    try:
        out = [(g, d) for g, d in pairs]
    except (TypeError, ValueError):
        raise UsageError(f"split: expected {{'GLOB': dim, ...}}, got {value!r}") from None
    for g, d in out:
        if not isinstance(g, str) or isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise UsageError(f"split: expected {{'GLOB': dim, ...}} with dims >= 0, got {value!r}")
    if out and shard_value is None:
        raise UsageError("split needs shard=(rank, world)")
    return out


def opts(dtype_=None, only_=None, shard_=None, split_=None, exact=(), slice_=None):
    """The options dict the Rust layer takes (every key present)."""
    sh = shard(shard_)
    return {
        "dtype": dtype(dtype_),
        "only": only(only_),
        "exact": list(exact),
        "shard": sh,
        "split": split(split_, sh),
        "slice": slice_,
    }


def path(value):
    """A ``str``, ``bytes`` or ``os.PathLike`` path, as a ``str``; anything else raises
    ``TypeError``, as safetensors and ``open()`` raise."""
    try:
        return os.fsdecode(os.fspath(value))
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(value).__name__}") from None


def storage_options(value):
    """``None``, or a mapping of ``object_store`` option names to values (str, int or bool), as
    the ``[(key, value)]`` list the Rust layer takes."""
    if value is None:
        return None
    if not hasattr(value, "items"):
        raise UsageError(f"storage_options: expected a dict, got {type(value).__name__}")
    out = []
    for k, v in value.items():
        if not isinstance(k, str):
            raise UsageError(f"storage_options: keys are str, got {type(k).__name__}")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (int, float, str)):
            v = str(v)
        else:
            raise UsageError(f"storage_options[{k!r}]: expected a str, int or bool, got {type(v).__name__}")
        out.append((k, v))
    return out
