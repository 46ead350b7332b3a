//! The host sink: copies (or converts) into a host arena or caller buffers, or lends them to the
//! readers to read into in place.

use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::memory::{Fence, HostMemory, HostRegion, Staged};

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
    /// size (checked at each delivery); its [`HostRegion`] lends the buffers to readers
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
    fn host_region(&mut self) -> Option<HostRegion> {
        match &mut self.places {
            // SAFETY: the arena is mapped for len bytes and borrowed mutably by this sink for its
            // whole life; the sink never touches it while readers may write (InPlace deliveries
            // are not copied).
            HostPlaces::Arena(a) => Some(unsafe { HostRegion::new(a.non_null(), a.len()) }),
            HostPlaces::Caller(buffers) => {
                let places = buffers.iter_mut().map(|b| (NonNull::from(&mut **b).cast::<u8>(), b.len())).collect();
                // SAFETY: each buffer is borrowed mutably by this sink for its whole life, and
                // is exactly its tensor's loaded size; the sink never touches them while readers
                // may write (InPlace deliveries are not copied).
                Some(unsafe { HostRegion::per_tensor(places) })
            }
        }
    }

    fn deliver(&mut self, d: &super::Delivery<'_>) -> Result<Fence> {
        if matches!(d.bytes, Staged::InPlace) {
            return Ok(Fence::done());
        }
        if matches!(d.bytes, Staged::DeviceReadable { .. }) {
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
        Ok(Fence::done())
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
