"""weightstream: stream ``.safetensors`` checkpoints into GPU or host memory.

A thin layer over the Rust crate: ``load_file`` and ``safe_open`` as safetensors has them,
``Loader`` to reuse a staging ring, ``Loader.iterate`` to stream with bounded memory,
``Loader.load_into`` to fill existing tensors in place. Tensors leave through DLPack without a
copy and keep their memory alive; the GIL is released while loading, and Ctrl-C cancels a load.

``weightstream.torch`` and ``weightstream.numpy`` are drop-ins for ``safetensors.torch`` and
``safetensors.numpy`` (``load_file``, ``load``, ``safe_open``, ``load_model``, the savers). Where
safetensors is installed, every weightstream error is a ``safetensors.SafetensorError``.

Example::

    >>> import weightstream as ws
    >>> tensors = ws.load_file("model.safetensors", device="cuda:0")          # doctest: +SKIP
    >>> arrays = ws.load_file("model.safetensors", framework="np")            # doctest: +SKIP
    >>> with ws.safe_open("model.safetensors", framework="np") as f:          # doctest: +SKIP
    ...     part = f.get_slice("lm_head.weight")[0:128]
"""

from ._errors import (
    CancelledError,
    DeviceError,
    FormatError,
    InternalError,
    MissingFileError,
    MissingTensorError,
    ReadError,
    RemoteError,
    SliceError,
    UsageError,
    WeightstreamError,
)
from ._loader import Loader, load_file
from .distributed import DistributedError, GroupMismatchError, PeerFailedError, PeerLostError
from ._open import safe_open
from ._weightstream import Tensor, __version__, cuda_available

__all__ = [
    "load_file",
    "safe_open",
    "Loader",
    "Tensor",
    "cuda_available",
    "WeightstreamError",
    "FormatError",
    "ReadError",
    "MissingFileError",
    "RemoteError",
    "DeviceError",
    "UsageError",
    "SliceError",
    "MissingTensorError",
    "CancelledError",
    "InternalError",
    "DistributedError",
    "PeerFailedError",
    "PeerLostError",
    "GroupMismatchError",
    "__version__",
]
