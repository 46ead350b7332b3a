//! Where loaded bytes end up: a CUDA device, host memory, or nowhere (to measure reads).

#[cfg(feature = "cuda")]
pub mod cuda;
mod host;

use std::fmt;
use std::str::FromStr;

pub use host::HostMemory;

use crate::error::{Error, Result};
use crate::plan::{Plan, ReadExtent};

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
                _ => Err(Error::option(format!("unknown device `{s}` (auto, cpu, null, cuda, cuda:N)"))),
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

/// The consumer of filled staging buffers.
///
/// The pipeline hands it a slot's bytes with [`Sink::deliver`]; the sink may keep reading them
/// asynchronously (a DMA copy). Before the slot is refilled the pipeline calls
/// [`Sink::release`], which must not return until the sink no longer reads the slot.
pub(crate) trait Sink {
    /// Deliver `data` (exactly the bytes of `extent`), which lives in staging slot `slot`.
    fn deliver(&mut self, slot: usize, data: &[u8], extent: &ReadExtent, plan: &Plan) -> Result<()>;
    /// Block until slot `slot` is no longer read by an earlier delivery.
    fn release(&mut self, slot: usize) -> Result<()>;
    /// Block until every delivery has landed.
    fn finish(&mut self) -> Result<()>;
}

/// Drops every byte: measures the read pipeline alone.
pub(crate) struct NullSink;

impl Sink for NullSink {
    fn deliver(&mut self, _: usize, data: &[u8], _: &ReadExtent, _: &Plan) -> Result<()> {
        std::hint::black_box(data);
        Ok(())
    }
    fn release(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Copies (or converts) staged pieces into a host arena.
pub(crate) struct HostSink<'a> {
    pub arena: &'a mut HostMemory,
}

impl Sink for HostSink<'_> {
    fn deliver(&mut self, _: usize, data: &[u8], extent: &ReadExtent, plan: &Plan) -> Result<()> {
        for p in &plan.pieces[extent.pieces.clone()] {
            let t = &plan.tensors[p.tensor];
            let src = &data[p.extent_offset as usize..(p.extent_offset + p.len) as usize];
            if t.converts() {
                let ratio_num = t.out_dtype.bits();
                let ratio_den = t.dtype.bits();
                let dst_off = (t.arena_offset + p.tensor_offset * ratio_num / ratio_den) as usize;
                let dst_len = (p.len * ratio_num / ratio_den) as usize;
                let dst = &mut self.arena.as_mut_slice()[dst_off..dst_off + dst_len];
                let path = &plan.files[t.file].path;
                crate::convert::convert_host(t.dtype, t.out_dtype, src, dst).map_err(|_| {
                    Error::UnsupportedConversion {
                        file: path.clone(),
                        tensor: t.name.clone(),
                        from: t.dtype.name(),
                        to: t.out_dtype.name(),
                    }
                })?;
            } else {
                let dst_off = (t.arena_offset + p.tensor_offset) as usize;
                self.arena.as_mut_slice()[dst_off..dst_off + src.len()].copy_from_slice(src);
            }
        }
        Ok(())
    }
    fn release(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
