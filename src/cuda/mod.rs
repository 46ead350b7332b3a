//! The CUDA layer: the driver API, its RAII types, and the conversion kernels. A leaf: it knows
//! nothing of stages or sinks (the CUDA sink in `crate::sink::cuda` and the stages drive it).
//!
//! Layers as in cudarc: [`driver`] (thin `Result` wrappers, the only code touching cudarc's
//! driver bindings), [`memory`] (RAII types: the device, pinned buffers, the device arena,
//! streams and events), [`kernels`] (the conversion kernels).

pub mod driver;
pub mod kernels;
pub mod memory;

pub use memory::{CudaDevice, DeviceArena, Event, PinnedBuf, Stream};

use crate::error::Result;

/// Number of CUDA devices; [`crate::Error::NoCudaDriver`] when libcuda cannot be loaded.
///
/// ```
/// match weightstream::cuda::device_count() {
///     Ok(n) => println!("{n} CUDA devices"),
///     Err(e) => println!("{e}"),
/// }
/// ```
pub fn device_count() -> Result<usize> {
    driver::init_and_count()
}
