"""``Loader`` (reuse: the staging ring stays between loads) and ``load_file``."""

import os
import stat
import threading

from . import _options as O
from ._errors import FormatError, ReadError, WeightstreamError, missing_file
from ._frameworks import converter, destination
from ._weightstream import RawLoader

# URL schemes the Rust layer reads as remote sources (weightstream::source::is_remote).
_REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss", "http", "https")


def is_remote(path):
    """Whether the Rust layer reads ``path`` (a str) from an object store or HTTP server."""
    scheme, sep, rest = path.partition("://")
    return bool(sep) and bool(rest) and scheme in _REMOTE_SCHEMES


def checked_path(path):
    """``path`` as a str, a missing local one raising :class:`MissingFileError`."""
    path = O.path(path)
    check_path(path)
    return path


def check_path(path, single_file=False, what="load_file"):
    """Before the Rust layer sees a local ``path``: a missing one raises
    :class:`MissingFileError` (a ``FileNotFoundError``, as safetensors raises). With
    ``single_file`` (the safetensors drop-ins), only one ``.safetensors`` file is read, as
    safetensors reads: a directory raises :class:`ReadError` and a ``*.json`` path (which the
    Rust layer would read as an index) :class:`FormatError`; a URL is a missing file there, as
    it is to safetensors."""
    if not single_file and is_remote(path):
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise missing_file(path) from None
    except (OSError, ValueError):
        return  # the Rust layer reports it (permissions, a NUL in the path...) naming the file
    if not single_file:
        return
    if stat.S_ISDIR(st.st_mode):
        import errno

        e = ReadError(
            f"{path}: is a directory; {what} reads one .safetensors file, as safetensors does "
            "(weightstream.load_file and weightstream.safe_open load a directory)"
        )
        e.errno, e.filename = errno.EISDIR, path
        raise e
    if path.endswith(".json"):
        raise FormatError(
            f"{path}: a .json path (an index?); {what} reads one .safetensors file, as safetensors "
            "does (weightstream.load_file and weightstream.safe_open load an index)"
        )


