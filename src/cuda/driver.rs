//! Thin `Result` wrappers over the CUDA driver API (cudarc's `sys`, loaded dynamically).
//!
//! This is the only module that calls `cudarc::driver::sys`. Functions stay `unsafe` where the
//! order of calls or the lifetime of memory matters; each lists its rules under `# Safety`.
//! [`driver_present`] must have returned true before any other function here is called: cudarc's
//! loader panics when libcuda is missing.

use std::ffi::{c_void, CStr};

use cudarc::driver::sys;

pub use sys::{CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUfunction, CUmodule, CUstream};

use crate::error::{Error, Result};

/// Whether libcuda can be loaded. Cheap after the first call.
pub fn driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen the library by name.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn check(call: &'static str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    let message = unsafe {
        sys::cuGetErrorString(r, &mut s);
        if s.is_null() {
            format!("{r:?}")
        } else {
            format!("{} ({r:?})", CStr::from_ptr(s).to_string_lossy())
        }
    };
    Err(Error::Cuda { call, code: r as u32, message, file: None })
}

/// Whether `e` is the driver's out-of-memory error.
pub fn is_out_of_memory(e: &Error) -> bool {
    matches!(e, Error::Cuda { code, .. } if *code == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32)
}

/// `cuInit(0)` then `cuDeviceGetCount`. Requires [`driver_present`].
pub fn init_and_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoCudaDriver);
    }
    // SAFETY: the driver is present; cuInit may be called any number of times.
    let r = unsafe { sys::cuInit(0) };
    if r == sys::CUresult::CUDA_ERROR_NO_DEVICE {
        return Ok(0);
    }
    check("cuInit", r)?;
    let mut n = 0;
    // SAFETY: writes one int.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(n.max(0) as usize)
}

/// The device handle of `ordinal`.
pub fn device_get(ordinal: usize) -> Result<CUdevice> {
    let mut d = 0;
    // SAFETY: writes one handle; the driver validates the ordinal.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut d, ordinal as i32) })?;
    Ok(d)
}

/// The device's name.
pub fn device_name(dev: CUdevice) -> Result<String> {
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: the driver writes at most len bytes, NUL-terminated.
    check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, dev) })?;
    // SAFETY: NUL-terminated by the driver within the buffer.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Retain the device's primary context.
///
/// # Safety
/// 1. Balance with one [`primary_ctx_release`].
pub unsafe fn primary_ctx_retain(dev: CUdevice) -> Result<CUcontext> {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: writes one handle.
    check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
    Ok(ctx)
}

/// Release the primary context.
///
/// # Safety
/// 1. One call per successful [`primary_ctx_retain`]; no memory of the context used after.
pub unsafe fn primary_ctx_release(dev: CUdevice) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuDevicePrimaryCtxRelease", unsafe { sys::cuDevicePrimaryCtxRelease_v2(dev) })
}

/// Make `ctx` current on this thread.
///
/// # Safety
/// 1. `ctx` is a live context.
pub unsafe fn ctx_set_current(ctx: CUcontext) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })
}

/// Wait for all work of the current context.
pub fn ctx_synchronize() -> Result<()> {
    // SAFETY: no arguments; returns an error code without a current context.
    check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
}

/// (free, total) bytes of the current context's device.
pub fn mem_get_info() -> Result<(usize, usize)> {
    let (mut free, mut total) = (0, 0);
    // SAFETY: writes two sizes; needs a current context, else returns an error code.
    check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
    Ok((free, total))
}

/// Allocate `bytes` of device memory in the current context.
///
/// # Safety
/// 1. A context is current. 2. Free with [`mem_free`].
pub unsafe fn mem_alloc(bytes: usize) -> Result<CUdeviceptr> {
    let mut p = 0;
    // SAFETY: writes one pointer.
    check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(1)) })?;
    Ok(p)
}

/// Free device memory.
///
/// # Safety
/// 1. `p` came from [`mem_alloc`] and no stream still uses it.
pub unsafe fn mem_free(p: CUdeviceptr) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuMemFree", unsafe { sys::cuMemFree_v2(p) })
}

