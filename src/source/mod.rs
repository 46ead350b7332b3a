//! The source seam: from a path to the files of a checkpoint, each open, with its validated
//! header.
//!
//! A path may be a single `.safetensors` file, a `*.safetensors.index.json`, a directory (its
//! index if it has one, else all its `*.safetensors` files), or a Hugging Face cache folder
//! `models--org--name` (resolved through `refs/main` to `snapshots/<rev>`). With the `remote`
//! feature (on by default) it may also be an `s3://`, `gs://`, `az://` or `http(s)://` URL of
//! the same layouts ([`remote`]).
//!
//! Each local file is opened once, and its data is read through the descriptor its header was
//! read from: a file renamed over (a checkpoint re-saved next to a running server) cannot mix new
//! bytes into old offsets. Only regular files are opened (a FIFO would block `open` forever),
//! and a shard of an index must be, once opened, inside the index's tree. A remote object is
//! pinned to the ETag its header was read at in the same spirit.

mod local;
pub(crate) mod read;
#[cfg(feature = "remote")]
pub mod remote;
mod shared;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::regular_file::open_regular;
#[cfg(feature = "remote")]
pub use remote::RemoteObject;
pub use shared::SharedFile;

use crate::error::{Error, Result};
use crate::format::{read_header_from, Header, ShardIndex};

/// Whether `path` is a URL of a remote source (`s3://`, `gs://`, `az://`, `http(s)://`, …)
/// rather than a local path. A local directory named `s3:` (or `http:`, …) is reached as
/// `./s3://…`.
///
/// ```
/// use weightstream::source::is_remote;
/// assert!(is_remote("s3://bucket/model"));
/// assert!(is_remote("https://example.com/m.safetensors"));
/// assert!(!is_remote("model/m.safetensors"));
/// ```
pub fn is_remote(path: impl AsRef<std::path::Path>) -> bool {
    let Some(text) = path.as_ref().to_str() else { return false };
    let Some((scheme, rest)) = text.split_once("://") else { return false };
    !rest.is_empty()
        && matches!(scheme, "s3" | "s3a" | "gs" | "az" | "adl" | "azure" | "abfs" | "abfss" | "http" | "https")
}