class Loader:
    """Loads checkpoints; build it once, load many times (its staging ring is kept).

    Args:
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"auto"`` (a GPU when there is
            one), an int N or a ``torch.device``.
        staging: size of each staging buffer, an int or ``"16MiB"`` (default: measured per
            target, 16 MiB for a GPU, 4 MiB for host loads).
        staging_count: number of staging buffers (default 8).
        threads: reader threads (default: the read engine's).
        io: ``"auto"``, ``"pread"`` or ``"uring"``.
        direct: read with O_DIRECT (past the page cache).
        storage_options: for ``s3://``, ``gs://``, ``az://`` and ``http(s)://`` paths: a dict of
            ``object_store`` options (``aws_endpoint``, ``aws_region``, ``allow_http``,
            ``timeout``, ``max_retries``, ...), applied after the ``AWS_*``, ``GOOGLE_*`` and
            ``AZURE_*`` environment variables.
        remote_concurrency: ranged GETs in flight at most (default 8).
        remote_request_size: bytes of one ranged GET at most, an int or ``"8MiB"`` (default).
        read_size: bytes of one local read request, an int or ``"2MiB"`` (default: the
            engine's; rounded up to a multiple of 4 KiB). A staging buffer is filled by several.

    Example::

        >>> import weightstream as ws
        >>> loader = ws.Loader(device="cpu")
        >>> for path in ["a.safetensors", "b.safetensors"]:          # doctest: +SKIP
        ...     arrays = loader.load(path, framework="np")
    """

    def __init__(
        self,
        device="cpu",
        *,
        staging=None,
        staging_count=None,
        threads=None,
        io=None,
        direct=False,
        storage_options=None,
        remote_concurrency=None,
        remote_request_size=None,
        read_size=None,
    ):
        if io is not None and io not in ("auto", "pread", "uring"):
            raise O.UsageError(f"io: expected 'auto', 'pread' or 'uring', got {io!r}")
        self._storage_options = O.storage_options(storage_options)
        self._raw = RawLoader(
            device=O.device(device),
            staging_size=None if staging is None else O.size(staging, "staging"),
            staging_count=O.count(staging_count, "staging_count"),
            threads=O.count(threads, "threads"),
            io=io,
            direct=bool(direct),
            storage_options=self._storage_options,
            remote_concurrency=O.count(remote_concurrency, "remote_concurrency"),
            remote_request_size=None if remote_request_size is None else O.size(remote_request_size, "remote_request_size"),
            read_size=None if read_size is None else O.size(read_size, "read_size"),
        )

    @property
    def device(self):
        """The device this loader loads to (``"auto"`` resolved)."""
        return self._raw.device

    def _framework(self, framework):
        fw = O.framework(framework)
        if fw == "np" and self.device != "cpu":
            raise O.UsageError(f"framework='np' loads to the CPU only; this loader's device is {self.device}")
        return fw

    def load(self, path, *, framework="pt", dtype=None, only=None, shard=None, split=None):
        """Load ``path`` (a file, an ``index.json``, a directory or a Hugging Face cache folder)
        into ``{name: tensor}`` in file order, as :func:`load_file` does.

        Example::

            >>> arrays = ws.Loader().load("model.safetensors", framework="np", only="*.weight")  # doctest: +SKIP
        """
        conv = converter(self._framework(framework))
        path = checked_path(path)
        raws = self._raw.load(path, O.opts(dtype, only, shard, split))
        return {t.name: self._convert(conv, t, path) for t in raws}

    def _convert(self, conv, t, path):
        """``conv(t)``: the framework tensor over ``t``'s memory."""
        return conv(t)

    def iterate(self, path, *, window="1GiB", framework="pt", dtype=None, only=None, shard=None, split=None, group=None,
                timeout=None, keep=False):
        """Yield ``(name, tensor)`` in file order as tensors land, with at most ``window`` bytes
        loaded ahead of what you still hold: memory stays bounded whatever the model's size.
        Each tensor owns its memory; drop it when it is copied. Stopping early (``break``)
        stops the reads.

        Example (a framework's weight-loading loop)::

            >>> params = dict(model.named_parameters())                    # doctest: +SKIP
            >>> for name, t in loader.iterate(path, window="512MiB"):     # doctest: +SKIP
            ...     params[name].data.copy_(t)

        With ``group=`` (a ``torch.distributed`` process group, every rank of it calling with the
        same arguments but its own ``shard``), the ranks read each byte once and share it
        through the group: see :mod:`weightstream.distributed` (``timeout``: seconds a rank
        waits for a peer, default 20).
        """
        if group is not None:
            from .distributed import DEFAULT_TIMEOUT, GroupIterator

            # No local check of the path: the group's first rank opens it and tells the others.
            return GroupIterator(self, O.path(path), group, window=window, framework=framework, dtype=dtype,
                                 only=only, shard=shard, split=split,
                                 timeout=DEFAULT_TIMEOUT if timeout is None else timeout, keep=keep)
        if keep:
            raise O.UsageError("keep: only with group=")
        if timeout is not None:
            raise O.UsageError("timeout: only with group=")
        conv = converter(self._framework(framework))
        window = O.size(window, "window")
        stream = self._raw.stream(checked_path(path), O.opts(dtype, only, shard, split), window)
        return _iterate(stream, conv)

    def load_into(self, path, tensors, *, dtype=None, shard=None, split=None):
        """Fill existing tensors in place: ``tensors`` maps names to numpy arrays, torch tensors
        (a module's ``state_dict()``) or any object with ``__dlpack__``, each contiguous, writable,
        on this loader's device, of the tensor's loaded shape and dtype (a mismatch raises
        :class:`UsageError` naming the tensor). Nothing else is allocated; tensors of the
        checkpoint that ``tensors`` does not name are skipped. Returns the bytes loaded.

        Example::

            >>> out = {"w": np.empty((4, 4), np.float32)}                  # doctest: +SKIP
            >>> ws.Loader().load_into("model.safetensors", out)           # doctest: +SKIP
        """
        items = tensors.items() if hasattr(tensors, "items") else tensors
        dests = [(name, destination(obj, name)) for name, obj in items]
        return self._raw.load_into(checked_path(path), dests, O.opts(dtype, None, shard, split))

    def describe(self, path, *, dtype=None, only=None, shard=None, split=None):
        """What a load would produce, from the headers alone: a list of
        ``(name, dtype, stored_dtype, shape, nbytes)`` in file order."""
        return self._raw.describe(checked_path(path), O.opts(dtype, only, shard, split))


def _iterate(stream, conv):
    # While suspended at `yield`, this frame holds no reference to the tensor it handed out
    # (a local would keep it, and its batch, alive until the next item arrives): the caller's
    # tensor alone keeps the memory.
    try:
        while True:
            box = []
            try:
                box.append(next(stream))
            except StopIteration:
                return
            yield _pair(box, conv)
    finally:
        stream.close()


def _pair(box, conv):
    t = box.pop()
    return t.name, conv(t)