/// Allocate page-locked host memory with flags 0: cached, fast for the CPU to write and read
/// (unlike cudarc's write-combined `alloc_pinned`), and DMA-able by the device.
///
/// # Safety
/// 1. A context is current. 2. Free with [`host_free`].
pub unsafe fn host_alloc(bytes: usize) -> Result<*mut u8> {
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: writes one pointer.
    check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut p, bytes.max(1), 0) })?;
    Ok(p.cast())
}

/// Free page-locked host memory.
///
/// # Safety
/// 1. `p` came from [`host_alloc`]; no copy still reads it.
pub unsafe fn host_free(p: *mut u8) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(p.cast()) })
}

/// Whether `dev` can page-lock read-only memory (a file mapped `PROT_READ`) with
/// [`host_register_read_only`].
pub fn supports_read_only_register(dev: CUdevice) -> Result<bool> {
    let mut v = 0;
    let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED;
    // SAFETY: writes one int; the driver validates the device.
    check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut v, attr, dev) })?;
    Ok(v != 0)
}

/// Page-lock `p..p+bytes` (read-only memory allowed) so that the device can DMA from it.
///
/// # Safety
/// 1. A context is current. 2. `p` and `bytes` are multiples of the page size and the range is
///    mapped for reading. 3. Unregister with [`host_unregister`] before unmapping it.
pub unsafe fn host_register_read_only(p: *const u8, bytes: usize) -> Result<()> {
    // SAFETY: per this function's contract; the driver only reads through the registration.
    check("cuMemHostRegister", unsafe {
        sys::cuMemHostRegister_v2(p as *mut c_void, bytes, sys::CU_MEMHOSTREGISTER_READ_ONLY)
    })
}

/// Undo [`host_register_read_only`].
///
/// # Safety
/// 1. `p` was registered by [`host_register_read_only`]; no copy still reads it.
pub unsafe fn host_unregister(p: *const u8) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuMemHostUnregister", unsafe { sys::cuMemHostUnregister(p as *mut c_void) })
}

/// Queue a host-to-device copy.
///
/// # Safety
/// 1. `src..src+bytes` is readable (pinned for a truly asynchronous copy) and stays valid and
///    unmodified until the stream has passed this copy.
/// 2. `dst..dst+bytes` is inside a live device allocation.
pub unsafe fn memcpy_htod_async(dst: CUdeviceptr, src: *const u8, bytes: usize, stream: CUstream) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), bytes, stream) })
}

/// Queue a strided host-to-device copy: `height` rows of `width` bytes, row `i` read at
/// `src + i * spitch` and written at `dst + i * dpitch` (the rows of a shard's block, one call).
///
/// # Safety
/// 1. Every source row is readable (pinned for a truly asynchronous copy) and stays valid and
///    unmodified until the stream has passed this copy.
/// 2. Every destination row is inside a live device allocation.
pub unsafe fn memcpy_2d_htod_async(
    dst: CUdeviceptr,
    dpitch: usize,
    src: *const u8,
    spitch: usize,
    (width, height): (usize, usize),
    stream: CUstream,
) -> Result<()> {
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
        srcHost: src.cast(),
        srcDevice: 0,
        srcArray: std::ptr::null_mut(),
        srcPitch: spitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dpitch,
        WidthInBytes: width,
        Height: height,
    };
    // SAFETY: per this function's contract; the descriptor is read during the call only.
    check("cuMemcpy2DAsync", unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream) })
}

/// Queue a device-to-device copy.
///
/// # Safety
/// 1. Both ranges are inside live device allocations.
pub unsafe fn memcpy_dtod_async(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream) })
}

/// Synchronous device-to-host copy.
///
/// # Safety
/// 1. `src..src+dst.len()` is inside a live device allocation with no pending writes.
pub unsafe fn memcpy_dtoh(dst: &mut [u8], src: CUdeviceptr) -> Result<()> {
    // SAFETY: per this function's contract; dst is a valid host slice.
    check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) })
}

/// Create a non-blocking stream.
///
/// # Safety
/// 1. A context is current. 2. Destroy with [`stream_destroy`].
pub unsafe fn stream_create() -> Result<CUstream> {
    let mut s = std::ptr::null_mut();
    let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
    // SAFETY: writes one handle.
    check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, flags) })?;
    Ok(s)
}

/// Wait for everything queued on `s`.
///
/// # Safety
/// 1. `s` is live.
pub unsafe fn stream_synchronize(s: CUstream) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) })
}

