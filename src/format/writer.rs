//! Serialize tensors into a valid safetensors file (the Python `save_file`, tests, `demo`,
//! benchmarks).
//!
//! The header is written the way the reference writer (safetensors 0.8) writes it: `__metadata__`
//! first, then one entry per tensor in data order with its fields in the order `dtype`, `shape`,
//! `data_offsets`, compact JSON padded with spaces to a multiple of 8 bytes. Tensors laid out
//! in [`sort_like_reference`]'s order therefore give the reference's bytes exactly (its
//! `__metadata__` comes from a hash map, so with two or more keys only their order can differ).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::{Dtype, MAX_HEADER_LEN};
use crate::error::{Error, Result, UsageError};

/// One tensor to write: its name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct WriteTensor<'a> {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Raw bytes (must be exactly what dtype and shape need).
    pub data: &'a [u8],
}

impl<'a> WriteTensor<'a> {
    /// A tensor to write.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<u64>, data: &'a [u8]) -> Self {
        WriteTensor { name: name.into(), dtype, shape, data }
    }
}

/// Put `tensors` in the order the reference writer lays them out: by dtype, widest first (the
/// reverse of [`Dtype::ALL`], which is the reference's order of increasing alignment), then by
/// name. Every tensor then starts at a multiple of its element size from the data start.
///
/// ```
/// use weightstream::format::{sort_like_reference, WriteTensor};
/// use weightstream::Dtype;
/// let mut t = vec![
///     WriteTensor::new("b", Dtype::U8, vec![1], &[0]),
///     WriteTensor::new("c", Dtype::F32, vec![1], &[0; 4]),
///     WriteTensor::new("a", Dtype::U8, vec![1], &[0]),
/// ];
/// sort_like_reference(&mut t);
/// assert_eq!(t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["c", "a", "b"]);
/// ```
pub fn sort_like_reference(tensors: &mut [WriteTensor<'_>]) {
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
}

/// One header entry; the field order is the reference's.
#[derive(serde::Serialize)]
struct Entry<'a> {
    dtype: &'static str,
    shape: &'a [u64],
    data_offsets: (u64, u64),
}

/// The header map, serialized in order (serde_json's own map would sort the keys).
struct HeaderMap<'a> {
    metadata: Option<&'a BTreeMap<String, String>>,
    tensors: &'a [(String, Dtype, Vec<u64>, u64)],
}

impl Serialize for HeaderMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        // No length hint: with one, serde_json closes an empty map at once, which is how the
        // reference writes `{},"__metadata__":{}}` for no tensors and an empty metadata.
        let mut map = serializer.serialize_map(None)?;
        if let Some(metadata) = self.metadata {
            map.serialize_entry("__metadata__", metadata)?;
        }
        let mut offset = 0u64;
        for (name, dtype, shape, len) in self.tensors {
            map.serialize_entry(name, &Entry { dtype: dtype.name(), shape, data_offsets: (offset, offset + len) })?;
            offset += len;
        }
        map.end()
    }
}

