//! Conversion on a CUDA device: the kernels of `kernels/convert.cu`.
//!
//! [`DeviceConverter`] loads the kernels into the current CUDA context, trying in turn:
//! 1. the PTX that nvcc made at build time (`compute_80`), when `build.rs` found nvcc;
//! 2. the same PTX with its `.version` lowered to 7.0, for a driver older than that nvcc
//!    (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`); the kernels use nothing newer;
//! 3. the source compiled at run time by NVRTC (loaded dynamically) for the device's compute
//!    capability.
//!
//! Then [`DeviceConverter::launch`] converts a buffer on a stream.

use std::ffi::{c_void, CStr, CString};

use cudarc::nvrtc;

use super::driver::{self as dr, CUdevice_attribute, CUdeviceptr, CUfunction, CUmodule, CUstream};
use crate::convert::{conversion_error, table_index, TABLE};
use crate::error::{Error, Result};
use crate::format::Dtype;

/// PTX for `compute_80` made by nvcc at build time, when nvcc was found.
#[cfg(ws_convert_ptx)]
const NVCC_PTX: Option<&str> = Some(include_str!(concat!(env!("OUT_DIR"), "/convert.ptx")));
#[cfg(not(ws_convert_ptx))]
const NVCC_PTX: Option<&str> = None;

/// `kernels/convert.cu` with `kernels/convert_math.cuh` inlined, for NVRTC.
const NVRTC_SOURCE: &str = include_str!(concat!(env!("OUT_DIR"), "/convert_nvrtc.cu"));

/// Threads per block of every launch (the kernels declare `__launch_bounds__(256)`).
const BLOCK_THREADS: u32 = 256;
/// Blocks per multiprocessor at most; the kernels loop over the rest (grid-stride).
const BLOCKS_PER_SM: u32 = 16;

/// Where the kernels that a [`DeviceConverter`] runs came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// The PTX compiled by nvcc at build time.
    NvccPtx,
    /// The build-time PTX with its ISA version lowered to 7.0, for an older driver.
    NvccPtxLowered,
    /// The source compiled at run time by NVRTC for the device's compute capability.
    Nvrtc,
}

impl KernelSource {
    /// All sources, in the order [`DeviceConverter::load`] tries them.
    pub const ALL: [KernelSource; 3] = [KernelSource::NvccPtx, KernelSource::NvccPtxLowered, KernelSource::Nvrtc];
}

/// The conversion kernels, loaded in one CUDA context.
///
/// Made and used with that context current on the calling thread (the caller sets it); dropped
/// while the context still exists (the module is unloaded then; errors there are ignored).
pub struct DeviceConverter {
    module: CUmodule,
    functions: [CUfunction; TABLE.len()],
    sm_count: u32,
    source: KernelSource,
}

// SAFETY: the module and function handles are plain driver handles, valid in their context from
// any thread; the driver serialises module use internally and `launch` only reads them.
unsafe impl Send for DeviceConverter {}
// SAFETY: as above; no method mutates `self`.
unsafe impl Sync for DeviceConverter {}

impl std::fmt::Debug for DeviceConverter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceConverter")
            .field("source", &self.source)
            .field("sm_count", &self.sm_count)
            .finish_non_exhaustive()
    }
}

impl DeviceConverter {
    /// Loads the kernels into the current context, from the first [`KernelSource`] that works.
    ///
    /// Errors: [`Error::NoCudaDriver`] without libcuda; [`Error::Cuda`] when there is no current
    /// context or no source loads (the message lists why each failed).
    pub fn load() -> Result<Self> {
        let mut why = Vec::new();
        for source in KernelSource::ALL {
            match Self::with_source(source) {
                Ok(c) => return Ok(c),
                Err(e @ Error::NoCudaDriver) => return Err(e),
                Err(e) => why.push(format!("{source:?}: {e}")),
            }
        }
        Err(Error::Cuda { call: "loading the conversion kernels", message: why.join("; "), code: 0, file: None })
    }

