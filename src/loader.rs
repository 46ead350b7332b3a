//! The `Loader` builder and the read pipeline it drives: plan -> read engine -> staging -> target.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::convert::workers::{JobError, ReadConvertJob, ReadConvertWorkers};
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::{open_engine, EngineOptions, Fault, FaultyEngine, IoKind, RawEngine, ReadQueue, ReadRequest};
use crate::model::{LoadStats, LoadedModel, Storage, TensorMeta};
use crate::plan::{Plan, PlanOptions};
use crate::progress::{Progress, ProgressFn};
use crate::source::Checkpoint;
use crate::stage::StagingRing;
use crate::target::{Device, HostMemory, HostSink, NullSink, Sink};
use crate::trace::TraceRecorder;

/// Alignment O_DIRECT needs for offsets, lengths and buffer addresses.
const DIRECT_ALIGN: u64 = 4096;

/// Reads in flight at most (an io_uring of 4096 entries has 8192 completion slots).
const MAX_IN_FLIGHT: usize = 4096;

/// Most reader threads a loader starts (far past what a disk or the page cache can use; more
/// only risks running out of threads).
const MAX_THREADS: usize = 256;

/// `v` rounded up to a multiple of `m`, or down where rounding up would overflow.
fn round_to_multiple(v: usize, m: usize) -> usize {
    v.checked_next_multiple_of(m).unwrap_or(v / m * m)
}

/// Cancels a load from another thread: the load returns [`Error::Cancelled`] with everything it
/// allocated freed.
///
/// ```
/// let token = weightstream::CancelToken::new();
/// let loader = weightstream::Loader::new().cancel_token(token.clone());
/// token.cancel();
/// # drop(loader);
/// ```
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the load to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    /// Whether cancellation was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Staging buffers kept between loads of one `Loader`.
#[derive(Default)]
struct Rings {
    host: Option<StagingRing>,
    /// The conversion kernels, loaded once per device (a module load can JIT-compile PTX).
    /// Declared before the pinned ring so that it drops first: the ring's buffers hold the
    /// device's context, which the module needs until it is unloaded.
    #[cfg(feature = "cuda")]
    converter: Option<(usize, Arc<crate::convert::cuda::DeviceConverter>)>,
    #[cfg(feature = "cuda")]
    pinned: Option<(usize, StagingRing)>,
}

/// Loads checkpoints. Build it once, load many times: the staging ring is allocated on the first
/// load and reused by the next ones.
///
/// ```
/// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
/// let dir = tempfile::tempdir()?;
/// let p = dir.path().join("m.safetensors");
/// let data = [0u8, 0x3c, 0, 0x40]; // f16 1.0, 2.0
/// write_file(&p, &[WriteTensor::new("w", Dtype::F16, vec![2], &data)], &Default::default())?;
/// let model = Loader::new().device(Device::Cpu).dtype(Dtype::F32).load(&p)?;
/// let w = model.tensor("w").ok_or("missing tensor")?;
/// assert_eq!(w.dtype(), Dtype::F32);
/// assert_eq!(w.to_host_vec()?, [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Loader {
    device: Device,
    only: Vec<String>,
    dtype: Option<Dtype>,
    overrides: Vec<(String, Dtype)>,
    io: IoKind,
    direct: bool,
    staging_size: usize,
    staging_count: usize,
    queue_depth: usize,
    threads: usize,
    read_size: usize,
    streams: usize,
    progress: Option<ProgressFn>,
    cancel: Option<CancelToken>,
    trace: bool,
    zero_copy: bool,
    fault: Option<Fault>,
    rings: Arc<Mutex<Rings>>,
}

impl Default for Loader {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device)
            .field("only", &self.only)
            .field("dtype", &self.dtype)
            .field("io", &self.io)
            .field("direct", &self.direct)
            .field("staging", &(self.staging_count, self.staging_size))
            .finish()
    }
}

