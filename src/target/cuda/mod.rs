//! The CUDA target: pinned staging ring, copies on several streams, one device arena.
//!
//! Layers as in cudarc: [`result`] (thin `Result` wrappers, the only code touching the driver
//! bindings), [`safe`] (RAII types), and here the sink the pipeline drives.

pub mod mapped;
pub mod result;
pub mod safe;

use std::sync::Arc;

pub use safe::{CudaDevice, DeviceArena, Event, PinnedBuf, Stream};

use crate::error::Result;
use crate::plan::{Plan, ReadExtent};
use crate::stage::{StagingMemory, StagingRing};
use crate::target::Sink;
use crate::trace::TraceRecorder;

/// Number of CUDA devices; [`crate::Error::NoCudaDriver`] when libcuda cannot be loaded.
///
/// ```
/// match weightstream::target::cuda::device_count() {
///     Ok(n) => println!("{n} CUDA devices"),
///     Err(e) => println!("{e}"),
/// }
/// ```
pub fn device_count() -> Result<usize> {
    result::init_and_count()
}

/// A staging ring of `count` pinned buffers of `size` bytes for `dev`.
pub fn pinned_ring(dev: &Arc<CudaDevice>, count: usize, size: usize) -> Result<StagingRing> {
    let slots = (0..count.max(1))
        .map(|_| PinnedBuf::new(dev, size).map(|b| Box::new(b) as Box<dyn StagingMemory>))
        .collect::<Result<Vec<_>>>()?;
    Ok(StagingRing::from_slots(slots, size))
}

struct TimedCopy {
    slot: usize,
    stream: usize,
    bytes: u64,
    start: Event,
    end: Event,
}

/// Device scratch for conversion, all streams together, at most (the issue's bound).
pub const SCRATCH_BUDGET: usize = 64 << 20;

/// Bytes of one stream's scratch region: a staging slot's worth, or the stream's share of
/// [`SCRATCH_BUDGET`] when that is less (larger pieces then go through in several rounds); a
/// multiple of 4096, so that a round never cuts an element.
pub fn scratch_region_bytes(slot_size: usize, streams: usize) -> usize {
    let share = SCRATCH_BUDGET / streams.max(1) / 4096 * 4096;
    (slot_size.min(share) / 4096 * 4096).max(4096)
}

/// Copies staged extents into a [`DeviceArena`]: slot `k`'s copies go on stream `k % streams`,
/// followed by slot `k`'s event; the slot is released when that event has fired.
///
/// A piece of a tensor to convert is copied into its stream's scratch region first, and a kernel
/// writes the converted values into the arena. One region per stream is enough: a stream runs
/// its work in order, so the next copy into the region starts only after the kernel that read
/// the previous contents has finished. That bounds the scratch by the stream count, not the slot
/// count, and by [`SCRATCH_BUDGET`] in all.
pub(crate) struct CudaSink<'a> {
    dev: Arc<CudaDevice>,
    arena: &'a DeviceArena,
    streams: Vec<Stream>,
    slot_events: Vec<Event>,
    /// The scratch arena and the bytes of each stream's region in it.
    scratch: Option<(DeviceArena, usize)>,
    converter: Option<Arc<crate::convert::cuda::DeviceConverter>>,
    timing: Option<(Event, std::time::Instant, Vec<TimedCopy>)>,
}

impl<'a> CudaSink<'a> {
    pub(crate) fn new(
        dev: &Arc<CudaDevice>,
        arena: &'a DeviceArena,
        plan: &Plan,
        ring: &StagingRing,
        streams: usize,
        trace: bool,
        converter: Option<Arc<crate::convert::cuda::DeviceConverter>>,
    ) -> Result<Self> {
        let (slots, slot_size) = (ring.slot_count(), ring.slot_size());
        let converts = plan.tensors.iter().any(|t| t.converts());
        let streams = (0..streams.max(1)).map(|_| Stream::new(dev)).collect::<Result<Vec<_>>>()?;
        let slot_events = (0..slots).map(|_| Event::new(dev, false)).collect::<Result<Vec<_>>>()?;
        let (scratch, converter) = if converts {
            let region = scratch_region_bytes(slot_size, streams.len());
            let conv = converter
                .ok_or_else(|| crate::Error::option("internal: conversions planned without a device converter"))?;
            (Some((DeviceArena::alloc(dev, region * streams.len())?, region)), Some(conv))
        } else {
            (None, None)
        };
        let timing = if trace {
            let mut base = Event::new(dev, true)?;
            base.record(&streams[0])?;
            Some((base, std::time::Instant::now(), Vec::new()))
        } else {
            None
        };
        Ok(CudaSink { dev: Arc::clone(dev), arena, streams, slot_events, scratch, converter, timing })
    }

    /// Bytes of device scratch this sink holds for conversion (0 when nothing converts).
    pub(crate) fn scratch_bytes(&self) -> u64 {
        self.scratch.as_ref().map_or(0, |(a, _)| a.len() as u64)
    }