    /// Loads the kernels into the current context from `source` only.
    pub fn with_source(source: KernelSource) -> Result<Self> {
        // cudarc's loader would panic without the library: nothing else of the driver API runs
        // before this check.
        if !dr::driver_present() {
            return Err(Error::NoCudaDriver);
        }
        let dev = dr::ctx_get_device()?;
        let attr = |a| dr::device_attribute(dev, a);
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let ptx = match source {
            KernelSource::NvccPtx => NVCC_PTX.map(str::to_owned).ok_or_else(no_ptx)?,
            KernelSource::NvccPtxLowered => NVCC_PTX.map(lower_ptx_version).ok_or_else(no_ptx)?,
            KernelSource::Nvrtc => {
                let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
                let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
                compile_with_nvrtc(major, minor)?
            }
        };
        let (module, functions) = load_module(&ptx)?;
        Ok(DeviceConverter { module, functions, sm_count: sm_count.max(1) as u32, source })
    }

    /// Where the loaded kernels came from.
    pub fn source(&self) -> KernelSource {
        self.source
    }

    /// Enqueues on `stream` the conversion of `elements` elements of `from` at `src` into `to` at
    /// `dst` (a device-to-device copy when `from == to`). Returns once the work is enqueued.
    ///
    /// Errors: [`Error::Conversion`] for a pair that is not [`crate::convert::supported`], [`Error::Cuda`]
    /// when the launch fails.
    ///
    /// # Safety
    /// 1. The context in which this converter was made is current on the calling thread, and
    ///    `stream` is a stream of that context (or null, the legacy default stream).
    /// 2. `src` is device memory of that context readable for `elements` elements of `from`, and
    ///    `dst` device memory writable for `elements` elements of `to`; they do not overlap.
    /// 3. Both stay allocated, and nothing else writes `src` or touches `dst`, until the work
    ///    enqueued on `stream` has completed.
    /// 4. Alignment: any byte address works; 16-byte aligned `src` and `dst` take the vectorised
    ///    path.
    pub unsafe fn launch(
        &self,
        from: Dtype,
        to: Dtype,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        elements: usize,
        stream: CUstream,
    ) -> Result<()> {
        if from == to {
            let bytes = from
                .bytes_for(elements as u64)
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| conversion_error(from, to, format!("{elements} elements do not fill whole bytes")))?;
            if bytes == 0 {
                return Ok(());
            }
            // SAFETY: by the caller's contract (1-3) both ranges are valid device memory of the
            // current context for `bytes` bytes, do not overlap, and outlive the copy.
            return unsafe { dr::memcpy_dtod_async(dst, src, bytes, stream) };
        }
        let i = table_index(from, to).ok_or_else(|| conversion_error(from, to, "no such conversion".into()))?;
        if elements == 0 {
            return Ok(());
        }
        let smaller = from.bits().min(to.bits()) / 8;
        let group = (16 / smaller) as usize;
        let blocks = elements
            .div_ceil(group)
            .div_ceil(BLOCK_THREADS as usize)
            .min((self.sm_count * BLOCKS_PER_SM) as usize)
            .max(1) as u32;
        let mut src = src;
        let mut dst = dst;
        let mut n = elements as u64;
        let mut params = [
            (&mut src as *mut CUdeviceptr).cast::<c_void>(),
            (&mut dst as *mut CUdeviceptr).cast::<c_void>(),
            (&mut n as *mut u64).cast::<c_void>(),
        ];
        // SAFETY: `functions[i]` is the kernel `ws_convert_<suffix>(const void*, void*,
        // unsigned long long)` of our loaded module, and `params` points at three live locals of
        // exactly those types (the driver copies them at launch). The caller guarantees the
        // context, the stream and the memory ranges (1-3).
        unsafe { dr::launch_kernel(self.functions[i], (blocks, 1, 1), (BLOCK_THREADS, 1, 1), stream, &mut params) }
    }
}

impl Drop for DeviceConverter {
    fn drop(&mut self) {
        // SAFETY: the module was loaded by us and is unloaded once; its functions are not used
        // after this. A failure (the context already gone) is ignored: nothing to release then.
        let _ = unsafe { dr::module_unload(self.module) };
    }
}

/// The PTX that nvcc made at build time, if it was found then.
pub fn embedded_ptx() -> Option<&'static str> {
    NVCC_PTX
}

/// The self-contained kernel source that NVRTC compiles (`kernels/convert.cu` with its header
/// inlined).
pub fn nvrtc_source() -> &'static str {
    NVRTC_SOURCE
}

