"""``safe_open``: the safetensors handle, lazy. Opening reads headers only; ``get_tensor``
loads one tensor, ``get_slice(name)[...]`` loads only the block of rows it covers.

It takes the arguments ``safetensors.safe_open`` 0.8 takes, by the same rules (``framework``
positional and required, ``device``, keyword-only ``backend``), and returns what it returns
(0-d arrays for all-integer indices, ``{}`` for an empty ``__metadata__``, ...); the tests in
``python/tests/test_dropin.py`` compare the two on files safetensors writes."""


from . import _options as O
from ._errors import MissingTensorError, SliceError, UsageError
from ._frameworks import _PACKED, converter
from ._loader import Loader, _default_loader, check_path
from ._weightstream import read_metadata


class safe_open:
    """Open a checkpoint lazily, as ``safetensors.safe_open`` does.

    Args:
        filename: a ``.safetensors`` file (also an index, a directory or a Hugging Face cache
            folder: their tensors together; the drop-ins ``weightstream.torch.safe_open`` and
            ``weightstream.numpy.safe_open`` take one file only, as safetensors does).
        framework: ``"pt"`` (or ``"torch"``, ``"pytorch"``) or ``"np"`` (or ``"numpy"``):
            required, as in safetensors.
        device: where tensors load: ``"cpu"`` (default; also ``None``), ``"cuda"``,
            ``"cuda:N"``, an int N or a ``torch.device``.
        backend: ``"mmap"`` (default) or ``"pread"``, as safetensors takes them. Both read
            through weightstream's engine into memory the tensors own (what safetensors'
            ``"pread"`` does); ``"mmap"`` tensors are not views of a file mapping, so they
            never change if the file does, and writing to them never touches it.
        storage_options: (weightstream's, keyword-only) for an ``s3://``, ``gs://``, ``az://``
            or ``http(s)://`` path, as :func:`load_file` takes them.

    Tensors loaded from the handle (and ``get_slice`` objects) stay valid after it is closed.
    Each ``get_tensor`` reads the file anew: a local file re-saved between two calls (or a
    remote object replaced) gives the new bytes.

    Example::

        >>> import weightstream as ws
        >>> with ws.safe_open("model.safetensors", framework="np") as f:   # doctest: +SKIP
        ...     names = f.keys()
        ...     w = f.get_tensor(names[0])
        ...     rows = f.get_slice("lm_head.weight")[0:128]                # reads 128 rows only
    """

    _single_file = False  # the drop-in modules' subclass reads one file, as safetensors does

    def __init__(self, filename, framework, device="cpu", *, backend="mmap", storage_options=None):
        self._path, self._loader, self._framework = _opened(
            filename, framework, device, backend, storage_options, self._single_file, f"{type(self).__module__}.safe_open"
        )
        path = self._path
        self._conv = converter(self._framework)
        self._infos = {t[0]: t for t in self._loader.describe(path)}
        self._metadata = _metadata(path, self._loader._storage_options)
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
        if not isinstance(name, str):
            raise TypeError(f"tensor name: expected a str, got {type(name).__name__}")
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
        """The ``__metadata__`` dict (``{}`` when the file has an empty one), or None when it
        has none."""
        self._check()
        return None if self._metadata is None else dict(self._metadata)

    def get_tensor(self, name):
        """Load the tensor ``name`` (and nothing else)."""
        self._info(name)
        return _load_one(self._loader, self._path, self._conv, name)

    def get_tensors(self):
        """Every tensor, in one load: ``{name: tensor}`` in file order."""
        self._check()
        return self._loader.load(self._path, framework=self._framework)

    def get_slice(self, name):
        """A lazy view of ``name``: ``get_shape()``, ``get_dtype()``, and ``[...]`` loads only
        what it covers. It stays usable after the handle is closed, as safetensors' does."""
        return _Slice(self, self._info(name))


