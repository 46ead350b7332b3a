"""The exceptions weightstream raises. Every one is a :class:`WeightstreamError`; a bad file is
also a ``ValueError`` and a failed read also an ``OSError``, so code written for safetensors'
errors keeps working. Messages name the file and, when known, the tensor."""


class WeightstreamError(Exception):
    """Base class of every weightstream error."""


class FormatError(WeightstreamError, ValueError):
    """The file breaks the safetensors format, or the checkpoint (index, directory) is wrong."""


class ReadError(WeightstreamError, OSError):
    """Reading failed: a missing file, a short file, an I/O error, no memory."""


class RemoteError(ReadError):
    """A request to an object store or HTTP server failed after its retries: the object or bucket
    is missing, access was denied, the server failed or stalled, or the object changed during the
    load. The message names the URL (and the tensor, for data requests)."""


class DeviceError(WeightstreamError, RuntimeError):
    """The CUDA driver or device failed (missing, out of memory, a failed call)."""


class UsageError(WeightstreamError, ValueError):
    """An option or argument has a value that is not allowed; the message says what is."""


class MissingTensorError(WeightstreamError, KeyError):
    """The checkpoint has no tensor of that name."""

    def __str__(self):  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class CancelledError(WeightstreamError):
    """The load was cancelled (Ctrl-C raises KeyboardInterrupt instead)."""


class InternalError(WeightstreamError, RuntimeError):
    """A bug in weightstream: please report it."""


__all__ = [
    "WeightstreamError",
    "FormatError",
    "ReadError",
    "RemoteError",
    "DeviceError",
    "UsageError",
    "MissingTensorError",
    "CancelledError",
    "InternalError",
]
