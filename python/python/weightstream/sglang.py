"""SGLang: its safetensors weight iterators read through weightstream (opt-in).

SGLang calls every ``sglang.srt.plugins`` entry point in each of its processes
(``sglang.srt.plugins.load_plugins()``: the launcher, the schedulers, the workers). Ours is
:func:`register`. It does nothing unless the plugin is asked for, so that installing the
package never changes SGLang by itself:

- ``WEIGHTSTREAM_SGLANG=1`` (or ``true``/``yes``/``on``) turns it on;
- ``SGLANG_PLUGINS`` naming ``weightstream`` (SGLang's own whitelist, comma-separated) also turns
  it on, since naming a plugin there is an explicit request;
- ``WEIGHTSTREAM_SGLANG=0`` (or ``false``/``no``/``off``) keeps it off even then. Any other value
  is a :class:`~weightstream.UsageError`.

When ``SGLANG_PLUGINS`` is set and does not name ``weightstream``, SGLang never loads our entry
point, whatever ``WEIGHTSTREAM_SGLANG`` says.

Usage (one line)::

    WEIGHTSTREAM_SGLANG=1 python -m sglang.launch_server --model-path MODEL

or ``sglang.Engine(model_path=MODEL)`` in a process whose environment has it (SGLang's
subprocesses inherit the environment, and each calls ``load_plugins()``).

How: REPLACE hooks through SGLang's ``HookRegistry`` on
``sglang.srt.model_loader.weight_utils.safetensors_weights_iterator`` and
``buffered_multi_thread_safetensors_weights_iterator``. ``HookRegistry.apply_hooks()`` sets the
module attribute and also rebinds every ``from weight_utils import ...`` copy already imported
(``sglang.srt.model_loader.loader`` holds one), so ``DefaultModelLoader`` reaches ours. Why hooks
rather than a loader class passed as ``load_format``: SGLang's ``LoadFormat`` enum refuses a new
name, so a class could only be given from Python (``Engine(load_format=Cls)``), never from
``launch_server``'s command line; and the hooks keep everything else of SGLang's own loading
(finding and downloading the files, the index filter, ``SGLANG_SORT_WEIGHT_FILES``, MTP/draft
filters, ``--model-loader-extra-config``, quantization and post-processing) with only the file
reads swapped, for every loader that reads through these two functions.

What the hooked iterators yield, against SGLang 0.5.23's own:

- the same ``(name, tensor)`` pairs, files in the order given, each file's tensors in sorted
  name order (what ``safe_open(...).keys()`` and ``sorted(state_dict)`` give SGLang), the
  checkpoint's stored dtype, contiguous, on the CPU;
- every argument of both functions: ``disable_mmap`` (we never map files, so it changes
  nothing), ``prefetch`` and ``prefetch_num_threads`` (SGLang's own page-cache prefetch thread,
  split across local ranks as SGLang does; skipped when ``disable_mmap`` is set, as SGLang skips
  it, or when reading with ``direct``, which bypasses the page cache), ``drop_cache_after_load``
  (SGLang's own ``posix_fadvise(DONTNEED)`` after each file; safe here since our tensors own
  their memory) and ``max_workers`` (checked to be a positive int as SGLang's thread pool does;
  not used: weightstream reads each file with its own reader threads, see ``threads``).
  :func:`register` checks that this SGLang's signatures are the ones supported; if not, it
  raises and SGLang (which logs a failing plugin and goes on) keeps its own iterators.

Tensor parallelism (TP > 1): the ranks of SGLang's tensor-parallel group share the reads of the
model's weights: each byte of the checkpoint is read from storage by one rank and broadcast to the
others through the TP group's gloo ``cpu_group`` (:meth:`weightstream.Loader.iterate` with
``group=``; these iterators yield host tensors); every rank still gets every tensor, and SGLang's
weight loaders keep its slice, as with its own iterators. The two iterators receive only files and
flags, and they are module-wide functions that other code calls too (the bitsandbytes loader, LoRA
adapters), where a collective could wait forever on a rank that never makes the same call. So the
group comes from an AROUND hook of ``DefaultModelLoader._get_weights_iterator``, set (in a
context variable) only while SGLang's loader calls them for the model's own weights
(``Source.init_new``: a startup load, ``commit_model_weights``, ``update_weights_from_disk``),
which SGLang itself treats as collective over its ``LoadConfig.load_group`` (its instanttensor
iterator loads through that group: the world at startup, the PP stage's TP group for updates),
and the TP group is within it; a ``load_group`` of None, or an explicit one that does not hold
the TP group, shares nothing. Every other call reads for itself, as before. TP rank 0 reads the
headers and plans for the group (one gather on the ``cpu_group``, with every rank's host and
files). Each rank reads for itself, as SGLang does, with ``"share_reads": false`` (set it the
same on every rank: SGLang's processes inherit the environment), when the group spans several
hosts (nodes do not exchange weights), and when the ranks were given different sets of files;
the same files in another order (``SGLANG_SORT_WEIGHT_FILES`` > 0 staggers them by TP rank) are
read in rank 0's order. A rank that fails mid-load makes the others raise
:class:`~weightstream.PeerFailedError` (or :class:`~weightstream.PeerLostError` for a rank that
dies or hangs) rather than wait for SGLang's collective timeouts. The figures of the last
iterator (``group_size``, ``bytes_read``, ``bytes_sent``, ``bytes_received``, ``bytes_loaded``,
``files``, ``seconds``) are in :data:`last_stats`, and each shared load logs a line with them.

Memory: one file at a time, at most ``window`` bytes loaded ahead of what SGLang still holds,
plus the tensors that arrive ahead of their turn in name order. Files written by safetensors
(``save_file``, ``save_pretrained``) store tensors by dtype, then by name, so a single-dtype file
holds none back; in a mixed-dtype file the tensors of the dtypes stored first wait (copied out of
the stream's buffer, so each costs its own size) until their names come up: at worst one file,
still less than SGLang's default multi-threaded iterator, which holds ``max_workers + 2`` whole
files. ``"order": "file"`` yields in file order instead: nothing waits, memory stays within the
window, and the pairs are the same (only their order differs).

Speed: on the CPU, SGLang's own iterators hand out lazy views of a memory map, so a warm load's
one copy is the model's own ``copy_`` out of the page cache; ours reads each tensor into memory
first, which costs a second copy (not benchmarked against SGLang; the same trade-off in vLLM's
loop is measured in BENCHMARKS.md, "Frameworks and the safetensors drop-in on the CPU"). What ours brings is no memory map (a file truncated or replaced under a
load is an error naming it, not a SIGBUS), memory bounded by the window rather than
``max_workers + 2`` files, and large parallel or O_DIRECT reads for cold storage. Yielding the
tensors on the GPU, where streaming pays most, is not what SGLang's two iterators do and is left
for later.

Options: ``WEIGHTSTREAM_SGLANG_OPTIONS``, a JSON object (every key optional), read when the
iterator is called:

=================  ===================================================================
``window``         bytes loaded ahead (default ``"1GiB"``, or the file's largest
                   tensor if that is more); at least the largest tensor.
``staging``        size of each staging buffer (``"4MiB"``; default per target).
``staging_count``  number of staging buffers (default 8).
``read_size``      bytes of one read request (``"2MiB"``; default: the engine's).
``threads``        reader threads (default: the read engine's).
``io``             ``"auto"``, ``"pread"`` or ``"uring"``.
``direct``         read with O_DIRECT, past the page cache (default false).
``order``          ``"name"`` (default: SGLang's order) or ``"file"`` (see above).
``timeout``        seconds a TP rank sharing reads waits for a peer in a window before it
                   raises (default 20; raise it for slow stores).
``share_reads``    at TP > 1, the TP ranks share the reads (default true; see above);
                   ``false``: each rank reads everything, with no collective.
=================  ===================================================================

An unknown key or a bad value raises :class:`~weightstream.UsageError` naming it, and stops the
load (the plugin was asked for: it does not quietly fall back). Errors in ``register()`` itself (a
bad ``WEIGHTSTREAM_SGLANG`` value, or an SGLang whose iterators' signatures differ from those
tested) are raised there too, but SGLang's ``load_plugins`` catches a plugin's error, logs it and
goes on with its own iterators: check the log for ``weightstream`` when the plugin seems off.

Example (in-process, as the tests do)::

    >>> import os; os.environ["WEIGHTSTREAM_SGLANG"] = "1"                   # doctest: +SKIP
    >>> from sglang.srt.plugins import load_plugins                          # doctest: +SKIP
    >>> load_plugins()                                                       # doctest: +SKIP
    >>> from sglang.srt.model_loader import weight_utils                     # doctest: +SKIP
    >>> for name, t in weight_utils.safetensors_weights_iterator(files):    # doctest: +SKIP
    ...     params[name].data.copy_(t)
"""

