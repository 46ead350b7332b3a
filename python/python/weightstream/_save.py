"""Writing safetensors files: the ``save``/``save_file`` of ``weightstream.numpy`` and
``weightstream.torch`` and torch's ``save_model``, with the behaviour of safetensors 0.8.

The bytes are written by the Rust crate's format writer (``_weightstream.save_bytes`` /
``save_file``); this module only does what safetensors does in Python before its own writer
runs: it checks the arguments, finds tensors that share memory, moves tensors to the CPU, and
hands each tensor's bytes over without a copy (DLPack of a ``uint8`` view). Tensors are laid out
as safetensors lays them out (by dtype, widest first, then by name), so for the same input the
file is byte for byte the one safetensors writes, but for the order of two or more metadata
keys (safetensors takes them from a hash map; ours are sorted).

Where safetensors writes something wrong or fails by accident, this module does better, on
purpose:

- a numpy array that is not C-contiguous (a transpose, a strided slice) is written with its
  values; safetensors writes the raw memory under it (wrong values, or bytes past its end);
- a torch tensor with the conjugate or negative bit set is written with its values, not the
  bits under the view;
- no tensors and ``metadata={}`` give a valid file (safetensors writes ``{},"__metadata__":{}}``,
  which no reader opens), and a tensor named ``__metadata__`` is refused (safetensors writes a
  file that its reader rejects);
- a dtype with no safetensors dtype, a meta/nested tensor, or a value that is not an array
  raises a typed error naming the tensor where safetensors lets a ``KeyError``,
  ``AttributeError`` or torch's own error escape. Each class still subclasses what safetensors
  raised, so ``except`` clauses written for safetensors keep catching it;
- ``save_model`` does not add its dropped names to the caller's ``metadata`` dict (safetensors
  mutates it); the file's metadata is the same;
- the new file gets the permissions a plain ``open(path, "w")`` gives (safetensors 0.8 leaves
  its temporary file's ``0o600``); like safetensors, the file is written under a temporary name
  beside ``path`` and renamed over it, so a file being read through a memory map is never
  truncated under its reader;
- a numpy scalar (``np.float32(1)``) is saved as a 0-d array (safetensors raises
  ``AttributeError``), and a ``bytes`` file name is accepted.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Mapping

from . import _weightstream
from ._errors import UsageError

# ------------------------------------------------------------------------------------------
# Errors. Each is a UsageError (a ValueError and, where safetensors is installed, a
# safetensors.SafetensorError) and also the class safetensors raises for the same input.


class SaveArgumentError(UsageError, TypeError, AttributeError):
    """An argument of ``save``/``save_file`` has the wrong type: the tensors are not a dict, a
    value is not a tensor/array, a name or a metadata key or value is not a ``str``. Also a
    ``TypeError``, and an ``AttributeError`` as safetensors' numpy side raises."""


class UnsupportedDtypeError(UsageError, KeyError):
    """The tensor's dtype has no safetensors dtype (``complex128``, ``int4``, quantized...).
    Also a ``KeyError``, as safetensors' torch side raises (its size table misses the dtype)."""

    def __str__(self):  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class UnsupportedTensorError(UsageError, NotImplementedError):
    """A tensor that has no plain strided data to write: sparse, nested, or on the meta device.
    A ``ValueError`` (safetensors, for sparse) and a ``NotImplementedError``/``RuntimeError``
    (torch's own error, which safetensors lets through for meta and nested tensors)."""


class SharedTensorsError(UsageError, RuntimeError):
    """Tensors share memory (``save_model`` drops the duplicates instead), or ``save_model``
    found no tensor covering a shared storage. A ``RuntimeError``, as safetensors raises."""


# safetensors' dtype names: `str(torch dtype)` / numpy `dtype.name` -> header dtype. The same
# table as safetensors' `parse_dtype_str`, so the same dtypes are accepted.
_DTYPES = {
    "bool": "BOOL",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    "float4_e2m1fn_x2": "F4",
    "complex64": "C64",
}


def _header_dtype(name: str, key) -> str:
    try:
        return _DTYPES[name]
    except KeyError:
        hint = ""
        if name == "float4_e2m1fn":
            # ml_dtypes keeps one 4-bit value a byte; the format packs two.
            hint = " (the format packs two per byte: save torch.float4_e2m1fn_x2)"
        raise UnsupportedDtypeError(
            f"tensor `{key}`: dtype {name} has no safetensors dtype{hint}; supported: {', '.join(_DTYPES)}"
        ) from None


