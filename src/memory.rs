//! Memory that stages and sinks share: host blocks ([`HostMemory`]), the memory a staging slot
//! lives in ([`StagingMemory`]: host pages here, pinned buffers in `crate::cuda`), the host
//! region a sink lends the readers ([`HostRegion`]), the bytes of a delivery as a stage made
//! them available ([`Staged`]), and the [`Fence`] a sink returns for them.
//!
//! A leaf under both `stage` and `sink` (and `cuda`): it imports neither. The public paths are
//! `weightstream::sink::{Fence, HostMemory, HostRegion, Staged}` and
//! `weightstream::stage::StagingMemory`.

use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// A page-aligned, zero-initialised block of host memory from an anonymous mapping.
///
/// Large blocks ask for transparent huge pages, which makes first-touch faults 512× rarer.
///
/// ```
/// let mut m = weightstream::sink::HostMemory::new(10_000)?;
/// m.as_mut_slice()[9_999] = 7;
/// assert_eq!(m.as_slice()[9_999], 7);
/// assert_eq!(m.as_slice().as_ptr() as usize % 4096, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
}

// SAFETY: HostMemory owns its mapping exclusively; access goes through &self / &mut self.
unsafe impl Send for HostMemory {}
// SAFETY: shared references only read.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Map `len` bytes (at least one page is mapped, so a zero-length block has a valid pointer).
    pub fn new(len: usize) -> Result<Self> {
        let Some(map_len) = len.max(1).checked_next_multiple_of(4096) else {
            return Err(Error::HostOutOfMemory { bytes: len as u64, source: std::io::ErrorKind::OutOfMemory.into() });
        };
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::HostOutOfMemory { bytes: len as u64, source: std::io::Error::last_os_error() });
        }
        if map_len >= 4 << 20 {
            // SAFETY: advice on a mapping we own; failure is harmless (THP disabled).
            unsafe { libc::madvise(p, map_len, libc::MADV_HUGEPAGE) };
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| Error::HostOutOfMemory {
            bytes: len as u64,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(HostMemory { ptr, len, map_len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the block is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to the start.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The start as a non-null pointer (for a [`HostRegion`] over the block).
    pub(crate) fn non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is len bytes, readable, initialised (zero pages), and lives as long
        // as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in new, exactly once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory").field("len", &self.len).finish()
    }
}

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

/// Fires once a sink no longer reads the bytes of one delivery.
///
/// ```
/// use weightstream::sink::Fence;
/// assert!(Fence::done().wait().is_ok());
/// let fence = Fence::new(|| Ok(()));
/// assert!(!fence.is_done());
/// fence.wait()?;
/// # Ok::<(), weightstream::Error>(())
/// ```
#[must_use = "a stage must wait on the fence before it reuses the delivered memory"]
pub struct Fence(Option<Box<dyn FnOnce() -> Result<()>>>);

impl Fence {
    /// A fence that has already fired (the sink is done with the bytes when `deliver` returns).
    pub fn done() -> Self {
        Fence(None)
    }

    /// A fence that fires when `wait` returns (a CUDA event's synchronize, say).
    pub fn new(wait: impl FnOnce() -> Result<()> + 'static) -> Self {
        Fence(Some(Box::new(wait)))
    }

    /// Whether it is known to have fired without waiting.
    pub fn is_done(&self) -> bool {
        self.0.is_none()
    }

    /// Block until it fired.
    pub fn wait(self) -> Result<()> {
        match self.0 {
            Some(w) => w(),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_done() { "Fence(done)" } else { "Fence(pending)" })
    }
}

/// The bytes of a delivery, as the stage made them available.
#[derive(Debug, Clone, Copy)]
pub enum Staged<'a> {
    /// Host bytes the CPU may read: `bytes[i]` is byte `file_offset + i` of the extents' file.
    Host {
        /// The bytes, covering every extent of the delivery.
        bytes: &'a [u8],
        /// The file offset of `bytes[0]`.
        file_offset: u64,
    },
    /// Page-locked bytes that only the device may read (a file's page cache mapped and
    /// registered in place: the CPU must not touch them, a truncated file would fault).
    DeviceReadable {
        /// Start of the mapping; byte `i` is byte `file_offset + i` of the file.
        ptr: *const u8,
        /// Its length.
        len: usize,
        /// The file offset of `ptr`.
        file_offset: u64,
    },
    /// The stage read (and converted) the bytes straight into the sink's [`HostRegion`].
    InPlace,
}

impl Staged<'_> {
    /// The address of the byte at `file_offset` and how many bytes follow it, when the bytes are
    /// in memory (not for [`Staged::InPlace`], or an offset outside them).
    pub fn locate(&self, file_offset: u64) -> Option<(*const u8, usize)> {
        let (ptr, len, base) = match *self {
            Staged::Host { bytes, file_offset } => (bytes.as_ptr(), bytes.len(), file_offset),
            Staged::DeviceReadable { ptr, len, file_offset } => (ptr, len, file_offset),
            Staged::InPlace => return None,
        };
        let at = usize::try_from(file_offset.checked_sub(base)?).ok()?;
        // SAFETY: at <= len, so the pointer stays inside (or one past) the staged bytes.
        (at <= len).then(|| (unsafe { ptr.add(at) }, len - at))
    }
}

