"""vLLM: ``--load-format weightstream``.

vLLM calls every ``vllm.general_plugins`` entry point in each of its processes; ours
(:func:`register`) registers :class:`WeightstreamModelLoader` under the load format
``"weightstream"``. With the package installed (``pip install "weightstream[vllm]"``)::

    vllm serve MODEL --load-format weightstream
    vllm serve MODEL --load-format weightstream \\
        --model-loader-extra-config '{"weights": "s3://bucket/llama-8b/", "window": "512MiB"}'

or in Python ``LLM(model=MODEL, load_format="weightstream", model_loader_extra_config={...})``.
``VLLM_PLUGINS=weightstream`` whitelists this plugin alone.

What it changes, and what it keeps:

- It is vLLM's own ``DefaultModelLoader`` with one part replaced: the files it would read for
  ``--load-format safetensors`` (found, downloaded from the Hugging Face Hub and filtered by vLLM's
  own code: revision, ``--download-dir``, ``--ignore-patterns``, the index, the model's
  ``allow_patterns_overrides``, ``secondary_weights`` and shard filters) are read by
  :meth:`weightstream.Loader.iterate` instead of ``safetensors.safe_open``. The ``(name, tensor)``
  pairs go to ``model.load_weights`` unchanged, so vLLM's per-model logic (stacked qkv/gate-up
  parameters, tensor-parallel narrowing, tied weights, quantized layouts) applies as it does for
  ``safetensors``; the check that every weight was loaded and the post-load processing are vLLM's.
- Tensors land on the model's own device: ``cuda:<local rank>`` (the worker's current device) or
  the CPU; the parameters' ``copy_`` is then a device-to-device copy. Host memory stays bounded by
  the staging ring (GPU) or the ``window`` (CPU) whatever the model's size.
- Tensors keep the checkpoint's stored dtype, as vLLM's safetensors iterator yields them (the
  parameter loaders cast), unless ``dtype`` asks for a conversion while loading.
- With tensor parallelism (TP > 1) the ranks of vLLM's tensor-parallel group share the reads:
  each byte of the checkpoint is read from storage by one rank of the group and broadcast to the
  others through the group (:meth:`weightstream.Loader.iterate` with ``group=``): the TP group's
  ``device_group`` (NCCL) when the tensors land on a GPU, its ``cpu_group`` (gloo) otherwise.
  Every rank still gets every tensor and vLLM's parameter loaders keep its slice, as with
  ``safetensors``. Rank 0 of the group reads the headers and hands the plan (files, tensors to
  skip, window) to the others, so that the ranks' collective calls match. Not shared, each rank
  reading for itself as vLLM's own loader does: with ``"share_reads": false``; when the group
  spans several hosts (nodes do not exchange weights: each reads for itself); and with the
  expert-parallel weight filter on (each rank then reads only its own experts, a set the others
  do not share). A rank that fails mid-load makes the others raise
  :class:`~weightstream.PeerFailedError` (or :class:`~weightstream.PeerLostError` for a rank that
  dies or hangs) instead of waiting for vLLM's collective timeouts.
- Safetensors only: a model whose files vLLM would take as ``.bin``/``.pt`` is a
  :class:`~weightstream.UsageError`; so is a torchao-serialized checkpoint (vLLM rebuilds its
  tensor subclasses in its own iterator: use ``--load-format safetensors`` for those).

Extra config (``--model-loader-extra-config``, a JSON object; every key optional):

=======================  ==============================================================
``weights``              where the weights are read from instead of MODEL's files: an
                         ``s3://``, ``gs://``, ``az://`` or ``http(s)://`` URL of a prefix,
                         an index or a file, or a local path. MODEL (a local directory or
                         an HF repo id) still gives the config and the tokenizer: vLLM's
                         ``ModelConfig`` cannot read an ``https://`` model and sends an
                         ``s3://`` one to Run:ai's streamer.
``storage_options``      ``object_store`` options for ``weights`` (``aws_endpoint``,
                         ``aws_region``, ``allow_http``, ``timeout``, ``max_retries``...),
                         after the ``AWS_*``/``GOOGLE_*``/``AZURE_*`` environment.
``remote_concurrency``   ranged GETs in flight at most (default 8).
``remote_request_size``  bytes of one ranged GET at most (default ``"8MiB"``).
``window``               bytes loaded ahead of the model's copies (default ``"512MiB"``, or
                         the largest tensor if that is more; on a GPU it is device memory);
                         at least the largest tensor.
``staging``              size of each staging buffer (``"16MiB"``; default per target).
``staging_count``        number of staging buffers (default 8).
``read_size``            bytes of one local read request (``"2MiB"``; default: the
                         engine's); a staging buffer is filled by several in parallel.
``io``                   read engine: ``"auto"``, ``"pread"`` or ``"uring"``.
``threads``              reader threads (default: the engine's).
``direct``               read with O_DIRECT, past the page cache (default false).
``dtype``                convert F16/BF16/F32/F64 tensors while loading: ``"bf16"``,
                         ``"f16"``, ``"f32"`` (default: keep the stored dtype, as vLLM).
                         Every float tensor converts, also those a model keeps in another
                         dtype than the rest: leave it unset unless you know the model.
``progress``             a progress bar in bytes (default: vLLM's ``use_tqdm_on_load``).
``zero_copy``            ``true`` is refused for now: handing the stream's device memory
                         to the parameters without a copy needs the one-driver change.
``timeout``              seconds a TP rank sharing reads waits for a peer in a window
                         before it raises (default 20; raise it for slow stores).
``share_reads``          at TP > 1, the ranks of the tensor-parallel group share the reads
                         (default true; see above); ``false``: each rank reads everything.
=======================  ==============================================================

An unknown key or a bad value raises :class:`~weightstream.UsageError` (a ``ValueError``, as
vLLM's own loaders raise) naming the key, when vLLM builds the loader.

Progress: one text bar in bytes on rank 0 (vLLM's own bar format, a line per update, at most
one every 5 s, so that Ray's and multiprocessing's line prefixes stay readable), and one log line
per load through vLLM's logger with the bytes, seconds and GiB/s (and, when reads are shared,
this rank's bytes read, sent and received); vLLM's own "Loading weights took ..." line follows
as for its default loader. The same figures of the last load are kept in the loader's
``last_stats`` dict (``group_size``, ``bytes_read``, ``bytes_sent``, ``bytes_received``,
``bytes_loaded``, ``files``, ``seconds``).

Example (in-process, as the tests do)::

    >>> from vllm.config import LoadConfig                                   # doctest: +SKIP
    >>> from vllm.model_executor.model_loader import get_model_loader       # doctest: +SKIP
    >>> import weightstream.vllm; weightstream.vllm.register()              # doctest: +SKIP
    >>> loader = get_model_loader(LoadConfig(load_format="weightstream",    # doctest: +SKIP
    ...     model_loader_extra_config={"window": "256MiB"}))
    >>> model = loader.load_model(vllm_config=vc, model_config=vc.model_config)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import time

try:
    import torch
    import vllm.model_executor.model_loader as _vllm_loaders
    from vllm.config import get_current_vllm_config_or_none
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight
    from vllm.model_executor.model_loader.weight_utils import _BAR_FORMAT, _natural_sort_key, enable_tqdm
except ImportError as e:  # pragma: no cover - the vLLM tier always has vLLM
    raise ImportError(f"weightstream.vllm needs vLLM: pip install 'weightstream[vllm]' ({e})") from e

from . import _options as O
from ._errors import UsageError
from ._loader import Loader
from .distributed import GroupMismatchError, plan_on_first_rank

__all__ = ["LOAD_FORMAT", "EXTRA_CONFIG_KEYS", "WeightstreamModelLoader", "register"]

LOAD_FORMAT = "weightstream"

# A child of vLLM's "vllm" logger: our lines go through vLLM's handler and format, and
# VLLM_LOGGING_LEVEL / VLLM_CONFIGURE_LOGGING apply to them as to vLLM's own.
logger = init_logger("vllm.weightstream")

EXTRA_CONFIG_KEYS = (
    "weights",
    "storage_options",
    "remote_concurrency",
    "remote_request_size",
    "window",
    "staging",
    "staging_count",
    "read_size",
    "io",
    "threads",
    "direct",
    "dtype",
    "progress",
    "zero_copy",
    "share_reads",
    "timeout",
)

# Bytes loaded ahead of the model's copies: device memory next to the model's on a GPU, host
# memory on the CPU. Half of it is one read batch: big enough to keep the reads long (the
# window made no measurable difference from 160 MiB to 2 GiB on the CPU bench).
_WINDOW = "512MiB"
# Seconds between two progress lines (the bar prints a line per refresh).
_PROGRESS_INTERVAL = 5.0


@dataclasses.dataclass(frozen=True)
class _Options:
    """The extra config, checked."""

    weights: str | None = None
    window: int | None = None
    dtype: str | None = None
    progress: bool | None = None
    share_reads: bool = True
    timeout: float | None = None
    loader: dict = dataclasses.field(default_factory=dict)  # Loader(...) keyword arguments


def _key(name):
    return f"model_loader_extra_config[{name!r}]"


def _bool(value, name):
    if not isinstance(value, bool):
        raise UsageError(f"{_key(name)}: expected true or false, got {value!r}")
    return value


def parse_extra_config(extra):
    """Check vLLM's ``model_loader_extra_config`` for the ``weightstream`` format: a dict of the
    keys in :data:`EXTRA_CONFIG_KEYS`. Raises :class:`~weightstream.UsageError` naming the key
    of an unknown key or a bad value.

    Example::

        >>> parse_extra_config({"window": "256MiB", "io": "pread"}).window
        268435456
        >>> parse_extra_config({"windw": 1})
        Traceback (most recent call last):
        ...
        weightstream._errors.UsageError: model_loader_extra_config: unknown key 'windw' for load format 'weightstream'; valid keys: weights, storage_options, remote_concurrency, remote_request_size, window, staging, staging_count, read_size, io, threads, direct, dtype, progress, zero_copy, share_reads, timeout
    """
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise UsageError(
            f"model_loader_extra_config: expected a JSON object (dict) for load format '{LOAD_FORMAT}', "
            f"got {type(extra).__name__}"
        )
    unknown = [k for k in extra if k not in EXTRA_CONFIG_KEYS]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise UsageError(
            f"model_loader_extra_config: unknown key{'s' if len(unknown) > 1 else ''} {names} for load format "
            f"'{LOAD_FORMAT}'; valid keys: {', '.join(EXTRA_CONFIG_KEYS)}"
        )
    if extra.get("zero_copy") is not None and _bool(extra["zero_copy"], "zero_copy"):
        raise UsageError(
            f"{_key('zero_copy')}: not available yet: handing the stream's tensors to vLLM without a copy "
            "needs the one-driver change (zero-copy through the stream); remove the key (tensors are copied "
            "into vLLM's parameters, as with its own loaders)"
        )
    weights = extra.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights.strip()):
        raise UsageError(f"{_key('weights')}: expected a URL (s3://, gs://, az://, https://) or a path, got {weights!r}")
    loader = {}
    if "storage_options" in extra:
        so = extra["storage_options"]
        if not isinstance(so, dict):
            raise UsageError(f"{_key('storage_options')}: expected a JSON object, got {type(so).__name__}")
        O.storage_options(so)  # value types; the names are checked by the Rust layer when the loader is built
        loader["storage_options"] = so
    for name in ("remote_concurrency", "staging_count", "threads"):
        if extra.get(name) is not None:
            loader[name] = O.count(extra[name], _key(name))
    for name in ("remote_request_size", "staging", "read_size"):
        if extra.get(name) is not None:
            O.size(extra[name], _key(name))
            loader[name] = extra[name]
    if extra.get("io") is not None:
        if extra["io"] not in ("auto", "pread", "uring"):
            raise UsageError(f"{_key('io')}: expected 'auto', 'pread' or 'uring', got {extra['io']!r}")
        loader["io"] = extra["io"]
    if extra.get("direct") is not None:
        loader["direct"] = _bool(extra["direct"], "direct")
    window = None if extra.get("window") is None else O.size(extra["window"], _key("window"))
    dtype = None
    if extra.get("dtype") is not None:
        try:
            dtype = O.dtype(extra["dtype"])
        except UsageError as e:
            raise UsageError(f"{_key('dtype')}: {e}") from None
    progress = None if extra.get("progress") is None else _bool(extra["progress"], "progress")
    share_reads = True if extra.get("share_reads") is None else _bool(extra["share_reads"], "share_reads")
    timeout = O.seconds(extra.get("timeout"), _key("timeout"))
    if weights is not None and "storage_options" in loader and not _is_url(weights):
        raise UsageError(f"{_key('storage_options')}: applies to a remote 'weights' URL; {weights!r} is a local path")
    return _Options(
        weights=weights, window=window, dtype=dtype, progress=progress, share_reads=share_reads, timeout=timeout,
        loader=loader
    )


def _is_url(path):
    scheme, sep, rest = path.partition("://")
    return bool(sep) and bool(rest) and scheme.isalnum()


def _escape_glob(name):
    """``name`` as a glob that matches only itself (the Rust layer's globset escapes with ``\\``)."""
    return "".join("\\" + c if c in "*?[]{}\\!," else c for c in name)


# Bytes per element of the dtypes ``dtype`` converts between.
_WIDTH = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _stored_nbytes(info):
    """The bytes a tensor takes in the file, from :meth:`Loader.describe`'s
    ``(name, dtype, stored_dtype, shape, nbytes)`` (``nbytes`` is after a conversion)."""
    _, dtype, stored, _, nbytes = info
    return nbytes if dtype == stored else nbytes // _WIDTH[dtype] * _WIDTH[stored]


def _target_device(load_config, model):
    """The device vLLM built ``model`` on: ``load_config.device`` or the device config, as
    ``BaseModelLoader.load_model`` picks it (``cuda`` without an index is the worker's current
    device, ``cuda:<local rank>``); a model of another kind (XPU, TPU...) gets host tensors, as
    vLLM's own safetensors iterator yields them."""
    dev = load_config.device
    if dev is None:
        vc = get_current_vllm_config_or_none()
        if vc is not None and vc.device_config is not None:
            dev = vc.device_config.device
    if dev is None:
        param = next(model.parameters(), None)
        dev = param.device if param is not None else "cpu"
    dev = torch.device(dev)
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return "cpu"


class WeightstreamModelLoader(DefaultModelLoader):
    """vLLM's ``DefaultModelLoader`` reading its safetensors files through
    :meth:`weightstream.Loader.iterate` (see the module's docs for the extra config).

    Only the reading is ours: which files (``_prepare_weights``, run as for
    ``--load-format safetensors``), ``load_weights`` (the model's own ``load_weights``, the
    check that every weight was loaded) and ``load_model`` (post-processing) are vLLM's.

    Example::

        >>> from vllm.config import LoadConfig                                     # doctest: +SKIP
        >>> loader = WeightstreamModelLoader(LoadConfig(load_format="weightstream"))  # doctest: +SKIP
        >>> loader.download_model(model_config)                                   # doctest: +SKIP
    """

    def __init__(self, load_config):
        # Not DefaultModelLoader.__init__: it rejects our extra-config keys. Its attributes are
        # set here as it sets them, for the methods we inherit.
        super(DefaultModelLoader, self).__init__(load_config)
        self.local_expert_ids = None
        self._encoder_only_lm_prefixes = None
        self._encoder_only_weights_mapper = None
        self.enable_weights_track = None
        self.options = parse_extra_config(load_config.model_loader_extra_config)
        # vLLM's file selection for "safetensors", run by vLLM's own loader on a copy of the
        # config: the patterns, the Hub download and the index filter are exactly its own.
        self._files = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="safetensors", model_loader_extra_config={})
        )
        self._loaders = {}  # device -> Loader: the staging ring is kept for reloads
        self._primary = None  # model_config.model of the load under way
        self._device = None
        #: The figures of the last load (see the module's docs), filled as it streams.
        self.last_stats = None

    # -- which files --------------------------------------------------------------------------

    def _prepare_weights(self, model_name_or_path, subfolder, revision, fall_back_to_pt, allow_patterns_overrides):
        return self._files._prepare_weights(
            model_name_or_path, subfolder, revision, fall_back_to_pt, allow_patterns_overrides
        )

    def download_model(self, model_config):
        """Download MODEL's safetensors files as vLLM does for ``--load-format safetensors``
        (nothing for a remote ``weights`` location: it streams at load time)."""
        if self.options.weights is not None:
            if not _is_url(self.options.weights) and not os.path.exists(self.options.weights):
                raise UsageError(f"{_key('weights')}: {self.options.weights}: no such file or directory")
            return
        super().download_model(model_config)

    def get_all_weights(self, model_config, model):
        # Which source is the model's own (the `weights` key replaces it) and where tensors go.
        self._primary = model_config.model
        self._device = _target_device(self.load_config, model)
        self.last_stats = dict.fromkeys(
            ("bytes_read", "bytes_sent", "bytes_received", "bytes_loaded", "files", "seconds"), 0
        )
        self.last_stats["group_size"] = 1
        yield from super().get_all_weights(model_config, model)

    # -- reading ------------------------------------------------------------------------------

    def _loader(self):
        dev = self._device or "cpu"
        loader = self._loaders.get(dev)
        if loader is None:
            loader = self._loaders[dev] = Loader(dev, **self.options.loader)
        return loader

    def _paths(self, source):
        """What to stream for ``source``: ``(paths, skip)``: local files as vLLM selected
        them, or the remote location; ``skip(name)`` (or None) says which tensors to skip unread."""
        if self.load_config.safetensors_load_strategy == "torchao":
            raise UsageError(
                "a torchao-serialized checkpoint needs vLLM's own iterator (it rebuilds tensor subclasses): "
                "use --load-format safetensors"
            )
        ep = self.local_expert_ids
        weights = self.options.weights
        if weights is not None and source.model_or_path == self._primary:
            if self._encoder_only_lm_prefixes is not None:
                # vLLM drops the language model's shards by the local index; a remote location
                # has no local index to filter by.
                raise UsageError(f"{_key('weights')}: --mm-encoder-only needs the weights in MODEL's directory")
            # vLLM drops whole local shards the model does not use; remote, we skip those tensors
            # unread instead (the models skip such names themselves when they do arrive).
            unused = source.is_unused_weight
            if ep is None and unused is None:
                return self._remote_paths(weights, source), None
            return self._remote_paths(weights, source), lambda n: should_skip_weight(n, ep) or bool(unused and unused(n))
        # DefaultModelLoader._get_weights_iterator's selection, step by step.
        from vllm.model_executor.model_loader.weight_utils import (
            filter_mm_encoder_only_safetensors_files,
            filter_safetensors_files_by_weight_name,
        )

        hf_folder, files, use_safetensors, index_file = self._prepare_weights(
            source.model_or_path, source.subfolder, source.revision, source.fall_back_to_pt,
            source.allow_patterns_overrides,
        )
        if not use_safetensors:
            raise UsageError(
                f"load format '{LOAD_FORMAT}' reads safetensors files; {source.model_or_path} gives "
                f"{', '.join(os.path.basename(f) for f in files[:3])} (use --load-format auto for .bin/.pt)"
            )
        if self._encoder_only_lm_prefixes is not None and files:
            files = filter_mm_encoder_only_safetensors_files(
                files, hf_folder, index_file, self._encoder_only_lm_prefixes,
                weights_mapper=self._encoder_only_weights_mapper,
            )
            if not files:
                raise RuntimeError(
                    "mm-encoder-only shard filter removed all weight files for "
                    f"`{source.model_or_path}`; check language_model prefixes "
                    f"{self._encoder_only_lm_prefixes}"
                )
        if source.is_unused_weight is not None:
            files = filter_safetensors_files_by_weight_name(files, source.is_unused_weight)
        # One stream per file, in vLLM's order: the files are exactly those vLLM picked.
        # The expert-parallel filter skips other ranks' experts unread, as vLLM's iterator does.
        return sorted(files, key=_natural_sort_key), None if ep is None else (lambda n: should_skip_weight(n, ep))

    def _remote_paths(self, weights, source):
        base = weights.rstrip("/") if _is_url(weights) else weights
        if source.subfolder:
            base = f"{base}/{source.subfolder}" if _is_url(base) else os.path.join(base, source.subfolder)
        overrides = source.allow_patterns_overrides
        if overrides is None:
            return [base]
        if any(any(c in p for c in "*?[") for p in overrides):
            raise UsageError(
                f"{_key('weights')}: this model reads only the files matching {overrides} under MODEL; "
                f"weightstream cannot list {base} by pattern: point 'weights' at a local copy or unset it"
            )
        # Literal file names (a model's extra head, Mistral's consolidated file): read those.
        return [f"{base}/{p}" if _is_url(base) else os.path.join(base, p) for p in overrides]

    def _get_weights_iterator(self, source):
        paths, skip = self._paths(source)
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        return self._stream(paths, skip, source.prefix)

    def _plan(self, loader, paths, skip):
        """From the headers alone (no tensor data): ``(plans, total, largest)``, ``plans`` a
        list of ``(path, only, stored)`` (``only`` None reads every tensor of the path,
        ``stored`` the data bytes to read from it), ``total`` the bytes to load, ``largest`` the
        largest tensor's."""
        plans = []
        total = largest = 0
        for path in paths:
            infos = loader.describe(path, dtype=self.options.dtype)
            keep = infos if skip is None else [t for t in infos if not skip(t[0])]
            only = None
            if len(keep) < len(infos):
                if not keep:
                    continue  # nothing wanted: an empty filter would read everything
                only = [_escape_glob(t[0]) for t in keep]
            total += sum(t[4] for t in keep)
            largest = max([largest] + [t[4] for t in keep])
            plans.append((path, only, sum(_stored_nbytes(t) for t in keep)))
        return plans, total, largest

    def _shared_reads(self):
        """vLLM's tensor-parallel ``GroupCoordinator`` when its ranks share the reads (TP > 1,
        ``share_reads`` on, no expert-parallel filter), else None."""
        if not self.options.share_reads:
            return None
        from vllm.distributed import parallel_state

        tp = getattr(parallel_state, "_TP", None)
        if tp is None or tp.world_size <= 1:
            return None
        if self.local_expert_ids is not None:
            # Each rank skips the other ranks' experts unread: their `only` filters differ, and
            # a shared read needs the same on every rank. Reading all experts once and sending
            # them to every rank would move what vLLM's own loader never reads.
            logger.info_once("weightstream: reads not shared between TP ranks: the expert-parallel filter is on")
            return None
        return tp

    def _shared_plan(self, tp, loader, paths, skip):
        """The group's rank 0 reads the headers and plans; every rank gets its plan (one gather
        on the group's gloo ``cpu_group``, with each rank's host name). Returns the plan, or
        None when the group spans several hosts (then each rank plans and reads for itself)."""
        plan, hosts, files = plan_on_first_rank(tp.cpu_group, lambda: self._plan(loader, paths, skip), paths)
        for r, theirs in enumerate(files):
            if theirs != files[0]:
                # vLLM picks the files the same way on every rank: this is not expected to happen.
                raise GroupMismatchError(
                    f"TP ranks 0 and {r} would read different files ({files[0]} and {theirs}); "
                    f"set model_loader_extra_config {{\"share_reads\": false}}",
                    rank=r,
                )
        if len(hosts) > 1:
            logger.info_once(
                "weightstream: reads not shared between TP ranks: the group spans %d hosts (%s)",
                len(hosts), ", ".join(hosts),
            )
            return None
        return plan

    def _stream(self, paths, skip, prefix):
        loader = self._loader()
        opts = self.options
        show = enable_tqdm(self.load_config.use_tqdm_on_load if opts.progress is None else opts.progress)
        tp = self._shared_reads()
        plan = None if tp is None else self._shared_plan(tp, loader, paths, skip)
        group = None
        if plan is None:
            plan = self._plan(loader, paths, skip)
        else:
            # NCCL for tensors on a GPU; gloo for host tensors (the iterator makes its own gloo
            # side group with a short timeout for the status exchange either way).
            group = tp.device_group if loader.device.startswith("cuda") else tp.cpu_group
        plans, total, largest = plan
        window = opts.window
        if window is None:
            # The default bound grows to the largest tensor (a 150k-token embedding is over
            # 1 GiB); a window set by hand is kept, and one too small is a UsageError naming the
            # tensor.
            window = max(O.size(_WINDOW, "window"), largest)
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total, desc="Loading safetensors checkpoint (weightstream)", unit="B", unit_scale=True,
                unit_divisor=1024, bar_format=_BAR_FORMAT, mininterval=_PROGRESS_INTERVAL,
            )
        stats = self.last_stats if self.last_stats is not None else {}
        read = sent = received = 0
        start, nbytes = time.perf_counter(), 0
        try:
            # One iteration per file, in the same order on every rank: with a group each is a
            # collective, and the plan (paths, `only`, window) came from one rank.
            for path, only, stored in plans:
                if group is None:
                    it = loader.iterate(path, window=window, dtype=opts.dtype, only=only)
                else:
                    it = loader.iterate(path, window=window, dtype=opts.dtype, only=only, group=group,
                                        timeout=opts.timeout)
                try:
                    for name, tensor in it:
                        n = tensor.nbytes
                        nbytes += n
                        if bar is not None:
                            bar.update(n)
                        yield prefix + name, tensor
                        del tensor  # the model's copy alone holds it: the window moves on
                finally:
                    it.close()  # with a group, a rank that stops early tells the others
                if group is None:
                    read += stored
                else:
                    read += it.bytes_read
                    sent += it.bytes_sent
                    received += it.bytes_received
        finally:
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - start
        stats.update(
            group_size=1 if group is None else tp.world_size,
            bytes_read=stats.get("bytes_read", 0) + read,
            bytes_sent=stats.get("bytes_sent", 0) + sent,
            bytes_received=stats.get("bytes_received", 0) + received,
            bytes_loaded=stats.get("bytes_loaded", 0) + nbytes,
            files=stats.get("files", 0) + len(plans),
            seconds=stats.get("seconds", 0) + secs,
        )
        shared = ""
        if group is not None:
            shared = (
                f"; TP rank {tp.rank_in_group} of {tp.world_size} sharing reads: read {read / 2**30:.2f} GiB, "
                f"sent {sent / 2**30:.2f} GiB, received {received / 2**30:.2f} GiB"
            )
        logger.info(
            "weightstream: %.2f GiB from %s to %s in %.2f s (%.2f GiB/s)%s",
            nbytes / 2**30,
            "no file" if not paths else paths[0] if len(paths) == 1 else f"{len(paths)} files under {os.path.dirname(paths[0])}",
            loader.device, secs,
            nbytes / 2**30 / secs if secs > 0 else 0.0,
            shared,
        )


def register():
    """Register :class:`WeightstreamModelLoader` as vLLM's load format ``"weightstream"``.

    The ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts, so a
    second call does nothing (and does not log vLLM's "already registered" warning).

    Example::

        >>> import weightstream.vllm
        >>> weightstream.vllm.register()
        >>> from vllm.config import LoadConfig
        >>> from vllm.model_executor.model_loader import get_model_loader
        >>> type(get_model_loader(LoadConfig(load_format="weightstream"))).__name__
        'WeightstreamModelLoader'
    """
    table = getattr(_vllm_loaders, "_LOAD_FORMAT_TO_MODEL_LOADER", None)
    if table is not None and table.get(LOAD_FORMAT) is WeightstreamModelLoader:
        return
    _vllm_loaders.register_model_loader(LOAD_FORMAT)(WeightstreamModelLoader)
