//! The staging ring and the stage that reads through it.
//!
//! A slot is handed to the readers, filled, delivered to the sink, and handed back to the
//! readers only after the [`Fence`] of that delivery fired (for CUDA: the event recorded behind
//! its copy). Slots are reused oldest first, so the wait is rare.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::Instant;

use super::{Landed, LandedBytes, Stage, StageError, StageFault, Timing};
use crate::error::Result;
use crate::io::{ReadQueue, ReadRequest};
use crate::memory::{Fence, HostMemory, StagingMemory};
use crate::plan::Schedule;

/// A ring of staging slots of equal size.
///
/// ```
/// use weightstream::stage::StagingRing;
/// let ring = StagingRing::host(4, 1 << 20)?;
/// assert_eq!(ring.slot_count(), 4);
/// assert_eq!(ring.total_bytes(), 4 << 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StagingRing {
    slots: Vec<Box<dyn StagingMemory>>,
    slot_size: usize,
    free: VecDeque<usize>,
}

impl StagingRing {
    /// A ring of `count` page-aligned host buffers of `size` bytes.
    pub fn host(count: usize, size: usize) -> Result<Self> {
        let slots = (0..count.max(1))
            .map(|_| HostMemory::new(size).map(|m| Box::new(m) as Box<dyn StagingMemory>))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_slots(slots, size))
    }

    /// A ring of `count` pinned buffers of `size` bytes for `dev` (DMA-able without a bounce).
    #[cfg(feature = "cuda")]
    pub fn pinned(dev: &std::sync::Arc<crate::cuda::CudaDevice>, count: usize, size: usize) -> Result<Self> {
        let slots = (0..count.max(1))
            .map(|_| crate::cuda::PinnedBuf::new(dev, size).map(|b| Box::new(b) as Box<dyn StagingMemory>))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_slots(slots, size))
    }

    /// A ring over buffers allocated elsewhere (pinned memory of the CUDA target).
    pub fn from_slots(slots: Vec<Box<dyn StagingMemory>>, slot_size: usize) -> Self {
        let free = (0..slots.len()).collect();
        StagingRing { slots, slot_size, free }
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Size of one slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Bytes held by the ring.
    pub fn total_bytes(&self) -> usize {
        self.slot_size * self.slots.len()
    }

    /// Whether the slots are pinned memory.
    pub fn is_pinned(&self) -> bool {
        self.slots.first().is_some_and(|s| s.is_pinned())
    }

    /// Take the least recently returned free slot, if any. The caller must have the consumer
    /// release it before writing into it.
    pub(crate) fn take(&mut self) -> Option<usize> {
        self.free.pop_front()
    }

    /// Return a slot whose bytes were delivered.
    pub(crate) fn give_back(&mut self, slot: usize) {
        self.free.push_back(slot);
    }

    /// Start of slot `slot`.
    pub(crate) fn slot_ptr(&mut self, slot: usize) -> *mut u8 {
        self.slots[slot].as_mut_ptr()
    }

    /// Mark every slot free again (after a load ended, successfully or not, and the consumer
    /// finished with all of them).
    pub(crate) fn reset(&mut self) {
        self.free = (0..self.slots.len()).collect();
    }
}

impl std::fmt::Debug for StagingRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingRing")
            .field("slots", &self.slots.len())
            .field("slot_size", &self.slot_size)
            .field("pinned", &self.is_pinned())
            .finish()
    }
}

/// Alignment O_DIRECT needs for offsets, lengths and buffer addresses.
pub(crate) const DIRECT_ALIGN: u64 = 4096;

struct SlotJob {
    extent: usize,
    /// Bytes read before the extent's first byte (O_DIRECT alignment).
    data_skip: usize,
    outstanding: usize,
    started: Instant,
}

