"""``safe_open``: the safetensors handle, lazy. Opening reads headers only; ``get_tensor``
loads one tensor, ``get_slice(name)[...]`` loads only the block of rows it covers."""

from . import _options as O
from ._errors import MissingTensorError, UsageError
from ._frameworks import converter
from ._loader import Loader, _default_loader
from ._weightstream import read_metadata


class safe_open:
    """Open a checkpoint lazily, as ``safetensors.safe_open`` does.

    Args:
        path: a ``.safetensors`` file (also an index, a directory or a Hugging Face cache
            folder: their tensors together).
        framework: ``"pt"`` or ``"np"``.
        device: where tensors load: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        storage_options: for an ``s3://``, ``gs://``, ``az://`` or ``http(s)://`` path, as
            :func:`load_file` takes them.

    Tensors loaded from the handle stay valid after it is closed. Each ``get_tensor`` reads
    the file anew: a local file re-saved between two calls (or a remote object replaced) gives
    the new bytes.

    Example::

        >>> import weightstream as ws
        >>> with ws.safe_open("model.safetensors", framework="np") as f:   # doctest: +SKIP
        ...     names = f.keys()
        ...     w = f.get_tensor(names[0])
        ...     rows = f.get_slice("lm_head.weight")[0:128]                # reads 128 rows only
    """

    def __init__(self, path, framework="pt", device="cpu", *, storage_options=None):
        self._path = O.path(path)
        if storage_options is None:
            self._loader = _default_loader(device)  # shared per device: one staging ring
        else:
            self._loader = Loader(device, storage_options=storage_options)
        self._framework = self._loader._framework(framework)
        self._conv = converter(self._framework)
        self._infos = {t[0]: t for t in self._loader.describe(self._path)}
        self._metadata = read_metadata(self._path, self._loader._storage_options)
        self._open = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._open = False
        return False

    def _check(self):
        if not self._open:
            raise UsageError(f"{self._path}: the safe_open handle is closed")

    def _info(self, name):
        self._check()
        info = self._infos.get(name)
        if info is None:
            raise MissingTensorError(f"{self._path}: no tensor named `{name}`")
        return info

    def keys(self):
        """Tensor names, sorted (as safetensors returns them)."""
        self._check()
        return sorted(self._infos)

    def offset_keys(self):
        """Tensor names in file order."""
        self._check()
        return list(self._infos)

    def metadata(self):
        """The ``__metadata__`` dict, or None."""
        self._check()
        return None if self._metadata is None else dict(self._metadata)

    def get_tensor(self, name):
        """Load the tensor ``name`` (and nothing else)."""
        self._info(name)
        raws = self._loader._raw.load(self._path, O.opts(exact=[name]))
        return self._conv(raws[0])

    def get_tensors(self):
        """Every tensor, in one load: ``{name: tensor}``."""
        self._check()
        return {t.name: self._conv(t) for t in self._loader._raw.load(self._path, O.opts())}

    def get_slice(self, name):
        """A lazy view of ``name``: ``get_shape()``, ``get_dtype()``, and ``[...]`` loads only
        what it covers."""
        return _Slice(self, self._info(name))


class _Slice:
    """``get_slice(name)``: ints, slices (any step, negative bounds) and ``...`` per dimension.

    The load reads only the block of the outermost dimension that the key restricts (rows
    ``a:b`` of dim 0 read only those rows' bytes; for an inner dimension, only that block of
    every row); any step, int or further sliced dimension is then applied to the loaded block
    as numpy/torch index it (a view of it). Fancy indexing (lists, arrays, None) raises.
    """

    def __init__(self, handle, info):
        self._handle = handle
        self._name, _, self._stored_dtype, self._shape, _ = info

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._stored_dtype

    def __len__(self):
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def _key(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if any(k is Ellipsis for k in key):  # by identity: `in` would compare arrays
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = len(self._shape) - (len(key) - 1)
            key = key[:i] + (slice(None),) * max(fill, 0) + key[i + 1:]
        if len(key) > len(self._shape):
            raise IndexError(f"tensor `{self._name}` has {len(self._shape)} dimensions, the index {len(key)}")
        out = []
        for k, n in zip(key, self._shape):
            if isinstance(k, slice):
                out.append(slice(*k.indices(n)))
            elif hasattr(k, "__index__") and not isinstance(k, bool):
                i = k.__index__()
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for dimension of size {n} of `{self._name}`")
                out.append(i % n)
            else:
                raise TypeError(f"get_slice supports ints, slices and '...', got {type(k).__name__}")
        return out + [slice(0, n, 1) for n in self._shape[len(out):]]

    def __getitem__(self, key):
        key = self._key(key)
        h = self._handle
        h._check()
        # The outermost dimension the key restricts, and the block of it that covers the key.
        block = None
        for dim, (k, n) in enumerate(zip(key, self._shape)):
            if isinstance(k, int):
                block = (dim, k, k + 1)
            elif (k.start, k.stop, k.step) != (0, n, 1):
                idx = range(k.start, k.stop, k.step)
                lo, hi = (min(idx), max(idx) + 1) if len(idx) else (0, 0)
                block = (dim, lo, hi)
            if block:
                break
        if block is None:
            return h._conv(h._loader._raw.load(h._path, O.opts(exact=[self._name]))[0])
        dim, lo, hi = block
        empty = lo == hi
        if empty:
            # An empty selection: one entry of the dimension (not the whole tensor) is loaded
            # and indexed empty, so that the shape and dtype come out as numpy/torch make them.
            n = self._shape[dim]
            lo = min(lo, n - 1) if n else 0
            hi = min(lo + 1, n)
        raw = h._loader._raw.load(h._path, O.opts(exact=[self._name], slice_=(self._name, dim, lo, hi)))[0]
        t = h._conv(raw)
        local = []
        for d, k in enumerate(key):
            if d == dim and empty:
                k = slice(0, 0, 1)
            elif d == dim:
                if isinstance(k, int):
                    k -= lo
                else:  # a negative step's stop may fall before the block: then it is open
                    stop = k.stop - lo
                    k = slice(k.start - lo, stop if stop >= 0 else None, k.step)
            local.append(k)
        if all(isinstance(k, slice) and (k.start, k.step) == (0, 1) and k.stop >= s for k, s in zip(local, raw.shape)):
            return t
        if type(t).__module__.startswith("torch") and any(isinstance(k, slice) and k.step < 0 for k in local):
            # torch slices take no negative step: such a dimension is gathered (a copy).
            import torch

            for d, k in enumerate(local):
                if isinstance(k, slice) and k.step < 0:
                    idx = torch.arange(*k.indices(t.shape[d]), device=t.device)
                    t = t.index_select(d, idx)
                    local[d] = slice(None)
        return t[tuple(local)]
