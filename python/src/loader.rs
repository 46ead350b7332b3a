//! `RawLoader`: one `weightstream::Loader` kept for the life of a Python `Loader` (its staging
//! ring stays), and the per-call options (dtype, only, shard, split, slice) applied to a clone.

use std::collections::HashSet;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use weightstream::{CancelToken, Destination, Device, DevicePlace, Dtype, Loader};

use crate::dlpack::{self, Imported};
use crate::errors::{to_py, usage};
use crate::interrupt;
use crate::stream::RawStream;
use crate::tensor::{accepts, dl_dtype_name, RawTensor};

/// The options of one call, as the Python layer passes them (every key present).
#[derive(FromPyObject, Default)]
#[pyo3(from_item_all)]
pub struct Opts {
    dtype: Option<String>,
    only: Vec<String>,
    exact: Vec<String>,
    shard: Option<(usize, usize)>,
    split: Vec<(String, usize)>,
    slice: Option<(String, usize, u64, u64)>,
}

/// `name` as a glob that matches only itself (globset escapes with a backslash).
fn escape_glob(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\' | '!' | ',') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The loader of a Python `Loader` object.
#[pyclass(module = "weightstream._weightstream", name = "RawLoader", frozen)]
pub struct RawLoader {
    pub(crate) base: Loader,
}

impl RawLoader {
    /// A clone of the base loader (sharing its staging pool) with `opts` and `token` applied.
    pub(crate) fn configured(&self, py: Python<'_>, opts: &Opts, token: &CancelToken) -> PyResult<Loader> {
        let mut l = self.base.clone().cancel_token(token.clone());
        if let Some(d) = &opts.dtype {
            let dtype: Dtype = d.parse().map_err(|_| usage(py, format!("unknown dtype `{d}`")))?;
            l = l.dtype(dtype);
        }
        for g in &opts.only {
            l = l.only(g.clone());
        }
        for n in &opts.exact {
            l = l.only(escape_glob(n));
        }
        if let Some((rank, world)) = opts.shard {
            l = l.shard(rank, world);
        }
        for (g, dim) in &opts.split {
            l = l.split(g.clone(), *dim);
        }
        if let Some((name, dim, start, stop)) = &opts.slice {
            l = l.slice(name.clone(), *dim, *start..*stop);
        }
        Ok(l)
    }
}

/// A load's result, or the KeyboardInterrupt that cancelled it.
pub(crate) fn finish<T>(py: Python<'_>, out: (weightstream::Result<T>, Option<PyErr>)) -> PyResult<T> {
    match out {
        (_, Some(interrupt)) => Err(interrupt),
        (r, None) => r.map_err(|e| to_py(py, e)),
    }
}

#[pymethods]
impl RawLoader {
    #[new]
    #[pyo3(signature = (device="auto", staging_size=None, staging_count=None, threads=None, io=None, direct=false,
                        storage_options=None, remote_concurrency=None, remote_request_size=None, read_size=None))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments, each optional
    fn new(
        py: Python<'_>,
        device: &str,
        staging_size: Option<usize>,
        staging_count: Option<usize>,
        threads: Option<usize>,
        io: Option<&str>,
        direct: bool,
        storage_options: Option<Vec<(String, String)>>,
        remote_concurrency: Option<usize>,
        remote_request_size: Option<usize>,
        read_size: Option<usize>,
    ) -> PyResult<Self> {
        let device: Device = device.parse().map_err(|e| to_py(py, e))?;
        let mut l = Loader::new().device(device).direct(direct);
        for (k, v) in storage_options.unwrap_or_default() {
            l = l.storage_option(k, v);
        }
        if let Some(n) = remote_concurrency {
            l = l.remote_concurrency(n);
        }
        if let Some(b) = remote_request_size {
            l = l.remote_request_size(b);
        }
        if let Some(s) = staging_size {
            l = l.staging_size(s);
        }
        if let Some(r) = read_size {
            l = l.read_size(r);
        }
        if let Some(c) = staging_count {
            l = l.staging_count(c);
        }
        if let Some(t) = threads {
            if t == 0 {
                return Err(usage(py, "threads must be at least 1"));
            }
            l = l.threads(t);
        }
        if let Some(io) = io {
            l = l.io(match io {
                "auto" => weightstream::IoKind::Auto,
                "pread" => weightstream::IoKind::Pread,
                "uring" => weightstream::IoKind::Uring,
                _ => return Err(usage(py, format!("unknown io `{io}` (auto, pread, uring)"))),
            });
        }
        Ok(RawLoader { base: l })
    }

    /// The device loads go to (`auto` resolved): `"cpu"`, `"cuda:N"` or `"null"`.
    #[getter]
    fn device(&self) -> String {
        self.base.resolved_device().to_string()
    }

    /// Load the tensors of `path` (file, index, directory, HF cache folder) into one arena.
    fn load(&self, py: Python<'_>, path: PathBuf, opts: Opts) -> PyResult<Vec<RawTensor>> {
        let token = CancelToken::new();
        let loader = self.configured(py, &opts, &token)?;
        let model = finish(py, interrupt::run(py, &token, move || loader.load(&path))?)?;
        RawTensor::from_model(model)
    }

    /// What a load with `opts` would produce, from the headers: `(name, dtype, stored_dtype,
    /// shape, nbytes)` per tensor in file order.
    #[allow(clippy::type_complexity)]
    fn describe(
        &self,
        py: Python<'_>,
        path: PathBuf,
        opts: Opts,
    ) -> PyResult<Vec<(String, &'static str, &'static str, Vec<u64>, u64)>> {
        let loader = self.configured(py, &opts, &CancelToken::new())?;
        let infos = py.detach(|| loader.describe(&path)).map_err(|e| to_py(py, e))?;
        Ok(infos.into_iter().map(|t| (t.name, t.dtype.name(), t.stored_dtype.name(), t.shape, t.byte_len)).collect())
    }

    /// Stream the tensors of `path` with at most `window` bytes in flight.
    fn stream(&self, py: Python<'_>, path: PathBuf, opts: Opts, window: u64) -> PyResult<RawStream> {
        let token = CancelToken::new();
        let loader = self.configured(py, &opts, &token)?;
        let stream = finish(py, interrupt::run(py, &token, move || loader.stream(&path, window))?)?;
        Ok(RawStream::new(stream, token))
    }

    /// Fill `destinations` (`(name, object with __dlpack__)`) in place; returns the bytes
    /// loaded. Each destination must be contiguous, writable, on the loader's device, of the
    /// tensor's loaded shape and dtype (or the unsigned integer of its width).
    fn load_into(
        &self,
        py: Python<'_>,
        path: PathBuf,
        destinations: Vec<(String, Bound<'_, PyAny>)>,
        opts: Opts,
    ) -> PyResult<u64> {
        let token = CancelToken::new();
        let loader = self.configured(py, &opts, &token)?;
        let infos = py.detach(|| loader.describe(&path)).map_err(|e| to_py(py, e))?;
        let by_name: std::collections::HashMap<&str, &weightstream::TensorInfo> =
            infos.iter().map(|t| (t.name.as_str(), t)).collect();
        let device = loader.resolved_device();
        let file = path.display().to_string();
        let bad = |name: &str, m: String| usage(py, format!("{file}: tensor `{name}`: {m}"));
        let mut seen = HashSet::new();
        let mut imported: Vec<(String, Imported, usize)> = Vec::with_capacity(destinations.len());
        for (name, obj) in &destinations {
            if !seen.insert(name.clone()) {
                return Err(bad(name, "given twice".into()));
            }
            let (im, bytes) = import_place(obj, device, &|m| bad(name, m))?;
            let packed = |d: Dtype| matches!(d, Dtype::F4 | Dtype::F6_E2M3 | Dtype::F6_E3M2);
            if let Some(info) = by_name.get(name.as_str()).filter(|i| packed(i.dtype)) {
                // Elements below a byte: no DLPack dtype holds them; a uint8 buffer of its bytes does.
                let u8_ok = im.dtype == dlpack::DLDataType { code: dlpack::KDL_UINT, bits: 8, lanes: 1 };
                if !u8_ok || bytes as u64 != info.byte_len {
                    return Err(bad(
                        name,
                        format!(
                            "{} packs elements below a byte: give a uint8 destination of its {} bytes",
                            info.dtype, info.byte_len
                        ),
                    ));
                }
            } else if let Some(info) = by_name.get(name.as_str()) {
                if !accepts(info.dtype, im.dtype) {
                    return Err(bad(
                        name,
                        format!(
                            "dtype mismatch: the tensor loads as {}, the destination is {}",
                            info.dtype,
                            dl_dtype_name(im.dtype)
                        ),
                    ));
                }
                let shape: Vec<u64> = im.shape.iter().map(|&d| d as u64).collect();
                if shape != info.shape {
                    return Err(bad(
                        name,
                        format!("shape mismatch: the tensor loads as {:?}, the destination is {:?}", info.shape, shape),
                    ));
                }
            }
            imported.push((name.clone(), im, bytes));
        }
        // Host destinations must not overlap: each becomes a `&mut [u8]`.
        let mut ranges: Vec<(u64, u64, &str)> = imported
            .iter()
            .filter(|(_, _, len)| *len > 0)
            .map(|(n, im, len)| (im.data, im.data.saturating_add(*len as u64), n.as_str()))
            .collect();
        ranges.sort();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(bad(w[1].2, format!("its destination overlaps the one of `{}`", w[0].2)));
        }
        let dests: Vec<(String, Destination<'_>)> = imported
            .iter()
            // SAFETY: each was imported for this device, contiguous and writable, and stays
            // alive until `imported` drops (after the load); the ranges do not overlap (checked
            // above).
            .map(|(name, im, len)| (name.clone(), unsafe { destination_of(im, *len, device) }))
            .collect();
        let out = interrupt::run(py, &token, move || loader.load_into(&path, dests))?;
        let stats = finish(py, out)?;
        drop(imported);
        Ok(stats.bytes_loaded)
    }
}

