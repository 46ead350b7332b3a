//! `RawStream`: the iterator behind `Loader.iterate`, over a `weightstream::TensorStream`.

use std::sync::Mutex;

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use weightstream::{CancelToken, TensorStream};

use crate::errors::to_py;
use crate::interrupt;
use crate::tensor::RawTensor;

/// Tensors in file order as they land, each owning its memory; at most the window's bytes are
/// in flight beyond the tensors the caller still holds. Dropping it (or `close()`) stops the
/// producer.
#[pyclass(module = "weightstream._weightstream", name = "RawStream", frozen)]
pub struct RawStream {
    inner: Mutex<Option<TensorStream>>,
    token: CancelToken,
}

impl RawStream {
    pub fn new(stream: TensorStream, token: CancelToken) -> Self {
        RawStream { inner: Mutex::new(Some(stream)), token }
    }

    fn take(&self) -> Option<TensorStream> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pymethods]
impl RawStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<RawTensor> {
        // Taken out while we wait (another thread calling `next` meanwhile sees the end).
        let Some(mut stream) = self.take() else {
            return Err(PyStopIteration::new_err(()));
        };
        let ((stream, item), interrupted) = interrupt::run(py, &self.token, move || {
            let item = stream.next();
            (stream, item)
        })?;
        if let Some(e) = interrupted {
            py.detach(move || drop(stream));
            return Err(e);
        }
        match item {
            None => {
                py.detach(move || drop(stream));
                Err(PyStopIteration::new_err(()))
            }
            Some(Err(e)) => {
                py.detach(move || drop(stream));
                Err(to_py(py, e))
            }
            Some(Ok(t)) => {
                // Put back, unless `close()` ran meanwhile: then it ends here, and is joined.
                if self.token.is_cancelled() {
                    py.detach(move || drop(stream));
                } else {
                    *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
                }
                RawTensor::from_streamed(t)
            }
        }
    }

    /// Stop the stream now: the producer is cancelled and joined; later `next` calls end.
    fn close(&self, py: Python<'_>) {
        self.token.cancel();
        if let Some(s) = self.take() {
            py.detach(move || drop(s));
        }
    }

    /// Bytes read from storage so far.
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |s| s.bytes_read())
    }
}
