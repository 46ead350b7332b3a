//! The staging ring: a few reusable buffers between the readers and the target.
//!
//! A slot is handed to the readers, filled, delivered to the target, and handed back to the
//! readers only after the target's [`release`](crate::target) says it no longer reads it (for
//! CUDA: the event recorded behind its copy has fired). Slots are reused oldest first, so the
//! release rarely has to wait.

use std::collections::VecDeque;

use crate::error::Result;
use crate::target::HostMemory;

/// Memory a staging slot can live in: plain host pages, or pinned (page-locked) memory.
pub trait StagingMemory: Send {
    /// Start of the buffer (page-aligned).
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the memory is page-locked (DMA-able without a bounce).
    fn is_pinned(&self) -> bool;
}

impl StagingMemory for HostMemory {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_ptr()
    }
    fn len(&self) -> usize {
        HostMemory::len(self)
    }
    fn is_pinned(&self) -> bool {
        false
    }
}

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
