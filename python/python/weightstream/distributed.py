"""Distributed loading: the ranks of a ``torch.distributed`` group read each byte of a checkpoint
once and hand it to each other through the group.

Every rank of the group calls :func:`iterate` (or ``Loader.iterate(..., group=g)``) with the same
checkpoint and options; each reads a balanced share of the bytes (by bytes, not by file), and the
tensors are broadcast through the group in bounded windows while the next window is read. Every
rank's iterator yields the full ``(name, tensor)`` stream, in the same order, bitwise equal to a
single-process load. With ``shard=``/``split=``, a rank receives only its own block of split
tensors: a block that one rank alone needs is read by it and moves nowhere.

Only the group's first rank reads the headers (and index); the others get them through the group,
so on an object store a group fetches each byte of the checkpoint once. Across nodes, pass a
node-local group (:func:`node_group`): each node reads the checkpoint once and nodes exchange
no weights.

Faults are bounded: a rank whose load fails, or whose loop stops, makes the others raise
:class:`PeerFailedError` naming it; a rank that dies or stops answering makes them raise
:class:`PeerLostError` within ``timeout`` seconds, whatever the backend of the group (the ranks
exchange their status each window on a gloo side group with that timeout, and every transfer is
waited for at most that long). Ranks that pass different checkpoints or options raise
:class:`GroupMismatchError` before any data moves. After such an error the group is not usable
for more collectives: end the job (as after any failed collective).

Example (every rank runs it)::

    >>> import torch.distributed as dist, weightstream as ws            # doctest: +SKIP
    >>> dist.init_process_group("nccl")                                 # doctest: +SKIP
    >>> loader = ws.Loader(device=f"cuda:{local_rank}")                 # doctest: +SKIP
    >>> with loader.iterate("Qwen2-7B/", group=dist.group.WORLD) as it: # doctest: +SKIP
    ...     for name, t in it:
    ...         params[name].data.copy_(t)
    >>> it.bytes_read, it.bytes_sent, it.bytes_received                # doctest: +SKIP

Across two nodes of 8 GPUs, each node reading the checkpoint once::

    >>> node = wsd.node_group()            # every rank of the job calls it   # doctest: +SKIP
    >>> tensors = ws.load_file("s3://bucket/model/", device=f"cuda:{local_rank}", group=node)  # doctest: +SKIP
"""

import datetime
import os
import socket
import sys
import time
import weakref

from . import _options as O
from . import _side_groups
from ._errors import UsageError, WeightstreamError
from ._frameworks import torch_packed_dtype
from ._save import _DTYPES
from ._weightstream import group_share

__all__ = [
    "iterate",
    "load_file",
    "node_group",
    "GroupIterator",
    "DistributedError",
    "PeerFailedError",
    "PeerLostError",
    "GroupMismatchError",
]


class DistributedError(WeightstreamError, RuntimeError):
    """A distributed load failed because of the group. ``rank`` is the group rank at fault when
    it is known (else ``None``)."""

    def __init__(self, message, rank=None):
        super().__init__(message)
        self.rank = rank


class PeerFailedError(DistributedError):
    """Another rank's load failed, or its loop stopped, before the load ended."""


class PeerLostError(DistributedError):
    """Another rank died or stopped answering within the timeout."""


class GroupMismatchError(DistributedError, UsageError):
    """The ranks passed different checkpoints or options (raised before any data moves)."""


# Default wait for a peer (per window: a status exchange or a transfer).
DEFAULT_TIMEOUT = 20.0
# A status: a code byte and a message.
_STATUS_BYTES = 1024
_OK, _FAILED, _STOPPED = 0, 1, 2

# Header dtype -> torch dtype name: safetensors' table the writer uses, read the other way (F4
# packs two values a byte: viewed apart, `torch_packed_dtype`).
_TORCH_NAMES = {header: torch_name for torch_name, header in _DTYPES.items() if header != "F4"}


def _torch():
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("group=: torch.distributed is not initialized (call dist.init_process_group first)")
    return torch, dist


def _view_as(torch, flat, name, dtype, shape):
    """The bytes ``flat`` (1-D uint8) as a tensor of ``dtype`` (a weightstream dtype name) and
    ``shape``, without a copy."""
    if dtype in ("F4", "F6_E2M3", "F6_E3M2"):
        tdt, storage = torch_packed_dtype(name, dtype, shape)
        return flat.reshape(storage).view(tdt)
    tdt = getattr(torch, _TORCH_NAMES.get(dtype, ""), None)
    if tdt is None:
        raise UsageError(f"tensor `{name}` is {dtype}: this torch has no dtype for it")
    return flat.view(tdt).reshape(shape)


