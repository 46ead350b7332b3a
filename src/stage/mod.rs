//! Stages: how planned reads become bytes a sink can take.
//!
//! - [`ring`]: reads fill the slots of a [`StagingRing`]; a slot goes back to the readers only
//!   after the fence of its last delivery fired.
//! - `in_place`: reads land straight in the sink's host memory (converting on the reading
//!   core where asked).
//! - `zero_copy` (CUDA): windows of the file's page cache, mapped and page-locked in place, that
//!   the device copies from (zero-copy).
//!
//! A stage reports raw failures as a `StageError` (which extent, which file offset); the
//! pipeline turns them into errors naming the file and tensor.

pub(crate) mod in_place;
pub mod ring;
#[cfg(feature = "cuda")]
pub(crate) mod zero_copy;

use std::io;
use std::ops::Range;
use std::time::Instant;

pub use ring::StagingRing;

use crate::error::Error;
pub use crate::memory::StagingMemory;
use crate::memory::{Fence, Staged};

/// Where the bytes of a landed unit are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LandedBytes {
    /// CPU-readable host memory holding file bytes from `file_offset` on.
    Host { ptr: *const u8, len: usize, file_offset: u64 },
    /// Memory only the device may read (a registered mapping of the page cache).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // made by the zero-copy stage alone
    DeviceReadable { ptr: *const u8, len: usize, file_offset: u64 },
    /// In the sink's host region already.
    InPlace,
}

impl Landed {
    /// The bytes as a sink sees them, for one delivery: the caller hands the unit back
    /// (`Stage::recycle`) only after the sink returned from `deliver`.
    pub(crate) fn staged(&self) -> Staged<'_> {
        match self.bytes {
            LandedBytes::Host { ptr, len, file_offset } => {
                // SAFETY: stages make `Host` landed bytes only over `len` initialised bytes of
                // their own memory (a ring slot whose reads all completed), which they neither
                // write nor free before the unit is recycled, after this borrow ended.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
                Staged::Host { bytes, file_offset }
            }
            LandedBytes::DeviceReadable { ptr, len, file_offset } => Staged::DeviceReadable { ptr, len, file_offset },
            LandedBytes::InPlace => Staged::InPlace,
        }
    }
}

/// When a unit's work happened, for the trace.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    pub track: String,
    pub started: Instant,
    pub read_done: Instant,
    /// When a conversion on the reading core finished (in-place conversion only).
    pub converted: Option<Instant>,
}

/// A unit of reads that has landed: consecutive extents, staged in slot `slot`.
#[derive(Debug)]
pub(crate) struct Landed {
    pub extents: Range<usize>,
    pub slot: usize,
    pub bytes: LandedBytes,
    pub timing: Option<Timing>,
}

/// What went wrong in a stage.
#[derive(Debug)]
pub(crate) enum StageFault {
    /// A read failed.
    Io(io::Error),
    /// The file ended before the read did.
    Eof,
    /// An in-place conversion failed.
    Convert,
    /// The read engine itself failed (no single read at fault).
    Engine(io::Error),
    /// An error that already says what failed (a driver call, a fence).
    Named(Error),
}

/// A stage's failure: the extent and file offset it happened at, and what.
#[derive(Debug)]
pub(crate) struct StageError {
    pub extent: usize,
    pub at: u64,
    pub fault: StageFault,
}

impl StageError {
    pub(crate) fn named(extent: usize, at: u64, e: Error) -> Self {
        StageError { extent, at, fault: StageFault::Named(e) }
    }
}

/// Turns a schedule's extents into landed bytes.
///
/// The pipeline calls `fill` (start what fits), `next` (block for the next landed unit),
/// `recycle` (the unit's memory may be reused once the fence fired), and `stop` once at the end
/// on every path: after `stop` returns, no read writes and no delivery reads stage memory.
pub(crate) trait Stage {
    /// Start as many reads as there is room for.
    fn fill(&mut self) -> Result<(), StageError>;
    /// Block until the next unit has landed; `None` when every extent has.
    fn next(&mut self) -> Result<Option<Landed>, StageError>;
    /// The sink took the unit in `slot`; its memory may be reused once `fence` fired.
    fn recycle(&mut self, slot: usize, fence: Fence);
    /// Wait until nothing reads into or out of stage memory (reads drained, fences waited).
    fn stop(&mut self);
    /// Host bytes of staging this stage holds (ring slots, worker buffers, mapped windows).
    fn staging_bytes(&self) -> u64;
}
