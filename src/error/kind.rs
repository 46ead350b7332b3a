//! The kind of an [`Error`]: what failed, for callers that branch on it.

use super::{Error, RemoteFailure};

/// The kind of an [`Error`]: what failed, independent of the variant's details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file breaks the safetensors format (header, offsets, sizes).
    Format,
    /// The checkpoint as a whole is wrong: its index, its directory, a tensor in two files.
    Source,
    /// Reading failed: the OS, a short file, the read engine, host memory.
    Io,
    /// The CUDA driver or device: missing, out of memory, a failed call.
    Device,
    /// The caller asked for something this load cannot do as asked.
    Usage,
    /// A bug in weightstream.
    Internal,
    /// The load was cancelled.
    Cancelled,
}

impl Error {
    /// What kind of failure this is, for callers that branch on it (retry on [`ErrorKind::Io`],
    /// report [`ErrorKind::Format`] as a bad file, exit 2 on [`ErrorKind::Usage`]).
    ///
    /// ```
    /// use weightstream::{Device, ErrorKind, Loader};
    /// let err = Loader::new().device(Device::Cpu).load("/no/such/model.safetensors").unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Io);
    /// assert_eq!("tpu".parse::<Device>().unwrap_err().kind(), ErrorKind::Usage);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            // A caller's sink that failed (an upload, a write) failed at moving bytes: as reading.
            Io { .. } | UnexpectedEof { .. } | ReadEngine { .. } | HostOutOfMemory { .. } | Sink { .. } => {
                ErrorKind::Io
            }
            // Missing, refused or replaced: the source is wrong. A server that failed or stalled
            // after its retries: reading failed, and may succeed later.
            Remote { failure, .. } => match failure {
                RemoteFailure::NotFound | RemoteFailure::Denied | RemoteFailure::Changed => ErrorKind::Source,
                _ => ErrorKind::Io,
            },
            FileTooSmall { .. }
            | HeaderTooLarge { .. }
            | HeaderPastEnd { .. }
            | HeaderNotUtf8 { .. }
            | HeaderStart { .. }
            | HeaderJson { .. }
            | BadMetadata { .. }
            | DuplicateTensor { .. }
            | ShapeOverflow { .. }
            | OffsetsReversed { .. }
            | MisalignedSlice { .. }
            | SizeMismatch { .. }
            | NotContiguous { .. }
            | DataLengthMismatch { .. }
            | TooManyTensors { .. }
            | RankTooLarge { .. }
            | TooManyMetadataKeys { .. } => ErrorKind::Format,
            BadIndex { .. } | TensorInTwoFiles { .. } | BadSource { .. } => ErrorKind::Source,
            NoCudaDriver | NoCudaDevice { .. } | CudaNotBuilt | Cuda { .. } | DeviceOutOfMemory { .. } => {
                ErrorKind::Device
            }
            Usage { .. }
            | UnsupportedConversion { .. }
            | Conversion { .. }
            | BadShard { .. }
            | BadDestination { .. }
            | WindowTooSmall { .. } => ErrorKind::Usage,
            Internal { .. } => ErrorKind::Internal,
            Cancelled => ErrorKind::Cancelled,
        }
    }
}