/// Destroy a stream.
///
/// # Safety
/// 1. `s` is live and not used afterwards.
pub unsafe fn stream_destroy(s: CUstream) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuStreamDestroy", unsafe { sys::cuStreamDestroy_v2(s) })
}

/// Create an event (timing enabled when `timing`).
///
/// # Safety
/// 1. A context is current. 2. Destroy with [`event_destroy`].
pub unsafe fn event_create(timing: bool) -> Result<CUevent> {
    let mut e = std::ptr::null_mut();
    let flags = if timing { 0 } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32 };
    // SAFETY: writes one handle.
    check("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, flags) })?;
    Ok(e)
}

/// Record `e` on `s`.
///
/// # Safety
/// 1. Both live, same context.
pub unsafe fn event_record(e: CUevent, s: CUstream) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuEventRecord", unsafe { sys::cuEventRecord(e, s) })
}

/// Block until `e` has fired.
///
/// # Safety
/// 1. `e` is live.
pub unsafe fn event_synchronize(e: CUevent) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(e) })
}

/// Milliseconds between two fired timing events.
///
/// # Safety
/// 1. Both live, recorded, completed, created with timing.
pub unsafe fn event_elapsed_ms(start: CUevent, end: CUevent) -> Result<f32> {
    let mut ms = 0f32;
    // SAFETY: per this function's contract.
    check("cuEventElapsedTime", unsafe { sys::cuEventElapsedTime(&mut ms, start, end) })?;
    Ok(ms)
}

/// Destroy an event.
///
/// # Safety
/// 1. `e` is live and not used afterwards.
pub unsafe fn event_destroy(e: CUevent) -> Result<()> {
    // SAFETY: per this function's contract.
    check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(e) })
}

/// Whether libnvrtc can be loaded (cudarc's NVRTC loader panics when it is missing).
pub fn nvrtc_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library by name.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// `cuCtxGetDevice`: the device of the context current on this thread. Requires
/// [`driver_present`].
pub fn ctx_get_device() -> Result<CUdevice> {
    let mut dev: CUdevice = 0;
    // SAFETY: writes one CUdevice into `dev`.
    check("cuCtxGetDevice (is a CUDA context current?)", unsafe { sys::cuCtxGetDevice(&mut dev) })?;
    Ok(dev)
}

/// `cuDeviceGetAttribute`.
pub fn device_attribute(dev: CUdevice, attr: CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: writes one int; an invalid device is reported as an error code.
    check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut v, attr, dev) })?;
    Ok(v)
}

/// `cuModuleLoadData` of a NUL-terminated PTX image.
///
/// # Safety
/// 1. A context must be current on this thread.
/// 2. The module must be unloaded with [`module_unload`] while that context exists.
pub unsafe fn module_load_data(image: &CStr) -> Result<CUmodule> {
    let mut m = std::ptr::null_mut();
    // SAFETY: `image` is NUL-terminated and outlives the call (the driver copies it).
    check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut m, image.as_ptr().cast()) })?;
    Ok(m)
}

/// `cuModuleGetFunction`.
///
/// # Safety
/// `module` must be loaded and not unloaded; the function is valid until it is.
pub unsafe fn module_get_function(module: CUmodule, name: &CStr) -> Result<CUfunction> {
    let mut f = std::ptr::null_mut();
    // SAFETY: writes one handle; `module` is live by the caller's contract.
    check("cuModuleGetFunction", unsafe { sys::cuModuleGetFunction(&mut f, module, name.as_ptr()) })?;
    Ok(f)
}

/// `cuModuleUnload`.
///
/// # Safety
/// `module` was loaded, is unloaded once, and none of its functions is used afterwards.
pub unsafe fn module_unload(module: CUmodule) -> Result<()> {
    // SAFETY: by the caller's contract.
    check("cuModuleUnload", unsafe { sys::cuModuleUnload(module) })
}

/// `cuLaunchKernel` of `f` on `stream` with no dynamic shared memory.
///
/// # Safety
/// 1. `params` points at live values of exactly the kernel's parameter types, in order.
/// 2. The memory the kernel touches is valid device memory of the current context until the
///    launch has run on `stream`.
pub unsafe fn launch_kernel(
    f: CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: by the caller's contract; the driver copies the parameters at launch.
    check("cuLaunchKernel", unsafe {
        sys::cuLaunchKernel(
            f,
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            0,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}
