//! Running a load once its strategy is chosen: which stage, which sink, which staging memory.

use super::files::ReadFiles;
use super::{Loader, MAX_IN_FLIGHT};
use crate::convert::workers::ReadConvertWorkers;
use crate::error::{Error, Result};
use crate::io::ReadQueue;
use crate::model::Storage;
use crate::pipeline::{self, Observer};
use crate::plan::{Plan, Schedule, ScheduleOptions};
use crate::sink::{Device, HostMemory, HostSink, NullSink, Sink};
use crate::stage::in_place::{InPlaceReader, InPlaceStage};
use crate::stage::ring::{RingStage, DIRECT_ALIGN};
use crate::stage::Stage;

/// How a load runs, chosen once from the device and the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strategy {
    /// Reads land in the host arena; `convert_on_workers`: read-and-convert workers.
    InPlace { convert_on_workers: bool },
    /// Reads fill the staging ring; the sink copies (or converts) out of it.
    Ring,
    /// The device copies from registered windows of the page cache.
    ZeroCopy,
}

/// What a strategy run reports back.
pub(super) struct Outcome {
    pub storage: Storage,
    pub io: &'static str,
    pub bytes_read: u64,
    pub staging_bytes: u64,
    pub pinned: bool,
    pub device_scratch_bytes: u64,
}

impl Loader {
    /// The cpu and null devices: in place into the arena, or through a ring of host slots.
    pub(super) fn load_host(
        &self,
        device: Device,
        strategy: Strategy,
        plan: &Plan,
        files: &ReadFiles,
        obs: &mut Observer<'_>,
    ) -> Result<Outcome> {
        let mut arena = match device {
            Device::Cpu => Some(HostMemory::new(plan.dst_len as usize)?),
            _ => None,
        };
        let mut host_sink = arena.as_mut().map(HostSink::new);
        let mut null_sink = NullSink;
        let sink: &mut dyn Sink = match &mut host_sink {
            Some(s) => s,
            None => &mut null_sink,
        };
        let (io, bytes_read, staging_bytes) = match strategy {
            Strategy::InPlace { convert_on_workers } => self.in_place(plan, files, sink, convert_on_workers, obs)?,
            Strategy::Ring => {
                let (count, size) = self.ring_dims_for(device, files.is_remote());
                let mut ring = self.pool.host(count, size)?;
                let run = self.through_ring(plan, files, &mut ring, sink, obs);
                self.pool.give_back_host(ring);
                run?
            }
            Strategy::ZeroCopy => return Err(Error::usage(format!("--zero-copy needs a CUDA device, not {device}"))),
        };
        let storage = arena.map_or(Storage::Null, Storage::Host);
        Ok(Outcome { storage, io, bytes_read, staging_bytes, pinned: false, device_scratch_bytes: 0 })
    }

    /// Run `plan` in place into `sink`'s host region, with a read engine or read-and-convert
    /// workers: the engine's name, the bytes read and the staging bytes.
    pub(super) fn in_place(
        &self,
        plan: &Plan,
        files: &ReadFiles,
        sink: &mut dyn Sink,
        convert_on_workers: bool,
        obs: &mut Observer<'_>,
    ) -> Result<(&'static str, u64, u64)> {
        // A remote read is a GET: as large as a request may be.
        let read_size = match files.is_remote() {
            true => self.remote.request_size,
            false => self.read_size,
        };
        let sched = Schedule::new(plan, ScheduleOptions::per_tensor(read_size as u64));
        let region = sink.host_region().ok_or_else(|| Error::internal("in-place load without host memory"))?;
        let (reader, io) = if convert_on_workers {
            (
                InPlaceReader::Workers(
                    ReadConvertWorkers::new(self.threads, self.read_size, self.fault),
                    self.read_size,
                ),
                "pread",
            )
        } else {
            let depth = self.queue_depth.max(self.threads * 2).min(MAX_IN_FLIGHT);
            let queue = ReadQueue::new(self.engine(depth, files)?, depth);
            let io = queue.engine_name();
            (InPlaceReader::Engine(queue), io)
        };
        let mut stage = InPlaceStage::new(plan, &sched, files.handles.clone(), region, reader, self.trace);
        let bytes = pipeline::run(plan, &sched, &mut stage, sink, obs)?;
        Ok((io, bytes, stage.staging_bytes()))
    }

