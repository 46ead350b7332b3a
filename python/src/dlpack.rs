//! DLPack by hand: the C structs of `dlpack.h` (the legacy `DLManagedTensor` and the 1.0
//! `DLManagedTensorVersioned`), exporting a tensor into a capsule, and reading a capsule that a
//! consumer's `__dlpack__` gave us (for `load_into`).
//!
//! Export: one heap block per capsule holds the managed struct (first field, so its address is
//! the block's), the shape and strides it points into, and a share (`Keep`) of the memory the
//! data lives in. The block is freed by its deleter: called by the consumer once it is done, or
//! by the capsule's destructor when no consumer ever renamed the capsule (`used_dltensor`).

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// What keeps an exported tensor's memory alive: a share of a loaded model's arena or of a
/// streamed tensor's batch.
pub type Keep = Arc<dyn Send + Sync>;

pub const LEGACY_NAME: &CStr = c"dltensor";
pub const VERSIONED_NAME: &CStr = c"dltensor_versioned";
pub const USED_LEGACY_NAME: &CStr = c"used_dltensor";
pub const USED_VERSIONED_NAME: &CStr = c"used_dltensor_versioned";

/// `DLDeviceType` values used here.
pub const KDL_CPU: i32 = 1;
pub const KDL_CUDA: i32 = 2;
pub const KDL_CUDA_HOST: i32 = 3;

/// `DLDataTypeCode` values.
pub const KDL_INT: u8 = 0;
pub const KDL_UINT: u8 = 1;
pub const KDL_FLOAT: u8 = 2;
pub const KDL_BFLOAT: u8 = 4;
pub const KDL_COMPLEX: u8 = 5;
pub const KDL_BOOL: u8 = 6;

/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const FLAG_READ_ONLY: u64 = 1;
/// `DLPACK_FLAG_BITMASK_IS_COPIED`: the producer handed out a copy, not its own memory.
const FLAG_IS_COPIED: u64 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
pub struct DLPackVersion {
    pub major: u32,
    pub minor: u32,
}

#[repr(C)]
pub struct DLManagedTensorVersioned {
    pub version: DLPackVersion,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    pub flags: u64,
    pub dl_tensor: DLTensor,
}

/// What an export describes: a contiguous row-major tensor at `data`.
pub struct ExportSpec {
    pub data: u64,
    pub device: DLDevice,
    pub dtype: DLDataType,
    pub shape: Vec<u64>,
    pub keep: Keep,
}

/// The heap block behind one capsule. `M` (the managed struct) comes first, so a pointer to
/// it is a pointer to the block.
#[repr(C)]
struct Block<M> {
    managed: M,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _keep: Keep,
}

fn row_major_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    strides
}

fn dl_tensor(spec: &ExportSpec, shape: &mut [i64], strides: &mut [i64]) -> DLTensor {
    DLTensor {
        data: spec.data as *mut c_void,
        device: spec.device,
        ndim: shape.len() as i32,
        dtype: spec.dtype,
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    }
}

unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    if !m.is_null() {
        // SAFETY: `m` is the first field of a `Block<DLManagedTensor>` made by `Box::into_raw`
        // in `export`; DLPack calls the deleter once, so the block is freed once.
        drop(unsafe { Box::from_raw(m.cast::<Block<DLManagedTensor>>()) });
    }
}

unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    if !m.is_null() {
        // SAFETY: as in `delete_legacy`, for a `Block<DLManagedTensorVersioned>`.
        drop(unsafe { Box::from_raw(m.cast::<Block<DLManagedTensorVersioned>>()) });
    }
}

/// Frees the tensor of a capsule nobody consumed: a consumer renames the capsule
/// (`used_dltensor`) and then owns the deleter call, so a renamed capsule frees nothing.
unsafe extern "C" fn capsule_destructor_legacy(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the GIL on a live capsule; `PyCapsule_IsValid` only checks
    // its name and sets no error.
    if unsafe { ffi::PyCapsule_IsValid(capsule, LEGACY_NAME.as_ptr()) } == 1 {
        // SAFETY: the name matched, so the pointer is the `DLManagedTensor` stored by `export`.
        let m = unsafe { ffi::PyCapsule_GetPointer(capsule, LEGACY_NAME.as_ptr()) }.cast::<DLManagedTensor>();
        // SAFETY: not consumed: the deleter was never called; it is ours (`delete_legacy`).
        unsafe { delete_legacy(m) };
    }
}