impl Loader {
    /// A loader with defaults: device `auto`, every tensor, dtypes kept, io `auto`, a ring of
    /// 8 × 16 MiB filled by 2 MiB reads (the best measured on an H100 host, BENCHMARKS.md).
    pub fn new() -> Self {
        let eo = EngineOptions::default();
        Loader {
            device: Device::Auto,
            only: Vec::new(),
            dtype: None,
            overrides: Vec::new(),
            io: IoKind::Auto,
            direct: false,
            staging_size: 16 << 20,
            staging_count: 8,
            queue_depth: eo.queue_depth,
            threads: eo.threads,
            read_size: 2 << 20,
            streams: 2,
            progress: None,
            cancel: None,
            trace: false,
            zero_copy: false,
            fault: None,
            rings: Arc::default(),
        }
    }

    /// Target device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Load only tensors whose name matches this glob (repeatable: any match selects).
    pub fn only(mut self, glob: impl Into<String>) -> Self {
        self.only.push(glob.into());
        self
    }

    /// Convert F16/BF16/F32/F64 tensors to `dtype` (F32, F16 or BF16); others load unchanged.
    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Convert the tensor `name` to `dtype` (any supported pair, fp8 upcasts included).
    pub fn dtype_for(mut self, name: impl Into<String>, dtype: Dtype) -> Self {
        self.overrides.push((name.into(), dtype));
        self
    }

    /// Read engine. (Converted loads to `cpu` without O_DIRECT read with pread in the
    /// conversion workers, which convert each piece on the core that read it.)
    pub fn io(mut self, io: IoKind) -> Self {
        self.io = io;
        self
    }

    /// Open files with O_DIRECT (bypass the page cache).
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Size of one staging buffer (rounded up to 64 KiB; at least 64 KiB).
    pub fn staging_size(mut self, bytes: usize) -> Self {
        self.staging_size = round_to_multiple(bytes.max(64 << 10), 64 << 10);
        self
    }

    /// Number of staging buffers.
    pub fn staging_count(mut self, count: usize) -> Self {
        self.staging_count = count.max(1);
        self
    }