    /// A CUDA device: through the pinned ring, or zero-copy from the page cache.
    #[cfg(feature = "cuda")]
    pub(super) fn load_cuda(
        &self,
        ordinal: usize,
        strategy: Strategy,
        plan: &Plan,
        files: &ReadFiles,
        obs: &mut Observer<'_>,
    ) -> Result<Outcome> {
        use crate::sink::cuda::{CudaDevice, CudaSink, DeviceArena};
        use crate::stage::zero_copy::ZeroCopyStage;
        let dev = CudaDevice::open(ordinal)?;
        let arena = DeviceArena::alloc(&dev, plan.dst_len as usize)?;
        let (count, size) = self.ring_dims_for(Device::Cuda(ordinal), files.is_remote());
        let converter = match plan.converts() {
            true => Some(self.pool.converter(&dev)?),
            false => None,
        };
        let (io, bytes_read, staging_bytes, scratch) = match strategy {
            Strategy::ZeroCopy => {
                // The ring's shape bounds the windows: `count` windows of `size` bytes pinned.
                let window = size;
                let sched = Schedule::new(plan, ScheduleOptions::coalesced(window as u64));
                let mut sink =
                    CudaSink::new(&dev, &arena, self.streams, plan.converts(), window, self.trace, converter)?;
                // Registration threads: as many as readers would be, at most one per window.
                let registrars = self.threads;
                if !sink.reads_by_dma() {
                    return Err(Error::usage("--zero-copy needs a sink that copies by DMA"));
                }
                let shape = (count, window as u64);
                let (bytes, pinned) = std::thread::scope(|scope| {
                    let mut stage = ZeroCopyStage::new(
                        scope,
                        &dev,
                        plan,
                        &sched,
                        &files.handles,
                        registrars,
                        shape,
                        self.fault,
                        self.trace,
                    )?;
                    let bytes = pipeline::run(plan, &sched, &mut stage, &mut sink, obs)?;
                    Ok::<_, Error>((bytes, stage.staging_bytes()))
                })?;
                if let Some(t) = obs.trace.as_deref_mut() {
                    sink.write_trace(t)?;
                }
                ("zero-copy", bytes, pinned, sink.scratch_bytes())
            }
            _ => {
                let mut ring = self.pool.pinned(&dev, count, size)?;
                let mut sink = CudaSink::new(&dev, &arena, self.streams, plan.converts(), size, self.trace, converter)?;
                let run = self.through_ring(plan, files, &mut ring, &mut sink, obs);
                if let (Some(t), Ok(_)) = (obs.trace.as_deref_mut(), &run) {
                    sink.write_trace(t)?;
                }
                let scratch = sink.scratch_bytes();
                drop(sink);
                self.pool.give_back_pinned(ordinal, ring);
                let (io, bytes, staging) = run?;
                (io, bytes, staging, scratch)
            }
        };
        Ok(Outcome {
            storage: Storage::Cuda(arena),
            io,
            bytes_read,
            staging_bytes,
            pinned: strategy != Strategy::ZeroCopy,
            device_scratch_bytes: scratch,
        })
    }

    /// Run `plan` through `ring` into `sink`: the engine's name, the bytes read and the ring's
    /// bytes.
    pub(super) fn through_ring(
        &self,
        plan: &Plan,
        files: &ReadFiles,
        ring: &mut crate::stage::StagingRing,
        sink: &mut dyn Sink,
        obs: &mut Observer<'_>,
    ) -> Result<(&'static str, u64, u64)> {
        let (count, size) = (ring.slot_count(), ring.slot_size());
        let sched = Schedule::new(plan, ScheduleOptions::coalesced(self.ring_extent_len(size)));
        // A remote read is one GET (or a few): as large as a request may be.
        let read_size = match files.is_remote() {
            true => self.remote.request_size.clamp(DIRECT_ALIGN as usize, size),
            false => self.staged_read_size(size),
        };
        let depth = (count * (size.div_ceil(read_size) + 1)).min(MAX_IN_FLIGHT);
        let queue = ReadQueue::new(self.engine(depth, files)?, depth);
        let mut stage =
            RingStage::new(&sched, files.handles.clone(), ring, queue, self.direct, read_size as u64, self.trace);
        let io = stage.engine_name();
        let bytes = pipeline::run(plan, &sched, &mut stage, sink, obs)?;
        Ok((io, bytes, stage.staging_bytes()))
    }

    /// Largest extent through a slot: the slot, less room for O_DIRECT's alignment.
    fn ring_extent_len(&self, slot_size: usize) -> u64 {
        slot_size as u64 - if self.direct { 2 * DIRECT_ALIGN } else { 0 }
    }

    /// Read size on the staged path: as asked, but at least 1/1024 of a slot, so that one slot
    /// never needs more reads than the engine can hold.
    fn staged_read_size(&self, slot_size: usize) -> usize {
        let min = (slot_size / 1024).div_ceil(DIRECT_ALIGN as usize) * DIRECT_ALIGN as usize;
        self.read_size.max(min)
    }
}

/// The `--only` globs as one set (`None`: every tensor).
pub(super) fn build_filter(only: &[String]) -> Result<Option<globset::GlobSet>> {
    if only.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in only {
        b.add(globset::Glob::new(g).map_err(|e| Error::usage(format!("--only `{g}`: {e}")))?);
    }
    b.build().map(Some).map_err(|e| Error::usage(format!("--only: {e}")))
}