/// Reads each extent into a free slot of a ring, with reads of `read_size` in parallel.
pub(crate) struct RingStage<'a> {
    sched: &'a Schedule,
    /// Descriptor of each plan file, by [`crate::plan::ReadExtent::file`].
    fds: Vec<RawFd>,
    ring: &'a mut StagingRing,
    queue: ReadQueue,
    direct: bool,
    read_size: u64,
    trace: bool,
    jobs: Vec<Option<SlotJob>>,
    /// Per slot: the fence of its last delivery, and that delivery's extent (to name an error).
    fences: Vec<Option<(usize, Fence)>>,
    landed_extent: Vec<usize>,
    next: usize,
    /// Hand slots out in extent order (a sink that needs file order): a slot that lands early
    /// waits in `early`, holding its slot, until those before it were handed out; memory stays
    /// the ring's.
    in_order: bool,
    early: std::collections::BTreeMap<usize, Landed>,
    /// The next extent to hand out, in order.
    handed: usize,
}

impl<'a> RingStage<'a> {
    /// A stage over `ring`. The descriptors must stay open, and the ring alive, until `stop`
    /// returned. Every extent of `sched` (aligned out to 4096 bytes when `direct`) must fit in
    /// a slot.
    pub(crate) fn new(
        sched: &'a Schedule,
        fds: Vec<RawFd>,
        ring: &'a mut StagingRing,
        queue: ReadQueue,
        direct: bool,
        read_size: u64,
        trace: bool,
    ) -> Self {
        ring.reset();
        let slots = ring.slot_count();
        RingStage {
            sched,
            fds,
            ring,
            queue,
            direct,
            read_size: read_size.max(1),
            trace,
            jobs: (0..slots).map(|_| None).collect(),
            fences: (0..slots).map(|_| None).collect(),
            landed_extent: vec![0; slots],
            next: 0,
            in_order: false,
            early: std::collections::BTreeMap::new(),
            handed: 0,
        }
    }

    /// Hand landed slots out in extent order (file order), for a sink that needs it.
    pub(crate) fn in_order(mut self, on: bool) -> Self {
        self.in_order = on;
        self
    }

    /// The engine's name (`"pread"`, `"uring"`).
    pub(crate) fn engine_name(&self) -> &'static str {
        self.queue.engine_name()
    }
}