fn header_json_with(
    tensors: &[(String, Dtype, Vec<u64>, u64)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Vec<u8> {
    // Serializing strings, numbers and a string map cannot fail.
    let mut json = serde_json::to_vec(&HeaderMap { metadata, tensors }).unwrap_or_default();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    json
}

/// The header JSON (padded with spaces to a multiple of 8 bytes, as the reference writer does)
/// for tensors laid out in the given order; an empty `metadata` writes no `__metadata__`.
pub fn header_json(tensors: &[(String, Dtype, Vec<u64>, u64)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    header_json_with(tensors, (!metadata.is_empty()).then_some(metadata))
}

fn check(t: &WriteTensor<'_>) -> Result<u64> {
    let elements = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let need = elements.and_then(|n| t.dtype.bytes_for(n));
    match need {
        Some(n) if n == t.data.len() as u64 => Ok(n),
        Some(n) => Err(Error::bad_write(
            &t.name,
            format!("{} bytes given for {} {:?}, which takes {n}", t.data.len(), t.dtype, t.shape),
        )),
        None if elements.is_some() => Err(Error::bad_write(
            &t.name,
            format!("{} {:?} does not fill whole bytes ({} bits an element)", t.dtype, t.shape, t.dtype.bits()),
        )),
        None => Err(Error::bad_write(&t.name, format!("the shape {:?} overflows", t.shape))),
    }
}

fn header_for(tensors: &[WriteTensor<'_>], metadata: Option<&BTreeMap<String, String>>) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.name == "__metadata__" {
            // Readers take that key for the metadata map: the tensor would be lost.
            return Err(Error::bad_write(&t.name, "the name `__metadata__` is the header's metadata map"));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(Error::bad_write(&t.name, "given twice"));
        }
        entries.push((t.name.clone(), t.dtype, t.shape.clone(), check(t)?));
    }
    let header = header_json_with(&entries, metadata);
    if header.len() as u64 > MAX_HEADER_LEN {
        // No reader (the reference's or ours) opens such a file.
        let message = format!("the header would take {} bytes, more than the format's {MAX_HEADER_LEN}", header.len());
        return Err(UsageError::BadWrite { tensor: None, message }.into());
    }
    Ok(header)
}

/// Write `tensors` (in this order) and `metadata` to a new file at `path`; an empty `metadata`
/// writes no `__metadata__` ([`write_file_with`] tells `None` from empty).
///
/// ```
/// use weightstream::format::{read_header, write_file, WriteTensor};
/// use weightstream::Dtype;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("m.safetensors");
/// write_file(&path, &[WriteTensor::new("a", Dtype::BF16, vec![2, 2], &[1u8; 8])], &Default::default())?;
/// assert_eq!(read_header(&path)?.tensors[0].shape, vec![2, 2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_file(
    path: impl AsRef<Path>,
    tensors: &[WriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_file_with(path, tensors, (!metadata.is_empty()).then_some(metadata))
}

/// Write `tensors` (in this order) to `path`, with a `__metadata__` entry exactly when `metadata`
/// is `Some` (even empty, as the reference writes `metadata={}`).
///
/// The file is written beside `path` under a temporary name and renamed over it at the end, as
/// the reference does: a file of the same name that is memory-mapped (tensors loaded from it,
/// possibly the very tensors being written) is never truncated under its readers, and a failed
/// write leaves no partial file. The new file gets the permissions a plain create would give.
///
/// ```
/// use std::collections::BTreeMap;
/// use weightstream::format::{read_header, write_file_with, WriteTensor};
/// use weightstream::Dtype;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("m.safetensors");
/// let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
/// write_file_with(&path, &[WriteTensor::new("a", Dtype::U8, vec![3], &[1, 2, 3])], Some(&meta))?;
/// assert_eq!(read_header(&path)?.metadata, meta);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_file_with(
    path: impl AsRef<Path>,
    tensors: &[WriteTensor<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let header = header_for(tensors, metadata)?;
    let io = |e| Error::io(path, e);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".weightstream-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // 0o666 less the umask, as `File::create` gives (tempfile's default is 0o600).
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let temp = builder.tempfile_in(dir).map_err(io)?;
    let total = 8 + header.len() as u64 + tensors.iter().map(|t| t.data.len() as u64).sum::<u64>();
    // Reserving the length first lets the file system lay the file out in one piece.
    temp.as_file().set_len(total).map_err(io)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, temp.as_file());
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for t in tensors {
            w.write_all(t.data).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    let _: File = temp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Serialize to bytes in memory; an empty `metadata` writes no `__metadata__`.
pub fn write_to_vec(tensors: &[WriteTensor<'_>], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    write_to_vec_with(tensors, (!metadata.is_empty()).then_some(metadata))
}

/// Serialize to bytes in memory, with a `__metadata__` entry exactly when `metadata` is `Some`.
///
/// ```
/// use weightstream::format::{sort_like_reference, write_to_vec_with, WriteTensor};
/// use weightstream::Dtype;
/// let mut t = vec![WriteTensor::new("b", Dtype::U8, vec![1], &[7]), WriteTensor::new("a", Dtype::F16, vec![], &[0, 60])];
/// sort_like_reference(&mut t);
/// let bytes = write_to_vec_with(&t, None)?;
/// let header = br#"{"a":{"dtype":"F16","shape":[],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
/// assert_eq!(&bytes[8..8 + header.len()], header);
/// assert_eq!(&bytes[bytes.len() - 3..], [0, 60, 7]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_to_vec_with(tensors: &[WriteTensor<'_>], metadata: Option<&BTreeMap<String, String>>) -> Result<Vec<u8>> {
    let header = header_for(tensors, metadata)?;
    let mut out = Vec::with_capacity(8 + header.len() + tensors.iter().map(|t| t.data.len()).sum::<usize>());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for t in tensors {
        out.extend_from_slice(t.data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn reference_dtype(d: Dtype) -> safetensors_08::Dtype {
        serde_json::from_value(serde_json::Value::String(d.name().into())).unwrap()
    }

    /// Tensors of every dtype, several names each, in a scrambled order.
    fn sample() -> Vec<(String, Dtype, Vec<u64>, Vec<u8>)> {
        let mut out = Vec::new();
        for (i, d) in Dtype::ALL.iter().enumerate() {
            for (j, name) in ["z", "a.weight", "é", "m\"q\\"].iter().enumerate() {
                let shape = match j {
                    0 => vec![],
                    1 => vec![2, 4],
                    2 => vec![0, 3],
                    _ => vec![8],
                };
                let elements: u64 = shape.iter().product();
                if d.bytes_for(elements).is_none() {
                    continue;
                }
                let len = d.bytes_for(elements).unwrap() as usize;
                let data = (0..len).map(|k| (k * 31 + i * 7 + j) as u8).collect();
                out.push((format!("{name}{}", (i * 5 + 3) % 22), *d, shape, data));
            }
        }
        out.reverse();
        out
    }

    #[test]
    fn reference_order_gives_the_reference_bytes() {
        let sample = sample();
        let one_key = HashMap::from([("format".to_string(), "pt".to_string())]);
        for meta in [None, Some(HashMap::new()), Some(one_key)] {
            let views: Vec<(String, safetensors_08::tensor::TensorView)> = sample
                .iter()
                .map(|(n, d, s, data)| {
                    let shape = s.iter().map(|&x| x as usize).collect();
                    (n.clone(), safetensors_08::tensor::TensorView::new(reference_dtype(*d), shape, data).unwrap())
                })
                .collect();
            let theirs = safetensors_08::serialize(views, meta.clone()).unwrap();
            let mut ours: Vec<WriteTensor> =
                sample.iter().map(|(n, d, s, data)| WriteTensor::new(n.clone(), *d, s.clone(), data)).collect();
            sort_like_reference(&mut ours);
            let meta: Option<BTreeMap<String, String>> = meta.map(|m| m.into_iter().collect());
            assert_eq!(write_to_vec_with(&ours, meta.as_ref()).unwrap(), theirs, "{meta:?}");
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("w.safetensors");
            write_file_with(&path, &ours, meta.as_ref()).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), theirs);
        }
    }

    #[test]
    fn no_tensors_and_empty_metadata_is_valid_json() {
        // The reference writes `{},"__metadata__":{}}` here; ours parses.
        let bytes = write_to_vec_with(&[], Some(&BTreeMap::new())).unwrap();
        assert_eq!(&bytes[8..], br#"{"__metadata__":{}}     "#);
        assert_eq!(&write_to_vec_with(&[], None).unwrap()[8..], b"{}      ");
    }

    #[test]
    fn rejects_wrong_sizes_partial_bytes_and_reserved_names() {
        let err = write_to_vec(&[WriteTensor::new("w", Dtype::F32, vec![2], &[0; 4])], &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("4 bytes given for F32 [2], which takes 8"), "{err}");
        let err = write_to_vec(&[WriteTensor::new("w", Dtype::F4, vec![3], &[0; 2])], &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("does not fill whole bytes"), "{err}");
        let err =
            write_to_vec(&[WriteTensor::new("w", Dtype::U8, vec![u64::MAX, 2], &[])], &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        let err =
            write_to_vec(&[WriteTensor::new("__metadata__", Dtype::U8, vec![0], &[])], &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("__metadata__"), "{err}");
    }

    #[test]
    fn replaces_a_file_without_truncating_it_and_keeps_plain_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, b"old contents").unwrap();
        let old = File::open(&path).unwrap();
        write_file(&path, &[WriteTensor::new("a", Dtype::U8, vec![2], &[1, 2])], &BTreeMap::new()).unwrap();
        // The open handle still sees the old inode, whole: it was replaced, not rewritten.
        assert_eq!(old.metadata().unwrap().len(), 12);
        assert_eq!(
            &std::fs::read(&path).unwrap()[8..],
            b"{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}   \x01\x02"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let other = tempfile::tempdir().unwrap();
            let plain = other.path().join("plain");
            File::create(&plain).unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), mode(&plain), "the mode of a plain create (0o666 less the umask)");
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["m.safetensors"], "no temporary file left behind");
    }
}