/// Compiles the kernels to PTX with NVRTC for compute capability `major.minor` (falling back to
/// `compute_80` when this NVRTC does not know that architecture). Needs no GPU, only libnvrtc.
///
/// Errors: [`Error::Cuda`] when libnvrtc cannot be loaded or the compilation fails (with its
/// log).
pub fn compile_with_nvrtc(major: i32, minor: i32) -> Result<String> {
    // cudarc's NVRTC loader would panic without the library: no NVRTC call happens before this.
    if !dr::nvrtc_present() {
        return Err(Error::Cuda {
            call: "nvrtc",
            message: "libnvrtc could not be loaded (install the CUDA runtime compiler, or build with nvcc found)"
                .into(),
            code: 0,
            file: None,
        });
    }
    let src = CString::new(NVRTC_SOURCE).map_err(|_| Error::Cuda {
        call: "nvrtc",
        message: "kernel source contains NUL".into(),
        code: 0,
        file: None,
    })?;
    let mut archs = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    if (major, minor) != (8, 0) {
        archs.push("--gpu-architecture=compute_80".into());
    }
    let mut why = Vec::new();
    for arch in archs {
        match nvrtc_compile(&src, &arch) {
            Ok(ptx) => return Ok(ptx),
            Err(e) => why.push(format!("{arch}: {e}")),
        }
    }
    Err(Error::Cuda { call: "nvrtcCompileProgram", message: why.join("; "), code: 0, file: None })
}

fn nvrtc_compile(src: &CStr, arch: &str) -> std::result::Result<String, String> {
    let prog = nvrtc::result::create_program(src, Some(c"weightstream_convert.cu")).map_err(|e| e.to_string())?;
    let opts = [arch, "--std=c++14"];
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { nvrtc::result::compile_program(prog, &opts) };
    let out = match compiled {
        // SAFETY: `prog` is live and compiled.
        Ok(()) => unsafe { nvrtc::result::get_ptx(prog) }.map_err(|e| e.to_string()),
        Err(e) => {
            // SAFETY: `prog` is live.
            let log = unsafe { nvrtc::result::get_program_log(prog) }.unwrap_or_default();
            Err(format!("{e}: {}", c_chars_to_string(&log)))
        }
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { nvrtc::result::destroy_program(prog) };
    out.map(|ptx| c_chars_to_string(&ptx))
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

/// `ptx` with its `.version` directive set to 7.0 (CUDA 11.0, the first ISA with sm_80).
fn lower_ptx_version(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len());
    for line in ptx.split_inclusive('\n') {
        if line.trim_start().starts_with(".version ") {
            out.push_str(".version 7.0\n");
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Loads `ptx` into the current context and gets every kernel of the table.
fn load_module(ptx: &str) -> Result<(CUmodule, [CUfunction; TABLE.len()])> {
    let image = CString::new(ptx).map_err(|_| Error::Cuda {
        call: "cuModuleLoadData",
        message: "PTX contains NUL".into(),
        code: 0,
        file: None,
    })?;
    // SAFETY: `image` is a NUL-terminated PTX text that outlives the call (the driver copies it).
    // (and a context is current: ctx_get_device succeeded before); unloaded by the converter.
    let module = unsafe { dr::module_load_data(&image) }?;
    let mut functions = [std::ptr::null_mut(); TABLE.len()];
    for (slot, &(_, _, suffix)) in functions.iter_mut().zip(TABLE.iter()) {
        let name = CString::new(format!("ws_convert_{suffix}")).unwrap_or_default();
        // SAFETY: `module` was loaded above and is not unloaded until the error path below or
        // the converter's drop.
        match unsafe { dr::module_get_function(module, &name) } {
            Ok(f) => *slot = f,
            Err(e) => {
                // SAFETY: loaded above, unloaded once, nothing of it kept.
                let _ = unsafe { dr::module_unload(module) };
                return Err(e);
            }
        }
    }
    Ok((module, functions))
}

fn no_ptx() -> Error {
    Error::Cuda {
        call: "loading the conversion kernels",
        message: "no PTX was embedded at build time (nvcc was not found)".into(),
        code: 0,
        file: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_the_ptx_version() {
        let ptx = "//\n// Generated\n.version 9.5\n.target sm_80\n.address_size 64\n";
        assert_eq!(lower_ptx_version(ptx), "//\n// Generated\n.version 7.0\n.target sm_80\n.address_size 64\n");
    }

    #[test]
    fn nvrtc_source_is_self_contained() {
        assert!(!NVRTC_SOURCE.contains("#include"));
        for &(_, _, suffix) in TABLE.iter() {
            assert!(NVRTC_SOURCE.contains(&format!("X({suffix},")), "{suffix} missing from the kernels");
        }
    }
}
