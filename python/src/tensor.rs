//! `Tensor`: one loaded tensor as Python sees it before a framework takes it, an exporter of
//! DLPack capsules (`__dlpack__`, `__dlpack_device__`) over memory it keeps alive.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use weightstream::{Device, Dtype, LoadedModel, StreamedTensor};

use crate::dlpack::{self, DLDataType, DLDevice, ExportSpec, Keep};

/// A loaded tensor: its name, dtype, shape and memory (host or CUDA), exported without a copy
/// through DLPack. Every capsule holds a share of the memory, so the memory lives until the last
/// array made from it dies, whatever happens to the loader.
#[pyclass(module = "weightstream._weightstream", name = "Tensor", frozen)]
pub struct RawTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: u64,
    nbytes: u64,
    device: DLDevice,
    keep: Keep,
    raw: bool,
}

fn dl_device(device: Device) -> DLDevice {
    match device {
        Device::Cuda(n) => DLDevice { device_type: dlpack::KDL_CUDA, device_id: n as i32 },
        _ => DLDevice { device_type: dlpack::KDL_CPU, device_id: 0 },
    }
}

fn dt(code: u8, bits: u8) -> DLDataType {
    DLDataType { code, bits, lanes: 1 }
}

/// The DLPack dtype `dtype` is exported as: its own type where DLPack and the consumers know it
/// (bf16 as `kDLBfloat`, unless `raw`), else the unsigned integer of the same width, which the
/// Python layer views as the `ml_dtypes` / torch dtype. F4 and F6 have no per-element width: only
/// their `raw` export exists, as the bytes (`uint8`, one dimension, see [`RawTensor::raw`]).
pub fn dl_dtype(dtype: Dtype, raw: bool) -> Result<DLDataType, String> {
    use dlpack::{KDL_BFLOAT, KDL_BOOL, KDL_COMPLEX, KDL_FLOAT, KDL_INT, KDL_UINT};
    use Dtype::*;
    Ok(match dtype {
        BOOL => dt(KDL_BOOL, 8),
        U8 | F8_E5M2 | F8_E4M3 | F8_E8M0 | F8_E4M3FNUZ | F8_E5M2FNUZ => dt(KDL_UINT, 8),
        I8 => dt(KDL_INT, 8),
        I16 => dt(KDL_INT, 16),
        U16 => dt(KDL_UINT, 16),
        F16 => dt(KDL_FLOAT, 16),
        BF16 if raw => dt(KDL_UINT, 16),
        BF16 => dt(KDL_BFLOAT, 16),
        I32 => dt(KDL_INT, 32),
        U32 => dt(KDL_UINT, 32),
        F32 => dt(KDL_FLOAT, 32),
        C64 => dt(KDL_COMPLEX, 64),
        F64 => dt(KDL_FLOAT, 64),
        I64 => dt(KDL_INT, 64),
        U64 => dt(KDL_UINT, 64),
        F4 | F6_E2M3 | F6_E3M2 if raw => dt(KDL_UINT, 8),
        F4 | F6_E2M3 | F6_E3M2 => {
            return Err(format!("{dtype} packs several elements a byte: neither DLPack nor numpy has it"))
        }
    })
}

/// Whether a destination of DLPack dtype `dl` can take a tensor loaded as `dtype`: its own
/// type, or the unsigned integer of its width (how numpy arrays of `ml_dtypes` types export).
pub fn accepts(dtype: Dtype, dl: DLDataType) -> bool {
    dl.lanes == 1 && (dl_dtype(dtype, false) == Ok(dl) || dl_dtype(dtype, true) == Ok(dl))
}

/// A description of a DLPack dtype for messages (`float32`, `bfloat16`, `uint8`).
pub fn dl_dtype_name(dl: DLDataType) -> String {
    let kind = match dl.code {
        dlpack::KDL_INT => "int",
        dlpack::KDL_UINT => "uint",
        dlpack::KDL_FLOAT => "float",
        dlpack::KDL_BFLOAT => "bfloat",
        dlpack::KDL_COMPLEX => "complex",
        dlpack::KDL_BOOL => return "bool".into(),
        _ => "code",
    };
    format!("{kind}{}", dl.bits)
}

