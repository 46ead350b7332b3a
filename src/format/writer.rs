//! Serialize tensors into a valid safetensors file (tests, `demo`, benchmarks).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::Dtype;
use crate::error::{Error, Result};

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

/// The header JSON (padded with spaces to a multiple of 8 bytes, as the reference writer does)
/// for tensors laid out in the given order.
pub fn header_json(tensors: &[(String, Dtype, Vec<u64>, u64)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
    }
    let mut offset = 0u64;
    for (name, dtype, shape, len) in tensors {
        map.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut json = serde_json::Value::Object(map).to_string().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    json
}

fn check(t: &WriteTensor<'_>) -> Result<u64> {
    let need = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).and_then(|n| t.dtype.bytes_for(n));
    match need {
        Some(n) if n == t.data.len() as u64 => Ok(n),
        _ => Err(Error::usage(format!(
            "tensor `{}`: {} bytes given for {} {:?}",
            t.name,
            t.data.len(),
            t.dtype,
            t.shape
        ))),
    }
}

fn header_for(tensors: &[WriteTensor<'_>], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::usage(format!("tensor `{}` given twice", t.name)));
        }
        entries.push((t.name.clone(), t.dtype, t.shape.clone(), check(t)?));
    }
    Ok(header_json(&entries, metadata))
}

/// Write `tensors` (in this order) and `metadata` to a new file at `path`.
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
    let path = path.as_ref();
    let header = header_for(tensors, metadata)?;
    let io = |e| Error::io(path, e);
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for t in tensors {
        w.write_all(t.data).map_err(io)?;
    }
    w.into_inner().map_err(|e| io(e.into_error()))?;
    Ok(())
}

/// Serialize to bytes in memory.
pub fn write_to_vec(tensors: &[WriteTensor<'_>], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let header = header_for(tensors, metadata)?;
    let mut out = Vec::with_capacity(8 + header.len() + tensors.iter().map(|t| t.data.len()).sum::<usize>());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for t in tensors {
        out.extend_from_slice(t.data);
    }
    Ok(out)
}