def _check_metadata(metadata) -> dict | None:
    """The metadata as a str -> str dict (safetensors raises TypeError otherwise)."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise SaveArgumentError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SaveArgumentError(
                f"metadata must map str to str, got {type(k).__name__} {k!r} -> {type(v).__name__} {v!r}"
            )
    return dict(metadata)


def _check_names(items) -> None:
    for name, *_ in items:
        if not isinstance(name, str):
            raise SaveArgumentError(f"tensor names must be str, got {type(name).__name__} {name!r}")


def _filename(filename) -> str:
    # str, bytes or os.PathLike, as open() takes (safetensors refuses bytes).
    return os.fsdecode(os.fspath(filename))


# ------------------------------------------------------------------------------------------
# numpy


def _numpy_version(np):
    """numpy's (major, minor)."""
    major, minor = np.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _np_items(tensor_dict) -> list:
    import numpy as np

    if not isinstance(tensor_dict, Mapping):
        raise SaveArgumentError(f"expected a dict of str to numpy.ndarray, got {type(tensor_dict).__name__}")
    items = []
    for k, v in tensor_dict.items():
        if isinstance(v, np.generic):
            v = np.asarray(v)  # a numpy scalar: a 0-d array
        if not isinstance(v, np.ndarray):
            raise SaveArgumentError(f"tensor `{k}`: expected a numpy.ndarray, got {type(v).__name__}")
        dtype = _header_dtype(v.dtype.name, k)
        arr = np.asarray(v)  # an ndarray subclass's own data (safetensors writes it too)
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
            # The format is little-endian: swap a copy, never the caller's array.
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        # The values in C order (safetensors writes the raw memory of a non-contiguous array).
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        if not arr.flags.writeable and _numpy_version(np) < (2, 1):
            # numpy before 2.1 has no DLPack 1.0, and its legacy export refuses read-only
            # arrays: hand their bytes over instead (a copy, as safetensors makes one too).
            items.append((k, dtype, list(arr.shape), arr.tobytes()))
            continue
        items.append((k, dtype, list(arr.shape), arr.reshape(-1).view(np.uint8)))
    _check_names(items)
    return items


