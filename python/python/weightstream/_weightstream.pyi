"""Type stubs of the Rust extension ``weightstream._weightstream`` (the layer the Python
package wraps; use ``weightstream.load_file``, ``safe_open`` and ``Loader``)."""

from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Tuple, TypedDict, Union

__version__: str

class _Opts(TypedDict):
    dtype: Optional[str]  # "BF16" | "F16" | "F32"
    only: List[str]  # globs
    exact: List[str]  # exact names
    shard: Optional[Tuple[int, int]]  # (rank, world)
    split: List[Tuple[str, int]]  # (glob, dim), first match wins
    slice: Optional[Tuple[str, int, int, int]]  # (name, dim, start, stop)

class Tensor:
    """A loaded tensor, exported without a copy through DLPack; each capsule keeps the memory
    alive.

    Example::

        >>> t = ws.Loader()._raw.load("m.safetensors", opts)[0]   # doctest: +SKIP
        >>> numpy.from_dlpack(t)                                  # doctest: +SKIP
    """

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """The safetensors dtype name, e.g. ``"BF16"``."""
    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
    def raw(self) -> "Tensor":
        """The same memory exported as unsigned ints of the dtype's width (bf16 -> uint16,
        fp8 -> uint8), to view as an ``ml_dtypes`` / torch dtype."""
    def __dlpack__(
        self,
        *,
        stream: Optional[Any] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any:
        """A ``dltensor`` capsule, or ``dltensor_versioned`` (DLPack 1.0) when ``max_version``
        is at least ``(1, 0)``. ``copy=True`` raises ``BufferError``."""
    def __dlpack_device__(self) -> Tuple[int, int]:
        """``(1, 0)`` for the CPU, ``(2, N)`` for ``cuda:N``."""

class RawStream(Iterator[Tensor]):
    """Tensors in file order as they land (``Loader.iterate`` wraps it)."""

    def __iter__(self) -> "RawStream": ...
    def __next__(self) -> Tensor: ...
    def close(self) -> None:
        """Stop the reads now; later ``next`` calls end the iteration."""
    @property
    def bytes_read(self) -> int: ...

class RawLoader:
    """The Rust loader behind ``weightstream.Loader``."""

    def __init__(
        self,
        device: str = "auto",
        staging_size: Optional[int] = None,
        staging_count: Optional[int] = None,
        threads: Optional[int] = None,
        io: Optional[str] = None,
        direct: bool = False,
        storage_options: Optional[List[Tuple[str, str]]] = None,
        remote_concurrency: Optional[int] = None,
        remote_request_size: Optional[int] = None,
        read_size: Optional[int] = None,
    ) -> None: ...
    @property
    def device(self) -> str: ...
    def load(self, path: Union[str, PathLike[str]], opts: _Opts) -> List[Tensor]: ...
    def describe(
        self, path: Union[str, PathLike[str]], opts: _Opts
    ) -> List[Tuple[str, str, str, List[int], int]]: ...
    def stream(self, path: Union[str, PathLike[str]], opts: _Opts, window: int) -> RawStream: ...
    def load_into(self, path: Union[str, PathLike[str]], destinations: List[Tuple[str, Any]], opts: _Opts) -> int: ...

class RawShare:
    """One rank's share of a group load (``weightstream.distributed`` drives it)."""

    def take_headers(self) -> Optional[List[Tuple[str, bytes, int, Optional[str], str]]]: ...
    def keys(self) -> List[Tuple[str, str, List[int], int, List[int], Optional[int]]]: ...
    def windows(self) -> List[Tuple[int, int, int, List[Optional[int]], List[Tuple[int, int, int]]]]: ...
    @property
    def reads_per_rank(self) -> List[int]: ...
    def reads(self, w: int) -> List[Tuple[int, bool, int, int]]: ...
    def read(self, w: int, places: List[Any]) -> int: ...

def group_share(
    loader: RawLoader,
    path: Union[str, PathLike[str]],
    shared: Optional[List[Tuple[str, bytes, int, Optional[str], str]]],
    opts: _Opts,
    shards: List[Optional[Tuple[int, int]]],
    rank: int,
    window: int,
) -> RawShare:
    """Plan group rank ``rank``'s share of a group load (headers read here without ``shared``)."""

def read_metadata(
    path: Union[str, PathLike[str]], storage_options: Optional[List[Tuple[str, str]]] = None
) -> Optional[Dict[str, str]]:
    """The ``__metadata__`` of a checkpoint's files (merged), or None."""

def cuda_available() -> bool:
    """Whether a CUDA device is usable here."""

def save_bytes(items: List[Tuple[str, str, List[int], Any]], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """A safetensors file's bytes from ``(name, dtype, shape, data)`` items (data: bytes or a CPU
    object with ``__dlpack__``), in safetensors' tensor order."""

def save_file(
    items: List[Tuple[str, str, List[int], Any]], path: Union[str, PathLike[str]], metadata: Optional[Dict[str, str]] = None
) -> None:
    """Write the items to ``path`` (a temporary file beside it, renamed over it); the GIL is released."""