def _storage_refs(buf):
    """References to ``buf``'s storage object (torch keeps one Python object per storage: a
    caller holding ``t.untyped_storage()`` of a tensor handed out holds this one)."""
    return sys.getrefcount(buf.untyped_storage())


def _unused(torch, buf, refs):
    """Whether nothing but ``buf`` itself holds its memory: no tensor handed out of it lives
    (torch's count of the storage's owners: ``buf`` and the storage object asked) and nobody
    holds its storage object (``refs``: its references when ``buf`` was made). Where this torch
    lacks the count: never, and every window gets new memory."""
    try:
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2 and _storage_refs(buf) <= refs
    except (AttributeError, RuntimeError):
        return False


def node_group(node=None):
    """This rank's node-local group: the ranks whose ``node`` (default: the host name) equals
    this one's. Collective over the default group: every rank of the job calls it, in the same
    order as its other group creations. Pass the result as ``group=`` so that each node reads
    a checkpoint once and shares it inside the node.

    Example::

        >>> g = node_group()                        # every rank   # doctest: +SKIP
        >>> g = node_group(node=rank // 8)          # 8 ranks a node, named by hand  # doctest: +SKIP
    """
    _, dist = _torch()
    node = socket.gethostname() if node is None else node
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    order = list(dict.fromkeys(nodes))
    groups = [[r for r, n in enumerate(nodes) if n == m] for m in order]
    mine, _ = dist.new_subgroups_by_enumeration(groups)
    return mine


def plan_on_first_rank(group, make_plan, files):
    """For a framework whose ranks share reads: rank 0 of ``group`` (gloo: the framework's TP
    ``cpu_group``) runs ``make_plan()`` from the headers, and one ``all_gather_object`` hands
    every rank its result, with each rank's host name and ``files``, so that every rank takes
    the same decision. Returns ``(plan, hosts, files of each rank)``; a failure on rank 0 raises
    there and, on the others, :class:`PeerFailedError` naming rank 0 (they do not wait)."""
    _, dist = _torch()
    mine = error = None
    if dist.get_rank(group) == 0:
        try:
            mine = {"plan": make_plan()}
        except Exception as e:  # the others must hear of it, not wait in the gather
            error, mine = e, {"error": f"{type(e).__name__}: {e}"}
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (socket.gethostname(), files, mine), group=group)
    if error is not None:
        raise error
    head = gathered[0][2]
    if "error" in head:
        raise PeerFailedError(f"TP rank 0 failed to read the checkpoint's headers: {head['error']}", rank=0)
    return head["plan"], sorted({host for host, _, _ in gathered}), [theirs for _, theirs, _ in gathered]