    /// Add device-timed copy spans to `trace` (after `finish`).
    pub(crate) fn write_trace(&mut self, trace: &mut TraceRecorder) -> Result<()> {
        let Some((base, base_host, copies)) = &self.timing else { return Ok(()) };
        let offset_us = base_host.saturating_duration_since(trace.origin()).as_secs_f64() * 1e6;
        for c in copies {
            let s = c.start.elapsed_since(base)? as f64 * 1e3;
            let e = c.end.elapsed_since(base)? as f64 * 1e3;
            trace.span_us("copy", format!("stream {} (slot {})", c.stream, c.slot), offset_us + s, e - s, c.bytes);
        }
        Ok(())
    }
}

impl Sink for CudaSink<'_> {
    fn deliver(&mut self, slot: usize, data: &[u8], extent: &ReadExtent, plan: &Plan) -> Result<()> {
        let si = slot % self.streams.len();
        let stream = &self.streams[si];
        let mut timed = match &self.timing {
            Some(_) => {
                let mut s = Event::new(&self.dev, true)?;
                s.record(stream)?;
                Some(s)
            }
            None => None,
        };
        let pieces = &plan.pieces[extent.pieces.clone()];
        let arena = self.arena.ptr();
        let converts = pieces.iter().any(|p| plan.tensors[p.tensor].converts());
        match (&self.scratch, &self.converter) {
            (Some((scratch, region)), Some(conv)) if converts => {
                let base = scratch.ptr() + (si * region) as u64;
                for p in pieces {
                    let t = &plan.tensors[p.tensor];
                    // SAFETY: the source lies in the pinned slot, valid until release(slot) has
                    // waited on this slot's event (recorded below, after all its work).
                    let src_host = unsafe { data.as_ptr().add(p.extent_offset as usize) };
                    if !t.converts() {
                        // SAFETY: the destination is inside t's planned arena range.
                        unsafe {
                            result::memcpy_htod_async(
                                arena + t.arena_offset + p.tensor_offset,
                                src_host,
                                p.len as usize,
                                stream.raw,
                            )?
                        };
                        continue;
                    }
                    // Rounds of at most one region, each at the region's start (256-byte
                    // aligned, so the kernel reads aligned elements whatever the file's layout).
                    // A round's length is a multiple of 4096 except the piece's last, so every
                    // round holds whole elements.
                    let mut done = 0u64;
                    while done < p.len {
                        let len = (p.len - done).min(*region as u64);
                        // SAFETY: len <= region bytes, all within this stream's region; the
                        // stream orders this copy after the kernel that last read the region.
                        unsafe {
                            result::memcpy_htod_async(base, src_host.add(done as usize), len as usize, stream.raw)?
                        };
                        let elements = len * 8 / t.dtype.bits();
                        let first = (p.tensor_offset + done) * 8 / t.dtype.bits();
                        let dst = arena + t.arena_offset + first * t.out_dtype.bits() / 8;
                        // SAFETY: base holds len bytes of t.dtype, dst has room for the
                        // converted elements inside t's arena range (planned), both on this
                        // device; the kernel runs on `stream` after the copy into scratch.
                        unsafe { conv.launch(t.dtype, t.out_dtype, base, dst, elements as usize, stream.raw)? };
                        done += len;
                    }
                }
            }
            _ => {
                for p in pieces {
                    let t = &plan.tensors[p.tensor];
                    // SAFETY: the source is inside the pinned slot, valid until this slot's event
                    // (recorded below) has fired; the destination is inside t's planned arena
                    // range.
                    unsafe {
                        result::memcpy_htod_async(
                            arena + t.arena_offset + p.tensor_offset,
                            data.as_ptr().add(p.extent_offset as usize),
                            p.len as usize,
                            stream.raw,
                        )?
                    };
                }
            }
        }
        self.slot_events[slot].record(stream)?;
        if let (Some((_, _, copies)), Some(start)) = (&mut self.timing, timed.take()) {
            let mut end = Event::new(&self.dev, true)?;
            end.record(stream)?;
            copies.push(TimedCopy { slot, stream: si, bytes: extent.len, start, end });
        }
        Ok(())
    }

    fn release(&mut self, slot: usize) -> Result<()> {
        self.slot_events[slot].synchronize()
    }

    fn finish(&mut self) -> Result<()> {
        for s in &self.streams {
            s.synchronize()?;
        }
        Ok(())
    }
}

impl Drop for CudaSink<'_> {
    fn drop(&mut self) {
        // Streams synchronize in their own Drop; do it first here so the scratch region and the
        // staging slots are idle before anything is freed.
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_stays_within_its_budget_and_holds_whole_pages() {
        assert_eq!(scratch_region_bytes(16 << 20, 2), 16 << 20);
        assert_eq!(scratch_region_bytes(32 << 20, 4), 16 << 20);
        assert_eq!(scratch_region_bytes(64 << 10, 1), 64 << 10);
        assert_eq!(scratch_region_bytes(usize::MAX, 0), SCRATCH_BUDGET);
        assert_eq!(scratch_region_bytes(1 << 30, 100_000), 4096);
        for (slot, streams) in [(16 << 20, 2), (1 << 30, 3), (5 << 20, 7), (64 << 10, 64)] {
            let r = scratch_region_bytes(slot, streams);
            assert_eq!(r % 4096, 0);
            assert!(r * streams <= SCRATCH_BUDGET.max(4096 * streams));
        }
    }
}