def _opened(filename, framework, device, backend, storage_options, single_file, what):
    """``(path, loader, framework)`` for safetensors' arguments, checked in safetensors' order:
    the framework, device and backend before the file (a bad one is reported even for a missing
    file), then the file, then whether the framework loads to that device."""
    framework = O.framework(framework)
    device = O.device("cpu" if device is None else device)
    O.backend(backend)
    path = O.path(filename)
    check_path(path, single_file, what)
    if storage_options is None:
        loader = _default_loader(device)  # shared per device: one staging ring
    else:
        loader = Loader(device, storage_options=storage_options)
    return path, loader, loader._framework(framework)


def load_file_as_safetensors(filename, framework, device, backend, what):
    """The drop-ins' ``load_file``: what ``safe_open(...).get_tensors()`` returns, with the
    same argument checks, in one load (no handle: the header is parsed once)."""
    path, loader, framework = _opened(filename, framework, device, backend, None, True, what)
    return loader.load(path, framework=framework)


def _load_one(loader, path, conv, name, slice_=None):
    raw = loader._raw.load(path, O.opts(exact=[name], slice_=slice_))[0]
    return loader._convert(conv, raw, path)


def _metadata(path, storage_options):
    """The ``__metadata__`` as safetensors returns it: None when absent (or ``null``), ``{}``
    when present and empty (the Rust layer's header keeps which)."""
    return read_metadata(path, storage_options)


def _is_int(k):
    """An integer index as numpy takes one: an int, a numpy integer, a 0-d integer array or
    tensor (not a bool, which numpy and torch read as a mask)."""
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        return False
    if getattr(k, "ndim", 0) != 0:
        return False
    dtype = getattr(k, "dtype", None)
    return dtype is None or "bool" not in str(dtype)