/// How remote sources are reached and read (used with the `remote` feature).
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// `object_store` configuration keys and values, applied after the environment's
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`): `aws_endpoint`, `aws_region`, `allow_http`,
    /// `timeout`, … Two keys are weightstream's own: `max_retries` (default 10) and
    /// `retry_timeout` (default 3m) bound the retries of one request. An unknown key is an
    /// error.
    pub storage_options: Vec<(String, String)>,
    /// Ranged GETs in flight at most.
    pub concurrency: usize,
    /// Bytes asked for by one GET at most.
    pub request_size: usize,
    /// Stops the header reads of an open when cancelled ([`crate::Error::Cancelled`]).
    pub cancel: Option<crate::cancel::CancelToken>,
}

impl Default for RemoteOptions {
    /// 8 GETs of 8 MiB in flight (Run:ai Model Streamer's object-storage default, measured on
    /// the loopback in BENCHMARKS.md).
    fn default() -> Self {
        RemoteOptions { storage_options: Vec::new(), concurrency: 8, request_size: 8 << 20, cancel: None }
    }
}

/// How a file's data is reached.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FileAccess {
    /// A local file, open: the descriptor its header was read from.
    Local(Arc<File>),
    /// An object of a store or an HTTP server, as its header read found it.
    #[cfg(feature = "remote")]
    Remote(Arc<RemoteObject>),
}

/// One file of a checkpoint, open, and its validated header.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    /// Path of the file.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// How its data is read: the open file its header was read from, or the remote object.
    pub access: FileAccess,
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
        Ok(CheckpointFile { path: path.to_path_buf(), header, access: FileAccess::Local(Arc::new(file)) })
    }

    /// The open local file, or an error saying that `what` needs one.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// # weightstream::format::write_file(&p, &[weightstream::format::WriteTensor::new("w", weightstream::Dtype::U8, vec![1], &[1])], &Default::default())?;
    /// let f = weightstream::source::CheckpointFile::open(&p)?;
    /// assert!(!f.is_remote());
    /// assert!(f.local_file("an mmap")?.metadata()?.len() > 8);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg_attr(not(feature = "remote"), allow(unused_variables))]
    pub fn local_file(&self, what: &'static str) -> Result<&Arc<File>> {
        match &self.access {
            FileAccess::Local(f) => Ok(f),
            #[cfg(feature = "remote")]
            FileAccess::Remote(_) => {
                let remote = format!("a remote source ({})", self.path.display());
                Err(Error::unsupported(what, remote, "it needs a local file"))
            }
        }
    }

    /// Whether the file is a remote object.
    pub fn is_remote(&self) -> bool {
        !matches!(self.access, FileAccess::Local(_))
    }

    /// A second descriptor of the same file opened with O_DIRECT (through `/proc/self/fd`, so
    /// it is the file the header was read from even if the path now names another one).
    pub fn reopen_direct(&self) -> Result<File> {
        local::reopen_direct(self.local_file("O_DIRECT")?, &self.path)
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
    /// index's tensors are in their shards; no tensor is in two files). A remote URL is reached
    /// with the environment's credentials and endpoint ([`Checkpoint::open_with`] takes more).
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        Self::open_with(path, &RemoteOptions::default())
    }

    /// [`Checkpoint::open`], a remote URL reached with `remote`'s storage options.
    ///
    /// ```no_run
    /// use weightstream::{source::RemoteOptions, Checkpoint};
    /// let remote = RemoteOptions {
    ///     storage_options: vec![("aws_endpoint".into(), "http://127.0.0.1:9000".into())],
    ///     ..RemoteOptions::default()
    /// };
    /// let ckpt = Checkpoint::open_with("s3://models/llama/", &remote)?;
    /// println!("{} files, {} bytes", ckpt.files.len(), ckpt.total_bytes());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_with(path: impl AsRef<Path>, remote: &RemoteOptions) -> Result<Checkpoint> {
        let path = path.as_ref();
        if is_remote(path) {
            return Self::open_remote(path, remote);
        }
        let (files, index) = resolve(path)?;
        let files = files.into_iter().map(CheckpointFile::open).collect::<Result<Vec<_>>>()?;
        if let Some(index) = &index {
            local::check_confined(index, &files)?;
        }
        Self::checked(files, index)
    }

    #[cfg(feature = "remote")]
    fn open_remote(url: &Path, remote: &RemoteOptions) -> Result<Checkpoint> {
        let (files, index) = Self::open_remote_keeping(url, remote)?;
        Self::checked(files.into_iter().map(|(f, _)| f).collect(), index)
    }

    #[cfg(feature = "remote")]
    #[allow(clippy::type_complexity)]
    fn open_remote_keeping(
        url: &Path,
        remote: &RemoteOptions,
    ) -> Result<(Vec<(CheckpointFile, Vec<u8>)>, Option<ShardIndex>)> {
        let text = url.to_str().ok_or_else(|| Error::BadSource { file: url.into(), message: "not UTF-8".into() })?;
        remote::open(text, remote)
    }

    #[cfg(not(feature = "remote"))]
    fn open_remote(url: &Path, _: &RemoteOptions) -> Result<Checkpoint> {
        Err(Error::BadSource {
            file: url.into(),
            message: "weightstream was built without the `remote` feature".into(),
        })
    }

    #[cfg(not(feature = "remote"))]
    #[allow(clippy::type_complexity)]
    fn open_remote_keeping(
        url: &Path,
        remote: &RemoteOptions,
    ) -> Result<(Vec<(CheckpointFile, Vec<u8>)>, Option<ShardIndex>)> {
        Self::open_remote(url, remote).map(|_| (Vec::new(), None))
    }

    /// The files, checked together.
    fn checked(files: Vec<CheckpointFile>, index: Option<ShardIndex>) -> Result<Checkpoint> {
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

    /// Every file as an open local file, or a usage error saying that `what` needs local files
    /// (a remote object is read through its store only).
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # weightstream::format::write_file(dir.path().join("a.safetensors"), &[weightstream::format::WriteTensor::new("w", weightstream::Dtype::U8, vec![1], &[1])], &Default::default())?;
    /// let ckpt = weightstream::Checkpoint::open(dir.path())?;
    /// assert_eq!(ckpt.local_files("an mmap")?.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn local_files(&self, what: &'static str) -> Result<Vec<&Arc<File>>> {
        self.files.iter().map(|f| f.local_file(what)).collect()
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
