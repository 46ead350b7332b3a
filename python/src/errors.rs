//! weightstream errors as Python exceptions: the classes live in `weightstream/_errors.py`
//! (they inherit from `ValueError` / `OSError` as well as from `WeightstreamError`).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use weightstream::{Error, ErrorKind};

/// The exception class for an error kind: its name in `weightstream._errors`.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Format | ErrorKind::Source => "FormatError",
        ErrorKind::Io => "ReadError",
        ErrorKind::Device => "DeviceError",
        ErrorKind::Usage => "UsageError",
        ErrorKind::Cancelled => "CancelledError",
        _ => "InternalError",
    }
}

/// An exception of class `name` from `weightstream._errors` with `message`.
pub fn raise(py: Python<'_>, name: &str, message: String) -> PyErr {
    let class = py.import("weightstream._errors").and_then(|m| m.getattr(name));
    match class {
        Ok(class) => match class.call1((message.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        // The package's Python half is missing (the extension imported on its own).
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// A weightstream error as the Python exception of its kind; the message names the file and,
/// when known, the tensor.
pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let class = match &err {
        // Whatever its kind: an OSError, as a failed download is.
        Error::Remote { .. } => "RemoteError",
        // A missing file (a shard an index names, too) is a FileNotFoundError, as safetensors
        // raises, with `errno` and `filename` set as `open()` sets them.
        Error::Io { file, source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            let e = raise(py, "MissingFileError", err.to_string());
            let v = e.value(py);
            let _ = v.setattr("errno", 2); // ENOENT
            let _ = v.setattr("filename", file.display().to_string());
            return e;
        }
        _ => class_name(err.kind()),
    };
    raise(py, class, err.to_string())
}

/// A bad option value (`ValueError`).
pub fn usage(py: Python<'_>, message: impl Into<String>) -> PyErr {
    raise(py, "UsageError", message.into())
}
