//! Parse and validate one safetensors header.
//!
//! The parser works on the header bytes and the file length alone (the reference crate's
//! `read_metadata` wants the whole file in one buffer), so a file is validated before any of its
//! tensor data is touched. It applies every rule of the reference crate, plus: tensor names are
//! unique. All arithmetic on header values is checked.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::Dtype;
use crate::error::{Error, Result};

/// The largest header the format allows (the reference crate's `MAX_HEADER_SIZE`).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The most tensors one file's header may declare ([`Error::TooManyTensors`]).
///
/// The largest real checkpoints have tens of thousands of tensors in all, a few thousand per
/// file; this is far above them and above the 400,000 of `benches/header_parse.rs`, while it
/// caps what a header of tiny entries makes the parser and loader build (each tensor costs a
/// few hundred bytes of bookkeeping, a header entry can be 50 bytes).
pub const MAX_TENSORS: usize = 1_000_000;

/// The most dimensions one tensor's shape may have ([`Error::RankTooLarge`]).
///
/// Real weights have at most 5 or 6 dimensions (a 3-D convolution's); 16 leaves room for any
/// layout trick. Each dimension costs 8 bytes of `u64` for 2 bytes of `1,` in the JSON: with a
/// million tensors of 32 dimensions a 100 MB header took 382 MiB to inspect, more than 3x its
/// size plus 64 MiB; at 16 the same bomb fits.
pub const MAX_RANK: usize = 16;

/// The most keys `__metadata__` may have ([`Error::TooManyMetadataKeys`]).
///
/// Real files carry a handful (`format`, a config or two); each key costs about 100 bytes of
/// map bookkeeping for as little as 6 bytes of JSON (`"k":"",`). The values' total size needs no
/// limit of its own: strings are stored at no more than their size in the header.
pub const MAX_METADATA_KEYS: usize = 65_536;

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
    /// Whether the header has a `__metadata__` map (an empty `{}` counts; absent or `null` do
    /// not): safetensors' `metadata()` returns `{}` for the one and `None` for the others.
    pub metadata_present: bool,
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
    let mut violation = None;
    let capacity = tensor_count_hint(header);
    let raw = match de.deserialize_map(HeaderVisitor { violation: &mut violation, capacity }) {
        Ok(r) => r,
        Err(e) => {
            if let Some(v) = violation {
                return Err(v.into_error(path));
            }
            return Err(match e.classify() {
                serde_json::error::Category::Data if e.to_string().starts_with(METADATA_ERR) => {
                    Error::BadMetadata { file: path, message: e.to_string() }
                }
                _ => Error::HeaderJson { file: path, message: e.to_string() },
            });
        }
    };
    de.end().map_err(|e| Error::HeaderJson { file: path.clone(), message: e.to_string() })?;
    let RawHeader { mut tensors, metadata } = raw;
    debug_assert!(tensors.len() <= MAX_TENSORS);

    // Unique names, then file order (by offsets; equal offsets keep header order), both by
    // sorting 4-byte indices rather than the tensors, so that the checks allocate no more than
    // that (a stable sort of the tensors would allocate half their size again).
    // `as u32` keeps every index: there are at most MAX_TENSORS < 2^32 tensors.
    let mut order: Vec<u32> = (0..tensors.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(w) = order.windows(2).find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name) {
        return Err(Error::DuplicateTensor { file: path, tensor: tensors[w[0] as usize].name.clone() });
    }
    order.sort_unstable_by_key(|&i| (tensors[i as usize].data_offsets, i));
    permute(&mut tensors, order);

    // Each tensor must start where the previous ended.
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
    let metadata_present = metadata.is_some();
    Ok(Header { tensors, metadata: metadata.unwrap_or_default(), metadata_present, data_start, header_len, file_len })
}

const METADATA_ERR: &str = "__metadata__: ";

/// Reorder `items` in place so that the item at `order[k]` moves to `k`. `order` must be a
/// permutation of `0..items.len()`; it is used up as the record of what has moved.
fn permute<T>(items: &mut [T], mut order: Vec<u32>) {
    const DONE: u32 = u32::MAX;
    for start in 0..order.len() {
        // Follow the cycle through `start`: each swap puts one item in its final place.
        let mut k = start;
        while order[k] != DONE {
            let from = order[k] as usize;
            order[k] = DONE;
            if from == start {
                break;
            }
            items.swap(k, from);
            k = from;
        }
    }
}

/// How many tensors a header of `header` bytes can hold at most, from a cheap look at its bytes:
/// the count of `"data_offsets"` (each tensor has that key), but no more than entries of the
/// smallest size fit in it. Only a capacity hint: an escaped key makes it low, and the vector
/// then grows as usual.
fn tensor_count_hint(header: &[u8]) -> usize {
    const KEY: &[u8] = b"\"data_offsets\"";
    // `"":{"dtype":"U8","shape":[],"data_offsets":[0,0]}` and a comma.
    const SMALLEST_ENTRY: usize = 49;
    let count = header.windows(KEY.len()).filter(|w| w[0] == b'"' && *w == KEY).count();
    count.min(header.len() / SMALLEST_ENTRY).min(MAX_TENSORS)
}

/// A limit of the header that a visitor found exceeded; the parser turns it into its `Error`
/// (serde's errors inside a visitor can only carry a message).
enum LimitExceeded {
    Tensors,
    Rank { tensor: String },
    MetadataKeys,
}

