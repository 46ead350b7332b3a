//! The one driver: every way of loading (the arena [`Loader::load`], [`Loader::load_into`],
//! [`Loader::stream`]'s batches, [`Loader::load_with`], and through them `bench`, the candle
//! backend and the Python bindings) sets a run up here and runs the one loop once.
//!
//! A way builds its sink (where the bytes go: an arena, caller buffers or device pointers, a
//! stream batch, a caller's [`super::TensorSink`]); the driver owns the rest: the strategy
//! (chosen once from the target, the options and the source), the staging (leased from the
//! loader's pool, back on drop), the stage, the schedule, the trace of the sink's own spans.

use std::sync::Arc;

use super::files::{ReadFiles, Requests};
use super::{Loader, MAX_IN_FLIGHT};
use crate::convert::workers::ReadConvertWorkers;
#[cfg(feature = "cuda")]
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::io::IoKind;
use crate::io::ReadQueue;
use crate::pipeline::{self, Observer};
use crate::plan::{Plan, Schedule, ScheduleOptions};
use crate::pool::StagingLease;
use crate::sink::{Device, Sink};
use crate::stage::in_place::{InPlaceReader, InPlaceStage};
use crate::stage::ring::{RingStage, DIRECT_ALIGN};
use crate::stage::Stage;

/// How a load runs, chosen once from the target, the options and the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strategy {
    /// Reads land in the sink's host region; `convert_on_workers`: read-and-convert workers.
    InPlace { convert_on_workers: bool },
    /// Reads fill the staging ring; the sink copies (or converts) out of it.
    Ring,
    /// The device copies from registered windows of the page cache.
    ZeroCopy,
}

/// Where a run's bytes land, as the driver needs to know it: host memory (`cpu`, or `null`,
/// which keeps nothing), with or without a region that readers may fill in place, or a CUDA
/// device (pinned staging, zero-copy windows).
pub(super) enum On {
    /// `device` is `cpu` or `null`; `in_place`: the sink lends a host region.
    Host { device: Device, in_place: bool },
    /// A CUDA device, opened once by the way (a stream opens it once for all its batches).
    #[cfg(feature = "cuda")]
    Cuda(Arc<CudaDevice>),
}

impl On {
    fn device(&self) -> Device {
        match self {
            On::Host { device, .. } => *device,
            #[cfg(feature = "cuda")]
            On::Cuda(dev) => Device::Cuda(dev.ordinal()),
        }
    }
}

/// What a run reports back.
pub(super) struct Run {
    /// The read engine that ran (`pread`, `uring`, `remote`, `zero-copy`).
    pub io: &'static str,
    /// Bytes read: the schedule's extents, gaps read through included.
    pub bytes_read: u64,
    /// Bytes of staging the run used (0 in place).
    pub staging_bytes: u64,
    /// Whether that staging was pinned.
    pub pinned: bool,
    /// The sink's device conversion scratch.
    pub device_scratch_bytes: u64,
}

impl Run {
    /// The figures of a load that ran as this run: `started` when its planning began, `trace`
    /// for the ways that return only figures.
    pub fn stats(
        self,
        device: Device,
        plan: &Plan,
        direct: bool,
        started: std::time::Instant,
        trace: Option<crate::trace::TraceRecorder>,
    ) -> crate::model::LoadStats {
        crate::model::LoadStats {
            device,
            io: self.io,
            direct,
            bytes_read: self.bytes_read,
            bytes_loaded: plan.bytes_loaded(),
            seconds: started.elapsed().as_secs_f64(),
            staging_bytes: self.staging_bytes,
            pinned: self.pinned,
            device_scratch_bytes: self.device_scratch_bytes,
            trace: trace.map(Arc::new),
        }
    }
}

