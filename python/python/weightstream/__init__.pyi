"""Type stubs of the public API of ``weightstream`` (docstrings with examples are in the
modules: ``_loader.py``, ``_open.py``)."""

from os import PathLike
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from ._weightstream import Tensor as Tensor
from ._weightstream import __version__ as __version__
from ._weightstream import cuda_available as cuda_available

Path = Union[str, PathLike[str]]
Device = Union[str, int, Any]  # "cpu" | "cuda" | "cuda:N" | "auto" | N | torch.device
Framework = Literal["pt", "np", "torch", "pytorch", "numpy"]
DType = Union[str, Any]  # "bf16" | "f16" | "f32" | torch/numpy/ml_dtypes dtypes of those
Size = Union[int, str]  # 1073741824 | "1GiB" | "512M"
Globs = Union[str, Sequence[str], None]
Split = Union[Mapping[str, int], Sequence[Tuple[str, int]], None]

# WeightstreamError's base is safetensors.SafetensorError where safetensors is installed.
class WeightstreamError(Exception): ...
class FormatError(WeightstreamError, ValueError): ...
class ReadError(WeightstreamError, OSError): ...
class MissingFileError(ReadError, FileNotFoundError): ...
class RemoteError(ReadError): ...
class DeviceError(WeightstreamError, RuntimeError): ...
class UsageError(WeightstreamError, ValueError): ...
class SliceError(UsageError, IndexError): ...
class MissingTensorError(WeightstreamError, KeyError): ...
class CancelledError(WeightstreamError): ...
class InternalError(WeightstreamError, RuntimeError): ...
class DistributedError(WeightstreamError, RuntimeError):
    rank: Optional[int]
class PeerFailedError(DistributedError): ...
class PeerLostError(DistributedError): ...
class GroupMismatchError(DistributedError, UsageError): ...

def load_file(
    path: Path,
    device: Device = "cpu",
    *,
    framework: Framework = "pt",
    dtype: Optional[DType] = None,
    only: Globs = None,
    shard: Optional[Tuple[int, int]] = None,
    split: Split = None,
    storage_options: Optional[Dict[str, Union[str, int, bool]]] = None,
    group: Any = None,
) -> Dict[str, Any]:
    """Load a checkpoint (file, index.json, directory, Hugging Face cache folder, or an
    s3://, gs://, az://, http(s):// URL of one) into
    ``{name: tensor}``: torch tensors (``"pt"``) or numpy arrays (``"np"``, CPU only).

    Example::

        >>> arrays = weightstream.load_file("model.safetensors", framework="np")
    """

class Loader:
    """Loads checkpoints, keeping its staging ring between loads.

    Example::

        >>> loader = weightstream.Loader(device="cuda:0", staging="16MiB", threads=8)
        >>> for name, t in loader.iterate("model/", window="1GiB"):
        ...     params[name].copy_(t)
    """

    def __init__(
        self,
        device: Device = "cpu",
        *,
        staging: Optional[Size] = None,
        staging_count: Optional[int] = None,
        threads: Optional[int] = None,
        io: Optional[Literal["auto", "pread", "uring"]] = None,
        direct: bool = False,
        storage_options: Optional[Dict[str, Union[str, int, bool]]] = None,
        remote_concurrency: Optional[int] = None,
        remote_request_size: Optional[Size] = None,
        read_size: Optional[Size] = None,
    ) -> None: ...
    @property
    def device(self) -> str: ...
    def load(
        self,
        path: Path,
        *,
        framework: Framework = "pt",
        dtype: Optional[DType] = None,
        only: Globs = None,
        shard: Optional[Tuple[int, int]] = None,
        split: Split = None,
    ) -> Dict[str, Any]: ...
    def iterate(
        self,
        path: Path,
        *,
        window: Size = "1GiB",
        framework: Framework = "pt",
        dtype: Optional[DType] = None,
        only: Globs = None,
        shard: Optional[Tuple[int, int]] = None,
        split: Split = None,
        group: Any = None,
        timeout: Optional[float] = None,
    ) -> Iterator[Tuple[str, Any]]:
        """With ``group`` (a torch.distributed process group): a
        ``weightstream.distributed.GroupIterator`` (``bytes_read``, ``bytes_sent``,
        ``bytes_received``)."""
    def load_into(
        self,
        path: Path,
        tensors: Union[Mapping[str, Any], Sequence[Tuple[str, Any]]],
        *,
        dtype: Optional[DType] = None,
        shard: Optional[Tuple[int, int]] = None,
        split: Split = None,
    ) -> int: ...
    def describe(
        self,
        path: Path,
        *,
        dtype: Optional[DType] = None,
        only: Globs = None,
        shard: Optional[Tuple[int, int]] = None,
        split: Split = None,
    ) -> List[Tuple[str, str, str, List[int], int]]: ...

class _Slice:
    """``get_slice(name)``: numpy basic indexing (ints, slices of any step, ``...``, ``None``)
    reads only the block it covers; all-integer indices give a 0-d array."""

    def get_shape(self) -> List[int]: ...
    def get_dtype(self) -> str: ...
    def __len__(self) -> int: ...
    def __getitem__(self, key: Any) -> Any: ...

class safe_open:
    """A lazy handle, as ``safetensors.safe_open``: headers at open, one tensor per
    ``get_tensor``, only the covered block per ``get_slice(name)[...]``.

    Example::

        >>> with weightstream.safe_open("model.safetensors", framework="np") as f:
        ...     rows = f.get_slice("lm_head.weight")[0:128]
    """

    def __init__(
        self,
        filename: Path,
        framework: Framework,
        device: Optional[Device] = "cpu",
        *,
        backend: Literal["mmap", "pread"] = "mmap",
        storage_options: Optional[Dict[str, Union[str, int, bool]]] = None,
    ) -> None: ...
    def __enter__(self) -> "safe_open": ...
    def __exit__(self, *exc: Any) -> Literal[False]: ...
    def keys(self) -> List[str]: ...
    def offset_keys(self) -> List[str]: ...
    def metadata(self) -> Optional[Dict[str, str]]:
        """``{}`` for an empty ``__metadata__``, None when there is none (as safetensors)."""
    def get_tensor(self, name: str) -> Any: ...
    def get_tensors(self) -> Dict[str, Any]: ...
    def get_slice(self, name: str) -> _Slice: ...