impl Stage for RingStage<'_> {
    fn fill(&mut self) -> Result<(), StageError> {
        while let Some(e) = self.sched.extents.get(self.next) {
            let (start, end) = if self.direct {
                (e.offset / DIRECT_ALIGN * DIRECT_ALIGN, e.end().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN)
            } else {
                (e.offset, e.end())
            };
            if end - start > self.ring.slot_size() as u64 {
                let what = format!("extent of {} bytes planned for slots of {}", end - start, self.ring.slot_size());
                return Err(StageError::named(self.next, e.offset, crate::error::Error::internal(what)));
            }
            // All of a slot's reads are queued at once; wait for room rather than overfill the
            // engine (an io_uring's completion queue is bounded).
            if self.queue.room() < (end - start).div_ceil(self.read_size) as usize {
                break;
            }
            let Some(slot) = self.ring.take() else { break };
            if let Some((delivered, fence)) = self.fences[slot].take() {
                let at = self.sched.extents[delivered].offset;
                fence.wait().map_err(|err| StageError::named(delivered, at, err))?;
            }
            let buf = self.ring.slot_ptr(slot);
            let mut sub = 0u64;
            let mut count = 0;
            while start + sub < end {
                let len = (end - start - sub).min(self.read_size);
                let req = ReadRequest {
                    fd: self.fds[e.file],
                    offset: start + sub,
                    // SAFETY: end - start <= slot size (checked above), so buf + sub + len
                    // stays in the slot.
                    buf: unsafe { buf.add(sub as usize) },
                    len: len as usize,
                    tag: ((slot as u64) << 32) | count as u64,
                };
                // SAFETY: the slot's last delivery fenced (waited above), so nothing reads it;
                // it is written by this extent's requests alone, in disjoint ranges, and not
                // handed out before all of them completed; the ring and the fds outlive the
                // queue's use of them (`stop` drains it on every path).
                unsafe { self.queue.submit(req) }.map_err(|err| StageError {
                    extent: self.next,
                    at: start + sub,
                    fault: StageFault::Io(err),
                })?;
                sub += len;
                count += 1;
            }
            self.jobs[slot] = Some(SlotJob {
                extent: self.next,
                data_skip: (e.offset - start) as usize,
                outstanding: count,
                started: Instant::now(),
            });
            self.next += 1;
        }
        Ok(())
    }

    fn next(&mut self) -> Result<Option<Landed>, StageError> {
        loop {
            if let Some(landed) = self.early.remove(&self.handed) {
                self.handed += 1;
                return Ok(Some(landed));
            }
            if self.queue.in_flight() == 0 {
                if self.next < self.sched.extents.len() {
                    // Unreachable by construction (a slot's reads always fit an empty queue);
                    // never return a half-loaded model if it were not.
                    let what = "staged reads stalled with extents left";
                    return Err(StageError::named(self.next, 0, crate::error::Error::internal(what)));
                }
                return Ok(None);
            }
            let c = self.queue.wait().map_err(|err| StageError {
                extent: self.next,
                at: 0,
                fault: StageFault::Engine(err),
            })?;
            let slot = (c.tag >> 32) as usize;
            let Some(job) = self.jobs.get_mut(slot).and_then(Option::as_mut) else {
                let what = "read completion for an idle staging slot";
                return Err(StageError::named(self.next, c.offset, crate::error::Error::internal(what)));
            };
            let e = &self.sched.extents[job.extent];
            let n =
                c.result.map_err(|err| StageError { extent: job.extent, at: c.offset, fault: StageFault::Io(err) })?;
            let needed = e.end().saturating_sub(c.offset).min(c.len as u64);
            if (n as u64) < needed {
                return Err(StageError { extent: job.extent, at: c.offset + n as u64, fault: StageFault::Eof });
            }
            job.outstanding -= 1;
            if job.outstanding > 0 {
                continue;
            }
            let Some(job) = self.jobs[slot].take() else { continue };
            self.landed_extent[slot] = job.extent;
            let read_done = Instant::now();
            // SAFETY: data_skip + e.len <= slot size (checked in fill).
            let ptr = unsafe { self.ring.slot_ptr(slot).add(job.data_skip) };
            let timing = self.trace.then(|| Timing {
                track: format!("read slot {slot}"),
                started: job.started,
                read_done,
                converted: None,
            });
            let landed = Landed {
                extents: job.extent..job.extent + 1,
                slot,
                bytes: LandedBytes::Host { ptr, len: e.len as usize, file_offset: e.offset },
                timing,
            };
            if self.in_order && job.extent != self.handed {
                // The extents before it are in flight (fill submits in order): wait for them.
                self.early.insert(job.extent, landed);
                continue;
            }
            self.handed = job.extent + 1;
            return Ok(Some(landed));
        }
    }

    fn recycle(&mut self, slot: usize, fence: Fence) {
        self.fences[slot] = Some((self.landed_extent[slot], fence));
        self.ring.give_back(slot);
    }

    fn stop(&mut self) {
        self.queue.drain();
        for f in self.fences.iter_mut() {
            if let Some((_, f)) = f.take() {
                let _ = f.wait();
            }
        }
        self.jobs.iter_mut().for_each(|j| *j = None);
        self.early.clear();
        self.ring.reset();
    }

    fn staging_bytes(&self) -> u64 {
        self.ring.total_bytes() as u64
    }
}

impl Drop for RingStage<'_> {
    fn drop(&mut self) {
        // `stop` is idempotent; here for the paths that unwind past the pipeline.
        self.stop();
    }
}
