//! The safetensors format: dtypes, strict header parsing, index files, and a writer.

mod dtype;
mod header;
mod header_file;
pub(crate) mod index;
mod writer;

pub use dtype::{Dtype, UnknownDtype};
pub use header::{parse_header, Header, TensorInfo, MAX_HEADER_LEN, MAX_METADATA_KEYS, MAX_RANK, MAX_TENSORS};
#[cfg(feature = "remote")]
pub(crate) use header_file::header_len_of;
pub(crate) use header_file::read_header_keeping;
pub use header_file::{read_header, read_header_from};
pub use index::{ShardIndex, MAX_INDEX_LEN, MAX_INDEX_TENSORS};
pub use writer::{
    header_json, sort_like_reference, write_file, write_file_with, write_to_vec, write_to_vec_with, WriteTensor,
};
