//! The CUDA sink: copies on several streams into one device arena, conversion kernels from a
//! bounded scratch region, an event behind each delivery as its fence. The CUDA layer it drives
//! (driver, memory, kernels) is [`crate::cuda`]; its device types are re-exported here.

mod rows;

use std::sync::Arc;

pub use crate::cuda::{device_count, CudaDevice, DeviceArena, Event, PinnedBuf, Stream};
use crate::cuda::{driver, kernels};
use crate::error::{Error, Result};
use crate::memory::{Fence, Staged};
use crate::sink::{Delivery, Sink};
use crate::trace::TraceRecorder;

struct TimedCopy {
    slot: usize,
    stream: usize,
    bytes: u64,
    start: Event,
    end: Event,
}

/// Device scratch for conversion, all streams together, at most (the bound).
pub const SCRATCH_BUDGET: usize = 64 << 20;

/// Bytes of one stream's scratch region: a staging slot's worth, or the stream's share of
/// [`SCRATCH_BUDGET`] when that is less (larger pieces then go through in several rounds); a
/// multiple of 4096, so that a round never cuts an element.
pub fn scratch_region_bytes(slot_size: usize, streams: usize) -> usize {
    let share = SCRATCH_BUDGET / streams.max(1) / 4096 * 4096;
    (slot_size.min(share) / 4096 * 4096).max(4096)
}

/// Where a [`CudaSink`] puts tensors.
enum DevicePlaces<'a> {
    /// One arena laid out as the plan's destination region.
    Arena(&'a DeviceArena),
    /// A device pointer and length per planned tensor (caller-owned memory).
    Caller(Vec<(u64, usize)>),
}

/// Copies delivered bytes into a [`DeviceArena`] (or caller-owned device memory): delivery slot `k`'s copies go on stream
/// `k % streams`, followed by slot `k`'s event, which is the delivery's fence.
///
/// A piece of a tensor to convert is copied into its stream's scratch region first, and a kernel
/// writes the converted values into the arena. One region per stream is enough: a stream runs
/// its work in order, so the next copy into the region starts only after the kernel that read
/// the previous contents has finished. That bounds the scratch by the stream count, not the slot
/// count, and by [`SCRATCH_BUDGET`] in all.
pub struct CudaSink<'a> {
    dev: Arc<CudaDevice>,
    places: DevicePlaces<'a>,
    streams: Vec<Stream>,
    slot_events: Vec<std::rc::Rc<Event>>,
    /// The scratch arena and the bytes of each stream's region in it.
    scratch: Option<(DeviceArena, usize)>,
    converter: Option<Arc<kernels::DeviceConverter>>,
    timing: Option<(Event, std::time::Instant, Vec<TimedCopy>)>,
}

impl<'a> CudaSink<'a> {
    /// A sink into `arena` on `dev` with `streams` streams. `converter` must be given when
    /// `converts`; then each stream gets a scratch region of
    /// [`scratch_region_bytes`]`(max_delivery, streams)`. `trace` times every copy on the device.
    pub fn new(
        dev: &Arc<CudaDevice>,
        arena: &'a DeviceArena,
        streams: usize,
        converts: bool,
        max_delivery: usize,
        trace: bool,
        converter: Option<Arc<kernels::DeviceConverter>>,
    ) -> Result<Self> {
        Self::with_places(dev, DevicePlaces::Arena(arena), streams, converts, max_delivery, trace, converter)
    }

    fn with_places(
        dev: &Arc<CudaDevice>,
        places: DevicePlaces<'a>,
        streams: usize,
        converts: bool,
        max_delivery: usize,
        trace: bool,
        converter: Option<Arc<kernels::DeviceConverter>>,
    ) -> Result<Self> {
        let streams = (0..streams.max(1)).map(|_| Stream::new(dev)).collect::<Result<Vec<_>>>()?;
        let (scratch, converter) = if converts {
            let region = scratch_region_bytes(max_delivery, streams.len());
            let conv = converter.ok_or_else(|| Error::internal("conversions planned without a device converter"))?;
            (Some((DeviceArena::alloc(dev, region * streams.len())?, region)), Some(conv))
        } else {
            (None, None)
        };
        let timing = if trace {
            let base = Event::new(dev, true)?;
            base.record(&streams[0])?;
            Some((base, std::time::Instant::now(), Vec::new()))
        } else {
            None
        };
        Ok(CudaSink { dev: Arc::clone(dev), places, streams, slot_events: Vec::new(), scratch, converter, timing })
    }

