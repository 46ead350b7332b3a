//! # weightstream
//!
//! Stream the tensors of `.safetensors` checkpoints straight into GPU memory (or host memory),
//! through a small ring of pinned staging buffers, with every header strictly validated.
//!
//! ```
//! use weightstream::{format::{write_file, WriteTensor}, Dtype, Device, Loader};
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("model.safetensors");
//! let w: Vec<u8> = (0..64).collect();
//! write_file(&path, &[WriteTensor::new("layer.0.weight", Dtype::BF16, vec![4, 8], &w)], &Default::default())?;
//!
//! let model = Loader::new().device(Device::Cpu).load(&path)?;
//! let t = model.tensor("layer.0.weight").ok_or("missing tensor")?;
//! assert_eq!(t.shape(), &[4, 8]);
//! assert_eq!(t.to_host_vec()?, w);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

// The crate's internals (stages, plans, read engines, sinks, memory, conversion, the CUDA
// layer): public with the `unstable` feature, for the crate's own tests and benches and for
// experiments, with no stability promise; crate-private without it, where the items only tests
// and benches use are unused (allowed there, as they were as `pub`). Written out, not by a
// macro, so that scripts/check_module_cycles.py sees every module.
#[cfg(feature = "unstable")]
pub mod convert;
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod convert;
#[cfg(feature = "cuda")]
#[cfg(feature = "unstable")]
pub mod cuda;
#[cfg(feature = "cuda")]
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod cuda;
#[cfg(feature = "unstable")]
pub mod io;
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod io;
#[cfg(feature = "unstable")]
pub mod memory;
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod memory;
#[cfg(feature = "unstable")]
pub mod plan;
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod plan;
#[cfg(feature = "unstable")]
pub mod sink;
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod sink;
#[cfg(feature = "unstable")]
pub mod stage;
#[cfg(not(feature = "unstable"))]
#[allow(dead_code, unused_imports)]
mod stage;

pub mod bench;
mod bench_baselines;
mod cancel;
#[cfg(feature = "candle")]
pub mod candle;
mod error;
pub mod format;
mod loader;
mod model;
mod pipeline;
#[cfg(test)]
mod pipeline_tests;
mod pool;
pub mod progress;
mod regular_file;
pub mod source;
mod stream;
pub mod text;
pub mod trace;

pub use cancel::CancelToken;
pub use error::{Error, ErrorKind, RemoteFailure, Result, UsageError};
pub use format::Dtype;
#[cfg(feature = "unstable")]
pub use io::Fault;
pub use io::IoKind;
pub use loader::{
    Destination, DevicePlace, GroupLoad, Loader, PartPlace, RankRead, SinkError, TensorInfo, TensorPiece, TensorSink,
    MAX_STAGING_COUNT, MIN_STAGING_SIZE,
};
pub use model::{peak_host_rss_bytes, LoadStats, LoadedModel, TensorRef};
pub use plan::{Chunk, GroupPlan, PartRead, ShareKey, ShareWindow};
pub use sink::{cuda_available, cuda_device_count, Device};
pub use source::{Checkpoint, SharedFile};
pub use stream::{StreamedTensor, TensorStream};