/// `obj` (an object with `__dlpack__`) as a place a load may fill on `device`: its DLPack import
/// and its length in bytes. Refused (through `bad`): not contiguous, read-only, on another device.
pub(crate) fn import_place(
    obj: &Bound<'_, PyAny>,
    device: Device,
    bad: &dyn Fn(String) -> PyErr,
) -> PyResult<(Imported, usize)> {
    let im = dlpack::import(&export_capsule(obj)?)?;
    if !im.contiguous {
        return Err(bad("the destination is not contiguous".into()));
    }
    if im.read_only {
        return Err(bad("the destination is read-only".into()));
    }
    let want = match device {
        Device::Cuda(n) => (dlpack::KDL_CUDA, n as i32),
        _ => (dlpack::KDL_CPU, 0),
    };
    let got = (im.device.device_type, im.device.device_id);
    let host_ok = device == Device::Cpu && got.0 == dlpack::KDL_CUDA_HOST;
    if got != want && !host_ok {
        return Err(bad(format!("the destination is on DLPack device {got:?}, the loader on {device}")));
    }
    let elements: Option<u64> = im.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?));
    let bytes = elements
        .and_then(|e| e.checked_mul(u64::from(im.dtype.bits)))
        .map(|b| b.div_ceil(8))
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| bad("the destination's size overflows".into()))?;
    Ok((im, bytes))
}