def save(tensor_dict, metadata=None) -> bytes:
    """The bytes of a safetensors file holding ``tensor_dict`` (str -> ``numpy.ndarray``), as
    ``safetensors.numpy.save`` writes them.

    ``metadata`` (str -> str) goes under ``__metadata__``; ``None`` writes none. Arrays are
    written little-endian and in C order whatever their layout; bfloat16 and the fp8 dtypes of
    ``ml_dtypes`` are accepted.

    Example::

        >>> import numpy as np
        >>> from weightstream.numpy import save, load
        >>> data = save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, metadata={"format": "np"})
        >>> load(data)["w"].tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    items = _np_items(tensor_dict)
    return _weightstream.save_bytes(items, _check_metadata(metadata))


def save_file(tensor_dict, filename, metadata=None) -> None:
    """Write ``tensor_dict`` (str -> ``numpy.ndarray``) to ``filename`` as
    ``safetensors.numpy.save_file`` does: the same bytes as :func:`save`, written to a temporary
    file beside ``filename`` and renamed over it, without holding the GIL.

    Example::

        >>> import numpy as np
        >>> from weightstream.numpy import save_file, load_file
        >>> save_file({"w": np.ones(3, dtype=np.float16)}, "w.safetensors")   # doctest: +SKIP
        >>> load_file("w.safetensors")["w"]                                   # doctest: +SKIP
        array([1., 1., 1.], dtype=float16)
    """
    items = _np_items(tensor_dict)
    path = _filename(filename)
    _weightstream.save_file(items, path, _check_metadata(metadata))


# ------------------------------------------------------------------------------------------
# torch: safetensors' checks for shared, sparse and non-contiguous tensors, ported as they are
# (the choice of which shared name save_model keeps decides the file's bytes).


def _storage_ptr(tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:
        return 0  # no storage (meta, nested...): never shared


def _storage_size(tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except Exception:
        return tensor.nelement() * tensor.element_size()


def _end_ptr(tensor) -> int:
    if tensor.nelement():
        return tensor.view(-1)[-1].data_ptr() + tensor.element_size()
    return tensor.data_ptr()


def _filter_shared_not_shared(groups, state_dict):
    """Split each group of tensors on one storage into the runs that really overlap."""
    out = []
    for shared in groups:
        if len(shared) < 2:
            out.append(shared)
            continue
        areas = sorted((state_dict[name].data_ptr(), _end_ptr(state_dict[name]), name) for name in shared)
        _, last_stop, last_name = areas[0]
        out.append({last_name})
        for start, stop, name in areas[1:]:
            if start >= last_stop:
                out.append({name})
            else:
                out[-1].add(name)
            last_stop = stop
    return out


def find_shared_tensors(state_dict) -> list:
    """Groups of names whose tensors overlap in memory, as safetensors'
    ``_find_shared_tensors`` finds them (a group of one is a tensor that shares nothing).

    Example::

        >>> import torch
        >>> from weightstream._save import find_shared_tensors
        >>> w = torch.zeros(4)
        >>> sorted(map(sorted, find_shared_tensors({"a": w, "b": w, "c": torch.ones(2)})))
        [['a', 'b'], ['c']]
    """
    import torch

    groups = defaultdict(set)
    for k, v in state_dict.items():
        if v.device != torch.device("meta") and _storage_ptr(v) != 0 and _storage_size(v) != 0:
            # The device is part of the key: two GPUs may use the same addresses.
            groups[(v.device, _storage_ptr(v), _storage_size(v))].add(k)
    return _filter_shared_not_shared(list(sorted(groups.values())), state_dict)


def _is_complete(tensor) -> bool:
    return tensor.data_ptr() == _storage_ptr(tensor) and tensor.nelement() * tensor.element_size() == _storage_size(
        tensor
    )


def remove_duplicate_names(state_dict, *, preferred_names=None, discard_names=None) -> dict:
    """For each group of shared tensors, the name kept -> the names to drop, chosen as
    safetensors' ``_remove_duplicate_names`` chooses (``load_model`` needs the same choice).

    Example::

        >>> import torch
        >>> from weightstream._save import remove_duplicate_names
        >>> w = torch.zeros(4)
        >>> dict(remove_duplicate_names({"b": w, "a": w}))
        {'a': ['b']}
    """
    preferred_names = set(preferred_names or [])
    discard_names = set(discard_names or [])
    to_remove = defaultdict(list)
    for shared in find_shared_tensors(state_dict):
        complete = {name for name in shared if _is_complete(state_dict[name])}
        if not complete:
            raise SharedTensorsError(
                f"tensors {sorted(shared)} share memory and none covers the whole storage: saving one "
                "would store more than it holds. See https://huggingface.co/docs/safetensors/torch_shared_tensors"
            )
        keep = sorted(complete)[0]
        preferred = complete.difference(discard_names)
        if preferred:
            keep = sorted(preferred)[0]
        if preferred_names:
            preferred = preferred_names.intersection(complete)
            if preferred:
                keep = sorted(preferred)[0]
        for name in sorted(shared):
            if name != keep:
                to_remove[keep].append(name)
    return to_remove


def _torch_items(tensors) -> list:
    import torch

    if not isinstance(tensors, dict):
        raise SaveArgumentError(f"expected a dict of str to torch.Tensor, got {type(tensors).__name__}")
    sparse = []
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise SaveArgumentError(f"tensor `{k}`: expected a torch.Tensor, got {type(v).__name__}")
        if v.is_nested:
            # Before the sharing check, which would ask a nested tensor for its storage.
            raise UnsupportedTensorError(f"tensor `{k}` is a nested tensor: save its components")
        if v.layout != torch.strided:
            sparse.append(k)
    if sparse:
        raise UnsupportedTensorError(
            f"tensors {sparse} are sparse, which safetensors files cannot hold: save `.to_dense()` "
            "(which may be much larger)"
        )
    failing = [names for names in find_shared_tensors(tensors) if len(names) > 1]
    if failing:
        raise SharedTensorsError(
            f"tensors share memory, which would store it twice and load it as separate tensors: {failing}. "
            "save_model(model, filename) drops the duplicates; see "
            "https://huggingface.co/docs/safetensors/torch_shared_tensors"
        )
    items = []
    for k, v in tensors.items():
        if not v.is_contiguous():
            raise UsageError(
                f"tensor `{k}` is not contiguous. Either it is a view of another tensor (save the full "
                "tensor and slice it when loading) or call `.contiguous()` on it before saving."
            )
        if v.device.type == "meta":
            raise UnsupportedTensorError(f"tensor `{k}` is on the meta device: it has no data to save")
        name = str(v.dtype).split(".")[-1]
        dtype = _header_dtype(name, k)
        shape = list(v.shape)
        if dtype == "F4" and shape:
            # float4_e2m1fn_x2 packs two values a byte; the header counts values.
            shape[-1] *= 2
        t = v.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # as safetensors does: the writer reads host memory
        # The values, not the bits under a conjugate or negative view.
        t = t.resolve_conj().resolve_neg()
        # No bytes to hand over for an empty tensor (and torch refuses some views of one).
        data = t.reshape(-1).view(torch.uint8) if t.numel() else b""
        items.append((k, dtype, shape, data))
    _check_names(items)
    return items


def save_torch(tensors, metadata=None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (str -> ``torch.Tensor``), as
    ``safetensors.torch.save`` writes them.

    Tensors must be dense and contiguous and must not share memory (see :func:`save_model`);
    tensors on a GPU are copied to the CPU. ``metadata`` (str -> str) goes under
    ``__metadata__``.

    Example::

        >>> import torch
        >>> from weightstream.torch import save, load
        >>> data = save({"w": torch.arange(4, dtype=torch.bfloat16)})
        >>> load(data)["w"].tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    items = _torch_items(tensors)
    return _weightstream.save_bytes(items, _check_metadata(metadata))


def save_file_torch(tensors, filename, metadata=None) -> None:
    """Write ``tensors`` (str -> ``torch.Tensor``) to ``filename`` as
    ``safetensors.torch.save_file`` does: the bytes of :func:`save_torch`, written to a
    temporary file beside ``filename`` and renamed over it, without holding the GIL.

    Example::

        >>> import torch
        >>> from weightstream.torch import save_file, load_file
        >>> save_file({"w": torch.ones(2, 2)}, "w.safetensors", metadata={"format": "pt"})  # doctest: +SKIP
        >>> load_file("w.safetensors")["w"].shape                                           # doctest: +SKIP
        torch.Size([2, 2])
    """
    items = _torch_items(tensors)
    path = _filename(filename)
    _weightstream.save_file(items, path, _check_metadata(metadata))


def save_model(model, filename, metadata=None, force_contiguous=True) -> None:
    """Save ``model.state_dict()`` to ``filename`` as ``safetensors.torch.save_model`` does:
    of tensors that share memory (tied weights) one name is kept, each dropped name is recorded
    in the metadata as ``dropped -> kept`` (unless ``metadata`` already has that key), and with
    ``force_contiguous`` every tensor is made contiguous first.

    ``metadata`` itself is left as given (safetensors adds the dropped names to it).

    Example::

        >>> import torch
        >>> from weightstream.torch import save_model, load_model
        >>> model = torch.nn.Linear(2, 2)
        >>> save_model(model, "linear.safetensors")                  # doctest: +SKIP
        >>> load_model(torch.nn.Linear(2, 2), "linear.safetensors")  # doctest: +SKIP
        (set(), [])
    """
    state_dict = model.state_dict()
    to_removes = remove_duplicate_names(state_dict)
    metadata = None if metadata is None else dict(metadata)
    for kept_name, to_remove_group in to_removes.items():
        for to_remove in to_remove_group:
            if metadata is None:
                metadata = {}
            if to_remove not in metadata:
                metadata[to_remove] = kept_name  # the user's own entries win
            del state_dict[to_remove]
    if force_contiguous:
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    try:
        save_file_torch(state_dict, filename, metadata=metadata)
    except ValueError as e:
        # safetensors adds this hint to every ValueError of its save_file; the class is kept.
        hint = " Or use save_model(..., force_contiguous=True), read the docs for potential caveats."
        cls = type(e) if isinstance(e, UsageError) else ValueError
        raise cls(f"{e}{hint}") from e


__all__ = [
    "save",
    "save_file",
    "save_torch",
    "save_file_torch",
    "save_model",
    "find_shared_tensors",
    "remove_duplicate_names",
    "SaveArgumentError",
    "UnsupportedDtypeError",
    "UnsupportedTensorError",
    "SharedTensorsError",
]
