//! `model.safetensors.index.json`: the weight map of a sharded checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// The largest index file we read: 64 MiB.
///
/// Real index files are a few MB: about 100 bytes per tensor, so the largest public
/// checkpoints (around 100,000 tensors) need about 10 MB. 64 MiB leaves room for several times
/// that while the work and memory of an index stay small: the `metadata` object is skipped
/// unread except for `total_size`, and the weight map may list at most [`MAX_INDEX_TENSORS`].
pub const MAX_INDEX_LEN: u64 = 64 << 20;

/// The most tensors an index's weight map may list: the per-file limit
/// [`super::MAX_TENSORS`], far above any real model. Each entry costs about 150 bytes of map
/// bookkeeping for as little as 8 bytes of JSON (`"a":"s",`), so this bounds the index's memory.
pub const MAX_INDEX_TENSORS: usize = super::MAX_TENSORS;

/// A parsed and checked index.
#[derive(Debug, Clone)]
pub struct ShardIndex {
    /// The index file.
    pub path: PathBuf,
    /// Tensor name -> shard path (inside the index's directory).
    pub weight_map: BTreeMap<String, PathBuf>,
    /// The shards, sorted, each once.
    pub shards: Vec<PathBuf>,
    /// `metadata.total_size` as the index declares it (not checked against the shards). The
    /// other keys of `metadata` are skipped unread: an index cannot make us build a JSON tree.
    pub total_size: Option<u64>,
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<RawMetadata>,
    weight_map: RawWeightMap,
}

#[derive(Deserialize)]
struct RawMetadata {
    #[serde(default)]
    total_size: Option<TotalSize>,
    // Any other key is ignored without being stored (serde skips unknown fields).
}

/// `total_size`: a number as written by `transformers`; anything else is kept as unknown rather
/// than refused, as the metadata is informative.
struct TotalSize(Option<u64>);

impl<'de> Deserialize<'de> for TotalSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(TotalSizeVisitor)
    }
}

struct TotalSizeVisitor;