/// One run, set up: the strategy, the staging shape, the device and its conversion kernels.
/// The way builds its sink from [`Drive::slot_size`] (and, on CUDA, [`Drive::cuda`] and
/// [`Drive::converter`]), then calls [`Drive::run`].
pub(super) struct Drive<'l> {
    loader: &'l Loader,
    on: On,
    strategy: Strategy,
    /// Staging slots: count and size (zero-copy: windows).
    dims: (usize, usize),
    /// A source read by requests (GETs): their size and how many fly at once.
    requests: Option<Requests>,
    #[cfg(feature = "cuda")]
    converter: Option<Arc<crate::cuda::kernels::DeviceConverter>>,
}

impl Loader {
    /// The strategy for `plan` on `device`, from the options and how the source is read (the
    /// options that cannot be honoured were refused before: `check_options`, [`Loader::drive`]).
    pub(super) fn strategy(&self, device: Device, plan: &Plan, requests: Option<Requests>) -> Strategy {
        match device {
            _ if self.zero_copy => Strategy::ZeroCopy,
            // Remote reads: straight into the arena (one copy, no ring) when the plan is mostly
            // large tensors; through the ring, whose extents coalesce small tensors into large
            // GETs, when small ones would be many of the GETs, or when converting (the
            // read-and-convert workers use pread).
            Device::Cpu if requests.is_some() => match !plan.converts() && mostly_large(plan, requests) {
                true => Strategy::InPlace { convert_on_workers: false },
                false => Strategy::Ring,
            },
            // O_DIRECT needs 4 KiB-aligned buffers, which arena places (256 bytes) are not; an
            // io_uring asked for is honoured through the ring, the workers read with pread.
            Device::Cpu if !(self.direct || plan.converts() && self.io == IoKind::Uring) => {
                Strategy::InPlace { convert_on_workers: plan.converts() }
            }
            _ => Strategy::Ring,
        }
    }

    /// Set up one run of `plan` onto `on`, from a source read by `requests` (`None`: files read
    /// by system calls). Options the target cannot honour are usage errors here, before
    /// anything is allocated.
    pub(super) fn drive(&self, on: On, plan: &Plan, requests: Option<Requests>) -> Result<Drive<'_>> {
        let device = on.device();
        let strategy = match &on {
            On::Host { in_place, .. } => match self.strategy(device, plan, requests) {
                Strategy::InPlace { .. } if !in_place => Strategy::Ring,
                Strategy::ZeroCopy => return Err(zero_copy_off_cuda(device)),
                s => s,
            },
            #[cfg(feature = "cuda")]
            On::Cuda(_) => self.strategy(device, plan, requests),
        };
        #[cfg(feature = "cuda")]
        let converter = match (&on, plan.converts()) {
            (On::Cuda(dev), true) => Some(self.pool.converter(dev)?),
            _ => None,
        };
        Ok(Drive {
            loader: self,
            dims: self.ring_dims_for(device, requests),
            on,
            strategy,
            requests,
            #[cfg(feature = "cuda")]
            converter,
        })
    }
}

