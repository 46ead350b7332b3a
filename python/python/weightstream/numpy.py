"""A drop-in for ``safetensors.numpy``: ``import weightstream.numpy as st`` where code has
``import safetensors.numpy as st``.

``load_file``, ``load`` (bytes) and ``safe_open`` take the arguments safetensors 0.8's take and
return what they return (same dtypes, shapes, key order, exception classes), reading through
weightstream. Where ``safetensors.numpy`` fails, these load: bf16 and every fp8 (F8_E8M0
included) come back as ``ml_dtypes`` arrays, from files and from bytes alike. F4 and F6 have no
numpy dtype and raise :class:`weightstream.UsageError` naming the tensor. As safetensors does,
they read one ``.safetensors`` file; ``weightstream.load_file`` also loads an index, a directory
or a URL. ``save_file`` and ``save`` write through weightstream's format writer.

Example::

    >>> import weightstream.numpy as st
    >>> arrays = st.load_file("model.safetensors")                     # doctest: +SKIP

Differences from safetensors, each deliberate, are listed in ``python/tests/test_dropin.py``
(and asserted there).
"""

import os
from typing import Dict, Optional, Union

import numpy as np  # the real numpy: absolute import, this module is weightstream.numpy

from . import _open, _save
from ._loader import load_bytes

__all__ = ["safe_open", "load_file", "load", "save_file", "save"]


class safe_open(_open.safe_open):
    """``safetensors.safe_open`` (as ``safetensors.numpy`` re-exports it) reading one file:
    ``safe_open(filename, framework, device="cpu", *, backend="mmap")``. See
    :class:`weightstream.safe_open`.

    Example::

        >>> with safe_open("model.safetensors", framework="np") as f:   # doctest: +SKIP
        ...     w = f.get_tensor("lm_head.weight")
    """

    _single_file = True


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, np.ndarray]:
    """Load a ``.safetensors`` file into ``{name: np.ndarray}`` in file order. ``backend``
    (``"mmap"``/``"pread"``) is accepted as safetensors takes it; both read through weightstream.

    Example::

        >>> from weightstream.numpy import load_file
        >>> loaded = load_file("./my_folder/bert.safetensors")    # doctest: +SKIP
    """
    return _open.load_file_as_safetensors(filename, "np", "cpu", backend, "weightstream.numpy.load_file")


def load(data: bytes) -> Dict[str, np.ndarray]:
    """Load the bytes of a ``.safetensors`` file into ``{name: np.ndarray}``, in file order,
    through the same validated parser as a file (bf16 and fp8 as ``ml_dtypes`` arrays, where
    ``safetensors.numpy.load`` fails on them).

    Example::

        >>> from weightstream.numpy import load
        >>> with open("model.safetensors", "rb") as f:             # doctest: +SKIP
        ...     loaded = load(f.read())
    """
    return load_bytes(data, "np", "weightstream.numpy.load")


def save_file(tensor_dict: Dict[str, np.ndarray], filename: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensor_dict`` to ``filename`` in the safetensors format, as
    ``safetensors.numpy.save_file`` does.

    Example::

        >>> save_file({"w": np.zeros((2, 2))}, "model.safetensors")   # doctest: +SKIP
    """
    return _save.save_file(tensor_dict, filename, metadata=metadata)


def save(tensor_dict: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a safetensors file of ``tensor_dict``, as ``safetensors.numpy.save``.

    Example::

        >>> data = save({"w": np.zeros((2, 2))})   # doctest: +SKIP
    """
    return _save.save(tensor_dict, metadata=metadata)
