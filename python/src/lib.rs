//! `weightstream._weightstream`: the Rust half of the `weightstream` Python package, a thin
//! layer over the `weightstream` crate. Loading is the crate's; this layer parses options,
//! runs loads with the GIL released (interruptible by Ctrl-C), and exports tensors through
//! DLPack. The Python half (`python/python/weightstream/`) turns them into framework tensors.

mod dlpack;
mod errors;
mod interrupt;
mod loader;
mod share;
mod stream;
mod tensor;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;

/// The `__metadata__` of a checkpoint's files (merged, the first file's value first): `{}` when a
/// file has an empty one, `None` when none has one (absent or `null`), as safetensors returns
/// it. Reads headers only.
#[pyfunction]
#[pyo3(signature = (path, storage_options=None))]
fn read_metadata(
    py: Python<'_>,
    path: PathBuf,
    storage_options: Option<Vec<(String, String)>>,
) -> PyResult<Option<BTreeMap<String, String>>> {
    let remote = weightstream::source::RemoteOptions {
        storage_options: storage_options.unwrap_or_default(),
        ..Default::default()
    };
    let ckpt = py.detach(|| weightstream::Checkpoint::open_with(&path, &remote)).map_err(|e| errors::to_py(py, e))?;
    let mut merged = BTreeMap::new();
    for f in &ckpt.files {
        for (k, v) in &f.header.metadata {
            merged.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Ok(ckpt.files.iter().any(|f| f.header.metadata_present).then_some(merged))
}

/// Whether a CUDA device is usable here.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(weightstream::cuda_available)
}

#[pymodule]
fn _weightstream(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<tensor::RawTensor>()?;
    m.add_class::<loader::RawLoader>()?;
    m.add_class::<stream::RawStream>()?;
    m.add_class::<share::RawShare>()?;
    m.add_function(wrap_pyfunction!(read_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(share::group_share, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(writer::save_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(writer::save_file, m)?)?;
    Ok(())
}