class GroupIterator:
    """The ``(name, tensor)`` stream of a group load (see the module's doc). Attributes, final
    once it is exhausted: ``bytes_read`` (data bytes this rank read from storage), ``bytes_sent``
    (bytes it delivered to peers: a broadcast of n bytes to k peers counts n*k), and
    ``bytes_received``. Close it (or use it as a context manager) when stopping early: the
    other ranks then raise :class:`PeerFailedError` at once instead of waiting for the timeout.
    """

    def __init__(self, loader, path, group, *, window, framework, dtype, only, shard, split, timeout, keep=False):
        torch, dist = _torch()
        if O.framework(framework) != "pt":
            raise UsageError("group=: distributed loads yield torch tensors (framework='pt')")
        self.bytes_read = self.bytes_sent = self.bytes_received = 0
        self._torch, self._dist = torch, dist
        self._loader = loader
        self._path = path
        self._group = dist.group.WORLD if group is None else group
        self._timeout = O.seconds(timeout, "timeout", allow_none=False)
        self._window = O.size(window, "window")
        self._opts = O.opts(dtype, only, shard, split)
        self._keep = keep
        # What every rank must agree on, normalized (`"bf16"` and `"BF16"` are one dtype).
        self._spec = {"path": path, "dtype": self._opts["dtype"], "only": self._opts["only"],
                      "split": self._opts["split"],
                      "shard world": None if self._opts["shard"] is None else self._opts["shard"][1],
                      "window": self._window, "timeout": self._timeout,
                      "device type": loader.device.split(":")[0]}
        self._yielded = 0
        self._next_window = None  # the window whose exchange comes next, when one does
        self._lost = False
        self._started = False
        self._windows = []
        self._pid = os.getpid()
        # Set up now (collective: every rank of the group makes its iterator), so that an
        # iterator closed before its first tensor still tells the others.
        try:
            self._setup()
        except BaseException:
            # The error's traceback holds this iterator: not the groups too (see `_release`).
            self._release()
            raise
        # The generator holds a weak proxy of this iterator, not the iterator: no reference cycle,
        # so a caller's loop that raises drops the iterator at once and __del__ tells the group.
        self._gen = GroupIterator._run(weakref.proxy(self))
        _side_groups.live.add(self)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self, why=None):
        """Stop: the other ranks learn it at their next status exchange."""
        self._why = why
        if not self._started and not self._lost and self._windows:
            # Never iterated: the others wait in the first window's exchange.
            self._started = True
            try:
                self._exchange(f"{why or 'its iterator was closed'} (before its first tensor)", _STOPPED)
            except DistributedError:
                pass
        self._gen.close()
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.close(None if kind is None else f"its loop raised {kind.__name__}: {value}")

    def __del__(self):
        if getattr(self, "_gen", None) is not None:
            self.close()

    def _lose(self):
        """A peer is lost: no farewell exchange, and the side group, out of step now, is not
        handed to a later load."""
        self._lost = True
        side = getattr(self, "_side", None)
        if side is not None:
            _side_groups.retire(side)

    def _release(self):
        """The load is over (done, failed or closed): this iterator lets go of the process
        groups, so that the side group lives as long as the registry keeps it (to exit)."""
        self._side = self._moves = None

    # The group's status, once a window.

    def _exchange(self, error=None, code=_OK):
        """All-gather this rank's status on the side group: raise the first failure (this
        rank's own ``error`` first, after the others have learnt of it)."""
        torch, dist = self._torch, self._dist
        mine = torch.zeros(_STATUS_BYTES, dtype=torch.uint8)
        if error is not None:
            shown = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            text = (shown or "?").encode("utf-8", "replace")[: _STATUS_BYTES - 1]
            mine[0] = code
            mine[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        out = [torch.empty_like(mine) for _ in range(self._n)]
        try:
            dist.all_gather(out, mine, group=self._side)
        except Exception as e:
            self._lose()
            raise PeerLostError(
                f"{self._path}: a rank of the group died or did not answer within {self._timeout:g} s "
                f"(status exchange before window {self._next_window}): {e}"
            ) from None
        if isinstance(error, BaseException):
            self._lost = True  # the others know: no farewell exchange
            raise error
        for i, st in enumerate(out):
            r = self._side_to_group[i]
            if r != self._me and int(st[0]) != _OK:
                text = bytes(st[1:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
                what = "failed" if int(st[0]) == _FAILED else "stopped"
                self._lost = True  # rank r has left the exchanges: no farewell exchange
                raise PeerFailedError(f"{self._path}: rank {r} of the group {what}: {text}", rank=r)

    def _wait(self, works, k):
        """Wait for window ``k``'s transfers, at most ``timeout`` seconds in all: gloo's works
        wait with a timeout (its point-to-point works report completion only from ``wait``);
        NCCL's ``wait`` would only order streams, so their completion is polled."""
        deadline = time.monotonic() + self._timeout
        for w in works:
            if self._gloo_moves:
                left = max(deadline - time.monotonic(), 0.001)
                try:
                    w.wait(timeout=datetime.timedelta(seconds=left))
                except Exception as e:
                    self._lose()
                    late = time.monotonic() >= deadline
                    raise PeerLostError(
                        f"{self._path}: window {k}'s transfers "
                        + (f"did not end within {self._timeout:g} s" if late else "failed")
                        + f" (a rank of the group died or stopped answering): {e}"
                    ) from None
                continue
            while not w.is_completed():
                if time.monotonic() > deadline:
                    self._lose()
                    raise PeerLostError(
                        f"{self._path}: window {k}'s transfers did not end within {self._timeout:g} s "
                        "(a rank of the group died or stopped answering)"
                    )
                time.sleep(0.0002)
            try:
                w.wait()
            except Exception as e:
                self._lose()
                raise PeerLostError(f"{self._path}: window {k}'s transfers failed (a rank died?): {e}") from None

    # One window: its places, this rank's reads, the transfers.

    def _places(self, k):
        """Window ``k``'s buffer and this rank's own tensors of it, and this rank's reads
        into them (or the error they raised)."""
        torch = self._torch
        first, end, buffer_len, _, _ = self._windows[k]
        buf, own, pooled = None, {}, None
        try:
            buf, whole, refs = self._buffer(buffer_len)
            pooled = (whole, refs)
            for key in range(first, end):
                _, _, _, nbytes, needers, reader = self._keys[key]
                if reader is not None and self._me in needers:
                    own[key] = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
            places = [
                (buf if in_buf else own[key])[at : at + n] for key, in_buf, at, n in self._share.reads(k)
            ]
            self.bytes_read += self._share.read(k, places)
            error = None
        except Exception as e:  # told to the group at the next exchange, then raised
            error = e
        return buf, own, error, pooled

    def _buffer(self, n):
        """A window buffer of ``n`` bytes: one of this load's earlier buffers when every tensor
        of it is gone (fresh host memory costs its page faults again: as much as the read), else
        a new one. Three are alive at most: the window being read, the one moving, and the one
        whose last tensor the caller's loop still holds while it asks for the next. A new host
        buffer for a window of at least half a part is made a part long, so that it serves the
        later windows too; a smaller window, a device (whose allocator reuses memory itself) or
        a load whose tensors are all kept (``load_file``) gets exactly its size."""
        torch = self._torch
        for i, (b, refs) in enumerate(self._pool):
            if b.numel() >= n and _unused(torch, b, refs):
                self._pool.pop(i)
                return b[:n], b, refs
        # None is free: the older ones the caller still holds are theirs now.
        self._pool = self._pool[-1:]
        host = not self._device.startswith("cuda")
        size = max(n, self._part) if host and not self._keep and n >= self._part // 2 else n
        b = torch.empty(size, dtype=torch.uint8, device=self._device)
        return b[:n], b, _storage_refs(b)

    def _transfers(self, k, buf, own):
        dist = self._dist
        first, end, _, _, chunks = self._windows[k]
        works = []
        for reader, a, b in chunks:
            if b > a:
                works.append(dist.broadcast(buf[a:b], src=self._ranks[reader], group=self._moves, async_op=True))
                if reader == self._me:
                    self.bytes_sent += (b - a) * (self._n - 1)
                else:
                    self.bytes_received += b - a
        for key in range(first, end):
            _, _, _, nbytes, needers, reader = self._keys[key]
            if reader is None or len(needers) < 2 or nbytes == 0:
                continue
            if reader == self._me:
                for r in needers:
                    if r != self._me:
                        works.append(dist.isend(own[key], dst=self._ranks[r], group=self._moves, tag=key))
                        self.bytes_sent += nbytes
            elif self._me in needers:
                works.append(dist.irecv(own[key], src=self._ranks[reader], group=self._moves, tag=key))
                self.bytes_received += nbytes
        return works

    def _items(self, k, buf, own):
        first, end, _, offsets, _ = self._windows[k]
        for key in range(first, end):
            name, dtype, shape, nbytes, needers, reader = self._keys[key]
            if self._me not in needers:
                continue
            at = offsets[key - first]
            flat = buf[at : at + nbytes] if at is not None else own.pop(key)
            yield name, _view_as(self._torch, flat, name, dtype, shape)

    def _setup(self):
        dist = self._dist
        g = self._group
        self._me, self._n = dist.get_rank(g), dist.get_world_size(g)
        if self._me < 0:
            raise UsageError("group=: this process is not a member of the group")
        # Global ranks (torch before 2.6 names peers by them), and the side group's order (new_group
        # sorts its ranks) as the caller's group ranks.
        ranks = self._ranks = dist.get_process_group_ranks(g)
        self._side_to_group = [ranks.index(r) for r in sorted(ranks)]
        try:
            self._side = _side_groups.side_group(dist, sorted(ranks), self._timeout)
            # Before any data moves: the same checkpoint and options everywhere.
            gathered = [None] * self._n
            dist.all_gather_object(gathered, (self._spec, self._opts["shard"]), group=self._side)
        except Exception as e:
            self._lose()
            raise PeerLostError(f"{self._path}: a rank of the group did not answer the options exchange: {e}") from None
        specs = [None] * self._n
        for i, got in enumerate(gathered):
            specs[self._side_to_group[i]] = got
        for r, (spec, _) in enumerate(specs):
            differ = sorted(k for k in set(spec) | set(self._spec) if spec.get(k) != self._spec.get(k))
            if differ:
                shown = ", ".join(f"{k}: {spec.get(k)!r} on rank {r}, {self._spec.get(k)!r} on rank {self._me}"
                                  for k in differ)
                raise GroupMismatchError(f"{self._path}: the ranks of the group load differently ({shown})", rank=r)
        if str(dist.get_backend(g)).lower() == "nccl" and self._spec["device type"] != "cuda":
            raise UsageError(
                f"group=: an NCCL group moves CUDA tensors; this loader loads to {self._loader.device} "
                "(use a gloo group, or Loader(device=f'cuda:{local_rank}'))"
            )
        # Which backend moves the tensors: gloo for host tensors, or when it is the group's.
        backend = str(dist.get_backend(g)).lower()
        self._gloo_moves = self._spec["device type"] != "cuda" or "nccl" not in backend
        # Tensors gloo moves go through the side group too: a transfer a frozen peer never
        # answers then ends at the short timeout, not at the caller's group's (30 minutes for
        # gloo), which `destroy_process_group` would wait out.
        self._moves = self._side if self._gloo_moves else g
        shards = [s for _, s in specs]
        raw = self._loader._raw
        # Three windows' buffers at most (see `_buffer`): each holds a third of the window.
        part = self._part = max(self._window // 3, 1)
        self._pool = []
        # The first rank reads the headers and hands them over.
        box = [None]
        share = None
        if self._me == 0:
            try:
                share = group_share(raw, self._path, None, self._opts, shards, 0, part)
                box[0] = ("ok", share.take_headers())
            except Exception as e:
                box[0] = ("error", f"{type(e).__name__}: {e}")
                error = e
        try:
            dist.broadcast_object_list(box, src=self._ranks[0], group=self._side)
        except Exception as e:
            self._lose()
            raise PeerLostError(f"{self._path}: the group's first rank did not hand over the headers: {e}") from None
        status, payload = box[0]
        if status != "ok":
            if self._me == 0:
                raise error
            raise PeerFailedError(f"{self._path}: rank 0 of the group could not open it: {payload}", rank=0)
        error = None
        if self._me != 0:
            try:
                share = group_share(raw, self._path, payload, self._opts, shards, self._me, part)
            except Exception as e:
                error = e
        if error is None:
            try:
                for name, dtype, shape, _, needers, _ in share.keys():
                    if self._me in needers and dtype in ("F6_E2M3", "F6_E3M2"):
                        _view_as(self._torch, None, name, dtype, shape)  # raises: no torch dtype
            except Exception as e:  # told to the group like an open that failed
                error = e
        self._next_window = 0
        self._exchange(error, _FAILED)
        self._share = share
        self._keys = share.keys()
        self._windows = share.windows()
        self._device = self._loader.device

    def _run(self):
        self._started = True
        count = len(self._windows)
        done = False
        try:
            state = self._places(0) if count else None
            for k in range(count):
                buf, own, error, pooled = state
                self._next_window = k
                self._exchange(error, _FAILED)
                works = self._transfers(k, buf, own)
                # The next window is read while this one moves.
                state = self._places(k + 1) if k + 1 < count else None
                self._wait(works, k)
                self._next_window = k + 1 if k + 1 < count else None
                item = None
                for item in GroupIterator._items(self, k, buf, own):  # the proxy: no cycle
                    self._yielded += 1
                    yield item
                item = None  # the last tensor handed out is the caller's alone: the buffer can come back
                if pooled is not None and not self._keep:
                    self._pool.append(pooled)
                del buf, own, works, pooled
            done = True
            self._pool = []
        finally:
            if not done and not self._lost and self._next_window is not None:
                # Stopped early (closed, or the loop raised): tell the others, who are about to
                # exchange before the next window, so they raise now rather than at the timeout.
                why = getattr(self, "_why", None) or "its iterator was closed"
                try:
                    self._exchange(f"{why} after {self._yielded} tensors", _STOPPED)
                except DistributedError:
                    pass
            self._release()


def iterate(path, group=None, *, device="cpu", window="1GiB", framework="pt", dtype=None, only=None, shard=None,
            split=None, timeout=DEFAULT_TIMEOUT, storage_options=None, loader=None, keep=False):
    """The group load of ``path`` on every rank of ``group`` (default: the default group): a
    :class:`GroupIterator` of ``(name, tensor)``. ``loader`` (a :class:`weightstream.Loader`)
    sets the device and read options; else one is made for ``device`` and ``storage_options``.
    ``window`` bounds the host (or device) memory of a rank's windows: three buffers of a third of
    it at most (the one read, the one moving, the one whose last tensor the caller still holds).
    ``keep=True`` says the caller keeps every tensor (as :func:`load_file` does): each window
    then gets a buffer of exactly its size, none reused."""
    from ._loader import Loader

    if loader is None:
        loader = Loader(device, storage_options=storage_options)
    # No local check of the path: the group's first rank opens it and tells the others.
    return GroupIterator(loader, O.path(path), group, window=window, framework=framework, dtype=dtype,
                         only=only, shard=shard, split=split, timeout=timeout, keep=keep)


def load_file(path, group=None, *, device="cpu", **kwargs):
    """:func:`iterate`, collected into ``{name: tensor}``."""
    with iterate(path, group, device=device, keep=True, **kwargs) as it:
        return dict(it)