impl Drive<'_> {
    /// The size of a staging slot (or a zero-copy window): a CUDA sink sizes its conversion
    /// scratch by it.
    #[cfg(feature = "cuda")]
    pub fn slot_size(&self) -> usize {
        self.dims.1
    }

    /// The CUDA device of this run.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        match &self.on {
            On::Cuda(dev) => Some(dev),
            On::Host { .. } => None,
        }
    }

    /// The device's conversion kernels, when the plan converts on a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn converter(&self) -> Option<Arc<crate::cuda::kernels::DeviceConverter>> {
        self.converter.clone()
    }

    /// The schedule this run reads `plan` by (a stream sums its batches' for progress).
    pub fn schedule(&self, plan: &Plan) -> Schedule {
        Schedule::new(plan, self.schedule_options())
    }

    fn schedule_options(&self) -> ScheduleOptions {
        let mut opts = self.strategy_schedule_options();
        if self.loader.exact_reads {
            // Adjacent parts still make one extent; a gap between them is someone else's.
            opts.max_gap = opts.max_gap.map(|_| 0);
        }
        opts
    }

    fn strategy_schedule_options(&self) -> ScheduleOptions {
        match self.strategy {
            // A remote read is a GET: as large as a request may be.
            Strategy::InPlace { .. } => {
                ScheduleOptions::per_tensor(self.requests.map_or(self.loader.read_size, |r| r.size) as u64)
            }
            Strategy::Ring => ScheduleOptions::coalesced(self.ring_extent_len()),
            Strategy::ZeroCopy => ScheduleOptions::coalesced(self.dims.1 as u64),
        }
    }

    /// Largest extent through a slot: the slot, less room for O_DIRECT's alignment.
    fn ring_extent_len(&self) -> u64 {
        self.dims.1 as u64 - if self.loader.direct { 2 * DIRECT_ALIGN } else { 0 }
    }

    /// Run `plan` over `files` into `sink`, once. The staging goes back to the pool on every
    /// path; the sink's own trace spans are added after a successful run.
    pub fn run(self, plan: &Plan, files: &ReadFiles, sink: &mut dyn Sink, obs: &mut Observer<'_>) -> Result<Run> {
        let sched = self.schedule(plan);
        let (io, bytes_read, staging_bytes, pinned) = match self.strategy {
            Strategy::InPlace { convert_on_workers } => {
                let (io, bytes, staging) = self.in_place(plan, &sched, files, sink, convert_on_workers, obs)?;
                (io, bytes, staging, false)
            }
            Strategy::Ring => {
                let mut lease = self.lease()?;
                let pinned = !matches!(self.on, On::Host { .. });
                let (io, bytes, staging) = self.through_ring(plan, &sched, files, &mut lease, sink, obs)?;
                (io, bytes, staging, pinned)
            }
            Strategy::ZeroCopy => {
                let (bytes, staging) = self.zero_copy(plan, &sched, files, sink, obs)?;
                ("zero-copy", bytes, staging, false)
            }
        };
        if let Some(t) = obs.trace.as_deref_mut() {
            sink.write_trace(t)?;
        }
        Ok(Run { io, bytes_read, staging_bytes, pinned, device_scratch_bytes: sink.scratch_bytes() })
    }

    /// The ring of this run's device, from the loader's pool.
    fn lease(&self) -> Result<StagingLease<'_>> {
        let (count, size) = self.dims;
        match &self.on {
            On::Host { .. } => self.loader.pool.lease_host(count, size),
            #[cfg(feature = "cuda")]
            On::Cuda(dev) => self.loader.pool.lease_pinned(dev, count, size),
        }
    }

    /// In place into `sink`'s host region, with a read engine or read-and-convert workers: the
    /// engine's name, the bytes read and the staging bytes.
    fn in_place(
        &self,
        plan: &Plan,
        sched: &Schedule,
        files: &ReadFiles,
        sink: &mut dyn Sink,
        convert_on_workers: bool,
        obs: &mut Observer<'_>,
    ) -> Result<(&'static str, u64, u64)> {
        let l = self.loader;
        let region = sink.host_region().ok_or_else(|| Error::internal("in-place load without host memory"))?;
        let (reader, io) = if convert_on_workers {
            (InPlaceReader::Workers(ReadConvertWorkers::new(l.threads, l.read_size, l.fault), l.read_size), "pread")
        } else {
            let depth = l.queue_depth.max(l.threads * 2).min(MAX_IN_FLIGHT);
            let queue = ReadQueue::new(files.engine(depth)?, depth);
            let io = queue.engine_name();
            (InPlaceReader::Engine(queue), io)
        };
        let mut stage = InPlaceStage::new(plan, sched, files.handles.clone(), region, reader, l.trace);
        let bytes = pipeline::run(plan, sched, &mut stage, sink, obs)?;
        Ok((io, bytes, stage.staging_bytes()))
    }

    /// Through the leased ring into `sink`: the engine's name, the bytes read and the ring's
    /// bytes.
    fn through_ring(
        &self,
        plan: &Plan,
        sched: &Schedule,
        files: &ReadFiles,
        ring: &mut StagingLease<'_>,
        sink: &mut dyn Sink,
        obs: &mut Observer<'_>,
    ) -> Result<(&'static str, u64, u64)> {
        let l = self.loader;
        let (count, size) = (ring.slot_count(), ring.slot_size());
        // A remote read is one GET (or a few): as large as a request may be.
        let read_size = match self.requests {
            Some(r) => r.size.clamp(DIRECT_ALIGN as usize, size),
            None => staged_read_size(l.read_size, size),
        };
        let depth = (count * (size.div_ceil(read_size) + 1)).min(MAX_IN_FLIGHT);
        let queue = ReadQueue::new(files.engine(depth)?, depth);
        let in_order = sink.needs_file_order();
        let mut stage = RingStage::new(sched, files.handles.clone(), ring, queue, l.direct, read_size as u64, l.trace)
            .in_order(in_order);
        let io = stage.engine_name();
        let bytes = pipeline::run(plan, sched, &mut stage, sink, obs)?;
        Ok((io, bytes, stage.staging_bytes()))
    }

    /// The device copies straight from registered windows of the page cache: the bytes read
    /// and the bytes of the windows.
    #[cfg(feature = "cuda")]
    fn zero_copy(
        &self,
        plan: &Plan,
        sched: &Schedule,
        files: &ReadFiles,
        sink: &mut dyn Sink,
        obs: &mut Observer<'_>,
    ) -> Result<(u64, u64)> {
        use crate::stage::zero_copy::ZeroCopyStage;
        let l = self.loader;
        let On::Cuda(dev) = &self.on else {
            return Err(zero_copy_off_cuda(self.on.device()));
        };
        if !sink.reads_by_dma() {
            return Err(Error::unsupported("zero_copy", "a sink that does not copy by DMA", "it needs a DMA copy"));
        }
        // The ring's shape bounds the windows: `count` windows of `size` bytes registered;
        // registration threads: as many as readers would be.
        let shape = (self.dims.0, self.dims.1 as u64);
        std::thread::scope(|scope| {
            let mut stage =
                ZeroCopyStage::new(scope, dev, plan, sched, &files.handles, l.threads, shape, l.fault, l.trace)?;
            let bytes = pipeline::run(plan, sched, &mut stage, sink, obs)?;
            Ok::<_, Error>((bytes, stage.staging_bytes()))
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn zero_copy(
        &self,
        _: &Plan,
        _: &Schedule,
        _: &ReadFiles,
        _: &mut dyn Sink,
        _: &mut Observer<'_>,
    ) -> Result<(u64, u64)> {
        Err(zero_copy_off_cuda(self.on.device()))
    }
}

/// Whether reading `plan` in place (one request per tensor piece of at most a request's size)
/// would spend at most a quarter of its requests on tensors under 1 MiB: each is a round trip
/// that the ring would have coalesced.
fn mostly_large(plan: &Plan, requests: Option<Requests>) -> bool {
    const SMALL: u64 = 1 << 20;
    let request = requests.map_or(1, |r| r.size.max(1)) as u64;
    let (small, large_gets) = plan.tensors.iter().fold((0u64, 0u64), |(s, g), t| match t.len < SMALL {
        true => (s + 1, g),
        false => (s, g + t.len.div_ceil(request)),
    });
    small.saturating_mul(4) <= small + large_gets
}

/// Read size on the staged path: as asked, but at least 1/1024 of a slot, so that one slot
/// never needs more reads than the engine can hold.
fn staged_read_size(read_size: usize, slot_size: usize) -> usize {
    let min = (slot_size / 1024).div_ceil(DIRECT_ALIGN as usize) * DIRECT_ALIGN as usize;
    read_size.max(min)
}

/// Zero-copy asked of `device`, which is not a CUDA device.
pub(super) fn zero_copy_off_cuda(device: Device) -> Error {
    Error::unsupported("zero_copy", format!("device {device}"), "it needs a CUDA device")
}