import contextvars
import inspect
import json
import logging
import os
import time

from . import _options as O
from ._errors import FormatError, UsageError
from ._loader import Loader

logger = logging.getLogger(__name__)

#: Turns the plugin on (``1``/``true``/``yes``/``on``) or off (``0``/``false``/``no``/``off``).
ENV_ENABLE = "WEIGHTSTREAM_SGLANG"
#: A JSON object of options (see the module's documentation).
ENV_OPTIONS = "WEIGHTSTREAM_SGLANG_OPTIONS"
#: The entry point's name under ``sglang.srt.plugins``, as ``SGLANG_PLUGINS`` names it.
PLUGIN_NAME = "weightstream"

WEIGHT_UTILS = "sglang.srt.model_loader.weight_utils"
#: The method wrapped (AROUND) to hand the tensor-parallel group to the iterators it calls.
GET_WEIGHTS_ITERATOR = "sglang.srt.model_loader.loader.DefaultModelLoader._get_weights_iterator"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_OPTION_KEYS = (
    "window", "staging", "staging_count", "read_size", "threads", "io", "direct", "order", "share_reads", "timeout",
)
_ORDERS = ("name", "file")
_DEFAULT_WINDOW = 1 << 30


def enabled(environ=None):
    """Whether the plugin is asked for: ``WEIGHTSTREAM_SGLANG`` if it is set (not empty), else
    whether ``SGLANG_PLUGINS`` names ``weightstream``.

    Example::

        >>> enabled({"SGLANG_PLUGINS": "foo, weightstream"})
        True
        >>> enabled({"WEIGHTSTREAM_SGLANG": "0", "SGLANG_PLUGINS": "weightstream"})
        False
        >>> enabled({})
        False
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_ENABLE, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if raw:
        raise UsageError(
            f"{ENV_ENABLE}={env.get(ENV_ENABLE)!r}: expected one of {', '.join(_TRUE)} (on) or "
            f"{', '.join(_FALSE)} (off)"
        )
    # The same parsing as SGLang's own whitelist (sglang.srt.plugins.load_plugins_by_group).
    allowed = {x.strip() for x in env.get("SGLANG_PLUGINS", "").split(",") if x.strip()}
    return PLUGIN_NAME in allowed


class _Options:
    """Parsed ``WEIGHTSTREAM_SGLANG_OPTIONS``."""

    def __init__(self, window, order, loader, share_reads=True, timeout=None):
        self.window = window
        self.order = order
        self.loader = loader
        self.share_reads = share_reads
        self.timeout = timeout


def parse_options(text):
    """Parse the ``WEIGHTSTREAM_SGLANG_OPTIONS`` JSON text (``None`` or empty: the defaults);
    a bad key or value raises :class:`~weightstream.UsageError` naming it.

    Example::

        >>> parse_options('{"window": "256MiB", "order": "file"}').window
        268435456
        >>> parse_options('{"windw": 1}')
        Traceback (most recent call last):
        ...
        weightstream._errors.UsageError: WEIGHTSTREAM_SGLANG_OPTIONS: unknown key 'windw'; valid keys: window, staging, staging_count, read_size, threads, io, direct, order, share_reads, timeout
    """
    if text is None or not text.strip():
        raw = {}
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{ENV_OPTIONS}: not JSON ({e}): {text!r}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{ENV_OPTIONS}: expected a JSON object, got {text!r}")
    for key in raw:
        if key not in _OPTION_KEYS:
            raise UsageError(f"{ENV_OPTIONS}: unknown key {key!r}; valid keys: {', '.join(_OPTION_KEYS)}")

    def what(key):
        return f"{ENV_OPTIONS}[{key!r}]"

    window = None if raw.get("window") is None else O.size(raw["window"], what("window"))
    order = raw.get("order", "name")
    if order not in _ORDERS:
        raise UsageError(f"{what('order')}: expected 'name' or 'file', got {order!r}")
    direct = raw.get("direct", False)
    if not isinstance(direct, bool):
        raise UsageError(f"{what('direct')}: expected true or false, got {direct!r}")
    share_reads = raw.get("share_reads", True)
    if not isinstance(share_reads, bool):
        raise UsageError(f"{what('share_reads')}: expected true or false, got {share_reads!r}")
    io = raw.get("io")
    if io is not None and io not in ("auto", "pread", "uring"):
        raise UsageError(f"{what('io')}: expected 'auto', 'pread' or 'uring', got {io!r}")
    loader = {
        "staging": None if raw.get("staging") is None else O.size(raw["staging"], what("staging")),
        "staging_count": O.count(raw.get("staging_count"), what("staging_count")),
        "read_size": None if raw.get("read_size") is None else O.size(raw["read_size"], what("read_size")),
        "threads": O.count(raw.get("threads"), what("threads")),
        "io": io,
        "direct": direct,
    }
    timeout = O.seconds(raw.get("timeout"), what("timeout"))
    return _Options(window, order, loader, share_reads, timeout)


def _weight_utils():
    import importlib

    return importlib.import_module(WEIGHT_UTILS)


def _show_progress():
    # SGLang's own iterators show their bar on rank 0 only.
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


#: The figures of the last call of one of the hooked iterators in this process (a dict, filled
#: as it streams, final once it is exhausted): ``group_size`` (1 when each rank read for
#: itself), ``bytes_read`` (this rank's reads from storage), ``bytes_sent``,
#: ``bytes_received`` (what it moved through the TP group), ``bytes_loaded`` (what it
#: yielded), ``files``, ``seconds``. ``None`` before the first call.
last_stats = None

# The TP group (SGLang's GroupCoordinator) whose ranks share the reads of the iterator called
# now, set by the AROUND hook of DefaultModelLoader._get_weights_iterator for the duration of
# that call only: other callers of the module-level iterators see None and read for themselves.
_SHARED_GROUP = contextvars.ContextVar("weightstream_sglang_shared_group", default=None)


def _shared_group(loader, source):
    """The TP group whose ranks share the reads of ``loader._get_weights_iterator(source)``, or
    None (each rank reads for itself).

    SGLang treats that method as collective over ``load_config.load_group`` (its
    instanttensor iterator loads through it): the world group at a cold start (every rank
    loads), the PP stage's TP group for updates from disk, None for no group. The TP group in
    effect is within it in every case (a draft's narrowed TP group included), so its ranks all
    make the call, in the same order. Only the model's own weights are shared
    (``Source.init_new``, which sets ``model_config``: startup loads, ``commit_model_weights``
    and ``update_weights_from_disk``); LoRA adapters and secondary sources read per rank."""
    if getattr(source, "model_config", None) is None:
        return None
    load_group = getattr(getattr(loader, "load_config", None), "load_group", None)
    if load_group is None:
        return None
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    try:
        from sglang.srt.configs.load_config import _DEFAULT_LOAD_GROUP
        from sglang.srt.runtime_context import get_parallel

        tp = get_parallel().tp_group
    except Exception:  # no published context (a process without SGLang's groups)
        return None
    if tp is None or getattr(tp, "world_size", 1) <= 1 or getattr(tp, "cpu_group", None) is None:
        return None
    if load_group is not _DEFAULT_LOAD_GROUP:
        # An explicit group: share only within it.
        if not set(tp.ranks) <= set(getattr(load_group, "ranks", ())):
            return None
    return tp


def _around_get_weights_iterator(original, self, source, *args, **kwargs):
    """AROUND hook of ``DefaultModelLoader._get_weights_iterator``: our iterators, which it
    calls (and which read their options and group when called), see the TP group."""
    token = _SHARED_GROUP.set(_shared_group(self, source))
    try:
        return original(self, source, *args, **kwargs)
    finally:
        _SHARED_GROUP.reset(token)


def _plan(loader, files):
    """From the headers: per file ``(path, names sorted, largest tensor's bytes, data bytes)``."""
    plan = []
    for path in files:
        infos = loader.describe(path)
        sizes = [info[4] for info in infos]
        plan.append((path, sorted(info[0] for info in infos), max([0] + sizes), sum(sizes)))
    return plan


def _shared_plan(tp, loader, files):
    """TP rank 0 reads the headers and plans for the group; every rank gets the plan (one
    gather on the group's gloo ``cpu_group``, with each rank's host name and files). Returns the
    plan, or None (each rank then reads for itself, the same decision on every rank) when the
    group spans several hosts or the ranks were given different sets of files."""
    from .distributed import plan_on_first_rank

    plan, hosts, given = plan_on_first_rank(tp.cpu_group, lambda: _plan(loader, files), files)
    if len(hosts) > 1:
        logger.info("weightstream: reads not shared between TP ranks: the group spans %d hosts (%s)",
                    len(hosts), ", ".join(hosts))
        return None
    if any(sorted(theirs) != sorted(given[0]) for theirs in given):
        logger.warning("weightstream: reads not shared between TP ranks: they were given different files")
        return None
    # The same files, maybe in another order (SGLANG_SORT_WEIGHT_FILES > 0 staggers them by TP
    # rank to spread the reads): rank 0's order, since the group reads each file together.
    return plan


def _in_name_order(stream, path, names):
    """One file's ``(name, tensor)`` in sorted name order (SGLang's) from ``stream`` (file
    order): a tensor that lands before its turn waits, copied out of its batch buffer (so that
    it does not keep the whole buffer alive), until the names before it have gone."""
    expected = set(names)
    waiting = {}
    turn = 0
    for name, tensor in stream:
        if name not in expected or name in waiting:
            raise FormatError(f"{path}: tensor `{name}` was not in the header read first: did the file change during the load?")
        if name != names[turn]:
            waiting[name] = tensor.clone()
            del tensor
            continue
        yield name, tensor
        del tensor  # SGLang's copy alone keeps it alive
        turn += 1
        while turn < len(names) and names[turn] in waiting:
            yield names[turn], waiting.pop(names[turn])
            turn += 1
    if turn != len(names):
        raise FormatError(f"{path}: tensor `{names[turn]}` never came: did the file change during the load?")


def _iterate_files(files, opts, tp, *, disable_mmap, prefetch, prefetch_num_threads, drop_cache_after_load, desc):
    global last_stats
    from tqdm.auto import tqdm

    wu = _weight_utils()
    files = [O.path(f) for f in files]
    stats = last_stats = dict.fromkeys(
        ("bytes_read", "bytes_sent", "bytes_received", "bytes_loaded", "files", "seconds"), 0
    )
    stats["group_size"] = 1
    start = time.perf_counter()
    loader = Loader("cpu", **opts.loader)
    plan = None if tp is None else _shared_plan(tp, loader, files)
    group = None
    if plan is not None:
        group = tp.cpu_group  # gloo: these iterators yield host tensors
        stats["group_size"] = tp.world_size
        files = [p[0] for p in plan]
        plan = iter(plan)
    prefetching = None
    # SGLang prefetches only for its mmap path; a direct read would not use the page cache.
    if prefetch and not disable_mmap and not opts.loader["direct"]:
        prefetching = wu._prefetch_all_checkpoints(sorted(files), num_threads=prefetch_num_threads)
    try:
        # SGLang's bar: its format, on rank 0 only.
        bar = tqdm(files, desc=desc, disable=not _show_progress(), bar_format=getattr(wu, "BAR_FORMAT", None))
        for path in bar:
            if plan is not None:
                _, names, largest, stored = next(plan)
            else:
                (_, names, largest, stored), = _plan(loader, [path])
            window = opts.window
            if window is None:
                window = max(_DEFAULT_WINDOW, largest)
            if group is None:
                it = loader.iterate(path, window=window)
            else:
                it = loader.iterate(path, window=window, group=group, timeout=opts.timeout)
            try:
                pairs = it if opts.order == "file" else _in_name_order(it, path, names)
                for name, tensor in pairs:
                    stats["bytes_loaded"] += tensor.nbytes
                    yield name, tensor
                    del tensor
            finally:
                it.close()  # with a group, a rank that stops early tells the others
            if group is None:
                stats["bytes_read"] += stored
            else:
                stats["bytes_read"] += it.bytes_read
                stats["bytes_sent"] += it.bytes_sent
                stats["bytes_received"] += it.bytes_received
            stats["files"] += 1
            stats["seconds"] = time.perf_counter() - start
            if drop_cache_after_load:
                wu._drop_file_cache_after_load(path)
    finally:
        if prefetching is not None:
            prefetching.stop()
    if group is not None:
        logger.info(
            "weightstream: TP rank %d of %d sharing reads: read %.2f GiB, sent %.2f GiB, received %.2f GiB "
            "of %.2f GiB in %.2f s",
            tp.rank_in_group, tp.world_size, stats["bytes_read"] / 2**30, stats["bytes_sent"] / 2**30,
            stats["bytes_received"] / 2**30, stats["bytes_loaded"] / 2**30, stats["seconds"],
        )


def _group_for(opts):
    return _SHARED_GROUP.get() if opts.share_reads else None


def safetensors_weights_iterator(
    hf_weights_files,
    disable_mmap=False,
    prefetch=False,
    prefetch_num_threads=4,
    drop_cache_after_load=False,
):
    """SGLang's ``weight_utils.safetensors_weights_iterator``, read by weightstream: yields
    ``(name, tensor)`` for every tensor of ``hf_weights_files`` (files in that order, names
    sorted within each file), CPU tensors of the stored dtype. The options (and, when SGLang's
    loader calls it for a model's weights at TP > 1, the TP group that shares the reads) are
    taken now (a bad option raises here); the files are read as the iterator is consumed.

    Example::

        >>> for name, t in safetensors_weights_iterator(["model.safetensors"]):   # doctest: +SKIP
        ...     params[name].data.copy_(t)
    """
    opts = parse_options(os.environ.get(ENV_OPTIONS))
    return _iterate_files(
        hf_weights_files,
        opts,
        _group_for(opts),
        disable_mmap=disable_mmap,
        prefetch=prefetch,
        prefetch_num_threads=prefetch_num_threads,
        drop_cache_after_load=drop_cache_after_load,
        desc="Loading safetensors checkpoint shards (weightstream)",
    )


def buffered_multi_thread_safetensors_weights_iterator(
    hf_weights_files,
    max_workers,
    disable_mmap=False,
    prefetch=False,
    prefetch_num_threads=4,
    drop_cache_after_load=False,
):
    """SGLang's ``weight_utils.buffered_multi_thread_safetensors_weights_iterator``, read by
    weightstream: the same pairs in the same order as :func:`safetensors_weights_iterator`.
    ``max_workers`` must be a positive int, as SGLang's thread pool requires; weightstream reads
    one file at a time with its own reader threads, so memory is one window, not
    ``max_workers + 2`` files.

    Example::

        >>> it = buffered_multi_thread_safetensors_weights_iterator(files, max_workers=8)  # doctest: +SKIP
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
        raise UsageError(f"max_workers: expected a positive int, got {max_workers!r}")
    opts = parse_options(os.environ.get(ENV_OPTIONS))
    return _iterate_files(
        hf_weights_files,
        opts,
        _group_for(opts),
        disable_mmap=disable_mmap,
        prefetch=prefetch,
        prefetch_num_threads=prefetch_num_threads,
        drop_cache_after_load=drop_cache_after_load,
        desc="Loading safetensors checkpoint shards (weightstream)",
    )


#: The SGLang functions replaced, by name in ``sglang.srt.model_loader.weight_utils``.
HOOKS = {
    "safetensors_weights_iterator": safetensors_weights_iterator,
    "buffered_multi_thread_safetensors_weights_iterator": buffered_multi_thread_safetensors_weights_iterator,
}


def _check_signature(name, theirs, ours):
    """Ours must take every parameter of theirs, in the same place, with the same default: a
    newer SGLang that adds one is refused here rather than failing inside a load."""
    sig_theirs = inspect.signature(theirs)
    sig_ours = inspect.signature(ours)
    ok = [(p.name, p.kind, p.default) for p in sig_theirs.parameters.values()] == [
        (p.name, p.kind, p.default) for p in sig_ours.parameters.values()
    ]
    if not ok:
        raise UsageError(
            f"weightstream's SGLang plugin supports {WEIGHT_UTILS}.{name}{sig_ours}, but this SGLang's "
            f"is {name}{sig_theirs}: not hooking, SGLang keeps its own iterators (the tested range: "
            'pip install "weightstream[sglang]")'
        )


def register():
    """The ``sglang.srt.plugins`` entry point: when the plugin is asked for (see
    :func:`enabled`), register REPLACE hooks of SGLang's two safetensors iterators, and an
    AROUND hook of ``DefaultModelLoader._get_weights_iterator`` (which hands them the TP group),
    with ``HookRegistry``; SGLang's ``load_plugins()`` applies them right after. Otherwise it
    does nothing.

    Example::

        >>> import os; os.environ["WEIGHTSTREAM_SGLANG"] = "1"      # doctest: +SKIP
        >>> from sglang.srt.plugins import load_plugins              # doctest: +SKIP
        >>> load_plugins()   # finds register() through the entry point, then applies the hooks  # doctest: +SKIP
    """
    if not enabled():
        logger.debug("weightstream's SGLang plugin is off: set %s=1 or name it in SGLANG_PLUGINS", ENV_ENABLE)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    wu = _weight_utils()
    for name, ours in HOOKS.items():
        _check_signature(name, getattr(wu, name), ours)
    for name, ours in HOOKS.items():
        HookRegistry.register(f"{WEIGHT_UTILS}.{name}", ours, HookType.REPLACE)
    # The TP group, for the calls of DefaultModelLoader alone (see _shared_group).
    import importlib

    owner, method = GET_WEIGHTS_ITERATOR.rsplit(".", 1)
    module, cls = owner.rsplit(".", 1)
    if callable(getattr(getattr(importlib.import_module(module), cls, None), method, None)):
        HookRegistry.register(GET_WEIGHTS_ITERATOR, _around_get_weights_iterator, HookType.AROUND)
    else:
        logger.warning("weightstream: this SGLang has no %s: TP ranks will not share reads", GET_WEIGHTS_ITERATOR)
    logger.info("weightstream reads SGLang's safetensors weights (%s)", ", ".join(HOOKS))
