//! The `Loader` builder: options, the strategy chosen once per load from the device and the
//! options, and a staging pool per device shared by clones.

mod describe;
mod drive;
mod files;
mod into;
mod parts;
mod remote;
mod share;
mod stream;
mod with;

pub use describe::TensorInfo;
pub use into::{Destination, DevicePlace};
pub use share::{GroupLoad, PartPlace, RankRead};
pub use with::{SinkError, TensorPiece, TensorSink};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::{EngineOptions, Fault, IoKind};
use crate::memory::HostMemory;
use crate::model::{LoadedModel, Storage, TensorMeta};
use crate::pipeline::Observer;
use crate::plan::Plan;
use crate::pool::StagingPool;
use crate::progress::ProgressFn;
use crate::sink::{Device, HostSink, NullSink};
use crate::source::{Checkpoint, RemoteOptions};
use crate::stage::ring::DIRECT_ALIGN;
use crate::trace::TraceRecorder;
use drive::On;
use files::Requests;

/// Reads in flight at most (an io_uring of 4096 entries has 8192 completion slots).
const MAX_IN_FLIGHT: usize = 4096;

/// Most reader threads a loader starts (far past what a disk or the page cache can use; more
/// only risks running out of threads).
const MAX_THREADS: usize = 256;

/// Most staging buffers a loader accepts.
pub const MAX_STAGING_COUNT: usize = 1024;

/// Smallest staging buffer a loader accepts.
pub const MIN_STAGING_SIZE: usize = 64 << 10;