impl LimitExceeded {
    fn into_error(self, file: PathBuf) -> Error {
        match self {
            LimitExceeded::Tensors => Error::TooManyTensors { file, limit: MAX_TENSORS },
            LimitExceeded::Rank { tensor } => Error::RankTooLarge { file, tensor, limit: MAX_RANK },
            LimitExceeded::MetadataKeys => Error::TooManyMetadataKeys { file, limit: MAX_METADATA_KEYS },
        }
    }
}

struct RawHeader {
    tensors: Vec<TensorInfo>,
    metadata: Option<BTreeMap<String, String>>,
}

/// Visits the header object: tensors and `__metadata__`, each limit checked before what it
/// bounds is built. A limit hit is recorded in `violation` and ends the parse with an error.
struct HeaderVisitor<'v> {
    violation: &'v mut Option<LimitExceeded>,
    /// How many tensors to make room for at first.
    capacity: usize,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(self.capacity).min(MAX_TENSORS));
        let mut metadata = None;
        let mut metadata_seen = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "__metadata__" {
                if metadata_seen {
                    return Err(de::Error::custom(format!("{METADATA_ERR}appears twice")));
                }
                metadata_seen = true;
                let seed = MetadataSeed { violation: &mut *self.violation };
                metadata = map.next_value_seed(seed).map_err(|e| de::Error::custom(format!("{METADATA_ERR}{e}")))?;
            } else {
                if tensors.len() == MAX_TENSORS {
                    *self.violation = Some(LimitExceeded::Tensors);
                    return Err(de::Error::custom("too many tensors"));
                }
                let raw: RawTensor = map
                    .next_value_seed(TensorSeed)
                    .map_err(|e| de::Error::custom(format!("tensor `{}`: {e}", crate::text::for_display(&key))))?;
                let shape = match raw.shape {
                    Shape::Dims(dims) => dims,
                    Shape::TooManyDims => {
                        *self.violation = Some(LimitExceeded::Rank { tensor: key.into_owned() });
                        return Err(de::Error::custom("rank too large"));
                    }
                };
                tensors.push(TensorInfo {
                    name: key.into_owned(),
                    dtype: raw.dtype,
                    shape,
                    data_offsets: raw.data_offsets,
                });
            }
        }
        Ok(RawHeader { tensors, metadata })
    }
}

/// `__metadata__`: `null` (as no metadata: `None`) or a map of string to string of at most
/// [`MAX_METADATA_KEYS`] keys.
struct MetadataSeed<'v> {
    violation: &'v mut Option<LimitExceeded>,
}

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = Option<BTreeMap<String, String>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of string to string")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut metadata = BTreeMap::new();
        let mut keys = 0usize;
        while let Some(key) = map.next_key::<String>()? {
            keys += 1;
            if keys > MAX_METADATA_KEYS {
                *self.violation = Some(LimitExceeded::MetadataKeys);
                return Err(de::Error::custom("too many keys"));
            }
            let value = map.next_value::<String>()?;
            metadata.insert(key, value);
        }
        Ok(Some(metadata))
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
    shape: Shape,
    data_offsets: (u64, u64),
}

/// A tensor's shape as declared: its dimensions, or the news that there are more than
/// [`MAX_RANK`] of them (the rest skipped unread, so a rank of 50 million costs no memory).
enum Shape {
    Dims(Vec<u64>),
    TooManyDims,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
        d.deserialize_seq(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut dims = [0u64; MAX_RANK];
        let mut rank = 0;
        while let Some(d) = seq.next_element::<u64>()? {
            if rank == MAX_RANK {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                return Ok(Shape::TooManyDims);
            }
            dims[rank] = d;
            rank += 1;
        }
        Ok(Shape::Dims(dims[..rank].to_vec()))
    }
}

fn de_dtype<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
    let s = <Cow<'de, str>>::deserialize(d)?;
    s.parse().map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_moves_each_item_to_its_place() {
        for order in [vec![], vec![0], vec![1, 0], vec![2, 0, 1], vec![1, 2, 0, 4, 3], vec![3, 0, 4, 1, 2, 5]] {
            let mut items: Vec<u32> = (0..order.len() as u32).map(|i| i * 10).collect();
            let want: Vec<u32> = order.iter().map(|&i| i * 10).collect();
            permute(&mut items, order);
            assert_eq!(items, want);
        }
    }

    #[test]
    fn metadata_present_tells_an_empty_map_from_none_and_null() {
        let present = |h: &str| {
            let h = parse_header("m.safetensors", h.as_bytes(), 8 + h.len() as u64).unwrap();
            (h.metadata_present, h.metadata.len())
        };
        assert_eq!(present("{}"), (false, 0));
        assert_eq!(present(r#"{"__metadata__":null}"#), (false, 0));
        assert_eq!(present(r#"{"__metadata__":{}}"#), (true, 0));
        assert_eq!(present(r#"{"__metadata__":{"a":"b"}}"#), (true, 1));
        let twice = parse_header("m.safetensors", br#"{"__metadata__":null,"__metadata__":{}}"#, 48);
        assert!(twice.is_err());
    }

    #[test]
    fn tensor_count_hint_counts_keys_within_what_fits() {
        assert_eq!(tensor_count_hint(br#"{"a":{"dtype":"U8","shape":[],"data_offsets":[0,0]}}"#), 1);
        assert_eq!(tensor_count_hint(br#"{"__metadata__":{"x":"\"data_offsets\""}}"#), 0);
        assert_eq!(tensor_count_hint(b"{}"), 0);
    }
}
