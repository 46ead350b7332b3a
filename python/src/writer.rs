//! Writing safetensors files from Python: `save_bytes` and `save_file` take the tensors as
//! `(name, dtype, shape, data)` items and hand them to the crate's writer
//! (`weightstream::format`), laid out in the reference writer's order so the bytes are the ones
//! safetensors 0.8 writes. The Python half (`weightstream/_save.py`) turns torch tensors and
//! numpy arrays into items and does safetensors' checks; this layer only reads memory.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use weightstream::format::{sort_like_reference, write_file_with, write_to_vec_with, WriteTensor};
use weightstream::Dtype;

use crate::dlpack::{self, Imported};
use crate::errors::{to_py, usage};

/// One tensor as Python gives it: its name, its header dtype name (`"BF16"`), its header shape
/// (elements, so an F4 tensor's last dimension counts 4-bit values) and its bytes: a `bytes`
/// object or a CPU object with `__dlpack__` (any dtype; its bytes are taken as they lie).
type Item<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>);

/// The memory of one item, kept alive (a `bytes` object or a DLPack tensor we consumed) until
/// the write is done.
enum Held<'py> {
    Bytes(Bound<'py, PyBytes>),
    DlPack(Imported, usize),
}

impl Held<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Held::Bytes(b) => b.as_bytes(),
            Held::DlPack(_, 0) => &[],
            // SAFETY: the producer keeps a DLPack tensor's memory valid until its deleter runs,
            // which `Imported` calls when dropped, after the write (it lives as long as `self`).
            // `import` saw a contiguous tensor on the CPU of `len` bytes (checked in `hold`);
            // we only read it.
            Held::DlPack(im, len) => unsafe { std::slice::from_raw_parts(im.data as *const u8, *len) },
        }
    }
}

fn hold<'py>(name: &str, data: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
    let py = data.py();
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok(Held::Bytes(b.clone()));
    }
    let bad = |m: String| usage(py, format!("tensor `{name}`: {m}"));
    let im = dlpack::import(&dlpack::export_capsule(data, "tensor data that is not bytes")?).map_err(|e| {
        if e.is_instance_of::<PyBufferError>(py) {
            bad(e.to_string())
        } else {
            e
        }
    })?;
    let on_host = matches!(im.device.device_type, dlpack::KDL_CPU | dlpack::KDL_CUDA_HOST);
    if !on_host {
        return Err(bad(format!("its data is on DLPack device {:?}, not in host memory", im.device)));
    }
    if !im.contiguous {
        return Err(bad("its data is not contiguous".into()));
    }
    let bits = u64::from(im.dtype.bits) * u64::from(im.dtype.lanes);
    let len = im
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
        .and_then(|e| e.checked_mul(bits))
        .filter(|b| b % 8 == 0)
        .and_then(|b| usize::try_from(b / 8).ok())
        .ok_or_else(|| bad("its data's size overflows or is not whole bytes".into()))?;
    Ok(Held::DlPack(im, len))
}

/// Hold the items' memory; the tensors then borrow from it.
fn prepare<'py>(items: &[Item<'py>]) -> PyResult<Vec<Held<'py>>> {
    items.iter().map(|(name, _, _, data)| hold(name, data)).collect()
}

fn tensors<'a>(py: Python<'_>, items: &[Item<'_>], held: &'a [Held<'_>]) -> PyResult<Vec<WriteTensor<'a>>> {
    let mut out = Vec::with_capacity(items.len());
    for ((name, dtype, shape, _), h) in items.iter().zip(held) {
        let dtype: Dtype = dtype
            .parse()
            .map_err(|e: weightstream::format::UnknownDtype| usage(py, format!("tensor `{name}`: {e}")))?;
        out.push(WriteTensor::new(name.clone(), dtype, shape.clone(), h.bytes()));
    }
    // The reference's layout: its bytes, and every tensor aligned to its element size.
    sort_like_reference(&mut out);
    Ok(out)
}

/// Serialize `items` (`(name, dtype, shape, data)`, in any order) and `metadata` to the bytes of
/// a safetensors file, laid out as safetensors 0.8 lays them out. `metadata=None` writes no
/// `__metadata__`; `{}` writes an empty one.
#[pyfunction]
#[pyo3(signature = (items, metadata=None))]
pub fn save_bytes<'py>(
    py: Python<'py>,
    items: Vec<Item<'py>>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let held = prepare(&items)?;
    let tensors = tensors(py, &items, &held)?;
    let out = py.detach(|| write_to_vec_with(&tensors, metadata.as_ref())).map_err(|e| to_py(py, e))?;
    Ok(PyBytes::new(py, &out))
}

/// Write `items` and `metadata` as `save_bytes` lays them out to the file `path` (replaced
/// through a temporary file beside it and a rename), with the GIL released while writing.
#[pyfunction]
#[pyo3(signature = (items, path, metadata=None))]
pub fn save_file<'py>(
    py: Python<'py>,
    items: Vec<Item<'py>>,
    path: PathBuf,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<()> {
    if path.as_os_str().is_empty() {
        return Err(usage(py, "the file name is empty"));
    }
    let held = prepare(&items)?;
    let tensors = tensors(py, &items, &held)?;
    py.detach(|| write_file_with(&path, &tensors, metadata.as_ref())).map_err(|e| to_py(py, e))?;
    // The DLPack producers' deleters run here, with the GIL held (numpy's takes it anyway).
    drop(held);
    Ok(())
}
