//! Where loaded bytes end up: the [`Sink`] seam, and its host, null and CUDA sinks.
//!
//! A stage hands the sink bytes it made host-addressable (or tells it they landed in place);
//! the sink copies, converts or drops them, and returns a [`Fence`] that fires once it no longer
//! reads them. The stage waits on that fence before it reuses the memory, so event-gated reuse
//! lives in one type. A caller-provided destination is just another sink.

#[cfg(feature = "cuda")]
pub mod cuda;
mod host;

use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;
use std::str::FromStr;

pub(crate) use host::write_piece;
pub use host::{HostMemory, HostSink};

use crate::error::{Error, Result};
use crate::plan::{Plan, Schedule};

/// A load target.
///
/// ```
/// use weightstream::Device;
/// assert_eq!("cuda:1".parse::<Device>()?, Device::Cuda(1));
/// assert_eq!("cuda".parse::<Device>()?, Device::Cuda(0));
/// assert_eq!(Device::Cpu.to_string(), "cpu");
/// assert!("tpu".parse::<Device>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// A GPU when the CUDA target finds one, else host memory.
    #[default]
    Auto,
    /// Host memory.
    Cpu,
    /// Read through the staging ring and drop the bytes (measures the read pipeline).
    Null,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "null" => Ok(Device::Null),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(Error::usage(format!("unknown device `{s}` (auto, cpu, null, cuda, cuda:N)"))),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Null => f.write_str("null"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether a CUDA device with ordinal 0 is usable here (driver present, at least one device).
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::device_count().map(|n| n > 0).unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
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

/// One delivery: extents `extents` of `schedule`, staged as `bytes`.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// The plan (tensors, their destinations).
    pub plan: &'a Plan,
    /// The schedule the extents belong to.
    pub schedule: &'a Schedule,
    /// The extents delivered, consecutive, of one file.
    pub extents: Range<usize>,
    /// The staging slot (or window) that holds them: a sink may spread its work by it (streams).
    pub slot: usize,
    /// The bytes.
    pub bytes: Staged<'a>,
}

impl Delivery<'_> {
    /// Every piece of the delivery with the address of its stored bytes (`None` when in place),
    /// in file order; an item is [`Error::Internal`] when its piece lies outside the staged bytes
    /// (a stage bug).
    pub fn pieces(&self) -> impl Iterator<Item = Result<(crate::plan::Piece, Option<*const u8>)>> + '_ {
        self.schedule.extents[self.extents.clone()].iter().flat_map(move |e| {
            self.schedule.pieces_of(e).iter().map(move |p| {
                let at = e.offset + p.extent_offset;
                let src = match self.bytes {
                    Staged::InPlace => None,
                    staged => match staged.locate(at) {
                        Some((ptr, avail)) if avail as u64 >= p.len => Some(ptr),
                        _ => {
                            return Err(Error::internal(format!(
                                "piece at file offset {at} is outside the staged bytes"
                            )))
                        }
                    },
                };
                Ok((*p, src))
            })
        })
    }
}

impl<'a> Delivery<'a> {
    /// Every piece of a delivery of [`Staged::Host`] bytes with its stored bytes, in file order;
    /// an item is [`Error::Internal`] for other deliveries, or a piece outside the staged bytes.
    pub fn host_pieces(&self) -> impl Iterator<Item = Result<(crate::plan::Piece, &'a [u8])>> + '_ {
        let staged = match self.bytes {
            Staged::Host { bytes, file_offset } => Ok((bytes, file_offset)),
            _ => Err(()),
        };
        self.schedule.extents[self.extents.clone()].iter().flat_map(move |e| {
            self.schedule.pieces_of(e).iter().map(move |p| {
                let at = e.offset + p.extent_offset;
                let (bytes, base) = staged.map_err(|()| Error::internal("host pieces of bytes not in host memory"))?;
                let start = at.checked_sub(base).and_then(|s| usize::try_from(s).ok());
                let src = start.and_then(|s| bytes.get(s..s.checked_add(usize::try_from(p.len).ok()?)?));
                let src = src
                    .ok_or_else(|| Error::internal(format!("piece at file offset {at} is outside the staged bytes")))?;
                Ok((*p, src))
            })
        })
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

/// Where a load's bytes go.
///
/// The pipeline calls [`Sink::deliver`] once per landed unit, then [`Sink::finish`] once, on
/// success and on error alike. The bytes of a delivery stay valid, unchanged, until the
/// returned [`Fence`] has fired; a sink that reads them asynchronously (a DMA copy) returns a
/// fence that fires when it is done.
///
/// ```
/// use weightstream::sink::{Delivery, Fence, Sink, Staged};
/// /// Counts the bytes it is given.
/// struct Count(u64);
/// impl Sink for Count {
///     fn deliver(&mut self, d: &Delivery<'_>) -> weightstream::Result<Fence> {
///         if let Staged::Host { bytes, .. } = d.bytes { self.0 += bytes.len() as u64; }
///         Ok(Fence::done())
///     }
///     fn finish(&mut self) -> weightstream::Result<()> { Ok(()) }
/// }
/// # let _ = Count(0);
/// ```
pub trait Sink {
    /// Host memory the readers may write the loaded bytes into directly, if the sink has it.
    /// A sink that returns one gets [`Staged::InPlace`] deliveries from an in-place stage.
    fn host_region(&mut self) -> Option<HostRegion> {
        None
    }

    /// Whether [`Staged::DeviceReadable`] bytes can be delivered (a device that copies by DMA).
    fn reads_by_dma(&self) -> bool {
        false
    }

    /// Take a landed unit.
    fn deliver(&mut self, delivery: &Delivery<'_>) -> Result<Fence>;

    /// Block until every delivery has landed.
    fn finish(&mut self) -> Result<()>;

    /// Bytes of device memory this sink holds as conversion scratch besides its destinations
    /// (reported as [`crate::LoadStats::device_scratch_bytes`]); 0 for host sinks.
    fn scratch_bytes(&self) -> u64 {
        0
    }

    /// Add this sink's own timed spans (a device's copies) to `trace`, after a successful run.
    fn write_trace(&mut self, trace: &mut crate::trace::TraceRecorder) -> Result<()> {
        let _ = trace;
        Ok(())
    }
}

/// Drops every byte: measures the read pipeline alone.
#[derive(Debug, Default)]
pub struct NullSink;

impl Sink for NullSink {
    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        if let Staged::Host { bytes, .. } = d.bytes {
            std::hint::black_box(bytes);
        }
        Ok(Fence::done())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