/// `v` rounded up to a multiple of `m`, or down where rounding up would overflow.
fn round_to_multiple(v: usize, m: usize) -> usize {
    v.checked_next_multiple_of(m).unwrap_or(v / m * m)
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
    /// Asked for, or `None`: the measured default of the target ([`Loader::ring_dims`]).
    staging_size: Option<usize>,
    staging_count: Option<usize>,
    queue_depth: usize,
    threads: usize,
    read_size: usize,
    streams: usize,
    progress: Option<ProgressFn>,
    cancel: Option<CancelToken>,
    trace: bool,
    zero_copy: bool,
    shard: Option<(usize, usize)>,
    splits: Vec<(String, usize)>,
    slices: Vec<(String, usize, std::ops::Range<u64>)>,
    fault: Option<Fault>,
    remote: RemoteOptions,
    /// A stream's own stop token (set on the stream producer's clone): engines whose reads
    /// wait on a server watch it beside `cancel`.
    stream_stop: Option<CancelToken>,
    /// Read only the planned bytes, never through the gaps between them (a group rank's reads:
    /// the gaps are other ranks' shares, and each byte is read once in the group).
    exact_reads: bool,
    pool: Arc<StagingPool>,
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
            staging_size: None,
            staging_count: None,
            queue_depth: eo.queue_depth,
            threads: eo.threads,
            read_size: 2 << 20,
            streams: 2,
            progress: None,
            cancel: None,
            trace: false,
            zero_copy: false,
            shard: None,
            splits: Vec::new(),
            slices: Vec::new(),
            fault: None,
            remote: RemoteOptions::default(),
            stream_stop: None,
            exact_reads: false,
            pool: Arc::default(),
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

    /// Read engine. Converted loads to `cpu` read with pread in the conversion workers, which
    /// convert each piece on the core that read it; with [`IoKind::Uring`] they read through
    /// the staging ring with io_uring instead and convert out of it.
    pub fn io(mut self, io: IoKind) -> Self {
        self.io = io;
        self
    }

    /// Open files with O_DIRECT (bypass the page cache).
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Size of one staging buffer, rounded down to a multiple of 4 KiB (O_DIRECT's alignment).
    /// A load fails with [`crate::UsageError::BadOption`] when it is below [`MIN_STAGING_SIZE`].
    pub fn staging_size(mut self, bytes: usize) -> Self {
        self.staging_size = Some(bytes / DIRECT_ALIGN as usize * DIRECT_ALIGN as usize);
        self
    }

    /// Number of staging buffers. A load fails with [`crate::UsageError::BadOption`] when it is 0
    /// or more than [`MAX_STAGING_COUNT`].
    pub fn staging_count(mut self, count: usize) -> Self {
        self.staging_count = Some(count);
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

    /// Experimental zero-copy (CUDA device, buffered reads): the device copies straight out of
    /// the page cache, with no CPU copy; each 16 MiB window of a file is mapped read-only and
    /// page-locked in place (`cuMemHostRegister`) while its copies run. Conversion works as
    /// with the ring; with O_DIRECT (no page cache to map) or a non-CUDA device the load fails
    /// with [`crate::UsageError::Conflict`] or [`crate::UsageError::Unsupported`]. Not yet
    /// measured on a GPU: see BENCHMARKS.md before relying on it.
    ///
    /// ```
    /// let loader = weightstream::Loader::new().zero_copy(true);
    /// # drop(loader);
    /// ```
    pub fn zero_copy(mut self, on: bool) -> Self {
        self.zero_copy = on;
        self
    }

    /// Inject a read fault (tests of the error paths; with the `unstable` feature).
    #[cfg(feature = "unstable")]
    pub fn inject_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Bytes of the staging ring of a load to this loader's device ([`Loader::ring_dims`]).
    pub fn staging_bytes(&self) -> usize {
        let (count, size) = self.ring_dims(self.resolved_device());
        size.saturating_mul(count)
    }

    /// Load the checkpoint at `path` (a file, an index, a directory, or a Hugging Face cache
    /// folder; with the `remote` feature also an `s3://`, `gs://`, `az://` or `http(s)://` URL of
    /// such a file, index or prefix).
    pub fn load(&self, path: impl AsRef<Path>) -> Result<LoadedModel> {
        let started = Instant::now();
        let mut ckpt = self.open(path.as_ref())?;
        let (device, select, shard) = self.prepare()?;
        // The checkpoint is ours: the model takes its names and shapes instead of copies.
        let select = |n: &str| select.as_ref().is_none_or(|g| g.is_match(n));
        let plan = Plan::new_taking(&mut ckpt, &select, &|n, d| self.out_dtype(n, d), shard.as_ref())?;
        check_conversions(&plan)?;
        // Nothing reads the headers' tensor lists after planning: free them before the load.
        for f in &mut ckpt.files {
            f.header.tensors = Vec::new();
        }
        self.load_plan(&ckpt, plan, device, started)
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
                .map_err(|e| Error::internal(format!("load task failed: {e}")))?
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

    /// The device as set (`auto` unresolved).
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) fn device_option(&self) -> Device {
        self.device
    }

    /// Resolve `auto`.
    pub fn resolved_device(&self) -> Device {
        match self.device {
            Device::Auto if crate::sink::cuda_available() => Device::Cuda(0),
            Device::Auto => Device::Cpu,
            d => d,
        }
    }

    /// The staging ring a load to `device` uses: `(buffers, bytes each)`, as set, else measured
    /// defaults (BENCHMARKS.md, "Ring size per target"): 8 × 16 MiB for CUDA and for O_DIRECT
    /// (reads from a disk want many bytes in flight: a 32 MiB ring took 1.6x as long), 8 × 4 MiB
    /// for buffered host loads (out of the page cache a 32 MiB ring was as fast as 128 MiB, with
    /// 96 MiB less resident memory).
    ///
    /// ```
    /// use weightstream::{Device, Loader};
    /// assert_eq!(Loader::new().ring_dims(Device::Null), (8, 4 << 20));
    /// assert_eq!(Loader::new().direct(true).ring_dims(Device::Null), (8, 16 << 20));
    /// assert_eq!(Loader::new().staging_count(2).ring_dims(Device::Cuda(0)), (2, 16 << 20));
    /// ```
    pub fn ring_dims(&self, device: Device) -> (usize, usize) {
        self.ring_dims_for(device, None)
    }

    /// [`Loader::ring_dims`] for local files, or for remote objects (`remote`), where by default
    /// a slot holds a whole request and the ring holds every request in flight and two slots
    /// more (10 × 8 MiB for host loads, 8 × 16 MiB for CUDA, with the default 8 × 8 MiB GETs).
    pub(crate) fn ring_dims_for(&self, device: Device, requests: Option<Requests>) -> (usize, usize) {
        let default_size = match device {
            Device::Cpu | Device::Null if !self.direct => 4 << 20,
            _ => 16 << 20,
        };
        let (mut count, mut size) = (8, default_size);
        if let Some(r) = requests {
            size = size.max(r.size);
            count = count.max(r.concurrency.saturating_mul(r.size).div_ceil(size) + 2).min(MAX_STAGING_COUNT);
        }
        (self.staging_count.unwrap_or(count), self.staging_size.unwrap_or(size))
    }

    /// The options that no load can honour, whatever the checkpoint.
    fn check_options(&self, device: Device) -> Result<()> {
        if let Some(to) = self.dtype {
            if !matches!(to, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::bad_option("dtype", to, "F32, F16 or BF16 (the conversion targets)"));
            }
        }
        let (count, size) = self.ring_dims(device);
        if !(1..=MAX_STAGING_COUNT).contains(&count) {
            return Err(Error::bad_option("staging_count", count, format!("between 1 and {MAX_STAGING_COUNT}")));
        }
        if size < MIN_STAGING_SIZE {
            return Err(Error::bad_option("staging_size", size, format!("at least {MIN_STAGING_SIZE} bytes")));
        }
        if self.zero_copy && !matches!(device, Device::Cuda(_)) {
            return Err(drive::zero_copy_off_cuda(device));
        }
        if self.zero_copy && self.io != IoKind::Auto {
            return Err(Error::conflict("zero_copy", "io", "zero-copy reads nothing through a read engine"));
        }
        if self.zero_copy && self.direct {
            return Err(Error::conflict("zero_copy", "direct", "zero-copy maps the page cache, O_DIRECT bypasses it"));
        }
        Ok(())
    }

    /// Load an already opened checkpoint.
    pub fn load_checkpoint(&self, ckpt: &Checkpoint) -> Result<LoadedModel> {
        let started = Instant::now();
        let (device, plan) = self.plan_of(ckpt, &|_| true)?;
        self.load_plan(ckpt, plan, device, started)
    }

    /// The device and the plan of `ckpt` under these options, for the tensors that `keep` also
    /// accepts; a conversion the loader cannot do is an error naming the tensor.
    fn plan_of(&self, ckpt: &Checkpoint, keep: &dyn Fn(&str) -> bool) -> Result<(Device, Plan)> {
        let (device, only, shard) = self.prepare()?;
        let select = |n: &str| keep(n) && only.as_ref().is_none_or(|g| g.is_match(n));
        let plan = Plan::new_sharded(ckpt, &select, &|n, d| self.out_dtype(n, d), shard.as_ref())?;
        check_conversions(&plan)?;
        Ok((device, plan))
    }

    /// Run the load `plan` of `ckpt` (its conversions checked).
    fn load_plan(&self, ckpt: &Checkpoint, plan: Plan, device: Device, started: Instant) -> Result<LoadedModel> {
        // Data is read through the descriptors the headers were read from (O_DIRECT: a second
        // descriptor of the same open file), or from the objects as their headers found them.
        let files = self.read_files(ckpt, &plan)?;
        let mut trace = self.trace.then(TraceRecorder::new);
        let mut obs = Observer::new(self.progress.as_ref(), self.cancel.as_ref(), trace.as_mut());
        let (storage, out) = match device {
            Device::Cpu => {
                let mut arena = HostMemory::new(plan.dst_len as usize)?;
                let drive = self.drive(On::Host { device, in_place: true }, &plan, files.requests())?;
                let out = drive.run(&plan, &files, &mut HostSink::new(&mut arena), &mut obs)?;
                (Storage::Host(arena), out)
            }
            Device::Null => {
                let drive = self.drive(On::Host { device, in_place: false }, &plan, files.requests())?;
                (Storage::Null, drive.run(&plan, &files, &mut NullSink, &mut obs)?)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                use crate::cuda::{CudaDevice, DeviceArena};
                use crate::sink::cuda::CudaSink;
                let dev = CudaDevice::open(ordinal)?;
                let arena = DeviceArena::alloc(&dev, plan.dst_len as usize)?;
                let drive = self.drive(On::Cuda(dev.clone()), &plan, files.requests())?;
                let (size, converter) = (drive.slot_size(), drive.converter());
                let converts = plan.converts();
                let mut sink = CudaSink::new(&dev, &arena, self.streams, converts, size, self.trace, converter)?;
                let out = drive.run(&plan, &files, &mut sink, &mut obs)?;
                drop(sink);
                (Storage::Cuda(arena), out)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::CudaNotBuilt),
            Device::Auto => return Err(Error::internal("device `auto` left unresolved")),
        };
        drop(files);
        let stats = out.stats(device, &plan, self.direct, started, None);
        let tensors = plan
            .tensors
            .into_iter()
            .map(|t| TensorMeta {
                name: t.name,
                dtype: t.dtype,
                stored_dtype: t.stored_dtype,
                shape: t.shape,
                offset: t.dst_offset,
                len: t.len,
            })
            .collect();
        let mut model = LoadedModel::new(device, tensors, storage, stats);
        model.trace = trace;
        Ok(model)
    }
}

/// Every conversion of `plan` is one the loader can do, or an error naming the tensor.
fn check_conversions(plan: &Plan) -> Result<()> {
    match plan.tensors.iter().find(|t| t.converts() && !crate::convert::supported(t.stored_dtype, t.dtype)) {
        Some(t) => Err(Error::UnsupportedConversion {
            file: plan.files[t.file].path.clone(),
            tensor: t.name.clone(),
            from: t.stored_dtype.name(),
            to: t.dtype.name(),
        }),
        None => Ok(()),
    }
}