unsafe extern "C" fn capsule_destructor_versioned(capsule: *mut ffi::PyObject) {
    // SAFETY: as in `capsule_destructor_legacy`.
    if unsafe { ffi::PyCapsule_IsValid(capsule, VERSIONED_NAME.as_ptr()) } == 1 {
        // SAFETY: the name matched, so the pointer is the struct stored by `export`.
        let m =
            unsafe { ffi::PyCapsule_GetPointer(capsule, VERSIONED_NAME.as_ptr()) }.cast::<DLManagedTensorVersioned>();
        // SAFETY: not consumed: the deleter was never called.
        unsafe { delete_versioned(m) };
    }
}

/// A new capsule for `spec`: `dltensor_versioned` (DLPack 1.0) when `versioned`, else the
/// legacy `dltensor`.
pub fn export(py: Python<'_>, spec: ExportSpec, versioned: bool) -> PyResult<Py<PyAny>> {
    let mut shape: Vec<i64> = spec
        .shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(|_| PyBufferError::new_err("dimension too large for DLPack")))
        .collect::<PyResult<_>>()?;
    let mut strides = row_major_strides(&shape);
    let tensor = dl_tensor(&spec, &mut shape, &mut strides);
    // Moving the Vecs into the block does not move their heap buffers: the pointers stay valid.
    let (ptr, name, destructor): (*mut c_void, &CStr, Option<ffi::PyCapsule_Destructor>) = if versioned {
        let block = Box::new(Block {
            managed: DLManagedTensorVersioned {
                version: DLPackVersion { major: 1, minor: 0 },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_versioned),
                flags: 0, // writable: each tensor is its own range of memory
                dl_tensor: tensor,
            },
            shape,
            strides,
            _keep: spec.keep,
        });
        (Box::into_raw(block).cast(), VERSIONED_NAME, Some(capsule_destructor_versioned))
    } else {
        let block = Box::new(Block {
            managed: DLManagedTensor {
                dl_tensor: tensor,
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_legacy),
            },
            shape,
            strides,
            _keep: spec.keep,
        });
        (Box::into_raw(block).cast(), LEGACY_NAME, Some(capsule_destructor_legacy))
    };
    // SAFETY: `ptr` is a live block the destructor knows how to free; the name is static.
    let capsule = unsafe { ffi::PyCapsule_New(ptr, name.as_ptr(), destructor) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so nothing else will free the block.
        unsafe {
            if versioned {
                delete_versioned(ptr.cast());
            } else {
                delete_legacy(ptr.cast());
            }
        }
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `PyCapsule_New` returned a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}

/// A tensor a consumer exported to us (`load_into` destinations): its layout, read from the
/// capsule, and the deleter we call when done with it.
pub struct Imported {
    pub data: u64,
    pub device: DLDevice,
    pub dtype: DLDataType,
    pub shape: Vec<i64>,
    pub contiguous: bool,
    pub read_only: bool,
    release: Release,
}

enum Release {
    Legacy(*mut DLManagedTensor),
    Versioned(*mut DLManagedTensorVersioned),
}

// SAFETY: the pointers are only used to call the producer's deleter, which DLPack allows from
// any thread.
unsafe impl Send for Imported {}

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: we consumed the capsule (renamed it), so calling the deleter once is ours.
        unsafe {
            match self.release {
                Release::Legacy(m) => {
                    if let Some(d) = (*m).deleter {
                        d(m)
                    }
                }
                Release::Versioned(m) => {
                    if let Some(d) = (*m).deleter {
                        d(m)
                    }
                }
            }
        }
    }
}

