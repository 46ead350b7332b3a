//! RAII types over [`super::driver`]: a device (its primary context), pinned host buffers, the
//! device arena, streams and events. Each frees what it owns in `Drop`, with its context current.

use std::sync::{Arc, Mutex};

use super::driver as r;
use crate::error::{Error, Result};
use crate::memory::StagingMemory;

/// A CUDA device with its primary context retained.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
    dev: r::CUdevice,
    ctx: r::CUcontext,
    name: String,
}

// SAFETY: a CUcontext handle may be used from any thread once made current there (`bind`).
unsafe impl Send for CudaDevice {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for CudaDevice {}

static DEVICES: Mutex<Vec<(usize, std::sync::Weak<CudaDevice>)>> = Mutex::new(Vec::new());

impl CudaDevice {
    /// Open device `ordinal` (shared while any handle lives) and make its context current.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let count = r::init_and_count()?;
        if ordinal >= count {
            return Err(Error::NoCudaDevice { ordinal, count });
        }
        let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
        devices.retain(|(_, w)| w.strong_count() > 0);
        if let Some(d) = devices.iter().find(|(o, _)| *o == ordinal).and_then(|(_, w)| w.upgrade()) {
            d.bind()?;
            return Ok(d);
        }
        let dev = r::device_get(ordinal)?;
        // SAFETY: released exactly once in Drop.
        let ctx = unsafe { r::primary_ctx_retain(dev)? };
        let d = Arc::new(CudaDevice { ordinal, dev, ctx, name: r::device_name(dev).unwrap_or_default() });
        d.bind()?;
        devices.push((ordinal, Arc::downgrade(&d)));
        Ok(d)
    }

    /// Make this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for as long as self lives.
        unsafe { r::ctx_set_current(self.ctx) }
    }

    /// The ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name (`"NVIDIA H100 80GB HBM3"`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Wait for all work queued on this device's context.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        r::ctx_synchronize()
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        r::mem_get_info()
    }

    /// Whether the device can DMA from read-only page-locked memory (a file's page cache mapped
    /// read-only), which the zero-copy stage needs.
    pub fn supports_read_only_register(&self) -> Result<bool> {
        r::supports_read_only_register(self.dev)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: balances the retain in open; every object of this context holds an Arc to
        // self, so none is alive any more.
        let _ = unsafe { r::primary_ctx_release(self.dev) };
    }
}

/// Page-locked host memory (flags 0: cached, not write-combined), freed in `Drop`.
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    dev: Arc<CudaDevice>,
}

// SAFETY: PinnedBuf owns its memory exclusively.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    /// Allocate `len` bytes of pinned memory usable by `dev`.
    pub fn new(dev: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        dev.bind()?;
        // SAFETY: a context is current; freed in Drop.
        let ptr = unsafe { r::host_alloc(len)? };
        Ok(PinnedBuf { ptr, len, dev: Arc::clone(dev) })
    }
}

impl StagingMemory for PinnedBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_pinned(&self) -> bool {
        true
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new; the staging ring only drops a slot after the sink released
        // it (its copy's event fired), so no copy still reads it.
        let _ = self.dev.bind().and_then(|()| unsafe { r::host_free(self.ptr) });
    }
}

/// One device allocation holding every tensor of a load, freed as one in `Drop`.
#[derive(Debug)]
pub struct DeviceArena {
    ptr: r::CUdeviceptr,
    len: usize,
    dev: Arc<CudaDevice>,
}

impl DeviceArena {
    /// Allocate `len` bytes on `dev`; out of memory is [`Error::DeviceOutOfMemory`].
    pub fn alloc(dev: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        dev.bind()?;
        // SAFETY: a context is current; freed in Drop.
        match unsafe { r::mem_alloc(len) } {
            Ok(ptr) => Ok(DeviceArena { ptr, len, dev: Arc::clone(dev) }),
            Err(e) if r::is_out_of_memory(&e) => Err(Error::DeviceOutOfMemory {
                ordinal: dev.ordinal(),
                requested: len as u64,
                free: r::mem_get_info().map(|(f, _)| f as u64).unwrap_or(0),
            }),
            Err(e) => Err(e),
        }
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Copy `len` bytes at `offset` back to the host.
    pub fn copy_to_host(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.len as u64);
        if end.is_none() {
            let expected = format!("within the arena of {} bytes", self.len);
            return Err(Error::bad_option("range", format!("{offset}+{len}"), expected));
        }
        let mut out = vec![0u8; len];
        if len > 0 {
            self.dev.bind()?;
            // SAFETY: the range is inside the arena (checked); loads finish their streams before
            // a LoadedModel exists, so no write is pending.
            unsafe { r::memcpy_dtoh(&mut out, self.ptr + offset)? };
        }
        Ok(out)
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        // SAFETY: allocated in alloc; every stream that wrote it was synchronized before the
        // arena was handed out or before the failed load returned.
        let _ = self.dev.bind().and_then(|()| unsafe { r::mem_free(self.ptr) });
    }
}

/// A non-blocking stream, synchronized and destroyed in `Drop`.
pub struct Stream {
    pub(crate) raw: r::CUstream,
    dev: Arc<CudaDevice>,
}

impl Stream {
    /// Create a stream on `dev`.
    pub fn new(dev: &Arc<CudaDevice>) -> Result<Self> {
        dev.bind()?;
        // SAFETY: a context is current; destroyed in Drop.
        let raw = unsafe { r::stream_create()? };
        Ok(Stream { raw, dev: Arc::clone(dev) })
    }

    /// Wait for all work queued on it.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: the stream lives as long as self.
        unsafe { r::stream_synchronize(self.raw) }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.dev.bind();
        // SAFETY: owned stream; synchronize first so nothing queued outlives its memory.
        unsafe {
            let _ = r::stream_synchronize(self.raw);
            let _ = r::stream_destroy(self.raw);
        }
    }
}

/// An event, destroyed in `Drop`.
pub struct Event {
    pub(crate) raw: r::CUevent,
    recorded: std::sync::atomic::AtomicBool,
    dev: Arc<CudaDevice>,
}

impl Event {
    /// Create an event on `dev`.
    pub fn new(dev: &Arc<CudaDevice>, timing: bool) -> Result<Self> {
        dev.bind()?;
        // SAFETY: a context is current; destroyed in Drop.
        let raw = unsafe { r::event_create(timing)? };
        Ok(Event { raw, recorded: false.into(), dev: Arc::clone(dev) })
    }

    /// Record it on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both live and of the same device.
        unsafe { r::event_record(self.raw, stream.raw)? };
        self.recorded.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Block until it fired (returns at once if never recorded).
    pub fn synchronize(&self) -> Result<()> {
        if !self.recorded.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        // SAFETY: live event.
        unsafe { r::event_synchronize(self.raw) }
    }

    /// Milliseconds from `start` to this event (both fired, timing enabled).
    pub fn elapsed_since(&self, start: &Event) -> Result<f32> {
        // SAFETY: both live; the driver reports an error if not complete or not timed.
        unsafe { r::event_elapsed_ms(start.raw, self.raw) }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.dev.bind();
        // SAFETY: owned event, not used afterwards.
        let _ = unsafe { r::event_destroy(self.raw) };
    }
}