impl<'de> Visitor<'de> for TotalSizeVisitor {
    type Value = TotalSize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<TotalSize, E> {
        Ok(TotalSize(Some(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<TotalSize, E> {
        Ok(TotalSize(u64::try_from(v).ok()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<TotalSize, E> {
        Ok(TotalSize(None))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<TotalSize, E> {
        Ok(TotalSize(None))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<TotalSize, E> {
        Ok(TotalSize(None))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<TotalSize, E> {
        Ok(TotalSize(None))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<TotalSize, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TotalSize(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<TotalSize, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(TotalSize(None))
    }
}

/// The weight map as read: each tensor with the number of its shard, each shard name stored
/// once, at most [`MAX_INDEX_TENSORS`] entries.
struct RawWeightMap {
    entries: Vec<(String, usize)>,
    shard_names: Vec<String>,
}

const TOO_MANY_TENSORS: &str = "weight_map lists more than";

impl<'de> Deserialize<'de> for RawWeightMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(WeightMapVisitor)
    }
}

struct WeightMapVisitor;

impl<'de> Visitor<'de> for WeightMapVisitor {
    type Value = RawWeightMap;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of tensor name to shard file name")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawWeightMap, A::Error> {
        let mut entries = Vec::new();
        let mut shard_names = Vec::new();
        let mut shard_numbers: HashMap<String, usize> = HashMap::new();
        while let Some(tensor) = map.next_key::<String>()? {
            if entries.len() == MAX_INDEX_TENSORS {
                return Err(de::Error::custom(format!("{TOO_MANY_TENSORS} {MAX_INDEX_TENSORS} tensors")));
            }
            let shard = map.next_value::<std::borrow::Cow<'de, str>>()?;
            let number = match shard_numbers.get(shard.as_ref()) {
                Some(&n) => n,
                None => {
                    let n = shard_names.len();
                    shard_names.push(shard.clone().into_owned());
                    shard_numbers.insert(shard.into_owned(), n);
                    n
                }
            };
            entries.push((tensor, number));
        }
        Ok(RawWeightMap { entries, shard_names })
    }
}

impl ShardIndex {
    /// Read and check the index at `path`: every shard must be a plain relative name inside the
    /// index's directory (no `..`, no absolute path, no symlink leading outside; in a Hugging Face
    /// cache snapshot, symlinks may lead to the cache repo folder's `blobs/`).
    ///
    /// ```no_run
    /// let index = weightstream::format::ShardIndex::read("model/model.safetensors.index.json")?;
    /// println!("{} shards", index.shards.len());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read(path: impl AsRef<Path>) -> Result<ShardIndex> {
        let path = path.as_ref();
        let bad = |message: String, tensor: Option<&str>| Error::BadIndex {
            file: path.into(),
            tensor: tensor.map(str::to_string),
            message,
        };
        // A regular file only (a FIFO would block the read forever), read through the descriptor
        // whose size was checked, at most one byte past the limit (the file may grow meanwhile).
        let file = crate::regular_file::open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len > MAX_INDEX_LEN {
            return Err(bad(format!("index is {len} bytes, more than the {MAX_INDEX_LEN} allowed"), None));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_INDEX_LEN + 1), &mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if bytes.len() as u64 > MAX_INDEX_LEN {
            return Err(bad(format!("index grew past the {MAX_INDEX_LEN} bytes allowed while read"), None));
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let root = confinement_root(&canon_dir);
        Self::from_json(path, &bytes, |shard| confine(dir, &root, shard))
    }

    /// Parse and check index JSON `bytes` read from `path` (named in errors), each shard name
    /// turned into the shard's path by `shard_path` (or refused with its message).
    pub(crate) fn from_json(
        path: &Path,
        bytes: &[u8],
        mut shard_path: impl FnMut(&str) -> std::result::Result<PathBuf, String>,
    ) -> Result<ShardIndex> {
        let bad = |message: String, tensor: Option<&str>| Error::BadIndex {
            file: path.into(),
            tensor: tensor.map(str::to_string),
            message,
        };
        let raw: RawIndex = serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid index JSON: {e}"), None))?;
        let RawWeightMap { entries, shard_names } = raw.weight_map;
        // Each shard is checked once, when the first tensor that names it comes (in file order).
        let mut checked: Vec<Option<PathBuf>> = vec![None; shard_names.len()];
        let mut weight_map = BTreeMap::new();
        for (tensor, number) in entries {
            let shard_path = match &checked[number] {
                Some(p) => p.clone(),
                None => {
                    let p = shard_path(&shard_names[number]).map_err(|m| bad(m, Some(&tensor)))?;
                    checked[number] = Some(p.clone());
                    p
                }
            };
            weight_map.insert(tensor, shard_path);
        }
        let mut shards: Vec<PathBuf> = checked.into_iter().flatten().collect();
        shards.sort();
        shards.dedup();
        let total_size = raw.metadata.and_then(|m| m.total_size).and_then(|t| t.0);
        Ok(ShardIndex { path: path.into(), weight_map, shards, total_size })
    }
}

/// Where the shards of an index in `canon_dir` must lead once symlinks are resolved: the index's
/// directory, or, for a Hugging Face cache snapshot (`models--org--name/snapshots/<rev>`, whose
/// files are symlinks to `../../blobs/<hash>`), the cache repo folder `models--org--name`.
pub(crate) fn confinement_root(canon_dir: &Path) -> PathBuf {
    let repo = canon_dir
        .parent()
        .filter(|snapshots| snapshots.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .filter(|repo| {
            let name = repo.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.starts_with("models--") || name.starts_with("datasets--")) && repo.join("blobs").is_dir()
        });
    repo.unwrap_or(canon_dir).to_path_buf()
}

/// `shard` as a relative path, if it is a plain one: not empty, not absolute, no `..`.
pub(crate) fn plain_relative(shard: &str) -> std::result::Result<&Path, String> {
    let rel = Path::new(shard);
    if shard.is_empty() {
        return Err("empty shard name".into());
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) => {}
            Component::CurDir => {}
            _ => return Err(format!("shard `{shard}` is not a plain relative name inside the index's directory")),
        }
    }
    Ok(rel)
}

/// `shard` joined to `dir`, if it is a plain relative path that stays inside `root` once symlinks
/// are resolved.
fn confine(dir: &Path, root: &Path, shard: &str) -> std::result::Result<PathBuf, String> {
    let rel = plain_relative(shard)?;
    let joined = dir.join(rel);
    match joined.canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(joined),
        Ok(real) => Err(format!("shard `{shard}` leads outside {} (to {})", root.display(), real.display())),
        Err(e) => Err(format!("shard `{shard}`: {e}")),
    }
}