    /// Like [`CudaSink::new`], but planned tensor `i` lands at `places[i]`: a device pointer
    /// and its length, which must be the tensor's loaded size (checked at each delivery).
    ///
    /// # Safety
    /// Each `(ptr, len)` must be device memory of `dev`'s context, valid for writes of `len`
    /// bytes until the sink is dropped, not accessed by anything else meanwhile, and the ranges
    /// must not overlap.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn into_pointers(
        dev: &Arc<CudaDevice>,
        places: Vec<(u64, usize)>,
        streams: usize,
        converts: bool,
        max_delivery: usize,
        trace: bool,
        converter: Option<Arc<kernels::DeviceConverter>>,
    ) -> Result<CudaSink<'static>> {
        CudaSink::with_places(dev, DevicePlaces::Caller(places), streams, converts, max_delivery, trace, converter)
    }

    /// The device address and length of planned tensor `i`'s loaded bytes (whose arena place
    /// starts at `arena_offset`).
    fn place(&self, i: usize, arena_offset: u64) -> Option<(u64, u64)> {
        match &self.places {
            DevicePlaces::Arena(a) => Some((a.ptr() + arena_offset, (a.len() as u64).saturating_sub(arena_offset))),
            DevicePlaces::Caller(p) => p.get(i).map(|&(ptr, len)| (ptr, len as u64)),
        }
    }

    fn slot_event(&mut self, slot: usize) -> Result<std::rc::Rc<Event>> {
        while self.slot_events.len() <= slot {
            self.slot_events.push(std::rc::Rc::new(Event::new(&self.dev, false)?));
        }
        Ok(std::rc::Rc::clone(&self.slot_events[slot]))
    }
}

