"""A drop-in for ``safetensors.torch``: ``import weightstream.torch as st`` where code has
``import safetensors.torch as st``.

``load_file``, ``load`` (bytes), ``safe_open`` and ``load_model`` take the arguments
safetensors 0.8's take and return what they return (same dtypes, shapes, key order, devices,
exception classes), reading through weightstream: ``load_file`` is one parallel load of the
file, not a view of a file mapping. As safetensors does, they read one ``.safetensors`` file;
``weightstream.load_file`` also loads an index, a directory or a URL. ``save_file``, ``save``
and ``save_model`` write through weightstream's format writer.

Example::

    >>> import weightstream.torch as st
    >>> tensors = st.load_file("model.safetensors", device="cpu")              # doctest: +SKIP
    >>> missing, unexpected = st.load_model(model, "model.safetensors")        # doctest: +SKIP

Differences from safetensors, each deliberate, are listed in ``python/tests/test_dropin.py``
(and asserted there).
"""

import os
from typing import Dict, List, Optional, Set, Tuple, Union

import torch  # the real torch: absolute import, this module is weightstream.torch

from . import _open, _save
from ._loader import load_bytes

__all__ = ["safe_open", "load_file", "load", "load_model", "save_file", "save", "save_model", "storage_ptr", "storage_size"]


class safe_open(_open.safe_open):
    """``safetensors.safe_open`` (as ``safetensors.torch`` re-exports it) reading one file:
    ``safe_open(filename, framework, device="cpu", *, backend="mmap")``. See
    :class:`weightstream.safe_open`.

    Example::

        >>> with safe_open("model.safetensors", framework="pt", device="cpu") as f:  # doctest: +SKIP
        ...     w = f.get_slice("lm_head.weight")[:128]
    """

    _single_file = True


def load_file(filename: Union[str, os.PathLike], device: Union[str, int] = "cpu", *, backend: str = "mmap") -> Dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file into ``{name: torch.Tensor}`` in file order, on ``device``
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``, an int N). ``backend`` (``"mmap"``/``"pread"``) is
    accepted as safetensors takes it; both read through weightstream into memory the tensors own.

    Example::

        >>> from weightstream.torch import load_file
        >>> loaded = load_file("./my_folder/bert.safetensors")    # doctest: +SKIP
    """
    return _open.load_file_as_safetensors(filename, "pt", device, backend, "weightstream.torch.load_file")


def load(data: bytes) -> Dict[str, torch.Tensor]:
    """Load the bytes of a ``.safetensors`` file into ``{name: torch.Tensor}`` on the CPU, in
    file order, through the same validated parser as a file (F4 and F8_E8M0 included, where
    ``safetensors.torch.load`` fails on them).

    Example::

        >>> from weightstream.torch import load
        >>> with open("model.safetensors", "rb") as f:             # doctest: +SKIP
        ...     loaded = load(f.read())
    """
    return load_bytes(data, "pt", "weightstream.torch.load")


def load_model(
    model: torch.nn.Module,
    filename: Union[str, os.PathLike],
    strict: bool = True,
    device: Union[str, int] = "cpu",
    *,
    backend: str = "mmap",
) -> Tuple[Set[str], List[str]]:
    """Load a file into ``model`` as ``safetensors.torch.load_model`` does: tensors the model
    shares (tied weights) are satisfied by the one name the file holds, as
    ``safetensors.torch.save_model`` writes them.

    Returns ``(missing, unexpected)``: ``missing`` (a set, as safetensors returns it) are the
    model's names the file did not fill, ``unexpected`` (a list) the file's names the model
    does not use. With ``strict``, any of either raises ``RuntimeError`` with torch's message.

    Example::

        >>> import torch, weightstream.torch as st
        >>> model = torch.nn.Linear(4, 4)
        >>> missing, unexpected = st.load_model(model, "linear.safetensors")   # doctest: +SKIP
    """
    # Which of the model's names share memory and which one of each group the file holds: the
    # writer's port of safetensors' rules, so that load_model and save_model agree with each
    # other and with files safetensors wrote.
    state_dict = load_file(filename, device=device, backend=backend)
    model_state_dict = model.state_dict()
    to_removes = _save.remove_duplicate_names(model_state_dict, preferred_names=state_dict.keys())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing)
    for to_remove_group in to_removes.values():
        for to_remove in to_remove_group:
            if to_remove not in missing:
                unexpected.append(to_remove)
            else:
                missing.remove(to_remove)
    if strict and (missing or unexpected):
        missing_keys = ", ".join([f'"{k}"' for k in sorted(missing)])
        unexpected_keys = ", ".join([f'"{k}"' for k in sorted(unexpected)])
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += f"\n    Missing key(s) in state_dict: {missing_keys}"
        if unexpected:
            error += f"\n    Unexpected key(s) in state_dict: {unexpected_keys}"
        raise RuntimeError(error)
    return missing, unexpected


def storage_ptr(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage (0 for a tensor without one), as safetensors.torch's."""
    return _save._storage_ptr(tensor)


def storage_size(tensor: torch.Tensor) -> int:
    """The bytes of ``tensor``'s storage, as safetensors.torch's."""
    return _save._storage_size(tensor)


def save_file(tensors: Dict[str, torch.Tensor], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` to ``filename`` in the safetensors format, as
    ``safetensors.torch.save_file`` does.

    Example::

        >>> save_file({"w": torch.zeros(2, 2)}, "model.safetensors")   # doctest: +SKIP
    """
    return _save.save_file_torch(tensors, filename, metadata=metadata)


def save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a safetensors file of ``tensors``, as ``safetensors.torch.save`` returns.

    Example::

        >>> data = save({"w": torch.zeros(2, 2)})   # doctest: +SKIP
    """
    return _save.save_torch(tensors, metadata=metadata)


def save_model(model: torch.nn.Module, filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None, force_contiguous: bool = True) -> None:
    """Write ``model``'s state dict, shared tensors once, as ``safetensors.torch.save_model``.

    Example::

        >>> save_model(torch.nn.Linear(4, 4), "linear.safetensors")   # doctest: +SKIP
    """
    return _save.save_model(model, filename, metadata=metadata, force_contiguous=force_contiguous)