/// Host memory a sink lends the readers, to read (and convert) into directly: one region laid
/// out as the plan's destinations (each tensor's loaded bytes at
/// [`crate::plan::PlannedTensor::dst_range`] of it), or one place per planned tensor (caller
/// buffers).
#[derive(Debug, Clone)]
pub struct HostRegion {
    places: RegionPlaces,
}

#[derive(Debug, Clone)]
enum RegionPlaces {
    One { ptr: NonNull<u8>, len: usize },
    PerTensor(Vec<(NonNull<u8>, usize)>),
}

impl HostRegion {
    /// A region of `len` bytes at `ptr`, laid out as the plan's destinations.
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes from the sink's `host_region` call until the
    /// load returned (readers still queued when `finish` is called on an error path are drained
    /// after it). Readers write each byte once, before the delivery that reports it; nothing
    /// else may write those bytes meanwhile, and nothing may read a byte before that delivery
    /// (a stream hands a tensor out once its last delivery came).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        HostRegion { places: RegionPlaces::One { ptr, len } }
    }

    /// Planned tensor `i`'s loaded bytes at `places[i]`, a pointer and a length that must be the
    /// tensor's loaded size.
    ///
    /// # Safety
    /// As for [`HostRegion::new`], for each place.
    pub unsafe fn per_tensor(places: Vec<(NonNull<u8>, usize)>) -> Self {
        HostRegion { places: RegionPlaces::PerTensor(places) }
    }

    /// Where the loaded bytes `dst` (a [`crate::plan::PlannedTensor::dst_range`]) of planned
    /// tensor `tensor`, whose destination starts at `dst_offset`, are written; `None` when they
    /// fall outside the region or the tensor's place.
    ///
    /// ```
    /// let mut buf = [0u8; 64];
    /// let ptr = std::ptr::NonNull::new(buf.as_mut_ptr()).unwrap();
    /// // SAFETY (of the example): `buf` outlives the region, and nothing else uses it.
    /// let one = unsafe { weightstream::sink::HostRegion::new(ptr, 64) };
    /// assert_eq!(one.destination(0, 0, &(8..16)), Some(ptr.as_ptr().wrapping_add(8)));
    /// assert_eq!(one.destination(0, 0, &(60..70)), None);
    /// let per = unsafe { weightstream::sink::HostRegion::per_tensor(vec![(ptr, 64)]) };
    /// assert_eq!(per.destination(0, 256, &(260..264)), Some(ptr.as_ptr().wrapping_add(4)));
    /// assert_eq!(per.destination(1, 0, &(0..1)), None);
    /// ```
    pub fn destination(&self, tensor: usize, dst_offset: u64, dst: &Range<u64>) -> Option<*mut u8> {
        let (ptr, len, start, end) = match &self.places {
            RegionPlaces::One { ptr, len } => (*ptr, *len, dst.start, dst.end),
            RegionPlaces::PerTensor(places) => {
                let (ptr, len) = *places.get(tensor)?;
                (ptr, len, dst.start.checked_sub(dst_offset)?, dst.end.checked_sub(dst_offset)?)
            }
        };
        if start > end || end > len as u64 {
            return None;
        }
        // SAFETY: start <= end <= len, so the pointer stays inside (or one past) the place.
        Some(unsafe { ptr.as_ptr().add(start as usize) })
    }
}
