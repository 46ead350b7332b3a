//! Parse and validate one safetensors header.
//!
//! The parser works on the header bytes and the file length alone (the reference crate's
//! `read_metadata` wants the whole file in one buffer), so a file is validated before any of its
//! tensor data is touched. It applies every rule of the reference crate, plus: tensor names are
//! unique. All arithmetic on header values is checked.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::Dtype;
use crate::error::{Error, Result};

/// The largest header the format allows (the reference crate's `MAX_HEADER_SIZE`).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// `[begin, end)` relative to the start of the data section (byte `8 + header_len`).
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements (product of the shape; validated not to overflow).
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Size of its data in bytes.
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated header.
///
/// ```
/// use weightstream::format::{parse_header, write_to_vec, WriteTensor};
/// use weightstream::Dtype;
/// let bytes = write_to_vec(&[WriteTensor::new("w", Dtype::F32, vec![2], &[0u8; 8])], &Default::default())?;
/// let header_len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
/// let h = parse_header("mem", &bytes[8..8 + header_len], bytes.len() as u64)?;
/// assert_eq!(h.tensors[0].name, "w");
/// assert_eq!(h.data_start, 8 + header_len as u64);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors in file order (sorted by data offset).
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset of the data section: `8 + header length`.
    pub data_start: u64,
    /// Length of the header JSON in bytes.
    pub header_len: u64,
    /// Length of the file.
    pub file_len: u64,
}

impl Header {
    /// Total bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.file_len - self.data_start
    }
}

/// Read and validate the header of the file at `path`.
///
/// Allocates at most the header length, and only after that length was checked against
/// [`MAX_HEADER_LEN`] and against the file size. Does not use mmap.
pub fn read_header(path: impl AsRef<Path>) -> Result<Header> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_header_from(path, &mut file, file_len)
}

/// Like [`read_header`] on an open file whose length is known.
pub fn read_header_from(path: &Path, file: &mut File, file_len: u64) -> Result<Header> {
    let header_len = check_prefix(path, file, file_len)?;
    // Checked above: header_len <= MAX_HEADER_LEN and <= file_len - 8.
    let mut buf = vec![0u8; header_len as usize];
    read_exact_at(file, &mut buf, 8).map_err(|e| eof_or_io(path, e, "the header", 8))?;
    parse_header(path, &buf, file_len)
}

fn check_prefix(path: &Path, file: &mut File, file_len: u64) -> Result<u64> {
    if file_len < 8 {
        return Err(Error::FileTooSmall { file: path.into(), len: file_len });
    }
    let mut prefix = [0u8; 8];
    read_exact_at(file, &mut prefix, 0).map_err(|e| eof_or_io(path, e, "the header length", 0))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::HeaderTooLarge { file: path.into(), len: header_len, limit: MAX_HEADER_LEN });
    }
    if header_len > file_len - 8 {
        return Err(Error::HeaderPastEnd { file: path.into(), len: header_len, file_len });
    }
    Ok(header_len)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

fn eof_or_io(path: &Path, e: std::io::Error, what: &'static str, at: u64) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::UnexpectedEof { file: path.into(), tensor: None, what, at }
    } else {
        Error::io(path, e)
    }
}

/// Parse and validate header bytes (the JSON after the 8-byte length) of a file of `file_len`
/// bytes. `path` is used in errors only.
pub fn parse_header(path: impl Into<PathBuf>, header: &[u8], file_len: u64) -> Result<Header> {
    let path: PathBuf = path.into();
    let header_len = header.len() as u64;
    let data_start = 8u64.checked_add(header_len).filter(|&s| s <= file_len).ok_or_else(|| Error::HeaderPastEnd {
        file: path.clone(),
        len: header_len,
        file_len,
    })?;
    if let Err(e) = std::str::from_utf8(header) {
        return Err(Error::HeaderNotUtf8 { file: path, valid_up_to: e.valid_up_to() });
    }
    if header.first() != Some(&b'{') {
        return Err(Error::HeaderStart { file: path });
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    let raw = match de.deserialize_map(HeaderVisitor) {
        Ok(r) => r,
        Err(e) => {
            return Err(match e.classify() {
                serde_json::error::Category::Data if e.to_string().starts_with(METADATA_ERR) => {
                    Error::BadMetadata { file: path, message: e.to_string() }
                }
                _ => Error::HeaderJson { file: path, message: e.to_string() },
            })
        }
    };
    de.end().map_err(|e| Error::HeaderJson { file: path.clone(), message: e.to_string() })?;
    let RawHeader { mut tensors, metadata } = raw;

    // Unique names.
    {
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::DuplicateTensor { file: path, tensor: w[0].to_string() });
        }
    }

    // File order; then each tensor must start where the previous ended.
    tensors.sort_by_key(|t| t.data_offsets);
    let mut expected = 0u64;
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if end < begin {
            return Err(Error::OffsetsReversed { file: path, tensor: t.name.clone(), begin, end });
        }
        if begin != expected {
            return Err(Error::NotContiguous { file: path, tensor: t.name.clone(), begin, expected });
        }
        let elements = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let bits = elements.and_then(|n| n.checked_mul(t.dtype.bits()));
        let (Some(elements), Some(bits)) = (elements, bits) else {
            return Err(Error::ShapeOverflow { file: path, tensor: t.name.clone(), shape: t.shape.clone() });
        };
        if bits % 8 != 0 {
            return Err(Error::MisalignedSlice { file: path, tensor: t.name.clone(), dtype: t.dtype.name(), elements });
        }
        if end - begin != bits / 8 {
            return Err(Error::SizeMismatch {
                file: path,
                tensor: t.name.clone(),
                dtype: t.dtype.name(),
                shape: t.shape.clone(),
                expected: bits / 8,
                actual: end - begin,
            });
        }
        expected = end;
    }
    let data_end = data_start.checked_add(expected);
    if data_end != Some(file_len) {
        return Err(Error::DataLengthMismatch { file: path, data_end: data_end.unwrap_or(u64::MAX), file_len });
    }
    Ok(Header { tensors, metadata: metadata.unwrap_or_default(), data_start, header_len, file_len })
}

const METADATA_ERR: &str = "__metadata__: ";

struct RawHeader {
    tensors: Vec<TensorInfo>,
    metadata: Option<BTreeMap<String, String>>,
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut metadata = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return Err(de::Error::custom(format!("{METADATA_ERR}appears twice")));
                }
                metadata = map
                    .next_value::<Option<BTreeMap<String, String>>>()
                    .map_err(|e| de::Error::custom(format!("{METADATA_ERR}{e}")))?
                    .or(Some(BTreeMap::new()));
            } else {
                let raw: RawTensor =
                    map.next_value_seed(TensorSeed).map_err(|e| de::Error::custom(format!("tensor `{key}`: {e}")))?;
                tensors.push(TensorInfo {
                    name: key.into_owned(),
                    dtype: raw.dtype,
                    shape: raw.shape,
                    data_offsets: raw.data_offsets,
                });
            }
        }
        Ok(RawHeader { tensors, metadata })
    }
}

struct TensorSeed;

impl<'de> DeserializeSeed<'de> for TensorSeed {
    type Value = RawTensor;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawTensor, D::Error> {
        RawTensor::deserialize(d)
    }
}

#[derive(Deserialize)]
struct RawTensor {
    #[serde(deserialize_with = "de_dtype")]
    dtype: Dtype,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn de_dtype<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
    let s = <Cow<'de, str>>::deserialize(d)?;
    s.parse().map_err(de::Error::custom)
}
