//! The source seam: from a path to the files of a checkpoint, each open, with its validated
//! header.
//!
//! A path may be a single `.safetensors` file, a `*.safetensors.index.json`, a directory (its
//! index if it has one, else all its `*.safetensors` files), or a Hugging Face cache folder
//! `models--org--name` (resolved through `refs/main` to `snapshots/<rev>`).
//!
//! Each file is opened once, and its data is read through the descriptor its header was read
//! from: a file renamed over (a checkpoint re-saved next to a running server) cannot mix new
//! bytes into old offsets. Only regular files are opened (a FIFO would block `open` forever),
//! and a shard of an index must be, once opened, inside the index's tree. Object-store sources
//! will plug in here.

mod local;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use local::open_regular;

use crate::error::{Error, Result};
use crate::format::{read_header_from, Header, ShardIndex};

/// One file of a checkpoint, open, and its validated header.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    /// Path of the file.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// The open file its header was read from; the data is read through it too.
    pub file: Arc<File>,
}

impl CheckpointFile {
    /// Open the regular file at `path` and read its header.
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, source::CheckpointFile, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("x", Dtype::U8, vec![2], &[1, 2])], &Default::default())?;
    /// assert_eq!(CheckpointFile::open(&p)?.header.tensors.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let header = read_header_from(path, &mut file, len)?;
        Ok(CheckpointFile { path: path.to_path_buf(), header, file: Arc::new(file) })
    }

    /// A second descriptor of the same file opened with O_DIRECT (through `/proc/self/fd`, so
    /// it is the file the header was read from even if the path now names another one).
    pub fn reopen_direct(&self) -> Result<File> {
        local::reopen_direct(&self.file, &self.path)
    }
}

/// A checkpoint: its files in order, each with its header.
///
/// ```
/// use weightstream::{format::{write_file, WriteTensor}, Checkpoint, Dtype};
/// let dir = tempfile::tempdir()?;
/// write_file(dir.path().join("a.safetensors"), &[WriteTensor::new("x", Dtype::U8, vec![3], &[1, 2, 3])], &Default::default())?;
/// let ckpt = Checkpoint::open(dir.path())?;
/// assert_eq!(ckpt.files.len(), 1);
/// assert_eq!(ckpt.total_bytes(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Files in load order.
    pub files: Vec<CheckpointFile>,
    /// The index, when the checkpoint is sharded with one.
    pub index: Option<ShardIndex>,
}

impl Checkpoint {
    /// Resolve `path`, read and validate every file's header, and check the files together (an
    /// index's tensors are in their shards; no tensor is in two files).
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let (files, index) = resolve(path.as_ref())?;
        let files = files.into_iter().map(CheckpointFile::open).collect::<Result<Vec<_>>>()?;
        if let Some(index) = &index {
            local::check_confined(index, &files)?;
        }
        // One file without an index: its header already has unique names (checked by the
        // parser), and a map of a million names would cost more than the header itself.
        if files.len() == 1 && index.is_none() {
            return Ok(Checkpoint { files, index });
        }
        let mut owner: HashMap<&str, usize> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for t in &f.header.tensors {
                if let Some(&j) = owner.get(t.name.as_str()) {
                    return Err(Error::TensorInTwoFiles {
                        file: f.path.clone(),
                        tensor: t.name.clone(),
                        other: files[j].path.clone(),
                    });
                }
                owner.insert(&t.name, i);
            }
        }
        if let Some(index) = &index {
            for (tensor, shard) in &index.weight_map {
                let present = owner.get(tensor.as_str()).is_some_and(|&i| &files[i].path == shard);
                if !present {
                    return Err(Error::BadIndex {
                        file: index.path.clone(),
                        tensor: Some(tensor.clone()),
                        message: format!("listed in shard {} but not present there", shard.display()),
                    });
                }
            }
        }
        drop(owner);
        Ok(Checkpoint { files, index })
    }

    /// Total bytes of tensor data over all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.header.data_len()).sum()
    }

    /// Number of tensors over all files.
    pub fn tensor_count(&self) -> usize {
        self.files.iter().map(|f| f.header.tensors.len()).sum()
    }
}

/// Resolve `path` to the checkpoint's files, in load order, and its index if any.
pub fn resolve(path: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") {
            let index = ShardIndex::read(path)?;
            return Ok((index.shards.clone(), Some(index)));
        }
        return Ok((vec![path.to_path_buf()], None));
    }
    if !meta.is_dir() {
        return Err(Error::BadSource { file: path.into(), message: "neither a file nor a directory".into() });
    }
    match hf_cache_snapshot(path)? {
        // Resolved once: a snapshot laid out like a cache folder again is not followed further.
        Some(snapshot) => resolve_dir(&snapshot),
        None => resolve_dir(path),
    }
}

/// A directory's index if it has one, else its `*.safetensors` files.
fn resolve_dir(path: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>)> {
    let mut indexes = Vec::new();
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let entry = entry.map_err(|e| Error::io(path, e))?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(p);
        } else if name.ends_with(".safetensors") && p.is_file() {
            shards.push(p);
        }
    }
    indexes.sort();
    shards.sort();
    match indexes.len() {
        0 if shards.is_empty() => Err(Error::BadSource {
            file: path.into(),
            message: "directory holds no .safetensors file and no index".into(),
        }),
        0 => Ok((shards, None)),
        1 => {
            let index = ShardIndex::read(&indexes[0])?;
            Ok((index.shards.clone(), Some(index)))
        }
        _ => {
            // Prefer the conventional name; otherwise the choice would be a guess.
            let conventional = indexes.iter().find(|p| p.ends_with("model.safetensors.index.json"));
            match conventional {
                Some(p) => {
                    let index = ShardIndex::read(p)?;
                    Ok((index.shards.clone(), Some(index)))
                }
                None => Err(Error::BadSource {
                    file: path.into(),
                    message: format!("directory holds {} index files; name one", indexes.len()),
                }),
            }
        }
    }
}

/// For a Hugging Face cache folder `models--org--name`, the snapshot `refs/main` points at.
fn hf_cache_snapshot(dir: &Path) -> Result<Option<PathBuf>> {
    let refs_main = dir.join("refs").join("main");
    let snapshots = dir.join("snapshots");
    if !refs_main.is_file() || !snapshots.is_dir() {
        return Ok(None);
    }
    let bad = |message: String| Error::BadSource { file: refs_main.clone(), message };
    let meta = std::fs::metadata(&refs_main).map_err(|e| Error::io(&refs_main, e))?;
    if meta.len() > 4096 {
        return Err(bad("refs/main is too large to be a revision".into()));
    }
    let rev = std::fs::read_to_string(&refs_main).map_err(|e| Error::io(&refs_main, e))?;
    let rev = rev.trim();
    if rev.is_empty()
        || !rev.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || rev.starts_with('.')
    {
        return Err(bad(format!("`{rev}` is not a plain revision name")));
    }
    let snap = snapshots.join(rev);
    if !snap.is_dir() {
        return Err(bad(format!("snapshot {} does not exist", snap.display())));
    }
    Ok(Some(snap))
}