_default_loaders = {}
_default_lock = threading.Lock()


def _default_loader(device):
    """One loader per device for ``load_file`` (its staging ring is reused by the next call)."""
    dev = O.device(device)
    with _default_lock:
        loader = _default_loaders.get(dev)
        if loader is None:
            loader = _default_loaders[dev] = Loader(device=dev)
        return loader


def load_file(path, device="cpu", *, framework="pt", dtype=None, only=None, shard=None, split=None, storage_options=None,
              group=None):
    """Load a checkpoint into ``{name: tensor}``, like ``safetensors.torch.load_file`` /
    ``safetensors.numpy.load_file``.

    Args:
        path: a ``.safetensors`` file, a ``model.safetensors.index.json``, a directory of them
            or a Hugging Face cache folder (``models--org--name``); or an ``s3://``, ``gs://``,
            ``az://`` or ``http(s)://`` URL of a file, an index or a prefix (credentials and
            endpoint from the ``AWS_*``, ``GOOGLE_*``, ``AZURE_*`` environment variables and
            ``storage_options``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, an int or a ``torch.device``.
        framework: ``"pt"`` (torch tensors) or ``"np"`` (numpy arrays, CPU only; bf16 and fp8
            as ``ml_dtypes`` types, as ``safetensors.numpy`` returns them).
        dtype: convert F16/BF16/F32/F64 tensors to ``"bf16"``, ``"f16"`` or ``"f32"``.
        only: a glob or list of globs: load only the tensors whose names match.
        shard: ``(rank, world)``: with ``split``, load this rank's share of split tensors.
        split: ``{"*.q_proj.weight": 0, ...}``: the dimension each matching tensor splits along
            (first match wins; the others load whole).
        storage_options: ``{"aws_endpoint": "http://...", "aws_region": "us-east-1", ...}``:
            ``object_store`` options for a remote ``path`` (plus ``max_retries`` and
            ``retry_timeout``); an unknown key raises :class:`UsageError`.
        group: a ``torch.distributed`` process group whose ranks all call ``load_file`` with
            the same arguments: they read each byte once and share it through the group
            (:mod:`weightstream.distributed`).

    Tensors are handed over without a copy and keep their memory alive; one allocation holds
    a load's tensors and is freed when the last of them dies.

    Example::

        >>> import weightstream as ws
        >>> arrays = ws.load_file("model.safetensors", framework="np")          # doctest: +SKIP
        >>> tensors = ws.load_file("Qwen2-7B/", device="cuda:0", dtype="bf16")  # doctest: +SKIP
    """
    loader = _default_loader(device) if storage_options is None else Loader(device, storage_options=storage_options)
    if group is not None:
        with loader.iterate(path, framework=framework, dtype=dtype, only=only, shard=shard, split=split,
                            group=group, keep=True) as it:
            return dict(it)
    return loader.load(path, framework=framework, dtype=dtype, only=only, shard=shard, split=split)


def load_bytes(data, framework, what):
    """The tensors of ``data``, the bytes of a ``.safetensors`` file, in file order (the drop-ins'
    ``load(bytes)``). The bytes are written to an anonymous in-memory file (``memfd``, a regular
    file) and loaded through the same validated parser and loader as a file on disk: a hostile
    header gets the same typed errors and limits, and memory stays the file plus the tensors
    (safetensors' ``load`` holds the bytes and a copy of every tensor too). Errors name the
    input ``<bytes>``."""
    if isinstance(data, str):
        raise TypeError(f"{what}: expected bytes, got str")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{what}: expected bytes (or a bytes-like object), got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise TypeError(f"{what}: expected contiguous bytes")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    loader = _default_loader("cpu")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("weightstream-load", os.MFD_CLOEXEC)
        path = f"/proc/self/fd/{fd}"
        cleanup = lambda: os.close(fd)  # noqa: E731
    else:  # not Linux: a temporary file, removed at once after the load
        import tempfile

        fd, path = tempfile.mkstemp(suffix=".safetensors")
        cleanup = lambda: (os.close(fd), os.unlink(path))  # noqa: E731
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(view)
        try:
            return loader.load(path, framework=framework)
        except WeightstreamError as e:
            raise _renamed(e, path, "<bytes>") from None
    finally:
        cleanup()


def _renamed(e, old, new):
    """``e`` again, with ``old`` replaced by ``new`` in its message (a memfd's path means
    nothing to the caller)."""
    return type(e)(*(a.replace(old, new) if isinstance(a, str) else a for a in e.args))