/// Consume `capsule` (a `dltensor` or `dltensor_versioned` capsule): rename it used and read
/// its tensor.
pub fn import(capsule: &Bound<'_, PyAny>) -> PyResult<Imported> {
    let raw = capsule.as_ptr();
    // SAFETY: `raw` is a live object (we hold a reference); the checks set no error.
    let (versioned, name) = unsafe {
        if ffi::PyCapsule_IsValid(raw, VERSIONED_NAME.as_ptr()) == 1 {
            (true, VERSIONED_NAME)
        } else if ffi::PyCapsule_IsValid(raw, LEGACY_NAME.as_ptr()) == 1 {
            (false, LEGACY_NAME)
        } else {
            return Err(PyBufferError::new_err("__dlpack__ did not return an unused DLPack capsule"));
        }
    };
    // SAFETY: the name matched just above.
    let ptr = unsafe { ffi::PyCapsule_GetPointer(raw, name.as_ptr()) };
    if ptr.is_null() {
        return Err(PyBufferError::new_err("empty DLPack capsule"));
    }
    let used = if versioned { USED_VERSIONED_NAME } else { USED_LEGACY_NAME };
    // SAFETY: renaming takes ownership of the tensor: the capsule's destructor will not free it.
    if unsafe { ffi::PyCapsule_SetName(raw, used.as_ptr()) } != 0 {
        return Err(PyErr::fetch(capsule.py()));
    }
    // SAFETY: the producer keeps the struct valid until its deleter is called (by `Imported`).
    let (t, flags, major, release) = unsafe {
        if versioned {
            let m = ptr.cast::<DLManagedTensorVersioned>();
            (&(*m).dl_tensor, (*m).flags, (*m).version.major, Release::Versioned(m))
        } else {
            let m = ptr.cast::<DLManagedTensor>();
            (&(*m).dl_tensor, 0, 1, Release::Legacy(m))
        }
    };
    if major != 1 || flags & FLAG_IS_COPIED != 0 {
        // Dropping it calls the producer's deleter, as DLPack asks of a consumer that refuses.
        drop(Imported {
            data: 0,
            device: t.device,
            dtype: t.dtype,
            shape: Vec::new(),
            contiguous: false,
            read_only: true,
            release,
        });
        return Err(PyBufferError::new_err(match major {
            1 => "the destination's __dlpack__ returned a copy: it cannot be filled in place".to_string(),
            m => format!("the destination speaks DLPack {m}.x; this build reads 1.x"),
        }));
    }
    let ndim = usize::try_from(t.ndim).unwrap_or(0);
    // SAFETY: DLPack: `shape` holds `ndim` entries, `strides` too when not null.
    let shape = if ndim == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(t.shape, ndim) }.to_vec() };
    let strides = if t.strides.is_null() || ndim == 0 {
        None
    } else {
        // SAFETY: as above.
        Some(unsafe { std::slice::from_raw_parts(t.strides, ndim) }.to_vec())
    };
    // Size-1 dimensions may carry any stride.
    let contiguous = strides.is_none_or(|s| {
        let expected = row_major_strides(&shape);
        s.iter().zip(&expected).zip(&shape).all(|((a, b), &d)| d <= 1 || a == b)
    });
    Ok(Imported {
        data: (t.data as u64).wrapping_add(t.byte_offset),
        device: t.device,
        dtype: t.dtype,
        shape,
        contiguous,
        read_only: flags & FLAG_READ_ONLY != 0,
        release,
    })
}

/// `obj.__dlpack__()` over `obj`'s own memory (`copy=False`), asking for DLPack 1.0 first (it
/// can say read-only), then the legacy capsule from a producer that refuses those keywords
/// (numpy < 2.1). `what` names what `obj` is for in the `TypeError` of an object without
/// `__dlpack__` ("a load_into destination", "tensor data").
pub fn export_capsule<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let method = obj.getattr("__dlpack__").map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} must support DLPack (__dlpack__), got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("max_version", (1, 0))?;
    kwargs.set_item("copy", false)?;
    match method.call((), Some(&kwargs)) {
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => method.call0(),
        other => other,
    }
}
