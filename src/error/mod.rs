//! The one error type of the crate.
//!
//! Every variant names the file it is about, and the tensor when one is known, so that the CLI can
//! print `error: <file>: <what>` and a caller can tell which input was at fault.

mod kind;
mod remote;

use std::io;
use std::path::PathBuf;

pub use kind::ErrorKind;
pub use remote::RemoteFailure;
pub(crate) use remote::RemoteFault;

/// Shorthand for `Result<T, weightstream::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while inspecting or loading a checkpoint.
///
/// ```
/// use weightstream::{format::read_header, Error};
/// let err = read_header("/no/such/file.safetensors").unwrap_err();
/// assert!(matches!(err, Error::Io { .. }));
/// assert!(err.to_string().starts_with("/no/such/file.safetensors: "));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error while opening, sizing or reading a file.
    #[error("{}: {}{}", shown_path(file), shown_message(&source.to_string()), tensor_suffix(tensor))]
    Io {
        /// The file.
        file: PathBuf,
        /// The tensor being read, when the error happened while reading one.
        tensor: Option<String>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file ended before a read that the header promised could be completed: it was
    /// truncated after its header was read, or is shorter than its header says.
    #[error("{}: file ended at byte {at} while reading {}{}", shown_path(file), what, tensor_suffix(tensor))]
    UnexpectedEof {
        /// The file.
        file: PathBuf,
        /// The tensor being read, when known.
        tensor: Option<String>,
        /// What was being read.
        what: &'static str,
        /// The offset at which data ran out.
        at: u64,
    },
    /// The file is shorter than the 8-byte header length prefix.
    #[error("{}: file is {len} bytes, too small to hold the 8-byte header length", shown_path(file))]
    FileTooSmall {
        /// The file.
        file: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The header length exceeds the 100 MB limit of the format.
    #[error("{}: header length {len} exceeds the limit of {limit} bytes", shown_path(file))]
    HeaderTooLarge {
        /// The file.
        file: PathBuf,
        /// The header length the file claims.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The header length runs past the end of the file.
    #[error("{}: header length {len} runs past the end of the file ({file_len} bytes)", shown_path(file))]
    HeaderPastEnd {
        /// The file.
        file: PathBuf,
        /// The header length the file claims.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header is not valid UTF-8.
    #[error("{}: header is not valid UTF-8 (at byte {valid_up_to})", shown_path(file))]
    HeaderNotUtf8 {
        /// The file.
        file: PathBuf,
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The header does not start with `{`.
    #[error("{}: header does not start with '{{'", shown_path(file))]
    HeaderStart {
        /// The file.
        file: PathBuf,
    },
    /// The header is not the JSON the format requires (syntax, types, unknown dtype, a negative
    /// or fractional dimension, a missing field...).
    #[error("{}: invalid header JSON: {}", shown_path(file), shown_message(message))]
    HeaderJson {
        /// The file.
        file: PathBuf,
        /// What serde_json reported.
        message: String,
    },
    /// `__metadata__` is not a map of string to string.
    #[error("{}: __metadata__ must map strings to strings: {}", shown_path(file), shown_message(message))]
    BadMetadata {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor name appears twice in one header.
    #[error("{}: tensor `{}` appears twice in the header", shown_path(file), shown(tensor))]
    DuplicateTensor {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// The product of a tensor's dimensions (or its size in bits) overflows.
    #[error("{}: tensor `{}`: shape {shape:?} overflows", shown_path(file), shown(tensor))]
    ShapeOverflow {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// `data_offsets` has begin > end.
    #[error("{}: tensor `{}`: data_offsets [{begin}, {end}] has begin > end", shown_path(file), shown(tensor))]
    OffsetsReversed {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Begin offset.
        begin: u64,
        /// End offset.
        end: u64,
    },
    /// A sub-byte dtype whose elements do not fill whole bytes.
    #[error(
        "{}: tensor `{}`: {elements} elements of {dtype} do not fill whole bytes",
        shown_path(file),
        shown(tensor)
    )]
    MisalignedSlice {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype name.
        dtype: &'static str,
        /// Element count.
        elements: u64,
    },
    /// `end - begin` differs from what the dtype and shape require.
    #[error(
        "{}: tensor `{}`: data_offsets span {actual} bytes but {dtype} {shape:?} needs {expected}",
        shown_path(file),
        shown(tensor)
    )]
    SizeMismatch {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype name.
        dtype: &'static str,
        /// The shape.
        shape: Vec<u64>,
        /// Bytes required by dtype and shape.
        expected: u64,
        /// Bytes spanned by data_offsets.
        actual: u64,
    },
    /// Sorted by offset, the tensors leave a hole or overlap.
    #[error(
        "{}: tensor `{}`: starts at {begin} but the previous tensor ends at {expected} (hole or overlap)",
        shown_path(file),
        shown(tensor)
    )]
    NotContiguous {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Where it starts.
        begin: u64,
        /// Where it should start.
        expected: u64,
    },
    /// The tensors' data does not end exactly at the end of the file.
    #[error("{}: tensor data ends at byte {data_end} but the file has {file_len} bytes", shown_path(file))]
    DataLengthMismatch {
        /// The file.
        file: PathBuf,
        /// Absolute offset where the last tensor ends.
        data_end: u64,
        /// File length.
        file_len: u64,
    },
    /// The model index (`model.safetensors.index.json`) is malformed or unsafe.
    #[error("{}: {}{}", shown_path(file), shown_message(message), tensor_suffix(tensor))]
    BadIndex {
        /// The index file.
        file: PathBuf,
        /// The tensor concerned, when one is.
        tensor: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A tensor is present in two files of one model.
    #[error("{}: tensor `{}` is also in {}", shown_path(file), shown(tensor), shown_path(other))]
    TensorInTwoFiles {
        /// One file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The other file.
        other: PathBuf,
    },
    /// A path is neither a safetensors file, an index, a directory of them nor a Hugging Face
    /// cache folder.
    #[error("{}: {}", shown_path(file), shown_message(message))]
    BadSource {
        /// The path.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A request to an object store or HTTP server failed, after its retries: the object is
    /// missing, access was denied, the server failed or stalled, or the object changed since its
    /// header was read.
    #[error("{}: {failure}: {}{}", shown_path(file), shown_message(message), tensor_suffix(tensor))]
    Remote {
        /// The object's URL.
        file: PathBuf,
        /// The tensor being read, when the request was for tensor data.
        tensor: Option<String>,
        /// What kind of failure.
        failure: RemoteFailure,
        /// The store's own words.
        message: String,
    },
    /// An option or argument that cannot be honoured (a bad glob, size or device string, or a
    /// combination of options that this load cannot do as asked): a usage error, never a silent
    /// downgrade.
    #[error("{}", shown_message(what))]
    Usage {
        /// What is wrong.
        what: String,
    },
    /// A caller's [`crate::TensorSink`] refused a piece: its own error, with the file and the
    /// tensor it was taking.
    #[error("{}: the sink failed on tensor `{}`: {source}", shown_path(file), crate::text::for_display(tensor))]
    Sink {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The sink's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A broken internal invariant (a bug in weightstream, not in the input): reported instead of
    /// a panic, with everything allocated released.
    #[error("internal error: {}", shown_message(what))]
    Internal {
        /// What went wrong.
        what: String,
    },
    /// No CUDA driver library could be loaded.
    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoCudaDriver,
    /// The driver is present but there is no device with the requested ordinal.
    #[error("no CUDA device {ordinal} (this machine has {count})")]
    NoCudaDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// This build has no CUDA support (feature `cuda` off).
    #[error("this build of weightstream has no CUDA support (feature `cuda`)")]
    CudaNotBuilt,
    /// A CUDA driver call failed.
    #[error("CUDA error in {call}: {}{}", shown_message(message), file_suffix(file))]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// The driver's `CUresult` code (0 never appears here; 2 is out of memory), or 0 for
        /// errors that come from NVRTC rather than the driver.
        code: u32,
        /// The driver's message.
        message: String,
        /// The file being loaded when it happened, if any.
        file: Option<PathBuf>,
    },
    /// The device has not enough free memory for the arena.
    #[error("CUDA device {ordinal} out of memory: need {requested} bytes, {free} free")]
    DeviceOutOfMemory {
        /// Device ordinal.
        ordinal: usize,
        /// Bytes requested.
        requested: u64,
        /// Bytes free when asked.
        free: u64,
    },
    /// Host memory for the arena or the staging ring could not be allocated.
    #[error("could not allocate {bytes} bytes of host memory: {source}")]
    HostOutOfMemory {
        /// Bytes requested.
        bytes: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A conversion that this build cannot do.
    #[error("{}: tensor `{}`: cannot convert {from} to {to}", shown_path(file), shown(tensor))]
    UnsupportedConversion {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Source dtype.
        from: &'static str,
        /// Target dtype.
        to: &'static str,
    },
    /// The read engine itself failed (its workers stopped, io_uring reported an error on its
    /// queue): no single file is at fault. Errors of one read name its file and tensor instead.
    #[error("the read engine failed: {source}")]
    ReadEngine {
        /// The engine's error.
        source: io::Error,
    },
    /// The load was cancelled through its [`crate::CancelToken`].
    #[error("load cancelled")]
    Cancelled,
    /// A buffer conversion (`crate::convert`) was asked for an unsupported dtype pair, or given
    /// buffers whose lengths do not fit the dtypes. No file is known at that level: the loader
    /// reports [`Error::UnsupportedConversion`] with the file and tensor instead.
    #[error("cannot convert {from} to {to}: {message}")]
    Conversion {
        /// Source dtype.
        from: &'static str,
        /// Target dtype.
        to: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The header declares more tensors than [`crate::format::MAX_TENSORS`]. Checked as the
    /// header is parsed, before the tensor past the limit is built.
    #[error("{}: header declares more than {limit} tensors", shown_path(file))]
    TooManyTensors {
        /// The file.
        file: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A tensor's shape has more dimensions than [`crate::format::MAX_RANK`]. Checked before
    /// the shape is stored: the dimensions past the limit are skipped unread.
    #[error("{}: tensor `{}`: shape has more than {limit} dimensions", shown_path(file), shown(tensor))]
    RankTooLarge {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The limit.
        limit: usize,
    },
    /// A tensor-parallel split that this tensor cannot take: its dimension does not divide by the
    /// world size, or it has no such dimension.
    #[error("{}: tensor `{}`: {}", shown_path(file), shown(tensor), shown_message(message))]
    BadShard {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Why.
        message: String,
    },
    /// A destination of [`crate::Loader::load_into`] that the load cannot fill: the checkpoint
    /// lacks the tensor, the size differs from the tensor's loaded size, it overlaps another
    /// destination, or it is on another device than the loader's.
    #[error("{}: tensor `{}`: {}", shown_path(file), shown(tensor), shown_message(message))]
    BadDestination {
        /// The checkpoint (its first file).
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Why.
        message: String,
    },
    /// A tensor larger than the window of [`crate::Loader::stream`]: it could never be in flight.
    #[error(
        "{}: tensor `{}` loads as {bytes} bytes, more than the stream's window of {window}",
        shown_path(file),
        shown(tensor)
    )]
    WindowTooSmall {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its loaded size.
        bytes: u64,
        /// The window.
        window: u64,
    },
    /// `__metadata__` has more keys than [`crate::format::MAX_METADATA_KEYS`].
    #[error("{}: __metadata__ has more than {limit} keys", shown_path(file))]
    TooManyMetadataKeys {
        /// The file.
        file: PathBuf,
        /// The limit.
        limit: usize,
    },
}

/// A tensor name as an error shows it: control characters escaped, cut to a readable length.
fn shown(tensor: &str) -> std::borrow::Cow<'_, str> {
    crate::text::for_display(tensor)
}

/// A path as an error shows it (see [`shown`]).
fn shown_path(path: &std::path::Path) -> String {
    crate::text::path_for_display(path)
}

/// A message that may quote the file (a parser's message, an OS error) as an error shows it.
fn shown_message(message: &str) -> std::borrow::Cow<'_, str> {
    crate::text::for_display_within(message, crate::text::MAX_SHOWN_MESSAGE_BYTES)
}

fn tensor_suffix(t: &Option<String>) -> String {
    match t {
        Some(t) => format!(" (tensor `{}`)", shown(t)),
        None => String::new(),
    }
}

fn file_suffix(f: &Option<PathBuf>) -> String {
    match f {
        Some(f) => format!(" (while loading {})", shown_path(f)),
        None => String::new(),
    }
}

impl Error {
    /// The file this error is about, when there is one.
    pub fn file(&self) -> Option<&std::path::Path> {
        use Error::*;
        match self {
            Io { file, .. }
            | UnexpectedEof { file, .. }
            | FileTooSmall { file, .. }
            | HeaderTooLarge { file, .. }
            | HeaderPastEnd { file, .. }
            | HeaderNotUtf8 { file, .. }
            | HeaderStart { file }
            | HeaderJson { file, .. }
            | BadMetadata { file, .. }
            | DuplicateTensor { file, .. }
            | ShapeOverflow { file, .. }
            | OffsetsReversed { file, .. }
            | MisalignedSlice { file, .. }
            | SizeMismatch { file, .. }
            | NotContiguous { file, .. }
            | DataLengthMismatch { file, .. }
            | BadIndex { file, .. }
            | TensorInTwoFiles { file, .. }
            | BadSource { file, .. }
            | Remote { file, .. }
            | UnsupportedConversion { file, .. }
            | BadShard { file, .. }
            | BadDestination { file, .. }
            | WindowTooSmall { file, .. }
            | TooManyTensors { file, .. }
            | RankTooLarge { file, .. }
            | TooManyMetadataKeys { file, .. } => Some(file),
            Cuda { file, .. } => file.as_deref(),
            _ => None,
        }
    }

    pub(crate) fn io(file: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { file: file.into(), tensor: None, source }
    }

    pub(crate) fn usage(what: impl Into<String>) -> Self {
        Error::Usage { what: what.into() }
    }

    pub(crate) fn internal(what: impl Into<String>) -> Self {
        Error::Internal { what: what.into() }
    }
}