    /// Reads in flight at most (cpu target).
    pub fn queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth.max(1);
        self
    }

    /// Reader threads, 1 to 256: the pread engine's pool, the bound on io_uring's workers, the
    /// read-and-convert workers of converted cpu loads, and (up to 8) the registrars of
    /// [`Loader::zero_copy`].
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, MAX_THREADS);
        self
    }

    /// Size of one read request (a staging buffer is filled by several in parallel).
    pub fn read_size(mut self, bytes: usize) -> Self {
        self.read_size = round_to_multiple(bytes.max(DIRECT_ALIGN as usize), DIRECT_ALIGN as usize);
        self
    }

    /// CUDA streams the copies are spread over.
    pub fn streams(mut self, streams: usize) -> Self {
        self.streams = streams.max(1);
        self
    }

    /// Call `f` after each delivered extent.
    pub fn progress(mut self, f: ProgressFn) -> Self {
        self.progress = Some(f);
        self
    }

    /// Cancel through `token`.
    pub fn cancel_token(mut self, token: CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Record a trace of reads and copies, available from [`LoadedModel::trace`].
    pub fn trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }

    /// Experimental (CUDA target, buffered reads): the device copies straight out of the page
    /// cache, with no CPU copy; each 16 MiB window of a file is mapped read-only and page-locked
    /// in place (`cuMemHostRegister`) while its copies run. Loads that convert, or use O_DIRECT,
    /// keep the staging ring. Not yet measured on a GPU: see BENCHMARKS.md before relying on it.
    ///
    /// ```
    /// let loader = weightstream::Loader::new().zero_copy(true);
    /// # drop(loader);
    /// ```
    pub fn zero_copy(mut self, on: bool) -> Self {
        self.zero_copy = on;
        self
    }

    /// Inject a read fault (tests of the error paths).
    #[doc(hidden)]
    pub fn inject_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Bytes of staging memory this loader holds once it has loaded (the ring).
    pub fn staging_bytes(&self) -> usize {
        self.staging_size.saturating_mul(self.staging_count)
    }

    /// Load the checkpoint at `path` (a file, an index, a directory, or a Hugging Face cache
    /// folder).
    pub fn load(&self, path: impl AsRef<Path>) -> Result<LoadedModel> {
        let ckpt = Checkpoint::open(path.as_ref())?;
        self.load_checkpoint(&ckpt)
    }

    /// Load without blocking the tokio runtime's workers (the load runs on the blocking pool).
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// # weightstream::format::write_file(&p, &[weightstream::format::WriteTensor::new("w", weightstream::Dtype::U8, vec![1], &[1])], &Default::default())?;
    /// let rt = tokio::runtime::Builder::new_current_thread().build()?;
    /// let model = rt.block_on(weightstream::Loader::new().device(weightstream::Device::Cpu).load_async(&p))?;
    /// assert_eq!(model.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load_async(
        &self,
        path: impl AsRef<Path>,
    ) -> impl std::future::Future<Output = Result<LoadedModel>> + Send + 'static {
        let loader = self.clone();
        let path: PathBuf = path.as_ref().to_path_buf();
        async move {
            tokio::task::spawn_blocking(move || loader.load(path))
                .await
                .map_err(|e| Error::option(format!("load task failed: {e}")))?
        }
    }

    fn out_dtype(&self, name: &str, stored: Dtype) -> Dtype {
        if let Some((_, d)) = self.overrides.iter().rev().find(|(n, _)| n == name) {
            return *d;
        }
        match self.dtype {
            Some(to) if stored.is_convertible_float() => to,
            _ => stored,
        }
    }

    /// Resolve `auto`.
    pub fn resolved_device(&self) -> Device {
        match self.device {
            Device::Auto if crate::target::cuda_available() => Device::Cuda(0),
            Device::Auto => Device::Cpu,
            d => d,
        }
    }

    /// Load an already opened checkpoint.
    pub fn load_checkpoint(&self, ckpt: &Checkpoint) -> Result<LoadedModel> {
        let started = Instant::now();
        let device = self.resolved_device();
        if let Some(to) = self.dtype {
            if !matches!(to, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::option(format!("--dtype {to}: only F32, F16 and BF16 are targets")));
            }
        }
        if self.zero_copy && !matches!(device, Device::Cuda(_)) {
            return Err(Error::option(format!("--zero-copy needs a CUDA device, not {device}")));
        }
        let select = build_filter(&self.only)?;
        let staged_chunk = self.staging_size as u64 - if self.direct { 2 * DIRECT_ALIGN } else { 0 };
        // Extents no larger than a zero-copy window (still within a staging slot).
        #[cfg(feature = "cuda")]
        let staged_chunk = match self.zero_copy {
            true => staged_chunk.min(crate::target::cuda::mapped::WINDOW_BYTES),
            false => staged_chunk,
        };
        let plan = Plan::new(
            ckpt,
            &|n| select.as_ref().is_none_or(|g| g.is_match(n)),
            &|n, d| self.out_dtype(n, d),
            PlanOptions { chunk_bytes: staged_chunk, ..PlanOptions::default() },
        )?;
        for t in plan.tensors.iter().filter(|t| t.converts()) {
            if !crate::convert::supported(t.dtype, t.out_dtype) {
                return Err(Error::UnsupportedConversion {
                    file: plan.files[t.file].path.clone(),
                    tensor: t.name.clone(),
                    from: t.dtype.name(),
                    to: t.out_dtype.name(),
                });
            }
        }
        let files = self.open_files(&plan)?;
        let mut trace = self.trace.then(TraceRecorder::new);
        let direct_to_host = device == Device::Cpu && !self.direct;
        // The engine is sized for the most reads the chosen path keeps in flight, so that an
        // io_uring's completion queue (twice its entries) can never overflow.
        let depth = if direct_to_host {
            self.queue_depth.max(self.threads * 2).min(MAX_IN_FLIGHT)
        } else {
            self.staged_depth()
        };
        // Converted loads to cpu read with the conversion workers' own preads.
        let read_convert = direct_to_host && plan.tensors.iter().any(|t| t.converts());
        // Experimental DMA from the page cache: buffered reads without conversion only.
        let mapped = self.zero_copy
            && matches!(device, Device::Cuda(_))
            && !self.direct
            && !plan.tensors.iter().any(|t| t.converts());
        let engine = if read_convert || mapped { None } else { Some(self.engine(depth)?) };
        let io_name = match &engine {
            Some(e) => e.name(),
            None if mapped => "mmap+register",
            None => "pread",
        };
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());

        let mut bytes_read = plan.bytes_to_read();
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut device_scratch_bytes = 0;
        // Every path but the read-and-convert one has an engine.
        let engine = move || engine.ok_or_else(|| Error::option("internal: no read engine"));
        let (storage, staging_bytes, pinned) = match device {
            Device::Cpu if direct_to_host => {
                // Reads per tensor: gaps that a staged extent would read through are skipped.
                bytes_read = plan.tensors.iter().map(|t| t.src_len).sum();
                // Not prefaulted: faulting pages in during the reads measured 1.6× faster on
                // the 2-core build machine than populating them first (BENCHMARKS.md).
                let mut arena = HostMemory::new(plan.arena_len as usize)?;
                let buffers = if read_convert {
                    self.run_read_convert(&plan, &files, &mut arena, trace.as_mut())?
                } else {
                    let mut queue = ReadQueue::new(engine()?, depth);
                    self.run_direct_host(&plan, &files, &mut arena, &mut queue, trace.as_mut())?;
                    0
                };
                (Storage::Host(arena), buffers, false)
            }
            Device::Cpu | Device::Null => {
                let ring = self.host_ring(&mut rings)?;
                let mut queue = ReadQueue::new(engine()?, depth);
                let storage = if device == Device::Null {
                    self.run_staged(&plan, &files, ring, &mut NullSink, &mut queue, trace.as_mut())?;
                    Storage::Null
                } else {
                    let mut arena = HostMemory::new(plan.arena_len as usize)?;
                    self.run_staged(
                        &plan,
                        &files,
                        ring,
                        &mut HostSink { arena: &mut arena },
                        &mut queue,
                        trace.as_mut(),
                    )?;
                    Storage::Host(arena)
                };
                (storage, ring.total_bytes() as u64, false)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) if mapped => {
                use crate::target::cuda;
                let dev = cuda::CudaDevice::open(ordinal)?;
                let arena = cuda::DeviceArena::alloc(&dev, plan.arena_len as usize)?;
                let total = plan.bytes_to_read();
                let mut done = 0;
                let mut on_done = |bytes: u64, file: usize| {
                    done += bytes;
                    self.report(done, total, &plan.files[file].path);
                    self.check_cancel()
                };
                // Registration threads: as many as readers would be, at most one per pinned window.
                let registrars = self.threads.min(cuda::mapped::WINDOWS_PINNED);
                cuda::mapped::run_mapped(
                    &dev,
                    &arena,
                    &plan,
                    &files,
                    self.streams,
                    registrars,
                    trace.as_mut(),
                    &mut on_done,
                )?;
                (Storage::Cuda(arena), 0, false)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                use crate::target::cuda;
                let dev = cuda::CudaDevice::open(ordinal)?;
                // One reborrow of the guard, so the ring and the converter borrow apart.
                let rings: &mut Rings = &mut rings;
                let ring = match &mut rings.pinned {
                    Some((o, r))
                        if *o == ordinal
                            && r.slot_size() == self.staging_size
                            && r.slot_count() == self.staging_count =>
                    {
                        r
                    }
                    slot => {
                        *slot = None; // free the old ring before pinning a new one
                        let r = cuda::pinned_ring(&dev, self.staging_count, self.staging_size)?;
                        &mut slot.insert((ordinal, r)).1
                    }
                };
                let arena = cuda::DeviceArena::alloc(&dev, plan.arena_len as usize)?;
                let converter = if plan.tensors.iter().any(|t| t.converts()) {
                    match &rings.converter {
                        Some((o, c)) if *o == ordinal => Some(Arc::clone(c)),
                        _ => {
                            let c = Arc::new(crate::convert::cuda::DeviceConverter::load()?);
                            rings.converter = Some((ordinal, Arc::clone(&c)));
                            Some(c)
                        }
                    }
                } else {
                    None
                };
                let mut sink = cuda::CudaSink::new(&dev, &arena, &plan, ring, self.streams, self.trace, converter)?;
                let mut queue = ReadQueue::new(engine()?, depth);
                let run = self.run_staged(&plan, &files, ring, &mut sink, &mut queue, trace.as_mut());
                if let (Some(t), Ok(())) = (trace.as_mut(), &run) {
                    sink.write_trace(t)?;
                }
                device_scratch_bytes = sink.scratch_bytes();
                drop(sink);
                run?;
                (Storage::Cuda(arena), ring.total_bytes() as u64, true)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::CudaNotBuilt),
            Device::Auto => unreachable!("resolved above"),
        };
        drop(rings);
        drop(files);
        let stats = LoadStats {
            device,
            io: io_name,
            direct: self.direct,
            bytes_read,
            bytes_loaded: plan.bytes_loaded(),
            seconds: started.elapsed().as_secs_f64(),
            staging_bytes,
            pinned,
            device_scratch_bytes,
        };
        let tensors = plan
            .tensors
            .into_iter()
            .map(|t| TensorMeta {
                name: t.name,
                dtype: t.out_dtype,
                stored_dtype: t.dtype,
                shape: t.shape,
                offset: t.arena_offset,
                len: t.out_len,
            })
            .collect();
        let mut model = LoadedModel::new(device, tensors, storage, stats);
        model.trace = trace;
        Ok(model)
    }

    fn engine(&self, depth: usize) -> Result<Box<dyn RawEngine>> {
        let opts = EngineOptions { kind: self.io, queue_depth: depth.max(64), threads: self.threads };
        let engine = open_engine(&opts, self.direct)
            .map_err(|e| Error::option(format!("cannot start the {:?} read engine: {e}", self.io)))?;
        Ok(match self.fault {
            Some(f) => Box::new(FaultyEngine::new(engine, f)),
            None => engine,
        })
    }

    /// Read size on the staged path: as asked, but at least 1/1024 of a slot, so that one slot
    /// never needs more reads than the engine can hold.
    fn staged_read_size(&self) -> usize {
        let min = (self.staging_size / 1024).div_ceil(DIRECT_ALIGN as usize) * DIRECT_ALIGN as usize;
        self.read_size.max(min)
    }

    /// Reads in flight at most on the staged path: every slot's reads (one more per slot for
    /// O_DIRECT's alignment), bounded by what an io_uring can hold.
    fn staged_depth(&self) -> usize {
        let per_slot = self.staging_size.div_ceil(self.staged_read_size()) + 1;
        self.staging_count.saturating_mul(per_slot).min(MAX_IN_FLIGHT)
    }

    fn host_ring<'r>(&self, rings: &'r mut Rings) -> Result<&'r mut StagingRing> {
        match &mut rings.host {
            Some(r) if r.slot_size() == self.staging_size && r.slot_count() == self.staging_count => {}
            slot => {
                *slot = None; // free the old ring before mapping the new one
                *slot = Some(StagingRing::host(self.staging_count, self.staging_size)?);
            }
        }
        Ok(rings.host.as_mut().expect("set above")) // ok: assigned in the match
    }

    fn open_files(&self, plan: &Plan) -> Result<Vec<File>> {
        plan.files
            .iter()
            .map(|f| {
                let mut o = std::fs::OpenOptions::new();
                o.read(true);
                if self.direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                o.open(&f.path).map_err(|e| {
                    if self.direct && e.raw_os_error() == Some(libc::EINVAL) {
                        Error::Io {
                            file: f.path.clone(),
                            tensor: None,
                            source: std::io::Error::new(
                                e.kind(),
                                "this filesystem does not support O_DIRECT (--direct)",
                            ),
                        }
                    } else {
                        Error::io(&f.path, e)
                    }
                })
            })
            .collect()
    }

    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(t) if t.is_cancelled() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    fn report(&self, done: u64, total: u64, file: &Path) {
        if let Some(p) = &self.progress {
            p(&Progress { bytes_done: done, bytes_total: total, file: file.to_path_buf() });
        }
    }

    /// Cpu target without conversion or O_DIRECT: reads land straight in the arena.
    fn run_direct_host(
        &self,
        plan: &Plan,
        files: &[File],
        arena: &mut HostMemory,
        queue: &mut ReadQueue,
        mut trace: Option<&mut TraceRecorder>,
    ) -> Result<()> {
        let ops = tensor_reads(plan, self.read_size as u64);
        let total = plan.tensors.iter().map(|t| t.src_len).sum();
        let base = arena.as_ptr();
        let mut started = vec![None; if trace.is_some() { ops.len() } else { 0 }];
        let mut next = 0;
        let mut done = 0u64;
        let result = (|| -> Result<()> {
            while next < ops.len() || queue.in_flight() > 0 {
                self.check_cancel()?;
                while next < ops.len() && queue.has_room() {
                    let (ti, off, len) = ops[next];
                    let t = &plan.tensors[ti];
                    let req = ReadRequest {
                        fd: files[t.file].as_raw_fd(),
                        offset: t.src_offset + off,
                        // SAFETY: arena_offset + off + len <= arena_len (planned), so the pointer
                        // stays in the arena.
                        buf: unsafe { base.add((t.arena_offset + off) as usize) },
                        len: len as usize,
                        tag: next as u64,
                    };
                    // SAFETY: the arena outlives the queue's use of it (drained below on every
                    // path) and this range of it is written by this request alone; the fd is
                    // held open by `files` for the whole load.
                    unsafe { queue.submit(req) }.map_err(|e| Error::io(&plan.files[t.file].path, e))?;
                    if let Some(s) = started.get_mut(next) {
                        *s = Some(Instant::now());
                    }
                    next += 1;
                }
                let c = queue.wait().map_err(|source| Error::ReadEngine { source })?;
                let (ti, off, len) = ops[c.tag as usize];
                let t = &plan.tensors[ti];
                let file = &plan.files[t.file].path;
                let n =
                    c.result.map_err(|e| Error::Io { file: file.clone(), tensor: Some(t.name.clone()), source: e })?;
                if (n as u64) < len {
                    return Err(Error::UnexpectedEof {
                        file: file.clone(),
                        tensor: Some(t.name.clone()),
                        what: "tensor data",
                        at: t.src_offset + off + n as u64,
                    });
                }
                if let (Some(tr), Some(Some(s))) = (trace.as_deref_mut(), started.get(c.tag as usize)) {
                    tr.span("read", format!("read {}", c.tag as usize % self.threads), *s, Instant::now(), len);
                }
                done += len;
                self.report(done, total, file);
            }
            Ok(())
        })();
        queue.drain();
        result
    }

    /// Cpu target with conversion, without O_DIRECT: each worker reads a piece into its own
    /// small buffer and converts it into the arena at once, while the piece is still in that
    /// core's caches (pieces that keep their dtype are read straight into the arena). Returns
    /// the bytes of the workers' buffers.
    fn run_read_convert(
        &self,
        plan: &Plan,
        files: &[File],
        arena: &mut HostMemory,
        mut trace: Option<&mut TraceRecorder>,
    ) -> Result<u64> {
        let read_size = self.read_size;
        // read_size is a multiple of 4096, so every piece of a converted tensor holds whole
        // elements.
        let ops = tensor_reads(plan, read_size as u64);
        let total = plan.tensors.iter().map(|t| t.src_len).sum();
        let base = arena.as_ptr();
        let mut workers = ReadConvertWorkers::new(self.threads, read_size, self.fault);
        // Enough queued to keep every worker busy, few enough that a cancel stops soon.
        let window = 2 * workers.threads().max(1);
        let mut next = 0;
        let mut in_flight = 0;
        let mut done = 0u64;
        let result = (|| -> Result<()> {
            loop {
                self.check_cancel()?;
                while next < ops.len() && in_flight < window {
                    let (ti, off, len) = ops[next];
                    let t = &plan.tensors[ti];
                    // Whole elements of the stored dtype become as many of the loaded one (the
                    // same bytes when it is kept, sub-byte dtypes included).
                    let (at, dst_len) = if t.converts() {
                        let (sb, db) = (t.dtype.bits(), t.out_dtype.bits());
                        (off * 8 / sb * db / 8, len * 8 / sb * db / 8)
                    } else {
                        (off, len)
                    };
                    let job = ReadConvertJob {
                        fd: files[t.file].as_raw_fd(),
                        offset: t.src_offset + off,
                        len: len as usize,
                        from: t.dtype,
                        to: t.out_dtype,
                        // SAFETY: off and len are whole elements of the tensor, whose bytes as
                        // loaded lie at arena_offset..arena_offset + out_len, inside the arena.
                        dst: unsafe { base.add((t.arena_offset + at) as usize) },
                        dst_len: dst_len as usize,
                        tag: next as u64,
                    };
                    // SAFETY: this destination range belongs to this piece alone; the arena
                    // outlives the workers (dropped, so joined, before this function returns)
                    // and the fd is held open by `files` for the whole load.
                    unsafe { workers.submit(job) }.map_err(|_| Error::ReadEngine {
                        source: std::io::Error::other("no read-and-convert worker could be started"),
                    })?;
                    next += 1;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return Ok(());
                }
                let Some(d) = workers.wait() else {
                    return Err(Error::option("internal: the read-and-convert workers stopped"));
                };
                in_flight -= 1;
                let (ti, _, len) = ops[d.tag as usize];
                let t = &plan.tensors[ti];
                let file = &plan.files[t.file].path;
                match d.result {
                    Ok(()) => {}
                    Err(JobError::Read(e)) => {
                        return Err(Error::Io { file: file.clone(), tensor: Some(t.name.clone()), source: e })
                    }
                    Err(JobError::Eof { at }) => {
                        return Err(Error::UnexpectedEof {
                            file: file.clone(),
                            tensor: Some(t.name.clone()),
                            what: "tensor data",
                            at,
                        })
                    }
                    Err(JobError::Convert) => return Err(self.conversion_failed(plan, t)),
                }
                if let Some(tr) = trace.as_deref_mut() {
                    let track = format!("worker {}", d.worker);
                    tr.span("read", track.clone(), d.started, d.read_done, len);
                    if t.converts() {
                        tr.span("convert", track, d.read_done, d.finished, len);
                    }
                }
                done += len;
                self.report(done, total, file);
            }
        })();
        let buffers = (workers.threads() * read_size) as u64;
        // Every job still queued finishes before the arena can go.
        drop(workers);
        result.map(|()| buffers)
    }

    fn conversion_failed(&self, plan: &Plan, t: &crate::plan::PlannedTensor) -> Error {
        Error::UnsupportedConversion {
            file: plan.files[t.file].path.clone(),
            tensor: t.name.clone(),
            from: t.dtype.name(),
            to: t.out_dtype.name(),
        }
    }

    /// Every other target: reads fill staging slots, the sink takes them from there.
    fn run_staged(
        &self,
        plan: &Plan,
        files: &[File],
        ring: &mut StagingRing,
        sink: &mut dyn Sink,
        queue: &mut ReadQueue,
        mut trace: Option<&mut TraceRecorder>,
    ) -> Result<()> {
        struct SlotJob {
            extent: usize,
            data_skip: usize,
            outstanding: usize,
            started: Instant,
        }
        ring.reset();
        let mut jobs: Vec<Option<SlotJob>> = (0..ring.slot_count()).map(|_| None).collect();
        let total = plan.bytes_to_read();
        let mut next = 0usize;
        let mut done = 0u64;
        let read_size = self.staged_read_size() as u64;
        let result = (|| -> Result<()> {
            loop {
                self.check_cancel()?;
                while next < plan.extents.len() {
                    let e = &plan.extents[next];
                    let (start, end) = if self.direct {
                        let s = e.offset / DIRECT_ALIGN * DIRECT_ALIGN;
                        (s, (e.offset + e.len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN)
                    } else {
                        (e.offset, e.offset + e.len)
                    };
                    // All of a slot's reads are queued at once; wait for room rather than
                    // overfill the engine (an io_uring's completion queue is bounded).
                    if queue.room() < (end - start).div_ceil(read_size) as usize {
                        break;
                    }
                    let Some(slot) = ring.take() else { break };
                    sink.release(slot)?;
                    let buf = ring.slot_ptr(slot);
                    let fd = files[e.file].as_raw_fd();
                    let mut sub = 0u64;
                    let mut count = 0;
                    while start + sub < end {
                        let len = (end - start - sub).min(read_size);
                        let req = ReadRequest {
                            fd,
                            offset: start + sub,
                            // SAFETY: end - start <= slot size (the plan's chunk leaves room
                            // for O_DIRECT alignment), so buf + sub + len stays in the slot.
                            buf: unsafe { buf.add(sub as usize) },
                            len: len as usize,
                            tag: ((slot as u64) << 32) | (sub / read_size),
                        };
                        // SAFETY: the slot was released by the sink (nothing reads it), it is
                        // written by this extent's requests alone, in disjoint ranges, and is
                        // not handed out again before all of them completed; the ring and fds
                        // outlive the queue's use (drained below on every path).
                        unsafe { queue.submit(req) }.map_err(|err| Error::io(&plan.files[e.file].path, err))?;
                        sub += len;
                        count += 1;
                    }
                    jobs[slot] = Some(SlotJob {
                        extent: next,
                        data_skip: (e.offset - start) as usize,
                        outstanding: count,
                        started: Instant::now(),
                    });
                    next += 1;
                }
                if queue.in_flight() == 0 {
                    if next < plan.extents.len() {
                        // Unreachable by construction (a slot's reads always fit an empty
                        // queue); never return a half-loaded model if it were not.
                        return Err(Error::option("internal: staged reads stalled with extents left"));
                    }
                    break;
                }
                let c = queue.wait().map_err(|source| Error::ReadEngine { source })?;
                let slot = (c.tag >> 32) as usize;
                let Some(job) = jobs[slot].as_mut() else {
                    return Err(Error::option("completion for an idle staging slot"));
                };
                let e = &plan.extents[job.extent];
                let file = &plan.files[e.file].path;
                let tensor_at = |off: u64| plan.tensor_at(e, off.saturating_sub(e.offset)).map(str::to_string);
                let n = c.result.map_err(|err| Error::Io {
                    file: file.clone(),
                    tensor: tensor_at(c.offset),
                    source: err,
                })?;
                let needed = (e.offset + e.len).saturating_sub(c.offset).min(c.len as u64);
                if (n as u64) < needed {
                    let at = c.offset + n as u64;
                    return Err(Error::UnexpectedEof {
                        file: file.clone(),
                        tensor: tensor_at(at),
                        what: "tensor data",
                        at,
                    });
                }
                job.outstanding -= 1;
                if job.outstanding > 0 {
                    continue;
                }
                let job = jobs[slot].take().expect("checked Some above"); // ok: as_mut succeeded
                let read_done = Instant::now();
                // SAFETY: every read into the slot completed; the slot holds data_skip + e.len
                // initialised bytes and nothing writes it until it is released again.
                let data =
                    unsafe { std::slice::from_raw_parts(ring.slot_ptr(slot).add(job.data_skip), e.len as usize) };
                sink.deliver(slot, data, e, plan)?;
                if let Some(t) = trace.as_deref_mut() {
                    t.span("read", format!("read slot {slot}"), job.started, read_done, e.len);
                    t.span("deliver", format!("read slot {slot}"), read_done, Instant::now(), e.len);
                }
                ring.give_back(slot);
                done += e.len;
                self.report(done, total, file);
            }
            sink.finish()
        })();
        if result.is_err() {
            // Nothing may still write into or read from a slot once we return.
            queue.drain();
            let _ = sink.finish();
        }
        ring.reset();
        result
    }
}

/// The reads of the direct-to-host paths, per tensor (gaps between tensors are never read):
/// `(tensor index, offset in the tensor, length)`, each at most `read_size` bytes.
fn tensor_reads(plan: &Plan, read_size: u64) -> Vec<(usize, u64, u64)> {
    let mut ops = Vec::new();
    for (i, t) in plan.tensors.iter().enumerate() {
        let mut off = 0;
        while off < t.src_len {
            let len = (t.src_len - off).min(read_size);
            ops.push((i, off, len));
            off += len;
        }
    }
    ops
}

fn build_filter(only: &[String]) -> Result<Option<globset::GlobSet>> {
    if only.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in only {
        b.add(globset::Glob::new(g).map_err(|e| Error::option(format!("--only `{g}`: {e}")))?);
    }
    b.build().map(Some).map_err(|e| Error::option(format!("--only: {e}")))
}
