//! Host memory: page-aligned anonymous mappings for the cpu arena and the host staging ring.

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

/// Copies (or converts) staged pieces into a host arena, or lends the arena to the readers so
/// that they read (and convert) into it in place; or into caller-owned buffers, one a tensor.
#[derive(Debug)]
pub struct HostSink<'a> {
    places: HostPlaces<'a>,
}

#[derive(Debug)]
enum HostPlaces<'a> {
    /// One arena laid out as the plan's destination region.
    Arena(&'a mut HostMemory),
    /// A buffer per planned tensor (by index), each of its loaded size.
    Caller(Vec<&'a mut [u8]>),
}

impl<'a> HostSink<'a> {
    /// A sink writing into `arena`, laid out as the plan's destination region.
    ///
    /// ```
    /// let mut arena = weightstream::sink::HostMemory::new(4096)?;
    /// let sink = weightstream::sink::HostSink::new(&mut arena);
    /// # drop(sink);
    /// # Ok::<(), weightstream::Error>(())
    /// ```
    pub fn new(arena: &'a mut HostMemory) -> Self {
        HostSink { places: HostPlaces::Arena(arena) }
    }

    /// A sink writing planned tensor `i` into `buffers[i]`, which must be exactly its loaded
    /// size (checked at each delivery); its [`super::HostRegion`] lends the buffers to readers
    /// that read (and convert) into them in place.
    ///
    /// ```
    /// let (mut a, mut b) = (vec![0u8; 16], vec![0u8; 4]);
    /// let sink = weightstream::sink::HostSink::into_buffers(vec![&mut a[..], &mut b[..]]);
    /// # drop(sink);
    /// ```
    pub fn into_buffers(buffers: Vec<&'a mut [u8]>) -> Self {
        HostSink { places: HostPlaces::Caller(buffers) }
    }

    /// The loaded bytes of planned tensor `i` (whose arena place is `arena_range`).
    fn place(&mut self, i: usize, arena_range: std::ops::Range<u64>) -> Option<&mut [u8]> {
        match &mut self.places {
            HostPlaces::Arena(a) => a.as_mut_slice().get_mut(arena_range.start as usize..arena_range.end as usize),
            HostPlaces::Caller(b) => b.get_mut(i).map(|b| &mut **b),
        }
    }
}

impl super::Sink for HostSink<'_> {
    fn host_region(&mut self) -> Option<super::HostRegion> {
        match &mut self.places {
            // SAFETY: the arena is mapped for len bytes and borrowed mutably by this sink for its
            // whole life; the sink never touches it while readers may write (InPlace deliveries
            // are not copied).
            HostPlaces::Arena(a) => Some(unsafe { super::HostRegion::new(a.ptr, a.len) }),
            HostPlaces::Caller(buffers) => {
                let places = buffers.iter_mut().map(|b| (NonNull::from(&mut **b).cast::<u8>(), b.len())).collect();
                // SAFETY: each buffer is borrowed mutably by this sink for its whole life, and
                // is exactly its tensor's loaded size; the sink never touches them while readers
                // may write (InPlace deliveries are not copied).
                Some(unsafe { super::HostRegion::per_tensor(places) })
            }
        }
    }

    fn deliver(&mut self, d: &super::Delivery<'_>) -> Result<super::Fence> {
        if matches!(d.bytes, super::Staged::InPlace) {
            return Ok(super::Fence::done());
        }
        if matches!(d.bytes, super::Staged::DeviceReadable { .. }) {
            return Err(Error::internal("a host sink was given bytes only a device may read"));
        }
        for piece in d.host_pieces() {
            let (p, src) = piece?;
            let t = &d.plan.tensors[p.tensor];
            let Some(place) = self.place(p.tensor, t.dst_offset..t.dst_offset + t.len) else {
                return Err(Error::internal(format!("tensor `{}` has no place of {} bytes", t.name, t.len)));
            };
            write_piece(d.plan, &p, src, place)?;
        }
        Ok(super::Fence::done())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Write (or convert) piece `p`'s stored bytes `src` into `place`, the whole loaded bytes of its
/// tensor.
pub(crate) fn write_piece(
    plan: &crate::plan::Plan,
    p: &crate::plan::Piece,
    src: &[u8],
    place: &mut [u8],
) -> Result<()> {
    let t = &plan.tensors[p.tensor];
    let dst = t.dst_range(p.tensor_offset, p.len);
    let within = (dst.start - t.dst_offset) as usize..(dst.end - t.dst_offset) as usize;
    let Some(dst) = Some(place).filter(|b| b.len() as u64 == t.len).and_then(|b| b.get_mut(within)) else {
        return Err(Error::internal(format!("tensor `{}` has no place of {} bytes", t.name, t.len)));
    };
    if t.converts() {
        crate::convert::convert_host(t.stored_dtype, t.dtype, src, dst).map_err(|_| Error::UnsupportedConversion {
            file: plan.files[t.file].path.clone(),
            tensor: t.name.clone(),
            from: t.stored_dtype.name(),
            to: t.dtype.name(),
        })?;
    } else {
        dst.copy_from_slice(src);
    }
    Ok(())
}