/// The place `im` (`len` bytes, imported by [`import_place`] for `device`) as a destination.
///
/// # Safety
/// `im`'s memory must stay valid, and used by nothing else, while the destination lives; no
/// two destinations of one load may overlap.
pub(crate) unsafe fn destination_of<'a>(im: &'a Imported, len: usize, device: Device) -> Destination<'a> {
    match device {
        // SAFETY: the caller's promise: a device tensor of `len` bytes, valid and unshared.
        Device::Cuda(n) => Destination::Device(unsafe { DevicePlace::new(im.data, len, n) }),
        _ if len == 0 => Destination::Host(&mut []),
        // SAFETY: as above, in host memory; nothing in this process reads it while the load runs
        // but the caller's other threads, as with any in-place fill.
        _ => Destination::Host(unsafe { std::slice::from_raw_parts_mut(im.data as *mut u8, len) }),
    }
}

/// `obj.__dlpack__()` for a `load_into` destination: its own memory or nothing (a copy would be
/// filled and thrown away).
fn export_capsule<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    dlpack::export_capsule(obj, "a load_into destination").map_err(|e| {
        if e.is_instance_of::<pyo3::exceptions::PyBufferError>(py) {
            PyValueError::new_err(format!("cannot fill this destination in place: {e}"))
        } else {
            e
        }
    })
}
