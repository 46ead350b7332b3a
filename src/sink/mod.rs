//! Where loaded bytes end up: the [`Sink`] seam, and its host, null and CUDA sinks.
//!
//! A stage hands the sink bytes it made host-addressable (or tells it they landed in place);
//! the sink copies, converts or drops them, and returns a [`Fence`] that fires once it no longer
//! reads them. The stage waits on that fence before it reuses the memory, so event-gated reuse
//! lives in one type. A caller-provided destination is just another sink.
//!
//! The memory types a sink shares with the stages (`Fence`, `Staged`, `HostMemory`,
//! `HostRegion`) live in `crate::memory` and are re-exported here; the CUDA layer the CUDA sink
//! drives is `crate::cuda`.

#[cfg(feature = "cuda")]
pub mod cuda;
mod host;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

pub(crate) use host::write_piece;
pub use host::HostSink;

use crate::error::{Error, Result};
pub use crate::memory::{Fence, HostMemory, HostRegion, Staged};
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
                _ => Err(Error::bad_option("device", s, "auto, cpu, null, cuda or cuda:N")),
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

/// How many CUDA devices the driver sees: [`Error::NoCudaDriver`] without a driver,
/// [`Error::CudaNotBuilt`] when the `cuda` feature is off.
///
/// ```
/// // Without a GPU (or its driver) this is an error that says which is missing.
/// match weightstream::cuda_device_count() {
///     Ok(n) => println!("{n} CUDA devices"),
///     Err(e) => println!("no CUDA: {e}"),
/// }
/// ```
pub fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    return crate::cuda::device_count();
    #[cfg(not(feature = "cuda"))]
    Err(Error::CudaNotBuilt)
}

/// Whether a CUDA device with ordinal 0 is usable here (driver present, at least one device).
///
/// ```
/// assert_eq!(weightstream::cuda_available(), weightstream::cuda_device_count().is_ok_and(|n| n > 0));
/// ```
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::device_count().map(|n| n > 0).unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
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

    /// Whether deliveries must come in file order (a caller's sink that consumes a stream of
    /// bytes): the ring then hands slots out in extent order, holding an early one in its slot.
    fn needs_file_order(&self) -> bool {
        false
    }

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