impl RawTensor {
    /// The tensors of a loaded model, in its order; each keeps the whole model's memory alive.
    pub fn from_model(model: LoadedModel) -> PyResult<Vec<RawTensor>> {
        let model = Arc::new(model);
        let keep: Keep = model.clone();
        model
            .tensors()
            .map(|t| {
                let data = address(t.host_bytes(), t.device_ptr())?;
                Ok(RawTensor {
                    name: t.name().to_string(),
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    data,
                    nbytes: t.byte_len(),
                    device: dl_device(t.device()),
                    keep: keep.clone(),
                    raw: false,
                })
            })
            .collect()
    }

    /// A streamed tensor; it owns its share of the batch it landed in.
    pub fn from_streamed(t: StreamedTensor) -> PyResult<RawTensor> {
        let data = address(t.host_bytes(), t.device_ptr())?;
        Ok(RawTensor {
            name: t.name().to_string(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data,
            nbytes: t.byte_len(),
            device: dl_device(t.device()),
            keep: Arc::new(Mutex::new(t)),
            raw: false,
        })
    }
}

#[pymethods]
impl RawTensor {
    /// The tensor's name in the checkpoint.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Its dtype as safetensors names it (`"BF16"`).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// Its shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    /// Its size in bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> String {
        match self.device.device_type {
            dlpack::KDL_CUDA => format!("cuda:{}", self.device.device_id),
            _ => "cpu".into(),
        }
    }

    /// The same memory, exported as unsigned integers of the dtype's width (for consumers that
    /// lack the dtype: numpy has no bf16 or fp8; view the result as the `ml_dtypes` type). A
    /// packed dtype (F4, F6: several elements a byte) is exported as its bytes, a 1-D `uint8` of
    /// `nbytes`, which torch views as `float4_e2m1fn_x2`.
    fn raw(&self) -> RawTensor {
        let packed = matches!(self.dtype, Dtype::F4 | Dtype::F6_E2M3 | Dtype::F6_E3M2);
        let shape = if packed { vec![self.nbytes] } else { self.shape.clone() };
        RawTensor { name: self.name.clone(), shape, keep: self.keep.clone(), raw: true, ..*self }
    }

    /// A DLPack capsule over the tensor's memory (no copy): DLPack 1.0 (`dltensor_versioned`)
    /// when `max_version` allows it, else the legacy `dltensor`.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        // The data is complete when a load returns (its copies were waited for): any consumer
        // stream may read it, so `stream` needs no synchronisation.
        if stream.is_some() && self.device.device_type == dlpack::KDL_CPU {
            return Err(PyValueError::new_err("stream must be None for a CPU tensor"));
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err("weightstream exports without copying: copy=True is not supported"));
        }
        if let Some((ty, id)) = dl_device {
            if (ty, id) != (self.device.device_type, self.device.device_id) {
                return Err(PyBufferError::new_err(format!(
                    "tensor `{}` is on {}, not on DLPack device ({ty}, {id}); copy it with its framework",
                    self.name,
                    self.device()
                )));
            }
        }
        let dtype = dl_dtype(self.dtype, self.raw)
            .map_err(|m| PyBufferError::new_err(format!("tensor `{}`: {m}", self.name)))?;
        let spec = ExportSpec {
            data: self.data,
            device: self.device,
            dtype,
            shape: self.shape.clone(),
            keep: self.keep.clone(),
        };
        dlpack::export(py, spec, max_version.is_some_and(|(major, _)| major >= 1))
    }

    /// `(device_type, device_id)` as DLPack numbers them: `(1, 0)` for the CPU, `(2, N)` for
    /// `cuda:N`.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (self.device.device_type, self.device.device_id)
    }

    fn __repr__(&self) -> String {
        format!("Tensor(name={:?}, dtype={}, shape={:?}, device={})", self.name, self.dtype, self.shape, self.device())
    }
}

/// The address of a tensor's bytes: in host memory, or on its device.
fn address(host: Option<&[u8]>, device_ptr: Option<u64>) -> PyResult<u64> {
    match (host, device_ptr) {
        (Some(b), _) => Ok(b.as_ptr() as u64),
        (None, Some(p)) => Ok(p),
        (None, None) => Err(PyValueError::new_err("a tensor on the null device has no memory")),
    }
}
