//! `model.safetensors.index.json`: the weight map of a sharded checkpoint.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The largest index file we read (real ones are well under 10 MB).
pub const MAX_INDEX_LEN: u64 = 256 << 20;

/// A parsed and checked index.
#[derive(Debug, Clone)]
pub struct ShardIndex {
    /// The index file.
    pub path: PathBuf,
    /// Tensor name -> shard path (inside the index's directory).
    pub weight_map: BTreeMap<String, PathBuf>,
    /// The shards, sorted, each once.
    pub shards: Vec<PathBuf>,
    /// The index's `metadata` object, as given.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: BTreeMap<String, String>,
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
        let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if len > MAX_INDEX_LEN {
            return Err(bad(format!("index is {len} bytes, more than the {MAX_INDEX_LEN} allowed"), None));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let raw: RawIndex =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid index JSON: {e}"), None))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let root = confinement_root(&canon_dir);
        let mut weight_map = BTreeMap::new();
        let mut checked: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (tensor, shard) in raw.weight_map {
            let shard_path = match checked.get(&shard) {
                Some(p) => p.clone(),
                None => {
                    let p = confine(dir, &root, &shard).map_err(|m| bad(m, Some(&tensor)))?;
                    checked.insert(shard.clone(), p.clone());
                    p
                }
            };
            weight_map.insert(tensor, shard_path);
        }
        let mut shards: Vec<PathBuf> = checked.into_values().collect();
        shards.sort();
        shards.dedup();
        Ok(ShardIndex { path: path.into(), weight_map, shards, metadata: raw.metadata.unwrap_or_default() })
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

/// `shard` joined to `dir`, if it is a plain relative path that stays inside `root` once symlinks
/// are resolved.
fn confine(dir: &Path, root: &Path, shard: &str) -> std::result::Result<PathBuf, String> {
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
    let joined = dir.join(rel);
    match joined.canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(joined),
        Ok(real) => Err(format!("shard `{shard}` leads outside {} (to {})", root.display(), real.display())),
        Err(e) => Err(format!("shard `{shard}`: {e}")),
    }
}