impl Sink for CudaSink<'_> {
    fn reads_by_dma(&self) -> bool {
        true
    }

    /// Bytes of device scratch this sink holds for conversion (0 when nothing converts).
    fn scratch_bytes(&self) -> u64 {
        self.scratch.as_ref().map_or(0, |(a, _)| a.len() as u64)
    }

    /// Add device-timed copy spans to `trace` (after `finish`).
    fn write_trace(&mut self, trace: &mut TraceRecorder) -> Result<()> {
        let Some((base, base_host, copies)) = &self.timing else { return Ok(()) };
        let offset_us = base_host.saturating_duration_since(trace.origin()).as_secs_f64() * 1e6;
        for c in copies {
            let s = c.start.elapsed_since(base)? as f64 * 1e3;
            let e = c.end.elapsed_since(base)? as f64 * 1e3;
            trace.span_us("copy", format!("stream {} (slot {})", c.stream, c.slot), offset_us + s, e - s, c.bytes);
        }
        Ok(())
    }

    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        if matches!(d.bytes, Staged::InPlace) {
            return Err(Error::internal("the CUDA sink has no host region to read in place"));
        }
        let slot = d.slot;
        let si = slot % self.streams.len();
        let event = self.slot_event(slot)?;
        let stream = &self.streams[si];
        let timed = match &self.timing {
            Some(_) => {
                let s = Event::new(&self.dev, true)?;
                s.record(stream)?;
                Some(s)
            }
            None => None,
        };
        let mut bytes = 0u64;
        // Copies not yet queued (rows that the next piece may continue), with the first row's
        // source pointer.
        let mut pending: Option<(rows::RowCopy, *const u8)> = None;
        for piece in d.pieces() {
            let (p, src) = piece?;
            let t = &d.plan.tensors[p.tensor];
            let Some(src) = src else { continue };
            bytes += p.len;
            // Destination offsets from the tensor's place: `dst_range` counts from its arena
            // offset.
            let dst = t.dst_range(p.tensor_offset, p.len);
            let (base, room) = match self.place(p.tensor, t.dst_offset) {
                Some((ptr, room)) if room >= t.len && dst.end - t.dst_offset <= t.len => (ptr, room),
                _ => {
                    return Err(Error::internal(format!("tensor `{}` has no device place of {} bytes", t.name, t.len)))
                }
            };
            let _ = room;
            let at = |r: &std::ops::Range<u64>| base + (r.start - t.dst_offset);
            match (&self.scratch, &self.converter) {
                (Some((scratch, region)), Some(conv)) if t.converts() => {
                    let scratch_base = scratch.ptr() + (si * region) as u64;
                    // Rounds of at most one region, each at the region's start (256-byte
                    // aligned, so the kernel reads aligned elements whatever the file's layout).
                    // A round's length is a multiple of 4096 except the piece's last, so every
                    // round holds whole elements.
                    let mut done = 0u64;
                    while done < p.len {
                        let len = (p.len - done).min(*region as u64);
                        // SAFETY: the source lies in the delivered bytes (checked by `pieces`),
                        // valid until this delivery's fence fired; len <= region bytes, all
                        // within this stream's region; the stream orders this copy after the
                        // kernel that last read the region.
                        unsafe {
                            driver::memcpy_htod_async(scratch_base, src.add(done as usize), len as usize, stream.raw)?
                        };
                        let elements = len * 8 / t.stored_dtype.bits();
                        let out = t.dst_range(p.tensor_offset + done, len);
                        let (from, to) = (t.stored_dtype, t.dtype);
                        // SAFETY: scratch_base holds the len bytes of the stored dtype just
                        // copied; out is inside t's place (checked above for the whole piece),
                        // both on this device; the kernel runs on `stream` after that copy.
                        unsafe { conv.launch(from, to, scratch_base, at(&out), elements as usize, stream.raw)? };
                        done += len;
                    }
                }
                (_, _) if t.converts() => {
                    return Err(Error::internal("conversions planned without a device converter"));
                }
                _ => {
                    // Rows of a shard's block fold into one 2-D copy; other pieces go one each.
                    let (to, len) = (at(&dst), p.len as usize);
                    if !pending.as_mut().is_some_and(|(c, _)| c.extend(to, src as usize, len)) {
                        if let Some((c, first)) = pending.replace((rows::RowCopy::new(to, src as usize, len), src)) {
                            queue_rows(c, first, stream)?;
                        }
                    }
                }
            }
        }
        if let Some((c, first)) = pending.take() {
            queue_rows(c, first, stream)?;
        }
        event.record(stream)?;
        if let (Some((_, _, copies)), Some(start)) = (&mut self.timing, timed) {
            let end = Event::new(&self.dev, true)?;
            end.record(stream)?;
            copies.push(TimedCopy { slot, stream: si, bytes, start, end });
        }
        Ok(Fence::new(move || event.synchronize()))
    }

    fn finish(&mut self) -> Result<()> {
        // Every stream, even after one failed: nothing may still copy once this returns.
        let mut first = Ok(());
        for s in &self.streams {
            let r = s.synchronize();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Queue `c`, whose first row is read at `first`, on `stream`.
fn queue_rows(c: rows::RowCopy, first: *const u8, stream: &Stream) -> Result<()> {
    if c.height == 1 || c.spitch == c.width {
        // SAFETY: one piece of the delivery, or rows back to back in both source and
        // destination (the same bytes as one copy): each source is inside the delivered bytes
        // (checked by `pieces`), valid until the delivery's fence fired; each destination inside
        // its tensor's place (checked by `deliver`).
        return unsafe { driver::memcpy_htod_async(c.dst, first, c.width * c.height, stream.raw) };
    }
    // SAFETY: the rows are exactly pieces of the delivery (`RowCopy::extend` took each only at
    // its own source and destination), each checked as above; the stream is this delivery's.
    unsafe { driver::memcpy_2d_htod_async(c.dst, c.width, first, c.spitch, (c.width, c.height), stream.raw) }
}

impl Drop for CudaSink<'_> {
    fn drop(&mut self) {
        // Streams synchronize in their own Drop; do it first here so the scratch region and the
        // staged bytes are idle before anything is freed.
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
