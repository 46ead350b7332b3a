"""The exceptions weightstream raises. Every one is a :class:`WeightstreamError`; a bad file is
also a ``ValueError`` and a failed read also an ``OSError``, so code written for safetensors'
errors keeps working. Messages name the file and, when known, the tensor.

Where safetensors is installed, :class:`WeightstreamError` subclasses
``safetensors.SafetensorError``, so that ``except SafetensorError:`` written for safetensors
catches every weightstream error too. Python's ``except`` tests real subclassing (it does not
consult ``__subclasscheck__``), so the base class is chosen when this module is imported:
``safetensors.SafetensorError`` when ``import safetensors`` works, else ``Exception``. The
``safetensors`` package imports no framework, so this costs a few milliseconds. A missing local
file raises :class:`MissingFileError`, which is a ``FileNotFoundError`` as safetensors raises."""


def _safetensors_base():
    """``safetensors.SafetensorError`` if safetensors imports, else ``Exception``."""
    try:
        from safetensors import SafetensorError
    except Exception:  # not installed, or broken: weightstream must import regardless
        return Exception
    return SafetensorError


class WeightstreamError(_safetensors_base()):
    """Base class of every weightstream error (and a ``safetensors.SafetensorError`` where
    safetensors is installed).

    Example::

        >>> import weightstream as ws
        >>> try:                                                      # doctest: +SKIP
        ...     ws.load_file("broken.safetensors")
        ... except ws.WeightstreamError as e:
        ...     print(e)   # names the file, and the tensor when known
    """


class FormatError(WeightstreamError, ValueError):
    """The file breaks the safetensors format, or the checkpoint (index, directory) is wrong."""


class ReadError(WeightstreamError, OSError):
    """Reading failed: a missing file, a short file, an I/O error, no memory."""

    def __str__(self):
        # The message as given, also when ``errno``/``filename`` are set after (OSError would
        # print "[Errno N] strerror: 'filename'" instead).
        if len(self.args) == 1 and isinstance(self.args[0], str):
            return self.args[0]
        return super().__str__()


class MissingFileError(ReadError, FileNotFoundError):
    """A local file does not exist: a ``FileNotFoundError`` (as safetensors raises) and a
    :class:`ReadError`. ``errno`` and ``filename`` are set as ``open()`` sets them."""


class RemoteError(ReadError):
    """A request to an object store or HTTP server failed after its retries: the object or bucket
    is missing, access was denied, the server failed or stalled, or the object changed during the
    load. The message names the URL (and the tensor, for data requests)."""


class DeviceError(WeightstreamError, RuntimeError):
    """The CUDA driver or device failed (missing, out of memory, a failed call), or the device is
    one weightstream does not load to (``mps``, ``xpu``, ...)."""


class UsageError(WeightstreamError, ValueError):
    """An option or argument has a value that is not allowed; the message says what is."""


class SliceError(UsageError, IndexError):
    """A ``get_slice(name)[...]`` index that does not apply to the tensor (out of bounds, too
    many indices, a zero step...): an ``IndexError`` as numpy and torch raise, a ``ValueError``
    and a ``safetensors.SafetensorError``."""


class MissingTensorError(WeightstreamError, KeyError):
    """The checkpoint has no tensor of that name."""

    def __str__(self):  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class CancelledError(WeightstreamError):
    """The load was cancelled (Ctrl-C raises KeyboardInterrupt instead)."""


class InternalError(WeightstreamError, RuntimeError):
    """A bug in weightstream: please report it."""


def missing_file(path):
    """The :class:`MissingFileError` for ``path``, with ``errno``/``filename`` set."""
    import errno
    import os

    e = MissingFileError(f"{path}: No such file or directory")
    e.errno, e.strerror, e.filename = errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path)
    return e


__all__ = [
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
]
