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

pub mod bench;
mod bench_baselines;
mod cancel;
#[cfg(feature = "candle")]
pub mod candle;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod format;
pub mod io;
mod loader;
mod memory;
mod model;
mod pipeline;
#[cfg(test)]
mod pipeline_tests;
pub mod plan;
mod pool;
pub mod progress;
mod regular_file;
pub mod sink;
pub mod source;
pub mod stage;
mod stream;
pub mod text;
pub mod trace;

pub use cancel::CancelToken;
pub use error::{Error, ErrorKind, RemoteFailure, Result, UsageError};
pub use format::Dtype;
pub use loader::{
    Destination, DevicePlace, Loader, SinkError, TensorInfo, TensorPiece, TensorSink, MAX_STAGING_COUNT,
    MIN_STAGING_SIZE,
};
pub use model::{peak_host_rss_bytes, LoadStats, LoadedModel, TensorRef};
pub use sink::Device;
pub use source::Checkpoint;
pub use stream::{StreamedTensor, TensorStream};