class _Slice:
    """``get_slice(name)``: what ``safetensors.safe_open(...).get_slice(name)`` returns.

    ``[...]`` follows numpy's basic indexing: ints (negative from the end), slices (any step,
    negative too, bounds clipped), ``...`` and ``None``; all-integer indices give a 0-d array.
    The load reads only the block of the outermost dimension that the key restricts (rows
    ``a:b`` of dim 0 read only those rows' bytes; for an inner dimension, only that block of
    every row); the rest is applied to the loaded block as a view.

    Any other index (a list, an array, a bool mask, a tensor) loads the whole tensor and lets the
    framework index it: torch's indexing for ``"pt"``, exactly what safetensors does there
    (it indexes a torch view of the whole tensor), numpy's for ``"np"``. A bad index raises
    :class:`SliceError` (an ``IndexError``, also a ``SafetensorError``), except that with
    ``"pt"`` an index only torch can judge raises torch's own error, as safetensors' does.
    """

    def __init__(self, handle, info):
        # The handle's loader, path and conversion, not the handle: the slice outlives it.
        self._loader, self._path, self._conv = handle._loader, handle._path, handle._conv
        self._torch = handle._framework == "pt"
        self._name, _, self._stored_dtype, self._shape, _ = info

    def get_shape(self):
        """The tensor's shape as its header gives it (element counts), a list of ints."""
        return list(self._shape)

    def get_dtype(self):
        """The tensor's safetensors dtype name, e.g. ``"BF16"``."""
        return self._stored_dtype

    def __len__(self):  # not in safetensors' slice objects: a convenience kept from before
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def _whole(self):
        return _load_one(self._loader, self._path, self._conv, self._name)

    def _parse(self, key):
        """The key as one entry per index (``int``, ``slice`` or ``None``) with ``...`` expanded
        and ints and slices normalized to the shape, or None when it is not basic indexing."""
        items = key if type(key) is tuple else (key,)
        if not all(k is Ellipsis or k is None or isinstance(k, slice) or _is_int(k) for k in items):
            return None
        ellipses = sum(k is Ellipsis for k in items)
        if ellipses > 1:
            if self._torch:
                return None  # torch takes several (safetensors' "pt" indexes through torch)
            raise SliceError(f"tensor `{self._name}`: an index can only have a single ellipsis ('...')")
        ndim = len(self._shape)
        used = sum(k is not None and k is not Ellipsis for k in items)
        if used > ndim:
            raise SliceError(f"tensor `{self._name}` has {ndim} dimensions, the index {used}")
        if ellipses:
            i = next(j for j, k in enumerate(items) if k is Ellipsis)  # by identity: `==` compares arrays
            items = items[:i] + (slice(None),) * (ndim - used) + items[i + 1 :]
        else:
            items = items + (slice(None),) * (ndim - used)
        out, dim = [], 0
        for k in items:
            if k is None:
                out.append(None)
                continue
            n = self._shape[dim]
            if isinstance(k, slice):
                if k.step is not None and k.step.__index__() == 0:
                    raise SliceError(f"tensor `{self._name}`: slice step cannot be zero")
                out.append(slice(*k.indices(n)))
            else:
                i = k.__index__()
                if not -n <= i < n:
                    raise SliceError(f"index {i} is out of bounds for dimension {dim} of size {n} of tensor `{self._name}`")
                out.append(i % n)
            dim += 1
        return out

    def __getitem__(self, key):
        basic = None if self._stored_dtype in _PACKED else self._parse(key)
        if basic is None:
            return self._fancy(key)
        return self._basic(basic)

    def _fancy(self, key):
        """Not basic indexing (or a packed dtype, whose torch tensor is not shaped as its
        header): the whole tensor, indexed by its framework."""
        t = self._whole()
        if self._torch:
            return t[key]  # torch's result and errors, as safetensors' "pt" gives them
        import numpy as np

        try:
            return np.asarray(t[key])
        except (IndexError, TypeError, ValueError) as e:
            raise SliceError(f"tensor `{self._name}`: {e}") from e

    def _basic(self, key):
        dims = [k for k in key if k is not None]  # one entry per dimension of the tensor
        # The outermost dimension the key restricts, and the block of it that covers the key.
        block = None
        for dim, (k, n) in enumerate(zip(dims, self._shape)):
            if isinstance(k, int):
                block = (dim, k, k + 1)
            elif (k.start, k.stop, k.step) != (0, n, 1):
                idx = range(k.start, k.stop, k.step)
                lo, hi = (min(idx), max(idx) + 1) if len(idx) else (0, 0)
                block = (dim, lo, hi)
            if block:
                break
        if block is None:
            return self._index(self._whole(), key, dims)
        dim, lo, hi = block
        empty = lo == hi
        if empty:
            # An empty selection: one entry of the dimension (not the whole tensor) is loaded
            # and indexed empty, so that the shape and dtype come out as numpy/torch make them.
            n = self._shape[dim]
            lo = min(lo, n - 1) if n else 0
            hi = min(lo + 1, n)
        t = _load_one(self._loader, self._path, self._conv, self._name, (self._name, dim, lo, hi))
        local = []
        for d, k in enumerate(dims):
            if d == dim and empty:
                k = slice(0, 0, 1)
            elif d == dim:
                k = k - lo if isinstance(k, int) else slice(k.start - lo, k.stop - lo, k.step)
            local.append(k)
        return self._index(t, key, local)

    def _index(self, t, key, local):
        """``t`` (the loaded block) indexed by ``local`` (one normalized entry per dimension,
        relative to the block), with the key's new axes (``None``) put back."""
        # A normalized negative-step slice that runs to the start has a negative stop, which
        # numpy and torch would read from the end: it is open instead.
        local = [slice(k.start, None, k.step) if isinstance(k, slice) and k.stop < 0 else k for k in local]
        if self._torch and any(isinstance(k, slice) and k.step < 0 for k in local):
            # torch slices take no negative step: such a dimension is gathered (a copy).
            import torch

            for d, k in enumerate(local):
                if isinstance(k, slice) and k.step < 0:
                    idx = torch.arange(*k.indices(t.shape[d]), device=t.device)
                    t = t.index_select(d, idx)
                    local[d] = slice(None)
        it = iter(local)
        full = tuple(None if k is None else next(it) for k in key)
        if self._torch:
            return t[full]
        # A trailing `...` keeps numpy from turning an all-integer result into a scalar: a 0-d
        # array, as safetensors returns. Its results are C-contiguous arrays: so are ours.
        out = t[full + (Ellipsis,)]
        return out if out.flags.c_contiguous else out.copy()
